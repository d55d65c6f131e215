"""Specs that use the cross-head, cross-token, memory and position constructs through the
public call: the reference interpreter runs them (form='auto' too), kernel forms refuse them
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
    attn = linforge.library.get("modular_linearized")
    with pytest.raises(NotImplementedError, match="reference interpreter only.*memory inputs"):
        attn(form="recurrent")


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
    assert info["memory"] == {"k": ["K"], "v": ["V"]} and info["kernel_blockers"]
    assert info["auto_form"].startswith("reference (no kernel lowers memory inputs")
    lin = linforge.library.get("linformer").info()
    assert lin["position_indexed_params"] and any("position" in b
                                                  for b in lin["kernel_blockers"])
