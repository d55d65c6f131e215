"""Public API: ``compile`` a spec into an ``Attention`` op and call it on tensors."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch

from .dsl import SpecError, parse
from .dsl.ast import Spec
from .ir.analysis import Analysis, analyse
from .ir.transition import TransitionClass
from .ir.interpret import check_memory, run_reference
from .codegen.chunk_op import ChunkUnsupported, chunk_forward, chunk_plan, chunk_source
from .codegen.ops import Decoder, recurrent_forward, recurrent_source
from .ir.lower import lower, show_dims
from .ir.prepass import evaluate as evaluate_prepass
from .ir.prepass import lift as lift_prepass
from .ir.sympy_view import format_node

FORMS = ("auto", "recurrent", "chunk", "parallel", "reference")
#: tokens per chunk of the chunked form (a compile option: ``compile(..., chunk_size=...)``)
DEFAULT_CHUNK_SIZE = 64
CHUNK_SIZES = (16, 32, 64, 128)
#: form="auto" uses the chunked kernels from this length on (one chunk of 64 tokens). On an
#: H200 (2026-12-05, benchmarks/bench_forms.py, B x T = 65536 tokens, H=16, K=V=128, bf16,
#: benchmarks/results/forms_h200_session10.json) the chunked form beat the recurrent one at
#: every length measured, 512 to 16384, by 3.9-7.2x forward and 5.6-15.6x forward+backward
#: for linear_attention, retnet and gla; lengths below 512 are not measured yet.
AUTO_CHUNK_MIN_T = 64
#: form="auto" runs a causal spec of these classes in the parallel (quadratic) form for
#: lengths up to the value given (0: never). Measured in the same run: the parallel form was
#: slower than the chunked one at every length, already at T=512 (forward 1.36x slower for
#: linear_attention, 1.58x for retnet, 1.79x for gla; forward+backward 1.87x, 1.53x, 2.31x),
#: and its time grows as T^2 where the chunked form's stays flat; so none uses it now.
AUTO_PARALLEL_MAX_T: dict = {TransitionClass.IDENTITY: 0, TransitionClass.SCALAR: 0,
                             TransitionClass.DIAGONAL: 0}
#: classes whose generated recurrent kernels measured faster than their chunked ones at
#: training lengths, so form="auto" keeps them recurrent (none now). Diagonal decays were
#: here until 2026-12-03: on an H100 (2026-11-23) the first diagonal chunk kernels lost to
#: the recurrent ones (gla forward 5.48 vs 2.64 ms, forward+backward 19.8 vs 18.7 ms); the
#: sub-chunk kernels since measured gla forward 1.79 ms and forward+backward 7.05 ms on an
#: H200 (B=4, T=4096, H=16, K=V=128, bf16, benchmarks/results/chunk_h200.json); the
#: recurrent gla was not re-timed on the H200 (its H100 forward+backward is 2.6x slower).
AUTO_RECURRENT_CLASSES: frozenset = frozenset()
#: transition classes that form='auto' trains with the recurrent form although they have a
#: chunked one (none now). The delta rules and the low rank (RWKV-7) were here until
#: 2026-12-05, when their current chunked kernels passed the GPU tests on an H200 (forward
#: and every gradient against float64, T = 16384 against the recurrent kernels, K = V = 256)
#: and measured 6.0 ms (deltanet) and 6.9 ms (gated_deltanet) forward+backward at B=4,
#: T=4096, H=16, K=V=128, bf16, against 25.4 ms for the recurrent form on an H100
#: (benchmarks/results/chunk_h200_session9_delta.json, BENCHMARKS.md).
AUTO_TRAINS_RECURRENT: frozenset = frozenset()


@dataclass(frozen=True)
class Bound:
    """Validated call arguments: per-token inputs, per-head params and all sizes."""

    inputs: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    sizes: dict[str, int]
    batch: int           # B, or N sequences with cu_seqlens
    length: int          # T
    out_dtype: torch.dtype
    memory: dict[str, torch.Tensor] | None = None   # cross-attention keys and values


class Attention:
    """A compiled spec. Call it like an fla op::

        o, final_state = attn(q=q, k=k, v=v, initial_state=None, output_final_state=False)

    Inputs are ``[B, T, H, *dims]``, params ``[H, *dims]``, states a dict name ->
    ``[B, H, *dims]`` (``[N, H, *dims]`` for N packed sequences with ``cu_seqlens``).
    """

    def __init__(self, spec: Spec, analysis: Analysis, filename: str | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or \
                chunk_size not in CHUNK_SIZES:
            raise ValueError(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))} "
                             f"(a power of two the diagonal decays' sub-chunks of 16 divide), "
                             f"got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.spec = spec
        self.analysis = analysis
        self.program = analysis.program
        self.filename = filename
        self._decoders: dict = {}  # decode-call signature -> prepared Decoder

    @property
    def name(self) -> str:
        """The spec's name."""
        return self.program.name

    def __repr__(self) -> str:
        return (f"Attention({self.name!r}, class={self.analysis.transition_class.value!r}, "
                f"forms={self.analysis.forms})")

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        """Dims, inputs, params, states, transition class, readout and supported forms."""
        a, p = self.analysis, self.program
        return {
            "name": p.name,
            "noncausal": p.noncausal,
            "dims": {d: (None if s is None else str(s)) for d, s in p.dims.items()},
            "inputs": {n: list(d.dims) for n, d in p.inputs.items()},
            "memory": {n: list(d.dims) for n, d in getattr(p, "memory", {}).items()},
            "params": {n: list(d.dims) for n, d in p.params.items()},
            "position_indexed_params": {n: d.position for n, d in p.params.items()
                                        if getattr(d, "position", None)},
            "states": {n: list(d.dims) for n, d in p.states.items()},
            "kernel_blockers": list(getattr(a, "kernel_blockers", ())),
            "state_classes": {s: c.value for s, c in a.classes.items()},
            "transition_class": a.transition_class.value,
            "normalizers": {nz.vector: nz.matrix for nz in a.normalizers},
            "readout": a.readout.kind.value,
            "forms": list(a.forms if self._lowered() is None
                          else self._lowered()[1].analysis.forms),
            "prepass": [format_node(n) for _, n in self._lowered()[0].values]
            if self._lowered() is not None else [],
            "chunk_size": self.chunk_size,
            "kernels": self._kernel_list(),
            "auto_form": self._auto_form_text(),
        }

    # ------------------------------------------------------------------ calls
    def __call__(self, *, initial_state: dict | None = None, output_final_state: bool = False,
                 cu_seqlens: torch.Tensor | None = None, form: str = "auto",
                 cu_seqlens_memory: torch.Tensor | None = None, cp_group=None, **tensors):
        """Run the op; returns ``(o [B, T, H, *o_dims], final_state or None)``.

        ``form="recurrent"`` runs the generated recurrent Triton kernels (Triton's
        interpreter for CPU tensors), differentiable through the generated backward kernel.
        ``form="chunk"`` runs the chunked kernels (identity, scalar and diagonal decays and
        delta rules, with gradients). ``form="parallel"`` runs the quadratic form (causal:
        identity, scalar and diagonal decays; noncausal specs). ``form="auto"`` picks
        parallel for noncausal specs, chunk for sequences of 64 tokens or more when the spec
        has a chunked kernel, and recurrent otherwise, from measured crossovers
        (``AUTO_CHUNK_MIN_T``, ``AUTO_PARALLEL_MAX_T``; ``info()["auto_form"]`` says which
        and why).
        ``form="reference"`` runs the float64 interpreter (``o`` cast to the dtype of the
        input over V, states to float32 or the initial state's dtype). ``cp_group``: the
        tensors are this rank's shard of sequences split over the ranks of a
        ``torch.distributed`` group (see ``linforge.context_parallel``).
        """
        self._check_form(form)
        lowered = self._lowered()
        if lowered is not None and form != "reference":
            # values across tokens or heads: a torch pre-pass, then the kernels
            if cp_group is not None:
                raise NotImplementedError(
                    f"spec '{self.name}': context parallelism with "
                    f"{'; '.join(self.analysis.kernel_blockers)} (each shard would see only "
                    "its own tokens)")
            lifted, inner = lowered
            bound = self.bind(tensors, initial_state, cu_seqlens)
            extra = evaluate_prepass(lifted, bound.inputs, bound.params, bound.sizes,
                                     cu_seqlens)
            params = {n: x for n, x in bound.params.items() if n in inner.program.params}
            return inner(initial_state=initial_state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens, form=form, **bound.inputs, **extra, **params)
        if cp_group is not None and self.program.memory:
            raise NotImplementedError(
                f"spec '{self.name}': context parallelism with memory inputs (every rank would "
                "need the whole memory's state; pass the shards' queries to one call instead)")
        if cp_group is not None:    # this rank's shard of a sequence split over cp_group
            from .context_parallel import context_parallel
            params = {n: tensors.pop(n) for n in self.program.params if n in tensors}
            needs_grad = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad
                for t in (*tensors.values(), *params.values()))
            chunked = self._chunk_reason() is None and not (
                needs_grad and self.analysis.transition_class in AUTO_TRAINS_RECURRENT)
            return context_parallel(self, tensors, params, group=cp_group,
                                    form=(("chunk" if chunked else "recurrent")
                                          if form == "auto" else form),
                                    initial_state=initial_state,
                                    output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens)
        bound = self.bind(tensors, initial_state, cu_seqlens)
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad
            for x in [*tensors.values(), *(initial_state or {}).values()])
        form = self.resolve_form(form, bound.length, needs_grad=needs_grad,
                                 stateful=initial_state is not None or output_final_state)
        if form != "reference":
            check_memory(self.program, bound.inputs, bound.memory, cu_seqlens,
                         cu_seqlens_memory)
        if form in ("chunk", "parallel"):
            try:
                return chunk_forward(
                    self.analysis, bound.inputs, bound.params, bound.sizes, batch=bound.batch,
                    out_dtype=bound.out_dtype, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                    parallel=form == "parallel", chunk_size=self.chunk_size,
                    memory=bound.memory, cu_seqlens_memory=cu_seqlens_memory)
            except ChunkUnsupported as e:
                hint = "" if "form=" in str(e) else "; use form='recurrent'"
                raise NotImplementedError(f"form={form!r}: {e}{hint}") from None
        if form == "recurrent":
            return recurrent_forward(
                self.analysis, bound.inputs, bound.params, bound.sizes, batch=bound.batch,
                out_dtype=bound.out_dtype, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        o, final = self.reference(initial_state=initial_state,
                                  output_final_state=output_final_state,
                                  cu_seqlens=cu_seqlens, cu_seqlens_memory=cu_seqlens_memory,
                                  **tensors)
        state_dtype = (next(iter(initial_state.values())).dtype if initial_state
                       else torch.float32)
        final = {s: x.to(state_dtype) for s, x in final.items()} if final is not None else None
        return o.to(bound.out_dtype), final

    def _check_form(self, form: str) -> None:
        """A clear error for a form that does not exist or that this spec cannot run."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        blockers = getattr(self.analysis, "kernel_blockers", ())
        if form not in ("auto", "reference") and blockers and self._lowered() is not None:
            inner = self._lowered()[1]
            if form not in inner.analysis.forms:
                raise ValueError(f"spec '{self.name}' (after its pre-pass, "
                                 f"{inner.analysis.transition_class.value}) does not support "
                                 f"form={form!r}; it supports: "
                                 f"{', '.join(inner.analysis.forms)}")
            return
        if form not in ("auto", "reference") and blockers:
            raise NotImplementedError(
                f"spec '{self.name}' runs in the reference interpreter only for now (no kernel "
                f"lowers {'; '.join(blockers)}); use form='reference' or 'auto'")
        if form not in ("auto", "reference") and form not in self.analysis.forms:
            raise ValueError(f"spec '{self.name}' ({self.analysis.transition_class.value}) "
                             f"does not support form={form!r}; it supports: "
                             f"{', '.join(self.analysis.forms)}")

    def resolve_form(self, form: str, length: int, *, needs_grad: bool = False,
                     stateful: bool = False) -> str:
        """The form a call with ``form`` runs for sequences of ``length`` tokens: ``form``
        itself after checking that the spec supports it, or what ``'auto'`` picks (see
        ``info()["auto_form"]``; ``needs_grad``: the call must be differentiable; ``stateful``:
        it passes an initial state or asks for the final one, which the causal parallel form
        does not carry)."""
        self._check_form(form)
        if form != "auto":
            return form
        if getattr(self.analysis, "kernel_blockers", ()):
            lowered = self._lowered()
            return "reference" if lowered is None else lowered[1].resolve_form(
                form, length, needs_grad=needs_grad, stateful=stateful)
        return self._auto_form(Bound({}, {}, {}, 0, length, torch.float32), needs_grad,
                               stateful)

    def auto_form_bounds(self) -> tuple[int, ...]:
        """The lengths at which ``form='auto'``'s pick may change (it is the same for every
        length from one bound to the next), ascending."""
        if getattr(self.analysis, "kernel_blockers", ()) and self._lowered() is not None:
            return self._lowered()[1].auto_form_bounds()
        return tuple(sorted({AUTO_CHUNK_MIN_T, self._parallel_up_to() + 1} - {1}))

    def _parallel_up_to(self) -> int:
        """The longest causal call ``form='auto'`` runs in the parallel form: its class's
        ``AUTO_PARALLEL_MAX_T``, 0 when the spec has no parallel kernels."""
        if "parallel" not in self.analysis.forms or self._chunk_reason() is not None:
            return 0
        return AUTO_PARALLEL_MAX_T.get(self.analysis.transition_class, 0)

    def _auto_form(self, bound: Bound, needs_grad: bool = False, stateful: bool = False) -> str:
        """Parallel for noncausal specs, and for causal ones from a chunk up to their
        class's ``AUTO_PARALLEL_MAX_T`` (no state in or out); chunked for sequences of a
        chunk or more when the spec has a chunked kernel (without gradients only for the
        classes in ``AUTO_TRAINS_RECURRENT``); recurrent otherwise (short sequences, other
        classes)."""
        cls = self.analysis.transition_class
        trains_recurrent = cls in AUTO_TRAINS_RECURRENT
        if self.program.noncausal and self._chunk_reason() is None:
            return "parallel"
        if not stateful and AUTO_CHUNK_MIN_T <= bound.length <= self._parallel_up_to():
            return "parallel"
        if self._chunk_reason() is None and not (trains_recurrent and needs_grad) and (
                bound.length >= AUTO_CHUNK_MIN_T and cls not in AUTO_RECURRENT_CLASSES):
            return "chunk"
        return "recurrent"

    def _lowered(self):
        """``(lifted, Attention)``: the spec with its values across tokens or heads lifted
        into a torch pre-pass (``ir/prepass.py``) and the rewritten spec compiled, made once;
        None when it has none, or one of them reads a state."""
        if "_lowered_attn" not in self.__dict__:
            lifted = lift_prepass(self.program) if getattr(
                self.analysis, "kernel_blockers", ()) else None
            inner = None
            if lifted is not None:
                try:
                    inner = Attention(self.spec, analyse(lifted.program, self.filename),
                                      self.filename, chunk_size=self.chunk_size)
                except SpecError:
                    lifted = None
            self._lowered_attn = None if lifted is None else (lifted, inner)
        return self._lowered_attn

    def _kernel_list(self) -> list[str]:
        """The generated kernels this spec has, by form and direction."""
        if self._lowered() is not None:
            return self._lowered()[1]._kernel_list()
        kernels = ["recurrent fwd", "recurrent bwd"]
        if self._chunk_reason() is not None:
            return kernels
        if self.program.memory:     # cross-attention: the GEMM stages alone
            return ["parallel (GEMM) fwd", "parallel (GEMM) bwd"]
        if self.program.noncausal:
            return kernels + ["parallel (GEMM) fwd", "parallel (GEMM) bwd"]
        plan = chunk_plan(self.analysis)
        kernels += ["chunk fwd", "chunk bwd"]
        if any(sp.solved for sp in plan.states):    # delta rules, low rank: no parallel form
            return kernels
        return kernels + ["parallel fwd", "parallel bwd"]

    def _auto_form_text(self) -> str:
        blockers = getattr(self.analysis, "kernel_blockers", ())
        if blockers and self._lowered() is not None:
            return (f"{self._lowered()[1]._auto_form_text()}, after a torch pre-pass for "
                    f"{'; '.join(blockers)}")
        if blockers:
            return f"reference (no kernel lowers {'; '.join(blockers)})"
        if self._chunk_reason() is not None:
            return f"recurrent (no chunked kernel: {self._chunk_reason()})"
        if self.program.noncausal:
            return "parallel (noncausal: two GEMM stages)"
        if self.analysis.transition_class in AUTO_RECURRENT_CLASSES:
            return ("recurrent (measured faster than this class's chunked kernels at "
                    "T=4096, see AUTO_RECURRENT_CLASSES; form='chunk' runs them)")
        if self.analysis.transition_class in AUTO_TRAINS_RECURRENT:
            return (f"chunk for T >= {AUTO_CHUNK_MIN_T} without gradients (see "
                    "AUTO_TRAINS_RECURRENT; form='chunk' trains it chunked), recurrent "
                    "otherwise")
        text = f"chunk for T >= {AUTO_CHUNK_MIN_T}, recurrent below (and for decode)"
        up_to = self._parallel_up_to()
        if "parallel" not in self.analysis.forms:
            return text
        if up_to:
            return (f"parallel for {AUTO_CHUNK_MIN_T} <= T <= {up_to} (measured fastest "
                    f"there, see AUTO_PARALLEL_MAX_T), chunk above it and with a state in or out, "
                    "recurrent below (and for decode)")
        return (f"{text}; never parallel (measured slower than chunk at every T from 512, "
                "see AUTO_PARALLEL_MAX_T; form='parallel' runs it)")

    def _chunk_reason(self) -> str | None:
        """Why the chunked kernels cannot run this spec (None when they can); chunk_plan
        derives it once per analysis."""
        try:
            chunk_plan(self.analysis)
        except ChunkUnsupported as e:
            return str(e)
        return None

    def step(self, state: dict, *, inplace: bool = False, **tensors):
        """Decode one token per sequence: inputs ``[B, H, *dims]`` or ``[B, 1, H, *dims]``.

        ``state`` maps every state name to ``[B, H, *dims]``. Returns ``(o, new_state)`` with
        ``o`` shaped like the inputs' leading dims; with ``inplace=True`` the state tensors
        are updated in place and returned. Arguments are validated on the first call with a
        given signature (names, shapes, dtypes, strides, device); later calls with the same
        signature go straight to the kernel.
        """
        key = (inplace, *((n, x.shape, x.dtype, x.stride(), x.device) if isinstance(
            x, torch.Tensor) else (n, None) for n, x in (*tensors.items(), *state.items())))
        entry = self._decoders.get(key)
        if entry is None:
            entry = self._decoders[key] = self._prepare_step(state, inplace, tensors)
        decoder, single = entry
        p = self.program
        inputs = [tensors[n] if tensors[n].is_contiguous() else tensors[n].contiguous()
                  for n in p.inputs]
        params = [tensors[n].contiguous() for n in p.params]
        o, new = decoder(inputs, params, state, inplace)
        return (o[:, 0] if single else o), new

    def _prepare_step(self, state: dict, inplace: bool, tensors: dict):
        """Validate a decode call and build its ``Decoder``; returns (decoder, single)."""
        p = self.program
        single = None
        shaped = {}
        for n, x in tensors.items():
            if n in p.inputs and isinstance(x, torch.Tensor):
                extra = x.dim() - 2 - len(p.inputs[n].dims)
                if extra not in (0, 1) or (extra == 1 and x.shape[1] != 1):
                    raise ValueError(
                        f"{self.name}.step: input '{n}' must be [B, H, "
                        f"{', '.join(p.inputs[n].dims)}] or [B, 1, H, ...], got {tuple(x.shape)}")
                single = extra == 0 if single is None else single
                shaped[n] = x.unsqueeze(1) if extra == 0 else x
            else:
                shaped[n] = x
        if not isinstance(state, dict) or not state:
            raise ValueError(f"{self.name}.step: state must be a dict state name -> tensor "
                             f"[B, H, ...] (states: {', '.join(p.states)})")
        bound = self.bind(shaped, state, None)
        if bound.length != 1:
            raise ValueError(f"{self.name}.step takes one token per sequence")
        state_dtype = next(iter(state.values())).dtype
        if inplace:
            for s, x in state.items():
                if x.dtype != state_dtype:
                    raise ValueError(f"{self.name}.step: in-place states must share one dtype,"
                                     f" got {x.dtype} for '{s}' and {state_dtype}")
        x0 = next(iter(bound.inputs.values()))
        decoder = Decoder(self.analysis, bound.sizes, batch=bound.batch, H=bound.sizes["H"],
                          device=x0.device, out_dtype=bound.out_dtype, state_dtype=state_dtype,
                          inplace=inplace and all(x.is_contiguous() for x in state.values()))
        return decoder, bool(single)

    def source(self, form: str = "recurrent", direction: str = "fwd",
               sizes: dict | None = None) -> str:
        """The Triton source of ``form`` ('recurrent' or 'chunk') and ``direction``: the
        generated recurrent kernel, or the chunked form's mapping of the spec onto its core
        kernels followed by their source, and, given ``sizes`` ({"K": 128, "V": 128}), the
        generated per-token map kernels (feature maps, gates, decays, readout) a call of
        those sizes runs around the core."""
        if direction not in ("fwd", "bwd"):
            raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
        if form == "chunk":
            try:
                return chunk_source(self.analysis, direction, sizes)
            except ChunkUnsupported as e:
                raise NotImplementedError(f"form='chunk': {e}") from None
        if form != "recurrent":
            raise NotImplementedError(f"no {form!r} kernel source; available: recurrent, chunk")
        return recurrent_source(self.analysis, direction)

    def reference(self, *, initial_state: dict | None = None, output_final_state: bool = False,
                  cu_seqlens: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                  cu_seqlens_memory: torch.Tensor | None = None, **tensors):
        """Run the reference interpreter (the test oracle) in ``dtype`` (float64 default).

        Same arguments as ``__call__`` (memory inputs of a cross-attention spec are
        ``[B, S, H, *dims]``, packed by ``cu_seqlens_memory`` as ``cu_seqlens`` packs the
        inputs); returns ``(o, final_state or None)`` in ``dtype``.
        """
        bound = self.bind(tensors, initial_state, cu_seqlens)
        o, final = run_reference(self.program, bound.inputs, bound.params, bound.sizes,
                                 initial_state=initial_state, cu_seqlens=cu_seqlens, dtype=dtype,
                                 memory=bound.memory, cu_seqlens_memory=cu_seqlens_memory)
        return o, (final if output_final_state else None)

    # ------------------------------------------------------------------ validation
    def bind(self, tensors: dict, initial_state: dict | None,
             cu_seqlens: torch.Tensor | None) -> Bound:
        """Check names, shapes, dtypes and devices of call arguments; infer every size."""
        p = self.program
        memory = getattr(p, "memory", {})
        names = [*p.inputs, *memory, *p.params]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{self.name}: missing argument(s) {', '.join(missing)}; "
                             f"expects inputs {', '.join(p.inputs)}"
                             + (f", memory inputs {', '.join(memory)}" if memory else "")
                             + (f" and params {', '.join(p.params)}" if p.params else ""))
        unknown = [n for n in tensors if n not in names]
        if unknown:
            raise ValueError(f"{self.name}: unknown argument(s) {', '.join(unknown)}; "
                             f"expects {', '.join(names)}")
        sizes: dict[str, int] = {}
        where: dict[str, str] = {}     # the argument each size came from
        device = None
        for kind, name, dims in self._arguments:
            x = tensors[name]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() \
                    or x.dim() != len(dims):
                self._bad_argument(kind, name, dims, x)
            if device is None:
                device = x.device
            elif x.device != device:
                raise ValueError(f"{self.name}: {kind} '{name}' is on {x.device} but other "
                                 f"arguments are on {device}")
            for d, n in zip(dims, x.shape):
                n = int(n)
                have = sizes.get(d)
                if have is None:
                    sizes[d], where[d] = n, name
                elif have != n:
                    raise ValueError(
                        f"{self.name}: size of {d} is {have} from "
                        f"{self._expected(where[d])} but {n} from {self._expected(name)}")
        self._check_declared_sizes(sizes)
        out_dtype = next((tensors[n].dtype for n, d in p.inputs.items() if "V" in d.dims),
                         next(iter(tensors.values())).dtype)
        batch = sizes.get("B", 1)
        if cu_seqlens is not None:
            batch = self._check_cu_seqlens(cu_seqlens, sizes, device)
        self._check_states(initial_state, sizes, batch, device)
        inputs = {n: tensors[n] for n in p.inputs}
        params = {n: tensors[n] for n in p.params}
        return Bound(inputs, params, sizes, batch, sizes.get("T", 0), out_dtype,
                     {n: tensors[n] for n in memory} or None)

    @functools.cached_property
    def _arguments(self) -> tuple:
        """``(kind, name, dims)`` of every tensor argument, leading dims first, in the
        order ``bind`` checks them."""
        p = self.program
        return tuple((kind, name, (*lead, *decl.dims))
                     for kind, table, lead in (
                         ("input", p.inputs, ("B", "T", "H")),
                         ("memory input", getattr(p, "memory", {}), ("B", "memory length", "H")),
                         ("param", p.params, ("H",)))
                     for name, decl in table.items())

    def _expected(self, name: str) -> str:
        """``'name' [B, T, H, K]``: an argument and the shape it must have."""
        dims = next(d for _, n, d in self._arguments if n == name)
        return f"'{name}' [{', '.join(dims)}]"

    def _bad_argument(self, kind: str, name: str, dims: tuple, x) -> None:
        """Raise the error for an argument that is no floating-point tensor of the right
        rank."""
        expect = f"[{', '.join(dims)}]"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: {kind} '{name}' must be a torch.Tensor "
                             f"{expect}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: {kind} '{name}' must be a floating-point "
                             f"tensor, got {x.dtype}")
        raise ValueError(f"{self.name}: {kind} '{name}' must have shape {expect}, "
                         f"got {tuple(x.shape)} ({x.dim()} dims)")

    def _check_declared_sizes(self, sizes: dict[str, int]) -> None:
        for d, expr in self.program.dims.items():
            if expr is None:
                continue
            missing = [str(s) for s in expr.free_symbols if str(s) not in sizes]
            if missing:
                raise ValueError(f"{self.name}: cannot size dim {d}: "
                                 f"{', '.join(missing)} not given by any tensor")
            value = int(expr.subs({sympy.Symbol(k, positive=True, integer=True): v
                                   for k, v in sizes.items()}))
            if d in sizes and sizes[d] != value:
                raise ValueError(f"{self.name}: dim {d} = {expr} = {value}, but a tensor "
                                 f"has {d} = {sizes[d]}")
            sizes[d] = value
        for d in self.program.dims:
            if d not in sizes:
                raise ValueError(f"{self.name}: dim {d} is used by no input or param, so its "
                                 "size is unknown; give it a size: `dim " + d + " = ...`")

    def _check_cu_seqlens(self, cu: torch.Tensor, sizes: dict, device) -> int:
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.is_floating_point():
            raise ValueError(f"{self.name}: cu_seqlens must be a 1-D integer tensor [N + 1]")
        if sizes.get("B", 1) != 1:
            raise ValueError(f"{self.name}: with cu_seqlens the batch size B must be 1 "
                             f"(sequences packed along T), got B = {sizes['B']}")
        values = cu.tolist()
        if len(values) < 2 or values[0] != 0 or values[-1] != sizes.get("T") or any(
                b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{self.name}: cu_seqlens must start at 0, never decrease and end "
                             f"at T = {sizes.get('T')}, got {values}")
        return len(values) - 1

    def _check_states(self, initial_state, sizes, batch, device) -> None:
        if initial_state is None:
            return
        p = self.program
        if not isinstance(initial_state, dict):
            raise ValueError(f"{self.name}: initial_state must be a dict state name -> tensor "
                             f"(states: {', '.join(p.states)})")
        wrong = set(initial_state) ^ set(p.states)
        if wrong:
            raise ValueError(f"{self.name}: initial_state must have exactly the states "
                             f"{', '.join(p.states)}, got {', '.join(initial_state)}")
        for s, decl in p.states.items():
            x = initial_state[s]
            want = (batch, sizes["H"], *(sizes[d] for d in decl.dims))
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{self.name}: initial_state['{s}'] must have shape "
                                 f"[N, H, {', '.join(decl.dims)}] = {want}, got {got}")
            if x.device != device:
                raise ValueError(f"{self.name}: initial_state['{s}'] is on {x.device}, "
                                 f"inputs on {device}")


def _read(text_or_path: str | Path) -> tuple[str, str | None]:
    if isinstance(text_or_path, Path):
        return text_or_path.read_text(), str(text_or_path)
    if "\n" not in text_or_path and text_or_path.endswith(".lin"):
        path = Path(text_or_path)
        if not path.exists():
            raise FileNotFoundError(f"spec file not found: {text_or_path}")
        return path.read_text(), str(path)
    return text_or_path, None


def load(text_or_path: str | Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE
         ) -> dict[str, Attention]:
    """Compile every spec in a text or ``.lin`` file; returns name -> ``Attention``
    (``chunk_size``: tokens per chunk of the chunked form, 16 to 128)."""
    text, filename = _read(text_or_path)
    out = {}
    for spec in parse(text, filename):
        if spec.name in out:
            raise SpecError(f"two specs are named '{spec.name}'", spec.span, spec.source,
                            filename=filename)
        out[spec.name] = Attention(spec, analyse(lower(spec, filename), filename), filename,
                                   chunk_size=chunk_size)
    return out


def compile(text_or_path: str | Path, *, name: str | None = None,  # noqa: A001
            chunk_size: int = DEFAULT_CHUNK_SIZE) -> Attention:
    """Compile a spec (text, or a path to a ``.lin`` file) into an ``Attention`` op.

    With several specs in one text, ``name`` picks one. ``chunk_size``: tokens per chunk of
    the chunked form (16, 32, 64 or 128; 64 by default, as fla).
    """
    specs = load(text_or_path, chunk_size=chunk_size)
    if name is None:
        if len(specs) > 1:
            raise ValueError(f"the text holds {len(specs)} specs ({', '.join(specs)}); "
                             "pick one with name=...")
        return next(iter(specs.values()))
    if name not in specs:
        raise ValueError(f"no spec named {name!r}; found {', '.join(specs)}")
    return specs[name]


__all__ = ["Attention", "compile", "load", "show_dims"]
