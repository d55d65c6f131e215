"""Command line: ``linforge show SPEC``, ``linforge check SPEC``, ``linforge bench SPEC``,
``linforge list``."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import torch

from . import library
from .api import load
from .bench import CPU_SHAPE, GPU_SHAPE, bench
from .check import Shape, check
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
        elif args.K or args.V or args.dim:    # the chunked form's map kernels at these sizes
            sizes = {n: v for n, v in (("K", args.K), ("V", args.V)) if v}
            sizes.update(_dim_sizes(args))
            try:
                print(attn.source(args.form, args.direction, sizes=sizes))
            except ValueError as e:
                raise SystemExit(f"linforge: {e}") from None
        else:
            print(attn.source(args.form, args.direction))
        print()
    return 0


def _check(args) -> int:
    text, filename = _spec_text(args.spec)
    failed = False
    for name, attn in load(Path(filename)).items():
        if args.name not in (None, name):
            continue
        print(f"{name}: ok ({attn.analysis.transition_class.value}; "
              f"forms: {_forms(attn)})")
        for b in attn.analysis.kernel_blockers:
            print(f"  no kernel yet for {b}")
        if args.no_run or attn.analysis.kernel_blockers or attn.program.memory:
            continue
        with _Progress(name) as progress:
            rows = check(attn, _shape(args), dtype=_DTYPES[args.dtype or "float32"],
                         device=_device(args), progress=progress)
        _print_check(rows)
        failed |= any(r.status == "FAIL" for r in rows)
    return 1 if failed else 0


def _print_check(rows) -> None:
    def num(x):
        return "-" if x is None else f"{x:.1e}"
    table = [("form", "status", "max err o", "state", "grads", "time", "")]
    table += [(r.form, r.status, num(r.error_o), num(r.error_state), num(r.error_grad),
               "-" if r.seconds is None else f"{r.seconds:.2f} s", r.note) for r in rows]
    _print_table(table, indent="  ")
    print("  (max |kernel - reference| / max(|reference|, 1) over o, the final states and the "
          "gradients of every input, param and initial state; time includes compilation)")


def _bench(args) -> int:
    text, filename = _spec_text(args.spec)
    device = _device(args)
    on_gpu = device.startswith("cuda")
    shape = _shape(args, GPU_SHAPE if on_gpu else CPU_SHAPE)
    dtype = _DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    for name, attn in load(Path(filename)).items():
        if args.name not in (None, name):
            continue
        print(f"{name}: B={shape.B} T={shape.T} H={shape.H} K={shape.K} V={shape.V} "
              f"{str(dtype).replace('torch.', '')} on {device}")
        if not on_gpu:
            print("  no GPU: kernels run in Triton's interpreter; these times are not kernel "
                  "performance")
        if attn.analysis.kernel_blockers or attn.program.memory:
            print("  reference only: no kernel to time")
            continue
        with _Progress(name) as progress:
            rows = bench(attn, shape, dtype=dtype, device=device, progress=progress,
                         reps=args.reps)
        ms = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        table = [("", "form", "linforge ms", "fla ms", "")]
        table += [(r.what, r.form, ms(r.linforge_ms), ms(r.fla_ms), r.note) for r in rows]
        _print_table(table, indent="  ")
    return 0


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def _device(args) -> str:
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dim_sizes(args) -> list[tuple[str, int]]:
    """The ``--dim NAME=SIZE`` options."""
    dims = []
    for item in args.dim or ():
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise SystemExit(f"linforge: --dim takes NAME=SIZE (such as M=16), got {item!r}")
        dims.append((name, int(value)))
    return dims


def _shape(args, default: Shape = Shape()) -> Shape:
    dims = _dim_sizes(args)
    return Shape(B=args.B or default.B, T=args.T or default.T, H=args.H or default.H,
                 K=args.K or default.K, V=args.V or default.V, dims=tuple(dims))


def _print_table(rows, indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


class _Progress:
    """What is running now, on stderr: a spinner line on a terminal, one line per stage
    otherwise. Kernel generation and compilation take seconds; this shows they are on."""

    FRAMES = "|/-\\"

    def __init__(self, name: str):
        self.name, self.text, self.tty = name, "", sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = None

    def __call__(self, text: str) -> None:
        self.text = text
        if not self.tty:
            print(f"  ... {self.name}: {text}", file=sys.stderr, flush=True)

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.1):
            sys.stderr.write(f"\r{self.FRAMES[i % 4]} {self.name}: {self.text}\033[K")
            sys.stderr.flush()
            i += 1

    def __enter__(self):
        if self.tty:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _forms(attn) -> str:
    """The forms a spec's kernels can take (marked when a torch pre-pass computes its values
    across heads or tokens first), or that only the reference interpreter runs it."""
    info = attn.info()
    forms = ", ".join(info["forms"]) or "reference only"
    return f"{forms} (pre-pass)" if info["prepass"] else forms


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
            forms = _forms(attn)
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
    for size in ("K", "V"):
        show.add_argument(f"--{size}", type=int, help=f"with --stage triton --form chunk: size "
                          f"of {size}, to print the generated map kernels of such a call")
    show.add_argument("--dim", action="append", metavar="NAME=SIZE",
                      help="with --K/--V: size of another dim (repeatable)")
    show.set_defaults(run=_show)
    check_p = sub.add_parser("check", help="compile a spec, report its class and forms, and "
                             "run every kernel form against the reference on random inputs")
    check_p.add_argument("spec", help="a .lin file or a library spec name")
    check_p.add_argument("--name", help="which spec, when the file holds several")
    check_p.add_argument("--no-run", action="store_true", help="compile and report only")
    bench_p = sub.add_parser("bench", help="time a spec's kernels (beside fla when installed)")
    bench_p.add_argument("spec", help="a .lin file or a library spec name")
    bench_p.add_argument("--name", help="which spec, when the file holds several")
    bench_p.add_argument("--reps", type=int, default=3, help="runs per CPU timing")
    for p in (check_p, bench_p):
        for size in ("B", "T", "H", "K", "V"):
            p.add_argument(f"--{size}", type=int, help=f"size of {size}")
        p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                       help="size of another dim (repeatable)")
        p.add_argument("--dtype", choices=tuple(_DTYPES), help="dtype of q, k, v (gates stay "
                       "fp32); check: float32, bench: bfloat16 on a GPU")
        p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    check_p.set_defaults(run=_check)
    bench_p.set_defaults(run=_bench)
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
