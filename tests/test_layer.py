"""``linforge.nn.LinearAttention``: the layer around a spec. Its recurrence equals the
float64 reference interpreter under the same weights, generation (prefill, then one-token
decode steps carrying the cache) equals the full forward, ``torch.compile`` traces it
without graph breaks and gives eager's outputs and gradients, errors are clear."""

import pytest
import torch

from linforge.nn import LayerCache, LinearAttention

CAUSAL = ["gla", "retnet", "mamba2", "deltanet", "gated_deltanet", "rwkv6", "hgrn2", "rwkv7",
          "linear_attention", "mlstm"]


def _pair(name, **kw):
    """A kernel layer and a reference-interpreter layer with the same weights."""
    torch.manual_seed(0)
    layer = LinearAttention(name, 32, 2, **kw)
    ref = LinearAttention(name, 32, 2, form="reference", **kw)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CAUSAL + ["efficientvit", "slab"])
def test_layer_equals_its_spec_in_the_reference_interpreter(name):
    layer, ref = _pair(name)
    x = torch.randn(2, 12, 32)
    out, cache = layer(x)
    assert out.shape == (2, 12, 32) and cache is None
    assert _rel(out, ref(x)[0]) < 1e-5
    out.square().mean().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]


@pytest.mark.parametrize("name", ["gla", "retnet", "mamba2", "gated_deltanet", "rwkv6",
                                  "deltanet", "rwkv7"])
def test_prefill_then_decode_steps_equal_the_full_forward(name):
    torch.manual_seed(1)
    layer = LinearAttention(name, 32, 2)
    x = torch.randn(2, 11, 32)
    full, _ = layer(x)
    out, cache = layer(x[:, :7], use_cache=True)
    assert isinstance(cache, LayerCache)
    outs = [out]
    for t in range(7, 11):
        out, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        outs.append(out)
    assert _rel(torch.cat(outs, 1), full) < 1e-5


def test_paper_recipes_shape_the_per_token_inputs():
    """GLA: gate = logsigmoid(low-rank projection) / 16; DeltaNet: beta = sigmoid(proj);
    Mamba-2: A = -exp(A_log) with A_log a parameter, dt through its bias."""
    torch.manual_seed(2)
    x = torch.randn(1, 5, 32)
    gla = LinearAttention("gla", 32, 2)
    g = gla.inputs(x)[0]["g"]
    raw = gla.proj["g"](x).view(1, 5, 2, -1)
    assert torch.allclose(g, torch.nn.functional.logsigmoid(raw) / 16, atol=1e-6)
    dn = LinearAttention("deltanet", 32, 2)
    beta = dn.inputs(x)[0]["beta"]
    assert torch.allclose(beta, torch.sigmoid(dn.proj["beta"](x).view(1, 5, 2)), atol=1e-6)
    m2 = LinearAttention("mamba2", 32, 2)
    assert "A_log" in dict(m2.named_parameters()) or any("A_log" in n for n, _ in
                                                         m2.named_parameters())
    A = m2.spec_param("A")
    assert (A < 0).all()


def test_torch_compile_traces_the_layer_without_graph_breaks_and_matches_eager():
    torch.manual_seed(3)
    layer = LinearAttention("gla", 32, 2)
    x = torch.randn(2, 12, 32)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(layer)
    out_c, _ = compiled(x)
    out_c.square().mean().backward()
    grads_c = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    out_e, _ = layer(x)
    out_e.square().mean().backward()
    assert _rel(out_c, out_e) < 1e-5
    for n, p in layer.named_parameters():
        assert _rel(grads_c[n], p.grad) < 1e-4, n


def test_clear_errors():
    layer = LinearAttention("retnet", 32, 2)
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, 32\]"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="neither a library spec"):
        LinearAttention("not_a_model", 32, 2)
    vit = LinearAttention("efficientvit", 32, 2)
    with pytest.raises(ValueError, match="noncausal"):
        vit(torch.randn(1, 5, 32), use_cache=True)
    with pytest.raises(ValueError, match="past_key_values must be the LayerCache"):
        layer(torch.randn(1, 1, 32), past_key_values={"S": 0})
