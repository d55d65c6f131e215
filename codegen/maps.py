"""Fused per-token maps: an elementwise function of a spec's inputs as one generated kernel.

The chunked form feeds its core kernels a query, key, value and log decay that the spec
computes per token (``elu(q) + 1``, ``softplus(dt + dt_bias) * A``, ``dt * x``). Evaluated
as torch ops, each such map costs a pass over memory per operation and an fp32 copy of its
inputs; here the compiler prints the map's sympy expression into one Triton kernel that
reads every input once, computes in fp32 registers and stores the result in the core's
dtype, and a second kernel for its gradient (sympy's derivative of the same expression).

A map qualifies when its value has at most one dim ``D`` and every leaf is an input over
``D`` or over no dim, a param over ``D`` or over no dim, the head index ``h``, a size or a
number. Rows are the B * T * H (token, head) pairs; a leaf without dims is one value per
row, broadcast over ``D``. Anything else stays in torch (``fused_map`` returns None). A sum
over ``D`` of such a map (RWKV-6's bonus ``sum(r * u * k)``) is one too, reduced in the
same kernel to one value per row (``fused_sum``). An input normalized over its dim
(``l2norm(q) * K ** -0.5``, the delta rules' queries and keys) is one fixed kernel pair with
the row's sum of squares in registers (``run_l2norm``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import sympy
import torch
import triton
import triton.language as tl

from ..ir.nodes import L2NORM_EPS, Node, Op
from ..ir.sympy_view import SympyView
from .cache import cache_key, load_module
from .launch import Launcher, apply, for_device, interpreting
from .printer import TritonPrintError, print_triton

#: rows x lanes of one program's tile
TILE = 4096


@dataclass(frozen=True)
class Leaf:
    """One symbol of a map: what it reads (``input`` or ``param`` ``name``, or ``h``) and
    whether it spans the map's dim (else one value per row or per head)."""

    kind: str
    name: str
    full: bool


@dataclass(frozen=True)
class MapPlan:
    """A map ready to generate: its expression over ``b_0, b_1, ...`` (one per leaf)."""

    expr: sympy.Expr
    leaves: tuple[Leaf, ...]
    text: str               # the spec expression, for the kernel's comment
    reduce: bool = False    # summed over D: one value per row

    @property
    def inputs(self) -> tuple[Leaf, ...]:
        """The leaves read from tensors, which get a gradient (all but ``h``)."""
        return tuple(x for x in self.leaves if x.kind != "h")


def _leaf(node: Node, dims: tuple[str, ...], given: tuple[Node, ...]) -> Leaf | None:
    if node in given and node.dims in ((), dims):   # a value the caller has (a state read)
        return Leaf("given", _given_name(node), bool(node.dims))
    if node.op is Op.HEAD:
        return Leaf("h", "h", False)
    if node.op in (Op.INPUT, Op.PARAM) and node.dims in ((), dims):
        return Leaf(node.op.value, node.attr, bool(node.dims))
    return None


@functools.lru_cache(maxsize=1024)
def _given_name(node: Node) -> str:
    from ..ir.sympy_view import format_node
    return format_node(node)


@functools.lru_cache(maxsize=512)
def _plan(expr: sympy.Expr, symbols: tuple[tuple[sympy.Symbol, Node], ...],
          dims: tuple[str, ...], sizes: tuple[tuple[str, int], ...], text: str,
          given: tuple[Node, ...] = ()):
    if len(dims) > 1:
        return None
    size_of = dict(sizes)
    subs, leaves, seen = {}, [], {}
    for sym, node in symbols:
        if node.op is Op.SIZE:
            subs[sym] = sympy.Integer(size_of[node.attr])
            continue
        if node.op is Op.HEADS:
            subs[sym] = sympy.Integer(size_of["H"])
            continue
        leaf = _leaf(node, dims, given)
        if leaf is None:
            return None
        if leaf not in seen:
            seen[leaf] = sympy.Symbol(f"b_{len(leaves)}", real=True)
            leaves.append(leaf)
        subs[sym] = seen[leaf]
    expr = expr.xreplace(subs)
    if expr.free_symbols - set(seen.values()) or not any(x.kind != "h" for x in leaves):
        return None     # (a map of h and numbers alone is a few values: torch makes them)
    plan = MapPlan(expr, tuple(leaves), text or str(expr))
    try:
        _source(plan)
    except TritonPrintError:
        return None
    return plan


def fused_map(node: Node, sizes: dict, given: tuple[Node, ...] = ()) -> MapPlan | None:
    """The fused map computing ``node`` per token and head, or None when it does not
    qualify (see the module docstring). ``given``: non-elementwise values the caller
    passes as tensors (the readout's state reads, ``("given", format_node(n))``)."""
    return _node_map(node, _dim_sizes(sizes), tuple(given))


def _dim_sizes(sizes: dict) -> tuple[tuple[str, int], ...]:
    """The sizes a map can read (dims and H; not B or T, which change call to call)."""
    return tuple(sorted((k, int(v)) for k, v in sizes.items() if k not in ("B", "T")))


@functools.lru_cache(maxsize=1024)
def _node_map(node: Node, sizes: tuple, given: tuple) -> MapPlan | None:
    view = SympyView()
    expr = view.to_sympy(node)
    return _plan(expr, tuple(view.leaves.items()), node.dims, sizes, _describe(node), given)


def fused_sum(node: Node, sizes: dict) -> MapPlan | None:
    """The fused map of ``sum(x)`` over the one dim of ``x`` (``node`` an ``Op.SUM``), x
    a map that qualifies: the kernel sums each row's lanes; None otherwise."""
    if node.op is not Op.SUM or node.dims or len(node.args[0].dims) != 1:
        return None
    plan = _node_map(node.args[0], _dim_sizes(sizes), ())
    if plan is None:
        return None
    return dataclasses.replace(plan, reduce=True, text=_describe(node))


def map_of(expr: sympy.Expr, symbols, dims: tuple[str, ...], sizes: dict,
           text: str = "") -> MapPlan | None:
    """The fused map of a sympy ``expr`` whose ``symbols`` ((symbol, node) pairs) stand
    for IR leaves, over ``dims``; None when it does not qualify."""
    return _plan(expr, tuple(symbols), tuple(dims), _dim_sizes(sizes), text)


def _describe(node: Node) -> str:
    from ..ir.sympy_view import format_node
    return format_node(node)


def _pointer(leaf: Leaf) -> str:
    """The load offsets of leaf ``i`` in a tile of rows ``r`` and lanes ``c``."""
    if leaf.kind == "param":
        return "(r % H) * D + c" if leaf.full else "r % H"
    return "r * D + c" if leaf.full else "r"


def _loads(plan: MapPlan) -> list[str]:
    lines = []
    for i, leaf in enumerate(plan.leaves):
        if leaf.kind == "h":
            lines.append(f"    b_{i} = (r % H).to(tl.float32)  # h, the head index")
            continue
        mask = "m" if leaf.full else "m_r"
        lines.append(f"    b_{i} = tl.load(x{i}_ptr + {_pointer(leaf)}, mask={mask}, "
                     f"other=0.0).to(tl.float32)  # {leaf.kind} {leaf.name}"
                     f"{'' if leaf.full else ' (one per row)'}")
    return lines


def _source(plan: MapPlan) -> str:
    """The forward and gradient kernels of ``plan``."""
    names = {sympy.Symbol(f"b_{i}", real=True): f"b_{i}" for i in range(len(plan.leaves))}
    ptrs = "".join(f"x{i}_ptr, " for i, x in enumerate(plan.leaves) if x.kind != "h")
    grads = "".join(f"d{i}_ptr, " for i, x in enumerate(plan.leaves) if x.kind != "h")
    head = [
        '"""Generated by linforge (codegen/maps.py): a per-token map of the chunked form."""',
        "import triton", "import triton.language as tl", "", "",
        "@triton.jit",
        f"def map_fwd(out_ptr, {ptrs}R, H: tl.constexpr, D: tl.constexpr, "
        "BR: tl.constexpr, BD: tl.constexpr):",
        f'    """out = {plan.text} for BR rows (token, head) and BD lanes of D."""',
        "    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]",
        "    c = tl.arange(0, BD)[None, :]",
        "    m_r = r < R",
        "    m = m_r & (c < D)",
    ]
    body = _loads(plan)
    fwd = head + body + [
        f"    out = {print_triton(plan.expr, names)}",
        "    out = out + tl.zeros([BR, BD], dtype=tl.float32)  # broadcast a per-row value",
    ] + ([
        "    out = tl.sum(tl.where(m, out, 0.0), axis=1)[:, None]  # the sum over D",
        "    tl.store(out_ptr + r, out.to(out_ptr.dtype.element_ty), mask=m_r)",
    ] if plan.reduce else [
        "    tl.store(out_ptr + r * D + c, out.to(out_ptr.dtype.element_ty), mask=m)",
    ])
    bwd = [
        "", "", "@triton.jit",
        f"def map_bwd(g_ptr, {ptrs}{grads}R, H: tl.constexpr, D: tl.constexpr, "
        "BR: tl.constexpr, BD: tl.constexpr):",
        f'    """Gradients of out = {plan.text} given g = d loss / d out: per element for '
        "leaves over D, summed over D for one-per-row leaves; params' rows are summed "
        'over tokens by the caller."""',
        "    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]",
        "    c = tl.arange(0, BD)[None, :]",
        "    m_r = r < R",
        "    m = m_r & (c < D)",
        "    g = tl.load(g_ptr + r, mask=m_r, other=0.0).to(tl.float32)  # one per row (a sum)"
        if plan.reduce else
        "    g = tl.load(g_ptr + r * D + c, mask=m, other=0.0).to(tl.float32)",
    ] + body
    for i, leaf in enumerate(plan.leaves):
        if leaf.kind == "h":
            continue
        sym = sympy.Symbol(f"b_{i}", real=True)
        deriv = print_triton(sympy.diff(plan.expr, sym), names)
        bwd.append(f"    d = tl.where(m, g * ({deriv}), 0.0)  # d out / d {leaf.name}")
        if leaf.full:
            bwd.append(f"    tl.store(d{i}_ptr + r * D + c, d.to(d{i}_ptr.dtype.element_ty), "
                       "mask=m)")
        else:
            bwd.append(f"    tl.store(d{i}_ptr + r, tl.sum(d, axis=1)[:, None].to("
                       f"d{i}_ptr.dtype.element_ty), mask=m_r)")
    return "\n".join(fwd + bwd) + "\n"


@functools.lru_cache(maxsize=512)
def _kernels(plan: MapPlan) -> tuple[Launcher, Launcher]:
    module = load_module(cache_key("map", sympy.srepr(plan.expr), repr(plan.leaves),
                                   "sum" if plan.reduce else ""),
                         "map", lambda: _source(plan))
    return Launcher(module.map_fwd), Launcher(module.map_bwd)


def _grid(R: int, D: int) -> tuple[tuple[int], int, int]:
    # (host integer arithmetic: triton's helpers are jit functions, microseconds a call)
    BD = 1 << max(0, D - 1).bit_length()
    BR = max(1, min(TILE // BD, 1 << max(0, R - 1).bit_length()))
    return (-(-R // BR),), BR, BD


class _FusedMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: MapPlan, shape: tuple, dtype: torch.dtype, H: int, *xs):
        R, D = shape[0] * shape[1] * shape[2], (shape[3] if len(shape) > 3 else 1)
        out = torch.empty(shape[:3] if plan.reduce else shape, dtype=dtype,
                          device=xs[0].device)
        grid, BR, BD = _grid(R, D)
        fwd, _ = _kernels(plan)
        for_device(fwd, out.device)(grid, out, *xs, R, H=H, D=D, BR=BR, BD=BD,
                                    **({} if interpreting() else {"num_warps": 4}))
        ctx.save_for_backward(*xs)
        ctx.plan, ctx.shape, ctx.H = plan, shape, H
        return out

    @staticmethod
    def backward(ctx, g):
        xs = ctx.saved_tensors
        plan, shape, H = ctx.plan, ctx.shape, ctx.H
        R, D = shape[0] * shape[1] * shape[2], (shape[3] if len(shape) > 3 else 1)
        grads = []
        for leaf, x in zip(plan.inputs, xs):
            rows = (R, D) if leaf.full else (R,)
            # a param's gradient is summed over the rows of its head afterwards (fp32)
            grads.append(torch.empty(rows, device=x.device,
                                     dtype=torch.float32 if leaf.kind == "param" else x.dtype))
        grid, BR, BD = _grid(R, D)
        _, bwd = _kernels(plan)
        for_device(bwd, g.device)(grid, g.contiguous(), *xs, *grads, R, H=H, D=D, BR=BR,
                                  BD=BD, **({} if interpreting() else {"num_warps": 4}))
        out = []
        for leaf, x, d in zip(plan.inputs, xs, grads):
            if leaf.kind == "param":
                d = d.reshape(-1, H, *d.shape[1:]).sum(0).reshape(x.shape).to(x.dtype)
            out.append(d.reshape(x.shape))
        return (None, None, None, None, *out)


def run_map(plan: MapPlan, tensors: dict, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``plan`` over every token and head: ``[B, T, H]`` or ``[B, T, H, D]`` in ``dtype``
    (``shape``; a sum's is ``[B, T, H]``, ``shape`` naming its D), differentiable in the
    inputs and params it reads. ``tensors`` maps ("input", name) and ("param", name) to
    the call's tensors."""
    xs = [tensors[(leaf.kind, leaf.name)].contiguous() for leaf in plan.inputs]
    return apply(_FusedMap, plan, tuple(shape), dtype, shape[2], *xs)


@triton.jit
def l2norm_fwd_kernel(x_ptr, out_ptr, R, scale, EPS: tl.constexpr, D: tl.constexpr,
                      BR: tl.constexpr, BD: tl.constexpr):
    """out = scale * x / sqrt(sum(x * x) + EPS) over the D lanes of BR rows (token, head)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    c = tl.arange(0, BD)[None, :]
    m = (r < R) & (c < D)
    x = tl.load(x_ptr + r * D + c, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + EPS)
    tl.store(out_ptr + r * D + c, (x * (inv * scale)[:, None]).to(out_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def l2norm_bwd_kernel(x_ptr, g_ptr, dx_ptr, R, scale, EPS: tl.constexpr, D: tl.constexpr,
                      BR: tl.constexpr, BD: tl.constexpr):
    """dx = scale / n * (g - x^ (x^ . g)) for out = scale * x^, x^ = x / n,
    n = sqrt(sum(x * x) + EPS)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    c = tl.arange(0, BD)[None, :]
    m = (r < R) & (c < D)
    x = tl.load(x_ptr + r * D + c, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * D + c, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + EPS)
    x_hat = x * inv[:, None]
    dx = (g - x_hat * tl.sum(x_hat * g, axis=1)[:, None]) * (inv * scale)[:, None]
    tl.store(dx_ptr + r * D + c, dx.to(dx_ptr.dtype.element_ty), mask=m)


_L2NORM_FWD, _L2NORM_BWD = Launcher(l2norm_fwd_kernel), Launcher(l2norm_bwd_kernel)


class _L2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float, dtype: torch.dtype):
        D = x.shape[-1]
        R = x.numel() // D
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        grid, BR, BD = _grid(R, D)
        for_device(_L2NORM_FWD, x.device)(grid, x, out, R, scale, EPS=L2NORM_EPS, D=D, BR=BR,
                                          BD=BD, **({} if interpreting() else {"num_warps": 4}))
        ctx.save_for_backward(x)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        D = x.shape[-1]
        R = x.numel() // D
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grid, BR, BD = _grid(R, D)
        for_device(_L2NORM_BWD, x.device)(grid, x, g.contiguous(), dx, R, ctx.scale,
                                          EPS=L2NORM_EPS, D=D, BR=BR, BD=BD,
                                          **({} if interpreting() else {"num_warps": 4}))
        return dx, None, None


def run_l2norm(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * l2norm(x)`` over the last dim of ``x`` ([B, T, H, D]) in ``dtype``,
    differentiable in ``x`` (one kernel each way; computed in fp32)."""
    return apply(_L2Norm, x.contiguous(), float(scale), dtype)


__all__ = ["MapPlan", "fused_map", "fused_sum", "map_of", "run_l2norm", "run_map"]
