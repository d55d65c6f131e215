"""AST -> IR: resolve names, infer and check named dims, inline local bindings.

Pre: a parsed ``dsl.ast.Spec``. Post: a ``Program`` whose nodes all carry dims that obey the
broadcasting rules (by name), whose updates are ordered with state versions, and whose output
exists. Every user mistake raises ``SpecError`` pointing at the token.
"""

from __future__ import annotations

import difflib

import sympy

from ..dsl import ast
from ..dsl.errors import Span, SpecError
from .functions import (BINARY_ELEMENTWISE, CONSTANTS, ELEMENTWISE, REDUCTIONS, STRUCTURAL,
                        supported_functions)
from .nodes import Decl, Node, Op, Program, Update, const

BUILTIN_DIMS = ("K", "V")
INDEX_NAMES = {"h": Op.HEAD, "H": Op.HEADS, "t": Op.POS, "T": Op.LENGTH}
#: the second argument of a reduction that reduces across heads / tokens, not a named dim
ACROSS = {"H": Op.OVER_HEADS, "T": Op.OVER_TOKENS}
OUTPUT = "o"
FLAGS = ("noncausal",)
_REDUCE_OPS = {"sum": Op.SUM, "norm": Op.NORM, "l2norm": Op.L2NORM, "softmax": Op.SOFTMAX}
_BINOPS = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "**": Op.POW}


def show_dims(dims: tuple[str, ...]) -> str:
    """``[K, V]`` for a tensor, ``scalar`` for a scalar."""
    return f"[{', '.join(dims)}]" if dims else "scalar"


class _Lowering:
    def __init__(self, spec: ast.Spec, filename: str | None):
        self.spec = spec
        self.filename = filename
        self.dims: dict[str, object] = {d: None for d in BUILTIN_DIMS}
        self.inputs: dict[str, Decl] = {}
        self.memory: dict[str, Decl] = {}
        self.params: dict[str, Decl] = {}
        self.states: dict[str, Decl] = {}
        self.env: dict[str, Node] = {}          # locals and rebound inputs
        self.state_version: dict[str, int] = {}
        self.updates: list[Update] = []
        self.output: Node | None = None
        self.output_span: Span | None = None
        self.declared_at: dict[str, Span] = {}

    def error(self, reason: str, span: Span | None, hint: str | None = None) -> SpecError:
        return SpecError(reason, span, self.spec.source, hint=hint, filename=self.filename)

    # ---------------------------------------------------------------- declarations
    def _claim(self, name: str, span: Span, what: str) -> None:
        reserved = {**{d: "a builtin dim" for d in BUILTIN_DIMS},
                    **{n: "a builtin index" for n in INDEX_NAMES},
                    OUTPUT: "the output", **{c: "a builtin constant" for c in CONSTANTS},
                    **{f: "a builtin function" for f in supported_functions()}}
        if name in reserved:
            raise self.error(f"cannot declare {what} '{name}': '{name}' is {reserved[name]}", span)
        if name in self.declared_at:
            first = self.declared_at[name]
            raise self.error(f"'{name}' is declared twice (first at line {first.line})", span)
        self.declared_at[name] = span

    def declare(self) -> None:
        spec = self.spec
        for flag, span in zip(spec.flags, spec.flag_spans):
            if flag not in FLAGS:
                raise self.error(f"unknown flag '{flag}'", span,
                                 hint=f"supported flags: {', '.join(FLAGS)}")
        for d in spec.dims:
            self._claim(d.name, d.span, "dim")
            self.dims[d.name] = None if d.size is None else self._dim_size(d.size)
        if spec.memory and not spec.noncausal:
            raise self.error(
                "memory inputs need a noncausal spec", spec.memory[0].span,
                hint="memory inputs are a second sequence (cross-attention keys and values) that "
                     "every token reads whole; add `noncausal` after the spec's name")
        for kind, table in (("input", self.inputs), ("memory input", self.memory),
                            ("param", self.params), ("state", self.states)):
            decls = {"input": spec.inputs, "memory input": spec.memory, "param": spec.params,
                     "state": spec.states}[kind]
            for v in decls:
                self._claim(v.name, v.span, kind)
                position = self._position(v, kind)
                for dim, dspan in zip(v.dims, v.dim_spans):
                    if dim in ("t", "T") and dim != position and kind == "param":
                        raise self.error(
                            f"'{dim}' is not a dim: a param indexed by the token's position "
                            f"needs a maximum length", dspan,
                            hint=f"write `{v.name}[t < N, ...]` with `dim N = 4096` (or `dim N` "
                                 f"to take the maximum length from {v.name}'s shape)")
                    if dim in ("t", "T") and dim != position:
                        raise self.error(
                            f"'{dim}' is not a dim, and only params can be indexed by the "
                            f"token's position", dspan,
                            hint=f"{kind}s are per token already" if "input" in kind else
                            "a state is one value per sequence, updated token by token")
                    if dim not in self.dims:
                        raise self.error(f"unknown dim '{dim}' in the declaration of '{v.name}'",
                                         dspan, hint=self._dim_hint())
                if len(set(v.dims)) != len(v.dims):
                    raise self.error(f"'{v.name}' repeats a dim: {show_dims(v.dims)}", v.span)
                if kind == "state" and len(v.dims) not in (1, 2):
                    raise self.error(f"state '{v.name}' must be a vector or a matrix, "
                                     f"got {show_dims(v.dims)}", v.span)
                table[v.name] = Decl(v.name, v.dims, v.span, position)
        for name in self.states:
            self.state_version[name] = 0
        if not self.states:
            raise self.error(f"spec '{spec.name}' declares no state", spec.span,
                             hint="add a line such as `state S[K, V]`")

    def _position(self, v: ast.VarDecl, kind: str) -> str | None:
        """The dim of ``v`` indexed by the token's position (``E[t < N, P]``: ``N``)."""
        found = None
        for dim, index, ispan in zip(v.dims, v.index or (None,) * len(v.dims),
                                     v.index_spans or (None,) * len(v.dims)):
            if index is None:
                continue
            if kind != "param":
                raise self.error(f"only params can be indexed by position, but {kind} "
                                 f"'{v.name}' is", ispan,
                                 hint="inputs and states are per token already; write "
                                      f"`params {v.name}[t < N, ...]` for a param that holds one "
                                      "row per position")
            if index != "t":
                raise self.error(f"a position index must be 't' (the token's position), got "
                                 f"'{index}'", ispan, hint=f"write `{v.name}[t < {dim}, ...]`")
            if found is not None:
                raise self.error(f"param '{v.name}' is indexed by position twice", ispan)
            if dim in BUILTIN_DIMS:
                raise self.error(f"the maximum length of '{v.name}' must be a declared dim, not "
                                 f"the head dim {dim}", ispan,
                                 hint="declare it: `dim N = 4096`, or `dim N` to take it from "
                                      f"{v.name}'s shape")
            found = dim
        return found

    def _dim_hint(self) -> str:
        return ("dims in scope: " + ", ".join(self.dims)
                + "; declare new ones with `dim F = 1 + K + K * K` or `dim M`")

    def _dim_size(self, expr: ast.Expr):
        """Size expressions of dims: integers, other dims, + - * and **."""
        if isinstance(expr, ast.Num):
            if expr.value != int(expr.value) or expr.value < 1:
                raise self.error("a dim size must be a positive integer", expr.span)
            return sympy.Integer(int(expr.value))
        if isinstance(expr, ast.Name):
            if expr.id not in self.dims:
                raise self.error(f"unknown dim '{expr.id}' in a dim size", expr.span,
                                 hint=self._dim_hint())
            return sympy.Symbol(expr.id, positive=True, integer=True)
        if isinstance(expr, ast.BinOp) and expr.op in ("+", "*", "**", "-"):
            a, b = self._dim_size(expr.left), self._dim_size(expr.right)
            return {"+": a + b, "*": a * b, "**": a ** b, "-": a - b}[expr.op]
        raise self.error("a dim size may only use integers, dims and + - * **", expr.span)

    # ---------------------------------------------------------------- statements
    def run(self) -> Program:
        self.declare()
        for stmt in self.spec.body:
            self.statement(stmt)
        if self.output is None:
            raise self.error(f"spec '{self.spec.name}' has no output", self.spec.span,
                             hint="assign the readout to `o`, e.g. `o = q @ S`")
        for name, decl in self.states.items():
            if self.state_version[name] == 0:
                raise self.error(f"state '{name}' is never updated", decl.span,
                                 hint=f"add an update such as `{name} = {name} + ...`")
        if self.memory:
            self._check_memory_reads()
        return Program(
            name=self.spec.name, noncausal=self.spec.noncausal, dims=dict(self.dims),
            inputs=self.inputs, params=self.params, states=self.states,
            updates=tuple(self.updates), output=self.output, output_span=self.output_span,
            source=self.spec.source, memory=self.memory)

    def _check_memory_reads(self) -> None:
        """With memory inputs the updates run over the memory tokens and the readout over the
        query tokens: an update may not read a query input, nor the readout a memory input."""
        memory = ", ".join(self.memory)
        if not self.inputs:
            raise self.error(f"spec '{self.spec.name}' has memory inputs but no inputs",
                             self.spec.span, hint="declare the query side: `inputs q[K]`")
        for u in self.updates:
            leaf = next((x for x in u.value.walk() if x.op is Op.INPUT), None)
            if leaf is not None:
                raise self.error(
                    f"the update of '{u.state}' reads input '{leaf.attr}' of the query sequence;"
                    f" with memory inputs, states are sums over the memory sequence", leaf.span,
                    hint=f"updates read the memory inputs ({memory}), params, t and T; the "
                         "output `o` reads the inputs")
        leaf = next((x for x in self.output.walk() if x.op is Op.MEMORY), None)
        if leaf is not None:
            raise self.error(
                f"the output reads memory input '{leaf.attr}': the readout runs over the query "
                "tokens and sees the memory sequence only through the states", leaf.span,
                hint="add the memory term to a state update, e.g. `S = S + outer(k, v)`")

    def statement(self, stmt: ast.Assign) -> None:
        target, span = stmt.target, stmt.target_span
        if target in self.params:
            raise self.error(f"cannot assign to param '{target}': params are fixed per head",
                             span, hint="bind the result to a new name instead")
        if target in self.dims or target in INDEX_NAMES or target in CONSTANTS:
            raise self.error(f"cannot assign to '{target}': it is a builtin name", span)
        if target in supported_functions():
            raise self.error(f"cannot assign to '{target}': it is a builtin function", span)
        value = self.expr(stmt.value)
        if target == OUTPUT:
            if self.output is not None:
                raise self.error("the output `o` is assigned twice", span)
            self.output, self.output_span = value, stmt.span
        elif target in self.states:
            decl = self.states[target]
            if set(value.dims) != set(decl.dims):
                raise self.error(
                    f"the update of state '{target}' has dims {show_dims(value.dims)}, "
                    f"but '{target}' is declared {show_dims(decl.dims)}", stmt.value.span)
            value = _transpose_to(value, decl.dims)
            self.state_version[target] += 1
            self.updates.append(Update(target, self.state_version[target], value, stmt.span))
        else:
            if self.output is not None and target not in self.env:
                pass  # bindings after the output are allowed but unused
            self.env[target] = value

    # ---------------------------------------------------------------- expressions
    def expr(self, e: ast.Expr) -> Node:
        if isinstance(e, ast.Num):
            return const(e.value, e.span)
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.Neg):
            x = self.expr(e.operand)
            return Node(Op.NEG, x.dims, (x,), None, e.span)
        if isinstance(e, ast.BinOp):
            a, b = self.expr(e.left), self.expr(e.right)
            if e.op == "@":
                return self.contract(a, b, e)
            return self.broadcast(_BINOPS[e.op], a, b, e.span, e.op)
        if isinstance(e, ast.Call):
            return self.call(e)
        raise TypeError(f"unknown AST node {e!r}")  # pragma: no cover - parser never builds one

    def name(self, e: ast.Name) -> Node:
        n = e.id
        if n in self.env:
            return self.env[n]
        if n in self.inputs:
            return Node(Op.INPUT, self.inputs[n].dims, (), n, e.span)
        if n in self.memory:
            return Node(Op.MEMORY, self.memory[n].dims, (), n, e.span)
        if n in self.params:
            decl = self.params[n]
            if decl.position is not None:
                return Node(Op.PARAM_AT, decl.value_dims, (), n, e.span)
            return Node(Op.PARAM, decl.dims, (), n, e.span)
        if n in self.states:
            return Node(Op.STATE, self.states[n].dims, (), (n, self.state_version[n]), e.span)
        if n == "T" and not self.spec.noncausal:
            raise self.error(
                "undefined name 'T': the sequence length T exists only in noncausal specs",
                e.span, hint="a causal token cannot see how long its sequence is; add "
                             "`noncausal` after the spec's name if every token reads the whole "
                             "sequence")
        if n in INDEX_NAMES:
            return Node(INDEX_NAMES[n], (), (), None, e.span)
        if n in self.dims:
            return Node(Op.SIZE, (), (), n, e.span)
        if n in CONSTANTS:
            return const(CONSTANTS[n], e.span)
        if n == OUTPUT:
            raise self.error("the output `o` cannot be read", e.span)
        known = [*self.env, *self.inputs, *self.memory, *self.params, *self.states,
                 *(i for i in INDEX_NAMES if i != "T" or self.spec.noncausal), *self.dims,
                 *CONSTANTS]
        close = difflib.get_close_matches(n, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "names in scope: " + ", ".join(known)
        if n in supported_functions():
            hint = f"'{n}' is a function: call it as {n}(...)"
        raise self.error(f"undefined name '{n}'", e.span, hint=hint)

    def broadcast(self, op: Op, a: Node, b: Node, span: Span, sym: str, attr=None) -> Node:
        sa, sb = set(a.dims), set(b.dims)
        if sa <= sb:
            dims = b.dims
        elif sb <= sa:
            dims = a.dims
        else:
            raise self.error(
                f"cannot combine {show_dims(a.dims)} and {show_dims(b.dims)} with '{sym}': "
                "broadcasting is by dim name and neither side's dims contain the other's",
                span, hint="use outer(x, y) for an outer product, or @ to contract a shared dim")
        return Node(op, dims, (a, b), attr, span)

    def contract(self, a: Node, b: Node, e: ast.BinOp) -> Node:
        common = [d for d in a.dims if d in b.dims]
        if not common:
            raise self.error(
                f"'@' needs a dim shared by both sides to contract, got {show_dims(a.dims)} @ "
                f"{show_dims(b.dims)}", e.span,
                hint="both sides of @ must carry the contracted dim, e.g. k[K] @ S[K, V]")
        if len(common) > 1:
            raise self.error(
                f"'@' is ambiguous: {show_dims(a.dims)} @ {show_dims(b.dims)} share "
                f"{', '.join(common)}", e.span, hint="use sum(x * y, D) to reduce a chosen dim")
        d = common[0]
        dims = tuple(x for x in a.dims if x != d) + tuple(x for x in b.dims if x != d)
        return Node(Op.CONTRACT, dims, (a, b), d, e.span)

    def call(self, e: ast.Call) -> Node:
        f = e.func
        if f in ELEMENTWISE:
            (x,) = self._args(e, 1)
            return Node(Op.CALL, x.dims, (x,), f, e.span)
        if f in BINARY_ELEMENTWISE:
            a, b = self._args(e, 2)
            return self.broadcast(Op.MAX if f == "max" else Op.MIN, a, b, e.span, f)
        if f in REDUCTIONS:
            return self.reduce(e)
        if f == "outer":
            a, b = self._args(e, 2)
            if not a.dims or not b.dims or set(a.dims) & set(b.dims):
                raise self.error(
                    f"outer needs two vectors over different dims, got {show_dims(a.dims)} "
                    f"and {show_dims(b.dims)}", e.span)
            return Node(Op.OUTER, a.dims + b.dims, (a, b), None, e.span)
        if f == "taylor2":
            (x,) = self._args(e, 1)
            if len(x.dims) != 1:
                raise self.error(f"taylor2 needs a vector, got {show_dims(x.dims)}", e.span)
            (d,) = x.dims
            sym = sympy.Symbol(d, positive=True, integer=True)
            want = 1 + sym + sym * sym
            for name, size in self.dims.items():
                if size is not None and sympy.simplify(size - want) == 0:
                    return Node(Op.TAYLOR2, (name,), (x,), (d, name), e.span)
            raise self.error(
                f"taylor2 of a [{d}] vector needs a dim of size 1 + {d} + {d} * {d}", e.span,
                hint=f"declare it: `dim F = 1 + {d} + {d} * {d}`")
        raise self.error(f"unknown function '{f}'", e.func_span,
                         hint="supported: " + ", ".join(supported_functions()))

    def _args(self, e: ast.Call, n: int) -> list[Node]:
        if len(e.args) != n:
            raise self.error(f"{e.func} takes {n} argument{'s' if n > 1 else ''}, "
                             f"got {len(e.args)}", e.span)
        return [self.expr(a) for a in e.args]

    def reduce(self, e: ast.Call) -> Node:
        if not 1 <= len(e.args) <= 2:
            raise self.error(f"{e.func} takes a value and optionally a dim, "
                             f"got {len(e.args)} arguments", e.span)
        x = self.expr(e.args[0])
        if len(e.args) == 2 and isinstance(e.args[1], ast.Name) and e.args[1].id in ACROSS:
            return self.reduce_across(e, x, e.args[1])
        if len(e.args) == 2:
            dim_arg = e.args[1]
            if not isinstance(dim_arg, ast.Name) or dim_arg.id not in self.dims:
                raise self.error(f"the second argument of {e.func} must be a dim",
                                 dim_arg.span, hint=self._dim_hint())
            d = dim_arg.id
            if d not in x.dims:
                raise self.error(f"{e.func} over {d}, but the value is {show_dims(x.dims)}",
                                 dim_arg.span)
        elif len(x.dims) == 1:
            d = x.dims[0]
        else:
            raise self.error(f"{e.func} of a {show_dims(x.dims)} value needs the dim to reduce",
                             e.span, hint=f"write {e.func}(x, D) with D one of the value's dims"
                             if x.dims else f"{e.func} of a scalar is not defined")
        op = _REDUCE_OPS[e.func]
        dims = x.dims if op in (Op.L2NORM, Op.SOFTMAX) else tuple(a for a in x.dims if a != d)
        return Node(op, dims, (x,), d, e.span)

    def reduce_across(self, e: ast.Call, x: Node, axis: ast.Name) -> Node:
        """``sum(x, H)``: over the heads at this token; ``softmax(x, T)``: over the tokens of
        the sequence (noncausal specs). The value keeps its dims."""
        f = e.func
        if axis.id == "T":
            if not self.spec.noncausal:
                raise self.error(
                    f"{f} over T (the tokens of the sequence) needs a noncausal spec",
                    axis.span, hint="in a causal spec a token sees only the tokens before it; "
                                    "add `noncausal` after the spec's name if every token reads "
                                    "the whole sequence")
            leaf = next((n for n in x.walk() if n.op is Op.STATE), None)
            if leaf is not None:
                raise self.error(
                    f"a reduction over the tokens cannot read a state ('{leaf.attr[0]}')",
                    leaf.span, hint="states are sums over the sequence already; reduce the "
                                    "per-token values the state is built from")
        return Node(ACROSS[axis.id], x.dims, (x,), f, e.span)


def _transpose_to(value: Node, dims: tuple[str, ...]) -> Node:
    """The same value with its dims listed in the declared order (a relabelling, no data move)."""
    if value.dims == dims:
        return value
    # Broadcast-multiply by 1 keeps the math and fixes the dim order of the node.
    return Node(Op.MUL, dims, (const(1.0), value), None, value.span)


def lower(spec: ast.Spec, filename: str | None = None) -> Program:
    """Lower one parsed spec to a ``Program`` (see the module docstring)."""
    return _Lowering(spec, filename).run()
