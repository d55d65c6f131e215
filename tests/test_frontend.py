"""Parser, lowering and analysis: every DESIGN.md spec compiles to the right class; bad specs
raise SpecError with a line, a column and a caret."""

from pathlib import Path

import pytest
import torch

import linforge
from linforge import SpecError, TransitionClass
from linforge.dsl import parse
from linforge.ir.show import show_ast, show_canonical, show_ir

DESIGN = Path(__file__).parent / "specs" / "design.lin"

EXPECTED_CLASS = {
    "gated_deltanet": TransitionClass.DELTA,
    "linear_attention": TransitionClass.IDENTITY,
    "rwkv6": TransitionClass.DIAGONAL,
    "retnet": TransitionClass.SCALAR,
    "mamba2": TransitionClass.SCALAR,
    "mlstm": TransitionClass.SCALAR,
    "rwkv7": TransitionClass.DPLR,
    "efficientvit": TransitionClass.IDENTITY,
}


def test_design_specs_parse_as_several_specs_in_one_file():
    specs = parse(DESIGN.read_text())
    assert [s.name for s in specs] == list(EXPECTED_CLASS)


@pytest.mark.parametrize("name", list(EXPECTED_CLASS))
def test_design_spec_class_and_stages(name):
    attn = linforge.compile(DESIGN, name=name)
    assert attn.analysis.transition_class is EXPECTED_CLASS[name]
    for text in (show_ast(attn.spec), show_ir(attn.program), show_canonical(attn.analysis)):
        assert name in text


CANONICAL = {
    "gated_deltanet": "S' = (exp(g)) * S + outer(-beta*l2norm(k)*exp(g), (l2norm(k)) @ S) "
                      "+ outer(beta*l2norm(k), v)",
    "retnet": "S' = (1 - 2**(-h - 5)) * S + outer(k/K**0.5, v)",
    "rwkv7": "S' = (exp(w)) * S + outer(b, (a) @ S) + outer(k, v)",
    "mamba2": "S' = (exp(A*softplus(dt + dt_bias))) * S + outer(B, x*softplus(dt + dt_bias))",
}


@pytest.mark.parametrize("name", list(CANONICAL))
def test_canonical_form_prints(name):
    text = show_canonical(linforge.compile(DESIGN, name=name).analysis)
    assert CANONICAL[name] in text


def test_normalizers_and_readouts():
    la = linforge.compile(DESIGN, name="linear_attention")
    assert la.info()["normalizers"] == {"z": "S"}
    assert la.info()["readout"] == "normalized"
    ml = linforge.compile(DESIGN, name="mlstm")
    assert ml.analysis.normalizers[0].rides_along
    rw = linforge.compile(DESIGN, name="rwkv6")
    assert rw.analysis.readout.reads == {"S": "pre"} and rw.analysis.readout.skip


def test_composed_updates_kda_is_delta():
    attn = linforge.compile("""
attention kda
    inputs q[K], k[K], v[V], g[K], beta
    state  S[K, V]
    S = exp(g) * S
    S = S - beta * outer(k, k @ S) + beta * outer(k, v)
    o = q @ S
""")
    assert attn.analysis.transition_class is TransitionClass.DELTA
    assert "(k*exp(g)) @ S" in show_canonical(attn.analysis)


def test_full_elementwise_and_forms():
    attn = linforge.compile("""
attention mamba1
    inputs x[V], B[K], C[K], dt[V]
    params A[K, V]
    state  S[K, V]
    S = exp(dt * A) * S + outer(B, dt * x)
    o = C @ S
""")
    assert attn.analysis.transition_class is TransitionClass.ELEMENTWISE
    assert attn.info()["forms"] == ["recurrent"]


def test_comments_blank_lines_exponents_and_builtins():
    attn = linforge.compile("""
# leading comment

attention demo   # trailing comment
    inputs q[K], k[K], v[V], g
    params p
    dim F = 1 + K + K * K

    state S[F, V]
    # a comment between statements
    qf = taylor2(q * 2.5e-1)
    S = exp(g) * 1E0 * S + outer(taylor2(k), v * (h + 1) / H + t * p)
    o = qf @ S
""")
    assert attn.info()["dims"]["F"] == "K**2 + K + 1"


def test_rebinding_an_input_shadows_it():
    attn = linforge.compile("""
attention x
    inputs q[K], k[K], v[V]
    state S[K, V]
    q = relu(q)
    S = S + outer(k, v)
    o = q @ S
""")
    assert "relu(q) @ S'" in show_ir(attn.program)


BAD = [
    # (spec body lines, message fragment, line, column)
    ("S = S + outer(k, v\n    o = q @ S", "unexpected", 6, 23),
    ("S = S + outer(k, v)\n    o = q @ T", "undefined name 'T'", 7, 13),
    ("S = S + outer(k, vv)\n    o = q @ S", "did you mean 'v'", 6, 22),
    ("S = S + outer(k, v)\n    o = foo(q) @ S", "unknown function 'foo'", 7, 9),
    ("S = S + outer(k, v)\n    o = k @ v", "needs a dim shared", 7, 9),
    ("S = S + outer(k, v)\n    o = q * v", "cannot combine [K] and [V]", 7, 9),
    ("S = S * S\n    o = q @ S", "'S' appears squared", 6, 9),
    ("S = S + outer(k, v)\n    u = 1\n    o = q @ S", None, None, None),
    ("q = q\n    u = 2\n    S = S + outer(k, v)", "has no output", 2, 11),
    ("S = S + outer(k, v)\n    o = q @ S\n    o = q @ S", "assigned twice", 8, 5),
    ("p = 1\n    S = S + outer(k, v)\n    o = q @ S", "cannot assign to param 'p'", 6, 5),
    ("S = S + exp(S)\n    o = q @ S", "exp(...) is applied", 6, 13),
    ("S = S + outer(k, v) + v\n    o = q @ S", None, None, None),
    ("S = S + outer(k, (q @ S) * (k @ S))\n    o = q @ S", "appears squared", 6, 22),
    ("S = outer(k, v)\n    o = q @ S\n    K = 3", "cannot assign to 'K'", 8, 5),
    ("S = S + sum(q, V)\n    o = q @ S", "sum over V", 6, 20),
    ("S = S + outer(k, v)\n    o = q @ S + max(q)", "max takes 2 arguments", 7, 17),
]


@pytest.mark.parametrize("body,fragment,line,column", BAD)
def test_errors_point_at_the_token(body, fragment, line, column):
    text = f"""
attention bad
    inputs q[K], k[K], v[V]
    params p
    state S[K, V]
    {body}
"""
    if fragment is None:
        # broadcasting a [V] vector onto S is allowed; a spare local is allowed
        linforge.compile(text)
        return
    with pytest.raises(SpecError) as info:
        linforge.compile(text)
    err = info.value
    assert fragment in str(err), str(err)
    assert (err.line, err.column) == (line, column), str(err)
    assert "^" in str(err)


def test_spec_level_errors():
    def fails(text, fragment):
        with pytest.raises(SpecError) as info:
            linforge.compile(text)
        assert fragment in str(info.value), str(info.value)
        return info.value

    fails("attention a\n    inputs q[K], q[K]\n    state S[K, V]\n    S = S\n    o = q @ S",
          "declared twice")
    fails("attention a\n    inputs q[K]\n    state S[K, W]\n    S = S\n    o = q @ S",
          "unknown dim 'W'")
    fails("attention a\n    inputs q[K], k[K], v[V]\n    state S[K, V], z[K]\n"
          "    S = S + outer(k, v)\n    o = q @ S", "state 'z' is never updated")
    e = fails("attention a noncausal\n    inputs q[K], k[K], v[V], g\n    state S[K, V]\n"
              "    S = exp(g) * S + outer(k, v)\n    o = q @ S", "noncausal spec cannot decay")
    assert e.line == 4
    fails("attention a fast\n    inputs q[K]\n    state S[K, V]\n    S = S\n    o = q @ S",
          "unknown flag 'fast'")
    fails("attention a\n    inputs q[K], t\n    state S[K, V]\n    S = S\n    o = q @ S",
          "builtin index")
    fails("attention a\n    inputs q[K], k[K], v[V], g\n    state S[K, V], z[K]\n"
          "    z = z + k\n    S = S + outer(k, v) * (q @ z)\n    o = q @ S", "reads state 'z'")
    fails("   \n# only a comment\n", "no spec found")
    fails("attention a\n    inputs q[K], v[V]\n    state S[K, V]\n    S = S + outer(S @ v, v)\n"
          "    o = q @ S", "with x depending on 'S'")


def test_syntax_error_message_has_caret_under_token():
    with pytest.raises(SpecError) as info:
        linforge.compile("attention a\n    inputs q[K]\n    state S[K, V]\n    S = S + * 2\n")
    text = str(info.value)
    assert "<spec>:4:13: error: unexpected '*'" in text
    assert text.splitlines()[2] == "    " + " " * 12 + "^"


def test_compile_reads_files_and_picks_names(tmp_path):
    p = tmp_path / "two.lin"
    p.write_text(DESIGN.read_text())
    with pytest.raises(ValueError, match="pick one with name"):
        linforge.compile(p)
    assert linforge.compile(str(p), name="rwkv7").name == "rwkv7"
    assert set(linforge.load(p)) == set(EXPECTED_CLASS)
    with pytest.raises(FileNotFoundError):
        linforge.compile(str(tmp_path / "missing.lin"))


def test_info_reports_structure():
    info = linforge.compile(DESIGN, name="mamba2").info()
    assert info["inputs"] == {"x": ["V"], "B": ["K"], "C": ["K"], "dt": []}
    assert info["params"] == {"A": [], "D": [], "dt_bias": []}
    assert info["transition_class"] == "scalar decay"
    assert info["forms"] == ["recurrent", "chunk", "parallel"]


def test_ir_nodes_are_hash_consed():
    attn = linforge.compile(DESIGN, name="gated_deltanet")
    nodes = list(attn.program.updates[0].value.walk())
    assert len(nodes) == len(set(nodes))
    assert torch is not None
