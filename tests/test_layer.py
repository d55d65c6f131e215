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


def _shifted_sum_conv(v, weight, offsets):
    """Depthwise convolution by explicit shifts: out[t] = sum_j w[j] v[t + offsets[j]] (zero
    outside), v [B, T, H, V], weight [V, taps] (independent of torch's conv)."""
    out = torch.zeros_like(v)
    T = v.shape[1]
    for j, d in enumerate(offsets):
        lo, hi = max(0, -d), min(T, T - d)
        out[:, lo:hi] += weight[:, j] * v[:, lo + d:hi + d]
    return out


def _layer_parts(layer, x):
    """What the layer adds the value branch to: the op's output and v."""
    feats = layer.inputs(x)[0]
    params = {n: layer.spec_param(n) for n in layer.program.params}
    o, _ = layer.attn(**feats, **params, form="reference")
    return o.float(), feats["v"]


def test_value_conv_1d_causal_and_centred():
    torch.manual_seed(4)
    x = torch.randn(2, 9, 32)
    for name, offsets in (("gla", [-2, -1, 0]), ("efficientvit", [-1, 0, 1])):
        layer = LinearAttention(name, 32, 2, value_conv=3)
        o, v = _layer_parts(layer, x)
        w = layer.value_conv.weight[:, 0]                      # [V, taps]
        expected = o + _shifted_sum_conv(v, w, offsets) + layer.value_conv.bias
        want = layer.o_proj(layer._output(expected, x))
        assert _rel(layer(x)[0], want) < 1e-5, name


def test_value_conv_2d_over_image_tokens_is_slabs_default():
    torch.manual_seed(5)
    layer = LinearAttention("slab", 32, 2, image_size=(3, 4))
    assert layer.value_conv.kernel_size == (5, 5)
    x = torch.randn(2, 12, 32)
    o, v = _layer_parts(layer, x)
    w = layer.value_conv.weight[:, 0]                           # [V, 5, 5]
    img = v.reshape(2, 3, 4, 2, -1)                             # [B, h, w, H, V]
    conv = torch.zeros_like(img)
    for di in range(-2, 3):
        for dj in range(-2, 3):
            for i in range(3):
                for j in range(4):
                    if 0 <= i + di < 3 and 0 <= j + dj < 4:
                        conv[:, i, j] += w[:, di + 2, dj + 2] * img[:, i + di, j + dj]
    expected = o + conv.reshape(2, 12, 2, -1) + layer.value_conv.bias
    assert _rel(layer(x)[0], layer.o_proj(layer._output(expected, x))) < 1e-5
    with pytest.raises(ValueError, match="image_size 3 x 4 = 12 tokens, but the sequence has 10"):
        layer(torch.randn(1, 10, 32))
