"""Reverse-mode differentiation of one step, written as Triton statements.

``AdjointEmitter`` walks the values a ``StepEmitter`` computed (every value that lives in a
variable) from the seeded roots back to the requested targets and writes, for each value, a
variable holding its adjoint: the gradient of the loss with respect to that value. Adjoints
have exactly the dims of their value (full blocks). Elementwise values are differentiated
by sympy (the derivative printed by the Triton printer, reusing the value itself where the
derivative contains it, as for ``exp``); contractions, outer products, reductions, norms,
softmax and ``taylor2`` have their rules here. Sums over broadcast dims mask padded lanes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import sympy

from ..ir.nodes import ELEMENTWISE, LEAVES, L2NORM_EPS, Node, Op
from ..ir.sympy_view import SympyView, format_node
from .printer import print_triton
from .step import StepEmitter, _short, arange, block, mask, view


def full(expr: str, dims: tuple[str, ...]) -> str:
    """``expr`` broadcast to a full block over ``dims`` (a no-op for scalars)."""
    if not dims:
        return expr
    return f"({expr}) + tl.zeros([{', '.join(block(d) for d in dims)}], dtype=tl.float32)"


def reduce_to(expr: str, src: tuple[str, ...], dst: tuple[str, ...]) -> str:
    """Sum ``expr`` (axes ``src``) over the dims not in ``dst``, masking padded lanes, and
    order the remaining axes as ``dst``."""
    cur = list(src)
    for d in reversed(src):
        if d in dst:
            continue
        axis = cur.index(d)
        expr = f"tl.sum(tl.where({view(mask(d), (d,), tuple(cur))}, {expr}, 0.0), axis={axis})"
        cur.pop(axis)
    return view(expr, tuple(cur), dst) if tuple(cur) != dst else expr


class AdjointEmitter:
    """Emits adjoint variables for the values of ``forward`` into ``forward.lines``.

    ``stops`` are values treated as leaves (for example loop-invariant values computed
    before the loop): their adjoints are reported when they are targets but not pushed
    further back.
    """

    def __init__(self, forward: StepEmitter, stops: frozenset[Node] = frozenset()):
        self.fwd = forward
        self.stops = stops
        self._operands: dict[Node, tuple[Node, ...]] = {}
        self._exprs: dict[Node, tuple[sympy.Expr, SympyView]] = {}

    # -------------------------------------------------------------- graph
    def _is_leaf(self, n: Node) -> bool:
        return n.op in LEAVES or n in self.stops

    def operands(self, n: Node) -> tuple[Node, ...]:
        """The values (variables) ``n`` is computed from in the forward statements."""
        if n in self._operands:
            return self._operands[n]
        if self._is_leaf(n):
            ops: tuple[Node, ...] = ()
        elif n.op in ELEMENTWISE:
            sv = SympyView(stops=self.fwd.keep)
            expr = sv.to_sympy(n)
            self._exprs[n] = (expr, sv)
            ops = tuple(sv.symbols)
        else:
            ops = tuple(dict.fromkeys(n.args))
        self._operands[n] = ops
        return ops

    def _order(self, roots: list[Node], targets: set[Node]) -> list[Node]:
        """Values on a path from a root to a target, consumers before their operands."""
        relevant: dict[Node, bool] = {}

        def reaches(n: Node) -> bool:
            if n not in relevant:
                relevant[n] = False  # provisional, the graph is acyclic
                relevant[n] = n in targets or any(reaches(a) for a in self.operands(n))
            return relevant[n]

        post: list[Node] = []
        seen: set[Node] = set()
        for r in roots:
            stack = [(r, False)]
            while stack:
                n, expanded = stack.pop()
                if expanded:
                    post.append(n)
                    continue
                if n in seen or not reaches(n):
                    continue
                seen.add(n)
                stack.append((n, True))
                stack.extend((a, False) for a in self.operands(n) if a not in seen)
        return list(reversed(post))

    # -------------------------------------------------------------- emission
    def grads(self, seeds: list[tuple[Node, str]], targets: list[Node]) -> dict[Node, str]:
        """Adjoint variables of ``targets`` given the adjoints ``seeds`` of root values.

        Seeds are ``(node, expression)`` with the expression shaped like the node; targets
        no seed reaches are left out of the result.
        """
        em = self.fwd
        contrib: dict[Node, list[str]] = defaultdict(list)
        for n, g in seeds:
            contrib[n].append(g)
        order = self._order([n for n, _ in seeds], set(targets))
        for n in order:
            em(n)  # its forward value (and those of its operands) must exist
        out: dict[Node, str] = {}
        for n in order:
            if not contrib[n]:
                continue
            terms = contrib.pop(n)  # each a full block over n.dims (seeds by contract)
            if len(terms) == 1 and terms[0].isidentifier():
                g = terms[0]
            else:
                g = em.fresh("d")
                em.emit(f"{g} = {' + '.join(terms)}  # d/d {_short(format_node(n), 50)}")
            if n in targets:
                out[n] = g
            if not self._is_leaf(n):
                for a, term in self._backward(n, g):
                    contrib[a].append(term)
        return out

    def _backward(self, n: Node, g: str) -> list[tuple[Node, str]]:
        """(operand, adjoint contribution) pairs of value ``n`` with adjoint variable ``g``."""
        em = v = self.fwd  # v(node): the variable holding a forward value
        op = n.op
        if op in ELEMENTWISE:
            return self._backward_elementwise(n, g)
        if op in (Op.CONTRACT, Op.OUTER):
            x, y = n.args
            joint = x.dims + tuple(z for z in y.dims if z not in x.dims)
            gj = view(g, n.dims, joint)
            out = []
            for a, b in ((x, y), (y, x)):
                term = f"{gj} * {view(v(b), b.dims, joint)}"
                out.append((a, reduce_to(term, joint, a.dims)))
            return out
        (x,) = n.args
        d = n.attr
        if op is Op.SUM:
            return [(x, full(view(g, n.dims, x.dims), x.dims))]
        if op is Op.NORM:
            return [(x, f"{view(g, n.dims, x.dims)} * {v(x)} / {view(v(n), n.dims, x.dims)}")]
        axis = x.dims.index(d) if d in x.dims else 0
        keep = ", keep_dims=True" if len(x.dims) > 1 else ""
        z = v(n)
        if op is Op.L2NORM:
            r, dot = em.fresh("r"), em.fresh("dot")
            sq = f"tl.where({view(mask(d), (d,), x.dims)}, {v(x)} * {v(x)}, 0.0)"
            em.emit(f"{r} = tl.sqrt(tl.sum({sq}, axis={axis}{keep}) + {L2NORM_EPS!r})")
            gz = f"tl.where({view(mask(d), (d,), x.dims)}, {g} * {z}, 0.0)"
            em.emit(f"{dot} = tl.sum({gz}, axis={axis}{keep})")
            return [(x, f"({g} - {z} * {dot}) / {r}")]
        if op is Op.SOFTMAX:
            dot = em.fresh("dot")
            gz = f"tl.where({view(mask(d), (d,), x.dims)}, {g} * {z}, 0.0)"
            em.emit(f"{dot} = tl.sum({gz}, axis={axis}{keep})")
            return [(x, f"{z} * ({g} - {dot})")]
        if op is Op.TAYLOR2:
            return [(x, self._backward_taylor2(n, g))]
        raise NotImplementedError(f"codegen: no adjoint rule for {op}")  # pragma: no cover

    def _backward_elementwise(self, n: Node, g: str) -> list[tuple[Node, str]]:
        expr, sv = self._exprs[n]
        me = sympy.Symbol("__value__", real=True)
        names = {s: view(self.fwd(leaf), leaf.dims, n.dims) for leaf, s in sv.symbols.items()}
        names[me] = self.fwd(n)
        out = []
        for leaf, s in sv.symbols.items():
            deriv = sympy.diff(expr, s)
            if deriv == 0:
                continue
            if not expr.is_Symbol:
                deriv = deriv.subs(expr, me)
            if deriv == 1:
                term = g
            else:
                text = print_triton(deriv, names)
                term = f"{g} * {text if text.isidentifier() else f'({text})'}"
            out.append((leaf, reduce_to(term, n.dims, leaf.dims)))
        return out

    def _backward_taylor2(self, n: Node, g: str) -> str:
        """d taylor2(x): the linear lanes pass g through, the quadratic lane (i, j) adds
        g * x_j / sqrt(2) to lane i and g * x_i / sqrt(2) to lane j."""
        em = self.fwd
        (x,) = n.args
        src, dst = n.attr
        xv = em(x)
        tf, ti, tj = em.fresh("tf"), em.fresh("ti"), em.fresh("tj")
        em.emit(f"{tf} = {arange(dst)} - 1 - {src}")
        em.emit(f"{ti} = tl.where({tf} >= 0, {tf} // {src}, {arange(dst)} - 1)")
        em.emit(f"{tj} = tl.where({tf} >= 0, {tf} % {src}, 0)")
        hit_i = f"{arange(src)}[None, :] == {ti}[:, None]"
        hit_j = f"{arange(src)}[None, :] == {tj}[:, None]"
        xi, xj = em.fresh("xi"), em.fresh("xj")
        em.emit(f"{xi} = tl.sum(tl.where({hit_i}, {xv}[None, :], 0.0), axis=1)")
        em.emit(f"{xj} = tl.sum(tl.where({hit_j}, {xv}[None, :], 0.0), axis=1)")
        gm = em.fresh("gm")
        em.emit(f"{gm} = tl.where({mask(dst)}, {g}, 0.0)")
        c = repr(1 / math.sqrt(2))
        wi = f"{gm} * tl.where({tf} >= 0, {xj} * {c}, 1.0)"
        wj = f"{gm} * tl.where({tf} >= 0, {xi} * {c}, 0.0)"
        return (f"tl.sum(tl.where({hit_i}, ({wi})[:, None], 0.0) + "
                f"tl.where({hit_j}, ({wj})[:, None], 0.0), axis=0)")
