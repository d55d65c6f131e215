"""The recurrent form: one program per (sequence, head, V block), a loop over time, the
state in registers in fp32.

Forward: handles every transition class, varlen, initial and final states, and noncausal
specs (a first loop builds the state, a second one reads it). For training it also stores
the state at the start of every chunk of ``CHUNK`` steps (checkpoints).

Backward: walks the chunks in reverse. For each chunk it reloads the checkpoint, recomputes
the chunk's states into a per-program scratch buffer, then steps back through the chunk:
recompute the step's values, differentiate them (``adjoint.AdjointEmitter``) and carry the
state's adjoint to the previous step. Memory: ``T / CHUNK`` checkpoints plus ``CHUNK``
scratch states per program, never one state per token.

With V split over programs, values without V (q, k, gates, vector states) are computed by
every program and their gradients are partial sums, one per V block, added up by the
caller; gradients of values over V belong to one program.
"""

from __future__ import annotations

import math

from ..ir.analysis import Analysis
from ..ir.nodes import Node, Op, Program
from ..ir.sympy_view import format_node
from .adjoint import AdjointEmitter
from .step import Naming, StepEmitter, arange, block, mask

INDENT = "    "
TOTAL = -1  # STATE version meaning "the whole sequence's state" (noncausal readouts)


# ---------------------------------------------------------------------- program facts
def v_splittable(program: Program) -> bool:
    """True when no operation reduces over V, so programs can own disjoint V blocks."""
    for root in [u.value for u in program.updates] + [program.output]:
        for n in root.walk():
            if n.op in (Op.CONTRACT, Op.SUM, Op.NORM, Op.L2NORM, Op.SOFTMAX) and n.attr == "V":
                return False
            if n.op is Op.TAYLOR2 and n.attr[0] == "V":
                return False
    return True


def used_dims(program: Program) -> list[str]:
    """Every dim some value of the program lives on, in declaration order."""
    seen = set()
    for root in [u.value for u in program.updates] + [program.output]:
        for n in root.walk():
            seen.update(n.dims)
    for table in (program.inputs, program.params, program.states):
        for d in table.values():
            seen.update(d.dims)
    return [d for d in program.dims if d in seen]


def step_roots(program: Program) -> tuple[dict[str, Node], Node]:
    """Each state's value after one step, and the output, reading only version-0 states.

    Intermediate versions are replaced by the value that made them. A noncausal output
    reads the whole sequence's state, marked with version ``TOTAL``.
    """
    made = {(u.state, u.version): u.value for u in program.updates}
    memo: dict[Node, Node] = {}

    def inline(n: Node, total: bool) -> Node:
        key = (n, total)
        if key in memo:
            return memo[key]
        if n.op is Op.STATE:
            name, version = n.attr
            if total:
                out = Node(Op.STATE, n.dims, (), (name, TOTAL), n.span)
            else:
                out = inline(made[n.attr], False) if version > 0 else n
        elif not n.args:
            out = n
        else:
            out = Node(n.op, n.dims, tuple(inline(a, total) for a in n.args), n.attr, n.span)
        memo[key] = out
        return out

    finals = {s: inline(made[(s, program.final_version(s))], False) for s in program.states}
    return finals, inline(program.output, program.noncausal)


def _invariant(n: Node) -> bool:
    return not any(x.op in (Op.INPUT, Op.STATE, Op.POS) for x in n.walk())


def hoisted_values(roots: list[Node]) -> list[Node]:
    """The largest values that do not change along the sequence (they read params only)."""
    invariant = []
    for r in roots:
        for n in r.walk():
            if n.op not in (Op.CONST, Op.PARAM, Op.HEAD, Op.HEADS, Op.SIZE) and _invariant(n) \
                    and n not in invariant:
                invariant.append(n)
    inv = set(invariant)
    consumed_in_loop = {a for r in roots for n in r.walk() if n not in inv
                        for a in n.args if a in inv}
    return [n for n in invariant if n in consumed_in_loop or n in roots]


def kernel_name(program: Program, direction: str = "fwd") -> str:
    """``gla_recurrent_fwd``."""
    return f"{program.name}_recurrent_{direction}"


def choose_bv(program: Program, V: int, limit: int | None) -> int:
    """V block: whole V when V cannot be split (or no ``limit``), else at most ``limit``."""
    full_v = 1 << max(0, math.ceil(math.log2(max(V, 1))))
    if limit is None or not v_splittable(program):
        return full_v
    return min(full_v, limit)


# ---------------------------------------------------------------------- source pieces
def _size_expr(dims: tuple[str, ...]) -> str:
    return " * ".join(dims) if dims else "1"


def _offsets(dims: tuple[str, ...]) -> str:
    """Element offsets of a contiguous block over ``dims`` (axes in order)."""
    if not dims:
        return "0"
    if len(dims) == 1:
        return arange(dims[0])
    r, c = dims
    return f"{arange(r)}[:, None] * {c} + {arange(c)}[None, :]"


def _mask_of(dims: tuple[str, ...]) -> str | None:
    if not dims:
        return None
    if len(dims) == 1:
        return mask(dims[0])
    r, c = dims
    return f"{mask(r)}[:, None] & {mask(c)}[None, :]"


def _load(base: str, dims: tuple[str, ...]) -> str:
    """fp32 load of the block over ``dims`` at element offset ``base`` (a pointer)."""
    m = _mask_of(dims)
    if m is None:
        return f"tl.load({base}).to(tl.float32)"
    return f"tl.load({base} + {_offsets(dims)}, mask={m}, other=0.0).to(tl.float32)"


def _store(base: str, dims: tuple[str, ...], value: str, ptr: str, *,
           atomic: bool = False) -> str:
    """Store ``value`` (cast to ``ptr``'s element type) to the block over ``dims``; with
    ``atomic``, add it to what is there."""
    m = _mask_of(dims)
    off = f" + {_offsets(dims)}" if dims else ""
    mask_arg = f", mask={m}" if m else ""
    if atomic:
        return f"tl.atomic_add({base}{off}, {value}{mask_arg}, sem='relaxed')"
    return f"tl.store({base}{off}, {value}.to({ptr}.dtype.element_ty){mask_arg})"


def _zeros(dims: tuple[str, ...]) -> str:
    return f"tl.zeros([{', '.join(block(d) for d in dims)}], dtype=tl.float32)" if dims \
        else "tl.full([], 0.0, tl.float32)"


def _scratch_offsets(dims: tuple[str, ...]) -> str:
    """Offsets of a whole padded block (no mask): scratch holds blocks as they are."""
    if not dims:
        return "0"
    if len(dims) == 1:
        return f"tl.arange(0, {block(dims[0])})"
    r, c = dims
    return f"tl.arange(0, {block(r)})[:, None] * {block(c)} + tl.arange(0, {block(c)})[None, :]"


class _Writer:
    """Shared parts of the forward and backward kernels of one program."""

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.p = p = analysis.program
        self.dims = used_dims(p)
        self.finals, self.out = step_roots(p)
        self.roots = [*self.finals.values(), self.out]
        self.hoisted = hoisted_values(self.roots)
        self.body: list[str] = []
        self.naming = Naming(inputs={n: n for n in p.inputs}, params={n: n for n in p.params},
                             states={}, sizes={d: f"f_{d}" for d in ["H", *self.dims]})
        self.pre: StepEmitter | None = None

    def b(self, line: str, depth: int = 0) -> None:
        self.body.append(INDENT * depth + line)

    def header(self, direction: str, args: list[str], doc: list[str]) -> list[str]:
        p = self.p
        recurrence = "; ".join(f"{s}: {c.value}" for s, c in self.analysis.classes.items())
        spec_lines = [p.line_of(u.span) for u in p.updates] + [p.line_of(p.output_span)]
        lines = [
            f"# Generated by linforge from spec '{p.name}' "
            f"({self.analysis.transition_class.value}).",
            f"# Output: o = {format_node(p.output)}",
            "import triton",
            "import triton.language as tl",
            "",
            "",
            "@triton.jit",
            f"def {kernel_name(p, direction)}(",
        ]
        consts = [f"{d}: tl.constexpr" for d in ["H", *self.dims]]
        consts += [f"{block(d)}: tl.constexpr" for d in self.dims]
        lines += [f"{INDENT}{a}," for a in args + consts]
        lines.append("):")
        title = "forward" if direction == "fwd" else "backward"
        text = [f'"""{p.name}: recurrent {title} ({recurrence}).', "", "Spec:",
                *[f"    {x}" for x in spec_lines], "", *doc, '"""']
        return lines + [INDENT + x if x else "" for x in text]

    def preamble(self) -> None:
        """Program ids, sequence bounds, lanes, sizes, params and hoisted values."""
        b, p = self.b, self.p
        b("i_v, i_nh = tl.program_id(0), tl.program_id(1)")
        b("i_n, i_h = i_nh // H, i_nh % H")
        b("if IS_VARLEN:")
        b("bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)", 1)
        b("eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64)", 1)
        b("ck_base = tl.load(chunk_offsets_ptr + i_n).to(tl.int64)", 1)
        b("else:")
        b("bos = i_n.to(tl.int64) * T", 1)
        b("eos = bos + T", 1)
        b("ck_base = i_n.to(tl.int64) * tl.cdiv(T, CHUNK)", 1)
        for d in self.dims:
            start = "i_v * BV + " if d == "V" else ""
            b(f"{arange(d)} = {start}tl.arange(0, {block(d)})  # lanes of {d}")
            b(f"{mask(d)} = {arange(d)} < {d}")
        b("h_f = i_h * 1.0")
        for d in ["H", *self.dims]:
            b(f"f_{d} = tl.full([], {d}, tl.float32)  # {d} as a number in expressions")
        b("# ---- params (per head)")
        for n, decl in p.params.items():
            b(f"{n} = {_load(f'{n}_ptr + i_h * ({_size_expr(decl.dims)})', decl.dims)}")
        self.pre = StepEmitter(p, self.naming, self.hoisted, "")
        if self.hoisted:
            b("# ---- values that do not change along the sequence")
            for n in self.hoisted:
                self.pre(n)
            self.body += self.pre.lines
            self.pre.lines = []

    def state_ptr(self, s: str, base: str, row: str) -> str:
        return f"{base} + ({row}) * ({_size_expr(self.p.states[s].dims)})"

    def store_state(self, s: str, base: str, row: str, value: str, depth: int) -> None:
        """Store a state block at ``base`` (a pointer argument) + ``row``; vector states (no
        V) are written by the first V block only."""
        dims = self.p.states[s].dims
        line = _store(self.state_ptr(s, base, row), dims, value, base)
        if "V" in dims:
            self.b(line, depth)
        else:
            self.b("if i_v == 0:", depth)
            self.b(line, depth + 1)

    def _roots(self, updates: bool, output: bool) -> list[Node]:
        return ([*self.finals.values()] if updates else []) + ([self.out] if output else [])

    def _loads(self, updates: bool, output: bool, extra: tuple = ()) -> list[tuple]:
        """(variable, pointer, dims) of every per-token tensor a step reads: the inputs its
        values use, then ``extra`` (the backward's ``d_o``)."""
        used = {x.attr for r in self._roots(updates, output) for x in r.walk()
                if x.op is Op.INPUT}
        return [(n, f"{n}_ptr", d.dims) for n, d in self.p.inputs.items() if n in used] + \
            list(extra)

    @staticmethod
    def _token_load(ptr: str, dims: tuple[str, ...], row: str) -> str:
        """Load of a per-token tensor at token row ``row`` (padded lanes masked)."""
        return _load(f"{ptr} + {row} * ({_size_expr(dims)})", dims)

    def prefetch_first(self, depth: int, first: str, *, updates: bool, output: bool,
                       extra: tuple = ()) -> None:
        """Before a loop with ``prefetch``: load the tensors of the token at position
        ``first`` (an in-bounds token index) into ``{name}_nx``."""
        self.b(f"p_nx = ({first}) * H + i_h  # row of the next token to load", depth)
        for var, ptr, dims in self._loads(updates, output, extra):
            self.b(f"{var}_nx = {self._token_load(ptr, dims, 'p_nx')}", depth)

    def step(self, depth: int, *, updates: bool, output: bool, states: dict,
             prefetch: str | None = None, extra: tuple = ()) -> StepEmitter:
        """Statements of one step at time ``t`` (loop variable): loads of the token's
        tensors, then the updated states (``{s}_new``) and/or the output. Returns the
        emitter (its values).

        With ``prefetch`` (the position of the token the next iteration handles, kept in
        bounds) this step's tensors were loaded by the previous iteration (or by
        ``prefetch_first``) and this one issues the next token's loads before computing,
        so memory latency overlaps the step's arithmetic."""
        p = self.p
        self.naming.states = states
        roots = self._roots(updates, output)
        em = StepEmitter(p, self.naming, roots, INDENT * depth)
        em.vars.update(self.pre.vars)
        em.counter = self.pre.counter  # names stay unique across the kernel
        em.keep |= set(self.pre.vars)
        em.emit("p_tok = (bos + t) * H + i_h  # row of this token and head")
        em.emit("t_f = t * 1.0")
        loads = self._loads(updates, output, extra)
        if prefetch:
            for var, _, _ in loads:
                em.emit(f"{var} = {var}_nx")
            em.emit("# prefetch the next token's tensors")
            em.emit(f"p_nx = ({prefetch}) * H + i_h")
            for var, ptr, dims in loads:
                em.emit(f"{var}_nx = {self._token_load(ptr, dims, 'p_nx')}")
        else:
            for var, ptr, dims in loads:
                em.emit(f"{var} = {self._token_load(ptr, dims, 'p_tok')}")
        if updates:
            for s, value in self.finals.items():
                em.emit(f"# {' / '.join(p.line_of(u.span) for u in p.updates if u.state == s)}")
                em.emit(f"{s}_new = {em(value)}")
        if output:
            em.emit(f"# {p.line_of(p.output_span)}")
            em(self.out)
        return em

    def store_output(self, em: StepEmitter) -> None:
        od = self.p.output.dims
        em.emit(_store(f"o_ptr + p_tok * ({_size_expr(od)})", od, em(self.out), "o_ptr"))

    def advance_states(self, em: StepEmitter) -> None:
        for s in self.p.states:
            em.emit(f"{s} = {s}_new")

    @staticmethod
    def ckpt_row(chunk: str) -> str:
        return f"(ck_base + {chunk}) * H + i_h"


# ---------------------------------------------------------------------- forward
# token positions for prefetching in a loop over a whole sequence: the first token (0 for
# an empty sequence, so the load stays in bounds) and the next one (the last again at the end)
FIRST = "tl.maximum(tl.minimum(bos, eos - 1), 0)"
NEXT = "tl.minimum(bos + t + 1, eos - 1)"

def emit_recurrent_fwd(analysis: Analysis) -> str:
    """Python source of the recurrent forward kernel of ``analysis.program``."""
    w = _Writer(analysis)
    p, b = w.p, w.b
    args = [f"{n}_ptr" for n in p.inputs] + [f"{n}_ptr" for n in p.params] + ["o_ptr"]
    args += [f"{s}0_ptr" for s in p.states] + [f"{s}T_ptr" for s in p.states]
    args += [f"{s}_ckpt_ptr" for s in p.states]
    args += ["cu_seqlens_ptr", "chunk_offsets_ptr", "T"]
    args += ["CHUNK: tl.constexpr", "USE_INITIAL_STATE: tl.constexpr",
             "STORE_FINAL_STATE: tl.constexpr", "SAVE_CHECKPOINTS: tl.constexpr",
             "IS_VARLEN: tl.constexpr"]
    doc = ["Grid: (V blocks, sequences * heads); each program owns one head of one sequence",
           "and the V block i_v; the state lives in registers in fp32 for the whole loop.",
           "With SAVE_CHECKPOINTS the state before every CHUNK-th step is stored for the",
           "backward pass."]
    w.preamble()
    b("# ---- states, fp32 in registers")
    for s, decl in p.states.items():
        b(f"{s} = {_zeros(decl.dims)}")
        b("if USE_INITIAL_STATE:")
        b(f"{s} += {_load(w.state_ptr(s, f'{s}0_ptr', 'i_nh'), decl.dims)}", 1)

    def checkpoint():
        b("if SAVE_CHECKPOINTS:", 1)
        b("if t % CHUNK == 0:", 2)
        for s in p.states:
            w.store_state(s, f"{s}_ckpt_ptr", w.ckpt_row("t // CHUNK"), s, 3)

    if p.noncausal:
        b("# ---- pass 1: the state of the whole sequence (noncausal)")
        w.prefetch_first(0, FIRST, updates=True, output=False)
        b("for t in range(0, eos - bos):")
        checkpoint()
        em = w.step(1, updates=True, output=False, states={(s, 0): s for s in p.states},
                    prefetch=NEXT)
        w.advance_states(em)
        w.body += em.lines
        b("# ---- pass 2: every token reads the whole-sequence state")
        w.prefetch_first(0, FIRST, updates=False, output=True)
        b("for t in range(0, eos - bos):")
        em = w.step(1, updates=False, output=True, states={(s, TOTAL): s for s in p.states},
                    prefetch=NEXT)
        w.store_output(em)
        w.body += em.lines
    else:
        w.prefetch_first(0, FIRST, updates=True, output=True)
        b("for t in range(0, eos - bos):")
        checkpoint()
        em = w.step(1, updates=True, output=True, states={(s, 0): s for s in p.states},
                    prefetch=NEXT)
        w.store_output(em)
        w.advance_states(em)
        w.body += em.lines
    b("if STORE_FINAL_STATE:")
    for s in p.states:
        w.store_state(s, f"{s}T_ptr", "i_nh", s, 1)
    lines = w.header("fwd", args, doc) + [INDENT + x for x in w.body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- backward
def gradient_targets(program: Program) -> tuple[dict[str, Node], dict[str, Node]]:
    """The input and param leaves of the step, by name (those the step reads)."""
    finals, out = step_roots(program)
    inputs, params = {}, {}
    for r in [*finals.values(), out]:
        for n in r.walk():
            if n.op is Op.INPUT:
                inputs[n.attr] = n
            elif n.op is Op.PARAM:
                params[n.attr] = n
    return inputs, params


def emit_recurrent_bwd(analysis: Analysis) -> str:
    """Python source of the recurrent backward kernel of ``analysis.program``."""
    w = _Writer(analysis)
    p, b = w.p, w.b
    inputs, params = gradient_targets(p)
    args = [f"{n}_ptr" for n in p.inputs] + [f"{n}_ptr" for n in p.params] + ["do_ptr"]
    args += [f"{s}_ckpt_ptr" for s in p.states] + [f"{s}_scratch_ptr" for s in p.states]
    if p.noncausal:
        args += [f"{s}_total_ptr" for s in p.states]
    args += [f"d{s}T_ptr" for s in p.states]
    args += [f"d{n}_ptr" for n in p.inputs] + [f"d{n}_ptr" for n in p.params]
    args += [f"d{s}0_ptr" for s in p.states]
    args += ["cu_seqlens_ptr", "chunk_offsets_ptr", "T"]
    args += ["CHUNK: tl.constexpr", "NV: tl.constexpr", "USE_FINAL_STATE_GRAD: tl.constexpr",
             "IS_VARLEN: tl.constexpr"]
    doc = ["Grid: (V blocks, sequences * heads), as the forward. Chunks are visited last to",
           "first: the chunk's states are recomputed from its checkpoint into this program's",
           "scratch, then the steps are differentiated in reverse. Gradients of inputs",
           "without V are this V block's part, added atomically over the blocks;",
           "param gradients are per-program partials (summed over blocks and sequences)."]
    w.preamble()
    nprog = "tl.num_programs(1)"

    # targets inside the loop: inputs, params read directly, hoisted values of params,
    # and the states before the step
    stops = frozenset(w.pre.vars)
    param_stops = [n for n in [*w.hoisted, *params.values()]
                   if any(x.op is Op.PARAM for x in n.walk())]
    acc = {n: f"acc_{i}" for i, n in enumerate(param_stops)}
    b("# ---- adjoint accumulators of param-derived values (summed over the sequence)")
    for n, name in acc.items():
        b(f"{name} = {_zeros(n.dims)}  # d/d {format_node(n)}")
    b("# ---- adjoints of the states after the last step")
    for s, decl in p.states.items():
        b(f"d_{s} = {_zeros(decl.dims)}")
        b("if USE_FINAL_STATE_GRAD:")
        seed = _load(w.state_ptr(s, f"d{s}T_ptr", "i_nh"), decl.dims)
        if "V" not in decl.dims:  # counted once, by the first V block
            seed = f"tl.where(i_v == 0, {seed}, 0.0)"
        b(f"d_{s} += {seed}", 1)

    state_leaves = {s: Node(Op.STATE, d.dims, (), (s, 0)) for s, d in p.states.items()}
    total_leaves = {s: Node(Op.STATE, d.dims, (), (s, TOTAL)) for s, d in p.states.items()}
    names = {(s, 0): s for s in p.states} | {(s, TOTAL): f"{s}_total" for s in p.states}

    d_o = (("d_o", "do_ptr", p.output.dims),)  # the output's adjoint, loaded per token

    def seed_do(em: StepEmitter) -> str:
        if "V" not in p.output.dims:
            em.emit("d_o = tl.where(i_v == 0, d_o, 0.0)  # counted once, by the first V block")
        return "d_o"

    if p.noncausal:
        b("# ---- the whole sequence's state (saved by the forward) and its adjoint")
        for s, decl in p.states.items():
            b(f"{s}_total = {_load(w.state_ptr(s, f'{s}_total_ptr', 'i_nh'), decl.dims)}")
        w.prefetch_first(0, FIRST, updates=False, output=True, extra=d_o)
        b("for t in range(0, eos - bos):")
        em = w.step(1, updates=False, output=True, states=names, prefetch=NEXT, extra=d_o)
        got = AdjointEmitter(em, stops).grads([(w.out, seed_do(em))],
                                              list(total_leaves.values()))
        for s, leaf in total_leaves.items():
            if leaf in got:
                em.emit(f"d_{s} += {got[leaf]}")
        w.body += em.lines

    b("n_chunks = tl.cdiv(eos - bos, CHUNK)")
    b("for i_c in range(0, n_chunks):")
    b("i_chunk = n_chunks - 1 - i_c  # chunks last to first", 1)
    b("t0 = i_chunk * CHUNK", 1)
    b("n_steps = tl.minimum(CHUNK, eos - bos - t0)", 1)
    b("# recompute this chunk's states from its checkpoint into scratch", 1)
    scratch = {s: f"{s}_scratch_ptr + ((i_nh * NV + i_v) * CHUNK + i_j) * "
                  f"({' * '.join(block(d) for d in decl.dims) or '1'})"
               for s, decl in p.states.items()}
    for s, decl in p.states.items():
        b(f"{s} = {_load(w.state_ptr(s, f'{s}_ckpt_ptr', w.ckpt_row('i_chunk')), decl.dims)}",
          1)
    w.prefetch_first(1, "bos + t0", updates=True, output=False)
    b("for i_j in range(0, n_steps):", 1)
    b("t = t0 + i_j", 2)
    for s, decl in p.states.items():
        b(f"tl.store({scratch[s]} + {_scratch_offsets(decl.dims)}, {s})", 2)
    em = w.step(2, updates=True, output=False, states=names,
                prefetch="tl.minimum(t + 1, t0 + n_steps - 1) + bos")
    w.advance_states(em)
    w.body += em.lines
    b("tl.debug_barrier()  # scratch written by all threads before it is read", 1)
    b("# differentiate the chunk's steps, last to first", 1)
    w.prefetch_first(1, "bos + t0 + n_steps - 1", updates=True, output=True, extra=d_o)
    b("for i_r in range(0, n_steps):", 1)
    b("i_j = n_steps - 1 - i_r", 2)
    b("t = t0 + i_j", 2)
    for s, decl in p.states.items():
        b(f"{s} = tl.load({scratch[s]} + {_scratch_offsets(decl.dims)})", 2)
    em = w.step(2, updates=True, output=True, states=names, extra=d_o,
                prefetch="tl.maximum(t - 1, t0) + bos")
    seeds = [(w.finals[s], f"d_{s}") for s in p.states] + [(w.out, seed_do(em))]
    targets = [*inputs.values(), *param_stops, *state_leaves.values()]
    got = AdjointEmitter(em, stops).grads(seeds, targets)
    for n, decl in p.inputs.items():
        g = got.get(inputs.get(n), _zeros(decl.dims))
        ptr = f"d{n}_ptr + p_tok * ({_size_expr(decl.dims)})"
        if "V" in decl.dims:
            em.emit(_store(ptr, decl.dims, g, f"d{n}_ptr"))
            continue
        em.emit("if NV == 1:")
        em.emit(INDENT + _store(ptr, decl.dims, g, f"d{n}_ptr"))
        em.emit("else:  # every V block adds its part (fp32 buffer, zeroed by the caller)")
        em.emit(INDENT + _store(ptr, decl.dims, g, f"d{n}_ptr", atomic=True))
    for n, name in acc.items():
        if n in got:
            em.emit(f"{name} += {got[n]}")
    for s, leaf in state_leaves.items():
        em.emit(f"d_{s} = {got.get(leaf, _zeros(p.states[s].dims))}")
    w.body += em.lines
    b("tl.debug_barrier()  # the next chunk overwrites scratch", 1)

    b("# ---- gradient of the initial states (partial over V blocks for vector states)")
    for s, decl in p.states.items():
        row = "i_nh" if "V" in decl.dims else f"i_v * {nprog} + i_nh"
        b(_store(w.state_ptr(s, f"d{s}0_ptr", row), decl.dims, f"d_{s}", f"d{s}0_ptr"))
    b("# ---- param gradients: back through the values computed before the loop")
    pre = w.pre
    pre.counter = max(pre.counter, em.counter)
    hoisted_acc = [(n, a) for n, a in acc.items() if n.op is not Op.PARAM]
    got = AdjointEmitter(pre).grads(hoisted_acc, list(params.values())) if hoisted_acc else {}
    w.body += pre.lines
    for n, decl in p.params.items():
        terms = [x for x in (got.get(params.get(n)), acc.get(params.get(n))) if x]
        g = " + ".join(terms) if terms else _zeros(decl.dims)
        ptr = f"d{n}_ptr + (i_v * {nprog} + i_nh) * ({_size_expr(decl.dims)})"
        b(_store(ptr, decl.dims, f"({g})" if len(terms) > 1 else g, f"d{n}_ptr"))
    lines = w.header("bwd", args, doc) + [INDENT + x for x in w.body]
    return "\n".join(lines) + "\n"
