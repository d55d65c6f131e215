"""Readout analysis: how the output reads the states.

Kinds: ``linear`` (``q @ S`` plus state-free skip or bonus terms), ``normalized`` (a linear
readout divided by a function of vector-state reads, as in linear attention and mLSTM) and
``general`` (anything else; the recurrent form still runs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .nodes import Node, Op, Program


class ReadoutKind(Enum):
    """How ``o`` depends on the states."""

    LINEAR = "linear"
    NORMALIZED = "normalized"
    GENERAL = "general"


@dataclass(frozen=True)
class Readout:
    """The readout's kind and, per state, whether it sees the state before (``pre``) or after
    (``post``) this token's update."""

    kind: ReadoutKind
    reads: dict[str, str]
    skip: bool   # an additive term that reads no state (bonus, D * x)


def _states_read(n: Node) -> set[str]:
    return {x.attr[0] for x in n.walk() if x.op is Op.STATE}


def _linear_in(n: Node, states: set[str]) -> bool:
    """True when ``n`` is a sum of ``w @ S`` reads (times state-free scalars) and free terms."""
    if not (_states_read(n) & states):
        return True
    if n.op in (Op.ADD, Op.SUB):
        return all(_linear_in(a, states) for a in n.args)
    if n.op is Op.NEG:
        return _linear_in(n.args[0], states)
    if n.op in (Op.MUL, Op.DIV):
        a, b = n.args
        if n.op is Op.DIV:
            return not (_states_read(b) & states) and _linear_in(a, states)
        return (_linear_in(a, states) and not (_states_read(b) & states)) or (
            _linear_in(b, states) and not (_states_read(a) & states))
    if n.op is Op.CONTRACT:
        a, b = n.args
        return (b.op is Op.STATE and not _states_read(a)) or (
            a.op is Op.STATE and not _states_read(b))
    return False


def analyse_readout(program: Program) -> Readout:
    """Classify ``program.output``."""
    o = program.output
    reads = {}
    for x in o.walk():
        if x.op is Op.STATE:
            name, version = x.attr
            reads[name] = "pre" if version == 0 else (
                "post" if version == program.final_version(name) else f"after update {version}")
    matrices = {s for s, d in program.states.items() if len(d.dims) == 2}
    vectors = set(program.states) - matrices
    free_terms = []

    def collect(n: Node):
        if n.op in (Op.ADD, Op.SUB):
            for a in n.args:
                collect(a)
        elif not _states_read(n):
            free_terms.append(n)
    collect(o)
    skip = bool(free_terms)
    if o.op is Op.DIV and _linear_in(o.args[0], matrices) and not (
            _states_read(o.args[0]) & vectors) and _states_read(o.args[1]) <= vectors \
            and _states_read(o.args[1]):
        kind = ReadoutKind.NORMALIZED
    elif _linear_in(o, matrices | vectors):
        kind = ReadoutKind.LINEAR
    else:
        kind = ReadoutKind.GENERAL
    return Readout(kind, reads, skip)
