"""The reference interpreter: runs a Program step by step in torch (float64 by default).

It is the oracle every generated kernel is tested against, so it follows the semantics
literally: for each token, evaluate each state update in order, then the output; a read of a
state sees the version named by its IR leaf. Autograd flows through it.

Value layout: every value is a tensor ``[B', H', *dims]`` whose leading two axes broadcast
against ``[B, H]`` (params have B' = 1, constants B' = H' = 1), paired with its dim names.
"""

from __future__ import annotations

import math

import torch

from .functions import ELEMENTWISE
from .nodes import L2NORM_EPS, Node, Op, Program


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


class StepEvaluator:
    """Evaluates IR nodes for one token; ``values`` holds the leaves of this step."""

    def __init__(self, values: dict, sizes: dict[str, int], dtype: torch.dtype,
                 device: torch.device):
        self.values = values     # ("input", name) / ("param", name) / ("state", name, v) / "h" / "t"
        self.sizes = sizes
        self.dtype = dtype
        self.device = device
        self.memo: dict[Node, torch.Tensor] = {}

    def scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=self.dtype, device=self.device).reshape(1, 1)

    def __call__(self, node: Node) -> torch.Tensor:
        hit = self.memo.get(node)
        if hit is None:
            hit = self.memo[node] = self._eval(node)
        return hit

    def _eval(self, n: Node) -> torch.Tensor:
        op = n.op
        if op is Op.INPUT:
            return self.values[("input", n.attr)]
        if op is Op.PARAM:
            return self.values[("param", n.attr)]
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


def _run_sequence(program: Program, inputs: dict, params: dict, state0: dict,
                  sizes: dict, dtype, device) -> tuple[torch.Tensor, dict]:
    """One batch of equal-length sequences: inputs [B, T, H, ...] -> o [B, T, H, ...]."""
    B, T = next(iter(inputs.values())).shape[:2] if inputs else (1, 0)
    H = sizes["H"]
    head = torch.arange(H, dtype=dtype, device=device).reshape(1, H)
    base = {("param", k): v.unsqueeze(0) for k, v in params.items()}
    base["h"] = head
    states = dict(state0)
    finals = {s: program.final_version(s) for s in program.states}

    def leaves(t: int, state_values: dict) -> dict:
        vals = dict(base)
        vals.update({("input", k): v[:, t] for k, v in inputs.items()})
        vals["t"] = torch.full((1, 1), float(t), dtype=dtype, device=device)
        vals.update({("state", s, 0): x for s, x in state_values.items()})
        return vals

    outputs = []
    for t in range(T):
        ev = StepEvaluator(leaves(t, states), sizes, dtype, device)
        for u in program.updates:
            ev.values[("state", u.state, u.version)] = ev(u.value)
        states = {s: ev.values[("state", s, finals[s])] for s in program.states}
        if not program.noncausal:
            outputs.append(ev(program.output))
    if program.noncausal:
        # every token reads the state of the whole sequence, whatever version it names
        for t in range(T):
            ev = StepEvaluator(leaves(t, states), sizes, dtype, device)
            for s in program.states:
                for v in range(finals[s] + 1):
                    ev.values[("state", s, v)] = states[s]
            outputs.append(ev(program.output))
    o_dims = program.output.dims
    o = [align(x, program.output.dims, o_dims).expand(B, H, *x.shape[2:]) for x in outputs]
    out = torch.stack(o, dim=1) if o else None
    return out, {s: x.expand(B, H, *x.shape[2:]) for s, x in states.items()}


def run_reference(program: Program, inputs: dict[str, torch.Tensor],
                  params: dict[str, torch.Tensor], sizes: dict[str, int], *,
                  initial_state: dict[str, torch.Tensor] | None = None,
                  cu_seqlens: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, dict]:
    """Run ``program`` token by token.

    inputs: name -> ``[B, T, H, *dims]``; params: name -> ``[H, *dims]``; sizes: every dim
    size plus ``H``; initial_state: name -> ``[N, H, *dims]`` (N = B, or the number of
    sequences with ``cu_seqlens``). Returns ``o [B, T, H, *o_dims]`` and the final states
    ``[N, H, *dims]``, all in ``dtype``. With ``cu_seqlens`` (B = 1) each packed sequence
    starts from its own initial state and nothing leaks across sequences.
    """
    any_input = next(iter(inputs.values()))
    device = any_input.device
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    params = {k: v.to(dtype) for k, v in params.items()}
    H = sizes["H"]

    def zeros(n: int) -> dict:
        return {s: torch.zeros(n, H, *(sizes[d] for d in decl.dims), dtype=dtype, device=device)
                for s, decl in program.states.items()}

    if cu_seqlens is None:
        B = any_input.shape[0]
        state0 = zeros(B) if initial_state is None else {
            s: x.to(dtype) for s, x in initial_state.items()}
        return _run_sequence(program, inputs, params, state0, sizes, dtype, device)

    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, finals = [], []
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq = {k: v[:, lo:hi] for k, v in inputs.items()}
        state0 = (zeros(1) if initial_state is None else
                  {s: x[n:n + 1].to(dtype) for s, x in initial_state.items()})
        o, final = _run_sequence(program, seq, params, state0, sizes, dtype, device)
        if o is not None:
            outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1)
    return o, {s: torch.cat([f[s] for f in finals], dim=0) for s in program.states}
