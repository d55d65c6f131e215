"""Launch generated kernels: Triton's interpreter for CPU tensors, the compiler for CUDA.

Triton decides at import time whether ``@triton.jit`` compiles or interprets (its standard
library functions are jit functions too), so the choice is made once per process:
``linforge`` turns the interpreter on (``TRITON_INTERPRET=1``) before triton is imported
when CUDA is unavailable. See ``ensure_backend``.
"""

from __future__ import annotations

import os
import sys

import torch


def ensure_backend() -> None:
    """Select Triton's interpreter when this process has no CUDA device.

    Must run before ``triton`` is imported; afterwards it only leaves things as they are.
    """
    if "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter in this process (read from the
    environment once triton is imported: triton itself decides at import)."""
    global _INTERPRETING
    if _INTERPRETING is not None:
        return _INTERPRETING
    value = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if "triton" in sys.modules:
        _INTERPRETING = value
    return value


_INTERPRETING: bool | None = None


#: set by ``benchmarks/preflight.py``: every launch is handed to it (kernel, grid, args,
#: constexprs) to compile for a GPU this machine may not have, and nothing runs
PREFLIGHT = None


def targets_gpu(device) -> bool:
    """Whether launches for tensors on ``device`` are compiled for a GPU (tile sizes, warps
    and dot precisions are chosen for one): CUDA tensors, or any under a preflight."""
    return getattr(device, "type", device) == "cuda" or PREFLIGHT is not None


def for_device(jit_fn, device) -> object:
    """The kernel to launch for tensors on ``device``; a clear error when the process
    compiles for the GPU but the tensors live on the CPU."""
    if getattr(device, "type", device) == "cpu" and not interpreting() and PREFLIGHT is None:
        raise ValueError(
            "linforge kernels got CPU tensors but Triton compiles for the GPU in this process; "
            "move the tensors to CUDA, or set TRITON_INTERPRET=1 before importing triton (or "
            "linforge) to run kernels on the CPU through Triton's interpreter")
    return jit_fn


def _signature(value) -> object:
    """What Triton specializes a launch on, for one argument."""
    if hasattr(value, "data_ptr"):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return (value == 1, value % 16 == 0, value >= 2 ** 31)
    return value


class Launcher:
    """Launches one jit kernel with little Python overhead (decode steps are one token).

    The first launch for an argument signature (dtypes, 16-byte alignment, integers equal
    to 1 or divisible by 16: what Triton specializes on) goes through Triton's normal path,
    which compiles; later launches call the compiled kernel directly. Under the interpreter
    every launch takes the normal path.
    """

    def __init__(self, jit_fn):
        self.fn = jit_fn
        self.names = list(jit_fn.arg_names)
        # (the interpreter's function has no ``params``; it takes every launch's own path)
        self.defaults = {q.name: q.default for q in getattr(jit_fn, "params", ())
                         if q.has_default}
        self.compiled: dict = {}

    def __call__(self, grid: tuple, *args, **constexprs) -> None:
        """``kernel[grid](*args, **constexprs)``; a GPU without the shared memory or
        registers a compiled kernel asks for gets an error that names the kernel and what
        to do, instead of Triton's."""
        from triton.runtime.errors import OutOfResources    # (triton is imported by now)

        if PREFLIGHT is not None:
            PREFLIGHT(self.fn, grid, args, {**self.defaults, **constexprs})
            return
        try:
            self._launch(grid, *args, **constexprs)
        except OutOfResources as e:
            raise RuntimeError(
                f"linforge: the generated kernel '{self.fn.__name__}' needs {e.required} "
                f"{e.name} per block and this GPU allows {e.limit} (its tiles: "
                f"{_tiles_of(constexprs)}). Narrower value tiles need less: set "
                "linforge.codegen.ops.FORCE_BLOCK_V = 16 (or 32) before the call; "
                "form='recurrent' runs every spec with little shared memory") from None

    def _launch(self, grid: tuple, *args, **constexprs) -> None:
        if interpreting():
            self.fn[grid](*args, **constexprs)
            return
        constexprs = {**{n: d for n, d in self.defaults.items() if n not in constexprs},
                      **constexprs}
        key = (tuple(_signature(a) for a in args), tuple(sorted(constexprs.items())))
        kernel = self.compiled.get(key)
        if kernel is None:
            self.compiled[key] = self.fn[grid](*args, **constexprs)
            return
        rest = [constexprs[n] for n in self.names[len(args):]]
        kernel[(*grid, 1, 1)[:3]](*args, *rest)


def _tiles_of(constexprs: dict) -> str:
    """The tile sizes among a launch's constexprs, for an error message."""
    tiles = {k: v for k, v in constexprs.items() if k in ("BK", "BV", "C", "SUB")}
    return ", ".join(f"{k}={v}" for k, v in tiles.items()) or "none"


class _NoGradContext:
    """Stands for autograd's ``ctx`` when a Function's forward runs outside autograd: it
    keeps the attributes the forward sets and saves nothing."""

    def __init__(self, n_inputs: int):
        self.needs_input_grad = (False,) * n_inputs

    def save_for_backward(self, *tensors) -> None:
        pass


def apply(function: type, *args):
    """``function.apply(*args)``, or its forward alone when no tensor argument needs a
    gradient (no_grad, inference): autograd's bookkeeping costs tens of microseconds a
    call, a large part of a short call's host time."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                       for a in args):
        return function.apply(*args)
    return function.forward(_NoGradContext(len(args)), *args)
