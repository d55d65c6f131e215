"""Sign analysis: a lower bound of an IR value that holds for every input.

The chunked form keeps a normalized readout's query and key in fp32 for half inputs because
its denominator ``q^ @ z`` may cancel; when both are provably nonnegative (``elu(x) + 1``,
``relu``, ``exp``, ``sigmoid`` feature maps) every term of that sum is >= 0, nothing cancels,
and half storage is as accurate as for any other readout.
"""

from __future__ import annotations

from .nodes import Node, Op

#: lower bounds of unary builtins over every input (absent: unbounded below)
_CALL_BOUNDS = {"exp": 0.0, "sigmoid": 0.0, "softplus": 0.0, "relu": 0.0, "abs": 0.0,
                "sqrt": 0.0, "elu": -1.0, "tanh": -1.0, "cos": -1.0, "sin": -1.0}


def lower_bound(n: Node) -> float | None:
    """A number that ``n`` (every element of it) never falls below, or None if none is
    proved. Conservative: None is always a correct answer."""
    op = n.op
    if op is Op.CONST:
        return float(n.attr)
    if op in (Op.SIZE, Op.HEADS):
        return 1.0
    if op in (Op.HEAD, Op.POS, Op.LENGTH):
        return 0.0
    if op is Op.CALL:
        return _CALL_BOUNDS.get(n.attr)
    bounds = [lower_bound(a) for a in n.args]
    if op is Op.ADD:
        return None if None in bounds else bounds[0] + bounds[1]
    if op is Op.MAX:
        known = [b for b in bounds if b is not None]
        return max(known) if known else None
    if op is Op.MIN:
        return None if None in bounds else min(bounds)
    if op in (Op.MUL, Op.DIV, Op.SUM, Op.OUTER, Op.CONTRACT, Op.NORM):
        if op is Op.NORM:
            return 0.0
        if None not in bounds and all(b >= 0 for b in bounds):
            return 0.0 if op is not Op.MUL else bounds[0] * bounds[1]
        return None
    if op is Op.POW:
        base, exponent = n.args
        if exponent.op is Op.CONST and float(exponent.attr) % 2 == 0:
            return 0.0
        return 0.0 if bounds[0] is not None and bounds[0] >= 0 else None
    return None


def nonnegative(n: Node) -> bool:
    """True when ``n`` is proved >= 0 for every input."""
    b = lower_bound(n)
    return b is not None and b >= 0


__all__ = ["lower_bound", "nonnegative"]
