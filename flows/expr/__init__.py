"""flowplay's expression language: ``{{ … }}`` in flowlet args and filters.

Framework-free (no Django). See evaluator.py for the language and sandbox rules and
filters.py for flow/flowlet filter lists.
"""

from __future__ import annotations

from .errors import ExpressionError, FilterError
from .evaluator import (
    Scope,
    check,
    check_template,
    credential_paths,
    credential_references,
    is_expression,
    references,
    render,
    render_template,
)
from .filters import OPERATORS, check_filters, evaluate_filters

__all__ = [
    "ExpressionError",
    "FilterError",
    "Scope",
    "render",
    "render_template",
    "check",
    "check_template",
    "references",
    "credential_references",
    "credential_paths",
    "evaluate_filters",
    "check_filters",
    "is_expression",
    "OPERATORS",
]
