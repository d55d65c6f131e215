"""The one error type for bad specs: a message, the place in the source, and a caret line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of spec text: 1-based line and column, end exclusive on the same line."""

    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def width(self) -> int:
        """Number of characters to underline (at least one)."""
        if self.end_line == self.line and self.end_column and self.end_column > self.column:
            return self.end_column - self.column
        return 1


class SpecError(ValueError):
    """A spec that cannot be compiled.

    Attributes: ``line`` and ``column`` (1-based, None when the problem has no single place),
    ``reason`` (the message without the source excerpt) and ``hint``. ``str(err)`` quotes the
    source line with a caret under the offending token.
    """

    def __init__(
        self,
        reason: str,
        span: Span | None = None,
        source: str | None = None,
        *,
        hint: str | None = None,
        filename: str | None = None,
    ):
        self.reason = reason
        self.span = span
        self.source = source
        self.hint = hint
        self.filename = filename or "<spec>"
        self.line = span.line if span else None
        self.column = span.column if span else None
        super().__init__(self._render())

    def with_source(self, source: str, filename: str | None = None) -> SpecError:
        """The same error, rendered against ``source`` (used when a stage lacks the text)."""
        return SpecError(self.reason, self.span, source, hint=self.hint, filename=filename)

    def _render(self) -> str:
        where = self.filename
        if self.span is not None:
            where += f":{self.span.line}:{self.span.column}"
        out = [f"{where}: error: {self.reason}"]
        if self.span is not None and self.source is not None:
            lines = self.source.splitlines()
            if 1 <= self.span.line <= len(lines):
                text = lines[self.span.line - 1].rstrip()
                out.append("    " + text)
                width = max(1, min(self.span.width(), len(text) - self.span.column + 1))
                out.append("    " + " " * (self.span.column - 1) + "^" * width)
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)
