"""The analysed IR: canonical updates, transition classes, normalizers and readout, with the
checks that need them (a noncausal spec cannot decay) and the forms the spec supports."""

from __future__ import annotations

from dataclasses import dataclass

from ..dsl.errors import SpecError
from .canonical import CanonicalUpdate, canonicalize
from .nodes import Program
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

    @property
    def transition_class(self) -> TransitionClass:
        """The widest class among the spec's states."""
        return max(self.classes.values(), key=lambda c: c.rank)

    @property
    def forms(self) -> tuple[str, ...]:
        """Forms the spec's structure supports (kernels may not exist for all of them yet)."""
        forms = self.transition_class.forms
        structured = all(u.inputs is not None for u in self.updates.values()) and \
            self.readout.kind is not ReadoutKind.GENERAL
        return forms if structured else ("recurrent",)


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
                    analyse_readout(program))
