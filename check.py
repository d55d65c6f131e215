"""Check a compiled spec's kernels against the reference interpreter on random inputs
(``linforge check SPEC``).

Random inputs come from the spec's layer (``linforge.nn.LinearAttention`` over random hidden
states), so decays, gates and normalised keys lie in the ranges the model's paper gives them
(a spec outside the library gets plain linear projections). Every kernel form that
``Attention.__call__`` accepts is tried: a form without a kernel (``NotImplementedError``,
or a ``ValueError`` when the spec's class has no such form) becomes a row saying so, so new
forms appear here as they land. Each row compares the output, the final states and the
gradients of every input, param and initial state with the float64 reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .api import FORMS, Attention

#: relative tolerance per dtype (DESIGN.md: fp32 kernels within 1e-4 of fp64, bf16 2e-2)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2,
             torch.float16: 1e-2}
#: the forms a check tries: every kernel form of the call, in order
KERNEL_FORMS = tuple(f for f in FORMS if f not in ("auto", "reference"))
#: tokens the decode-step row runs one at a time
STEP_TOKENS = 4


@dataclass
class Row:
    """One line of the check table."""

    form: str
    status: str                  # "ok", "FAIL", "no kernel", "error"
    error_o: float | None = None
    error_state: float | None = None
    error_grad: float | None = None
    seconds: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Shape:
    """Sizes of a check or bench call."""

    B: int = 2
    T: int = 32
    H: int = 2
    K: int = 16
    V: int = 16
    dims: tuple[tuple[str, int], ...] = ()


def random_call(attn: Attention, shape: Shape, *, dtype=torch.float32, device="cpu",
                seed: int = 0) -> tuple[dict, dict]:
    """Random ``(tensors, initial_state)`` for ``attn`` in its layer's ranges: inputs
    ``[B, T, H, *dims]``, params ``[H, *dims]``, states ``[B, H, *dims]`` (small)."""
    from .nn import LinearAttention

    torch.manual_seed(seed)
    hidden = 32
    layer = LinearAttention(attn, hidden, shape.H, shape.K, shape.V, dims=dict(shape.dims))
    x = torch.randn(shape.B, shape.T, hidden)
    with torch.no_grad():
        feats, _, _ = layer.inputs(x)
        tensors = {**feats, **{n: layer.spec_param(n) for n in attn.program.params}}
    out = {}
    for n, t in tensors.items():
        t = t.detach()
        # gates and decays stay fp32 as layers pass them; the rest takes the checked dtype
        keep = t.dtype == torch.float32 and n in feats and layer.recipe.inputs[n].float32
        out[n] = t.to(device=device, dtype=torch.float32 if keep else dtype).contiguous()
    state = {s: (0.1 * torch.randn(shape.B, shape.H, *(layer.sizes[d] for d in decl.dims))
                 ).abs().to(device)   # normalizer states stay positive
             for s, decl in attn.program.states.items()}
    return out, state


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) if b.numel() else 0.0


def check_form(attn: Attention, form: str, tensors: dict, state: dict, ref: tuple,
               tol: float, with_final: bool = True) -> Row:
    """Run ``form`` with gradients and compare with the reference ``ref = (o, final,
    grads)``; a form without a kernel gives a 'no kernel' row. ``with_final=False``: no
    final state asked for (pass an empty ``state`` and a reference without one)."""
    leaves = {n: t.detach().requires_grad_() for n, t in tensors.items()}
    init = {s: t.detach().requires_grad_() for s, t in state.items()}
    o_ref, final_ref, grads_ref = ref
    t0 = time.perf_counter()
    forward_only = ""
    try:
        try:
            o, final = attn(**leaves, initial_state=init or None,
                            output_final_state=with_final, form=form)
        except NotImplementedError as e:  # a form whose backward is not generated yet
            with torch.no_grad():
                o, final = attn(**leaves, initial_state=init or None,
                                output_final_state=with_final, form=form)
            forward_only = "forward only: " + str(e).split(";")[0]
        loss = _loss(o, final, seed=1)
        if loss.requires_grad:
            loss.backward()
        if o.is_cuda:
            torch.cuda.synchronize()
    except (NotImplementedError, ValueError) as e:
        return Row(form, "no kernel", note=str(e).split(";")[0])
    seconds = time.perf_counter() - t0
    err_o = _max_rel(o, o_ref)
    err_s = max((_max_rel(final[s], final_ref[s]) for s in final_ref), default=0.0)
    if forward_only:
        bad = not max(err_o, err_s) <= tol      # NaN fails too
        return Row(form, "FAIL" if bad else "ok", err_o, err_s, None, seconds, forward_only)
    missing = [n for n, t in (*leaves.items(), *init.items()) if t.grad is None]
    err_g = max((_max_rel(t.grad, grads_ref[n]) for n, t in (*leaves.items(), *init.items())
                 if t.grad is not None), default=0.0)
    bad = not max(err_o, err_s, err_g) <= tol   # NaN fails too
    note = f"no gradient for {', '.join(missing)}" if missing else ""
    return Row(form, "FAIL" if bad or missing else "ok", err_o, err_s, err_g, seconds, note)


def check_step(attn: Attention, tensors: dict, state: dict, o_ref: torch.Tensor,
               tol: float) -> Row:
    """The decode step, token by token over the first ``STEP_TOKENS`` tokens, against the
    reference output of the same tokens."""
    from .nn import reads_position

    p = attn.program
    if reads_position(p):
        return Row("step", "unsupported", note="the spec reads the position t, and the decode "
                   "step has no position offset yet")
    n = min(STEP_TOKENS, next(iter(tensors.values())).shape[1])
    t0 = time.perf_counter()
    try:
        s = {k: v.clone() for k, v in state.items()}
        outs = []
        for t in range(n):
            one = {k: (v[:, t] if k in p.inputs else v) for k, v in tensors.items()}
            o, s = attn.step(s, **one)
            outs.append(o)
        o = torch.stack(outs, 1)
    except (NotImplementedError, ValueError) as e:
        return Row("step", "no kernel", note=str(e).split(";")[0])
    seconds = time.perf_counter() - t0
    err = _max_rel(o, o_ref[:, :n])
    return Row("step", "ok" if err <= tol else "FAIL", err, None, None, seconds,
               f"{n} tokens")


def _loss(o: torch.Tensor, final: dict | None, seed: int) -> torch.Tensor:
    """A fixed random linear function of the outputs (so gradients are not all ones)."""
    g = torch.Generator().manual_seed(seed)
    total = (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(
        o.device)).sum()
    for s in sorted(final or {}):
        w = torch.randn(final[s].shape, generator=g, dtype=torch.float64).to(o.device)
        total = total + (final[s].double() * w).sum()
    return total


def reference(attn: Attention, tensors: dict, state: dict, with_final: bool = True):
    """``(o, final, grads)`` of the float64 reference interpreter (``final`` empty and not
    in the loss when not ``with_final``)."""
    leaves = {n: t.detach().double().requires_grad_() for n, t in tensors.items()}
    init = {s: t.detach().double().requires_grad_() for s, t in state.items()}
    o, final = attn.reference(**leaves, initial_state=init or None,
                              output_final_state=with_final)
    final = final or {}
    _loss(o, final, seed=1).backward()
    grads = {n: t.grad if t.grad is not None else torch.zeros_like(t)
             for n, t in (*leaves.items(), *init.items())}
    return o.detach(), {s: x.detach() for s, x in final.items()}, grads


def check(attn: Attention, shape: Shape = Shape(), *, dtype=torch.float32, device="cpu",
          progress=None) -> list[Row]:
    """Every kernel form (and the decode step) of ``attn`` against the reference; one
    ``Row`` each. ``progress(text)`` is called before each (slow, compiling) run."""
    tensors, state = random_call(attn, shape, dtype=dtype, device=device)
    tol = TOLERANCE.get(dtype, 1e-4)
    if progress:
        progress("reference interpreter (float64)")
    ref = reference(attn, tensors, state)
    rows = []
    for form in KERNEL_FORMS:
        if progress:
            progress(f"{form}: generating, compiling and running forward + backward")
        if form == "parallel" and not attn.program.noncausal:
            # the causal parallel form carries no state in or out
            row = check_form(attn, form, tensors, {}, reference(attn, tensors, {}, False), tol,
                             with_final=False)
            row.note = row.note or "no initial or final state"
            if row.status == "ok":
                row.error_state = None
            rows.append(row)
            continue
        rows.append(check_form(attn, form, tensors, state, ref, tol))
    if not attn.program.noncausal:
        if progress:
            progress("step: decoding token by token")
        rows.append(check_step(attn, tensors, state, ref[0], tol))
    return rows


__all__ = ["KERNEL_FORMS", "Row", "Shape", "TOLERANCE", "check", "check_form", "check_step",
           "random_call", "reference"]
