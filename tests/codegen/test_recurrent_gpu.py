"""GPU: the recurrent forward kernel of every library spec at real sizes (pytest -m gpu)."""

import pytest
import torch
from spec_inputs import make_inputs, make_state, spec_sizes

import linforge

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", linforge.library.names())
def test_recurrent_fwd_gpu(name, dtype):
    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=8 if name == "based" else 100, V=72, M=32)
    B, T, H = 2, 300, 3
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=7, device="cuda")
    x = {k: (v.to(dtype) if k in attn.program.inputs else v) for k, v in x.items()}
    init = None if attn.program.noncausal else make_state(attn, N=B, H=H, sizes=sizes,
                                                          device="cuda")
    o_ref, st_ref = attn.reference(**{k: v.double() for k, v in x.items()},
                                   initial_state=init, output_final_state=True)
    o, st = attn(**x, initial_state=init, output_final_state=True, form="recurrent")
    err = ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item()
    assert err < TOL[dtype], f"{name} {dtype}: o rel err {err:.2e}"
    for s in st_ref:
        e = ((st[s].double() - st_ref[s]).abs().max() / st_ref[s].abs().max()).item()
        assert e < 1e-4, f"{name}: state {s} rel err {e:.2e}"
