"""linforge's kernels as ``torch.library`` custom ops, so ``torch.compile`` traces a model
that calls them without graph breaks.

A custom op needs a fixed schema, while every spec has its own inputs, params and states.
Each op therefore takes the tensors as lists in the spec's declaration order
(``Tensor[] inputs, Tensor[] params, Tensor[] state``) and a string ``key`` naming the spec
in a process-wide registry (``register``). The key is the spec's name and a hash of its IR,
so equal specs share it and dynamo specialises on it as on any constant. The ops:

``linforge::recurrent_forward`` / ``linforge::recurrent_backward``
    the recurrent kernels. The forward also returns the state checkpoints its backward
    reads; their count depends on ``cu_seqlens`` values, so the fake implementation gives
    them an unbacked (data-dependent) size. Autograd is registered on the forward and calls
    the backward op, so AOTAutograd puts both kernels into the compiled graphs.
``linforge::forward`` / ``linforge::forward_backward``
    any other form (``chunk``, ``parallel``, ``reference``): the forward runs the eager
    ``Attention`` call; the backward recomputes it with autograd and returns the gradients
    (one extra forward per backward; the chunked forms have no separate backward kernel
    entry point to call).
``linforge::step``
    the decode step (inference only: no autograd).

``TorchOp(attn)`` wraps them with the call convention of ``Attention``; ``linforge.nn``
layers call it. Errors in arguments surface when the op runs, from the same validation
as the eager call (``Attention.bind``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..api import FORMS
from ..ir.show import show_ir
from . import ops
from .cache import cache_key

__all__ = ["TorchOp", "register", "lookup"]

_SPECS: dict[str, object] = {}


def register(attn) -> str:
    """Register a compiled ``Attention`` for the custom ops; returns its key."""
    key = getattr(attn, "_torch_op_key", None)
    if key is None:
        key = f"{attn.name}:{cache_key(show_ir(attn.program))}"
        attn._torch_op_key = key
    _SPECS.setdefault(key, attn)
    return key


def lookup(key: str):
    """The ``Attention`` registered under ``key``."""
    try:
        return _SPECS[key]
    except KeyError:
        raise KeyError(f"no linforge spec is registered under {key!r} in this process; "
                       "build the op with linforge.codegen.torch_op.TorchOp(attn) (or "
                       "register(attn)) before calling it") from None


# ---------------------------------------------------------------------- shared helpers
def _named(attn, inputs: list, params: list) -> dict:
    p = attn.program
    if len(inputs) != len(p.inputs) or len(params) != len(p.params):
        raise ValueError(f"{attn.name}: expected {len(p.inputs)} inputs "
                         f"({', '.join(p.inputs)}) and {len(p.params)} params "
                         f"({', '.join(p.params)}), got {len(inputs)} and {len(params)}")
    return {**dict(zip(p.inputs, inputs)), **dict(zip(p.params, params))}


def _states(attn, state: list) -> dict | None:
    return dict(zip(attn.program.states, state)) if state else None


def _bind(attn, inputs, params, state, cu_seqlens):
    return attn.bind(_named(attn, inputs, params), _states(attn, state), cu_seqlens)


def _fake_outputs(attn, inputs, params, state, cu_seqlens, output_final_state):
    """Fake ``o [B, T, H, *o_dims]`` and final states ``[N, H, *dims]`` from shapes only."""
    p = attn.program
    bound = _bind(attn, inputs, params, state, None)
    x0 = inputs[0]
    o = x0.new_empty((*x0.shape[:3], *(bound.sizes[d] for d in p.output.dims)),
                     dtype=bound.out_dtype)
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else x0.shape[0]
    state_dtype = state[0].dtype if state else torch.float32
    finals = [x0.new_empty((batch, x0.shape[2], *(bound.sizes[d] for d in decl.dims)),
                           dtype=state_dtype)
              for decl in p.states.values()] if output_final_state else []
    return bound, o, finals


def _unshared(tensors: list) -> list:
    """Outputs as a custom op must return them (and as the fake implementations describe
    them): contiguous, sharing storage with no other output."""
    seen, out = set(), []
    for t in tensors:
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out.append(t.clone() if ptr is not None and ptr in seen else t)
        if ptr is not None:
            seen.add(ptr)
    return out


# ---------------------------------------------------------------------- recurrent form
def checkpoint_chunk(length) -> int:
    """Tokens between saved states for sequences of ``length`` tokens in all: the power of
    two (4 to 256) nearest above sqrt(length). Written as comparisons, so that dynamo, given
    a symbolic length, guards on its range and passes the ops a plain int."""
    chunk = 4
    while chunk < 256 and chunk * chunk < length:
        chunk *= 2
    return chunk


def _n_checkpoints(batch, T, chunk: int, varlen: bool):
    """Rows of the checkpoint buffer, from shapes alone: exact for a dense batch, an upper
    bound with ``cu_seqlens`` (each sequence adds at most one partial chunk)."""
    return (T + chunk - 1) // chunk + batch if varlen else batch * ((T + chunk - 1) // chunk)


def _plan(attn, bound, inputs, state, cu_seqlens, chunk: int):
    x0 = inputs[0]
    B, T, H = x0.shape[:3]
    state_dtype = state[0].dtype if state else torch.float32
    L = ops.plan(attn.analysis, bound.sizes, batch=bound.batch, B=B, T=T, H=H,
                 device=x0.device, out_dtype=bound.out_dtype, state_dtype=state_dtype,
                 cu_seqlens=cu_seqlens, chunk=chunk)
    return dataclasses.replace(L, n_chunks=_n_checkpoints(bound.batch, T, chunk,
                                                          cu_seqlens is not None))


@torch.library.custom_op("linforge::recurrent_forward", mutates_args=())
def recurrent_forward(key: str, inputs: list[Tensor], params: list[Tensor],
                      initial_state: list[Tensor], cu_seqlens: Optional[Tensor],
                      output_final_state: bool, save_checkpoints: bool, chunk: int
                      ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The recurrent forward kernel: ``(o, final states or [], saved)``; ``saved`` holds
    the state checkpoints (and the whole-sequence states of a noncausal spec) that
    ``recurrent_backward`` reads, empty unless ``save_checkpoints``; ``chunk``: tokens
    between checkpoints (``checkpoint_chunk``)."""
    attn = lookup(key)
    p = attn.program
    bound = _bind(attn, inputs, params, initial_state, cu_seqlens)
    L = _plan(attn, bound, inputs, initial_state, cu_seqlens, chunk)
    x = {n: t.contiguous() for n, t in bound.inputs.items()}
    w = {n: t.contiguous() for n, t in bound.params.items()}
    init = ({s: t.contiguous() for s, t in zip(p.states, initial_state)}
            if initial_state else None)
    totals = save_checkpoints and p.noncausal
    o, finals, ckpts = ops._forward(L, x, w, init, store_final=output_final_state or totals,
                                    save_checkpoints=save_checkpoints)
    final_list = [finals[s] for s in p.states] if output_final_state else []
    saved = [ckpts[s] for s in p.states] if save_checkpoints else []
    if totals:
        saved += [finals[s].clone() if output_final_state else finals[s] for s in p.states]
    return o, final_list, saved


@recurrent_forward.register_fake
def _(key, inputs, params, initial_state, cu_seqlens, output_final_state, save_checkpoints,
      chunk):
    attn = lookup(key)
    p = attn.program
    bound, o, finals = _fake_outputs(attn, inputs, params, initial_state, cu_seqlens,
                                     output_final_state)
    saved = []
    if save_checkpoints:
        B, T, H = inputs[0].shape[:3]
        batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
        n = _n_checkpoints(batch, T, chunk, cu_seqlens is not None)
        saved = [inputs[0].new_empty((n, H, *(bound.sizes[d] for d in decl.dims)),
                                     dtype=torch.float32) for decl in p.states.values()]
        if p.noncausal:
            saved += _fake_outputs(attn, inputs, params, initial_state, cu_seqlens, True)[2]
    return o, finals, saved


@torch.library.custom_op("linforge::recurrent_backward", mutates_args=())
def recurrent_backward(key: str, inputs: list[Tensor], params: list[Tensor],
                       saved: list[Tensor], cu_seqlens: Optional[Tensor], d_o: Tensor,
                       d_final: list[Tensor], has_initial: bool, chunk: int
                       ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The recurrent backward kernel: gradients of the inputs, the params and (with
    ``has_initial``) the initial states; ``d_final`` is empty or one tensor per state."""
    attn = lookup(key)
    p = attn.program
    bound = _bind(attn, inputs, params, [], cu_seqlens)
    L = _plan(attn, bound, inputs, [], cu_seqlens, chunk)
    ns = len(p.states)
    ckpts = dict(zip(p.states, saved[:ns]))
    totals = dict(zip(p.states, saved[ns:]))
    x = {n: t.contiguous() for n, t in bound.inputs.items()}
    w = {n: t.contiguous() for n, t in bound.params.items()}
    g_in, g_par, g_init = ops._backward(L, x, w, ckpts, totals, d_o.contiguous(),
                                        dict(zip(p.states, d_final)))
    return ([g_in[n] for n in p.inputs], [g_par[n] for n in p.params],
            [g_init[s] for s in p.states] if has_initial else [])


@recurrent_backward.register_fake
def _(key, inputs, params, saved, cu_seqlens, d_o, d_final, has_initial, chunk):
    attn = lookup(key)
    p = attn.program
    d_init = []
    if has_initial:
        bound = _bind(attn, inputs, params, [], None)
        batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else inputs[0].shape[0]
        d_init = [inputs[0].new_empty((batch, inputs[0].shape[2],
                                       *(bound.sizes[d] for d in decl.dims)),
                                      dtype=torch.float32) for decl in p.states.values()]
    return ([torch.empty_like(x) for x in inputs], [torch.empty_like(x) for x in params],
            d_init)


def _recurrent_setup(ctx, inputs, output):
    key, ins, pars, init, cu_seqlens, _, save_checkpoints, chunk = inputs
    ctx.key, ctx.n_in, ctx.n_par, ctx.n_saved = key, len(ins), len(pars), len(output[2])
    ctx.save, ctx.chunk = save_checkpoints, chunk
    ctx.init_dtypes = [x.dtype for x in init]
    ctx.final_shapes = [(f.shape, f.dtype) for f in output[1]]
    ctx.save_for_backward(*ins, *pars, *output[2], cu_seqlens)


def _final_grads(ctx, d_finals) -> list:
    """Gradients of the final states for a backward op: [] when none flows back, else one
    per state (zeros for a state whose gradient is None)."""
    ref = next((g for g in d_finals or () if g is not None), None)
    if ref is None:
        return []
    return [g if g is not None else ref.new_zeros(shape, dtype=dtype)
            for g, (shape, dtype) in zip(d_finals, ctx.final_shapes)]


def _recurrent_grad(ctx, d_o, d_finals, d_saved):
    if not ctx.save:
        raise RuntimeError("linforge::recurrent_forward ran with save_checkpoints=False, so it "
                           "cannot be differentiated; call it with save_checkpoints=True")
    t = ctx.saved_tensors
    a, b, c = ctx.n_in, ctx.n_in + ctx.n_par, ctx.n_in + ctx.n_par + ctx.n_saved
    ins, pars, saved, cu_seqlens = list(t[:a]), list(t[a:b]), list(t[b:c]), t[c]
    g_in, g_par, g_init = recurrent_backward(ctx.key, ins, pars, saved, cu_seqlens, d_o,
                                             _final_grads(ctx, d_finals),
                                             bool(ctx.init_dtypes), ctx.chunk)
    g_init = [g.to(dt) for g, dt in zip(g_init, ctx.init_dtypes)]
    return None, g_in, g_par, g_init, None, None, None, None


recurrent_forward.register_autograd(_recurrent_grad, setup_context=_recurrent_setup)


# ---------------------------------------------------------------------- other forms
def _eager(attn, form, inputs, params, initial_state, cu_seqlens, output_final_state):
    o, final = attn(**_named(attn, inputs, params), initial_state=_states(attn, initial_state),
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens, form=form)
    return o, ([final[s] for s in attn.program.states] if output_final_state else [])


@torch.library.custom_op("linforge::forward", mutates_args=())
def forward(key: str, form: str, inputs: list[Tensor], params: list[Tensor],
            initial_state: list[Tensor], cu_seqlens: Optional[Tensor],
            output_final_state: bool) -> tuple[Tensor, list[Tensor]]:
    """``Attention.__call__`` in ``form`` (any form but 'auto'): ``(o, final states or [])``."""
    attn = lookup(key)
    with torch.no_grad():
        o, finals = _eager(attn, form, inputs, params, initial_state, cu_seqlens,
                           output_final_state)
    o, *finals = _unshared([o, *finals])
    return o, finals


@forward.register_fake
def _(key, form, inputs, params, initial_state, cu_seqlens, output_final_state):
    _, o, finals = _fake_outputs(lookup(key), inputs, params, initial_state, cu_seqlens,
                                 output_final_state)
    return o, finals


class _autograd_on:
    """Record autograd inside a custom op's implementation.

    The dispatcher runs an op's implementation below autograd (the autograd keys are in the
    thread's excluded set), so ``torch.enable_grad()`` alone records nothing there. This
    restores the autograd keys for the block, then puts the thread's key sets back.
    """

    _KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor",
             "ADInplaceOrView")

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for name in self._KEYS:
            key = getattr(torch._C.DispatchKey, name, None)
            if key is not None:
                exclude = exclude.remove(key)
        self._guard = torch._C._ForceDispatchKeyGuard(
            torch._C._dispatch_tls_local_include_set(), exclude)
        self._grad = torch.enable_grad()
        self._guard.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)


@torch.library.custom_op("linforge::forward_backward", mutates_args=())
def forward_backward(key: str, form: str, inputs: list[Tensor], params: list[Tensor],
                     initial_state: list[Tensor], cu_seqlens: Optional[Tensor], d_o: Tensor,
                     d_final: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients of ``forward`` by recomputation under autograd: of the inputs, the params
    and the initial states (empty when there are none); ``d_final`` may be empty."""
    attn = lookup(key)
    leaves = [x.detach().requires_grad_() for x in (*inputs, *params, *initial_state)]
    ni, np_ = len(inputs), len(params)
    with _autograd_on():
        o, finals = _eager(attn, form, leaves[:ni], leaves[ni:ni + np_], leaves[ni + np_:],
                           cu_seqlens, bool(d_final))
    outs, grads = [o], [d_o]
    for f, g in zip(finals, d_final):
        outs.append(f)
        grads.append(g)
    got = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    got = [torch.zeros_like(x) if g is None else g.to(x.dtype) for g, x in zip(got, leaves)]
    got = _unshared(got)
    return got[:ni], got[ni:ni + np_], got[ni + np_:]


@forward_backward.register_fake
def _(key, form, inputs, params, initial_state, cu_seqlens, d_o, d_final):
    return ([torch.empty_like(x) for x in inputs], [torch.empty_like(x) for x in params],
            [torch.empty_like(x) for x in initial_state])


def _forward_setup(ctx, inputs, output):
    key, form, ins, pars, init, cu_seqlens, _ = inputs
    ctx.key, ctx.form, ctx.n = key, form, (len(ins), len(pars))
    ctx.final_shapes = [(f.shape, f.dtype) for f in output[1]]
    ctx.save_for_backward(*ins, *pars, *init, cu_seqlens)


def _forward_grad(ctx, d_o, d_finals):
    t = ctx.saved_tensors
    a, b = ctx.n[0], ctx.n[0] + ctx.n[1]
    ins, pars, init, cu_seqlens = list(t[:a]), list(t[a:b]), list(t[b:-1]), t[-1]
    g_in, g_par, g_init = forward_backward(ctx.key, ctx.form, ins, pars, init, cu_seqlens,
                                           d_o, _final_grads(ctx, d_finals))
    return None, None, g_in, g_par, g_init, None, None


forward.register_autograd(_forward_grad, setup_context=_forward_setup)


# ---------------------------------------------------------------------- decode step
@torch.library.custom_op("linforge::step", mutates_args=())
def step(key: str, inputs: list[Tensor], params: list[Tensor], state: list[Tensor]
         ) -> tuple[Tensor, list[Tensor]]:
    """``Attention.step`` (not in place): inputs ``[B, 1, H, *dims]``, one state tensor per
    state ``[B, H, *dims]``; returns ``(o [B, 1, H, *o_dims], new states)``."""
    attn = lookup(key)
    o, new = attn.step(_states(attn, state), **_named(attn, inputs, params))
    o, *new = _unshared([o, *(new[s] for s in attn.program.states)])
    return o, new


@step.register_fake
def _(key, inputs, params, state):
    _, o, finals = _fake_outputs(lookup(key), inputs, params, state, None, True)
    return o, finals


# ---------------------------------------------------------------------- the wrapper
class TorchOp:
    """A compiled spec called through the custom ops: the call convention of
    ``Attention`` (``op(**tensors, initial_state=, output_final_state=, cu_seqlens=, form=)``
    and ``op.step(state, **one_token)``), traceable by ``torch.compile`` without graph breaks.

    ``form="auto"`` resolves as in ``Attention`` (at trace time, from the sequence length and
    whether gradients are needed). Specs with memory inputs (cross-attention) are not
    supported here; call the ``Attention`` itself.
    """

    def __init__(self, attn):
        if attn.program.memory:
            raise NotImplementedError(
                f"spec '{attn.name}' reads memory inputs ({', '.join(attn.program.memory)}); "
                "TorchOp runs self-attention specs only, call the Attention directly")
        self.attn = attn
        self.key = register(attn)
        # What Attention.resolve_form says, tabulated here so that dynamo traces a dict
        # lookup and comparisons of T (a symbol under dynamic shapes) with the bounds where
        # 'auto' may change its pick, instead of the analysis.
        self._errors = {}
        for form in FORMS:
            try:
                attn.resolve_form(form, 1)
            except (ValueError, NotImplementedError) as e:
                self._errors[form] = e
        self._bounds = attn.auto_form_bounds()
        lengths = (1, *self._bounds)    # one length of each range between bounds
        self._auto = {(grad, stateful, i): attn.resolve_form(
                          "auto", length, needs_grad=grad, stateful=stateful)
                      for grad in (False, True) for stateful in (False, True)
                      for i, length in enumerate(lengths)}

    def __repr__(self) -> str:
        return f"TorchOp({self.attn.name!r})"

    def _resolve(self, form: str, length, needs_grad: bool, stateful: bool) -> str:
        """``Attention.resolve_form(form, length, needs_grad=needs_grad, stateful=stateful)``,
        from the tables."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        if form in self._errors:
            error = self._errors[form]
            raise type(error)(*error.args)
        if form != "auto":
            return form
        return self._auto[(needs_grad, stateful, sum(int(length >= b) for b in self._bounds))]

    def _split(self, tensors: dict, state: dict | None, what: str):
        p = self.attn.program
        names = [*p.inputs, *p.params]
        missing = [n for n in names if n not in tensors]
        unknown = [n for n in tensors if n not in names]
        if missing or unknown:
            raise ValueError(f"{self.attn.name}: expects {', '.join(names)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        if state is not None and (not isinstance(state, dict) or set(state) != set(p.states)):
            got = ", ".join(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{self.attn.name}: {what} must be a dict with exactly the states "
                             f"{', '.join(p.states)}, got {got}")
        return ([tensors[n] for n in p.inputs], [tensors[n] for n in p.params],
                [state[s] for s in p.states] if state is not None else [])

    def __call__(self, *, initial_state: dict | None = None, output_final_state: bool = False,
                 cu_seqlens: Tensor | None = None, form: str = "auto", **tensors):
        """Like ``Attention.__call__``: ``(o [B, T, H, *o_dims], final states or None)``."""
        inputs, params, init = self._split(tensors, initial_state, "initial_state")
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (*inputs, *params, *init))
        form = self._resolve(form, inputs[0].shape[1], needs_grad,
                             bool(init) or output_final_state)
        if form == "recurrent":
            o, finals, _ = recurrent_forward(self.key, inputs, params, init, cu_seqlens,
                                             output_final_state, needs_grad,
                                             checkpoint_chunk(inputs[0].shape[1]))
        else:
            o, finals = forward(self.key, form, inputs, params, init, cu_seqlens,
                                output_final_state)
        return o, (dict(zip(self.attn.program.states, finals)) if output_final_state else None)

    def step(self, state: dict, **tensors):
        """Like ``Attention.step`` (never in place): inputs ``[B, H, *dims]`` or
        ``[B, 1, H, *dims]``; returns ``(o`` shaped like the inputs' leading dims``, new
        state)``."""
        inputs, params, states = self._split(tensors, state, "state")
        p = self.attn.program
        single = [x.dim() == 2 + len(decl.dims) for x, decl in zip(inputs, p.inputs.values())]
        if any(single) and not all(single):
            raise ValueError(f"{self.attn.name}.step: give every input as [B, H, ...] or every "
                             "input as [B, 1, H, ...], not a mix")
        if all(single):
            inputs = [x.unsqueeze(1) for x in inputs]
        o, new = step(self.key, inputs, params, states)
        return (o[:, 0] if all(single) else o), dict(zip(p.states, new))
