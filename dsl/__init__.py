"""Spec language front end: grammar, parser (text -> AST) and the SpecError type."""
from .errors import Span, SpecError
from .parser import parse

__all__ = ["Span", "SpecError", "parse"]
