"""``torch.nn`` layers around a compiled spec: ``LinearAttention``.

The layer owns what a model puts around its recurrence: the projections of the hidden
states to every per-token input of the spec, their convolutions, activations and gates,
the spec's per-head params, an output norm and gate and the output projection. What each
library model uses is declared in ``library/layers.py`` (``LAYERS``); this module only
interprets those declarations. The recurrence runs through ``codegen.torch_op.TorchOp``
(custom ops, so ``torch.compile`` traces the layer without graph breaks).

Generation carries a ``LayerCache`` (the spec's states, the last tokens each short
convolution reads, the last hidden state of a token shift): ``use_cache=True`` returns it,
``past_key_values=`` continues from it, and a one-token call runs the decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn as tnn

from .api import Attention, compile as compile_spec
from .codegen.torch_op import TorchOp
from .ir.nodes import Op
from .library import layers as layer_table
from .library import names as library_names
from .library import get as library_get

__all__ = ["LinearAttention", "LayerCache", "reads_position"]


@dataclass
class LayerCache:
    """What a ``LinearAttention`` layer carries from one call to the next, per sequence:
    ``state`` the spec's states ``{name: [N, H, *dims]}``; ``conv`` the last ``W - 1``
    projected tokens of each input with a short convolution ``{input: [N, W - 1, C]}``;
    ``shift`` the last hidden state ``[N, 1, D]`` (token shift), or None."""

    state: dict[str, torch.Tensor]
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    shift: torch.Tensor | None = None


class _Fn(tnn.Module):
    """An activation function as a module (between the two halves of a low-rank projection)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _projection(d_in: int, d_out: int, rank: int | None, bias: bool, rank_act) -> tnn.Module:
    if rank is None:
        return tnn.Linear(d_in, d_out, bias=bias)
    mid = [_Fn(rank_act)] if rank_act is not None else []
    return tnn.Sequential(tnn.Linear(d_in, rank, bias=False), *mid,
                          tnn.Linear(rank, d_out, bias=bias))


def _last_linear(proj: tnn.Module) -> tnn.Linear:
    return proj[-1] if isinstance(proj, tnn.Sequential) else proj


def _resolve_spec(spec) -> Attention:
    if isinstance(spec, Attention):
        return spec
    if isinstance(spec, Path):
        return compile_spec(spec)
    if isinstance(spec, str):
        if "\n" not in spec and spec in library_names():
            return library_get(spec)
        if "\n" not in spec and not spec.endswith(".lin"):
            raise ValueError(f"{spec!r} is neither a library spec (library: "
                             f"{', '.join(library_names())}), a .lin path nor spec text")
        return compile_spec(spec)
    raise TypeError(f"spec must be a library name, spec text, a .lin path or a compiled "
                    f"Attention, got {type(spec).__name__}")


def reads_position(program) -> bool:
    """True when the spec reads the token position ``t`` (cosFormer): the decode step and a
    continued prefill restart ``t`` at 0, so such specs cannot carry a cache."""
    nodes = [program.output, *(u.value for u in program.updates)]
    return any(n.op is Op.POS for root in nodes for n in root.walk())


def _token_index(B: int, T: int, cu_seqlens, device):
    """For the B*T flattened tokens: the sequence each belongs to, its position in it, the
    first token of each sequence and each sequence's length."""
    if cu_seqlens is None:
        seq = torch.arange(B, device=device).repeat_interleave(T)
        pos = torch.arange(T, device=device).repeat(B)
        starts = torch.arange(B, device=device) * T
        lens = torch.full((B,), T, device=device)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        starts, lens = cu[:-1], cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(len(lens), device=device), lens,
                                      output_size=T)
        pos = torch.arange(T, device=device) - starts[seq]
    return seq, pos, starts, lens


def _with_history(y: torch.Tensor, width: int, index, cache: torch.Tensor | None,
                  want_state: bool):
    """The ``width - 1`` tokens before each token (from ``cache`` before the first):
    returns ``[prev_1, ..., prev_{width-1}]`` (each ``[B, T, C]``) and the new cache
    ``[N, width - 1, C]`` (the last ``width - 1`` tokens of each sequence) or None."""
    seq, pos, starts, lens = index
    B, T, C = y.shape
    N, W1 = len(starts), width - 1
    flat = y.reshape(B * T, C)
    past = (cache.reshape(N * W1, C).to(y.dtype) if cache is not None
            else y.new_zeros(N * W1, C))
    ext = torch.cat([past, flat], 0)          # [N * (W-1) + B * T, C]
    token = torch.arange(B * T, device=y.device)
    prevs = []
    for s in range(1, width):
        idx = torch.where(pos >= s, N * W1 + token - s, seq * W1 + W1 - (s - pos))
        prevs.append(ext[idx].view(B, T, C))
    state = None
    if want_state:
        j = torch.arange(W1, 0, -1, device=y.device)               # W-1 .. 1 tokens back
        at = lens[:, None] - j[None, :]                            # [N, W-1] positions
        n = torch.arange(N, device=y.device)[:, None]
        idx = torch.where(at >= 0, N * W1 + starts[:, None] + at, n * W1 + W1 + at)
        state = ext[idx]                                           # [N, W-1, C]
    return prevs, state


class LinearAttention(tnn.Module):
    """A linear-attention layer around a spec: ``[B, T, hidden_size] -> [B, T, hidden_size]``.

    ``spec``: a library name, spec text, a ``.lin`` path or a compiled ``Attention``.
    Library specs get their paper's layer (``library/layers.py``); other specs the default
    layer (a linear projection per input, params from N(0, 0.02), no output norm or gate);
    ``layer=`` passes a ``library.layers.Layer`` of your own. ``head_dim_k`` and
    ``head_dim_v`` size the spec's ``K`` and ``V`` (default ``hidden_size * expand //
    num_heads`` with the layer's ``expand_k``/``expand_v``); ``dims`` sizes other dims the
    tensors do not (``{"M": 32}``). ``form`` is passed to the op (``"auto"`` by default).
    ``value_conv`` (default: the layer recipe's, 5 for SLAB) adds a depthwise convolution
    of ``v`` with that many taps to the output, its weights shared by the heads: 2D over the
    image when ``image_size=(height, width)`` is given (tokens in row-major order), else 1D
    over the tokens (centred for noncausal specs, causal otherwise).
    """

    def __init__(self, spec, hidden_size: int, num_heads: int, head_dim_k: int | None = None,
                 head_dim_v: int | None = None, *, dims: dict[str, int] | None = None,
                 layer: layer_table.Layer | None = None, form: str = "auto",
                 norm_eps: float = 1e-5, value_conv: int | None = None,
                 image_size: tuple[int, int] | None = None):
        super().__init__()
        attn = _resolve_spec(spec)
        p = attn.program
        if p.memory:
            raise NotImplementedError(
                f"spec '{attn.name}' reads memory inputs ({', '.join(p.memory)}): "
                "LinearAttention builds self-attention layers; call the Attention directly")
        if hidden_size <= 0 or num_heads <= 0:
            raise ValueError(f"hidden_size and num_heads must be positive, got {hidden_size} "
                             f"and {num_heads}")
        self.attn, self.program = attn, p
        self.recipe = layer if layer is not None else layer_table.layer_for(attn)
        self._check_recipe()
        self.hidden_size, self.num_heads, self.form, self.eps = (hidden_size, num_heads, form,
                                                                 norm_eps)
        self.sizes = self._sizes(head_dim_k, head_dim_v, dims or {})
        self.op = TorchOp(attn)
        self._reads_t = reads_position(p)
        H, D = num_heads, hidden_size

        self.proj = tnn.ModuleDict()
        self.conv = tnn.ParameterDict()
        self.gate_params = tnn.ModuleDict()
        self.mix = tnn.ParameterDict()
        for name, f in self.recipe.inputs.items():
            n = math.prod(self._dims(name))
            width = n if f.shared else H * n
            if f.project:
                rank = self._size(f.rank) if f.rank is not None else None
                self.proj[name] = proj = _projection(D, width, rank, f.bias, f.rank_act)
                if f.bias and f.bias_init is not None:
                    shape = self._dims(name) if f.shared else (H, *self._dims(name))
                    with torch.no_grad():
                        _last_linear(proj).bias.copy_(f.bias_init(tuple(shape)).reshape(-1))
                if self.recipe.token_shift:
                    self.mix[name] = tnn.Parameter(torch.full((D,), 0.5))
            if f.conv:
                bound = 1 / math.sqrt(f.conv)
                self.conv[name] = tnn.Parameter(torch.empty(width, f.conv).uniform_(-bound, bound))
            if f.params:
                self.gate_params[name] = tnn.ParameterDict({
                    k: tnn.Parameter(lp.init((H,) if lp.per_head else (H, *self._dims(name))))
                    for k, lp in f.params.items()})

        self.params = tnn.ParameterDict()
        for name, lp in self.recipe.params.items():
            value = lp.init((H, *(self.sizes[d] for d in p.params[name].dims)))
            if lp.trainable:
                self.params[lp.store or name] = tnn.Parameter(value)
            else:
                self.register_buffer(f"buffer_{lp.store or name}", value)

        out = self.recipe.output
        self.out_dims = tuple(self.sizes[d] for d in p.output.dims)
        vo = math.prod(self.out_dims)
        if out.norm not in (None, "rms", "layer"):
            raise ValueError(f"output norm must be 'rms', 'layer' or None, got {out.norm!r}")
        norm_width = H * vo if out.across_heads else vo
        self.norm_weight = tnn.Parameter(torch.ones(norm_width)) if out.norm else None
        self.norm_bias = tnn.Parameter(torch.zeros(norm_width)) if out.norm == "layer" else None
        self.gate_proj = None
        if out.gate is not None:
            rank = self._size(out.gate_rank) if out.gate_rank is not None else None
            self.gate_proj = _projection(D, H * vo, rank, rank is not None, None)
        self.o_proj = tnn.Linear(H * vo, D, bias=False)
        self.value_conv = self._value_conv(value_conv if value_conv is not None
                                           else self.recipe.value_conv, image_size)

    # ------------------------------------------------------------------ construction
    def _value_conv(self, taps: int | None, image_size) -> tnn.Module | None:
        """The depthwise convolution branch on ``v`` (or None)."""
        self.image_size = tuple(image_size) if image_size is not None else None
        if not taps:
            if image_size is not None:
                raise ValueError("image_size is for the value_conv branch; pass value_conv=")
            return None
        p = self.program
        if "v" not in p.inputs or p.inputs["v"].dims != p.output.dims:
            raise ValueError(f"value_conv: spec '{self.attn.name}' needs an input v shaped "
                             "like its output")
        channels = self.sizes[p.output.dims[-1]] if len(p.output.dims) == 1 else None
        if channels is None:
            raise ValueError("value_conv: the output must have one dim")
        if self.image_size is not None:
            if len(self.image_size) != 2 or min(self.image_size) <= 0:
                raise ValueError(f"image_size must be (height, width), got {image_size!r}")
            return tnn.Conv2d(channels, channels, taps, padding=taps // 2, groups=channels)
        return tnn.Conv1d(channels, channels, taps, groups=channels,
                          padding=taps // 2 if p.noncausal else 0)

    def _value_branch(self, v: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution of ``v [B, T, H, V]`` (same shape)."""
        B, T, H, V = v.shape
        x = v.permute(0, 2, 3, 1).reshape(B * H, V, T)
        if self.image_size is not None:
            h, w = self.image_size
            if h * w != T:
                raise ValueError(f"value_conv: image_size {h} x {w} = {h * w} tokens, but the "
                                 f"sequence has {T}")
            y = self.value_conv(x.reshape(B * H, V, h, w)).reshape(B * H, V, T)
        else:
            if not self.program.noncausal:   # causal: a token sees itself and earlier ones
                x = F.pad(x, (self.value_conv.kernel_size[0] - 1, 0))
            y = self.value_conv(x)
        return y.reshape(B, H, V, T).permute(0, 3, 1, 2)

    def _check_recipe(self) -> None:
        p, r = self.program, self.recipe
        if set(r.inputs) != set(p.inputs) or set(r.params) != set(p.params):
            raise ValueError(
                f"layer for '{self.attn.name}' declares inputs {list(r.inputs)} and params "
                f"{list(r.params)}; the spec has inputs {list(p.inputs)} and params "
                f"{list(p.params)}")
        done = set()
        for name, f in r.inputs.items():
            late = [u for u in f.uses if u not in done]
            if late:
                raise ValueError(f"layer input '{name}' uses {late}, which are not computed "
                                 f"before it (inputs run in the order {list(r.inputs)})")
            if not f.project and (f.conv or f.rank or f.bias):
                raise ValueError(f"layer input '{name}' has project=False but asks for a "
                                 "projection option (conv, rank or bias)")
            if not f.project and f.act is None:
                raise ValueError(f"layer input '{name}' has project=False and no act")
            done.add(name)

    def _sizes(self, head_dim_k, head_dim_v, dims: dict) -> dict:
        r, H, D = self.recipe, self.num_heads, self.hidden_size
        sizes = {"K": head_dim_k or int(D * r.expand_k) // H,
                 "V": head_dim_v or int(D * r.expand_v) // H}
        for d in ("K", "V"):
            if sizes[d] <= 0:
                raise ValueError(f"head dim {d} is {sizes[d]} (hidden_size {D} x expand "
                                 f"/ num_heads {H}); pass head_dim_{d.lower()}=")
        for d, make in r.dims.items():
            sizes.setdefault(d, int(make(sizes)))
        sizes.update(dims)
        for d, expr in self.program.dims.items():
            if expr is not None and d not in sizes:
                free = [str(s) for s in expr.free_symbols if str(s) not in sizes]
                if free:
                    raise ValueError(f"dim {d} = {expr} needs {', '.join(free)}: pass dims=")
                sizes[d] = int(expr.subs({s: sizes[str(s)] for s in expr.free_symbols}))
        used = {d for decl in (*self.program.inputs.values(), *self.program.params.values(),
                               *self.program.states.values()) for d in decl.dims}
        missing = sorted(d for d in used | set(self.program.output.dims) if d not in sizes)
        if missing:
            raise ValueError(f"spec '{self.attn.name}': no size for dim(s) {', '.join(missing)}"
                             f"; pass dims={{{', '.join(repr(d) + ': ...' for d in missing)}}}")
        return sizes

    def _size(self, value) -> int:
        return self.sizes[value] if isinstance(value, str) else int(value)

    def _dims(self, name: str) -> tuple[int, ...]:
        return tuple(self.sizes[d] for d in self.program.inputs[name].dims)

    def spec_param(self, name: str) -> torch.Tensor:
        """The value the spec receives for param ``name`` ``[H, *dims]``."""
        lp = self.recipe.params[name]
        stored = lp.store or name
        value = self.params[stored] if lp.trainable else getattr(self, f"buffer_{stored}")
        return lp.to_spec(value) if lp.to_spec is not None else value

    def extra_repr(self) -> str:
        return (f"spec={self.attn.name!r}, hidden_size={self.hidden_size}, "
                f"num_heads={self.num_heads}, sizes={self.sizes}, form={self.form!r}")

    # ------------------------------------------------------------------ forward
    def inputs(self, hidden_states: torch.Tensor, *, cache: LayerCache | None = None,
               want_cache: bool = False, cu_seqlens: torch.Tensor | None = None):
        """The spec's per-token inputs ``{name: [B, T, H, *dims]}`` for ``hidden_states``
        ``[B, T, D]``, and the new convolution and shift caches (when ``want_cache``)."""
        x = hidden_states
        B, T, _ = x.shape
        H, r = self.num_heads, self.recipe
        needs_index = r.token_shift or any(f.conv for f in r.inputs.values())
        index = _token_index(B, T, cu_seqlens, x.device) if needs_index else None
        new_conv, new_shift, prev = {}, None, None
        if r.token_shift:
            (prev,), new_shift = _with_history(x, 2, index, cache.shift if cache else None,
                                               want_cache)
        feats = {}
        for name, f in r.inputs.items():
            dims = self._dims(name)
            args = [self._project(name, x, prev)] if f.project else []
            if f.conv:
                y = args[0]
                prevs, new_conv[name] = _with_history(
                    y, f.conv, index, cache.conv.get(name) if cache else None, want_cache)
                w = self.conv[name]
                y = y * w[:, -1] + sum(p * w[:, -1 - s] for s, p in enumerate(prevs, 1))
                args = [y]
            if args:
                y = args[0]
                y = (y.view(B, T, 1, *dims).expand(B, T, H, *dims) if f.shared
                     else y.view(B, T, H, *dims))
                args = [y]
            kwargs = {u: feats[u] for u in f.uses}
            for k, lp in f.params.items():
                t = self.gate_params[name][k]
                kwargs[k] = t.view(H, *([1] * len(dims))) if lp.per_head else t
            y = f.act(*args, **kwargs) if f.act is not None else args[0]
            feats[name] = y.float() if f.float32 else y
        return feats, new_conv, new_shift

    def _project(self, name: str, x, prev):
        if prev is not None:
            x = x + (prev - x) * self.mix[name]
        return self.proj[name](x)

    def forward(self, hidden_states: torch.Tensor, *, past_key_values: LayerCache | None = None,
                use_cache: bool = False, cu_seqlens: torch.Tensor | None = None):
        """``hidden_states [B, T, D]`` (``B = 1`` and ``cu_seqlens [N + 1]`` for packed
        sequences) -> ``(out [B, T, D], LayerCache or None)``.

        ``past_key_values``: the cache a previous call returned (the sequences continue
        from it); ``use_cache=True`` returns the cache after this call. A one-token call
        with a cache runs the decode step.
        """
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"hidden_states must be [B, T, {self.hidden_size}], got {got}")
        cache = past_key_values
        if cache is not None or use_cache:
            self._check_cacheable()
        if cache is not None and not isinstance(cache, LayerCache):
            raise ValueError("past_key_values must be the LayerCache a previous call with "
                             f"use_cache=True returned, got {type(cache).__name__}")
        feats, new_conv, new_shift = self.inputs(x, cache=cache, want_cache=use_cache,
                                                 cu_seqlens=cu_seqlens)
        params = {n: self.spec_param(n) for n in self.program.params}
        B, T = x.shape[:2]
        if cache is not None and T == 1 and cu_seqlens is None:
            step = self.op.step if torch.compiler.is_compiling() else self.attn.step
            o, final = step(cache.state, **feats, **params)
        else:
            o, final = self.op(**feats, **params, initial_state=cache.state if cache else None,
                               output_final_state=use_cache, cu_seqlens=cu_seqlens,
                               form=self.form)
        o = o.reshape(B, T, self.num_heads, -1)
        if self.value_conv is not None:
            o = o + self._value_branch(feats["v"]).to(o.dtype)
        out = self.o_proj(self._output(o, x))
        new = LayerCache(final, new_conv, new_shift) if use_cache else None
        return out, new

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Norm and gate of ``o [B, T, H, Vo]``; returns ``[B, T, H * Vo]``."""
        out, (B, T, H, vo) = self.recipe.output, o.shape
        gate = None
        if self.gate_proj is not None:
            gate = out.gate(self.gate_proj(x).view(B, T, H, vo))
        if gate is not None and out.gate_first:
            o = o * gate
        if out.norm is not None:
            o = o.reshape(B, T, H * vo) if out.across_heads else o
            if out.norm == "rms":
                o32 = o.float()
                o = (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
                    o.dtype) * self.norm_weight
            else:
                o = F.layer_norm(o, (o.shape[-1],), self.norm_weight, self.norm_bias, self.eps)
            o = o.view(B, T, H, vo)
        if gate is not None and not out.gate_first:
            o = o * gate
        return o.reshape(B, T, H * vo)

    def _check_cacheable(self) -> None:
        if self.value_conv is not None:
            raise NotImplementedError("value_conv: generation with a cache does not carry the "
                                      "convolution's history yet")
        if self.program.noncausal:
            raise ValueError(f"spec '{self.attn.name}' is noncausal: every token reads the "
                             "whole sequence, so there is no state to carry (no use_cache)")
        if self._reads_t:
            raise NotImplementedError(
                f"spec '{self.attn.name}' reads the position t, which restarts at 0 in every "
                "call: continuing from a cache would give wrong positions")
