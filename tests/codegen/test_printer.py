"""TritonPrinter: golden strings per table entry, and numbers from real Triton kernels.

The numeric tests print an expression into a small kernel module, import it with
``TRITON_INTERPRET=1`` set (``triton.jit`` reads the variable when it decorates, so setting
it around the import is enough whatever imported triton first), and compare the result
with torch in float32.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools

import pytest
import sympy
import torch
from linforge.codegen.printer import TRITON_FUNCTIONS, TritonPrinter, TritonPrintError, print_triton
from linforge.ir.functions import (
    BINARY_ELEMENTWISE,
    ELEMENTWISE,
    elu,
    logsigmoid,
    relu,
    sigmoid,
    silu,
    softplus,
    step,
)

a, b = sympy.symbols("a b", real=True)
NAMES = {a: "a", b: "b"}
RTOL = 1e-5

# -- golden strings ---------------------------------------------------------------------------

_Z = "tl.exp(-tl.abs(a))"
_M = "tl.minimum(a, 0.0)"
_A2 = "a * a"
GOLDEN = {
    # one per table entry
    "exp": (sympy.exp(a), "tl.exp(a)"),
    "log": (sympy.log(a), "tl.log(a)"),
    "sigmoid": (sigmoid(a), "tl.sigmoid(a)"),
    "logsigmoid": (logsigmoid(a), (f"tl.minimum(a, 0.0) - tl.log(1.0 + {_Z})"
                                   f" + (1.0 + {_Z} - 1.0 - {_Z}) / (1.0 + {_Z})")),
    "softplus": (softplus(a), (f"tl.maximum(a, 0.0) + tl.log(1.0 + {_Z})"
                               f" - (1.0 + {_Z} - 1.0 - {_Z}) / (1.0 + {_Z})")),
    "relu": (relu(a), "tl.maximum(a, 0.0)"),
    "step": (step(a), "tl.where(a > 0.0, 1.0, 0.0)"),
    "elu": (elu(a),
            (f"tl.maximum(a, 0.0) + tl.where(a > -0.1, {_M} * (1.0 + {_M} * (0.5 + {_M}"
             f" * (0.16666666666666666 + {_M} * (0.041666666666666664 + {_M}"
             f" * 0.008333333333333333)))), tl.exp({_M}) - 1.0)")),
    "silu": (silu(a), "a * tl.sigmoid(a)"),
    "tanh": (sympy.tanh(a), (f"tl.where(tl.abs(a) < 0.1, a * (1.0 + {_A2} * (-0.3333333333333333"
                             f" + {_A2} * (0.13333333333333333 - {_A2} * 0.05396825396825397))),"
                             " 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0))")),
    "cos": (sympy.cos(a), "tl.cos(a - tl.floor(a * 0.15915494309189535 + 0.5) * 6.28125 - tl.floor(a * 0.15915494309189535 + 0.5) * 0.0019353071795864769)"),
    "sin": (sympy.sin(a), "tl.sin(a - tl.floor(a * 0.15915494309189535 + 0.5) * 6.28125 - tl.floor(a * 0.15915494309189535 + 0.5) * 0.0019353071795864769)"),
    "Abs": (sympy.Abs(a), "tl.abs(a)"),
    "sqrt": (sympy.sqrt(a), "tl.sqrt(a)"),
    "rsqrt": (1 / sympy.sqrt(a), "tl.rsqrt(a)"),
    "Max": (sympy.Max(a, b), "tl.maximum(a, b)"),
    "Min": (sympy.Min(a, b), "tl.minimum(a, b)"),
    "sign": (sympy.sign(a), "tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, 0.0))"),
    "Heaviside": (sympy.Heaviside(a), "tl.where(a > 0.0, 1.0, tl.where(a < 0.0, 0.0, 0.5))"),
    # powers
    "pow-square": (a**2, "a * a"),
    "pow-cube-of-sum": ((a + b) ** 3, "(a + b) * (a + b) * (a + b)"),
    "pow-float-integral": (a**2.0, "a * a"),
    "pow-half-float": (a**0.5, "tl.sqrt(a)"),
    "pow-minus-half-float": (a**-0.5, "tl.rsqrt(a)"),
    "pow-reciprocal": (1 / a, "1.0 / a"),
    "pow-minus-two": (a**-2, "1.0 / (a * a)"),
    "pow-large-even": (a**10, "tl.exp(10.0 * tl.log(tl.abs(a)))"),
    "pow-large-odd": (a**11, "a * tl.exp(10.0 * tl.log(tl.abs(a)))"),
    "pow-real": (a**1.5, "tl.exp(1.5 * tl.log(a))"),
    "pow-symbolic": (a**b, "tl.exp(b * tl.log(a))"),
    "pow-constant-base": (2 ** (-5 - a), "tl.exp((-a - 5.0) * 0.6931471805599453)"),
    # numbers
    "int-as-float": (a + 1, "a + 1.0"),
    "rational": (a / 2, "0.5 * a"),
    "small-float": (a + sympy.Float(1e-6), "a + 1e-06"),
    "pi": (sympy.pi * a, "3.141592653589793 * a"),
    "folded-constant": (sympy.sqrt(2) * a, "1.4142135623730951 * a"),
    "constant-only": (sympy.log(2), "0.6931471805599453"),
    # precedence
    "sub": (a - 2 * b + 3, "a - 2.0 * b + 3.0"),
    "neg": (-a, "-a"),
    "div-by-sum": (-a * b / (a + 2 * b), "-a * b / (a + 2.0 * b)"),
    "div-by-product": (a / (b * sympy.cos(a)), "a / (b * tl.cos(a - tl.floor(a * 0.15915494309189535 + 0.5) * 6.28125 - tl.floor(a * 0.15915494309189535 + 0.5) * 0.0019353071795864769))"),
    "div-by-power": (a / b**2, "a / (b * b)"),
    "neg-reciprocal": (-1 / (a + b), "-1.0 / (a + b)"),
    "mul-sum": (a * (a + b) * sympy.exp(b), "a * (a + b) * tl.exp(b)"),
    "sub-template-add": (1 - relu(a) - logsigmoid(b),
                         ("-(tl.minimum(b, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(b))) + (1.0 + "
                          "tl.exp(-tl.abs(b)) - 1.0 - tl.exp(-tl.abs(b))) / (1.0 + "
                          "tl.exp(-tl.abs(b)))) - tl.maximum(a, 0.0) + 1.0")),
    "silu-of-sum": (silu(a + b), "(a + b) * tl.sigmoid(a + b)"),
    "step-of-sum": (step(a - b), "tl.where(a - b > 0.0, 1.0, 0.0)"),
    "max-three": (sympy.Max(a, b, 1), "tl.maximum(1.0, tl.maximum(a, b))"),
    "piecewise": (sympy.Piecewise((a, a > 0), (b, a < -1), (0, True)),
                  "tl.where(a > 0.0, a, tl.where(a < -1.0, b, 0.0))"),
    "piecewise-and": (sympy.Piecewise((a, (a > 0) & (b > 0)), (b, True)),
                      "tl.where((a > 0.0) & (b > 0.0), a, b)"),
    "elu-derivative": (sympy.diff(elu(a), a),
                       "tl.where(a > 0.0, 1.0, tl.exp(a))"),
}


@pytest.mark.parametrize("expr, expected", GOLDEN.values(), ids=GOLDEN.keys())
def test_golden(expr, expected):
    text = print_triton(expr, NAMES)
    assert text == expected
    ast.parse(text, mode="eval")  # one valid Python expression


def test_every_table_entry_has_a_golden_string():
    assert set(TRITON_FUNCTIONS) <= set(GOLDEN)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_every_builtin_has_a_printer_entry(name):
    assert ELEMENTWISE[name].sympy_fn.__name__ in TRITON_FUNCTIONS
    print_triton(ELEMENTWISE[name].sympy_fn(a), NAMES)


@pytest.mark.parametrize("name", sorted(BINARY_ELEMENTWISE))
def test_every_binary_builtin_has_a_printer_entry(name):
    assert name.capitalize() in TRITON_FUNCTIONS


def test_unsupported_function_is_named():
    with pytest.raises(TritonPrintError, match="'erf'"):
        print_triton(sympy.erf(a) + 1, NAMES)
    with pytest.raises(TritonPrintError, match="'f'"):
        print_triton(sympy.Function("f")(a), NAMES)
    with pytest.raises(TritonPrintError, match="Derivative"):
        print_triton(sympy.Derivative(sympy.Function("f")(a), a), NAMES)


def test_unmapped_symbol_is_named():
    with pytest.raises(TritonPrintError, match=r"'l2norm\(k\)'"):
        print_triton(sympy.exp(sympy.Symbol("l2norm(k)")) * a, NAMES)


def test_names_must_be_python_atoms():
    with pytest.raises(TritonPrintError, match="lambda"):
        TritonPrinter({a: "lambda"})
    with pytest.raises(TritonPrintError):
        TritonPrinter({a: "x + y"})
    assert print_triton(a * b, {a: "b_q[:, None]", b: "b_k"}) == "b_q[:, None] * b_k"


def test_non_real_constants_are_refused():
    with pytest.raises(TritonPrintError):
        print_triton(a + sympy.I, NAMES)
    with pytest.raises(TritonPrintError):
        print_triton(a + sympy.nan, NAMES)
    with pytest.raises(TritonPrintError, match="otherwise"):
        print_triton(sympy.Piecewise((a, a > 0)), NAMES)


# -- numbers from Triton kernels --------------------------------------------------------------

_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def kernel(p_a, p_b, p_out, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(p_a + offs, mask=mask, other=1.0)
    b = tl.load(p_b + offs, mask=mask, other=1.0)
    out = tl.zeros_like(a) + ({expr})
    tl.store(p_out + offs, out, mask=mask)
'''
_counter = itertools.count()


@pytest.fixture
def run_triton(tmp_path, monkeypatch):
    """``run(expr, a, b)``: ``expr`` printed into a kernel, run by Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def run(expr: sympy.Expr, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ones_like(x) if y is None else y
        path = tmp_path / f"printer_kernel_{next(_counter)}.py"
        path.write_text(_KERNEL.format(expr=print_triton(expr, NAMES)))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = torch.empty_like(x)
        n = x.numel()
        module.kernel[(1,)](x, y, out, n, BLOCK=max(16, 1 << (n - 1).bit_length()))
        return out

    return run


def _inputs(positive: bool = False) -> torch.Tensor:
    """float32 values spanning -30..30 with small, tiny and threshold values."""
    small = [0.0, 1e-7, 1e-5, 1e-3, 0.01, 0.05, 0.0999, 0.1, 0.1001, 0.5, 1.0, 2.0, 5.0, 10.0,
             15.0, 19.9, 20.0, 20.1, 25.0, 30.0]
    x = torch.cat([torch.linspace(-30, 30, 241, dtype=torch.float64),
                   torch.tensor(small, dtype=torch.float64),
                   -torch.tensor(small, dtype=torch.float64)]).float()
    return x[x > 0] if positive else x


_POSITIVE = {"log", "sqrt"}
# d tanh = 1 - tanh**2 cancels in fp32 where tanh is near +-1 (torch's fp32 backward does the
# same with its own rounding of tanh): an absolute error of a few ulp of 1 is all one can ask.
_DERIVATIVE_ATOL = {"tanh": 1e-6}


def _check(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, what: str,
           atol: float = 0.0):
    assert torch.isfinite(actual).all(), f"{what}: non-finite at {x[~torch.isfinite(actual)]}"
    err = (actual.double() - expected.double()).abs()
    bad = err > atol + RTOL * expected.double().abs()
    assert not bad.any(), (f"{what}: relative error above {RTOL} at x = {x[bad].tolist()}: "
                           f"got {actual[bad].tolist()}, expected {expected[bad].tolist()}")


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_builtin_in_triton_matches_torch(run_triton, name):
    fn = ELEMENTWISE[name]
    x = _inputs(positive=name in _POSITIVE)
    _check(run_triton(fn.sympy_fn(a), x), fn.torch_fn(x), x, name)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_derivative_in_triton_matches_autograd(run_triton, name):
    fn = ELEMENTWISE[name]
    x = _inputs(positive=name in _POSITIVE)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fn.torch_fn(leaf).sum(), leaf)
    derivative = sympy.diff(fn.sympy_fn(a), a)
    _check(run_triton(derivative, x), expected, x, f"d {name}", _DERIVATIVE_ATOL.get(name, 0.0))


COMPOSITES = {  # expression -> torch of (a, b), on positive a and any b
    "pow-cube-of-sum": ((a + b) ** 3, lambda x, y: (x + y) ** 3),
    "pow-minus-two": (a**-2, lambda x, y: x**-2),
    "pow-rsqrt": (a**-0.5, lambda x, y: torch.rsqrt(x)),
    "pow-large-odd-negative-base": ((-a) ** 9, lambda x, y: (-x) ** 9),
    "pow-real": (a**1.5, lambda x, y: x**1.5),
    "pow-constant-base": (2 ** (-5 - b / 8), lambda x, y: 2 ** (-5 - y / 8)),
    "div-by-sum": (-a * b / (a + 2 * b), lambda x, y: -x * y / (x + 2 * y)),
    "max-three": (sympy.Max(a, b, 1), lambda x, y: torch.maximum(torch.maximum(x, y),
                                                                 torch.ones_like(x))),
    "piecewise": (sympy.Piecewise((a, b > 0), (b, b < -1), (0, True)),
                  lambda x, y: torch.where(y > 0, x, torch.where(y < -1, y, 0.0))),
    "nested-functions": (1 - logsigmoid(b) * softplus(-b) / sympy.tanh(a),
                         lambda x, y: 1 - torch.nn.functional.logsigmoid(y)
                         * torch.nn.functional.softplus(-y) / torch.tanh(x)),
}


@pytest.mark.parametrize("expr, reference", COMPOSITES.values(), ids=COMPOSITES.keys())
def test_composite_in_triton_matches_torch(run_triton, expr, reference):
    y = _inputs()
    x = torch.linspace(0.05, 3.0, len(y))
    expected = reference(x.double(), y.double()).float()
    _check(run_triton(expr, x, y), expected, y, str(expr))
