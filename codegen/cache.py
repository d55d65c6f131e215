"""Kernel cache: generated source and loaded kernels, keyed by a hash of what they depend on.

In memory per process, and on disk under ``$LINFORGE_CACHE_DIR`` or
``$XDG_CACHE_HOME/linforge`` (``~/.cache/linforge``), so a second process reuses the source
file; Triton's own cache, keyed by that source, then reuses the compiled binary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("linforge.cache")

_modules: dict[str, object] = {}


def _codegen_fingerprint() -> str:
    """Hash of the code generator's own source, so editing it invalidates cached kernels."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for sub in ("codegen", "ir"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


CODEGEN_VERSION = _codegen_fingerprint()


def cache_dir() -> Path:
    """The on-disk cache directory (created on first use)."""
    root = os.environ.get("LINFORGE_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "linforge"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*parts: str) -> str:
    """A short stable hash of the parts (canonical IR text, form, direction, version...)."""
    h = hashlib.sha256(CODEGEN_VERSION.encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()[:20]


def load_module(key: str, name: str, make_source: Callable[[], str]):
    """The module holding kernel source ``name``, generated once per key across processes."""
    if key in _modules:
        return _modules[key]
    path = cache_dir() / f"{name}_{key}.py"
    if path.exists():
        log.debug("kernel source cache hit: %s", path)
    else:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(make_source())
        tmp.replace(path)  # atomic: concurrent processes never see half a file
        log.debug("kernel source written: %s", path)
    mod_name = f"linforge_kernels.{name}_{key}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    _modules[key] = module
    return module


def clear_memory() -> None:
    """Forget loaded modules (tests use it to check the disk cache)."""
    _modules.clear()
