"""Sign analysis: lower bounds the chunked form relies on to store normalized readouts in
half precision, checked against the values on random inputs."""

import pytest
import torch

import linforge
from linforge.codegen.chunk_op import _cancels, chunk_plan
from linforge.ir.interpret import StepEvaluator
from linforge.ir.signs import lower_bound

TEMPLATE = """
attention probe
    inputs q[K], k[K], v[V]
    state  S[K, V], z[K]
    q = {expr}
    S = S + outer(k, v)
    z = z + k
    o = (q @ S) / (q @ z + 1e-6)
"""

# feature map of q -> the lower bound the analysis must prove (None: none)
CASES = {
    "elu(q) + 1": 0.0,
    "relu(q) * exp(k)": 0.0,
    "sigmoid(q) - 0.5": None,
    "q ** 2 + softplus(k)": 0.0,
    "cos(q) + 1": 0.0,
    "max(q, 0.25)": 0.25,
    "tanh(q)": -1.0,
    "q": None,
}


@pytest.mark.parametrize("expr", CASES)
def test_lower_bound_is_proved_and_holds_on_random_inputs(expr):
    attn = linforge.compile(TEMPLATE.format(expr=expr))
    (sp,) = chunk_plan(attn.analysis).states
    bound = lower_bound(sp.query)
    assert bound == CASES[expr]
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(4096, 1, 8, generator=g) * 5 for _ in range(2))
    ev = StepEvaluator({("input", "q"): q, ("input", "k"): k}, {"K": 8, "V": 8, "H": 1},
                       torch.float32, "cpu")
    if bound is not None:
        assert ev(sp.query).min().item() >= bound - 1e-6


def test_library_normalizers_are_stored_in_half_only_where_proved_safe():
    for name, safe in (("linear_attention", True), ("performer", True), ("cosformer", False)):
        attn = linforge.library.get(name)
        for sp in chunk_plan(attn.analysis).states:   # cosFormer: a cos and a sin state
            assert _cancels(attn.analysis, sp) is not safe, name
