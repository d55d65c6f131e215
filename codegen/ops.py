"""Run generated kernels on tensors: the recurrent forward, its backward (an autograd
Function) and the decode step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from ..ir.analysis import Analysis
from ..ir.show import show_ir
from .cache import cache_key, load_module
from .launch import Launcher, for_device, targets_gpu
from .recurrent import (choose_bv, emit_recurrent_bwd, emit_recurrent_fwd, kernel_name,
                        used_dims)

#: Overrides for tests and tuning sweeps: the V block (tests set it to split V over programs
#: on the CPU too) and the warps per program.
FORCE_BLOCK_V: int | None = None
FORCE_NUM_WARPS: int | None = None

_EMITTERS = {"fwd": emit_recurrent_fwd, "bwd": emit_recurrent_bwd}


def recurrent_source(analysis: Analysis, direction: str) -> str:
    """Generated source of the recurrent kernel for ``direction`` ('fwd' or 'bwd')."""
    return _EMITTERS[direction](analysis)


_launchers: dict[tuple[int, str], tuple[Analysis, Launcher]] = {}


def _kernel(analysis: Analysis, direction: str, device) -> Launcher:
    """The launcher of a generated kernel (source from the disk cache when there)."""
    entry = _launchers.get((id(analysis), direction))
    if entry is None or entry[0] is not analysis:
        p = analysis.program
        key = cache_key(show_ir(p), "recurrent", direction)
        module = load_module(key, kernel_name(p, direction),
                             lambda: _EMITTERS[direction](analysis))
        entry = (analysis, Launcher(getattr(module, kernel_name(p, direction))))
        _launchers[(id(analysis), direction)] = entry
    for_device(entry[1].fn, device)
    return entry[1]


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@dataclass
class Launch:
    """Everything about one call that is not a tensor: sizes, blocks, grid, chunking."""

    analysis: Analysis
    sizes: dict
    batch: int           # N sequences
    B: int
    T: int
    H: int
    blocks: dict
    nv: int
    chunk: int
    cu_seqlens: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    n_chunks: int        # checkpoints per head over all sequences
    out_dtype: torch.dtype
    state_dtype: torch.dtype
    options: dict        # Triton launch options (num_warps)

    @property
    def dims(self) -> dict:
        return {d: self.sizes[d] for d in used_dims(self.analysis.program)}

    def state_shape(self, s: str, lead: tuple) -> tuple:
        return (*lead, *(self.sizes[d] for d in self.analysis.program.states[s].dims))


def plan(analysis: Analysis, sizes: dict, *, batch: int, B: int, T: int, H: int,
         device, out_dtype, state_dtype, cu_seqlens, chunk: int | None = None) -> Launch:
    """Blocks, V split and checkpoint chunking for a call; ``chunk`` overrides the tokens
    between checkpoints (``codegen.torch_op`` picks it from shapes alone)."""
    p = analysis.program
    on_gpu = targets_gpu(device)
    blocks = {}
    for d in used_dims(p):
        if d == "V":
            # measured on an H100 (benchmarks/tune_recurrent.py): narrow V blocks (many
            # programs, one warp each) for sequences, wide ones for one-token decode
            limit = 64 if T == 1 else 8
            if FORCE_BLOCK_V is not None:
                limit = FORCE_BLOCK_V
            elif not on_gpu:
                limit = None  # the interpreter is fastest with the fewest programs
            blocks["BV"] = choose_bv(p, sizes[d], limit)
        else:
            blocks[f"B{d}"] = _pow2(sizes[d])
    nv = triton.cdiv(sizes["V"], blocks["BV"]) if "BV" in blocks else 1
    if cu_seqlens is not None:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        longest = int(lens.max()) if len(lens) else 0
    else:
        longest = T
    # checkpoints every ~sqrt(T) steps balance checkpoint and scratch memory
    chunk = chunk or min(256, max(4, _pow2(math.isqrt(max(longest, 1)))))
    if cu_seqlens is not None:
        per_seq = (lens + chunk - 1) // chunk
        chunk_offsets = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
        chunk_offsets[1:] = per_seq.cumsum(0)
        n_chunks = int(chunk_offsets[-1])
    else:
        chunk_offsets = None
        n_chunks = batch * triton.cdiv(T, chunk)
    options = {}
    if FORCE_NUM_WARPS:
        options["num_warps"] = FORCE_NUM_WARPS
    elif on_gpu:  # about 32 fp32 state values per thread (2048 per warp)
        state = max(math.prod(blocks[f"B{d}"] for d in decl.dims) for decl in p.states.values())
        options["num_warps"] = max(1, min(8, state // 2048))
    return Launch(analysis, sizes, batch, B, T, H, blocks, nv, chunk, cu_seqlens, chunk_offsets,
                  n_chunks, out_dtype, state_dtype, options)


def _forward(L: Launch, inputs: dict, params: dict, initial: dict | None, *,
             store_final: bool, save_checkpoints: bool, final_out: dict | None = None):
    p = L.analysis.program
    x0 = next(iter(inputs.values()))
    device = x0.device
    o = torch.empty(L.B, L.T, L.H, *(L.sizes[d] for d in p.output.dims), dtype=L.out_dtype,
                    device=device)
    finals = {}
    if store_final:
        for s in p.states:
            finals[s] = (final_out[s] if final_out and s in final_out else
                         torch.empty(L.state_shape(s, (L.batch, L.H)), dtype=L.state_dtype,
                                     device=device))
    ckpts = {}
    if save_checkpoints:
        ckpts = {s: torch.empty(L.state_shape(s, (L.n_chunks, L.H)), dtype=torch.float32,
                                device=device) for s in p.states}
    kernel = _kernel(L.analysis, "fwd", device)
    kernel((L.nv, L.batch * L.H),
        *(inputs[n] for n in p.inputs), *(params[n] for n in p.params), o,
        *(initial[s] if initial else o for s in p.states),
        *(finals.get(s, o) for s in p.states), *(ckpts.get(s, o) for s in p.states),
        _or(L.cu_seqlens, o), _or(L.chunk_offsets, o), L.T, H=L.H, **L.dims, **L.blocks,
        **L.options, CHUNK=L.chunk, USE_INITIAL_STATE=initial is not None,
        STORE_FINAL_STATE=store_final,
        SAVE_CHECKPOINTS=save_checkpoints, IS_VARLEN=L.cu_seqlens is not None)
    return o, finals, ckpts


def _or(x, fallback):
    return x if x is not None else fallback


def _backward(L: Launch, inputs: dict, params: dict, ckpts: dict, totals: dict,
              do: torch.Tensor, d_final: dict):
    """Gradients of every input, param and initial state (fp32 partials reduced here)."""
    p = L.analysis.program
    device = do.device
    scratch = {}
    for s, decl in p.states.items():
        per_step = math.prod(L.blocks[f"B{d}"] for d in decl.dims)
        scratch[s] = torch.empty(L.batch * L.H * L.nv * L.chunk * per_step,
                                 dtype=torch.float32, device=device)
    d_in = {}
    for n, decl in p.inputs.items():
        x = inputs[n]
        if "V" in decl.dims or L.nv == 1:  # written once per element
            d_in[n] = torch.empty(x.shape, dtype=x.dtype, device=device)
        else:  # every V block adds its part atomically
            d_in[n] = torch.zeros(x.shape, dtype=torch.float32, device=device)
    d_par = {n: torch.zeros(L.nv, L.batch, *params[n].shape, dtype=torch.float32,
                            device=device) for n in p.params}
    d_init = {}
    for s, decl in p.states.items():
        lead = (L.batch, L.H) if "V" in decl.dims else (L.nv, L.batch, L.H)
        d_init[s] = torch.empty(L.state_shape(s, lead), dtype=torch.float32, device=device)
    use_dT = any(g is not None for g in d_final.values())
    dT = {s: (d_final[s].float().contiguous() if d_final.get(s) is not None else
              torch.zeros(L.state_shape(s, (L.batch, L.H)), device=device)) if use_dT else do
          for s in p.states}
    kernel = _kernel(L.analysis, "bwd", device)
    kernel((L.nv, L.batch * L.H),
        *(inputs[n] for n in p.inputs), *(params[n] for n in p.params), do,
        *(ckpts[s] for s in p.states), *(scratch[s] for s in p.states),
        *((totals[s] for s in p.states) if p.noncausal else ()),
        *(dT[s] for s in p.states), *(d_in[n] for n in p.inputs),
        *(d_par[n] for n in p.params), *(d_init[s] for s in p.states),
        _or(L.cu_seqlens, do), _or(L.chunk_offsets, do), L.T, H=L.H, **L.dims,
        **L.blocks, **L.options, CHUNK=L.chunk, NV=L.nv, USE_FINAL_STATE_GRAD=use_dT,
        IS_VARLEN=L.cu_seqlens is not None)
    grads_in = {n: g.to(inputs[n].dtype) for n, g in d_in.items()}
    grads_par = {n: g.sum((0, 1)).to(params[n].dtype) for n, g in d_par.items()}
    grads_init = {s: (g if "V" in p.states[s].dims else g.sum(0)) for s, g in d_init.items()}
    return grads_in, grads_par, grads_init


class RecurrentFunction(torch.autograd.Function):
    """The recurrent form as a differentiable op over flat tensor arguments:
    inputs, params, then initial states (or None), in program order."""

    @staticmethod
    def forward(ctx, L: Launch, store_final: bool, *tensors):
        p = L.analysis.program
        ni, np_ = len(p.inputs), len(p.params)
        inputs = dict(zip(p.inputs, tensors[:ni]))
        params = dict(zip(p.params, tensors[ni:ni + np_]))
        init = tensors[ni + np_:]
        initial = dict(zip(p.states, init)) if init and init[0] is not None else None
        o, finals, ckpts = _forward(L, inputs, params, initial,
                                    store_final=store_final or p.noncausal,
                                    save_checkpoints=True)
        totals = finals if p.noncausal else {}
        ctx.L = L
        ctx.has_initial = initial is not None
        ctx.save_for_backward(*tensors[:ni + np_], *ckpts.values(), *totals.values())
        return (o, *(finals[s] for s in p.states)) if store_final else o

    @staticmethod
    def backward(ctx, do, *d_finals):
        L = ctx.L
        p = L.analysis.program
        ni, np_, ns = len(p.inputs), len(p.params), len(p.states)
        saved = ctx.saved_tensors
        inputs = dict(zip(p.inputs, saved[:ni]))
        params = dict(zip(p.params, saved[ni:ni + np_]))
        ckpts = dict(zip(p.states, saved[ni + np_:ni + np_ + ns]))
        totals = dict(zip(p.states, saved[ni + np_ + ns:]))
        d_final = dict(zip(p.states, d_finals)) if d_finals else {}
        g_in, g_par, g_init = _backward(L, inputs, params, ckpts, totals, do.contiguous(),
                                        d_final)
        init_grads = [g_init[s] for s in p.states] if ctx.has_initial else [None] * ns
        return (None, None, *(g_in[n] for n in p.inputs), *(g_par[n] for n in p.params),
                *init_grads)


def recurrent_forward(analysis: Analysis, inputs: dict, params: dict, sizes: dict, *,
                      batch: int, out_dtype: torch.dtype, initial_state: dict | None,
                      output_final_state: bool, cu_seqlens: torch.Tensor | None,
                      final_out: dict | None = None):
    """Run the recurrent form: differentiable when any tensor requires grad.

    inputs ``[B, T, H, *dims]``, params ``[H, *dims]``; returns ``o [B, T, H, *o_dims]``
    and the final states ``[N, H, *dims]`` (fp32, or the initial state's dtype) or None.
    ``final_out`` lets the caller name the tensors the final states are written to.
    """
    p = analysis.program
    x0 = next(iter(inputs.values()))
    B, T, H = x0.shape[:3]
    state_dtype = (next(iter(initial_state.values())).dtype if initial_state else torch.float32)
    L = plan(analysis, sizes, batch=batch, B=B, T=T, H=H, device=x0.device,
             out_dtype=out_dtype, state_dtype=state_dtype, cu_seqlens=cu_seqlens)
    inputs = {n: x.contiguous() for n, x in inputs.items()}
    params = {n: x.contiguous() for n, x in params.items()}
    initial = {s: x.contiguous() for s, x in initial_state.items()} if initial_state else None
    tensors = [*inputs.values(), *params.values(), *(initial or {}).values()]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        init = [initial[s] for s in p.states] if initial else [None] * len(p.states)
        out = RecurrentFunction.apply(L, output_final_state, *inputs.values(),
                                        *params.values(), *init)
        if not output_final_state:
            return out, None
        o, *finals = out
        return o, dict(zip(p.states, finals))
    o, finals, _ = _forward(L, inputs, params, initial, store_final=output_final_state,
                            save_checkpoints=False, final_out=final_out)
    return o, (finals if output_final_state else None)


class Decoder:
    """The decode step prepared for one argument signature (shapes, dtypes, device): one
    token per sequence, the state read and written once, no validation per call."""

    def __init__(self, analysis: Analysis, sizes: dict, *, batch: int, H: int, device,
                 out_dtype: torch.dtype, state_dtype: torch.dtype, inplace: bool):
        p = analysis.program
        self.program = p
        L = plan(analysis, sizes, batch=batch, B=batch, T=1, H=H, device=device,
                 out_dtype=out_dtype, state_dtype=state_dtype, cu_seqlens=None)
        self.kernel = _kernel(analysis, "fwd", device)
        self.grid = (L.nv, batch * H)
        self.o_shape = (batch, 1, H, *(sizes[d] for d in p.output.dims))
        self.state_shapes = {s: L.state_shape(s, (batch, H)) for s in p.states}
        self.out_dtype, self.state_dtype, self.device = out_dtype, state_dtype, device
        # states over V are updated where they are (each program owns its V block); the
        # others are read by every V block, so they get a fresh buffer copied back after
        self.in_place = {s for s, d in p.states.items() if inplace and "V" in d.dims}
        self.constexprs = dict(H=H, **L.dims, **L.blocks, **L.options, CHUNK=L.chunk,
                               USE_INITIAL_STATE=True,
                               STORE_FINAL_STATE=True, SAVE_CHECKPOINTS=False, IS_VARLEN=False)

    def __call__(self, inputs: list, params: list, state: dict, inplace: bool):
        """``(o [B, 1, H, *o_dims], new states)``; inputs and params in program order."""
        o = torch.empty(self.o_shape, dtype=self.out_dtype, device=self.device)
        new = {s: state[s] if s in self.in_place else
               torch.empty(shape, dtype=self.state_dtype, device=self.device)
               for s, shape in self.state_shapes.items()}
        states = list(self.program.states)
        self.kernel(self.grid, *inputs, *params, o, *(state[s].contiguous() for s in states),
                    *(new[s] for s in states), *(o for _ in states), o, o, 1,
                    **self.constexprs)
        if inplace:
            for s in states:
                if s not in self.in_place:
                    state[s].copy_(new[s])
            new = state
        return o, new
