"""Specs that use the cross-head, cross-token, memory and position constructs through the
public call: cross-attention runs the generated noncausal form, form='auto' too
(tests/codegen/test_memory.py checks it in depth); kernel forms refuse what no kernel lowers
with the construct named."""

import pytest
import torch

import linforge


def test_cross_attention_through_the_public_call_with_varlen_memory():
    attn = linforge.library.get("modular_linearized")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 2, 4, generator=g)
    k, v = torch.randn(1, 13, 2, 4, generator=g), torch.randn(1, 13, 2, 3, generator=g)
    cu, cu_m = torch.tensor([0, 4, 9]), torch.tensor([0, 6, 13])
    o, _ = attn(q=q, k=k, v=v, cu_seqlens=cu, cu_seqlens_memory=cu_m)
    ref, _ = attn.reference(q=q, k=k, v=v, cu_seqlens=cu, cu_seqlens_memory=cu_m)
    assert o.shape == (1, 9, 2, 3) and torch.allclose(o.double(), ref, atol=1e-6)
    # each query sequence reads only its own memory sequence
    alone, _ = attn.reference(q=q[:, :4], k=k[:, :6], v=v[:, :6])
    assert torch.allclose(ref[:, :4], alone, atol=1e-12)


def test_kernel_forms_name_the_construct_that_blocks_them():
    # a position-indexed param over a memory: the pre-pass does not lift memory specs
    attn = linforge.compile("""attention x noncausal
    dim N
    inputs q[K]
    memory k[K], v[V]
    params E[t < N, K]
    state S[K, V]
    S = S + outer(k * E, v)
    o = q @ S
""")
    with pytest.raises(NotImplementedError, match="reference interpreter only.*position-indexed"):
        attn(form="parallel")
    with pytest.raises(ValueError, match="does not support form='recurrent'.*supports: parallel"):
        linforge.library.get("modular_linearized")(form="recurrent")


def test_a_form_the_prepassed_spec_lacks_names_the_forms_it_has():
    attn = linforge.library.get("linformer")   # general readout after the pre-pass
    with pytest.raises(ValueError, match="does not support form='chunk'.*supports: recurrent"):
        attn(form="chunk")


def test_missing_memory_input_is_a_clear_error():
    attn = linforge.library.get("modular_linearized")
    with pytest.raises(ValueError, match="missing argument.*memory inputs k, v"):
        attn(q=torch.randn(1, 3, 1, 4))


def test_info_lists_memory_inputs_position_params_and_blockers():
    info = linforge.library.get("modular_linearized").info()
    assert info["memory"] == {"k": ["K"], "v": ["V"]} and not info["kernel_blockers"]
    assert info["auto_form"].startswith("parallel (noncausal: two GEMM stages)")
    lin = linforge.library.get("linformer").info()
    assert lin["position_indexed_params"] and any("position" in b
                                                  for b in lin["kernel_blockers"])
