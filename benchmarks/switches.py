"""The benchmarks' ``--set NAME=VALUE``: a run with a switch of ``linforge.codegen.chunk_op``
changed (``WY_INVERSE=0``, ``DELTA_HALF_DOT=0``), or one launch option of one kernel
(``delta_states.num_warps=4``: an entry of ``chunk_op.KERNEL_OPTIONS``)."""

from __future__ import annotations

import linforge.codegen.chunk_op as chunk_op


def apply_settings(settings: list[str]) -> dict:
    """Applies ``NAME=VALUE`` / ``KERNEL.OPTION=VALUE`` strings (integer values); returns
    what was set, by the names given."""
    applied = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"--set {item!r}: expected NAME=INTEGER")
        kernel, dot, option = name.partition(".")
        if dot:
            chunk_op.KERNEL_OPTIONS[kernel] = {**chunk_op.KERNEL_OPTIONS.get(kernel, {}),
                                               option: int(value)}
            applied[name] = int(value)
            continue
        if not hasattr(chunk_op, name):
            raise SystemExit(f"--set: linforge.codegen.chunk_op has no switch {name!r}")
        setattr(chunk_op, name, type(getattr(chunk_op, name))(int(value)))
        applied[name] = getattr(chunk_op, name)
    return applied
