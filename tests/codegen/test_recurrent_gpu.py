"""GPU: the recurrent forward kernel of every library spec at real sizes (pytest -m gpu)."""

import pytest
import torch
from spec_inputs import kernel_names, make_inputs, make_state, spec_sizes

import linforge

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", kernel_names())
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", kernel_names())
def test_recurrent_bwd_gpu(name, dtype):
    """Gradients at real sizes: V = 72 split in blocks of 32, T = 300 in ~10 chunks."""
    from test_recurrent_bwd import check_against_reference

    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=8 if name == "based" else 100, V=72, M=32)
    B, T, H = 2, 300, 3
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=7, device="cuda")
    init = None if attn.program.noncausal else make_state(attn, N=B, H=H, sizes=sizes,
                                                          device="cuda")
    check_against_reference(attn, x, init, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "mlstm"])
def test_recurrent_bwd_gpu_varlen(name):
    from test_recurrent_bwd import check_against_reference

    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=64, V=64)
    cu = torch.tensor([0, 100, 101, 700, 1000], device="cuda")
    x = make_inputs(attn, B=1, T=1000, H=2, sizes=sizes, seed=8, device="cuda")
    init = make_state(attn, N=4, H=2, sizes=sizes, device="cuda")
    check_against_reference(attn, x, init, torch.float32, cu_seqlens=cu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "rwkv6", "mlstm"])
def test_decode_gpu_equals_full_sequence(name):
    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=128, V=128)
    B, T, H = 4, 16, 4
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=9, device="cuda")
    init = make_state(attn, N=B, H=H, sizes=sizes, device="cuda")
    o_full, st_full = attn(**x, initial_state=init, output_final_state=True, form="recurrent")
    state = {s: v.clone() for s, v in init.items()}
    outs = []
    for t in range(T):
        o_t, state = attn.step(state, inplace=True, **{k: (v[:, t] if k in attn.program.inputs
                                                            else v) for k, v in x.items()})
        outs.append(o_t)
    err = ((torch.stack(outs, 1) - o_full).abs().max() / o_full.abs().max()).item()
    assert err < 1e-5


CHUNKED = ["linear_attention", "retnet", "mamba2", "lightning_attention", "performer",
           "cosformer", "gated_rfa", "mlstm", "based", "gla", "rwkv6", "rwkv5", "hgrn2",
           "deltanet", "gated_deltanet", "kda", "rwkv7"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunk_gpu(name, dtype):
    from test_recurrent_bwd import check_against_reference

    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=8 if name == "based" else 100, V=72, M=32)
    B, T, H = 2, 300, 3
    x = make_inputs(attn, B=B, T=T, H=H, sizes=sizes, seed=7, device="cuda")
    init = make_state(attn, N=B, H=H, sizes=sizes, device="cuda")
    check_against_reference(attn, x, init, dtype, form="chunk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gla", "rwkv6", "retnet", "gated_deltanet", "kda", "rwkv7"])
def test_chunk_gpu_wide_heads(name):
    """K = V = 256 (Gated DeltaNet's head size), bf16: forward and every gradient against the
    float64 reference. Four K tiles of 64 take the gradient kernel's K loop that is not
    unrolled (up to two tiles are), and the delta kernels hold all 256 lanes of K."""
    from test_recurrent_bwd import check_against_reference

    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=256, V=256)
    x = make_inputs(attn, B=1, T=200, H=2, sizes=sizes, seed=11, device="cuda")
    init = make_state(attn, N=1, H=2, sizes=sizes, device="cuda")
    check_against_reference(attn, x, init, torch.bfloat16, form="chunk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["kda", "rwkv7"])
def test_chunk_gpu_forward_of_per_channel_delta_and_low_rank(name, dtype):
    """KDA's and RWKV-7's chunked forward against the float64 reference (inputs in bf16
    where the layers pass them so)."""
    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=100, V=72)
    x = make_inputs(attn, B=2, T=300, H=3, sizes=sizes, seed=7, device="cuda")
    x = {k: v.to(dtype) if k in ("q", "k", "v", "r") else v for k, v in x.items()}
    init = make_state(attn, N=2, H=3, sizes=sizes, device="cuda")
    with torch.no_grad():
        o, final = attn(**x, initial_state=init, output_final_state=True, form="chunk")
        o_ref, f_ref = attn(**{k: v.double() for k, v in x.items()},
                            initial_state={k: v.double() for k, v in init.items()},
                            output_final_state=True, form="reference")
    for a, b in ((o, o_ref), (final["S"], f_ref["S"])):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < TOL[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "kda", "rwkv7"])
def test_chunk_gpu_delta_rule_long_bf16_at_full_width(name):
    """The chunked delta rule at the benchmark's width (K = V = 128), T = 16384, bf16:
    outputs and every gradient finite and equal to the recurrent kernels' within bf16
    tolerance (fla 0.6.0 refuses its gated backward on Hopper as miscompiled)."""
    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=128, V=128)
    x = make_inputs(attn, B=1, T=16384, H=2, sizes=sizes, seed=9, device="cuda")
    x = {k: v.to(torch.bfloat16) if k in ("q", "k", "v", "r") else v for k, v in x.items()}
    grads = {}
    for form in ("chunk", "recurrent"):
        xs = {k: v.detach().requires_grad_() for k, v in x.items()}
        o, _ = attn(**xs, form=form)
        o.float().square().sum().backward()
        grads[form] = (o.float(), {k: v.grad.float() for k, v in xs.items()})
    (o_c, g_c), (o_r, g_r) = grads["chunk"], grads["recurrent"]
    assert torch.isfinite(o_c).all() and all(torch.isfinite(g).all() for g in g_c.values())
    assert ((o_c - o_r).abs().max() / o_r.abs().max()).item() < 2e-2
    for k in g_r:
        assert ((g_c[k] - g_r[k]).abs().max() / g_r[k].abs().max()).item() < 2e-2, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dims", ["", "[K]"], ids=["scalar", "diagonal"])
def test_chunk_gpu_long_steep_decays(dims):
    """T = 16384 with log decays down to -20 per step: finite and equal to the recurrent."""
    attn = linforge.compile(f"""
attention steep
    inputs q[K], k[K], v[V], g{dims}
    state  S[K, V]
    S = exp(g) * S + outer(k, v)
    o = q @ S
""")
    g = torch.Generator(device="cuda").manual_seed(3)
    B, T, H, K, V = 1, 16384, 2, 64, 64
    x = {"q": torch.randn(B, T, H, K, device="cuda", generator=g),
         "k": torch.randn(B, T, H, K, device="cuda", generator=g),
         "v": torch.randn(B, T, H, V, device="cuda", generator=g),
         "g": -20 * torch.rand(B, T, H, *([K] if dims else []), device="cuda", generator=g)}
    xs = {k: v.requires_grad_() for k, v in x.items()}
    o, _ = attn(**xs, form="chunk")
    o.sum().backward()
    g_chunk = {k: v.grad.clone() for k, v in xs.items()}
    assert torch.isfinite(o).all() and all(torch.isfinite(v).all() for v in g_chunk.values())
    for v in xs.values():
        v.grad = None
    o_r, _ = attn(**xs, form="recurrent")
    o_r.sum().backward()
    assert ((o - o_r).abs().max() / o_r.abs().max()).item() < 1e-4
    for k, v in xs.items():
        assert ((g_chunk[k] - v.grad).abs().max() / v.grad.abs().max()).item() < 1e-4, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["linear_attention", "retnet", "mamba2", "mlstm", "gla",
                                  "rwkv6"])
def test_causal_parallel_gpu(name, dtype):
    from test_recurrent_bwd import check_against_reference

    attn = linforge.library.get(name)
    sizes = spec_sizes(attn, K=100, V=72, M=32)
    x = make_inputs(attn, B=2, T=300, H=3, sizes=sizes, seed=8, device="cuda")
    check_against_reference(attn, x, None, dtype, form="parallel", states=False)
