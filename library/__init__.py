"""The spec library: one ``.lin`` file per model, each naming its paper in a header comment."""

from __future__ import annotations

from pathlib import Path

LIBRARY_DIR = Path(__file__).parent


def names() -> list[str]:
    """Names of the library's specs, sorted."""
    return sorted(p.stem for p in LIBRARY_DIR.glob("*.lin"))


def path(name: str) -> Path:
    """Path of the library spec ``name``."""
    p = LIBRARY_DIR / f"{name}.lin"
    if not p.exists():
        raise KeyError(f"no library spec named {name!r}; available: {', '.join(names())}")
    return p


def source(name: str) -> str:
    """The text of the library spec ``name``."""
    return path(name).read_text()


def get(name: str, **options):
    """Compile the library spec ``name`` into an ``Attention`` (``options``: those of
    ``linforge.compile``, e.g. ``chunk_size``)."""
    from ..api import compile as compile_spec

    return compile_spec(path(name), name=name, **options)


__all__ = ["get", "names", "path", "source"]
