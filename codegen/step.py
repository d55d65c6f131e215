"""Emit the Triton statements of one time step of a Program (its updates and its output).

Every IR value becomes a register tensor whose axes are the value's dims, in order (a
``[K, V]`` state is a ``[BK, BV]`` block). Elementwise subtrees are printed through the
sympy Triton printer; a value used more than once, and every non-elementwise operation,
gets its own variable. Reductions and contractions mask the padded lanes of their dim, so
blocks padded to a power of two never leak into results.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..ir.nodes import ELEMENTWISE, L2NORM_EPS, Node, Op, Program
from ..ir.sympy_view import SympyView, format_node
from .printer import print_triton


@dataclass
class Naming:
    """How leaves read in the kernel: variable names for inputs, params, states and indices."""

    inputs: dict[str, str]
    params: dict[str, str]
    states: dict[tuple[str, int], str]
    pos: str = "t_f"
    head: str = "h_f"
    sizes: dict[str, str] = field(default_factory=dict)


def block(dim: str) -> str:
    """Name of the constexpr block size of a dim (``BK`` for ``K``)."""
    return f"B{dim}"


def arange(dim: str) -> str:
    """Name of the lane index vector of a dim."""
    return f"r_{dim}"


def mask(dim: str) -> str:
    """Name of the lane mask vector of a dim."""
    return f"m_{dim}"


def view(expr: str, src: tuple[str, ...], dst: tuple[str, ...]) -> str:
    """Index ``expr`` (axes ``src``) so it broadcasts against axes ``dst`` (``src`` within)."""
    if src == dst or not src:
        return expr
    order = [d for d in dst if d in src]
    if order != list(src):
        perm = ", ".join(str(src.index(d)) for d in order)
        expr = f"tl.permute({expr}, ({perm}))" if len(src) > 2 else f"tl.trans({expr})"
    if len(order) == len(dst):
        return expr
    index = ", ".join(":" if d in src else "None" for d in dst)
    return f"{expr}[{index}]"


class StepEmitter:
    """Writes Triton statements for IR nodes into ``lines``; one variable per kept value."""

    def __init__(self, program: Program, naming: Naming, roots: list[Node], indent: str):
        self.program = program
        self.naming = naming
        self.indent = indent
        self.lines: list[str] = []
        self.vars: dict[Node, str] = {}
        self.counter = 0
        uses: Counter = Counter()
        for r in roots:
            for n in r.walk():
                for a in n.args:
                    uses[a] += 1
        # values kept in variables: non-elementwise ops, and elementwise values used twice
        self.keep = {n for n in uses if n.op not in ELEMENTWISE or uses[n] > 1}
        self.keep |= set(roots)

    # -------------------------------------------------------------- helpers
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)

    def comment_for(self, n: Node) -> None:
        if n.span is not None:
            self.emit(f"# {self.program.line_of(n.span)}")

    def masked(self, expr: str, dims: tuple[str, ...], dim: str, fill: str = "0.0") -> str:
        return f"tl.where({view(mask(dim), (dim,), dims)}, {expr}, {fill})"

    # -------------------------------------------------------------- values
    def __call__(self, n: Node) -> str:
        """The variable (or literal) holding ``n``, emitting what it needs first."""
        if n in self.vars:
            return self.vars[n]
        name = self._leaf(n)
        if name is None:
            name = self._compute(n)
        self.vars[n] = name
        return name

    def _leaf(self, n: Node) -> str | None:
        nm = self.naming
        if n.op is Op.INPUT:
            return nm.inputs[n.attr]
        if n.op is Op.PARAM:
            return nm.params[n.attr]
        if n.op is Op.STATE:
            return nm.states[n.attr]
        if n.op is Op.POS:
            return nm.pos
        if n.op is Op.HEAD:
            return nm.head
        if n.op is Op.HEADS:
            return nm.sizes["H"]
        if n.op is Op.SIZE:
            return nm.sizes[n.attr]
        if n.op is Op.CONST:
            return repr(float(n.attr))
        return None

    def _compute(self, n: Node) -> str:
        op = n.op
        if op in ELEMENTWISE:
            kv = SympyView(stops=self.keep)
            expr = kv.to_sympy(n)
            names = {s: view(self(leaf), leaf.dims, n.dims) for leaf, s in kv.symbols.items()}
            text = print_triton(expr, names)
            if n.dims and not any(leaf.dims == n.dims for leaf in kv.symbols):
                # every operand is smaller than the result: broadcast explicitly
                text = f"({text}) + tl.zeros([{', '.join(block(d) for d in n.dims)}], " \
                       "dtype=tl.float32)"
            var = self.fresh("e")
            self.emit(f"{var} = {text}  # {_short(format_node(n))}")
            return var
        a = [self(x) for x in n.args]
        var = self.fresh(op.name.lower())
        if op is Op.CONTRACT:
            x, y = n.args
            d = n.attr
            joint = x.dims + tuple(z for z in y.dims if z not in x.dims)
            prod = f"{view(a[0], x.dims, joint)} * {view(a[1], y.dims, joint)}"
            rest = tuple(z for z in joint if z != d)
            text = f"tl.sum({self.masked(prod, joint, d)}, axis={joint.index(d)})"
            self.emit(f"{var} = {view(text, rest, n.dims) if rest != n.dims else text}"
                      f"  # {_short(format_node(n))}")
        elif op is Op.OUTER:
            x, y = n.args
            self.emit(f"{var} = {view(a[0], x.dims, n.dims)} * {view(a[1], y.dims, n.dims)}")
        elif op in (Op.SUM, Op.NORM, Op.L2NORM, Op.SOFTMAX):
            (x,) = n.args
            d = n.attr
            axis = x.dims.index(d)
            keep = ", keep_dims=True" if len(x.dims) > 1 else ""
            if op is Op.SUM:
                self.emit(f"{var} = tl.sum({self.masked(a[0], x.dims, d)}, axis={axis})")
            elif op is Op.NORM:
                sq = self.masked(f"{a[0]} * {a[0]}", x.dims, d)
                self.emit(f"{var} = tl.sqrt(tl.sum({sq}, axis={axis}))")
            elif op is Op.L2NORM:
                sq = self.masked(f"{a[0]} * {a[0]}", x.dims, d)
                self.emit(f"{var} = {a[0]} / tl.sqrt(tl.sum({sq}, axis={axis}{keep}) + "
                          f"{L2NORM_EPS!r})")
            else:
                xm = self.masked(a[0], x.dims, d, "float('-inf')")
                self.emit(f"{var} = tl.exp({xm} - tl.max({xm}, axis={axis}{keep}))")
                self.emit(f"{var} = {var} / tl.sum({var}, axis={axis}{keep})")
        elif op is Op.TAYLOR2:
            (x,) = n.args
            src, dst = n.attr
            self.emit(f"# taylor2: [1, x, vec(x x^T) / sqrt(2)] over {dst} = 1 + {src} + "
                      f"{src}*{src}")
            f, i, j = self.fresh("tf"), self.fresh("ti"), self.fresh("tj")
            size = src  # the constexpr size of the source dim
            self.emit(f"{f} = {arange(dst)} - 1 - {size}")
            self.emit(f"{i} = tl.where({f} >= 0, {f} // {size}, {arange(dst)} - 1)")
            self.emit(f"{j} = tl.where({f} >= 0, {f} % {size}, 0)")
            gi = f"tl.sum(tl.where({arange(src)}[None, :] == {i}[:, None], {a[0]}[None, :], 0.0)" \
                 ", axis=1)"
            gj = gi.replace(f"== {i}[:, None]", f"== {j}[:, None]")
            self.emit(f"{var} = tl.where({arange(dst)} == 0, 1.0, tl.where({f} >= 0, "
                      f"{gi} * {gj} * {2 ** -0.5!r}, {gi}))")
            self.emit(f"{var} = tl.where({mask(dst)}, {var}, 0.0)")
        else:  # pragma: no cover - every op of ir.nodes.Op is handled above
            raise NotImplementedError(f"codegen: no rule for {op}")
        return var


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
