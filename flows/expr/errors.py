"""Exceptions raised by the expression language and the filter evaluator."""

from __future__ import annotations

from typing import Any

# Expression sources are quoted in messages; keep those messages readable.
_MAX_QUOTED = 120


def quote_expression(source: str) -> str:
    """`{{ source }}` shortened for an error message."""
    text = " ".join(source.split())
    if len(text) > _MAX_QUOTED:
        text = text[: _MAX_QUOTED - 3] + "..."
    return "{{ " + text + " }}"


class ExpressionError(Exception):
    """An expression could not be parsed or evaluated.

    ``message`` is the bare reason, ``expression`` the offending source (without the
    braces) and ``path`` where in a rendered value it sits ("headers.Authorization").
    ``str(e)`` combines the three.
    """

    code = "EXPRESSION_ERROR"

    def __init__(self, message: str, *, expression: str | None = None, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression
        self.path = path

    def __str__(self) -> str:
        text = self.message
        if self.expression is not None:
            text = f"{text} in {quote_expression(self.expression)}"
        if self.path:
            text = f"{self.path}: {text}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles task errors; keyword-only fields would otherwise be lost.
        return (self.__class__, (self.message,), {"expression": self.expression, "path": self.path})


class FilterError(Exception):
    """A filter could not be evaluated (bad shape, failed cast, bad regex...)."""

    code = "FILTER_ERROR"

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message,), {"path": self.path})
