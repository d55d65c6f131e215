"""The IR: one small immutable node type with named dims, and the Program that holds a spec.

A ``Node`` is an operation (``Op``), the named dims of its value (``("K", "V")`` for a
matrix, ``()`` for a scalar), its argument nodes and a typed attribute. Nodes compare and
hash structurally (the span is left out), so equal subexpressions are equal nodes and the
IR is a DAG. Every node keeps the span of the spec text it came from, for errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..dsl.errors import Span


class Op(Enum):
    """IR operations. Leaves first, then elementwise, then dim-aware operations."""

    # leaves
    INPUT = "input"      # attr: name; a per-token, per-head tensor [B, T, H, dims]
    PARAM = "param"      # attr: name; a per-head tensor [H, dims]
    STATE = "state"      # attr: (name, version); version 0 is the state before this step
    CONST = "const"      # attr: float
    HEAD = "h"           # head index, 0 .. H-1
    HEADS = "H"          # number of heads
    POS = "t"            # position of the token in its sequence, 0-based
    SIZE = "size"        # attr: dim name; the size of a dim as a number
    MEMORY = "memory"    # attr: name; a per-token, per-head tensor of the second (memory)
                         # sequence [B, S, H, dims], read by state updates (cross-attention)
    PARAM_AT = "param[t]"  # attr: name; row t of a position-indexed param [H, N, dims]
    LENGTH = "T"         # the number of tokens of the sequence (noncausal specs only)
    # elementwise (broadcast by dim name)
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    POW = "**"
    NEG = "neg"
    MAX = "max"
    MIN = "min"
    CALL = "call"        # attr: name of a unary elementwise builtin (exp, sigmoid, ...)
    # dim-aware
    CONTRACT = "@"       # attr: the contracted dim
    OUTER = "outer"
    SUM = "sum"          # attr: the reduced dim
    NORM = "norm"        # attr: the reduced dim; Euclidean norm
    L2NORM = "l2norm"    # attr: the normalised dim; x / sqrt(sum(x^2) + 1e-6)
    SOFTMAX = "softmax"  # attr: the dim
    TAYLOR2 = "taylor2"  # attr: (in_dim, out_dim); [1, x, vec(x x^T) / sqrt(2)]
    # across the batch layout: attr is the reduction (sum, norm, l2norm or softmax)
    OVER_HEADS = "over H"   # over the heads at one token (``sum(x, H)``); same dims as x
    OVER_TOKENS = "over T"  # over the tokens of the sequence (``softmax(x, T)``, noncausal)


LEAVES = frozenset({Op.INPUT, Op.PARAM, Op.STATE, Op.CONST, Op.HEAD, Op.HEADS, Op.POS, Op.SIZE,
                    Op.MEMORY, Op.PARAM_AT, Op.LENGTH})
#: reductions across heads or tokens, the ops ``OVER_HEADS`` and ``OVER_TOKENS`` take
CROSS_REDUCTIONS = ("sum", "norm", "l2norm", "softmax")
ELEMENTWISE = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.NEG, Op.MAX, Op.MIN, Op.CALL})

L2NORM_EPS = 1e-6


@dataclass(frozen=True)
class Node:
    """One IR operation: ``op`` over ``args``, with value dims ``dims`` and attribute ``attr``."""

    op: Op
    dims: tuple[str, ...]
    args: tuple[Node, ...] = ()
    attr: Any = None
    span: Span | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.op, self.dims, self.args, self.attr)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        return (self.op, self.dims, self.attr, self.args) == (
            other.op, other.dims, other.attr, other.args)

    def walk(self):
        """Yield every distinct node of the DAG below (and including) this one, children first."""
        seen: set[Node] = set()
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if node in seen:
                continue
            if expanded:
                seen.add(node)
                yield node
            else:
                stack.append((node, True))
                stack.extend((a, False) for a in reversed(node.args))

    def reads_state(self, name: str | None = None) -> bool:
        """True when the value depends on a state (on state ``name`` when given)."""
        return any(n.op is Op.STATE and (name is None or n.attr[0] == name) for n in self.walk())


def const(value: float, span: Span | None = None) -> Node:
    """A scalar constant node."""
    return Node(Op.CONST, (), (), float(value), span)


@dataclass(frozen=True)
class Decl:
    """A declared input, memory input, param or state: its name, dims and where it was
    declared. ``dims`` are the dims of the tensor after the leading ``[B, T, H]`` (``[H]`` for
    params); ``position`` names the dim indexed by the token's position (``E[t < N, P]``:
    ``position = "N"``, and a token reads the ``[P]`` row ``E[t]``)."""

    name: str
    dims: tuple[str, ...]
    span: Span | None = field(default=None, compare=False)
    position: str | None = None

    @property
    def value_dims(self) -> tuple[str, ...]:
        """The dims of the value one token reads (``dims`` without the position dim)."""
        return tuple(d for d in self.dims if d != self.position)


@dataclass(frozen=True)
class Update:
    """``state = value``: the ``version``-th update of ``state`` in a step (1-based)."""

    state: str
    version: int
    value: Node
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Program:
    """A lowered spec: declarations, the ordered state updates and the output expression.

    ``dims`` maps every dim name to its size expression (a sympy expression over other dims)
    or None when the size comes from the tensors at call time (``K``, ``V``, ``dim M``).
    ``output`` reads states through ``STATE`` leaves whose version says which value it sees
    (0: before this token's updates, as in RWKV-6's bonus readout). ``memory`` holds the
    inputs of a second sequence (noncausal cross-attention): the updates run over its tokens,
    the output over the tokens of ``inputs``.
    """

    name: str
    noncausal: bool
    dims: dict[str, Any]
    inputs: dict[str, Decl]
    params: dict[str, Decl]
    states: dict[str, Decl]
    updates: tuple[Update, ...]
    output: Node
    output_span: Span | None = field(default=None, compare=False)
    source: str = field(default="", compare=False, repr=False)
    memory: dict[str, Decl] = field(default_factory=dict)

    def final_version(self, state: str) -> int:
        """The version of ``state`` after all of this step's updates."""
        return max((u.version for u in self.updates if u.state == state), default=0)

    def line_of(self, span: Span | None) -> str:
        """The spec line a span points into, stripped (for comments in generated code)."""
        if span is None:
            return ""
        lines = self.source.splitlines()
        return lines[span.line - 1].strip() if 0 < span.line <= len(lines) else ""
