"""Resource limits of the expression language and the per-evaluation time budget.

Values are read at call time (``limits.MAX_OUTPUT_CHARS``), so tests and settings
may change them on the module.
"""

from __future__ import annotations

from contextvars import ContextVar
from time import monotonic
from typing import Any

from .errors import ExpressionError

#: Longest text (and longest string or list built by an operator) one value may produce.
MAX_OUTPUT_CHARS = 1_000_000
#: Longest source between ``{{`` and ``}}``.
MAX_EXPRESSION_CHARS = 10_000
#: Deepest bracket nesting inside one expression. Kept low on purpose: Jinja's
#: parser recurses a dozen frames per bracket and must stay inside Python's stack.
MAX_NESTING = 32
#: Deepest syntax tree (long operator or filter chains) inside one expression.
MAX_AST_DEPTH = 64
#: Largest integer an operator may build, in bits (about 4,300 decimal digits).
MAX_INT_BITS = 14_000
#: Wall-clock budget of one render()/render_template()/evaluate_filters() call.
TIME_LIMIT_SECONDS = 1.0
#: Regular expressions used by the `regex` filter operator.
MAX_REGEX_PATTERN_CHARS = 10_000
MAX_REGEX_INPUT_CHARS = 1_000_000

#: Total size (characters and list items) that the operators and filters of one
#: render()/render_template()/evaluate_filters() call may build, summed over all of
#: its expressions. Bounds memory even when each single result is under the limits.
MAX_WORK = 10_000_000


class _Budget:
    __slots__ = ("deadline", "work")

    def __init__(self) -> None:
        self.deadline = monotonic() + TIME_LIMIT_SECONDS
        self.work = 0


_current: ContextVar[_Budget | None] = ContextVar("flowplay_expr_budget", default=None)


class EvaluationBudget:
    """Context manager that starts a time/work budget unless an outer call already did."""

    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token: Any = None

    def __enter__(self) -> EvaluationBudget:
        if _current.get() is None:
            self._token = _current.set(_Budget())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


def check_deadline() -> None:
    """Raise ExpressionError when the current evaluation ran out of time."""
    budget = _current.get()
    if budget is not None and monotonic() > budget.deadline:
        raise ExpressionError(f"evaluation took longer than {TIME_LIMIT_SECONDS:g} s")


def charge(size: int) -> None:
    """Count ``size`` newly built characters/items against the current evaluation."""
    budget = _current.get()
    if budget is None:
        return
    budget.work += size
    if budget.work > MAX_WORK:
        raise ExpressionError(f"evaluation builds too much data (limit {MAX_WORK} characters or items)")
    if monotonic() > budget.deadline:
        raise ExpressionError(f"evaluation took longer than {TIME_LIMIT_SECONDS:g} s")
