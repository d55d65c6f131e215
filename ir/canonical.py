"""Canonicalization: each state's updates in a step as ``S' = T(S) + sum_i outer(x_i, y_i)``.

The transition ``T`` is kept as a sum of terms: ``scale * S`` (``scale`` a scalar, a vector
over the state's rows, or a full matrix) plus rank-one terms ``outer(x, w @ S)``. Several
updates of one state compose (later updates see the linear form of earlier ones). An update
that is not linear in its state raises ``SpecError`` pointing at the offending operation.

Pre: a lowered ``Program``. Post: one ``CanonicalUpdate`` per state, with ``T`` free of any
other state, the S-free part split into outer products where it is a sum of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..dsl.errors import Span, SpecError
from .lower import show_dims
from .nodes import Node, Op, Program, const
from .sympy_view import format_node


@dataclass(frozen=True)
class RankOne:
    """The transition term ``outer(x, w @ S)`` (``x * (w @ z)`` for a vector state)."""

    x: Node
    w: Node


@dataclass(frozen=True)
class Outer:
    """An input term ``outer(x, y)`` of a matrix state (``y`` is None for a vector state)."""

    x: Node
    y: Node | None


@dataclass(frozen=True)
class CanonicalUpdate:
    """``S' = scale * S + sum outer(x, w @ S) + sum outer(x_i, y_i)`` for one state.

    ``inputs`` is None when the S-free part is not a sum of outer products; ``forcing`` always
    holds that part as one node (None when the update adds nothing).
    """

    state: str
    dims: tuple[str, ...]
    scale: Node
    rank_one: tuple[RankOne, ...]
    inputs: tuple[Outer, ...] | None
    forcing: Node | None
    span: Span | None = field(default=None, compare=False)


# ------------------------------------------------------------------ linear forms
@dataclass(frozen=True)
class _Scale:
    coef: Node


@dataclass(frozen=True)
class _Read:
    """``w @ S``: a value over the state's columns (a scalar for a vector state)."""

    w: Node


@dataclass(frozen=True)
class _LF:
    """A value that is linear in one state: ``sum(terms) + rest`` with ``dims``."""

    dims: tuple[str, ...]
    terms: tuple
    rest: Node | None


def _mul(a: Node, b: Node) -> Node:
    if a.op is Op.CONST and a.attr == 1.0:
        return b
    if b.op is Op.CONST and b.attr == 1.0:
        return a
    dims = a.dims if set(b.dims) <= set(a.dims) else b.dims
    return Node(Op.MUL, dims, (a, b), None, a.span or b.span)


def _add(a: Node | None, b: Node | None, dims=None, sub: bool = False) -> Node | None:
    if b is None:
        return a
    if a is None:
        return Node(Op.NEG, b.dims, (b,), None, b.span) if sub else b
    dims = dims or (a.dims if set(b.dims) <= set(a.dims) else b.dims)
    return Node(Op.SUB if sub else Op.ADD, dims, (a, b), None, a.span)


def _neg(a: Node) -> Node:
    return Node(Op.NEG, a.dims, (a,), None, a.span)


def _inv(a: Node) -> Node:
    return Node(Op.DIV, a.dims, (const(1.0), a), None, a.span)


class Linearizer:
    """Rewrites expressions of one state into linear forms, or explains why they are not."""

    def __init__(self, program: Program, state: str, filename: str | None = None):
        self.program = program
        self.state = state
        self.dims = program.states[state].dims
        self.filename = filename
        self.versions: dict[int, _LF] = {0: _LF(self.dims, (_Scale(const(1.0)),), None)}
        self.memo: dict[Node, _LF] = {}

    def error(self, reason: str, node: Node, hint: str | None = None) -> SpecError:
        return SpecError(reason, node.span, self.program.source, hint=hint,
                         filename=self.filename)

    def not_linear(self, node: Node, what: str) -> SpecError:
        s = self.state
        return self.error(f"the update of '{s}' is not linear in '{s}': {what}", node,
                          hint=f"a state update must have the form {s} = T({s}) + "
                               f"(terms without {s}), with T linear")

    def depends(self, n: Node) -> bool:
        return n.reads_state(self.state)

    def __call__(self, n: Node) -> _LF:
        hit = self.memo.get(n)
        if hit is None:
            hit = self.memo[n] = self._lin(n)
        return hit

    def _lin(self, n: Node) -> _LF:
        if not self.depends(n):
            return _LF(n.dims, (), n)
        op = n.op
        if op is Op.STATE:
            return self.versions[n.attr[1]]
        if op in (Op.ADD, Op.SUB):
            a, b = self(n.args[0]), self(n.args[1])
            for side in (a, b):
                if side.terms and set(side.dims) != set(n.dims):
                    raise self.not_linear(n, f"a {show_dims(side.dims)} value that depends "
                                          f"on '{self.state}' is broadcast to "
                                          f"{show_dims(n.dims)}")
            bt = b.terms if op is Op.ADD else tuple(self._scale_term(t, const(-1.0), n)
                                                    for t in b.terms)
            return _LF(n.dims, a.terms + bt, _add(a.rest, b.rest, n.dims, sub=op is Op.SUB))
        if op is Op.NEG:
            a = self(n.args[0])
            return _LF(n.dims, tuple(self._scale_term(t, const(-1.0), n) for t in a.terms),
                       _neg(a.rest) if a.rest is not None else None)
        if op in (Op.MUL, Op.DIV):
            x, y = n.args
            if self.depends(x) and self.depends(y):
                s = self.state
                what = (f"'{s}' appears squared (a product of two factors that both depend on "
                        f"'{s}')" if op is Op.MUL else f"it divides by an expression of '{s}'")
                raise self.not_linear(n, what)
            if op is Op.DIV and self.depends(y):
                raise self.not_linear(n, f"it divides by an expression of '{self.state}'")
            lf, c = (self(x), y) if self.depends(x) else (self(y), x)
            if op is Op.DIV:
                c = _inv(c)
            if lf.terms and not set(c.dims) <= set(lf.dims) and not (
                    len(self.dims) == 1 and lf.dims == () and c.dims == self.dims):
                raise self.not_linear(n, f"a factor over {show_dims(c.dims)} scales a value "
                                      f"over {show_dims(lf.dims)}")
            terms = tuple(self._scale_term(t, c, n) for t in lf.terms)
            rest = _mul(lf.rest, c) if lf.rest is not None else None
            return _LF(n.dims, terms, rest)
        if op is Op.CONTRACT:
            return self._contract(n)
        if op is Op.OUTER:
            x, y = n.args
            if self.depends(x):
                raise self.error(f"outer(x, y) with x depending on '{self.state}' is not "
                                 "supported", n, hint=f"write outer(x, w @ {self.state})")
            lf = self(y)
            terms = []
            for t in lf.terms:
                if not isinstance(t, _Read) or x.dims != self.dims[:1]:
                    raise self.not_linear(n, "this outer product is not of the form "
                                          f"outer(x[{self.dims[0]}], w @ {self.state})")
                terms.append(RankOne(x, t.w))
            rest = Node(Op.OUTER, n.dims, (x, lf.rest), None, n.span) if lf.rest else None
            return _LF(n.dims, tuple(terms), rest)
        if op in (Op.OVER_HEADS, Op.OVER_TOKENS):
            axis = "H" if op is Op.OVER_HEADS else "T"
            raise self.not_linear(n, f"{n.attr}(..., {axis}) mixes the states of "
                                  f"{'other heads' if axis == 'H' else 'other tokens'} into "
                                  f"'{self.state}'")
        name = n.attr if op is Op.CALL else op.value
        raise self.not_linear(n, f"{name}(...) is applied to an expression of '{self.state}'")

    def _scale_term(self, t, c: Node, n: Node):
        """``c * term`` for a factor ``c`` that does not depend on the state."""
        rows = set(self.dims[:1])
        if isinstance(t, _Scale):
            return _Scale(_mul(t.coef, c))
        if isinstance(t, RankOne):
            if not set(c.dims) <= rows:
                raise self.not_linear(n, "a factor over the state's columns scales a rank-one "
                                      "term")
            return RankOne(_mul(t.x, c), t.w)
        if c.dims == ():
            return _Read(_mul(t.w, c))
        if len(self.dims) == 1 and c.dims == self.dims:
            return RankOne(c, t.w)   # x * (w @ z) for a vector state z
        raise self.not_linear(n, f"a factor over {show_dims(c.dims)} scales w @ {self.state}")

    def _contract(self, n: Node) -> _LF:
        a, b = n.args
        if self.depends(a) and self.depends(b):
            raise self.not_linear(n, f"'{self.state}' appears on both sides of '@'")
        if self.depends(a):
            if len(self.dims) != 1:
                raise self.error(f"'{self.state} @ x' contracts the state over its columns, "
                                 "which is not supported", n,
                                 hint=f"contract over the first dim: x @ {self.state}")
            a, b = b, a   # z @ x == x @ z for a vector state
        lf = self(b)
        d = n.attr
        if d != self.dims[0]:
            raise self.error(f"'@' contracts '{self.state}' over {d}; only its first dim "
                             f"{self.dims[0]} can be contracted", n)
        terms = []
        for t in lf.terms:
            if isinstance(t, _Scale):
                if not set(t.coef.dims) <= {d}:
                    raise self.not_linear(n, "contracting a state scaled by a full matrix")
                terms.append(_Read(_mul(a, t.coef)))
            elif isinstance(t, RankOne):
                ax = Node(Op.CONTRACT, (), (a, t.x), d, n.span) if t.x.dims else _mul(a, t.x)
                terms.append(_Read(_mul(t.w, ax)))
            else:
                raise self.not_linear(n, f"'{self.state}' is contracted twice")
        rest = Node(Op.CONTRACT, n.dims, (a, lf.rest), d, n.span) if lf.rest else None
        return _LF(n.dims, tuple(terms), rest)

    def linearize_updates(self) -> _LF:
        """Linear form of the final version of the state in terms of its version 0."""
        lf = self.versions[0]
        for u in self.program.updates:
            if u.state != self.state:
                continue
            for other in self.program.states:
                if other != self.state and u.value.reads_state(other):
                    leaf = next(x for x in u.value.walk()
                                if x.op is Op.STATE and x.attr[0] == other)
                    raise self.error(f"the update of '{self.state}' reads state '{other}'; "
                                     "each state must evolve on its own", leaf)
            self.memo.clear()
            lf = self.versions[u.version] = self(u.value)
        return lf


def _split_outer(n: Node, rows: tuple[str, ...]) -> list[Outer] | None:
    """Write a matrix-valued, state-free node as a sum of outer products, or None."""
    op = n.op
    if op in (Op.ADD, Op.SUB):
        a, b = _split_outer(n.args[0], rows), _split_outer(n.args[1], rows)
        if a is None or b is None:
            return None
        if op is Op.SUB:
            b = [Outer(_neg(t.x), t.y) for t in b]
        return a + b
    if op is Op.NEG:
        a = _split_outer(n.args[0], rows)
        return None if a is None else [Outer(_neg(t.x), t.y) for t in a]
    if op in (Op.MUL, Op.DIV):
        x, y = n.args
        if op is Op.DIV:
            parts, c = _split_outer(x, rows), _inv(y)
        else:
            parts, c = _split_outer(y, rows), x
            if parts is None or len(x.dims) == 2:
                parts, c = _split_outer(x, rows), y
        if parts is None or len(c.dims) == 2:
            return None
        if set(c.dims) <= set(rows):
            return [Outer(_mul(t.x, c), t.y) for t in parts]
        return [Outer(t.x, _mul(t.y, c)) for t in parts]
    if op is Op.OUTER:
        x, y = n.args
        return [Outer(x, y)] if x.dims == rows else [Outer(y, x)]
    return None


def sum_nodes(nodes: list[Node]) -> Node:
    """The sum of one or more nodes."""
    out = nodes[0]
    for x in nodes[1:]:
        out = _add(out, x)
    return out


def canonicalize(program: Program, filename: str | None = None) -> dict[str, CanonicalUpdate]:
    """The canonical update of every state of ``program`` (see the module docstring)."""
    out = {}
    for name, decl in program.states.items():
        lf = Linearizer(program, name, filename).linearize_updates()
        scales = [t.coef for t in lf.terms if isinstance(t, _Scale)]
        rank_one = tuple(t for t in lf.terms if isinstance(t, RankOne))
        reads = [t for t in lf.terms if isinstance(t, _Read)]
        span = next(u.span for u in program.updates if u.state == name)
        if reads:  # cannot happen for well-typed specs: a read has the wrong dims
            raise SpecError(f"the update of '{name}' is not a state-shaped value", span,
                            program.source, filename=filename)
        scale = sum_nodes(scales) if scales else const(0.0)
        if lf.rest is None:
            inputs: tuple[Outer, ...] | None = ()
        elif len(decl.dims) == 2:
            parts = _split_outer(lf.rest, decl.dims[:1])
            inputs = None if parts is None else tuple(parts)
        else:
            inputs = (Outer(lf.rest, None),)
        out[name] = CanonicalUpdate(name, decl.dims, scale, rank_one, inputs, lf.rest, span)
    return out


def format_canonical(c: CanonicalUpdate, simplify) -> str:
    """``S' = exp(g) * S + outer(-beta*k, k @ S) + outer(beta*k, v)`` for display."""
    s = c.state
    parts = []
    coef = simplify(c.scale)
    if coef != "0":
        parts.append(s if coef == "1" else f"({coef}) * {s}")
    for r in c.rank_one:
        if len(c.dims) == 2:
            parts.append(f"outer({simplify(r.x)}, ({simplify(r.w)}) @ {s})")
        else:
            parts.append(f"({simplify(r.x)}) * (({simplify(r.w)}) @ {s})")
    if c.inputs is None:
        parts.append(format_node(c.forcing))
    else:
        for t in c.inputs:
            parts.append(f"outer({simplify(t.x)}, {simplify(t.y)})" if t.y is not None
                         else simplify(t.x))
    return f"{s}' = " + " + ".join(parts or ["0"])
