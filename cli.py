"""Command line: ``linforge show SPEC``, ``linforge check SPEC``, ``linforge list``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import library
from .api import load
from .dsl import SpecError, parse
from .ir.show import show_ast, show_canonical, show_ir

STAGES = ("ast", "ir", "canonical")


def _spec_text(spec: str) -> tuple[str, str]:
    """A library name or a path -> (text, filename)."""
    path = Path(spec)
    if path.exists():
        return path.read_text(), str(path)
    if spec in library.names():
        return library.source(spec), str(library.path(spec))
    raise SystemExit(f"linforge: no spec file or library spec named {spec!r} "
                     f"(library: {', '.join(library.names())})")


def _show(args) -> int:
    text, filename = _spec_text(args.spec)
    if args.stage == "ast":
        specs = [s for s in parse(text, filename) if args.name in (None, s.name)]
        print("\n\n".join(show_ast(s) for s in specs))
        return 0
    attns = load(Path(filename))
    for name, attn in attns.items():
        if args.name not in (None, name):
            continue
        if args.stage == "ir":
            print(show_ir(attn.program))
        elif args.stage == "canonical":
            print(show_canonical(attn.analysis))
        else:
            print(attn.source(args.form, args.direction))
        print()
    return 0


def _check(args) -> int:
    text, filename = _spec_text(args.spec)
    for name, attn in load(Path(filename)).items():
        print(f"{name}: ok ({attn.analysis.transition_class.value}; "
              f"forms: {_forms(attn.analysis)})")
        for b in attn.analysis.kernel_blockers:
            print(f"  no kernel yet for {b}")
    return 0


def _forms(analysis) -> str:
    """The forms a spec's kernels can take, or why only the reference interpreter runs it."""
    return ", ".join(analysis.forms) or "reference only"


def _spec_lines(text: str, name: str) -> int:
    """Lines of the spec ``name`` in ``text`` (its `attention` line to its last statement),
    comments and blank lines left out; a file may hold several specs."""
    spec = next((s for s in parse(text) if s.name == name), None)
    lines = text.splitlines()
    if spec is None or not spec.body:
        return sum(1 for x in lines if x.strip() and not x.strip().startswith("#"))
    last = max(stmt.span.line for stmt in spec.body)
    return sum(1 for x in lines[spec.span.line - 1:last]
               if x.strip() and not x.strip().startswith("#"))


def _paper(text: str) -> str:
    """The citation of a library header: authors (year), "title", from the second line on."""
    import re

    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    joined = " ".join(header[1:])
    m = re.match(r'(.*?\((?:19|20)\d\d\),\s*"[^"]+")', joined)
    return m.group(1) if m else (header[1] if len(header) > 1 else "")


def _list(args) -> int:
    rows = []
    for name in library.names():
        text = library.source(name)
        try:
            lines = _spec_lines(text, name)
            attn = library.get(name)
            cls = attn.analysis.transition_class.value
            forms = _forms(attn.analysis)
        except SpecError as e:  # a broken library spec is shown, not hidden
            lines = sum(1 for x in text.splitlines() if x.strip() and not x.strip().startswith("#"))
            cls, forms = f"error: {e.reason}", ""
        rows.append((name, cls, str(lines), forms))
    if args.markdown:
        print("| model | paper | lines | transition class | forms |")
        print("|---|---|---|---|---|")
        for name, cls, lines, forms in rows:
            print(f"| {name} | {_paper(library.source(name))} | {lines} | {cls} | {forms} |")
        return 0
    head = ("name", "transition class", "lines", "forms")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``linforge`` console script."""
    ap = argparse.ArgumentParser(prog="linforge", description="linear-attention compiler")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a compiler stage of a spec")
    show.add_argument("spec", help="a .lin file or a library spec name")
    show.add_argument("--stage", default="ir", choices=(*STAGES, "triton"))
    show.add_argument("--name", help="which spec, when the file holds several")
    show.add_argument("--form", default="recurrent", help="with --stage triton")
    show.add_argument("--direction", default="fwd", choices=("fwd", "bwd"),
                      help="with --stage triton")
    show.set_defaults(run=_show)
    check = sub.add_parser("check", help="compile a spec and report its class and forms")
    check.add_argument("spec")
    check.set_defaults(run=_check)
    lst = sub.add_parser("list", help="list the library's specs")
    lst.add_argument("--markdown", action="store_true", help="a markdown table with papers")
    lst.set_defaults(run=_list)
    args = ap.parse_args(argv)
    try:
        return args.run(args)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    except BrokenPipeError:  # `linforge show ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
