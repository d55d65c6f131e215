"""The builtin functions of the language: one table, the only source of truth.

Each elementwise builtin has a torch implementation (for the reference interpreter) and a
sympy function (for simplification, derivatives and the Triton printer). Functions that sympy
lacks (sigmoid, softplus, ...) are defined here as sympy Functions with their derivatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
import torch.nn.functional as F


class sigmoid(sympy.Function):  # noqa: N801 - sympy functions are lower case
    """Logistic sigmoid 1 / (1 + exp(-x))."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class logsigmoid(sympy.Function):  # noqa: N801
    """log(sigmoid(x)), computed stably."""

    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])


class softplus(sympy.Function):  # noqa: N801
    """log(1 + exp(x)), computed stably."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class relu(sympy.Function):  # noqa: N801
    """max(x, 0)."""

    def fdiff(self, argindex=1):
        return step(self.args[0])


class step(sympy.Function):  # noqa: N801
    """1 where x > 0 else 0 (the derivative of relu; its own derivative is taken as 0)."""

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class elu(sympy.Function):  # noqa: N801
    """x where x > 0 else exp(x) - 1."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sympy.Piecewise((1, x > 0), (sympy.exp(x), True))


class silu(sympy.Function):  # noqa: N801
    """x * sigmoid(x)."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        s = sigmoid(x)
        return s * (1 + x * (1 - s))


@dataclass(frozen=True)
class Elementwise:
    """A unary elementwise builtin: its torch implementation and its sympy function."""

    name: str
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    sympy_fn: Callable
    doc: str


ELEMENTWISE: dict[str, Elementwise] = {
    e.name: e
    for e in [
        Elementwise("exp", torch.exp, sympy.exp, "e ** x"),
        Elementwise("log", torch.log, sympy.log, "natural logarithm"),
        Elementwise("sigmoid", torch.sigmoid, sigmoid, "1 / (1 + exp(-x))"),
        Elementwise("logsigmoid", F.logsigmoid, logsigmoid, "log(sigmoid(x))"),
        Elementwise("softplus", F.softplus, softplus, "log(1 + exp(x))"),
        Elementwise("relu", torch.relu, relu, "max(x, 0)"),
        Elementwise("elu", F.elu, elu, "x if x > 0 else exp(x) - 1"),
        Elementwise("silu", F.silu, silu, "x * sigmoid(x)"),
        Elementwise("tanh", torch.tanh, sympy.tanh, "hyperbolic tangent"),
        Elementwise("cos", torch.cos, sympy.cos, "cosine"),
        Elementwise("sin", torch.sin, sympy.sin, "sine"),
        Elementwise("abs", torch.abs, sympy.Abs, "absolute value"),
        Elementwise("sqrt", torch.sqrt, sympy.sqrt, "square root"),
    ]
}

# name -> (number of tensor arguments, description); the dim argument of reductions is extra.
BINARY_ELEMENTWISE = {"max": "elementwise maximum of two values",
                      "min": "elementwise minimum of two values"}
REDUCTIONS = {
    "sum": "sum(x) or sum(x, D): sum over a dim",
    "norm": "norm(x) or norm(x, D): Euclidean norm over a dim",
    "l2norm": "l2norm(x) or l2norm(x, D): x / sqrt(sum(x * x) + 1e-6)",
    "softmax": "softmax(x) or softmax(x, D): softmax over a dim",
}
STRUCTURAL = {
    "outer": "outer(x, y): outer product of vectors over different dims",
    "taylor2": "taylor2(x): [1, x, vec(x x^T) / sqrt(2)] over a dim declared as 1 + D + D * D",
}
CONSTANTS = {"pi": math.pi}


def supported_functions() -> list[str]:
    """Every builtin function name, sorted (for error messages and docs)."""
    return sorted([*ELEMENTWISE, *BINARY_ELEMENTWISE, *REDUCTIONS, *STRUCTURAL])
