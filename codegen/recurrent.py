"""The recurrent form: one program per (sequence, head, V block), a loop over time, the
state in registers in fp32. Handles every transition class, varlen, initial and final
states, and noncausal specs (a first loop builds the state, a second one reads it).
"""

from __future__ import annotations

import math

from ..ir.analysis import Analysis
from ..ir.nodes import Node, Op, Program
from ..ir.sympy_view import format_node
from .step import Naming, StepEmitter, arange, block, mask, view

INDENT = "    "


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


def _load(ptr: str, dims: tuple[str, ...]) -> str:
    m = _mask_of(dims)
    if m is None:
        return f"tl.load({ptr}).to(tl.float32)"
    return f"tl.load({ptr} + {_offsets(dims)}, mask={m}, other=0.0).to(tl.float32)"


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


def _invariant(n: Node) -> bool:
    return not any(x.op in (Op.INPUT, Op.STATE, Op.POS) for x in n.walk())


def kernel_name(program: Program, direction: str = "fwd") -> str:
    """``gla_recurrent_fwd``."""
    return f"{program.name}_recurrent_{direction}"


def emit_recurrent_fwd(analysis: Analysis) -> str:
    """Python source of the recurrent forward kernel of ``analysis.program``."""
    p = analysis.program
    dims = used_dims(p)
    L: list[str] = []
    recurrence = "; ".join(f"{s}: {c.value}" for s, c in analysis.classes.items())
    L.append(f'''@triton.jit
def {kernel_name(p)}(''')
    args = [f"{n}_ptr" for n in p.inputs] + [f"{n}_ptr" for n in p.params] + ["o_ptr"]
    args += [f"{s}0_ptr" for s in p.states] + [f"{s}T_ptr" for s in p.states]
    args += ["cu_seqlens_ptr", "T"]
    args += [f"{d}: tl.constexpr" for d in ["H", *dims]]
    args += [f"{block(d)}: tl.constexpr" for d in dims]
    args += ["USE_INITIAL_STATE: tl.constexpr", "STORE_FINAL_STATE: tl.constexpr",
             "IS_VARLEN: tl.constexpr"]
    L += [f"{INDENT}{a}," for a in args]
    L.append("):")
    spec_lines = [p.line_of(u.span) for u in p.updates] + [p.line_of(p.output_span)]
    doc = [f'"""{p.name}: recurrent forward ({recurrence}).', "",
           "Spec:", *[f"    {x}" for x in spec_lines], "",
           "Grid: (V blocks, sequences * heads); each program owns one head of one sequence",
           "and the V block i_v; the state lives in registers in fp32 for the whole loop.",
           '"""']
    L += [INDENT + x if x else "" for x in doc]
    body: list[str] = []
    b = body.append
    b("i_v, i_nh = tl.program_id(0), tl.program_id(1)")
    b("i_n, i_h = i_nh // H, i_nh % H")
    b("if IS_VARLEN:")
    b(f"{INDENT}bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)")
    b(f"{INDENT}eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64)")
    b("else:")
    b(f"{INDENT}bos = i_n.to(tl.int64) * T")
    b(f"{INDENT}eos = bos + T")
    for d in dims:
        start = "i_v * BV + " if d == "V" else ""
        b(f"{arange(d)} = {start}tl.arange(0, {block(d)})  # lanes of {d}")
        b(f"{mask(d)} = {arange(d)} < {d}")
    b("h_f = i_h * 1.0")
    for d in ["H", *dims]:
        b(f"f_{d} = tl.full([], {d}, tl.float32)  # {d} as a number in expressions")
    naming = Naming(inputs={n: n for n in p.inputs}, params={n: n for n in p.params},
                    states={}, sizes={d: f"f_{d}" for d in ["H", *dims]})
    b("# ---- params (per head)")
    for n, decl in p.params.items():
        b(f"{n} = {_load(f'{n}_ptr + i_h * ({_size_expr(decl.dims)})', decl.dims)}")
    b("# ---- states, fp32 in registers")
    for s, decl in p.states.items():
        shape = ", ".join(block(d) for d in decl.dims)
        b(f"{s} = tl.zeros([{shape}], dtype=tl.float32)")
        b("if USE_INITIAL_STATE:")
        b(f"{INDENT}{s} += {_load(f'{s}0_ptr + i_nh * ({_size_expr(decl.dims)})', decl.dims)}")
    final = {s: p.final_version(s) for s in p.states}

    roots = [u.value for u in p.updates] + [p.output]
    invariant = []
    for r in roots:
        for n in r.walk():
            if n.op not in (Op.CONST, Op.PARAM, Op.HEAD, Op.HEADS, Op.SIZE) and _invariant(n) \
                    and n not in invariant:
                invariant.append(n)
    invariant_set = set(invariant)
    # keep only maximal invariant values (those with a consumer inside the loop)
    consumed_in_loop = {a for r in roots for n in r.walk() if n not in invariant_set
                        for a in n.args if a in invariant_set}
    hoisted = [n for n in invariant if n in consumed_in_loop or n in roots]
    pre = StepEmitter(p, naming, hoisted, "")
    if hoisted:
        b("# ---- values that do not change along the sequence")
        for n in hoisted:
            pre(n)
        body += pre.lines

    def step_body(with_updates: bool, with_output: bool, final_states: bool) -> list[str]:
        states = {}
        for s in p.states:
            for v in range(final[s] + 1):
                states[(s, v)] = s if (v == 0 or final_states) else f"{s}_{v}"
        naming.states = states
        em = StepEmitter(p, naming, roots, INDENT)
        em.vars.update(pre.vars)
        em.counter = pre.counter  # hoisted names stay unique
        em.keep |= set(pre.vars)
        em.emit("p_tok = (bos + t) * H + i_h  # row of this token and head")
        em.emit("t_f = t * 1.0")
        used_inputs = {x.attr for r in (roots if with_updates else [p.output])
                       for x in r.walk() if x.op is Op.INPUT}
        for n, decl in p.inputs.items():
            if n in used_inputs:
                em.emit(f"{n} = {_load(f'{n}_ptr + p_tok * ({_size_expr(decl.dims)})', decl.dims)}")
        if with_updates:
            for u in p.updates:
                em.emit(f"# {p.line_of(u.span)}")
                value = em(u.value)
                em.emit(f"{u.state}_{u.version} = {value}")
        if with_output:
            em.emit(f"# {p.line_of(p.output_span)}")
            o = em(p.output)
            od = p.output.dims
            ptr = f"o_ptr + p_tok * ({_size_expr(od)})"
            m = _mask_of(od)
            mask_arg = f", mask={m}" if m else ""
            off = f" + {_offsets(od)}" if od else ""
            em.emit(f"tl.store({ptr}{off}, {o}.to(o_ptr.dtype.element_ty){mask_arg})")
        if with_updates:
            for s in p.states:
                em.emit(f"{s} = {s}_{final[s]}")
        return em.lines

    if p.noncausal:
        b("# ---- pass 1: the state of the whole sequence (noncausal)")
        b("for t in range(0, eos - bos):")
        body += step_body(True, False, False)
        b("# ---- pass 2: every token reads the whole-sequence state")
        b("for t in range(0, eos - bos):")
        body += step_body(False, True, True)
    else:
        b("for t in range(0, eos - bos):")
        body += step_body(True, True, False)
    b("if STORE_FINAL_STATE:")
    for s, decl in p.states.items():
        ptr = f"{s}T_ptr + i_nh * ({_size_expr(decl.dims)}) + {_offsets(decl.dims)}"
        store = f"tl.store({ptr}, {s}.to({s}T_ptr.dtype.element_ty), mask={_mask_of(decl.dims)})"
        if "V" in decl.dims:
            b(f"{INDENT}{store}")
        else:  # every V block holds the same copy; the first one writes it
            b(f"{INDENT}if i_v == 0:")
            b(f"{INDENT * 2}{store}")
    L += [INDENT + x for x in body]
    header = [
        f"# Generated by linforge from spec '{p.name}' ({analysis.transition_class.value}).",
        f"# Output: o = {format_node(p.output)}",
        "import triton",
        "import triton.language as tl",
        "",
        "",
    ]
    return "\n".join(header + L) + "\n"


def choose_bv(program: Program, V: int, on_gpu: bool) -> int:
    """V block: whole V when V cannot be split, else at most 32 lanes on the GPU."""
    full = 1 << max(0, math.ceil(math.log2(max(V, 1))))
    if not v_splittable(program):
        return full
    return min(full, 32) if on_gpu else full
