"""Readable text for each compiler stage (``linforge show --stage ast|ir|canonical``)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import sympy

from ..dsl import ast
from .analysis import Analysis
from .canonical import format_canonical
from .lower import show_dims
from .nodes import Node, Program
from .sympy_view import SympyView, format_node


def show_ast(spec: ast.Spec) -> str:
    """The syntax tree as an indented outline."""
    out: list[str] = []

    def emit(obj, indent: int, label: str = "") -> None:
        pad = "  " * indent + (f"{label}: " if label else "")
        if isinstance(obj, tuple):
            if not obj:
                return
            out.append(pad.rstrip() if label else pad)
            for x in obj:
                emit(x, indent + 1)
            return
        if not is_dataclass(obj):
            out.append(f"{pad}{obj!r}")
            return
        simple = {f.name: getattr(obj, f.name) for f in fields(obj)
                  if f.name not in ("span", "source", "dim_spans", "flag_spans", "func_span",
                                    "target_span", "index_spans")}
        children = {k: v for k, v in simple.items() if is_dataclass(v) or isinstance(v, tuple)
                    and v and is_dataclass(v[0])}
        scalars = ", ".join(f"{k}={v!r}" for k, v in simple.items() if k not in children)
        where = f"  @{obj.span.line}:{obj.span.column}" if hasattr(obj, "span") else ""
        out.append(f"{pad}{type(obj).__name__}({scalars}){where}")
        for k, v in children.items():
            emit(v, indent + 1, k)

    emit(spec, 0)
    return "\n".join(out)


def _decls(p: Program) -> list[str]:
    lines = [f"attention {p.name}" + (" noncausal" if p.noncausal else "")]
    dims = ", ".join(d if s is None else f"{d} = {s}" for d, s in p.dims.items())
    lines.append(f"  dims    {dims}")
    for label, table in (("inputs", p.inputs), ("memory", p.memory), ("params", p.params),
                         ("state", p.states)):
        if table:
            body = ", ".join(f"{d.name}{_decl_dims(d) if d.dims else ''}"
                             for d in table.values())
            lines.append(f"  {label:<7} {body}")
    return lines


def _decl_dims(d) -> str:
    """``[K, V]``, or ``[t < N, P]`` for a position-indexed param."""
    return "[" + ", ".join(f"t < {x}" if x == d.position else x for x in d.dims) + "]"


def version_names(p: Program) -> dict[tuple[str, int], str]:
    """Display names of state versions: ``S`` before the step, ``S'`` after, ``S^1`` between."""
    names = {}
    for s in p.states:
        final = p.final_version(s)
        for v in range(final + 1):
            names[(s, v)] = s if v == 0 else (f"{s}'" if v == final else f"{s}^{v}")
    return names


def show_ir(p: Program) -> str:
    """Declarations, then each update (with state versions) and the output, with its line."""
    lines = _decls(p)
    names = version_names(p)
    for u in p.updates:
        text = format_node(u.value, names)
        lines.append(f"  {names[(u.state, u.version)]} = {text}    {show_dims(u.value.dims)}"
                     f"    # line {u.span.line}")
    lines.append(f"  o = {format_node(p.output, names)}    {show_dims(p.output.dims)}"
                 f"    # line {p.output_span.line}")
    return "\n".join(lines)


def simplifier():
    """A function Node -> simplified text that shares symbol names across calls."""
    view = SympyView()

    def simplify(n: Node) -> str:
        return str(sympy.simplify(view.to_sympy(n)))
    return simplify


def show_canonical(a: Analysis) -> str:
    """Each state's canonical update with its class, normalizers, readout and forms."""
    p = a.program
    lines = _decls(p)
    simplify = simplifier()
    for s, u in a.updates.items():
        lines.append(f"  {format_canonical(u, simplify)}")
        lines.append(f"      class: {a.classes[s].value}")
    for nz in a.normalizers:
        ride = "rides along as an extra column" if nz.rides_along else "separate inputs"
        lines.append(f"  normalizer: {nz.vector} shares the transition of {nz.matrix} ({ride})")
    reads = ", ".join(f"{s} {w}" for s, w in a.readout.reads.items())
    lines.append(f"  o = {format_node(p.output, version_names(p))}")
    lines.append(f"      readout: {a.readout.kind.value}; reads {reads}"
                 + ("; with a state-free term" if a.readout.skip else ""))
    lines.append(f"  transition class: {a.transition_class.value}")
    lines.append(f"  forms: {', '.join(a.forms) or 'none yet (reference interpreter only)'}")
    for b in a.kernel_blockers:
        lines.append(f"      no kernel yet for {b}")
    return "\n".join(lines)
