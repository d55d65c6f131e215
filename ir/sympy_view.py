"""The elementwise parts of the IR as sympy expressions, and a readable infix printer.

``to_sympy`` turns a maximal elementwise subtree into a sympy expression whose free symbols
stand for its non-elementwise leaves (inputs, params, contractions, ...). Symbols are named
after what they stand for, so ``str`` of the expression reads like the spec.
"""

from __future__ import annotations

import sympy

from .functions import ELEMENTWISE
from .nodes import ELEMENTWISE as ELEMENTWISE_OPS
from .nodes import Node, Op

_PREC = {Op.ADD: 1, Op.SUB: 1, Op.MUL: 2, Op.DIV: 2, Op.CONTRACT: 2, Op.NEG: 3, Op.POW: 4}


def format_node(n: Node, state_names: dict[tuple[str, int], str] | None = None) -> str:
    """Infix text of a node, close to spec syntax (``exp(g) * S - outer(k, k @ S)``)."""

    def fmt(n: Node, parent: int = 0, right: bool = False) -> str:
        op = n.op
        if op in (Op.INPUT, Op.PARAM, Op.SIZE, Op.MEMORY):
            return n.attr
        if op is Op.PARAM_AT:
            return f"{n.attr}[t]"
        if op is Op.LENGTH:
            return "T"
        if op in (Op.OVER_HEADS, Op.OVER_TOKENS):
            return f"{n.attr}({fmt(n.args[0])}, {'H' if op is Op.OVER_HEADS else 'T'})"
        if op is Op.STATE:
            if state_names and n.attr in state_names:
                return state_names[n.attr]
            name, version = n.attr
            return name if version == 0 else f"{name}^{version}"
        if op is Op.CONST:
            v = n.attr
            return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)
        if op in (Op.HEAD, Op.HEADS, Op.POS):
            return op.value
        if op is Op.CALL:
            return f"{n.attr}({fmt(n.args[0])})"
        if op in (Op.MAX, Op.MIN, Op.OUTER):
            return f"{op.value}({fmt(n.args[0])}, {fmt(n.args[1])})"
        if op in (Op.SUM, Op.NORM, Op.L2NORM, Op.SOFTMAX):
            x = n.args[0]
            return f"{op.value}({fmt(x)})" if len(x.dims) == 1 else \
                f"{op.value}({fmt(x)}, {n.attr})"
        if op is Op.TAYLOR2:
            return f"taylor2({fmt(n.args[0])})"
        if op is Op.NEG:
            text = "-" + fmt(n.args[0], _PREC[Op.NEG])
        elif op is Op.MUL and n.args[0] == Node(Op.CONST, (), (), 1.0):
            return fmt(n.args[1], parent, right)  # a dim relabelling (see lower._transpose_to)
        else:
            prec = _PREC[op]
            sym = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "**",
                   Op.CONTRACT: "@"}[op]
            # a product inside a contraction gets parentheses, for readers
            inner = prec + 1 if op is Op.CONTRACT else prec
            a = fmt(n.args[0], inner + (op is Op.POW), False)
            b = fmt(n.args[1], inner + (op is not Op.POW), True)
            text = f"{a} {sym} {b}"
        prec = _PREC[op]
        return f"({text})" if prec < parent or (prec == parent and right) else text

    return fmt(n)


class SympyView:
    """Maps IR subtrees to sympy and back; one instance keeps symbol names consistent."""

    def __init__(self, stops=frozenset()):
        self.symbols: dict[Node, sympy.Symbol] = {}
        self.leaves: dict[sympy.Symbol, Node] = {}
        self.stops = stops  # values kept as symbols even when elementwise

    def symbol(self, n: Node) -> sympy.Symbol:
        if n not in self.symbols:
            name = format_node(n)
            while sympy.Symbol(name, real=True) in self.leaves:
                name += "'"
            s = sympy.Symbol(name, real=True)
            self.symbols[n], self.leaves[s] = s, n
        return self.symbols[n]

    def to_sympy(self, n: Node, root: Node | None = None) -> sympy.Expr:
        """The elementwise expression of ``n``; non-elementwise parts, and values in
        ``stops`` other than ``root`` (default ``n``), become symbols."""
        root = n if root is None else root
        op = n.op
        if op is Op.CONST:
            v = n.attr
            return sympy.Integer(int(v)) if v == int(v) else sympy.Float(v)
        if op not in ELEMENTWISE_OPS or (n is not root and n in self.stops):
            return self.symbol(n)
        a = [self.to_sympy(x, root) for x in n.args]
        if op is Op.ADD:
            return a[0] + a[1]
        if op is Op.SUB:
            return a[0] - a[1]
        if op is Op.MUL:
            return a[0] * a[1]
        if op is Op.DIV:
            return a[0] / a[1]
        if op is Op.POW:
            return a[0] ** a[1]
        if op is Op.NEG:
            return -a[0]
        if op is Op.MAX:
            return sympy.Max(a[0], a[1])
        if op is Op.MIN:
            return sympy.Min(a[0], a[1])
        return ELEMENTWISE[n.attr].sympy_fn(a[0])


def is_one(n: Node) -> bool:
    """True when the elementwise value of ``n`` is provably the constant 1."""
    return sympy.simplify(SympyView().to_sympy(n) - 1) == 0


def is_zero(n: Node) -> bool:
    """True when the elementwise value of ``n`` is provably the constant 0."""
    return sympy.simplify(SympyView().to_sympy(n)) == 0


def equal(a: Node, b: Node) -> bool:
    """True when two nodes provably compute the same elementwise value."""
    if a == b:
        return True
    if set(a.dims) != set(b.dims):
        return False
    view = SympyView()
    return sympy.simplify(view.to_sympy(a) - view.to_sympy(b)) == 0
