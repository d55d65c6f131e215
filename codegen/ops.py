"""Run generated kernels on tensors: the recurrent forward and the decode step."""

from __future__ import annotations

import math

import torch
import triton

from ..ir.analysis import Analysis
from ..ir.show import show_ir
from .cache import cache_key, load_module
from .launch import for_device
from .recurrent import choose_bv, emit_recurrent_fwd, kernel_name, used_dims


def recurrent_source(analysis: Analysis, direction: str) -> str:
    """Generated source of the recurrent kernel for ``direction`` ('fwd' or 'bwd')."""
    if direction == "fwd":
        return emit_recurrent_fwd(analysis)
    raise NotImplementedError("the recurrent backward kernel is not generated yet")


def _module(analysis: Analysis):
    p = analysis.program
    key = cache_key(show_ir(p), "recurrent", "fwd")
    return load_module(key, kernel_name(p), lambda: emit_recurrent_fwd(analysis))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def recurrent_forward(analysis: Analysis, inputs: dict, params: dict, sizes: dict, *,
                      batch: int, out_dtype: torch.dtype, initial_state: dict | None,
                      output_final_state: bool, cu_seqlens: torch.Tensor | None,
                      final_out: dict | None = None):
    """Launch the recurrent forward kernel.

    inputs ``[B, T, H, *dims]``, params ``[H, *dims]``; returns ``o [B, T, H, *o_dims]``
    and the final states ``[N, H, *dims]`` (fp32, or the initial state's dtype) or None.
    ``final_out`` lets the caller name the tensors the final states are written to.
    """
    p = analysis.program
    x0 = next(iter(inputs.values()))
    device = x0.device
    B, T, H = x0.shape[:3]
    kernel = for_device(getattr(_module(analysis), kernel_name(p)), device)
    dims = used_dims(p)
    o = torch.empty(B, T, H, *(sizes[d] for d in p.output.dims), dtype=out_dtype, device=device)
    state_dtype = (next(iter(initial_state.values())).dtype if initial_state else torch.float32)
    s0 = [initial_state[s].contiguous() if initial_state else o for s in p.states]
    finals = {}
    if output_final_state:
        for s, decl in p.states.items():
            if final_out and s in final_out:
                finals[s] = final_out[s]
            else:
                finals[s] = torch.empty(batch, H, *(sizes[d] for d in decl.dims),
                                        dtype=state_dtype, device=device)
    sT = [finals[s] if output_final_state else o for s in p.states]
    on_gpu = device.type == "cuda"
    blocks = {f"B{d}": (choose_bv(p, sizes[d], on_gpu) if d == "V" else _pow2(sizes[d]))
              for d in dims}
    nv = triton.cdiv(sizes["V"], blocks["BV"]) if "BV" in blocks else 1
    cu = cu_seqlens if cu_seqlens is not None else o
    kernel[(nv, batch * H)](
        *(inputs[n].contiguous() for n in p.inputs), *(params[n].contiguous() for n in p.params),
        o, *s0, *sT, cu, T, H=H, **{d: sizes[d] for d in dims}, **blocks,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None)
    return o, (finals if output_final_state else None)
