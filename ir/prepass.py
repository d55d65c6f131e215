"""Pre-pass lowering: values no step-by-step kernel can compute become extra inputs.

A reduction over the heads at one token (``sum(k, H)``), a reduction over the tokens of a
noncausal sequence (``softmax(s, T)``), the sequence length ``T`` and a position-indexed
param ``E[t]`` need more than one (token, head) at a time, which the generated kernels do
not have. When such a value reads no state, it is a function of the inputs alone: ``lift``
rewrites the program so that each of them is a synthetic input, and ``evaluate`` computes
those inputs over every token at once with torch (differentiable), before the kernels run.
The rewritten program is analysed as any other, so every form its transition class allows
runs it, with gradients flowing through the pre-pass into the original inputs and params.
Memory inputs (cross-attention) change which tokens the updates run over and are not
lowered this way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .interpret import StepEvaluator, reduce_axis
from .nodes import Decl, Node, Op, Program

#: ops whose value needs other tokens or heads than the one a kernel program holds
_CROSS = (Op.OVER_HEADS, Op.OVER_TOKENS, Op.LENGTH, Op.PARAM_AT)


@dataclass(frozen=True)
class Lifted:
    """A program whose cross-token and cross-head values are synthetic inputs."""

    program: Program                 # the rewritten program
    values: tuple[tuple[str, Node], ...]   # synthetic input name -> the value it stands for
    original: Program


def _needs_prepass(n: Node) -> bool:
    return any(x.op in _CROSS for x in n.walk())


def lift(program: Program) -> Lifted | None:
    """``program`` with every state-free value that needs other tokens or heads replaced by a
    synthetic input; None when there is nothing to lift or a value cannot be lifted (it
    reads a state, or the spec has memory inputs)."""
    roots = [u.value for u in program.updates] + [program.output]
    if program.memory or not any(_needs_prepass(r) for r in roots):
        return None
    names: dict[Node, str] = {}
    taken = set(program.inputs) | set(program.params) | set(program.states)
    failed = []

    def name_for(n: Node) -> str:
        if n not in names:
            i = len(names)
            while f"lifted_{i}" in taken:
                i += 1
            names[n] = f"lifted_{i}"
            taken.add(names[n])
        return names[n]

    memo: dict[Node, Node] = {}

    def rewrite(n: Node) -> Node:
        if n in memo:
            return memo[n]
        if n.op in _CROSS:
            if n.reads_state():
                failed.append(n)
                out = n
            else:
                out = Node(Op.INPUT, n.dims, (), name_for(n), n.span)
        elif not n.args or not _needs_prepass(n):
            out = n
        else:
            out = dataclasses.replace(n, args=tuple(rewrite(a) for a in n.args))
        memo[n] = out
        return out

    updates = tuple(dataclasses.replace(u, value=rewrite(u.value)) for u in program.updates)
    output = rewrite(program.output)
    if failed:
        return None
    inputs = dict(program.inputs)
    inputs.update({name: Decl(name, n.dims, n.span) for n, name in names.items()})
    params = {k: d for k, d in program.params.items() if d.position is None}
    # a dim only position-indexed params spanned (their maximum length) is gone with them
    used = {d for decl in (*inputs.values(), *params.values(), *program.states.values())
            for d in decl.dims}
    used |= {d for r in (*(u.value for u in updates), output) for n in r.walk()
             for d in n.dims}
    dims = {d: size for d, size in program.dims.items() if d in used}
    lowered = dataclasses.replace(program, inputs=inputs, params=params, updates=updates,
                                  output=output, dims=dims)
    return Lifted(lowered, tuple((name, n) for n, name in names.items()), program)


class _AllTokens(StepEvaluator):
    """Evaluates state-free values on every token at once (rows = B * T token-head pairs),
    with the reductions over a sequence's tokens and the position-indexed params."""

    def __init__(self, values, sizes, dtype, device, segments, positions, params, program):
        super().__init__(values, sizes, dtype, device)
        self.segments = segments      # (first row, end row) of every sequence
        self.positions = positions    # [rows] position of each token in its sequence
        self.params = params
        self.program = program

    def _eval(self, n: Node) -> torch.Tensor:
        if n.op is Op.OVER_TOKENS:
            x = self(n.args[0])
            rows = self.positions.shape[0]
            x = x.expand(rows, self.sizes["H"], *x.shape[2:])
            parts = [reduce_axis(n.attr, x[a:b], 0).expand(b - a, *x.shape[1:])
                     for a, b in self.segments]
            return torch.cat(parts, 0)
        if n.op is Op.PARAM_AT:
            decl = self.program.params[n.attr]
            E = self.params[n.attr].to(self.dtype)
            rows = E.index_select(1 + decl.dims.index(decl.position), self.positions)
            return rows.movedim(1 + decl.dims.index(decl.position), 0)
        return super()._eval(n)


def evaluate(lifted: Lifted, inputs: dict, params: dict, sizes: dict,
             cu_seqlens: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The synthetic inputs of ``lifted`` for a call: name -> ``[B, T, H, *dims]`` in fp32,
    differentiable in ``inputs`` and ``params``. Raises ValueError when a sequence is longer
    than the maximum length of a position-indexed param."""
    x0 = next(iter(inputs.values()))
    B, T, H = x0.shape[:3]
    device = x0.device
    if cu_seqlens is None:
        bounds = [b * T for b in range(B + 1)]
    else:
        bounds = [int(b) for b in cu_seqlens.tolist()]
    segments = list(zip(bounds[:-1], bounds[1:]))
    positions = torch.cat([torch.arange(b - a, device=device) for a, b in segments])
    lengths = torch.cat([torch.full((b - a,), float(b - a), device=device)
                         for a, b in segments])
    p = lifted.original
    longest = max((b - a for a, b in segments), default=0)
    for d in p.params.values():
        if d.position is not None and longest > sizes[d.position]:
            raise ValueError(
                f"{p.name}: a sequence has {longest} tokens, more than {d.position} = "
                f"{sizes[d.position]}, the maximum length of the position-indexed param "
                f"'{d.name}' (declared {d.name}[t < {d.position}, ...]); pass a longer "
                f"'{d.name}' or split the sequence")
    dtype = torch.float32
    values = {("input", n): x.to(dtype).reshape(B * T, *x.shape[2:]) for n, x in inputs.items()}
    values.update({("param", n): x.to(dtype).unsqueeze(0) for n, x in params.items()
                   if p.params[n].position is None})
    values["h"] = torch.arange(H, device=device, dtype=dtype).reshape(1, H)
    values["t"] = positions.to(dtype).reshape(-1, 1)
    values["T"] = lengths.to(dtype).reshape(-1, 1)
    ev = _AllTokens(values, sizes, dtype, device, segments, positions, params, p)
    out = {}
    for name, node in lifted.values:
        x = ev(node)
        x = x.expand(B * T, H, *x.shape[2:])
        out[name] = x.reshape(B, T, H, *x.shape[2:]).contiguous()
    return out


__all__ = ["Lifted", "evaluate", "lift"]
