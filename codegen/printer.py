"""Print sympy expressions as Triton (``triton.language as tl``) expression strings.

The elementwise parts of a spec live as sympy expressions (``ir.sympy_view``); the kernel
emitters splice them into kernel skeletons through this printer. ``TRITON_FUNCTIONS`` is the
only source of truth for how each builtin prints; ``_print_Pow`` picks the cheapest form of a
power. Every printed string is one valid Python expression; parentheses come from operator
precedence, not from wrapping everything.

Conventions of the output:

- numbers, integers included, print as float literals (``2.0``, ``0.5``, ``1e-06``), so no
  integer arithmetic sneaks into a float kernel; a constant subexpression (``sqrt(2)``,
  ``log(3)``, ``pi``) is folded to one literal;
- the formulas assume fp32 operands (cast bf16/fp16 loads first): ``tl.exp`` and friends
  are fp32-only on some Triton versions, and the stable formulas rely on fp32 rounding;
- templates may repeat their argument (``silu``: ``x * tl.sigmoid(x)``); Triton's compiler
  removes the common subexpressions, but an emitter should bind a large argument to a
  variable first so the source stays readable;
- every formula uses only ``tl`` functions present in Triton 3.6 and 3.9 (no ``tl.tanh``,
  ``log1p`` or ``expm1``), and none creates inf or NaN in its selected branch for a finite
  fp32 input.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass

import sympy
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.printer import Printer

__all__ = ["TRITON_FUNCTIONS", "TritonFunction", "TritonPrintError", "TritonPrinter",
           "print_triton"]

_ATOM = PRECEDENCE["Atom"]
_ADD = PRECEDENCE["Add"]
_MUL = PRECEDENCE["Mul"]

#: Integer powers up to this magnitude print as repeated multiplication.
MAX_MULTIPLY_POWER = 8


class TritonPrintError(ValueError):
    """An expression (a function, a symbol, a constant) that has no Triton translation."""


@dataclass(frozen=True)
class TritonFunction:
    """How one sympy function prints: a ``str.format`` template over its printed arguments.

    ``{0}``, ``{1}`` are the printed arguments as they are (for use inside a call);
    ``{p[0]}``, ``{p[1]}`` the same in parentheses where their precedence is below
    ``arg_precedence`` (for use as an operand). ``precedence`` is that of the printed result
    (an atom for a single call).
    """

    template: str
    precedence: int = _ATOM
    arg_precedence: int = 0

    def format(self, args: list[str], operands: list[str] | None = None) -> str:
        """The template filled with printed arguments (and operands, if it has any)."""
        return self.template.format(*args, p=operands if operands is not None else args)


# Stable building blocks; ``{0}`` is the (first) argument.
_X = "{0}"
# The GPU's fast sin/cos lose accuracy away from 0 (3.8e-3 relative error seen on an H100 for
# arguments near 15): reduce the argument to [-pi, pi] first, in two steps (Cody-Waite:
# 6.28125 has few bits, so k * 6.28125 is exact and the reduction adds no rounding error).
_TURNS = "tl.floor({p[0]} * 0.15915494309189535 + 0.5)"
_TWO_PI_REDUCED = f"{{p[0]}} - {_TURNS} * 6.28125 - {_TURNS} * 0.0019353071795864769"
_Z = f"tl.exp(-tl.abs({_X}))"  # in (0, 1]: never overflows
# log(1 + z) for z in [0, 1]: log(u) with u = fl(1 + z), minus the rounding error of u
# divided by u (exact in fp32: (u - 1) - z recovers the error). No tl.log1p in every Triton.
_LOG1P_Z = f"tl.log(1.0 + {_Z})", f"(1.0 + {_Z} - 1.0 - {_Z}) / (1.0 + {_Z})"
# exp(m) - 1 for m = min(x, 0) <= 0: Taylor series where cancellation would hurt (m > -0.1,
# relative error < 2e-8), exp(m) - 1.0 elsewhere (relative error < 1e-6).
_M = f"tl.minimum({_X}, 0.0)"
_XP = "{p[0]}"  # the argument as an operand
_EXPM1_M = (f"tl.where({_XP} > -0.1, {_M} * (1.0 + {_M} * (0.5 + {_M} * (0.16666666666666666"
            f" + {_M} * (0.041666666666666664 + {_M} * 0.008333333333333333)))),"
            f" tl.exp({_M}) - 1.0)")
# tanh: odd Taylor series for |x| < 0.1 (relative error < 1e-9), else 1 - 2 / (exp(2x) + 1),
# which saturates to +-1 without inf - inf (exp overflow gives 1 - 0).
_X2 = f"{_XP} * {_XP}"
_TANH = (f"tl.where(tl.abs({_X}) < 0.1, {_XP} * (1.0 + {_X2} * (-0.3333333333333333 + {_X2}"
         f" * (0.13333333333333333 - {_X2} * 0.05396825396825397))),"
         f" 1.0 - 2.0 / (tl.exp(2.0 * {_XP}) + 1.0))")

#: sympy function name -> how it prints. Keys are sympy class names (``type(e).__name__``),
#: plus ``sqrt`` / ``rsqrt`` for the powers ``x**0.5`` / ``x**-0.5``. Every builtin of
#: ``ir.functions.ELEMENTWISE`` and ``BINARY_ELEMENTWISE`` must have an entry (tested).
TRITON_FUNCTIONS: dict[str, TritonFunction] = {
    "exp": TritonFunction("tl.exp({0})"),
    "log": TritonFunction("tl.log({0})"),
    "sigmoid": TritonFunction("tl.sigmoid({0})"),
    # min(x, 0) - log(1 + exp(-|x|))
    "logsigmoid": TritonFunction(f"tl.minimum({_X}, 0.0) - {_LOG1P_Z[0]} + {_LOG1P_Z[1]}",
                                 _ADD),
    # max(x, 0) + log(1 + exp(-|x|)): exact for large x, relative for very negative x
    "softplus": TritonFunction(f"tl.maximum({_X}, 0.0) + {_LOG1P_Z[0]} - {_LOG1P_Z[1]}", _ADD),
    "relu": TritonFunction("tl.maximum({0}, 0.0)"),
    "step": TritonFunction("tl.where({p[0]} > 0.0, 1.0, 0.0)", arg_precedence=_ADD),
    # max(x, 0) + expm1(min(x, 0))
    "elu": TritonFunction(f"tl.maximum({_X}, 0.0) + {_EXPM1_M}", _ADD, arg_precedence=_ADD),
    "silu": TritonFunction("{p[0]} * tl.sigmoid({0})", _MUL, arg_precedence=_MUL),
    "tanh": TritonFunction(_TANH, arg_precedence=_MUL),
    "cos": TritonFunction(f"tl.cos({_TWO_PI_REDUCED})"),
    "sin": TritonFunction(f"tl.sin({_TWO_PI_REDUCED})"),
    "Abs": TritonFunction("tl.abs({0})"),
    "sqrt": TritonFunction("tl.sqrt({0})"),
    "rsqrt": TritonFunction("tl.rsqrt({0})"),
    "Max": TritonFunction("tl.maximum({0}, {1})"),
    "Min": TritonFunction("tl.minimum({0}, {1})"),
    # derivatives: d|x| = sign(x), dMax(x, y)/dx = Heaviside(x - y, 1/2)
    "sign": TritonFunction("tl.where({p[0]} > 0.0, 1.0, tl.where({p[0]} < 0.0, -1.0, 0.0))",
                           arg_precedence=_ADD),
    "Heaviside": TritonFunction("tl.where({p[0]} > 0.0, 1.0, tl.where({p[0]} < 0.0, 0.0, {1}))",
                                arg_precedence=_ADD),
}

_RELATIONS = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "==": "==", "!=": "!="}
_VALID_NAME_NODES = (ast.Name, ast.Attribute, ast.Subscript, ast.Call)


def _float_literal(value: float) -> str:
    if math.isnan(value):
        raise TritonPrintError("a NaN constant has no place in a kernel")
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(float(value))


def _real(expr: sympy.Expr) -> float:
    """The value of a constant expression (``sqrt(2)``, ``pi``, ``1/3``) as a float."""
    try:
        return float(expr)
    except TypeError:
        raise TritonPrintError(f"constant {expr} is not real") from None


def _is_negative(term: sympy.Expr) -> bool:
    """True when a term prints with a leading minus (a negative numeric factor)."""
    return _real(sympy.Mul(*[f for f in sympy.Mul.make_args(term) if f.is_number])) < 0


def _int_exponent(e: sympy.Expr) -> int | None:
    """The exponent as an int when it is integral (``2`` or ``2.0``), else None."""
    if e.is_Integer or (e.is_Float and float(e).is_integer()):
        return int(e)
    return None


class TritonPrinter(Printer):
    """Prints a sympy expression as one Triton expression; see the module docstring.

    ``names`` maps every free symbol to the Triton expression that holds it (a variable
    name such as ``b_k``, or an atom such as ``b_k[:, None]``). Anything without a
    translation (an unknown function, an unmapped symbol, ``I``, ``nan``) raises
    ``TritonPrintError`` naming it.
    """

    printmethod = "_tritoncode"

    def __init__(self, names: dict[sympy.Symbol, str]):
        super().__init__()
        for sym, name in names.items():
            try:
                node = ast.parse(name, mode="eval").body
            except SyntaxError:
                node = None
            if not isinstance(node, _VALID_NAME_NODES):
                raise TritonPrintError(
                    f"Triton name {name!r} of the symbol {sym} is not a Python name, attribute,"
                    " subscript or call (a keyword such as 'lambda' must be renamed)")
        self.names = dict(names)

    def doprint(self, expr) -> str:
        """The Triton expression string of ``expr``."""
        return self._print(sympy.sympify(expr))

    # -- dispatch and precedence ---------------------------------------------------------

    def _print(self, expr, **kwargs) -> str:
        if isinstance(expr, sympy.Expr) and expr.is_number:
            return self._constant(expr)  # fold sqrt(2), log(3), pi, 1/3 to one literal
        return super()._print(expr, **kwargs)

    def emptyPrinter(self, expr) -> str:
        raise TritonPrintError(
            f"cannot print {type(expr).__name__} ({expr}) as Triton: unsupported expression")

    def _constant(self, expr: sympy.Expr) -> str:
        return _float_literal(_real(expr))

    def _precedence(self, expr) -> int:
        """Precedence of ``expr`` as this printer prints it (sympy's differs for Pow)."""
        if isinstance(expr, sympy.Expr) and expr.is_number:
            return _ADD if _real(expr) < 0 else _ATOM
        if isinstance(expr, sympy.Pow):
            kind = self._pow_kind(expr)
            return _MUL if kind in ("multiply", "divide") or (
                kind == "exp_abs" and _int_exponent(expr.exp) % 2) else _ATOM
        if isinstance(expr, sympy.Mul):
            return _ADD if _is_negative(expr) else _MUL
        if isinstance(expr, (sympy.Function, sympy.Piecewise, sympy.Max, sympy.Min)):
            entry = TRITON_FUNCTIONS.get(type(expr).__name__)
            return entry.precedence if entry else _ATOM
        if isinstance(expr, (sympy.And, sympy.Or, sympy.Not)):
            return PRECEDENCE["And"]
        return precedence(expr)

    def _paren(self, expr, level: int, *, equal: bool = False) -> str:
        """``expr`` printed, in parentheses when its precedence is below ``level``
        (or equal to it, with ``equal``: the right operand of ``/`` or ``-``)."""
        p = self._precedence(expr)
        text = self._print(expr)
        return f"({text})" if p < level or (equal and p == level) else text

    # -- leaves ----------------------------------------------------------------------------

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        try:
            return self.names[expr]
        except KeyError:
            known = ", ".join(sorted(str(s) for s in self.names)) or "none"
            raise TritonPrintError(
                f"no Triton name for the symbol {expr.name!r} (known: {known})") from None

    # -- arithmetic ------------------------------------------------------------------------

    def _print_Add(self, expr: sympy.Add) -> str:
        terms = expr.as_ordered_terms()
        out = [self._print(terms[0])]
        for term in terms[1:]:
            if _is_negative(term):
                out.append(f"- {self._paren(-term, _ADD, equal=True)}")
            else:
                out.append(f"+ {self._paren(term, _ADD)}")
        return " ".join(out)

    def _print_Mul(self, expr: sympy.Mul) -> str:
        coeff, num, den = 1.0, [], []
        for f in expr.as_ordered_factors():
            n = _int_exponent(f.exp) if isinstance(f, sympy.Pow) else None
            if f.is_number:  # Number or folded constant such as sqrt(2)
                coeff *= _real(f)
            elif n is not None and n < 0:
                den.append(f.base if n == -1 else sympy.Pow(f.base, -n))
            else:
                num.append(f)
        sign = "-" if coeff < 0 else ""
        coeff = abs(coeff)
        parts = [_float_literal(coeff)] if coeff != 1 or not num else []
        parts += [self._paren(f, _MUL) for f in num]
        text = sign + " * ".join(parts)
        if len(den) == 1:
            text += f" / {self._paren(den[0], _MUL, equal=True)}"
        elif den:
            text += " / (" + " * ".join(self._paren(f, _MUL) for f in den) + ")"
        return text

    def _pow_kind(self, expr: sympy.Pow) -> str:
        b, e = expr.base, expr.exp
        n = _int_exponent(e)
        if n is not None:
            if 0 < n <= MAX_MULTIPLY_POWER:
                return "multiply"
            return "divide" if -MAX_MULTIPLY_POWER <= n < 0 else "exp_abs"
        if e.is_Number and abs(float(e)) == 0.5:
            return "sqrt" if e > 0 else "rsqrt"
        return "exp_const_base" if b.is_number else "exp_log"

    def _print_Pow(self, expr: sympy.Pow) -> str:
        """``x**n`` for integer ``n``: by multiplication (``|n| <= 8``) or through
        ``exp(n * log|x|)`` with the sign of odd powers restored; ``x**0.5`` and ``x**-0.5``
        by ``tl.sqrt`` / ``tl.rsqrt``; ``c**e`` for a constant ``c > 0`` as
        ``tl.exp(e * log(c))``; any other ``x**e`` as ``tl.exp(e * tl.log(x))``, which needs
        ``x > 0`` (NaN otherwise)."""
        b, e = expr.base, expr.exp
        kind = self._pow_kind(expr)
        exp, log = TRITON_FUNCTIONS["exp"], TRITON_FUNCTIONS["log"]
        if kind == "multiply":
            return " * ".join([self._paren(b, _MUL)] * _int_exponent(e))
        if kind == "divide":
            n = -_int_exponent(e)
            den = b if n == 1 else sympy.Pow(b, n)
            return f"1.0 / {self._paren(den, _MUL, equal=True)}"
        if kind in ("sqrt", "rsqrt"):
            return TRITON_FUNCTIONS[kind].format([self._print(b)])
        if kind == "exp_abs":
            n = _int_exponent(e)
            log_abs = log.format([TRITON_FUNCTIONS["Abs"].format([self._print(b)])])
            if n % 2 == 0:
                return exp.format([f"{float(n)!r} * {log_abs}"])
            return f"{self._paren(b, _MUL)} * " + exp.format([f"{float(n - 1)!r} * {log_abs}"])
        exponent = self._paren(e, _MUL)
        if kind == "exp_const_base":  # c**e = exp(e * log(c)), log(c) folded
            log_b = sympy.log(b)
            if not log_b.is_real:
                raise TritonPrintError(f"power {expr} of a non-positive constant base")
            return exp.format([f"{exponent} * {self._constant(log_b)}"])
        return exp.format([f"{exponent} * {log.format([self._print(b)])}"])

    # -- functions -------------------------------------------------------------------------

    def _entry(self, expr) -> TritonFunction:
        name = type(expr).__name__
        try:
            return TRITON_FUNCTIONS[name]
        except KeyError:
            raise TritonPrintError(
                f"no Triton translation for the function {name!r} (in {expr}); supported: "
                + ", ".join(sorted(TRITON_FUNCTIONS))) from None

    def _print_Function(self, expr: sympy.Function) -> str:
        entry = self._entry(expr)
        return entry.format([self._print(a) for a in expr.args],
                            [self._paren(a, entry.arg_precedence) for a in expr.args])

    def _print_MinMaxBase(self, expr) -> str:  # Max and Min, any arity
        entry = self._entry(expr)
        args = [self._print(a) for a in expr.args]
        text = args[-1]
        for a in reversed(args[:-1]):
            text = entry.format([a, text])
        return text

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        *pieces, (last, cond) = expr.args
        if cond != sympy.true:
            raise TritonPrintError(f"Piecewise {expr} has no otherwise (True) branch")
        text = self._print(last)
        for value, c in reversed(pieces):
            text = f"tl.where({self._print(c)}, {self._print(value)}, {text})"
        return text

    # -- conditions ------------------------------------------------------------------------

    def _print_Relational(self, expr) -> str:
        op = _RELATIONS.get(expr.rel_op)
        if op is None:
            raise TritonPrintError(f"unsupported relation {expr}")
        return f"{self._paren(expr.lhs, _ADD)} {op} {self._paren(expr.rhs, _ADD)}"

    def _print_And(self, expr) -> str:  # & binds tighter than a comparison
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr) -> str:
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Not(self, expr) -> str:
        return f"~({self._print(expr.args[0])})"

    def _print_BooleanTrue(self, expr) -> str:
        return "True"

    def _print_BooleanFalse(self, expr) -> str:
        return "False"


def print_triton(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """The Triton expression string of ``expr``, with ``names`` mapping each free symbol to
    the Triton variable holding it: ``print_triton(exp(g) * x, {g: "b_g", x: "b_x"})`` is
    ``"b_x * tl.exp(b_g)"``."""
    return TritonPrinter(names).doprint(expr)
