"""The analysed IR: canonical updates, transition classes, normalizers and readout, with the
checks that need them (a noncausal spec cannot decay) and the forms the spec supports."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..dsl.errors import SpecError
from .canonical import CanonicalUpdate, canonicalize
from .nodes import Node, Op, Program
from .readout import Readout, ReadoutKind, analyse_readout
from .transition import Normalizer, TransitionClass, classify, find_normalizers


@dataclass(frozen=True)
class Analysis:
    """Everything the compiler proved about one spec."""

    program: Program
    updates: dict[str, CanonicalUpdate]
    classes: dict[str, TransitionClass]
    normalizers: tuple[Normalizer, ...]
    readout: Readout
    #: why no generated kernel can run the spec yet: one line per language construct the
    #: kernels do not lower (empty when the forms of the class are available)
    kernel_blockers: list[str] = field(default_factory=list)

    @functools.cached_property
    def transition_class(self) -> TransitionClass:
        """The widest class among the spec's states."""
        return max(self.classes.values(), key=lambda c: c.rank)

    @functools.cached_property
    def forms(self) -> tuple[str, ...]:
        """Forms the spec's structure supports (kernels may not exist for all of them yet);
        none while ``kernel_blockers`` names a construct the kernels cannot run."""
        if self.kernel_blockers:
            return ()
        forms = self.transition_class.forms
        if self.program.memory:     # cross-attention: the two GEMM stages alone
            forms = tuple(f for f in forms if f == "parallel")
        structured = all(u.inputs is not None for u in self.updates.values()) and \
            self.readout.kind is not ReadoutKind.GENERAL
        if not structured:
            return () if self.program.memory else ("recurrent",)
        return forms


def analyse(program: Program, filename: str | None = None) -> Analysis:
    """Canonicalize and classify every state of ``program``; check causality constraints."""
    updates = canonicalize(program, filename)
    classes = {s: classify(u) for s, u in updates.items()}
    if program.noncausal:
        for s, c in classes.items():
            if c is not TransitionClass.IDENTITY:
                raise SpecError(
                    f"a noncausal spec cannot decay its state: the update of '{s}' has a "
                    f"{c.value} transition", updates[s].span, program.source,
                    filename=filename,
                    hint="in a noncausal spec every token reads the sum over the whole "
                         f"sequence; write `{s} = {s} + ...` or drop `noncausal`")
    return Analysis(program, updates, classes, tuple(find_normalizers(updates)),
                    analyse_readout(program), kernel_blockers(program))


def kernel_blockers(program: Program) -> list[str]:
    """The constructs of ``program`` that no generated kernel runs yet, each with where it is
    used; empty for specs the kernels of their transition class run."""
    nodes: dict[Node, None] = {}
    for root in (*(u.value for u in program.updates), program.output):
        nodes.update(dict.fromkeys(root.walk()))

    def where(found: list[Node]) -> str:
        lines = sorted({n.span.line for n in found if n.span is not None})
        return f" (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})" \
            if lines else ""

    out = []
    indexed = [d for d in program.params.values() if d.position is not None]
    if indexed:
        out.append("position-indexed params "
                   + ", ".join(f"{d.name}[t < {d.position}]" for d in indexed))
    for op, axis, what in ((Op.OVER_HEADS, "H", "a reduction over the heads at one token"),
                           (Op.OVER_TOKENS, "T", "a reduction over the tokens of the sequence")):
        found = [n for n in nodes if n.op is op]
        if found:
            calls = ", ".join(sorted({f"{n.attr}(..., {axis})" for n in found}))
            out.append(f"{what}: {calls}{where(found)}")
    found = [n for n in nodes if n.op is Op.LENGTH]
    # (cross-attention runs as two GEMM stages over all tokens, where torch gives every
    # token its sequence's length: the memory's in the updates, the queries' in the readout)
    if found and not program.memory:
        out.append(f"the sequence length T{where(found)}")
    return out
