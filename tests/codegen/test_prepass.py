"""Pre-pass lowering (ir/prepass.py): values across heads or tokens and position-indexed
params computed by torch before the kernels, so specs that use them run in every generated
form their transition class allows; outputs, final states and every gradient against the
float64 reference."""

import pytest
import torch
from spec_inputs import kernel_sizes, make_inputs
from test_recurrent_bwd import check_against_reference

import linforge


def test_mobile_attention_and_linformer_have_kernel_forms_after_the_prepass():
    mobile = linforge.library.get("mobile_attention").info()
    assert mobile["forms"] == ["recurrent", "chunk", "parallel"]
    assert "sum(sigmoid(k), H)" in mobile["prepass"] and "T" in mobile["prepass"]
    assert "pre-pass" in mobile["auto_form"]
    linformer = linforge.library.get("linformer").info()
    assert linformer["forms"] == ["recurrent"] and linformer["prepass"] == ["E[t]", "F[t]"]
    # cross-attention (memory inputs) needs no pre-pass: its GEMM form reads T itself
    cross = linforge.library.get("modular_linearized").info()
    assert cross["forms"] == ["parallel"] and cross["prepass"] == []
    assert cross["kernels"] == ["parallel (GEMM) fwd", "parallel (GEMM) bwd"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["recurrent", "chunk", "parallel"])
def test_mobile_attention_every_form_matches_reference(form, dtype):
    attn = linforge.library.get("mobile_attention")
    x = make_inputs(attn, B=2, T=40, H=3, sizes=kernel_sizes(attn), seed=4)
    check_against_reference(attn, x, None, dtype, form=form)


def test_mobile_attention_varlen_reduces_over_each_sequence():
    attn = linforge.library.get("mobile_attention")
    x = make_inputs(attn, B=1, T=50, H=2, sizes=kernel_sizes(attn), seed=5)
    cu = torch.tensor([0, 7, 31, 50])
    check_against_reference(attn, x, None, torch.float32, cu_seqlens=cu, form="parallel")


def _linformer_inputs(T, N=24):
    attn = linforge.library.get("linformer")
    g = torch.Generator().manual_seed(6)
    H, K, V, P = 2, 6, 5, 4
    x = {"q": torch.randn(2, T, H, K, generator=g), "k": torch.randn(2, T, H, K, generator=g),
         "v": torch.randn(2, T, H, V, generator=g),
         "E": torch.randn(H, N, P, generator=g) * N ** -0.5,
         "F": torch.randn(H, N, P, generator=g) * N ** -0.5}
    return attn, x


def test_linformer_recurrent_matches_reference_with_param_gradients():
    attn, x = _linformer_inputs(T=17)
    check_against_reference(attn, x, None, torch.float32, form="recurrent")


def test_a_sequence_longer_than_a_position_indexed_param_is_a_clear_error():
    attn, x = _linformer_inputs(T=30, N=24)
    with pytest.raises(ValueError, match="30 tokens, more than N = 24.*'E'"):
        attn(**x, form="recurrent")
