"""Syntax tree of a spec: plain frozen dataclasses, each carrying the span of its text."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class Num:
    """A numeric literal (``1e-6``, ``2``, ``0.5``)."""

    value: float
    text: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Name:
    """A reference to an input, param, state, local, dim or builtin name (``h``, ``t``, ``K``)."""

    id: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class BinOp:
    """``left op right`` with op one of ``+ - * / @ **``."""

    op: str
    left: Expr
    right: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Neg:
    """Unary minus."""

    operand: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Call:
    """A builtin function call ``func(args...)``; ``func_span`` points at the function name."""

    func: str
    args: tuple[Expr, ...]
    span: Span = field(compare=False)
    func_span: Span = field(compare=False)


Expr = Num | Name | BinOp | Neg | Call


@dataclass(frozen=True)
class VarDecl:
    """``name[D1, D2]`` in an ``inputs``, ``memory``, ``params`` or ``state`` line.

    ``index`` holds, per dim, the index name written before ``<`` (``E[t < N, P]`` gives
    ``("t", None)``: the param is indexed by the token's position below the dim ``N``), or
    None for a plain dim.
    """

    name: str
    dims: tuple[str, ...]
    span: Span = field(compare=False)
    dim_spans: tuple[Span, ...] = field(compare=False, default=())
    index: tuple[str | None, ...] = ()
    index_spans: tuple[Span | None, ...] = field(compare=False, default=())


@dataclass(frozen=True)
class DimDecl:
    """``dim F = 1 + K + K * K`` (size given) or ``dim M`` (size taken from the tensors)."""

    name: str
    size: Expr | None
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Assign:
    """``target = value``: a local binding, a rebinding of an input, a state update or ``o``."""

    target: str
    value: Expr
    span: Span = field(compare=False)
    target_span: Span = field(compare=False)


@dataclass(frozen=True)
class Spec:
    """One ``attention`` block as written."""

    name: str
    flags: tuple[str, ...]
    inputs: tuple[VarDecl, ...]
    params: tuple[VarDecl, ...]
    states: tuple[VarDecl, ...]
    dims: tuple[DimDecl, ...]
    body: tuple[Assign, ...]
    span: Span = field(compare=False)
    flag_spans: tuple[Span, ...] = field(compare=False, default=())
    source: str = field(compare=False, default="", repr=False)
    memory: tuple[VarDecl, ...] = ()

    @property
    def noncausal(self) -> bool:
        """True when the spec carries the ``noncausal`` flag."""
        return "noncausal" in self.flags
