"""Text -> AST: the lark LALR parser and the Transformer that builds ``dsl.ast`` nodes."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from . import ast
from .errors import Span, SpecError

_GRAMMAR = Path(__file__).with_name("grammar.lark")

# Human names for the grammar's terminals, used in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "_NL": "end of line", "LPAR": "'('",
    "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "EQUAL": "'='",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "__ANON_0": "'**'",
    "AT": "'@'", "DOUBLESTAR": "'**'", "$END": "end of text", "ATTENTION": "'attention'",
    "INPUTS": "'inputs'", "PARAMS": "'params'", "STATE": "'state'", "DIM": "'dim'",
    "MEMORY": "'memory'", "LESSTHAN": "'<'",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(_GRAMMAR.read_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=True)


def _span_of(node) -> Span:
    if isinstance(node, Token):
        return Span(node.line, node.column, node.end_line, node.end_column)
    meta = node.meta
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds ``dsl.ast`` nodes bottom-up; every node records its source span."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    @staticmethod
    def _span(meta) -> Span:
        return Span(meta.line, meta.column, meta.end_line, meta.end_column)

    def number(self, meta, children):
        (tok,) = children
        return ast.Num(float(tok), str(tok), _span_of(tok))

    def name(self, meta, children):
        (tok,) = children
        return ast.Name(str(tok), _span_of(tok))

    def _bin(op):  # noqa: N805 - builds methods below
        def build(self, meta, children):
            left, right = children
            return ast.BinOp(op, left, right, self._span(meta))
        return build

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    matmul = _bin("@")
    pow = _bin("**")

    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))

    def call(self, meta, children):
        func, *args = children
        args = tuple(a for a in args if a is not None)
        return ast.Call(str(func), args, self._span(meta), _span_of(func))

    def dim_plain(self, meta, children):
        (dim,) = children
        return dim, None

    def dim_position(self, meta, children):
        index, dim = children
        return dim, index

    def vardecl(self, meta, children):
        name, *dims = children
        return ast.VarDecl(str(name), tuple(str(d) for d, _ in dims), _span_of(name),
                           tuple(_span_of(d) for d, _ in dims),
                           tuple(None if i is None else str(i) for _, i in dims),
                           tuple(None if i is None else _span_of(i) for _, i in dims))

    def dimdef(self, meta, children):
        name, size = children
        return ast.DimDecl(str(name), size, _span_of(name))

    def decl_inputs(self, meta, children):
        return ("inputs", tuple(children))

    def decl_memory(self, meta, children):
        return ("memory", tuple(children))

    def decl_params(self, meta, children):
        return ("params", tuple(children))

    def decl_state(self, meta, children):
        return ("states", tuple(children))

    def decl_dims(self, meta, children):
        return ("dims", tuple(children))

    def stmt(self, meta, children):
        target, value = children
        return ast.Assign(str(target), value, self._span(meta), _span_of(target))

    def flag(self, meta, children):
        return children[0]

    def spec(self, meta, children):
        name, *rest = children
        flags = [c for c in rest if isinstance(c, Token)]
        parts: dict[str, list] = {"inputs": [], "memory": [], "params": [], "states": [],
                                  "dims": []}
        body = []
        for item in rest:
            if isinstance(item, tuple):
                parts[item[0]].extend(item[1])
            elif isinstance(item, ast.Assign):
                body.append(item)
        return ast.Spec(
            name=str(name), flags=tuple(str(f) for f in flags),
            inputs=tuple(parts["inputs"]), params=tuple(parts["params"]),
            states=tuple(parts["states"]), dims=tuple(parts["dims"]), body=tuple(body),
            span=_span_of(name), flag_spans=tuple(_span_of(f) for f in flags),
            source=self.source, memory=tuple(parts["memory"]),
        )

    def start(self, meta, children):
        return [c for c in children if isinstance(c, ast.Spec)]


def _describe(token: Token | None) -> str:
    if token is None or token.type == "$END":
        return "end of text"
    if token.type == "_NL":
        return "end of line"
    return repr(str(token))


def _expected(names) -> str:
    shown = sorted({_TERMINAL_NAMES.get(n, repr(n.lower())) for n in names})
    return ", ".join(shown)


def parse(text: str, filename: str | None = None) -> list[ast.Spec]:
    """Parse spec text (one or more ``attention`` blocks) into AST nodes.

    Raises ``SpecError`` with line, column and a caret for any syntax error.
    """
    source = text if text.endswith("\n") else text + "\n"
    try:
        tree = _lark().parse(source)
    except lark.exceptions.UnexpectedCharacters as e:
        raise SpecError(f"unexpected character {source[e.pos_in_stream]!r}",
                        Span(e.line, e.column), source, filename=filename,
                        hint="names are letters, digits and '_'; comments start with '#'"
                        ) from None
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        line = tok.line if getattr(tok, "line", None) else source.count("\n")
        col = tok.column if getattr(tok, "column", None) else 1
        span = Span(line, col, getattr(tok, "end_line", None), getattr(tok, "end_column", None))
        if tok.type == "_NL":
            # point just after the last token of the line, where something is missing
            span = Span(line, col)
        raise SpecError(f"unexpected {_describe(tok)}; expected {_expected(e.expected)}",
                        span, source, filename=filename) from None
    except lark.exceptions.UnexpectedEOF as e:
        lines = source.splitlines()
        raise SpecError(f"unexpected end of text; expected {_expected(e.expected)}",
                        Span(len(lines), len(lines[-1]) + 1 if lines else 1), source,
                        filename=filename) from None
    specs = _ToAst(source).transform(tree)
    if not specs:
        raise SpecError("no spec found: a spec starts with `attention NAME`",
                        Span(1, 1), source, filename=filename)
    return specs
