"""The reference interpreter: runs a Program step by step in torch (float64 by default).

It is the oracle every generated kernel is tested against, so it follows the semantics
literally: for each token, evaluate each state update in order, then the output; a read of a
state sees the version named by its IR leaf. Autograd flows through it.

Noncausal specs run the updates over every token first, then the output of every token
against the final states. With memory inputs the updates run over the memory sequence and
the output over the query sequence; ``t`` and ``T`` are the position and the length in the
sequence being run. A reduction over tokens (``softmax(x, T)``) is computed before the pass
that needs it, from its argument evaluated at every token of that sequence.

Value layout: every value is a tensor ``[B', H', *dims]`` whose leading two axes broadcast
against ``[B, H]`` (params have B' = 1, constants B' = H' = 1), paired with its dim names.
"""

from __future__ import annotations

import math

import torch

from .functions import ELEMENTWISE
from .nodes import L2NORM_EPS, Node, Op, Program


def reduce_axis(kind: str, x: torch.Tensor, axis: int) -> torch.Tensor:
    """The reduction ``kind`` (sum, norm, l2norm, softmax) of ``x`` over ``axis``; sum and
    norm keep the axis with size 1."""
    if kind == "sum":
        return x.sum(axis, keepdim=True)
    if kind == "norm":
        return (x * x).sum(axis, keepdim=True).sqrt()
    if kind == "l2norm":
        return x / torch.sqrt((x * x).sum(axis, keepdim=True) + L2NORM_EPS)
    if kind == "softmax":
        return torch.softmax(x, axis)
    raise NotImplementedError(f"interpreter: no reduction {kind!r}")  # pragma: no cover


def align(x: torch.Tensor, src: tuple[str, ...], dst: tuple[str, ...]) -> torch.Tensor:
    """Permute and unsqueeze ``x`` (dims ``src``, a subset of ``dst``) to broadcast as ``dst``."""
    if src == dst:
        return x
    perm = [src.index(d) for d in dst if d in src]
    x = x.permute(0, 1, *(2 + p for p in perm))
    shape = list(x.shape[:2])
    j = 0
    for d in dst:
        if d in src:
            shape.append(x.shape[2 + j])
            j += 1
        else:
            shape.append(1)
    return x.reshape(shape)


def _letters(dims: tuple[str, ...], table: dict[str, str]) -> str:
    for d in dims:
        table.setdefault(d, "abcdefghijklmnopqrstuvwxyz"[len(table)])
    return "".join(table[d] for d in dims)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


class StepEvaluator:
    """Evaluates IR nodes for one token; ``values`` holds the leaves of this step."""

    def __init__(self, values: dict, sizes: dict[str, int], dtype: torch.dtype,
                 device: torch.device):
        # ("input", name) / ("memory", name) / ("param", name) / ("state", name, v) / "h" / "t"
        # / "T"; a position-indexed param's entry is the row of this token
        self.values = values
        self.sizes = sizes
        self.dtype = dtype
        self.device = device
        self.memo: dict[Node, torch.Tensor] = {}

    def scalar(self, value: float) -> torch.Tensor:
        """``value`` as a [1, 1] tensor, made once per (value, dtype, device): creating it
        from a Python number on a GPU is a host-to-device copy, which waits for the stream."""
        key = (value, self.dtype, self.device)
        hit = _CONSTANTS.get(key)
        if hit is None:
            hit = _CONSTANTS[key] = torch.full((1, 1), value, dtype=self.dtype,
                                               device=self.device)
        return hit

    def __call__(self, node: Node) -> torch.Tensor:
        hit = self.memo.get(node)
        if hit is None:
            hit = self.memo[node] = self._eval(node)
        return hit

    def _eval(self, n: Node) -> torch.Tensor:
        op = n.op
        if op is Op.INPUT:
            return self.values[("input", n.attr)]
        if op is Op.MEMORY:
            return self.values[("memory", n.attr)]
        if op is Op.PARAM or op is Op.PARAM_AT:
            return self.values[("param", n.attr)]
        if op is Op.LENGTH:
            return self.values["T"]
        if op is Op.OVER_TOKENS:
            raise RuntimeError("interpreter: a reduction over tokens needs the whole sequence; "
                               "run_reference computes it before the step")
        if op is Op.STATE:
            return self.values[("state", *n.attr)]
        if op is Op.CONST:
            return self.scalar(n.attr)
        if op is Op.HEAD:
            return self.values["h"]
        if op is Op.POS:
            return self.values["t"]
        if op is Op.HEADS:
            return self.scalar(self.sizes["H"])
        if op is Op.SIZE:
            return self.scalar(self.sizes[n.attr])
        args = [self(a) for a in n.args]
        if op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN):
            a, b = (align(x, s.dims, n.dims) for x, s in zip(args, n.args))
            fn = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div,
                  Op.POW: torch.pow, Op.MAX: torch.maximum, Op.MIN: torch.minimum}[op]
            return fn(a, b)
        if op is Op.NEG:
            return -args[0]
        if op is Op.CALL:
            return ELEMENTWISE[n.attr].torch_fn(args[0])
        if op is Op.CONTRACT or op is Op.OUTER:
            table: dict[str, str] = {}
            (a, b), (sa, sb) = args, (n.args[0].dims, n.args[1].dims)
            spec = (f"...{_letters(sa, table)},...{_letters(sb, table)}"
                    f"->...{_letters(n.dims, table)}")
            return torch.einsum(spec, a, b)
        x, src = args[0], n.args[0].dims
        if op is Op.OVER_HEADS:
            return reduce_axis(n.attr, x.expand(x.shape[0], self.sizes["H"], *x.shape[2:]), 1)
        if op is Op.TAYLOR2:
            ones = torch.ones_like(x[..., :1])
            quad = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
            return torch.cat([ones, x, quad], dim=-1)
        axis = 2 + src.index(n.attr)
        if op is Op.SUM:
            return x.sum(axis)
        if op is Op.NORM:
            return (x * x).sum(axis).sqrt()
        if op is Op.L2NORM:
            return x / torch.sqrt((x * x).sum(axis, keepdim=True) + L2NORM_EPS)
        if op is Op.SOFTMAX:
            return torch.softmax(x, axis)
        raise NotImplementedError(f"interpreter: no rule for {op}")  # pragma: no cover


class _Pass:
    """The tokens one pass of the interpreter runs over: the inputs, or the memory sequence
    (``kind`` names the leaves its tensors fill)."""

    def __init__(self, kind: str, tensors: dict, label: str):
        self.kind = kind
        self.tensors = tensors
        self.label = label
        self.length = next(iter(tensors.values())).shape[1] if tensors else 0


def _roots_reading(roots: list[Node], op: Op) -> list[Node]:
    """Distinct nodes with ``op`` below ``roots``, children before parents."""
    found: dict[Node, None] = {}
    for r in roots:
        found.update(dict.fromkeys(n for n in r.walk() if n.op is op))
    return list(found)


def _check_positions(program: Program, roots: list[Node], seq: _Pass, sizes: dict) -> None:
    """A sequence may not be longer than the maximum length of a position-indexed param."""
    read = {n.attr for n in _roots_reading(roots, Op.PARAM_AT)}
    for d in program.params.values():
        if d.name not in read:
            continue
        if d.position not in sizes:
            raise ValueError(f"{program.name}: no size for {d.position}, the maximum length of "
                             f"the position-indexed param '{d.name}'")
        if seq.length > sizes[d.position]:
            raise ValueError(
                f"{program.name}: {seq.label} has {seq.length} tokens, more than "
                f"{d.position} = {sizes[d.position]}, the maximum length of the position-indexed "
                f"param '{d.name}' (declared {d.name}[t < {d.position}, ...]); pass a longer "
                f"'{d.name}' or split the sequence")


def _run_sequence(program: Program, inputs: dict, params: dict, state0: dict,
                  sizes: dict, dtype, device, memory: dict | None = None,
                  label: str = "the sequence") -> tuple[torch.Tensor, dict]:
    """One batch of equal-length sequences: inputs [B, T, H, ...] -> o [B, T, H, ...]; with
    memory inputs, the states are built from ``memory`` [B, S, H, ...]."""
    B, T = next(iter(inputs.values())).shape[:2] if inputs else (1, 0)
    H = sizes["H"]
    head = torch.arange(H, dtype=dtype, device=device).reshape(1, H)
    indexed = {k: v for k, v in params.items() if program.params[k].position is not None}
    base = {("param", k): v.unsqueeze(0) for k, v in params.items() if k not in indexed}
    base["h"] = head
    states = dict(state0)
    finals = {s: program.final_version(s) for s in program.states}
    query = _Pass("input", inputs, label)
    keys = _Pass("memory", memory, f"the memory of {label}") if program.memory else query
    update_roots = [u.value for u in program.updates]
    _check_positions(program, update_roots, keys, sizes)
    _check_positions(program, [program.output], query, sizes)

    def scalar(x: float) -> torch.Tensor:
        return torch.full((1, 1), float(x), dtype=dtype, device=device)

    def leaves(seq: _Pass, t: int, state_values: dict) -> dict:
        vals = dict(base)
        vals.update({(seq.kind, k): v[:, t] for k, v in seq.tensors.items()})
        vals["t"] = scalar(t)
        vals["T"] = scalar(seq.length)
        for k, v in indexed.items():
            decl = program.params[k]
            vals[("param", k)] = v.select(1 + decl.dims.index(decl.position), t).unsqueeze(0)
        vals.update({("state", s, 0): x for s, x in state_values.items()})
        return vals

    def over_tokens(seq: _Pass, roots: list[Node]) -> list[dict]:
        """Per token, the value of every reduction over tokens below ``roots``."""
        per_token: list[dict] = [{} for _ in range(seq.length)]
        for r in _roots_reading(roots, Op.OVER_TOKENS):
            values = []
            for t in range(seq.length):
                ev = StepEvaluator(leaves(seq, t, {}), sizes, dtype, device)
                ev.memo.update(per_token[t])
                values.append(ev(r.args[0]))
            x = reduce_axis(r.attr, torch.stack(torch.broadcast_tensors(*values)), 0)
            for t in range(seq.length):
                per_token[t][r] = x[0] if x.shape[0] == 1 else x[t]
        return per_token

    if keys is query:
        reduced_keys = reduced_query = over_tokens(query, [*update_roots, program.output])
    else:
        reduced_keys = over_tokens(keys, update_roots)
        reduced_query = over_tokens(query, [program.output])
    outputs = []
    for t in range(keys.length):
        ev = StepEvaluator(leaves(keys, t, states), sizes, dtype, device)
        ev.memo.update(reduced_keys[t])
        for u in program.updates:
            ev.values[("state", u.state, u.version)] = ev(u.value)
        states = {s: ev.values[("state", s, finals[s])] for s in program.states}
        if not program.noncausal:
            outputs.append(ev(program.output))
    if program.noncausal:
        # every token reads the state of the whole sequence, whatever version it names
        for t in range(T):
            ev = StepEvaluator(leaves(query, t, states), sizes, dtype, device)
            ev.memo.update(reduced_query[t])
            for s in program.states:
                for v in range(finals[s] + 1):
                    ev.values[("state", s, v)] = states[s]
            outputs.append(ev(program.output))
    o_dims = program.output.dims
    o = [align(x, program.output.dims, o_dims).expand(B, H, *x.shape[2:]) for x in outputs]
    out = torch.stack(o, dim=1) if o else None
    return out, {s: x.expand(B, H, *x.shape[2:]) for s, x in states.items()}


def check_memory(program: Program, inputs: dict, memory: dict | None, cu_seqlens,
                 cu_seqlens_memory) -> None:
    """Clear errors for memory inputs that do not fit the spec or the queries."""
    name = program.name
    if not program.memory:
        if memory or cu_seqlens_memory is not None:
            raise ValueError(f"{name}: memory inputs given, but the spec declares none")
        return
    if memory is None or set(memory) != set(program.memory):
        raise ValueError(f"{name}: memory must map exactly the memory inputs "
                         f"{', '.join(program.memory)} to tensors [B, S, H, dims], got "
                         f"{', '.join(memory or {}) or 'none'}")
    B = next(iter(inputs.values())).shape[0]
    lengths = {k: v.shape[1] for k, v in memory.items()}
    if len(set(lengths.values())) > 1 or any(v.shape[0] != B for v in memory.values()):
        raise ValueError(f"{name}: memory inputs must all be [B, S, H, dims] with the inputs' "
                         f"B = {B} and one length S, got "
                         + ", ".join(f"{k} {tuple(v.shape)}" for k, v in memory.items()))
    if (cu_seqlens is None) != (cu_seqlens_memory is None):
        raise ValueError(f"{name}: varlen cross-attention needs both cu_seqlens (queries) and "
                         "cu_seqlens_memory (memory), with the same number of sequences")
    if cu_seqlens is not None and len(cu_seqlens) != len(cu_seqlens_memory):
        raise ValueError(f"{name}: cu_seqlens has {len(cu_seqlens) - 1} sequences but "
                         f"cu_seqlens_memory has {len(cu_seqlens_memory) - 1} (query sequence "
                         "n attends to memory n)")
    if cu_seqlens_memory is not None and int(cu_seqlens_memory[-1]) != next(
            iter(memory.values())).shape[1]:
        raise ValueError(f"{name}: cu_seqlens_memory ends at {int(cu_seqlens_memory[-1])} but "
                         f"the memory holds {next(iter(memory.values())).shape[1]} tokens")


def run_reference(program: Program, inputs: dict[str, torch.Tensor],
                  params: dict[str, torch.Tensor], sizes: dict[str, int], *,
                  initial_state: dict[str, torch.Tensor] | None = None,
                  cu_seqlens: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64,
                  memory: dict[str, torch.Tensor] | None = None,
                  cu_seqlens_memory: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Run ``program`` token by token.

    inputs: name -> ``[B, T, H, *dims]``; params: name -> ``[H, *dims]`` (a position-indexed
    param ``E[t < N, P]`` is ``[H, N, P]``); sizes: every dim size plus ``H``;
    initial_state: name -> ``[N, H, *dims]`` (N = B, or the number of sequences with
    ``cu_seqlens``); memory: the memory inputs of a cross-attention spec, name ->
    ``[B, S, H, *dims]`` with their own length S (``cu_seqlens_memory`` packs them as
    ``cu_seqlens`` packs the inputs, sequence n of one with sequence n of the other).
    Returns ``o [B, T, H, *o_dims]`` and the final states ``[N, H, *dims]``, all in
    ``dtype``. With ``cu_seqlens`` (B = 1) each packed sequence starts from its own initial
    state and nothing leaks across sequences. Raises ValueError when a sequence is longer
    than the maximum length of a position-indexed param it reads.
    """
    any_input = next(iter(inputs.values()))
    device = any_input.device
    check_memory(program, inputs, memory, cu_seqlens, cu_seqlens_memory)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    params = {k: v.to(dtype) for k, v in params.items()}
    memory = {k: v.to(dtype) for k, v in memory.items()} if program.memory else None
    H = sizes["H"]

    def zeros(n: int) -> dict:
        return {s: torch.zeros(n, H, *(sizes[d] for d in decl.dims), dtype=dtype, device=device)
                for s, decl in program.states.items()}

    if cu_seqlens is None:
        B = any_input.shape[0]
        state0 = zeros(B) if initial_state is None else {
            s: x.to(dtype) for s, x in initial_state.items()}
        return _run_sequence(program, inputs, params, state0, sizes, dtype, device, memory)

    bounds = [int(x) for x in cu_seqlens.tolist()]
    mbounds = [int(x) for x in cu_seqlens_memory.tolist()] if memory else bounds
    outs, finals = [], []
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq = {k: v[:, lo:hi] for k, v in inputs.items()}
        mem = {k: v[:, mbounds[n]:mbounds[n + 1]] for k, v in memory.items()} if memory \
            else None
        state0 = (zeros(1) if initial_state is None else
                  {s: x[n:n + 1].to(dtype) for s, x in initial_state.items()})
        o, final = _run_sequence(program, seq, params, state0, sizes, dtype, device, mem,
                                 label=f"sequence {n} of cu_seqlens")
        if o is not None:
            outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1)
    return o, {s: torch.cat([f[s] for f in finals], dim=0) for s in program.states}
