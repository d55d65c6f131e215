"""Transition analysis: which class each canonical update belongs to, and what it allows.

The class decides the forms a spec gets (DESIGN.md's table). Classes are ordered from the
most to the least structured; a spec's class is the widest class among its states.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum

from .canonical import CanonicalUpdate, sum_nodes
from .nodes import Node, Op
from .sympy_view import equal, is_one


class TransitionClass(Enum):
    """How ``T(S)`` acts on the state; the order is from most to least structured."""

    IDENTITY = "identity"
    SCALAR = "scalar decay"
    DIAGONAL = "diagonal decay"
    ELEMENTWISE = "full elementwise decay"
    DELTA = "delta rank-1"
    DPLR = "diagonal plus low rank"

    @property
    def rank(self) -> int:
        return list(TransitionClass).index(self)

    @property
    def forms(self) -> tuple[str, ...]:
        """Forms of computation this class supports (see DESIGN.md)."""
        return FORMS[self]


FORMS = {
    TransitionClass.IDENTITY: ("recurrent", "chunk", "parallel"),
    TransitionClass.SCALAR: ("recurrent", "chunk", "parallel"),
    TransitionClass.DIAGONAL: ("recurrent", "chunk", "parallel"),
    TransitionClass.ELEMENTWISE: ("recurrent",),
    TransitionClass.DELTA: ("recurrent", "chunk"),
    TransitionClass.DPLR: ("recurrent", "chunk"),
}


def _factors(n: Node) -> Counter:
    """Multiset of the multiplicative factors of ``n`` (divisors marked), signs dropped."""
    if n.op is Op.MUL:
        return _factors(n.args[0]) + _factors(n.args[1])
    if n.op is Op.NEG:
        return _factors(n.args[0])
    if n.op is Op.DIV:
        inv = Counter({("1/", k): c for k, c in _factors(n.args[1]).items()})
        return _factors(n.args[0]) + inv
    if n.op is Op.CONST:
        return Counter()
    return Counter({n: 1})


def _vector_factors(n: Node, row: str) -> Counter:
    def dims_of(f):
        return f[1].dims if isinstance(f, tuple) else f.dims
    return Counter({f: c for f, c in _factors(n).items() if row in dims_of(f)})


def is_delta(update: CanonicalUpdate) -> bool:
    """True when ``T = D (I + c x x^T)`` or ``(I + c x x^T) D``: one rank-one term whose two
    vectors are the same up to a scalar (or up to the diagonal decay ``D``)."""
    if len(update.rank_one) != 1:
        return False
    row = update.dims[0]
    r = update.rank_one[0]
    fx, fw = _vector_factors(r.x, row), _vector_factors(r.w, row)
    return fx == fw or fw == fx + _vector_factors(update.scale, row)


def classify(update: CanonicalUpdate) -> TransitionClass:
    """The class of one state's transition."""
    scale_dims = set(update.scale.dims)
    rows = set(update.dims[:1])
    if update.rank_one:
        if scale_dims - rows:
            return TransitionClass.DPLR  # not reached by supported specs: see canonical
        return TransitionClass.DELTA if is_delta(update) else TransitionClass.DPLR
    if not scale_dims:
        return TransitionClass.IDENTITY if is_one(update.scale) else TransitionClass.SCALAR
    if scale_dims <= rows and len(update.dims) == 2:
        return TransitionClass.DIAGONAL
    if len(update.dims) == 1:
        return TransitionClass.DIAGONAL
    return TransitionClass.ELEMENTWISE


def same_transition(a: CanonicalUpdate, b: CanonicalUpdate) -> bool:
    """True when two states (a vector and a matrix over the same rows) share ``T``."""
    if a.dims[0] != b.dims[0] or len(a.rank_one) != len(b.rank_one):
        return False
    if not equal(a.scale, b.scale):
        return False
    return all(equal(x.x, y.x) and equal(x.w, y.w) for x, y in zip(a.rank_one, b.rank_one))


@dataclass(frozen=True)
class Normalizer:
    """A vector state that shares a matrix state's transition and can ride along as an extra
    column of V when its inputs are the matrix state's row vectors (``rides_along``)."""

    vector: str
    matrix: str
    rides_along: bool


def find_normalizers(updates: dict[str, CanonicalUpdate]) -> list[Normalizer]:
    """Vector states whose transition equals that of a matrix state over the same rows."""
    found = []
    for z, cz in updates.items():
        if len(cz.dims) != 1:
            continue
        matches = []
        for s, cs in updates.items():
            if len(cs.dims) == 2 and same_transition(cz, cs):
                rides = bool(cz.forcing is not None and cs.inputs and equal(
                    cz.forcing, sum_nodes([t.x for t in cs.inputs])))
                matches.append(Normalizer(z, s, rides))
        if matches:  # prefer the matrix state whose inputs it shares (cosFormer's cos/sin)
            found.append(max(matches, key=lambda nz: nz.rides_along))
    return found
