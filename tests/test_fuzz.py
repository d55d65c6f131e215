"""Random text and random mutations of library specs either compile or raise SpecError."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linforge
from linforge import SpecError

SPECS = [linforge.library.source(n) for n in linforge.library.names()]
PIECES = ["S", "k", "v", "q", "@", "*", "+", "-", "/", "**", "(", ")", ",", "[", "]", "=", "\n",
          " ", "exp", "outer", "sum", "K", "V", "h", "t", "1e-3", "0", "attention", "state",
          "inputs", "params", "dim", "noncausal", "z", "#", "l2norm", "taylor2", "max", "o"]


def compiles_or_spec_error(text: str) -> None:
    try:
        linforge.load(text + "\n" if "\n" not in text else text)
    except SpecError as e:
        assert e.reason and str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_random_text(text):
    compiles_or_spec_error("attention fuzz\n" + text)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SPECS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3),
                                                   st.sampled_from(PIECES)), max_size=3))
def test_mutated_library_specs(spec, edits):
    text = spec
    for pos, kind, piece in edits:
        i = pos % (len(text) + 1)
        if kind == 0:      # delete one character
            text = text[:i] + text[i + 1:]
        elif kind == 1:    # insert a token
            text = text[:i] + piece + text[i:]
        elif kind == 2:    # replace a character by a token
            text = text[:i] + piece + text[i + 1:]
        else:              # duplicate a line
            lines = text.splitlines()
            j = pos % len(lines)
            text = "\n".join(lines[:j + 1] + lines[j:])
    compiles_or_spec_error(text)
