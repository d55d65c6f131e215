"""The chunked form of a spec: its per-token maps around the chunked core (``chunk.py``).

The compiler reads the analysed IR as ``S' = exp(lam) * S + outer(k^, v^)`` and
``o = f(q^ @ S, q^ @ z, inputs)``: a query ``q^``, key ``k^``, value ``v^`` and a log decay
``lam`` (derived with sympy from the transition's scale: ``log(exp(g)) = g``,
``log(sigmoid(f)) = logsigmoid(f)``, ...), normalizer states riding along (a column of ones
as their value: one inside the core's kernels, ``NORM``; more as extra columns of ``V``), and
the readout ``f``. The per-token maps run as torch ops on all tokens at once
(autograd through them); the state recurrence runs in the chunked Triton kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Callable
from dataclasses import dataclass

import sympy
import torch

from ..ir.analysis import Analysis
from ..ir.functions import ELEMENTWISE, logsigmoid, sigmoid
from ..ir.interpret import StepEvaluator, align
from ..ir.nodes import Node, Op
from ..ir.readout import ReadoutKind
from ..ir.signs import nonnegative
from ..ir.sympy_view import SympyView, equal, is_one
from ..ir.transition import TransitionClass
from .chunk import (DOT_BF16, DOT_IEEE, DOT_TF32, DOT_TF32X3, chunk_cumsum_kernel,
                    chunk_diag_grads_kernel, chunk_diag_scores_kernel, chunk_dstates_kernel,
                    chunk_grads_kernel, chunk_local_du_kernel, chunk_output_kernel,
                    chunk_predecay_kernel, chunk_states_kernel, delta_wy_bwd_kernel,
                    delta_wy_kernel, low_rank_pair_grads_kernel, low_rank_state_grads_kernel)
from . import chunk as chunk_core
from . import ops
from .launch import Launcher, apply, for_device, targets_gpu
from .maps import _given_name, fused_map, fused_sum, map_of, run_l2norm, run_map

SUPPORTED = (TransitionClass.IDENTITY, TransitionClass.SCALAR, TransitionClass.DIAGONAL)
#: the kernels' DECAY constexpr per transition class
DECAY = {TransitionClass.IDENTITY: 0, TransitionClass.SCALAR: 1, TransitionClass.DIAGONAL: 2}


class ChunkUnsupported(ValueError):
    """The spec's structure has no chunked kernel yet (the message says why)."""


@dataclass(frozen=True)
class StatePlan:
    """How one matrix state maps onto the chunked core."""

    state: str                       # the matrix state S[row, V]
    row: str                         # its row dim
    query: Node                      # q^ [row]
    key: Node                        # k^ [row]
    value: Node                      # v^ [V]
    log_decay: sympy.Expr | None     # lam per token and head (over row: diagonal); None: none
    log_symbols: tuple[tuple[sympy.Symbol, Node], ...]
    decay: int                       # 0 none, 1 scalar, 2 diagonal over row
    columns: tuple[str, ...]         # vector states riding along as extra V columns
    reads: tuple[tuple[Node, int | None], ...]  # readout node q^ @ S -> column (None: S)
    strict: bool                     # the readout sees the state before the token's update
    beta: sympy.Expr | None = None   # delta rule: S' = e^lam (S - beta k k^T S) + beta k v^T
    beta_symbols: tuple[tuple[sympy.Symbol, Node], ...] = ()
    low_rank: tuple[Node, Node] | None = None   # (x, w): S' = e^lam S + x (w @ S) + k v^T

    @property
    def solved(self) -> bool:
        """The transition reads the state (delta rule, low rank): each chunk's updates come
        from a triangular solve (the delta kernels), not from the chunked core."""
        return self.beta is not None or self.low_rank is not None


@dataclass(frozen=True)
class ChunkPlan:
    """The chunked form of a spec: one core call per matrix state, then the readout."""

    states: tuple[StatePlan, ...]


def _log_of(scale: Node) -> tuple[sympy.Expr, SympyView]:
    view = SympyView()
    expr = sympy.expand_log(sympy.log(view.to_sympy(scale)), force=True)
    expr = expr.replace(lambda e: isinstance(e, sympy.log) and isinstance(e.args[0], sigmoid),
                        lambda e: logsigmoid(e.args[0].args[0]))
    return sympy.simplify(expr), view


def _state_reads(p, s: str, columns: tuple[str, ...]):
    """The readout's reads of ``s`` and its columns: (node, column), queries, read points."""
    reads, queries, points = [], set(), set()
    for n in p.output.walk():
        stats = [a for a in n.args if a.op is Op.STATE]
        if not stats or stats[0].attr[0] not in (s, *columns):
            continue
        if n.op is not Op.CONTRACT or n.args[1].op is not Op.STATE:
            raise ChunkUnsupported(f"'{p.name}': the readout reads {stats[0].attr[0]} other "
                                   "than through q @ S")
        name, version = n.args[1].attr
        queries.add(n.args[0])
        points.add("pre" if version == 0 else "post")
        reads.append((n, None if name == s else columns.index(name)))
    if len(queries) != 1 or len(points) != 1:
        raise ChunkUnsupported(f"'{p.name}': the readout must read {s} (and its normalizers) "
                               "with one query and at one point of the step")
    return tuple(reads), queries.pop(), points.pop() == "pre"


def _delta_plan(analysis: Analysis, s: str) -> StatePlan:
    """``S' = e^lam (S - beta k (k @ S)) + beta outer(k, v)`` with a scalar lam, or
    ``S' = (I - beta k k^T) diag(e^lam) S + beta outer(k, v)`` with lam over the rows (KDA:
    canonically ``e^lam S + outer(-beta k, (k e^lam) @ S) + ...``): find k, beta, v, lam."""
    p = analysis.program
    cu = analysis.updates[s]
    diagonal = bool(cu.scale.dims)
    if len(cu.dims) != 2 or cu.dims[1] != "V" or cu.scale.dims not in ((), cu.dims[:1]) or \
            not cu.inputs or len(cu.inputs) != 1 or len(cu.rank_one) != 1:
        raise ChunkUnsupported(f"'{p.name}': the chunked delta rule takes one matrix state "
                               "with a scalar or row decay, one rank-one term and one "
                               "outer(k, v)")
    (r,), (out,) = cu.rank_one, cu.inputs
    key_node = r.w
    if diagonal:    # w = k * e^lam: the key is the other factor
        factors = r.w.args if r.w.op is Op.MUL else ()
        key_node = next((a for a, b in (factors, factors[::-1]) if equal(b, cu.scale)), None)
        if key_node is None:
            raise ChunkUnsupported(f"'{p.name}': the update of {s} is not (I - beta k k^T) "
                                   "diag(exp(lam)) S + beta outer(k, v)")
    view = SympyView()
    key, x, scale = view.to_sympy(key_node), view.to_sympy(r.x), view.to_sympy(cu.scale)
    beta = sympy.simplify(view.to_sympy(out.x) / key)
    beta_nodes = [n for n, sym in view.symbols.items() if sym in beta.free_symbols]
    # scalar: x = -e^lam beta k; diagonal: x = -beta k (the decay sits in w)
    residual = x + beta * key if diagonal else x + scale * beta * key
    if any(n.dims for n in beta_nodes) or sympy.simplify(residual) != 0:
        raise ChunkUnsupported(f"'{p.name}': the update of {s} is not "
                               "exp(lam) * (S - beta * outer(k, k @ S)) + beta * outer(k, v)")
    reads, query, strict = _state_reads(p, s, ())
    if strict:
        raise ChunkUnsupported(f"'{p.name}': a delta-rule readout before the update")
    log_decay, symbols = None, ()
    if not is_one(cu.scale):
        log_decay, lview = _log_of(cu.scale)
        symbols = tuple((sym, node) for node, sym in lview.symbols.items())
    decay = 2 if diagonal else int(bool(symbols) or log_decay is not None)
    return StatePlan(s, cu.dims[0], query, key_node, out.y, log_decay, symbols, decay, (),
                     reads, False, beta, tuple((view.symbols[n], n) for n in beta_nodes))


def _low_rank_plan(analysis: Analysis, s: str) -> StatePlan:
    """``S' = diag(e^lam) S + outer(x, w @ S) + outer(k, v)`` (RWKV-7) with lam over the
    rows of S: find x, w, k, v and lam."""
    p = analysis.program
    cu = analysis.updates[s]
    if len(cu.dims) != 2 or cu.dims[1] != "V" or cu.scale.dims != cu.dims[:1] or \
            not cu.inputs or len(cu.inputs) != 1 or len(cu.rank_one) != 1:
        raise ChunkUnsupported(f"'{p.name}': the chunked diagonal-plus-low-rank form takes one "
                               "matrix state with a decay over its rows, one outer(x, w @ S) "
                               "and one outer(k, v)")
    (r,), (out,) = cu.rank_one, cu.inputs
    reads, query, strict = _state_reads(p, s, ())
    if strict:
        raise ChunkUnsupported(f"'{p.name}': a low-rank transition's readout before the "
                               "update")
    log_decay, lview = _log_of(cu.scale)
    symbols = tuple((sym, node) for node, sym in lview.symbols.items())
    return StatePlan(s, cu.dims[0], query, out.x, out.y, log_decay, symbols, 2, (), reads,
                     False, low_rank=(r.x, r.w))


def chunk_plan(analysis: Analysis) -> ChunkPlan:
    """The chunked mapping of ``analysis`` (derived once per analysis: the sympy work takes
    milliseconds); raises ``ChunkUnsupported`` naming the reason."""
    key = id(analysis)
    hit = _PLANS.get(key)
    if hit is None or hit[0] is not analysis:
        try:
            hit = _PLANS[key] = (analysis, _derive_plan(analysis))
        except ChunkUnsupported as e:
            hit = _PLANS[key] = (analysis, e)
    if isinstance(hit[1], ChunkUnsupported):
        raise ChunkUnsupported(str(hit[1]))
    return hit[1]


_PLANS: dict[int, tuple] = {}


def _derive_plan(analysis: Analysis) -> ChunkPlan:
    p = analysis.program
    cls = analysis.transition_class
    blockers = getattr(analysis, "kernel_blockers", ())
    if blockers:
        raise ChunkUnsupported(f"'{p.name}' uses {'; '.join(blockers)}")
    if cls is TransitionClass.DELTA:
        return ChunkPlan(tuple(_delta_plan(analysis, s) for s in p.states))
    if cls is TransitionClass.DPLR:
        return ChunkPlan(tuple(_low_rank_plan(analysis, s) for s in p.states))
    if cls not in SUPPORTED:
        raise ChunkUnsupported(
            f"'{p.name}' has a {cls.value} transition; chunked kernels exist so far for "
            f"{', '.join(c.value for c in SUPPORTED)}, {TransitionClass.DELTA.value} and "
            f"{TransitionClass.DPLR.value} transitions")
    if analysis.readout.kind is ReadoutKind.GENERAL:
        raise ChunkUnsupported(f"'{p.name}': the readout is not linear in the states")
    matrices = [s for s, d in p.states.items() if len(d.dims) == 2]
    rides = {nz.vector: nz.matrix for nz in analysis.normalizers if nz.rides_along}
    alone = [z for z in p.states if z not in matrices and z not in rides]
    if alone:
        raise ChunkUnsupported(f"'{p.name}': vector state(s) {', '.join(alone)} do not ride "
                               "along with a matrix state as normalizer columns")
    plans = []
    for s in matrices:
        cu = analysis.updates[s]
        if not cu.inputs or len(cu.inputs) != 1:
            raise ChunkUnsupported(f"'{p.name}': the update of {s} is not one outer(k, v) "
                                   "term")
        row, col = cu.dims
        if col != "V":
            raise ChunkUnsupported(f"'{p.name}': the columns of {s} must be the dim V")
        columns = tuple(z for z in p.states if rides.get(z) == s)
        reads, query, strict = _state_reads(p, s, columns)
        log_decay, symbols = None, ()
        decay = DECAY[analysis.classes[s]]
        if decay:
            log_decay, view = _log_of(cu.scale)
            symbols = tuple((sym, node) for node, sym in view.symbols.items())
        (out,) = cu.inputs
        plans.append(StatePlan(s, row, query, out.x, out.y, log_decay, symbols, decay, columns,
                               reads, strict))
    return ChunkPlan(tuple(plans))


_TORCH = {name: e.torch_fn for name, e in ELEMENTWISE.items()}
_TORCH.update({"Max": torch.maximum, "Min": torch.minimum, "Abs": torch.abs,
               "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log})


def _lengths(B: int, T: int, cu_seqlens, device) -> torch.Tensor:
    """Every token's sequence length, [B * T] fp32."""
    if cu_seqlens is None:
        return torch.full((B * T,), float(T), device=device)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(lens, lens).float().to(device)


def _positions(B: int, T: int, cu_seqlens, device) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.arange(T, device=device).repeat(B)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    return torch.arange(int(cu_seqlens[-1]), device=device) - starts


class _OnFirstUse(dict):
    """A dict whose entries in ``lazy`` are computed by their thunk when first read (inputs
    converted to fp32 only where a per-token map needs them)."""

    def __init__(self, lazy: dict):
        super().__init__()
        self.lazy = lazy

    def __missing__(self, key):
        value = self[key] = self.lazy[key]()
        return value


_HEAD_INDEX: dict[tuple, torch.Tensor] = {}


def _head_index(H: int, device) -> torch.Tensor:
    """[1, H] fp32 head indices, made once per (H, device): a fresh one would cost a kernel
    launch on every call."""
    key = (H, str(device))
    x = _HEAD_INDEX.get(key)
    if x is None:
        x = _HEAD_INDEX[key] = torch.arange(H, device=device, dtype=torch.float32).reshape(1, H)
    return x


class _Tokens:
    """Evaluates state-free IR values on every token at once ([B*T, H, *dims]); ``kind``
    names the leaves the tensors fill: "input", or "memory" for the memory sequence of a
    cross-attention spec (then ``t`` and ``T`` are the memory's positions and lengths)."""

    def __init__(self, inputs: dict, params: dict, sizes: dict, cu_seqlens,
                 kind: str = "input"):
        x0 = next(iter(inputs.values()))
        self.B, self.T, H = x0.shape[:3]
        device = x0.device
        self.inputs = inputs
        self.leaf = Op.INPUT if kind == "input" else Op.MEMORY
        self.tensors = {**{(kind, n): x for n, x in inputs.items()},
                        **{("param", n): x for n, x in params.items()}}
        # fp32 copies of the inputs, each made when first read: by torch evaluations and
        # by the map kernels of fp32 operands (``map_tensors``), so gradients meet in fp32
        self.fp32 = _OnFirstUse({key: (lambda x=x: x.float())
                                 for key, x in self.tensors.items()})
        lazy = {(kind, n): (lambda n=n, x=x: self.fp32[(kind, n)]
                            .reshape(self.B * self.T, *x.shape[2:]))
                for n, x in inputs.items()}
        lazy["t"] = lambda: _positions(self.B, self.T, cu_seqlens, device).float().reshape(-1, 1)
        lazy["T"] = lambda: _lengths(self.B, self.T, cu_seqlens, device).reshape(-1, 1)
        values = _OnFirstUse(lazy)
        values.update({("param", n): self.fp32[("param", n)].unsqueeze(0) for n in params})
        values["h"] = _head_index(H, device)
        self.ev = StepEvaluator(values, sizes, torch.float32, device)
        self.sizes = sizes

    def shape(self, dims: tuple[str, ...]) -> tuple[int, ...]:
        """``[B, T, H, *dims]`` as sizes."""
        return (self.B, self.T, self.ev.values["h"].shape[1], *(self.sizes[d] for d in dims))

    def operand(self, n: Node, dtype: torch.dtype) -> torch.Tensor:
        """``n`` over all tokens in ``dtype``, contiguous: a plain input as it came when it
        has that dtype (no fp32 round trip), else evaluated in fp32 and cast."""
        if n.op is self.leaf and self.inputs[n.attr].dtype == dtype:
            return self.inputs[n.attr].contiguous()
        plan = fused_map(n, self.sizes) if FUSE_MAPS else None
        if plan is not None:    # one generated kernel instead of a chain of torch ops
            return run_map(plan, self.map_tensors(dtype), self.shape(n.dims), dtype)
        scale, rest = _split_scale(n, self.sizes)
        if (FUSE_MAPS and rest.op is Op.L2NORM and rest.args[0].op is self.leaf
                and rest.args[0].dims == rest.dims == (rest.attr,)):
            # an input normalized over its dim (the delta rules' q and k): one kernel
            return run_l2norm(self.inputs[rest.args[0].attr], scale, dtype)
        return self(n).to(dtype).contiguous()

    def map_tensors(self, dtype: torch.dtype) -> dict:
        """The tensors map kernels read for operands in ``dtype``: for fp32 ones, half inputs
        as fp32 copies made once per call (``fp32``), so that the gradients of several maps
        and torch evaluations reading one input add in fp32 and are rounded once
        (gated_rfa's v feeds two states: its two bf16-rounded parts cancelled, dv's error
        against float64 was 2.2e-2)."""
        return self.fp32 if dtype is torch.float32 else self.tensors

    def aligned(self, n: Node, dims: tuple[str, ...]) -> torch.Tensor:
        """``n`` over all tokens, its dims permuted and unsqueezed to broadcast as ``dims``."""
        x = align(self.ev(n), n.dims, dims)
        return x.expand(self.B * self.T, self.ev.values["h"].shape[1], *x.shape[2:]).reshape(
            self.B, self.T, -1, *x.shape[2:])

    def __call__(self, n: Node) -> torch.Tensor:
        """``n`` over all tokens, ``[B, T, H, *dims]`` (broadcast to every token and head)."""
        x = self.ev(n)
        x = x.expand(self.B * self.T, self.ev.values["h"].shape[1], *x.shape[2:])
        return x.reshape(self.B, self.T, *x.shape[1:])


#: tuning and experiments: the dots' operand precision (DOT_*) on a GPU, None: chosen
FORCE_DOT: int | None = None
#: experiments: the dot precision of one kernel ("states", "output", "dstates", "grads")
KERNEL_DOT: dict[str, int] = {}
#: the WY kernel's inverse (``delta_wy_kernel``'s INVERSE): 0 by columns (63 serial steps
#: on the [C, C] tile at C = 64; the default until session 11, the one timed on a GPU),
#: 1 by the 16 x 16 diagonal blocks at once in a [C/16, 16, 16] tile, 2 by the diagonal
#: blocks' columns on the [C, C] tile, 3 as 1 with each step's rows of A read back from
#: the L^-1 buffer; 1-3 take 15 steps, then C/16 merging dots. One step on sm_90 (Triton
#: 3.6, 4 warps; SASS of benchmarks/probe_inverse.py --sass): 0 and 2 run 593-618
#: instructions with 6 barriers and 70 shared loads and stores, 1 runs 420 with 3 and 10,
#: 3 runs 90 with none: a row taken out of a register tile is a reduction across warps.
#: 3 is the default on that evidence: compiled in the WY kernel for sm_90 without spills
#: (177-247 registers, 2 programs per SM, benchmarks/preflight.py) and tested on the CPU,
#: not yet run on a GPU. ``KERNEL_OPTIONS["wy"]["INVERSE"]`` overrides it there, as the
#: launch sweep does.
WY_INVERSE = 3
#: the K block of the delta rule's WY backward (``delta_wy_bwd_kernel``'s BKW). Compiled for
#: sm_90 with Triton 3.6 at 4 warps (benchmarks/preflight.py, K = V = 128): all of K at once
#: (before session 11) spilled 2.0-2.4 KB per thread, blocks of 64 0.2-0.35 KB, of 32
#: 8-80 bytes. Timed all the same, 64 is faster (session 14, H100, B=4, T=4096, H=16,
#: K=V=128, the kernel's CUDA ms in a forward+backward): deltanet 0.709 -> 0.619,
#: gated_deltanet 0.789 -> 0.745, kda 0.931 -> 0.836.
WY_BWD_BLOCK_K = 64
#: the delta backward makes dU's state-free part A^T dy for every chunk at once
#: (``chunk_local_du_kernel``, as fla's chunk_bwd_dv_local) before the ordered state
#: gradients, which then skip the scores: on sm_90 (Triton 3.6, 8 warps) one chunk step
#: of gated_deltanet's dstates loop took 1682 SASS instructions, 41 barriers and 96 MMAs
#: with them (benchmarks/preflight.py). False: the walk makes them (timed on a GPU).
DELTA_LOCAL_DU = True
#: the delta rules keep W and the chunk states in bf16 for half inputs (fla keeps w, u and
#: h in bf16): the states kernel reads W once per V tile (4 times at K = V = 128, 512 MB
#: of fp32 reads at B=4, T=4096, H=16), and the states take 128 MiB instead of 256. Peak
#: memory there (benchmarks/peak_memory.py, no GPU needed): gated_deltanet forward 640 ->
#: 448 MiB, forward+backward 1225 -> 1097 (fla's deltanet: 546 and 1059 on an H200). The
#: bf16 errors against float64 of the CPU tests (B=2, T=150, K=12: output, every gradient)
#: are the same to two digits with and without (gated_deltanet, kda, rwkv7). Default since
#: session 11, not yet timed on a GPU. The state gradients follow the states but for
#: diagonal decays (in bf16 kda's dg error went from 5.9e-3 to 1.6; dk's went from 5.8e-3
#: to 7.3e-3 for gated_deltanet and 6.3e-3 to 9.0e-3 for deltanet, the other gradients'
#: unchanged; forward+backward peak 1097 -> 969 MiB).
#: The updates u stay fp32 (in bf16 the output's error went from 1.3e-2 to 2.1e-2, kda).
DELTA_HALF_BUFFERS = True
#: the delta rules' dot precision for half inputs: tf32 (verified on the GPU), or DOT_BF16
#: (bf16 operands as fla's: half the tensor-core time and operand memory, the operands
#: that are not inputs rounded to 8 bits). In every kernel, bf16 about doubles the bf16
#: errors against float64 on the CPU (B=2, T=150, K=16, V=32, dot operands rounded as the
#: tensor cores do): gated_deltanet's output 9.8e-3 -> 2.1e-2, kda's 1.0e-2 -> 2.5e-2,
#: deltanet's dbeta 1.1e-2 -> 2.5e-2, rwkv7's db 3.7e-3 -> 2.1e-2.
DELTA_HALF_DOT = DOT_TF32
#: ... but the ordered kernels (the states forward, the state gradients backward: the
#: serial part) take bf16 operands: there it costs little (gated_deltanet's output error
#: unchanged at 9.8e-3, dv 3.3e-3 -> 5.2e-3, dbeta 9.0e-3 -> 1.1e-2; kda's output 1.0e-2
#: unchanged, dv 3.5e-3 -> 5.9e-3), and it halves their tensor-core work and lets them
#: run at 4 warps without spills (``KERNEL_OPTIONS``). Since session 12, not yet timed.
DELTA_ORDERED_HALF_DOT = DOT_BF16
#: the K block of RWKV-7's ``low_rank_state_grads_kernel`` (at most the core's): at 64 it
#: spilled 416 bytes per thread on sm_90 (Triton 3.6, 8 warps, benchmarks/preflight.py), at
#: 32 none. Not yet timed (it took 2.07 ms of rwkv7's 18.5 ms forward+backward on an H200
#: in session 8).
LOW_RANK_GRADS_BLOCK_K = 32
#: RWKV-7's ordered kernels at K > 128 (all of K in one tile) take tf32 operands, and so
#: (``KERNEL_OPTIONS``' ``fp32_operands``) 8 warps and one pipeline stage, as when they last
#: passed the K = V = 256 GPU test (session 9). On
#: an H100 (session 13) the bf16 ones at 4 warps hit illegal memory accesses there (the
#: state gradients with predecayed inputs, the states at one stage), and without predecayed
#: inputs the states kernel's two stages asked for 244 KiB of shared memory (232 KiB allowed).
WIDE_LOW_RANK_ORDERED_DOT = DOT_TF32
#: diagonal decays: the ordered kernels (states, state gradients) read keys decayed to their
#: chunk's end and queries to its start from a pass before them (``chunk_cumsum_kernel``'s
#: KEYS, ``chunk_predecay_kernel``) where they round those tiles to bf16 for their dots
#: anyway: the same numbers, without a [C, K] tile of exps per step in each V tile's
#: program. One step of the walk on sm_90 (Triton 3.6, benchmarks/preflight.py, SASS):
#: kda's states 1436 -> 398 instructions (72 -> 1 exps, 255 -> 128 registers), its state
#: gradients 2616 -> 606 (spills gone); gla's states 808 -> 228 (4 programs per SM instead
#: of 2), its state gradients 798 -> 262. Forward peak memory unchanged. On an H100
#: (session 13, B=4, T=4096, H=16, K=V=128): kda's states 0.369 -> 0.233 ms and state
#: gradients 0.786 -> 0.404, but the passes making the decayed inputs are memory-bound
#: (cumsum +0.055 ms, the backward's predecay pass 0.151): kda's forward+backward 8.42 ->
#: 8.12 ms, gla's unchanged (3.50 -> 3.52, forward 0.690 both).
PREDECAY = True
#: per-token maps of inputs (feature maps, gates, decays) as generated kernels (codegen/maps.py);
#: False: torch ops (for comparisons)
FUSE_MAPS = True
#: normalized readouts keep q^, k^, v^ in fp32 for half inputs (denominators may cancel)
NORMALIZED_IN_FP32 = True


def _cdiv(a: int, b: int) -> int:
    """Ceil division on the host (``triton.cdiv`` is a jit function: microseconds a call)."""
    return -(-a // b)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class ChunkCore(torch.autograd.Function):
    """``y = q @ S_t`` through the chunked kernels; differentiable in q, k, v, lam, S0. With
    ``cfg["norm"]`` a normalizer state z (a column of ones as its value, initial ``z0``)
    rides along: its reads ``q_t @ z_t`` and final state are the third and fourth
    outputs."""

    @staticmethod
    def forward(ctx, q, k, v, lam, s0, cfg: dict, z0=None):
        B, T, H, K = q.shape
        V = v.shape[-1]
        dev = q.device
        N, n_chunks = cfg["N"], cfg["n_chunks"]
        cu, offsets = cfg["cu"], cfg["offsets"]
        unread = v      # (pointer arguments the kernels do not read)
        final = cfg.get("final_state", True)   # (None when the caller does not want it)
        sT = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if final else None
        # the output kernel's dots read the states in bf16 when they multiply in bf16:
        # storing them so halves their traffic and changes no result
        ckpt_dtype = torch.bfloat16 if cfg["dot"] == DOT_BF16 else torch.float32
        ckpt = None if cfg["parallel"] else torch.empty(n_chunks, H, K, V, dtype=ckpt_dtype,
                                                         device=dev)
        blocks = _blocks(cfg, H, K, V)
        sb = _for("states", _without(blocks, "NK", "STRICT"))
        k_states = k
        if cfg["decay"] == 2:
            # every kernel reads the in-chunk cumulative log decays instead of summing lam
            # again (the backward keeps them in place of lam: dlam is still lam's gradient)
            predecay = _predecays(cfg, sb["DOT"])
            lam, k_states = _cumulative_decays(lam, cfg, blocks, k if predecay else None)
            k_states = _or(k_states, k)
            sb["PREDECAYED"] = predecay
        lam_ = lam if lam is not None else q
        norm = cfg.get("norm", False)
        zT = zckpt = y_col = unread
        if norm:
            zT = torch.empty(N, H, K, dtype=torch.float32, device=dev)
            zckpt = torch.empty(n_chunks, H, K, dtype=torch.float32, device=dev)
            y_col = torch.empty(B, T, H, dtype=torch.float32, device=dev)
        if cfg["parallel"]:     # no states: every chunk reads the earlier ones directly
            ckpt = unread
        else:
            for_device(_STATES, dev)((blocks["NK"] * sb["NV"], N * H),
                k_states, v, lam_, _or(s0, unread), _or(sT, unread), ckpt, _or(cu, unread),
                _or(offsets, unread), T, unread, unread, unread, _or(z0, unread), zT, zckpt,
                USE_INITIAL_STATE=s0 is not None, IS_VARLEN=cu is not None, NORM=norm,
                STORE_FINAL=final, **sb)
        del k_states    # (the output takes its memory: peak memory)
        y = torch.empty(B, T, H, V, dtype=cfg["y_dtype"], device=dev)
        scores = y
        if cfg["decay"] == 2:   # diagonal decays: intra-chunk scores by sub-chunks first
            scores = _diagonal_scores(q, k, lam, cfg, blocks, ckpt_dtype)
        for_device(_OUTPUT, dev)((n_chunks, H), q, k, v, lam_, y, ckpt, cfg["table"], scores,
                                 cfg["scale"], y, y, zckpt, y_col, PARALLEL=cfg["parallel"],
                                 NORM=norm,
                                 **_for("parallel_output" if cfg["parallel"] else "output",
                                        blocks))
        ctx.save_for_backward(q, k, v, lam, ckpt if not cfg["parallel"] else None,
                              zckpt if norm else None)
        # diagonal decays: the backward's first run reads these scores (and overwrites them
        # with dA), so they are kept rather than made again (C / K of q's size)
        ctx.scores = scores if cfg["decay"] == 2 else None
        ctx.cfg = cfg
        ctx.has_s0 = s0 is not None
        return (y, sT, y_col, zT) if norm else (y, sT)

    @staticmethod
    def backward(ctx, dy, dsT, dy_col=None, dzT=None):
        q, k, v, lam, ckpt, zckpt = ctx.saved_tensors
        norm = zckpt is not None
        cfg = ctx.cfg
        B, T, H, K = q.shape
        V = v.shape[-1]
        dev = q.device
        N, n_chunks = cfg["N"], cfg["n_chunks"]
        cu, offsets = cfg["cu"], cfg["offsets"]
        # gradients are stored in their inputs' dtypes, but for diagonal decays: their
        # decay gradient sums q.dq - k.dk afterwards (chunk_diag_grads_kernel, or the
        # parallel form's sums), terms that cancel; from dq and dk rounded to bf16, rwkv5's
        # domega error against float64 was 2.3e-2 with tf32 dots, its recurrent form's 3e-3
        exact = cfg["decay"] == 2
        dq = torch.empty(q.shape, dtype=torch.float32 if exact else q.dtype, device=dev)
        dk = torch.empty(k.shape, dtype=torch.float32 if exact else k.dtype, device=dev)
        dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        # scalar decays given as constants (RetNet's) need no gradient: the kernel skips it
        dlam_needed = lam is not None and (cfg["decay"] == 2 or ctx.needs_input_grad[3])
        dlam = torch.empty(lam.shape, dtype=torch.float32, device=dev) if dlam_needed \
            else None
        dy = dy.contiguous()
        # y = scale * core(q, k, v): the kernels run on dy and dsT / scale and multiply
        # every gradient they store by scale (no scaled copy of dy)
        scale = cfg["scale"]
        if dsT is not None and scale != 1.0:
            dsT = dsT / scale
        dz0 = dzckpt = None
        if norm:
            # the normalizer's gradients: zeros where its reads or final state are unused
            dy_col = (dy_col.contiguous() if dy_col is not None
                      else torch.zeros(B, T, H, dtype=torch.float32, device=dev))
            if dsT is not None or dzT is not None:  # (one flag covers both final states)
                dzT = (dzT / scale if scale != 1.0 else dzT).contiguous() if dzT is not None \
                    else torch.zeros(N, H, K, dtype=torch.float32, device=dev)
                if dsT is None:
                    dsT = torch.zeros(N, H, K, V, dtype=torch.float32, device=dev)
            dz0 = torch.empty(N, H, K, dtype=torch.float32, device=dev)
            dzckpt = torch.empty(zckpt.shape, dtype=torch.float32, device=dev)
        lam_ = lam if lam is not None else q
        blocks = _blocks(cfg, H, K, V)
        if cfg["parallel"]:
            ds0 = ckpt = dckpt = None
        else:
            ds0 = torch.empty(N, H, K, V, dtype=torch.float32, device=dev)
            dckpt = torch.empty(ckpt.shape, dtype=torch.float32, device=dev)
            db = _for("dstates", _without(blocks, "NK"))
            db["PREDECAYED"] = _predecays(cfg, db["DOT"])
            q_states, _ = _predecayed(q, None, lam, cfg, blocks) if db["PREDECAYED"] \
                else (q, None)
            for_device(_DSTATES, dev)((blocks["NK"] * db["NV"], N * H),
                q_states, lam_, dy, _or(dsT, dy), ds0, dckpt, _or(cu, dy), _or(offsets, dy), T,
                dy, dy, dy, dy, _or(dy_col, dy), _or(dzT, dy), _or(dz0, dy), _or(dzckpt, dy),
                USE_FINAL_STATE_GRAD=dsT is not None, IS_VARLEN=cu is not None, NORM=norm,
                **db)
            del q_states
        scores = last = dy
        if cfg["decay"] == 2:   # (lam holds the cumulative log decays: see forward)
            if ctx.scores is not None:      # the forward's scores (a first backward)
                scores, ctx.scores = ctx.scores, None
            else:                           # (a second backward through a retained graph)
                scores = _diagonal_scores(q, k, lam, cfg, blocks, ckpt.dtype)
            last = torch.empty(n_chunks, H, K, dtype=torch.float32, device=dev)
        scalar_parallel = cfg["parallel"] and cfg["decay"] == 1 and dlam_needed
        gb = _for("parallel_grads" if cfg["parallel"] else "grads", blocks)
        blocks_per_sequence = 1
        if scalar_parallel:     # the block pairs' sums (see _blocks_crossing)
            blocks_per_sequence = _cdiv(T, cfg["C"]) if offsets is None else \
                int((offsets[1:] - offsets[:-1]).max())
            last = torch.zeros(n_chunks, H, gb["NK"], blocks_per_sequence,
                               dtype=torch.float32, device=dev)
        for_device(_GRADS, dev)((n_chunks, H),
            q, k, v, lam_, dy, _or(ckpt, dy), _or(dckpt, dy), cfg["table"], scores, last,
            scale, dq, dk, dv, _or(dlam, dq), _or(dy_col, dq), _or(zckpt, dq), _or(dzckpt, dq),
            PARALLEL=cfg["parallel"], NORM=norm, DLAM=dlam_needed, NB=blocks_per_sequence,
            **gb)
        if cfg["decay"] == 2:   # the intra-chunk parts of dq and dk, and dlam
            _diagonal_grads(q, k, lam, scores, last, cfg, blocks, scale, dq, dk, dlam)
        if ds0 is not None and scale != 1.0:
            ds0 = ds0 * scale
            dz0 = dz0 * scale if dz0 is not None else None
        if scalar_parallel:     # the pairs that cross each block's end
            dlam += _blocks_crossing(last, cfg, offsets).mul_(scale).reshape(dlam.shape)
        elif cfg["parallel"] and dlam is not None:
            dlam = _parallel_decay_grad(q, k, dq, dk, cu, cfg["strict"])
        return (dq.to(q.dtype), dk.to(k.dtype), dv, dlam,
                ds0 if ctx.has_s0 else None, None, dz0 if ctx.has_s0 else None)


_STATES, _OUTPUT = Launcher(chunk_states_kernel), Launcher(chunk_output_kernel)
_DSTATES, _GRADS = Launcher(chunk_dstates_kernel), Launcher(chunk_grads_kernel)
_SCORES, _DIAG_GRADS = Launcher(chunk_diag_scores_kernel), Launcher(chunk_diag_grads_kernel)
_CUMSUM, _PREDECAY = Launcher(chunk_cumsum_kernel), Launcher(chunk_predecay_kernel)
#: sub-chunk of the diagonal-decay scores (pairs within one go through a [SUB, SUB, BK]
#: broadcast)
_SUB = 16


def _cumulative_decays(lam, cfg: dict, blocks: dict, keys=None) -> tuple:
    """Diagonal decays: every token's in-chunk cumulative log decay b, [T*, H, K] fp32
    (``chunk_cumsum_kernel``), and with ``keys`` those keys decayed to their chunk's end (in
    their dtype; None without)."""
    cumulative = torch.empty(lam.shape, dtype=torch.float32, device=lam.device)
    decayed = torch.empty_like(keys) if keys is not None else None
    grid, sums = _per_lane_pass(cfg, lam, blocks)
    for_device(_CUMSUM, lam.device)(grid, lam, cumulative, cfg["table"], _or(keys, lam),
                                    _or(decayed, lam), KEYS=keys is not None, **sums)
    return cumulative, decayed


def _per_lane_pass(cfg: dict, per_lane: torch.Tensor, blocks: dict) -> tuple:
    """The grid (chunks, K blocks, heads) and constexprs of the elementwise passes over
    [T*, H, K] per-lane decays (``chunk_cumsum_kernel``, ``chunk_predecay_kernel``)."""
    H, K = per_lane.shape[2], per_lane.shape[3]
    sums = _for("cumsum", dict(H=H, K=K, BK=blocks["BK"], C=cfg["C"], **cfg["options"]))
    return (cfg["n_chunks"], _cdiv(K, sums["BK"]), H), sums


def _predecays(cfg: dict, dot: int) -> bool:
    """Whether an ordered kernel of dot precision ``dot`` reads predecayed keys and queries
    (``PREDECAY``)."""
    return PREDECAY and cfg["decay"] == 2 and dot == DOT_BF16 and not cfg["parallel"]


def _predecayed(q, k, cumulative, cfg: dict, blocks: dict) -> tuple:
    """Diagonal decays: the queries decayed to their chunk's start and the keys to its end
    (``chunk_predecay_kernel``), in their dtypes; None for either not given."""
    qd = torch.empty_like(q) if q is not None else None
    kd = torch.empty_like(k) if k is not None else None
    any_ = q if q is not None else k
    grid, sums = _per_lane_pass(cfg, cumulative, blocks)
    for_device(_PREDECAY, any_.device)(grid, cumulative, _or(q, any_), _or(k, any_),
                                       _or(qd, any_), _or(kd, any_), cfg["table"],
                                       STRICT=cfg["strict"], QUERIES=q is not None,
                                       KEYS=k is not None, **sums)
    return qd, kd


def _diagonal_scores(q, k, cumulative, cfg: dict, blocks: dict, dtype) -> torch.Tensor:
    """Diagonal decays: every chunk's intra-chunk scores from the cumulative log decays
    (``_cumulative_decays``), [chunks * C, H, C] in ``dtype``
    (``chunk_diag_scores_kernel``: one program per chunk, sub-chunk and head)."""
    C, n_chunks, H, K = cfg["C"], cfg["n_chunks"], q.shape[2], q.shape[3]
    scores = torch.empty(n_chunks * C, H, C, dtype=dtype, device=q.device)
    sub = _without(blocks, "V", "BV", "BK", "NK", "NV", "DECAY")
    for_device(_SCORES, q.device)((n_chunks, C // _SUB, H), q, k, cumulative, scores,
                                  cfg["table"], SUB=_SUB, KP=_pow2(K),
                                  SPREAD=chunk_core.SPREAD_FOR_DOT, **_for("scores", sub))
    return scores


def _diagonal_grads(q, k, cumulative, dA, last, cfg: dict, blocks: dict, scale: float, dq, dk,
                    dlam, held_in_dlam=(True, True), add_dlam: bool = False) -> None:
    """Diagonal decays, through the scores A[t, s] = q_t . k_s exp(b_t - b_s) given dA:
    adds their parts to dq and dk (which hold the parts through the states) and stores
    dlam with the b_last terms in ``last`` (``chunk_diag_grads_kernel``). A later product
    of the same backward adds to the buffers of the earlier ones: ``held_in_dlam`` says
    whether what dq and dk hold still owes its dlam terms (False: stored already),
    ``add_dlam`` adds to dlam instead of storing it; dq may be dk itself (the keys'
    product with themselves)."""
    H, K = q.shape[2], q.shape[3]
    diag = _for("diag_grads", _without(blocks, "V", "BV", "NK", "NV", "DECAY"))
    if diag["DOT"] == DOT_BF16:
        # the decay gradient's intra-chunk pair sums cancel: with bf16 operands rwkv5's
        # domega error against float64 was 2.9e-2, with tf32 6.0e-3 (B=2, T=150, K=16, V=32)
        diag["DOT"] = DOT_TF32
    for_device(_DIAG_GRADS, q.device)((cfg["n_chunks"], _cdiv(K, diag["BK"]), H),
        q, k, cumulative, dA, last, cfg["table"], scale, dq, dk, dlam, SUB=_SUB,
        SPREAD=chunk_core.SPREAD_FOR_DOT, Q_HELD_IN_DLAM=held_in_dlam[0],
        K_HELD_IN_DLAM=held_in_dlam[1], ADD_DLAM=add_dlam, ONE_SIDE=dq is dk, **diag)


def _blocks(cfg: dict, H: int, K: int, V: int) -> dict:
    """The core kernels' constexprs for a call (K and V tiles of BK and BV lanes)."""
    return dict(H=H, K=K, V=V, BK=cfg["BK"], BV=cfg["BV"], NK=_cdiv(K, cfg["BK"]),
                NV=_cdiv(V, cfg["BV"]), C=cfg["C"], DECAY=cfg["decay"],
                STRICT=cfg["strict"], DOT=cfg["dot"], **cfg["options"])


def _check_parallel(plan: ChunkPlan, name: str, initial_state, output_final_state: bool):
    """The causal parallel form's limits, as errors that say what runs instead."""
    if initial_state is not None or output_final_state:
        raise ChunkUnsupported(f"'{name}': the causal parallel form carries no state "
                               "(initial_state / output_final_state need form='chunk' or "
                               "'recurrent')")
    for sp in plan.states:
        if sp.solved:
            raise ChunkUnsupported(
                f"'{name}': the causal parallel form is generated for identity, scalar and "
                "diagonal decays (this spec's delta rule or low-rank transition has no "
                "parallel form); use form='chunk' or 'recurrent'")


def _blocks_crossing(pairs: torch.Tensor, cfg: dict, offsets) -> torch.Tensor:
    """Parallel form, scalar decays: for every token, the sum of d loss / d (b_t - b_s) over
    the pairs (t, s) of its sequence with s before its block and t after it, [rows, H]
    (each lam of the block enters all of them; ``chunk_grads_kernel`` stored the rest).
    ``pairs`` [chunks, H, NK, NB]: per query block I' and earlier block J of its sequence
    (by J's index there), the pair sums over the block pair by K blocks, from which
    crossing(I) = sum over I' > I, J < I of pairs(I', J), in float64."""
    n_chunks, H, _, NB = pairs.shape
    per_pair = pairs.double().sum(2)
    per_block = per_pair.cumsum(-1) - per_pair      # [chunks, H, NB]: over J < m

    def crossing_of(m):     # [sequences, I', H, m] -> [sequences, I, H]
        later = m.flip(1).cumsum(1).flip(1) - m     # over I' > I
        return later.diagonal(dim1=1, dim2=3).transpose(1, 2)
    if offsets is None:     # sequences of equal length: NB blocks each
        crossing = crossing_of(per_block.reshape(-1, NB, H, NB)).reshape(n_chunks, H)
    else:
        bounds = offsets.tolist()
        crossing = torch.cat([crossing_of(per_block[None, lo:hi, :, :hi - lo])[0]
                              for lo, hi in zip(bounds[:-1], bounds[1:])])
    table = cfg["table"]
    tokens = torch.clamp(table[:, 1] - table[:, 0], max=cfg["C"])
    return torch.repeat_interleave(crossing.float(), tokens, dim=0)


def _parallel_decay_grad(q, k, dq, dk, cu_seqlens, strict: bool) -> torch.Tensor:
    """Parallel form, diagonal decays: lam_j enters the exponent bq_t - b_s of every pair
    with t >= j (t > j when strict) on the query side and s >= j on the key side, per K
    lane, so dlam_j = sum_{t >= j} q_t * dq_t - sum_{s >= j} k_s * dk_s over the rest of
    its sequence (the query sum from t = j + 1 when strict). The two sums are large and
    nearly cancel: float64 products and sums. (Scalar decays sum the pairs set by set in
    the kernels instead, without the cancellation: ``_blocks_crossing``.)"""
    qdq, kdk = q.double() * dq.double(), k.double() * dk.double()
    later_q = _suffix_sums(qdq, cu_seqlens)
    if strict:
        later_q = later_q - qdq
    return (later_q - _suffix_sums(kdk, cu_seqlens)).float()


def _suffix_sums(x: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """sum over t >= j within each sequence, along dim 1 of ``x`` [B, T, H]."""
    total = x.flip(1).cumsum(1).flip(1)
    if cu_seqlens is None:
        return total
    # packed sequences: subtract what the following sequences add
    after = torch.cat([total, total.new_zeros(total.shape[0], 1, *total.shape[2:])], 1)
    ends = cu_seqlens[1:].long()
    seq = torch.repeat_interleave(torch.arange(len(ends), device=x.device),
                                  (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    return total - after[:, ends[seq]]


def _for(kernel: str, blocks: dict) -> dict:
    """``blocks`` with what ``KERNEL_DOT`` and ``KERNEL_OPTIONS`` set for ``kernel`` on a
    GPU (dot precision; V tile, warps, pipeline stages), the V block count to match: a
    launch whose grid runs over V tiles takes its count from the result."""
    out = dict(blocks, DOT=KERNEL_DOT[kernel]) if kernel in KERNEL_DOT else dict(blocks)
    if "num_warps" in blocks:       # a GPU launch (the interpreter takes no options)
        options = dict(KERNEL_OPTIONS.get(kernel, {}))
        fp32_options = options.pop("fp32_operands", {})
        if out.get("DOT", DOT_BF16) != DOT_BF16:
            options.update(fp32_options)
        for key, value in options.items():
            if key in ("BV", "BK"):
                dim = key[1]
                value = min(value, _pow2(out[dim]))     # never wider than the dim itself
                if "N" + dim in out:
                    out["N" + dim] = _cdiv(out[dim], value)
            out[key] = value
    return out


#: per-kernel launch options on a GPU ("states", "output", "dstates", "grads"): BV (the V
#: tile; the ordered state kernels run one program per V tile), num_warps, num_stages.
#: Measured on an NVIDIA H200 (benchmarks/sweep_chunk_launch.py, retnet B=4 T=4096 H=16
#: K=V=128 bf16, results/sweep_chunk_launch_h200.jsonl): prefetching the next chunk's k and
#: v in the ordered state loops took states 0.189 -> 0.116 ms (3 stages) and dstates
#: 0.207 -> 0.134 ms (2 stages); the output and gradient kernels are fastest as they are
#: (warps and stages). The gradient kernel runs K tiles of 32 instead of the core's 64: on
#: sm_90 (Triton 3.6, 4 warps, benchmarks/preflight.py) it spilled 360 bytes per thread for
#: gla, 736 for rwkv6, 416 for mamba2 and 64 for retnet, and at 32 none (2 programs per
#: SM all the same). Timed in session 14 (H100): K 32 / V 64 at 4 warps is best or within
#: 5 % of it for gla (0.836 ms), rwkv6 (0.927) and mamba2 (0.790).
#: The delta rule's kernels hold all of K (128 lanes) per program: at 4 warps Triton 3.6
#: spills 0.4-5 KB per thread in them, at 8 warps 0.07-2 KB (benchmarks/compile_check.py).
#: The WY kernels run at 4 warps all the same, two programs per SM: on an H200
#: (results/sweep_wy_h200_session9.jsonl) gated_deltanet's WY kernel took 1.99 ms per
#: forward+backward at 4 warps against 3.37 at 8, kda's WY backward 2.06 against 2.58.
#: With bf16 operands (``DELTA_ORDERED_HALF_DOT``) the delta rule's ordered kernels fit 4
#: warps without spills (gated_deltanet, sm_90: the state step 166 registers, 16 HGMMA, 19
#: barriers, three programs per SM, so the 256 programs of B=4, H=16, V/32 run in one
#: wave; at 8 warps with tf32 operands it was 242 registers, 40 HGMMA, 23 barriers, one
#: program per SM); fp32 operands keep 8 warps and one stage (``fp32_operands``: session
#: 11's timed configuration; their two stages asked for more shared memory than an H100
#: has at K = 256, session 13). With bf16 operands the states kernel loads the next
#: chunk's k, W and u while it works on this one (2 stages: 139 registers, 80 KiB of shared
#: memory, still two programs per SM), as the other state kernels' stages did (above); the
#: state gradients' 2 stages would take 120 KiB, one program per SM. On an H100 (session
#: 13) gated_deltanet's states took 0.232 ms so, against 0.615 with tf32 at 8 warps.
#: The delta rule's gradient kernel (chunk_grads_kernel on u) at K tiles of 32 instead of
#: the core's 64: on sm_90 (Triton 3.6, 4 warps, benchmarks/preflight.py) gated_deltanet's
#: spilled 488 bytes per thread (332 local loads and stores) and now 8 (4), kda's 256 (90)
#: and now none, deltanet's 64 (18) and now none. Session 14's sweep on an H100 (the
#: kernel's CUDA ms in a forward+backward, B=4, T=4096, H=16, K=V=128): with decays K 32 /
#: V 64 is best (gated_deltanet 0.659 ms, kda 0.642; at K 64 / V 64 1.00 and 0.93); without
#: (deltanet) K 64 / V 64 is (0.484 against 0.564; no spills on sm_90):
#: ``delta_grads_no_decay``.
KERNEL_OPTIONS: dict[str, dict] = {"states": {"num_stages": 3}, "dstates": {"num_stages": 2},
                                   "grads": {"BK": 32},
                                   "scores": {"num_stages": 2},
                                   "diag_grads": {"BK": 32, "num_stages": 2},
                                   "wy": {"num_warps": 4}, "wy_bwd": {"num_warps": 4},
                                   "delta_states": {"num_warps": 4, "num_stages": 2,
                                                    "fp32_operands": {"num_warps": 8,
                                                                      "num_stages": 1}},
                                   "delta_dstates": {"num_warps": 4,
                                                     "fp32_operands": {"num_warps": 8}},
                                   "delta_local_du": {"num_warps": 4},
                                   "delta_grads": {"BK": 32, "BV": 64},
                                   "delta_grads_no_decay": {"BK": 64, "BV": 64},
                                   "low_rank_grads": {"num_warps": 8}}


_ARITHMETIC = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b,
               Op.MUL: lambda a, b: a * b, Op.DIV: lambda a, b: a / b,
               Op.POW: lambda a, b: a ** b, Op.NEG: lambda a: -a}


def _constant_value(n: Node, sizes: dict) -> float | None:
    """The value of a scalar built from numbers and sizes only (``K ** -0.5``), else None."""
    if n.dims:
        return None
    if n.op is Op.CONST:
        return float(n.attr)
    if n.op is Op.SIZE:
        return float(sizes[n.attr])
    if n.op is Op.HEADS:
        return float(sizes["H"])
    fn = _ARITHMETIC.get(n.op)
    values = [_constant_value(a, sizes) for a in n.args]
    if fn is None or not values or any(v is None for v in values):
        return None
    try:
        return float(fn(*values))
    except (ZeroDivisionError, OverflowError, TypeError):
        return None


def _split_scale(n: Node, sizes: dict) -> tuple[float, Node]:
    """``n`` as a constant factor and the rest: ``k * K ** -0.5`` -> (K ** -0.5, k). The
    kernels apply the factors of the query and key to the output instead, so a scaled
    input is read as it came (no scaled copy of it in memory)."""
    if n.op is Op.MUL:
        for c, x in (n.args, n.args[::-1]):
            value = _constant_value(c, sizes)
            if value is not None and x.dims == n.dims and value != 0 and math.isfinite(value):
                inner, rest = _split_scale(x, sizes)
                return value * inner, rest
    return 1.0, n


def _without(d: dict, *keys) -> dict:
    return {k: x for k, x in d.items() if k not in keys}


def _or(x, fallback):
    """``x``, or a placeholder tensor for a pointer argument the kernel will not read."""
    return x.contiguous() if x is not None else fallback


_TABLES: dict[tuple, torch.Tensor] = {}


def _chunk_table(batch: int, T: int, C: int, device) -> torch.Tensor:
    """[n_chunks, 3] int64 for ``batch`` sequences of T tokens: each chunk's first token
    row, the end and the start of its sequence, in the order of the state checkpoints
    (sequence by sequence); made once per (B, T, C, device)."""
    key = (batch, T, C, device)
    table = _TABLES.get(key)
    if table is None:
        starts = torch.arange(0, T, C, device=device)
        bos = (torch.arange(batch, device=device)[:, None] * T).expand(-1, len(starts))
        table = torch.stack([(bos + starts[None, :]).flatten(), (bos + T).flatten(),
                             bos.flatten()], 1).contiguous()
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = table
    return table


def _varlen_chunks(cu_seqlens: torch.Tensor, C: int, device) -> tuple:
    """Packed sequences: ``(offsets, n_chunks, table)``, each sequence's first chunk
    ([N + 1], int64), the chunk count and the chunk table (as ``_chunk_table``), made by
    tensor ops on ``device`` (one read of the count to the host)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    counts = (cu[1:] - cu[:-1] + C - 1) // C
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64, device=device)
    offsets[1:] = counts.cumsum(0)
    n_chunks = int(offsets[-1])
    seq = torch.repeat_interleave(torch.arange(len(counts), device=device), counts,
                                  output_size=n_chunks)
    lo = cu[seq]
    first = lo + (torch.arange(n_chunks, device=device) - offsets[seq]) * C
    return offsets, n_chunks, torch.stack([first, cu[seq + 1], lo], 1)


def _core_config(batch: int, T: int, K: int, V: int, cu_seqlens, chunk_size: int,
                 strict: bool, dot: int, device) -> dict:
    if cu_seqlens is not None:
        offsets, n_chunks, table = _varlen_chunks(cu_seqlens, chunk_size, device)
    else:
        offsets, n_chunks = None, batch * _cdiv(T, chunk_size)
        table = _chunk_table(batch, T, chunk_size, device)
    on_gpu = targets_gpu(device)
    bk, bv = _tiles(K, V, on_gpu)
    if dot == DOT_BF16 and (K % bk or V % bv):
        # bf16 operands with partial tiles (K = 100, or V + 1 normalizer columns) hit an
        # illegal memory access on an H100 with Triton 3.6 (2026-11-23, not yet understood)
        dot = DOT_TF32
    return dict(N=batch, cu=cu_seqlens, offsets=offsets, n_chunks=n_chunks, table=table,
                C=chunk_size, BK=bk, BV=bv, strict=strict, dot=dot, parallel=False, scale=1.0,
                # the chunk loop carries the state: no software pipelining (shared memory)
                options={"num_warps": ops.FORCE_NUM_WARPS or 4, "num_stages": 1}
                if on_gpu else {})


def _tiles(K: int, V: int, on_gpu: bool) -> tuple[int, int]:
    """K and V tile sizes: 64 lanes on a GPU (the V tile smaller where it wastes fewer
    padded lanes, e.g. V + 1 normalizer column), 16 in the interpreter so that CPU tests
    cover several tiles; ``ops.FORCE_BLOCK_V`` caps both."""
    limit = 64 if on_gpu else 16
    if ops.FORCE_BLOCK_V is not None:
        limit = min(limit, ops.FORCE_BLOCK_V)
    bk = min(_pow2(K), _pow2(limit))
    bv = min(_pow2(V), _pow2(limit))
    if bv == 64 and V % 64 and (-V) % 32 < (-V) % 64:
        bv = 32
    return bk, bv


def _readout_sums(output: Node, sizes: dict, reads: tuple) -> list[tuple[Node, object]]:
    """The sums over a dim in the readout ``output`` (outside the state reads ``reads``)
    that run as generated kernels (``fused_sum``), with their plans (found once per
    readout and sizes)."""
    return _readout_sums_of(output, tuple(sorted(sizes.items())), reads)


@functools.lru_cache(maxsize=256)
def _readout_sums_of(output: Node, sizes: tuple, reads: tuple) -> list[tuple[Node, object]]:
    sizes = dict(sizes)
    found, seen = [], set(reads)
    for n in output.walk():
        if n.op is Op.SUM and n not in seen and not any(a in seen for a in n.walk()):
            plan_s = fused_sum(n, sizes)
            if plan_s is not None:
                seen.add(n)
                found.append((n, plan_s))
    return found


def _map_sources(analysis: Analysis, sizes: dict) -> list[tuple[str, str]]:
    """(what, Triton source) of every generated map kernel a chunked call with ``sizes``
    runs: the query, key and value maps, the log decay and the readout (none for values
    that torch computes, e.g. a plain input or a map of positions)."""
    from .maps import _source

    plan = chunk_plan(analysis)
    p = analysis.program
    found: list[tuple[str, object]] = []
    for sp in plan.states:
        core = not p.noncausal and not sp.solved
        for what, node in (("query", sp.query), ("key", sp.key), ("value", sp.value)):
            if core and what != "value":
                node = _split_scale(node, sizes)[1]
            if node.op is not Op.INPUT:     # (a plain input goes to the kernels as it is)
                found.append((f"{what} of {sp.state}", fused_map(node, sizes)))
        if sp.log_decay is not None:
            dims = (sp.row,) if sp.decay == 2 else ()
            found.append((f"log decay of {sp.state}",
                          map_of(sp.log_decay, sp.log_symbols, dims, sizes)))
    reads = tuple(node for sp in plan.states for node, _ in sp.reads)
    if p.output not in reads:
        sums = _readout_sums(p.output, sizes, reads)
        found += [(f"readout sum {m.text}", m) for _, m in sums]
        found.append(("readout o", fused_map(p.output, sizes, reads + tuple(n for n, _ in sums))))
    return [(what, _source(m)) for what, m in found if m is not None]


def chunk_source(analysis: Analysis, direction: str, sizes: dict | None = None) -> str:
    """The chunked form as a reader sees it: how the spec maps onto the core (query, key,
    value, log decay, normalizer columns, readout), then the core kernels' Triton source;
    with ``sizes`` (e.g. ``{"K": 128, "V": 128}``) also the generated map kernels a call of
    those sizes runs around the core (their constants depend on the sizes)."""
    import inspect

    from ..ir.sympy_view import format_node
    from . import chunk as core

    plan = chunk_plan(analysis)
    p = analysis.program
    lines = [f"# Chunked form of spec '{p.name}' ({analysis.transition_class.value}), "
             f"{'forward' if direction == 'fwd' else 'backward'}.", "#"]
    for sp in plan.states:
        lines += [f"# state {sp.state}[{sp.row}, V]:",
                  f"#   query  q^ = {format_node(sp.query)}",
                  f"#   key    k^ = {format_node(sp.key)}",
                  f"#   value  v^ = {format_node(sp.value)}"
                  + (f"  (+ {len(sp.columns)} column(s) of ones for {', '.join(sp.columns)}"
                     + (", riding along in the same kernels (NORM)" if len(sp.columns) == 1
                        else "") + ")" if sp.columns else ""),
                  f"#   log decay = {sp.log_decay}" if sp.log_decay is not None else
                  "#   no decay",
                  *([f"#   low rank: outer(x, w @ S), x = {format_node(sp.low_rank[0])}, "
                     f"w = {format_node(sp.low_rank[1])}"] if sp.low_rank else []),
                  f"#   the readout sees the state {'before' if sp.strict else 'after'} "
                  "the token's update"]
    lines += [f"# readout: o = {format_node(p.output)}",
              "# (q^, k^, v^, the log decay and the readout run over all tokens before and after"
              " the kernels below, which carry the state: as generated map kernels where they"
              " are elementwise in inputs and params (codegen/maps.py), else as torch ops)",
              "", inspect.getsource(core)]
    diagonal = any(sp.decay == 2 for sp in plan.states)
    scores = ("chunk_cumsum_kernel", "chunk_diag_scores_kernel") if diagonal else ()
    kernels = (("chunk_states_kernel", *scores, "chunk_output_kernel") if direction == "fwd"
               else ("chunk_dstates_kernel", *scores, "chunk_grads_kernel",
                     *(("chunk_diag_grads_kernel",) if diagonal else ())))
    # the delta rule's backward: its WY form made again from the chunk states, dU's
    # state-free part, then the state gradients
    delta_bwd = ("delta_wy_kernel", *(("chunk_local_du_kernel",) if DELTA_LOCAL_DU else ()),
                 "chunk_dstates_kernel")
    if any(sp.low_rank is not None for sp in plan.states):
        kernels = ((*scores, "delta_wy_kernel", "chunk_states_kernel", "chunk_output_kernel")
                   if direction == "fwd" else
                   (*delta_bwd, "low_rank_state_grads_kernel", "low_rank_pair_grads_kernel",
                    "chunk_diag_grads_kernel"))
    elif any(sp.solved for sp in plan.states):  # the delta rule's WY form around the core
        kernels = ((*scores, "delta_wy_kernel", "chunk_states_kernel", "chunk_output_kernel")
                   if direction == "fwd" else
                   (*delta_bwd, "chunk_grads_kernel", "delta_wy_bwd_kernel",
                    *(("chunk_diag_grads_kernel",) if diagonal else ())))
    lines.insert(-1, f"# this direction launches: {', '.join(kernels)}")
    if sizes is None:
        lines.insert(-1, "# (source(..., sizes={'K': ..., 'V': ...}) adds the generated map "
                         "kernels of a call with those sizes)")
    else:
        full = dict(sizes)
        for d, expr in analysis.program.dims.items():
            if d not in full and expr is not None:
                missing = [str(x) for x in expr.free_symbols if str(x) not in full]
                if missing:
                    raise ValueError(f"source(): sizes must give {', '.join(missing)} "
                                     f"(the dim {d} is sized from them)")
                full[d] = int(expr.subs({x: full[str(x)] for x in expr.free_symbols}))
        try:
            maps = _map_sources(analysis, full)
        except KeyError as e:
            raise ValueError(f"source(): sizes must give {e.args[0]} (a generated map "
                             "reads it)") from None
        for what, src in maps:
            lines += ["", f"# ---- generated map kernel: {what} (map_fwd forward, map_bwd "
                      f"gradients; sizes {full})", src]
    return "\n".join(lines)


@functools.lru_cache(maxsize=256)
def _torch_function(expr: sympy.Expr, symbols: tuple) -> "Callable":
    """``expr`` as a Python function of ``symbols`` over torch tensors (lambdify generates
    and compiles source: milliseconds, so once per expression)."""
    return sympy.lambdify(list(symbols), expr, modules=[_TORCH, "math"])


def _lambdified(expr: sympy.Expr, symbols, ev: "_Tokens", dims: tuple[str, ...],
                shape: tuple) -> torch.Tensor:
    """A sympy expression over IR values, evaluated on every token (fp32, ``shape``)."""
    if isinstance(expr, sympy.Symbol):     # a log decay given as an input (GLA's g)
        (node,) = [n for sym, n in symbols if sym == expr]
        x = ev.tensors.get(("input", node.attr)) if node.op is Op.INPUT else None
        if x is not None and x.dtype == torch.float32 and tuple(x.shape) == tuple(shape):
            return x.contiguous()
    plan = map_of(expr, symbols, dims, ev.sizes) if FUSE_MAPS else None
    if plan is not None and tuple(shape) == ev.shape(dims):
        return run_map(plan, ev.tensors, shape, torch.float32)
    x0 = ev.ev.values["h"]
    constant = all(n.op in _CALL_CONSTANT for _, n in symbols)
    if constant:    # e.g. RetNet's log(1 - 2 ** (-5 - h)): the same tensor every call
        key = (expr, tuple(symbols), dims, tuple(shape), x0.device,
               tuple(sorted(ev.sizes.items())))
        hit = _CONSTANT_MAPS.get(key)
        if hit is not None:
            return hit
    fn = _torch_function(expr, tuple(s for s, _ in symbols))
    out = fn(*(ev.aligned(n, dims) for _, n in symbols))
    if not isinstance(out, torch.Tensor):  # a number: no host-to-device copy
        out = torch.full(shape, float(out), dtype=torch.float32, device=x0.device)
    else:
        out = out.to(torch.float32).expand(shape).contiguous()
    if constant:
        if len(_CONSTANT_MAPS) > 64:
            _CONSTANT_MAPS.clear()
        _CONSTANT_MAPS[key] = out
    return out


#: leaves whose values are the same on every call of one shape (head index, sizes)
_CALL_CONSTANT = (Op.HEAD, Op.HEADS, Op.SIZE, Op.CONST)
#: values of such maps, made once per expression, shape, device and sizes (each made by a
#: few torch ops: kernel launches and host time on every call otherwise)
_CONSTANT_MAPS: dict[tuple, torch.Tensor] = {}


class DeltaChunkCore(torch.autograd.Function):
    """The chunked delta rule ``S' = e^lam (S - beta k k^T S) + beta k v^T``, ``y = q @ S'``,
    differentiable in q, k, v, beta, lam and S0. Forward: the WY form of every chunk at once
    (``delta_wy_kernel``), the states in order with the updates u = U0 - W S as values
    (``chunk_states_kernel``, DELTA), then the outputs as for any state with u as values
    (``chunk_output_kernel``). Backward: the state gradients in reverse order with dU
    (``chunk_dstates_kernel``, DELTA), dq and the readout's and state's parts of dk and dlam
    (``chunk_grads_kernel`` on u), then back through the WY form (``delta_wy_bwd_kernel``).
    With ``w`` and ``x`` the diagonal-plus-low-rank transition (RWKV-7), through the same
    kernels in their LOW_RANK / SECOND modes (the state read along w, written along x, and
    k v^T beside), its backward after the state gradients in ``_low_rank_backward``."""

    @staticmethod
    def forward(ctx, q, k, v, beta, lam, s0, cfg: dict, w=None, x=None):
        B, T, H, K = q.shape
        V = v.shape[-1]
        dev = q.device
        on_gpu = targets_gpu(dev)
        bv = min(_pow2(V), 32) if on_gpu else _pow2(V)
        if ops.FORCE_BLOCK_V is not None:
            bv = _pow2(min(bv, ops.FORCE_BLOCK_V))
        cfg["delta_bv"] = bv
        store = any(ctx.needs_input_grad)     # (w and x of a low rank count too)
        final = cfg.get("final_state", True)   # (None when the caller does not want it)
        sT = torch.empty(cfg["N"], H, K, V, dtype=torch.float32, device=dev) if final else None
        half = DELTA_HALF_BUFFERS and v.dtype in (torch.bfloat16, torch.float16)
        cu, offsets = cfg["cu"], cfg["offsets"]
        products = None
        k_states, x_states, predecay = k, x, _predecays(cfg, cfg["ordered_dot"])
        if cfg["decay"] == 2:
            # the kernels read the in-chunk cumulative log decays (kept in place of lam)
            lam, k_states = _cumulative_decays(lam, cfg, _blocks(cfg, H, K, K),
                                               k if predecay else None)
            k_states = _or(k_states, k)
            # the decayed products by sub-chunks, as diagonal decays'
            products = _delta_products(q, k, lam, cfg, w, x)
        low_rank = w is not None
        blocks = _delta_blocks(cfg, H, K, V)
        # L^-1 kept for the backward (fla keeps it too), which then makes only W and u
        wy, u, inverse = _wy_form(q, k, v, beta, lam, None, cfg, products, w,
                                  from_states=False, store_inverse=store,
                                  w_dtype=torch.bfloat16 if half else torch.float32)
        if products is not None and not store:  # the WY form's products: done with
            products = tuple(p if i in (0, 3) else None for i, p in enumerate(products))
        if predecay and x is not None:  # the low rank's x, decayed as the keys (after the
            # WY form, whose buffers it would add to: peak memory)
            x_states = _predecayed(None, x, lam, cfg, _blocks(cfg, H, K, K))[1]
        # (allocated after the WY form, whose buffers it would otherwise add to: peak memory)
        ckpt = torch.empty(cfg["n_chunks"], H, K, V, device=dev,
                           dtype=torch.bfloat16 if half else torch.float32)
        lam_ = _or(lam, beta)
        unread = u      # (pointer arguments the kernels do not read)
        sb = _for("delta_states", dict(_without(blocks, "NK", "STRICT"),
                                       DOT=cfg["ordered_dot"]))
        for_device(_STATES, dev)((sb["NV"], cfg["N"] * H), k_states, v, lam_, _or(s0, unread),
                                 _or(sT, unread), ckpt, _or(cu, unread), _or(offsets, unread),
                                 T, wy, u, _or(x_states, unread), unread, unread, unread,
                                 USE_INITIAL_STATE=s0 is not None, IS_VARLEN=cu is not None,
                                 DELTA=True, LOW_RANK=low_rank, STORE_FINAL=final,
                                 PREDECAYED=predecay, **sb)
        # (read by the states kernel only: the output takes their memory)
        del wy, k_states, x_states
        y = torch.empty(B, T, H, V, dtype=cfg.get("y_dtype", torch.float32), device=dev)
        if low_rank:    # the state read along w, written along x; k v^T beside
            scores, second = products[0], dict(v2_ptr=v, A2_ptr=products[3])
        else:
            scores = products[0] if products is not None else y
            second = dict(v2_ptr=y, A2_ptr=y)
        for_device(_OUTPUT, dev)((cfg["n_chunks"], H), q, k, u, lam_, y, ckpt, cfg["table"],
                                 scores, 1.0, *second.values(), y, y, SECOND=low_rank,
                                 **_for("output", _blocks(cfg, H, K, V)))
        if store:   # (the backward makes W, u and L^-1 again from the states)
            ctx.save_for_backward(q, k, v, beta, lam, ckpt, w, x)
            ctx.products, ctx.inverse = products, inverse
        ctx.cfg, ctx.has_s0 = cfg, s0 is not None
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        q, k, v, beta, lam, ckpt, w, x = ctx.saved_tensors
        cfg = ctx.cfg
        if ctx.products is None and cfg["decay"] == 2:  # a second backward: made again
            ctx.products = _delta_products(q, k, lam, cfg, w, x)
        products, ctx.products = ctx.products, None      # (the backward overwrites them)
        # (taken off ctx, so that it is freed after its last read; a second backward, with
        # retain_graph, makes it again)
        inverse, ctx.inverse = ctx.inverse, None
        # W in bf16 where only the state gradients read it, through bf16 dots (the same
        # rounding, half the bytes, and the kernel takes it to the dot as loaded)
        w_half = w is None and cfg["ordered_dot"] == DOT_BF16
        wy, u, inverse = _wy_form(q, k, v, beta, lam, ckpt, cfg, products, w,
                                  from_states=True, inverse=inverse, store_inverse=True,
                                  w_dtype=torch.bfloat16 if w_half else torch.float32)
        B, T, H, K = q.shape
        V = v.shape[-1]
        dev = q.device
        N, cu, offsets = cfg["N"], cfg["cu"], cfg["offsets"]
        dy = dy.contiguous()    # (the kernels read it in its dtype, compute in fp32)
        if dsT is None:
            # zeros rather than the kernel's variant without them: that one spills 704 bytes
            # per thread on sm_90 with Triton 3.6, against 136 (benchmarks/preflight.py)
            dsT = torch.zeros(N, H, K, V, dtype=torch.float32, device=dev)
        ds0 = torch.empty(N, H, K, V, dtype=torch.float32, device=dev)
        # the state gradients in the states' dtype, but for diagonal decays, whose per-lane
        # decay gradients they take apart (bf16 there: kda's dg error 5.9e-3 -> 1.6)
        dckpt = torch.empty(ckpt.shape, device=dev, dtype=ckpt.dtype if cfg["decay"] != 2
                            else torch.float32)
        du = torch.empty(v.shape, dtype=torch.float32, device=dev)
        blocks = _delta_blocks(cfg, H, K, V)
        lam_ = _or(lam, beta)
        per_row = cfg["decay"] == 2
        if w is not None:       # u written along x, read by q through q.x
            written, qk, kk = x, products[0], None
        else:
            written, (qk, kk) = k, products if per_row else (dy, dy)
        if DELTA_LOCAL_DU:   # the state-free part of dU, every chunk at once
            for_device(_LOCAL_DU, dev)((cfg["n_chunks"], H), q, written, lam_, qk, dy, du,
                                       cfg["table"],
                                       **_for("delta_local_du", _without(blocks, "NK")))
        db = _for("delta_dstates", dict(_without(blocks, "NK"), DOT=cfg["ordered_dot"]))
        predecay = _predecays(cfg, cfg["ordered_dot"])
        q_states, k_states = _predecayed(q, written, lam, cfg, _blocks(cfg, H, K, K)) \
            if predecay else (q, written)
        for_device(_DSTATES, dev)((db["NV"], N * H), q_states, lam_, dy, dsT.contiguous(), ds0,
                                  dckpt, _or(cu, dy), _or(offsets, dy), T, k_states, wy, qk,
                                  du, dy, dy, dy, dy,
                                  USE_FINAL_STATE_GRAD=True, IS_VARLEN=cu is not None,
                                  DELTA=True, LOCAL_DU=DELTA_LOCAL_DU, PREDECAYED=predecay,
                                  **db)
        del q_states, k_states
        if w is not None:   # (the buffers go in a dict, so that it can drop them early)
            buffers = dict(dckpt=dckpt, du=du, wy=wy, u=u, inverse=inverse, products=products)
            del dckpt, du, wy, u, inverse, products, qk, written
            return _low_rank_backward(ctx, dy, ds0, buffers)
        del wy      # (the WY backward makes W's blocks again)
        # each gradient allocated when first written and each buffer dropped after its last
        # read (peak memory); dq in its own dtype where nothing adds to it afterwards
        dq = torch.empty(q.shape, dtype=torch.float32 if per_row else q.dtype, device=dev)
        dk = torch.empty(k.shape, dtype=torch.float32, device=dev)
        dlam = torch.empty(lam.shape, dtype=torch.float32, device=dev) if lam is not None \
            else None
        out = _blocks(cfg, H, K, V)
        last = torch.empty(cfg["n_chunks"], H, K, dtype=torch.float32, device=dev) \
            if per_row else dy
        # dq and the parts of dk and dlam through the readout and the state, u as values
        # (diagonal decays: the state parts, and dA in place of the scores q.k)
        for_device(_GRADS, dev)((cfg["n_chunks"], H), q, k, u, lam_, dy, ckpt, dckpt,
                                cfg["table"], qk, last, 1.0, dq, dk, dq, _or(dlam, dq), dq, dq,
                                dq, STORE_DV=False,
                                **_for("delta_grads" if cfg["decay"] else
                                       "delta_grads_no_decay", out))
        del u, dckpt
        if per_row:     # through q_t . k_s exp(b_t - b_s) (lam: the cumulative log decays)
            _diagonal_grads(q, k, lam, qk, last, cfg, out, 1.0, dq, dk, dlam)
        dq = dq.to(q.dtype)     # (final: each fp32 buffer freed as soon as it is)
        dkk = kk if per_row else dy    # (d loss / d KK replaces KK, which is read first)
        # dv in v's dtype: this kernel is its only writer (no fp32 copy and conversion)
        dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        dbeta = torch.empty(beta.shape, dtype=torch.float32, device=dev)
        for_device(_WY_BWD, dev)((cfg["n_chunks"], H), k, v, beta, lam_, kk, inverse, du,
                                 ckpt, cfg["table"], dk, dv, dbeta, _or(dlam, dk), dkk,
                                 **_for("wy_bwd", dict(_without(blocks, "NK", "STRICT"),
                                                       BKW=min(WY_BWD_BLOCK_K, blocks["BK"]))))
        del inverse, du
        if per_row:     # through k_t . k_s exp(b_t - b_s), s < t: both sides added to dk,
            # their dlam terms to dlam (what dk holds has its terms there already)
            _diagonal_grads(k, k, lam, dkk, torch.zeros_like(last), cfg, out, 1.0, dk, dk,
                            dlam, held_in_dlam=(False, False), add_dlam=True)
        dk = dk.to(k.dtype)
        dbeta = dbeta.to(beta.dtype)
        return dq, dk, dv, dbeta, dlam, ds0 if ctx.has_s0 else None, None, None, None


_WY, _WY_BWD = Launcher(delta_wy_kernel), Launcher(delta_wy_bwd_kernel)
_LOCAL_DU = Launcher(chunk_local_du_kernel)
_LOW_RANK_STATE_GRADS = Launcher(low_rank_state_grads_kernel)
_LOW_RANK_PAIR_GRADS = Launcher(low_rank_pair_grads_kernel)


def _wy_form(q, k, v, beta, lam, ckpt, cfg: dict, products, w, from_states: bool,
             inverse=None, store_inverse: bool = False, w_dtype: torch.dtype = torch.float32):
    """Every chunk's WY form (``delta_wy_kernel``): W [T*, H, K] and, in the forward, U0
    (the states kernel turns it into u), in the backward (``from_states``) u itself from the
    stored states; W in ``w_dtype``, the rest fp32. L^-1 [chunks * C, H, C] is read from
    ``inverse`` when given (made by the forward), else made, and returned when
    ``store_inverse``."""
    B, T, H, K = q.shape
    dev = q.device
    wy = torch.empty(q.shape, dtype=w_dtype, device=dev)
    u = torch.empty(v.shape, dtype=torch.float32, device=dev)
    load_inverse = inverse is not None
    options = _for("wy", dict(_without(_delta_blocks(cfg, H, K, v.shape[-1]), "NK", "STRICT"),
                              INVERSE=WY_INVERSE))
    # (the inverse through memory works in the buffer whether or not L^-1 is kept)
    if (store_inverse or options["INVERSE"] == 3) and not load_inverse:
        inverse = torch.empty(cfg["n_chunks"] * cfg["C"], H, cfg["C"], dtype=torch.float32,
                              device=dev)
    if w is not None:    # the state read along w: its products with x and k
        read, beta_, kk, wk = w, lam, products[1], products[2]
    else:
        read, beta_, kk, wk = k, beta, products[1] if products is not None else wy, wy
    for_device(_WY, dev)((cfg["n_chunks"], H), read, v, beta_, _or(lam, beta), kk, wy, u,
                         _or(inverse, wy), cfg["table"], wk, _or(ckpt, wy),
                         STORE_INVERSE=store_inverse and not load_inverse,
                         LOAD_INVERSE=load_inverse, LOW_RANK=w is not None,
                         FROM_STATES=from_states, **options)
    return wy, u, inverse if store_inverse or load_inverse else None


def _delta_blocks(cfg: dict, H: int, K: int, V: int) -> dict:
    """Constexprs of the delta rule's ordered and WY kernels: all of K in one tile, V in
    tiles of the delta's own width (``delta_bv``)."""
    bv = cfg["delta_bv"]
    return dict(_blocks(cfg, H, K, V), BK=_pow2(K), NK=1, BV=bv, NV=_cdiv(V, bv))


def _delta_products(q, k, cumulative, cfg: dict, w=None, x=None) -> tuple:
    """Diagonal decays: the delta rule's decayed products, [chunks * C, H, C] fp32 by
    sub-chunks (``chunk_diag_scores_kernel``) from the in-chunk cumulative log decays: q.k
    and k.k; for the low rank q.x, w.x and w.k before the token, and q.k."""
    H, K = q.shape[2], q.shape[3]
    blocks = _blocks(cfg, H, K, K)      # (the product kernels read no V)

    def product(a, b, strict=False):
        return _diagonal_scores(a, b, cumulative, cfg, dict(blocks, STRICT=strict),
                                torch.float32)
    if w is None:
        return product(q, k), product(k, k)
    return product(q, x), product(w, x, True), product(w, k, True), product(q, k)


def _low_rank_backward(ctx, dy, ds0, buffers: dict):
    """``DeltaChunkCore.backward`` for the diagonal-plus-low-rank transition, after the
    state gradients: ``low_rank_state_grads_kernel`` and ``low_rank_pair_grads_kernel``
    (every chunk at once: the parts through the state and through w exp(bq), the four
    decayed products' gradients, dv), then
    ``chunk_diag_grads_kernel`` once per product (q.x with the q and x state parts and
    b_last's terms, q.k with k's, w.x before the token with w's, w.k before the token).
    ``buffers``: dckpt, du, wy, u, inverse and the products from the caller, dropped after
    the two kernels that read them (peak memory)."""
    dckpt, du, wy, u, inverse, products = (buffers.pop(n) for n in (
        "dckpt", "du", "wy", "u", "inverse", "products"))
    q, k, v, beta, lam, ckpt, w, x = ctx.saved_tensors
    cfg = ctx.cfg
    B, T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    qx, wx, wk, qk = products
    d_qx, d_qk, d_wx, d_wk = (torch.empty_like(t) for t in (qx, qk, wx, wk))
    dq, dk, dw, dx = (torch.empty(t.shape, dtype=torch.float32, device=dev)
                      for t in (q, k, w, x))
    dv = torch.empty(v.shape, dtype=torch.float32, device=dev)
    last = torch.empty(cfg["n_chunks"], H, K, dtype=torch.float32, device=dev)
    blocks = _delta_blocks(cfg, H, K, V)
    sizes = _without(blocks, "NK", "STRICT", "DECAY")
    d_wx.zero_()
    # the K side in K blocks (fewer live [C, K] tiles per program)
    bk = min(cfg["BK"], sizes["BK"], LOW_RANK_GRADS_BLOCK_K)
    for_device(_LOW_RANK_STATE_GRADS, dev)((cfg["n_chunks"], H, _cdiv(K, bk)),
        q, k, v, x, lam, dy, ckpt, dckpt, wy, u, du, inverse, cfg["table"], dq, dk, dw, dx,
        last, d_wx, **_for("low_rank_grads", dict(sizes, BK=bk)))
    for_device(_LOW_RANK_PAIR_GRADS, dev)((cfg["n_chunks"], H),
        k, v, lam, dy, dckpt, u, du, inverse, cfg["table"], qk, wk, d_qx, d_qk, d_wx, d_wk, dv,
        **_for("low_rank_grads", sizes))
    del dckpt, du, wy, u, inverse, products, qx, wx, wk, qk
    blocks = _blocks(cfg, H, K, V)
    before = dict(blocks, STRICT=True)     # w's products see the decay before the token
    cumulative = lam    # (the forward kept the cumulative log decays in place of lam)
    # one product at a time, each buffer freed when done (peak memory), each adding to the
    # gradients of the ones before. dlam takes the terms of what dq, dk, dw and dx hold
    # once: the state parts with the first product that reads each (q.x: q's and x's, q.k:
    # k's, w.x: w's)
    none = torch.zeros_like(last)
    dlam = torch.empty(lam.shape, dtype=torch.float32, device=dev)
    _diagonal_grads(q, x, cumulative, d_qx, last, cfg, blocks, 1.0, dq, dx, dlam)
    del d_qx
    _diagonal_grads(q, k, cumulative, d_qk, none, cfg, blocks, 1.0, dq, dk, dlam,
                    held_in_dlam=(False, True), add_dlam=True)
    del d_qk
    _diagonal_grads(w, x, cumulative, d_wx, none, cfg, before, 1.0, dw, dx, dlam,
                    held_in_dlam=(True, False), add_dlam=True)
    del d_wx
    dq, dx = dq.to(q.dtype), dx.to(x.dtype)
    _diagonal_grads(w, k, cumulative, d_wk, none, cfg, before, 1.0, dw, dk, dlam,
                    held_in_dlam=(False, False), add_dlam=True)
    del d_wk
    return (dq, dk.to(k.dtype), dv.to(v.dtype), None, dlam, ds0 if ctx.has_s0 else None, None,
            dw.to(w.dtype), dx)


def _delta_forward(q, k, v, beta, lam, s0, cu_seqlens, batch: int, chunk_size: int, dot: int,
                   decay: int, low_rank=None, y_dtype=torch.float32, final_state=True):
    """The chunked delta rule (``DeltaChunkCore``), differentiable; with ``low_rank``
    (w, x) the diagonal-plus-low-rank transition; its output stored in ``y_dtype``; the
    final state None unless ``final_state``."""
    cfg = _core_config(batch, q.shape[1], q.shape[-1], v.shape[-1], cu_seqlens, chunk_size,
                       False, dot, q.device)
    half = cfg["dot"] == DOT_BF16     # (not with partial tiles: _core_config)
    cfg["dot"] = DELTA_HALF_DOT if half else cfg["dot"]
    ordered = DELTA_ORDERED_HALF_DOT if half else cfg["dot"]
    if half and low_rank is not None and q.shape[-1] > 128:
        ordered = WIDE_LOW_RANK_ORDERED_DOT
    cfg.update(decay=decay, y_dtype=y_dtype, final_state=final_state, ordered_dot=ordered)
    return apply(DeltaChunkCore, q, k, v, beta, lam, s0, cfg, *(low_rank or ()))


def _global_state_readout(q, k, v, s0, cu_seqlens, batch: int, cu_keys=None):
    """Noncausal: ``S = S0 + sum_t outer(k_t, v_t)`` over each whole sequence, then
    ``y_t = q_t @ S`` for every token: two batched GEMMs (torch, fp32 accumulation).
    Cross-attention: k and v run over the memory sequences, packed by ``cu_keys`` (both
    packings are given or neither: ``check_memory``)."""
    q, k, v = q.float(), k.float(), v.float()
    if cu_seqlens is None:
        S = torch.einsum("bthk,bthv->bhkv", k, v)
        if s0 is not None:
            S = S + s0
        return torch.einsum("bthk,bhkv->bthv", q, S), S
    bounds = cu_seqlens.tolist()
    key_bounds = cu_keys.tolist() if cu_keys is not None else bounds
    states, outs = [], []
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        k_lo, k_hi = key_bounds[n], key_bounds[n + 1]
        S = torch.einsum("thk,thv->hkv", k[0, k_lo:k_hi], v[0, k_lo:k_hi])
        if s0 is not None:
            S = S + s0[n]
        states.append(S)
        outs.append(torch.einsum("thk,hkv->thv", q[0, lo:hi], S))
    return torch.cat(outs, 0).unsqueeze(0), torch.stack(states, 0)


def _cancels(analysis: Analysis, sp: StatePlan) -> bool:
    """Whether a half-precision run must keep ``sp``'s query, key and value in fp32: a
    normalized readout divides by q^ @ z, which may cancel (cosFormer, random features)
    unless the compiler proves q^ and k^ nonnegative (elu + 1, relu, exp feature maps)."""
    if analysis.readout.kind is not ReadoutKind.NORMALIZED or not NORMALIZED_IN_FP32:
        return False
    return not (nonnegative(sp.query) and nonnegative(sp.key))


def _dot_precision(half: bool, low: torch.dtype) -> int:
    """The dots' operand precision for inputs stored in ``low``."""
    if FORCE_DOT is not None:
        return FORCE_DOT
    if not half:
        return DOT_IEEE  # fp32 inputs want fp32 dots
    if low is not torch.float32:
        return DOT_BF16  # half storage: bf16 operands, fp32 accumulation (as fla)
    # fp32 storage of half inputs (a normalized readout that may cancel): tf32's 10-bit
    # operands cost gated_rfa 2.1e-2 in dv on an H200; tf32x3 keeps about fp32's accuracy
    return DOT_TF32X3


def chunk_forward(analysis: Analysis, inputs: dict, params: dict, sizes: dict, *, batch: int,
                  out_dtype: torch.dtype, initial_state: dict | None, output_final_state: bool,
                  cu_seqlens: torch.Tensor | None, chunk_size: int = 64, parallel: bool = False,
                  memory: dict | None = None, cu_seqlens_memory: torch.Tensor | None = None):
    """Run the chunked form (differentiable); same contract as ``ops.recurrent_forward``.
    A noncausal spec runs as two GEMM stages (its parallel form). ``parallel``: the causal
    parallel form, every block of queries reading the keys and values of the earlier blocks
    directly instead of through chunk states (identity, scalar and diagonal decays; no
    state in or out). With ``memory`` (a cross-attention spec's memory inputs, packed by
    ``cu_seqlens_memory``) the noncausal form's first stage sums the memory's keys and
    values."""
    plan = chunk_plan(analysis)
    p = analysis.program
    if parallel and not p.noncausal:
        _check_parallel(plan, p.name, initial_state, output_final_state)
    ev = _Tokens(inputs, params, sizes, cu_seqlens)
    ev_keys = _Tokens(memory, params, sizes, cu_seqlens_memory, "memory") if memory else ev
    x0 = next(iter(inputs.values()))
    B, T, H = x0.shape[:3]
    half = x0.dtype in (torch.bfloat16, torch.float16)
    state_dtype = next(iter(initial_state.values())).dtype if initial_state else torch.float32
    V = sizes["V"]
    final = {}
    for sp in plan.states:
        low = x0.dtype if half and not _cancels(analysis, sp) else torch.float32
        dot = _dot_precision(half, low)
        core = not p.noncausal and not sp.solved
        q_scale, query = _split_scale(sp.query, sizes) if core else (1.0, sp.query)
        k_scale, key = _split_scale(sp.key, sizes) if core else (1.0, sp.key)
        q = ev.operand(query, low)
        k = ev_keys.operand(key, low)
        # an output that is the state read itself is stored in its dtype by the kernel
        direct = not sp.columns and any(node == p.output for node, _ in sp.reads)
        lam = None
        if sp.log_decay is not None:
            dims = (sp.row,) if sp.decay == 2 else ()
            lam = _lambdified(sp.log_decay, sp.log_symbols, ev, dims,
                              (B, T, H, *(q.shape[3:4] if sp.decay == 2 else ())))
        columns = tuple(initial_state[z].float().unsqueeze(-1) for z in sp.columns) \
            if initial_state is not None else ()
        s0 = initial_state[sp.state].float() if initial_state is not None else None
        if not core:
            # noncausal GEMMs and the delta kernel: normalizers as extra columns of v
            v = ev_keys.operand(sp.value, low)
            if sp.columns:
                v = torch.cat([v, v.new_ones(*v.shape[:-1], len(sp.columns))], -1)
            if s0 is not None:
                s0 = torch.cat([s0, *columns], dim=-1).contiguous()
            if p.noncausal:  # two GEMM stages: the whole sequence's state, then every readout
                y, sT = _global_state_readout(q, k, v, s0, cu_seqlens, batch,
                                              cu_seqlens_memory if memory else None)
            else:
                low_rank = None
                if sp.low_rank is not None:     # (the kernel reads no beta then)
                    beta = lam
                    low_rank = (ev.operand(sp.low_rank[1], low), ev.operand(sp.low_rank[0], low))
                else:
                    beta = _lambdified(sp.beta, sp.beta_symbols, ev, (), (B, T, H))
                y, sT = _delta_forward(q, k, v, beta, lam, s0, cu_seqlens, batch, chunk_size,
                                       dot, sp.decay, low_rank,
                                       out_dtype if direct else torch.float32,
                                       output_final_state)
            y_cols, y = y[..., V:], y[..., :V]
            sT_cols, sT = (sT[..., V:], sT[..., :V]) if sT is not None else (None, None)
        else:
            def run(v, s0, direct, z0=None, norm=False):
                cfg = _core_config(batch, T, q.shape[-1], v.shape[-1], cu_seqlens, chunk_size,
                                   sp.strict, dot, q.device)
                # a normalizer's numerator in half precision when its operands are: the
                # readout divides it (no cancellation after it), and its fp32 copy was the
                # largest buffer of linear_attention's forward peak (3 MiB above fla's).
                # Errors against float64 (bf16, K = V = 64, T = 256 / 1024): o 0.95 /
                # 0.57 % -> 1.10 / 0.80 %, dq 1.13 / 1.18 % -> 1.67 / 0.79 %
                y_dtype = out_dtype if direct else low if norm else torch.float32
                cfg.update(decay=sp.decay, parallel=parallel, scale=q_scale * k_scale,
                           y_dtype=y_dtype, norm=norm, final_state=output_final_state)
                if s0 is not None and k_scale != 1.0:
                    s0 = s0 / k_scale   # the core's state is the spec's over k's factor
                    z0 = z0 / k_scale if z0 is not None else None
                out = apply(ChunkCore, q, k, v, lam, s0, cfg, z0)
                if k_scale != 1.0 and output_final_state:
                    out = (out[0], out[1] * k_scale, *out[2:3],
                           *((out[3] * k_scale,) if norm else ()))
                return out
            y_cols = sT_cols = None
            if len(sp.columns) == 1 and not parallel:
                # one normalizer: it rides along in the same kernels (its value a column of
                # ones: the scores' row sums and the queries times its state)
                y, sT, y_col, zT = run(ev.operand(sp.value, low), s0, direct,
                                       columns[0][..., 0].contiguous() if columns else None,
                                       norm=True)
                y_cols, sT_cols = y_col[..., None], zT[..., None]
            else:
                y, sT = run(ev.operand(sp.value, low), s0, direct)
            if sp.columns and y_cols is None:
                # normalizers: a second run with columns of ones as the value
                ones = torch.ones(B, T, H, len(sp.columns), dtype=low, device=x0.device)
                y_cols, sT_cols = run(ones, torch.cat(columns, -1).contiguous()
                                      if columns else None, False)
        # the readout's state reads become the kernels' outputs
        for node, col in sp.reads:
            part = y if col is None else y_cols[..., col]
            ev.ev.memo[node] = part.reshape(B * T, H, *part.shape[3:])
        if output_final_state:
            final[sp.state] = sT.to(state_dtype)
            final.update({z: sT_cols[..., i].to(state_dtype)
                          for i, z in enumerate(sp.columns)})
    reads = {node: ev.ev.memo[node] for sp in plan.states for node, _ in sp.reads}
    if FUSE_MAPS and p.output not in reads:
        # sums over a dim inside the readout (RWKV-6's bonus sum(r * u * k)): one generated
        # kernel each, then given to the readout's kernel like the state reads
        for node, plan_s in _readout_sums(p.output, sizes, tuple(reads)):
            reads[node] = ev.ev.memo[node] = run_map(
                plan_s, ev.tensors, ev.shape(node.args[0].dims), torch.float32).reshape(B * T, H)
    if p.output in reads:   # the output is a state read: the kernel stored it already
        o = reads[p.output].reshape(B, T, *reads[p.output].shape[1:]).to(out_dtype)
    else:
        plan_o = fused_map(p.output, sizes, tuple(reads)) if FUSE_MAPS else None
        if plan_o is not None:  # the readout (division, skip terms) as one generated kernel
            tensors = {**ev.tensors, **{("given", _given_name(n)): t.reshape(
                B, T, *t.shape[1:]) for n, t in reads.items()}}
            o = run_map(plan_o, tensors, ev.shape(p.output.dims), out_dtype)
        else:
            o = ev(p.output).to(out_dtype)
    return o, ({s: final[s] for s in p.states} if output_final_state else None)


__all__ = ["ChunkPlan", "ChunkUnsupported", "StatePlan", "chunk_forward", "chunk_plan",
           "chunk_source"]
