"""The layer around each library spec: what ``linforge.nn.LinearAttention`` builds for it.

A spec is one head's recurrence; a model's layer adds what its paper puts around it: how
each per-token input is computed from the hidden states (a linear or low-rank projection, a
short causal convolution, an activation, a gate with its own learned tensors), how the spec's
per-head params are stored and initialised (Mamba-2 keeps ``A_log`` and passes
``A = -exp(A_log)``), and the output norm and gate. This file declares that per model, as
data (``LAYERS``); the layer in ``linforge/nn.py`` interprets it and holds no per-model code.

Entries name the paper (or the authors' code, as fla ports it) they follow and list in
``notes`` what is simplified. A spec without an entry gets ``default_layer``: one bias-free
linear projection per input, params drawn from N(0, 0.02), no output norm or gate.

Shapes seen by an activation: the projected input ``[B, T, H, *dims]``; a per-head tensor
``[H, 1, ...]`` and a per-channel one ``[H, *dims]``, so that both broadcast against it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["Feature", "LayerParam", "Output", "Layer", "LAYERS", "default_layer", "layer_for"]

log = logging.getLogger("linforge.layers")

Init = Callable[[tuple], torch.Tensor]   # shape -> initial value


# ---------------------------------------------------------------------- initialisers
def normal(std: float = 0.02) -> Init:
    """N(0, std^2)."""
    return lambda shape: torch.randn(shape) * std


def zeros(shape: tuple) -> torch.Tensor:
    """All zeros."""
    return torch.zeros(shape)


def ones(shape: tuple) -> torch.Tensor:
    """All ones."""
    return torch.ones(shape)


def const(value: float) -> Init:
    """Every element ``value``."""
    return lambda shape: torch.full(shape, float(value))


def log_uniform(low: float, high: float) -> Init:
    """``log(U(low, high))``: Mamba-2's ``A_log`` with A ~ U(1, 16)."""
    return lambda shape: torch.log(torch.empty(shape).uniform_(low, high))


def inverse_softplus_dt(dt_min: float = 1e-3, dt_max: float = 1e-1,
                        floor: float = 1e-4) -> Init:
    """Mamba's ``dt_bias``: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``."""
    def init(shape):
        dt = torch.exp(torch.rand(shape) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        return dt + torch.log(-torch.expm1(-dt))
    return init


def s4d_real_log(shape: tuple) -> torch.Tensor:
    """S4D-Real ``A_n = -(n + 1)`` over the state dim (the second dim of ``[H, K, ...]``),
    stored as ``log(n + 1)``."""
    n = torch.arange(1, shape[1] + 1, dtype=torch.float32)
    return torch.log(n).view(1, -1, *([1] * (len(shape) - 2))).expand(shape).clone()


def rwkv_decay_speed(shape: tuple) -> torch.Tensor:
    """RWKV-5/6 ``time_decay`` per channel n of ``[H, K]``: ``-6 + 5 (n / (K - 1)) ** 1.35``
    (the reference code's ``0.7 + 1.3 * ratio_0_to_1`` exponent at mid depth), so the decay
    ``exp(-exp(.))`` runs from about 1 (slow) to 0.07 (fast) across channels."""
    K = shape[-1]
    n = torch.arange(K, dtype=torch.float32) / max(K - 1, 1)
    return (-6 + 5 * n ** 1.35).expand(shape).clone()


def rwkv_bonus(shape: tuple) -> torch.Tensor:
    """RWKV-5/6 ``time_faaaa`` (the bonus u): ``0.5 (1 - n / (K - 1)) + ((n + 1) % 3 - 1) 0.1``
    (the reference code at mid depth)."""
    K = shape[-1]
    n = torch.arange(K, dtype=torch.float32)
    return (0.5 * (1 - n / max(K - 1, 1)) + ((n + 1) % 3 - 1) * 0.1).expand(shape).clone()


def alibi_decay(shape: tuple) -> torch.Tensor:
    """TransNormerLLM / Lightning per-head decay ``exp(-2 ** (-8 (h + 1) / H))``."""
    H = shape[0]
    h = torch.arange(H, dtype=torch.float32)
    return torch.exp(-(2.0 ** (-8 * (h + 1) / H))).view(shape)


def linspace_heads(low: float, high: float) -> Init:
    """One value per head, evenly from ``low`` to ``high`` (xLSTM's forget gate bias)."""
    return lambda shape: torch.linspace(low, high, shape[0]).view(shape)


def uniform_fan_in(shape: tuple) -> torch.Tensor:
    """U(-1/sqrt(n), 1/sqrt(n)) with n = shape[1] (nn.Linear's default over that dim)."""
    bound = 1 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound)


# ---------------------------------------------------------------------- activations
def neg_exp(x: torch.Tensor) -> torch.Tensor:
    """``-exp(x)``: Mamba's ``A = -exp(A_log)``, RWKV-6's log decay ``-exp(w)``."""
    return -torch.exp(x)


def gla_gate(x: torch.Tensor) -> torch.Tensor:
    """GLA's log decay ``logsigmoid(x) / 16`` (the gate temperature tau = 16)."""
    return F.logsigmoid(x) / 16


def mamba_decay(x: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The log decay ``-exp(A_log) softplus(x + dt_bias)`` of Gated DeltaNet and KDA."""
    return -torch.exp(A_log) * F.softplus(x + dt_bias)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` over the last dim (eps 1e-6 inside the sqrt)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def rwkv7_decay(x: torch.Tensor) -> torch.Tensor:
    """RWKV-7's log decay ``-exp(-0.5) sigmoid(x)``."""
    return -math.exp(-0.5) * torch.sigmoid(x)


def rwkv7_a(k: torch.Tensor, k_k: torch.Tensor) -> torch.Tensor:
    """RWKV-7 ``a = -kappa_hat``, ``kappa_hat = l2norm(k * k_k)``."""
    return -l2norm(k * k_k)


def rwkv7_b(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """RWKV-7 ``b = kappa_hat * a_in``, ``a_in = sigmoid(x)``, ``kappa_hat = -a``."""
    return -a * torch.sigmoid(x)


# ---------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class LayerParam:
    """A learned tensor of the layer: a spec param (``[H, *dims]``) or one an activation reads.

    ``store`` names the stored tensor when it differs from what the spec receives, and
    ``to_spec`` maps the stored value to the spec's (``A_log`` -> ``A = -exp(A_log)``).
    ``per_head`` (activation tensors only): ``[H]`` instead of ``[H, *dims]``.
    ``trainable=False`` makes it a buffer (Performer's random features).
    """

    init: Init = normal()
    store: str | None = None
    to_spec: Callable[[torch.Tensor], torch.Tensor] | None = None
    per_head: bool = False
    trainable: bool = True


@dataclass(frozen=True)
class Feature:
    """How the layer computes one per-token input of the spec from the hidden states.

    The projection maps ``[B, T, D]`` to ``H * prod(dims)`` features (``prod(dims)`` with
    ``shared``: one projection broadcast to every head, as Mamba-2's B and C with one group);
    ``rank`` makes it low-rank (``D -> rank -> ...``, with ``rank_act`` between; an int, or a
    dim name such as ``"V"`` for the head size); ``conv`` a causal depthwise convolution of
    that many taps over the projected features (fla's ShortConvolution, before ``act``).
    ``act(x, **uses, **params)`` gives the spec's input: ``uses`` are earlier inputs by name
    (after their own activation), ``params`` the feature's own learned tensors. With
    ``project=False`` there is no projection and ``act`` reads only ``uses`` and ``params``.
    ``float32`` keeps the value in fp32 whatever the layer's dtype (decays and gates).
    """

    act: Callable | None = None
    rank: int | str | None = None
    rank_act: Callable | None = None
    bias: bool = False
    bias_init: Init | None = None
    conv: int = 0
    shared: bool = False
    project: bool = True
    uses: tuple[str, ...] = ()
    params: Mapping[str, LayerParam] = field(default_factory=dict)
    float32: bool = False


@dataclass(frozen=True)
class Output:
    """After the spec: a norm of each head's output (``"rms"``, ``"layer"`` or None; over
    all heads at once with ``across_heads``), an output gate ``gate(proj(x))`` (None: no
    gate; ``gate_rank``: low-rank gate projection), applied after the norm or, with
    ``gate_first``, before it (Mamba-2)."""

    norm: str | None = None
    gate: Callable | None = None
    gate_rank: int | str | None = None
    gate_first: bool = False
    across_heads: bool = False


@dataclass(frozen=True)
class Layer:
    """A model's layer around its spec.

    ``inputs`` has one ``Feature`` per spec input, in the order they are computed;
    ``params`` a ``LayerParam`` per spec param; ``expand_k`` and ``expand_v`` give the
    default head sizes (``hidden_size * expand // num_heads``); ``dims`` default sizes of
    dims that no tensor sizes (a function of the known sizes ``{"K": .., "V": ..}``);
    ``value_conv`` adds a depthwise convolution of that many taps of ``v`` to the output
    (SLAB, FLatten: over the image for image tokens, over tokens otherwise);
    ``token_shift`` mixes each input's hidden state with the previous token's
    (``x + mu (x_prev - x)``, a learned ``mu`` per input and channel: RWKV's time mix).
    """

    paper: str
    inputs: Mapping[str, Feature]
    params: Mapping[str, LayerParam] = field(default_factory=dict)
    output: Output = Output()
    expand_k: float = 1.0
    expand_v: float = 1.0
    dims: Mapping[str, Callable[[dict], int]] = field(default_factory=dict)
    token_shift: bool = False
    value_conv: int | None = None
    notes: str = ""


_CONV_SILU = Feature(act=F.silu, conv=4)          # fla's q, k, v path for the delta rules
_PLAIN = Feature()
_QKV = {"q": _PLAIN, "k": _PLAIN, "v": _PLAIN}
_MAMBA_DECAY = {"A_log": LayerParam(log_uniform(1, 16), per_head=True),
                "dt_bias": LayerParam(inverse_softplus_dt(), per_head=True)}

LAYERS: dict[str, Layer] = {
    "gla": Layer(
        paper="Yang et al. 2024, GLA, sec. 4.4: alpha = sigmoid(x W1 W2 + b) ** (1/16), "
              "rank-16 gate; swish output gate after a per-head RMSNorm",
        inputs={"q": _PLAIN, "k": _PLAIN, "v": _PLAIN,
                "g": Feature(act=gla_gate, rank=16, bias=True, float32=True)},
        output=Output(norm="rms", gate=F.silu), expand_k=0.5),
    "gated_deltanet": Layer(
        paper="Yang et al. 2024, Gated DeltaNet (fla layer): short conv + SiLU on q, k, v; "
              "alpha = exp(-exp(A_log) softplus(a + dt_bias)) as Mamba-2; beta = sigmoid",
        inputs={"q": _CONV_SILU, "k": _CONV_SILU, "v": _CONV_SILU,
                "g": Feature(act=mamba_decay, params=_MAMBA_DECAY, float32=True),
                "beta": Feature(act=torch.sigmoid, float32=True)},
        output=Output(norm="rms", gate=F.silu), expand_k=0.75, expand_v=1.5),
    "deltanet": Layer(
        paper="Yang et al. 2024, parallel DeltaNet (fla layer): short conv + SiLU on q, k, v;"
              " beta = sigmoid; per-head RMSNorm output",
        inputs={"q": _CONV_SILU, "k": _CONV_SILU, "v": _CONV_SILU,
                "beta": Feature(act=torch.sigmoid, float32=True)},
        output=Output(norm="rms")),
    "kda": Layer(
        paper="Kimi Linear 2025, KDA (fla layer): short conv + SiLU on q, k, v; g from a "
              "rank-V projection through -exp(A_log) softplus(g + dt_bias); beta = sigmoid;"
              " sigmoid output gate (rank V) after a per-head RMSNorm",
        inputs={"q": _CONV_SILU, "k": _CONV_SILU, "v": _CONV_SILU,
                "g": Feature(act=mamba_decay, rank="V", float32=True, params={
                    "A_log": LayerParam(log_uniform(1, 16), per_head=True),
                    "dt_bias": LayerParam(zeros)}),
                "beta": Feature(act=torch.sigmoid, float32=True)},
        output=Output(norm="rms", gate=torch.sigmoid, gate_rank="V")),
    "mamba2": Layer(
        paper="Dao, Gu 2024, Mamba-2: conv + SiLU on x, B, C; B and C shared by all heads "
              "(one group); A = -exp(A_log), A ~ U(1, 16); D = 1; dt_bias = softplus^-1 of "
              "log-uniform [1e-3, 1e-1]; y = RMSNorm(y * silu(z)) over all heads",
        inputs={"x": _CONV_SILU, "B": Feature(act=F.silu, conv=4, shared=True),
                "C": Feature(act=F.silu, conv=4, shared=True),
                "dt": Feature(float32=True)},
        params={"A": LayerParam(log_uniform(1, 16), store="A_log", to_spec=neg_exp),
                "D": LayerParam(ones), "dt_bias": LayerParam(inverse_softplus_dt())},
        output=Output(norm="rms", gate=F.silu, gate_first=True, across_heads=True),
        expand_v=2.0, dims={}),
    "mamba": Layer(
        paper="Gu, Dao 2023, Mamba: conv + SiLU on x; dt low-rank (rank ceil(D/16)); "
              "S4D-Real A = -exp(A_log), A_log = log(n + 1); D = 1; dt_bias as Mamba; "
              "output y * silu(z)",
        inputs={"x": _CONV_SILU, "B": _PLAIN, "C": _PLAIN,
                "dt": Feature(rank=16, float32=True)},
        params={"A": LayerParam(s4d_real_log, store="A_log", to_spec=neg_exp),
                "D": LayerParam(ones), "dt_bias": LayerParam(inverse_softplus_dt())},
        output=Output(gate=F.silu), expand_v=2.0,
        notes="B, C and dt project the hidden state, not the conv output as in the paper; "
              "the dt rank is 16, not ceil(D / 16)"),
    "rwkv6": Layer(
        paper="Peng et al. 2024, Finch: token shift; w = -exp(time_decay + tanh(x W1) W2) "
              "(rank 64); bonus u (time_faaaa); per-head GroupNorm times silu(g)",
        inputs={"r": _PLAIN, "k": _PLAIN, "v": _PLAIN,
                "w": Feature(act=neg_exp, rank=64, rank_act=torch.tanh, bias=True,
                             bias_init=rwkv_decay_speed, float32=True)},
        params={"u": LayerParam(rwkv_bonus)},
        output=Output(norm="layer", gate=F.silu), token_shift=True,
        notes="the token shift mixes with a static learned mu per input (Eagle's), not "
              "Finch's data-dependent ddlerp"),
    "rwkv5": Layer(
        paper="Peng et al. 2024, Eagle: token shift; w = exp(-exp(omega)) per channel; "
              "bonus u; per-head GroupNorm times silu(g)",
        inputs={"r": _PLAIN, "k": _PLAIN, "v": _PLAIN},
        params={"omega": LayerParam(rwkv_decay_speed), "u": LayerParam(rwkv_bonus)},
        output=Output(norm="layer", gate=F.silu), token_shift=True),
    "rwkv7": Layer(
        paper="Peng et al. 2025, Goose: token shift; w = -exp(-0.5) sigmoid(w0 + tanh(x W1) "
              "W2); a = -kappa_hat, b = kappa_hat * sigmoid(a0 + x A1 A2), kappa_hat = "
              "l2norm(k * k_k); per-head GroupNorm times the output gate",
        inputs={"r": _PLAIN, "k": _PLAIN, "v": _PLAIN,
                "w": Feature(act=rwkv7_decay, rank=64, rank_act=torch.tanh, bias=True,
                             float32=True),
                "a": Feature(act=rwkv7_a, project=False, uses=("k",),
                             params={"k_k": LayerParam(const(0.85))}),
                "b": Feature(act=rwkv7_b, rank=64, bias=True, bias_init=zeros,
                             uses=("a",))},
        output=Output(norm="layer", gate=torch.sigmoid, gate_rank=64), token_shift=True,
        notes="no value residual, no k replacement by a_in, no bonus r_k after the norm "
              "(the spec's header leaves them to the layer; this layer omits them)"),
    "hgrn2": Layer(
        paper="Qin et al. 2024, HGRN2: forget gate f = sigmoid(.) as g = logsigmoid; "
              "output gate q = silu; per-head RMSNorm",
        inputs={"q": Feature(act=F.silu), "v": _PLAIN,
                "g": Feature(act=F.logsigmoid, float32=True)},
        output=Output(norm="rms"),
        notes="no lower bound on the forget gate (the paper's rises with depth)"),
    "retnet": Layer(
        paper="Sun et al. 2023, RetNet: value dim 2x; per-head GroupNorm times swish(g)",
        inputs=_QKV, output=Output(norm="layer", gate=F.silu), expand_v=2.0),
    "mlstm": Layer(
        paper="Beck et al. 2024, xLSTM mLSTM block: causal conv 4 + SiLU on q, k; input "
              "gate bias ~ N(0, 0.1); forget gate bias linspace(3, 6) over heads; per-head "
              "LayerNorm times silu(z)",
        inputs={"q": Feature(act=F.silu, conv=4), "k": Feature(act=F.silu, conv=4),
                "v": _PLAIN,
                "i": Feature(bias=True, bias_init=normal(0.1), float32=True),
                "f": Feature(bias=True, bias_init=linspace_heads(3.0, 6.0), float32=True)},
        output=Output(norm="layer", gate=F.silu)),
    "linear_attention": Layer(
        paper="Katharopoulos et al. 2020: linear q, k, v (elu + 1 is in the spec)",
        inputs=_QKV),
    "performer": Layer(
        paper="Choromanski et al. 2021, FAVOR+: W random N(0, I) features, not trained "
              "(the paper redraws them); M = K random features",
        inputs=_QKV, params={"W": LayerParam(normal(1.0), trainable=False)},
        dims={"M": lambda s: s["K"]}),
    "gated_rfa": Layer(
        paper="Peng et al. 2021, RFA: q, k l2-normalised; W random N(0, I), not trained; "
              "gate logit with a bias; M = K random features",
        inputs={"q": Feature(act=l2norm), "k": Feature(act=l2norm), "v": _PLAIN,
                "g": Feature(bias=True, float32=True)},
        params={"W": LayerParam(normal(1.0), trainable=False)},
        dims={"M": lambda s: s["K"]}),
    "based": Layer(
        paper="Arora et al. 2024, Based: small feature dim (K = 16 with the Taylor map)",
        inputs=_QKV, expand_k=0.25),
    "cosformer": Layer(
        paper="Qin et al. 2022, cosFormer: linear q, k, v; the horizon M a buffer at 1024 "
              "(set it to at least the sequence length)",
        inputs=_QKV, params={"M": LayerParam(const(1024.0), trainable=False)}),
    "lightning_attention": Layer(
        paper="Qin et al. 2024, TransNormerLLM / Lightning-2: ALiBi-like per-head decay "
              "exp(-2^(-8 (h + 1) / H)), fixed; per-head RMSNorm times silu(g)",
        inputs=_QKV, params={"lam": LayerParam(alibi_decay, trainable=False)},
        output=Output(norm="rms", gate=F.silu),
        notes="the decay does not depend on the layer index (the layer cannot see it)"),
    "s4d": Layer(
        paper="Gu et al. 2022, S4D-Real: A = -exp(A_log), A_n = -(n + 1); B = 1; C ~ N(0, "
              "1); D = 1; log_dt log-uniform [1e-3, 1e-1]",
        inputs={"u": _PLAIN},
        params={"A": LayerParam(s4d_real_log, store="A_log", to_spec=neg_exp),
                "B": LayerParam(ones), "C": LayerParam(normal(1.0)), "D": LayerParam(ones),
                "log_dt": LayerParam(lambda s: torch.log(torch.empty(s).uniform_(1e-3, 1e-1)))}),
    "efficientvit": Layer(paper="Cai et al. 2023, EfficientViT: linear q, k, v", inputs=_QKV),
    "flatten": Layer(paper="Han et al. 2023, FLatten: linear q, k, v", inputs=_QKV,
                     notes="no depthwise-conv branch on V, no learned divisor"),
    "slab": Layer(paper="Guo et al. 2024, SLAB: linear q, k, v, a 5 x 5 depthwise "
                        "convolution of v added to the output", inputs=_QKV, value_conv=5,
                  notes="no positional encoding on K"),
    "linrec": Layer(paper="Liu et al. 2023, LinRec: linear q, k, v", inputs=_QKV),
    "agent_attention": Layer(
        paper="Han et al. 2024, Agent Attention: M = 16 learned agents A[M, K] per head",
        inputs=_QKV, params={"A": LayerParam(normal(1.0))}, dims={"M": lambda s: 16},
        notes="agents are learned params, not pooled from Q; no agent biases, no DWC"),
    "mobile_attention": Layer(
        paper="Yao et al. 2024, Mobile Attention: linear q, k, v (sigmoid maps are in the "
              "spec)", inputs=_QKV),
    "linformer": Layer(
        paper="Wang et al. 2020, Linformer: E, F [N, P] per head initialised as the authors' "
              "nn.Linear(N, P) (U(+-1/sqrt(N))); N = 512 positions, P = 64 rows",
        inputs=_QKV,
        params={"E": LayerParam(uniform_fan_in), "F": LayerParam(uniform_fan_in)},
        dims={"N": lambda s: 512, "P": lambda s: 64}),
}


def default_layer(attn) -> Layer:
    """The layer of a spec not in ``LAYERS``: a bias-free linear projection per input, params
    from N(0, 0.02), no output norm or gate."""
    p = attn.program
    return Layer(paper="(not in the library: default layer)",
                 inputs={n: Feature() for n in p.inputs},
                 params={n: LayerParam() for n in p.params})


def layer_for(attn) -> Layer:
    """The declared layer for ``attn``'s spec, when it has one and the entry's inputs and
    params are the spec's; ``default_layer`` otherwise."""
    entry = LAYERS.get(attn.name)
    p = attn.program
    if entry is None:
        return default_layer(attn)
    if set(entry.inputs) != set(p.inputs) or set(entry.params) != set(p.params):
        log.warning("spec '%s' is not the library's (inputs %s, params %s; the library layer "
                    "has %s, %s): using the default layer", attn.name, list(p.inputs),
                    list(p.params), list(entry.inputs), list(entry.params))
        return default_layer(attn)
    return entry
