"""Flow and flowlet filters: lists of ``leftValue <operator> rightValue`` conditions.

A filter is ``{"leftValue": ..., "operator": "gte", "rightValue": ..., "cast": "number",
"mode": "and"}``. Both values are rendered with :func:`render` first (so a value that is
exactly one ``{{ … }}`` keeps its JSON type). The list passes when every ``and``
filter passes and, if there are ``or`` filters, at least one of them passes.

Without ``cast`` values are compared leniently: two numbers (or numeric strings) compare
as numbers, values of the same JSON type compare directly, anything else compares by
its text form (so ``true`` equals ``"true"``). Ordering operators (gt, gte, lt, lte)
are false when either side is null.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from . import limits
from .errors import ExpressionError, FilterError
from .evaluator import Scope, _join_path, check, render
from .values import a_type, to_text, type_name

__all__ = ["OPERATORS", "CASTS", "MODES", "evaluate_filters", "explain_filters", "check_filters"]

OPERATORS = (
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "contains",
    "not_contains",
    "is_empty",
    "not_empty",
    "regex",
)
CASTS = ("string", "number", "boolean")
MODES = ("and", "or")
_UNARY = frozenset({"is_empty", "not_empty"})

_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "y"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", "n"})

# --------------------------------------------------------------------------- values


def _parse_number(text: str) -> int | float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any) -> int | float | None:
    """The number a value reads as (numbers and numeric strings), else None."""
    if _is_number(value):
        return value
    if isinstance(value, str) and len(value) <= 100:
        return _parse_number(value)
    return None


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if value is None or isinstance(value, (bool, int, float)):
        return "null" if value is None else to_text(value)
    return f"{a_type(value)}"


def _cast(value: Any, cast: str | None) -> Any:
    """Apply a cast; null stays null (and an empty string becomes null for number/boolean)."""
    if cast is None or value is None:
        return value
    if cast == "string":
        try:
            return to_text(value)
        except ExpressionError as exc:
            raise FilterError(f"cannot cast {_describe(value)} to a string: {exc.message}") from None
    if cast == "number":
        if isinstance(value, bool):
            return int(value)
        if _is_number(value):
            if isinstance(value, float) and not math.isfinite(value):
                raise FilterError(f"cannot cast {value} to a number")
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            number = _parse_number(value) if len(value) <= 100 else None
            if number is not None:
                return number
        raise FilterError(f"cannot cast {_describe(value)} to a number")
    # boolean
    if isinstance(value, bool):
        return value
    if _is_number(value):
        return value != 0
    if isinstance(value, str):
        word = value.strip().lower()
        if not word:
            return None
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise FilterError(f"cannot cast {_describe(value)} to a boolean")


def _kind(value: Any) -> str:
    return type_name(value)


def _text(value: Any) -> str:
    try:
        return to_text(value)
    except ExpressionError as exc:
        raise FilterError(exc.message) from None


# --------------------------------------------------------------------------- operators


def _equal(left: Any, right: Any, cast: str | None) -> bool:
    if left is None or right is None:
        # null reads as "" in text, so it equals an empty string (and only that or null).
        return _text(left) == _text(right)
    if cast is None:
        a, b = _as_number(left), _as_number(right)
        if a is not None and b is not None:
            return a == b
        if _kind(left) != _kind(right):
            return _text(left) == _text(right)
    return bool(left == right)


def _ordered(left: Any, right: Any, cast: str | None, op: str) -> tuple[Any, Any] | None:
    """The pair to compare with <, or None when either side is null."""
    if left is None or right is None:
        return None
    if cast is None:
        a, b = _as_number(left), _as_number(right)
        if a is not None and b is not None:
            return a, b
    if isinstance(left, bool) and isinstance(right, bool):
        return int(left), int(right)
    if _is_number(left) and _is_number(right):
        return left, right
    if isinstance(left, str) and isinstance(right, str):
        return left, right
    raise FilterError(f"'{op}' cannot compare {_describe(left)} with {_describe(right)}")


def _compare(op: str, test: Callable[[Any, Any], bool]) -> Callable[[Any, Any, str | None], bool]:
    def run(left: Any, right: Any, cast: str | None) -> bool:
        pair = _ordered(left, right, cast, op)
        return pair is not None and test(*pair)

    return run


def _contains(left: Any, right: Any, cast: str | None) -> bool:
    if left is None or right is None:
        return False
    if isinstance(left, str):
        return _text(right) in left
    if isinstance(left, (list, tuple)):
        return any(_equal(item, right, cast) for item in left)
    if isinstance(left, Mapping):
        return _text(right) in left
    return _text(right) in _text(left)


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value) == 0
    return False


def _compile_pattern(pattern: str) -> Any:
    """The compiled pattern (RE2, linear time: see flows.patterns), or why it is refused."""
    from flows.patterns import PatternError, compile_pattern  # noqa: PLC0415

    if len(pattern) > limits.MAX_REGEX_PATTERN_CHARS:
        return f"regular expression is too long (limit {limits.MAX_REGEX_PATTERN_CHARS} characters)"
    try:
        return compile_pattern(pattern)
    except PatternError as exc:
        message = str(exc)
        if message.startswith("is not a valid regular expression: "):
            return "invalid regular expression: " + message.removeprefix("is not a valid regular expression: ")
        return f"regular expression {message}"


def _regex(left: Any, right: Any, cast: str | None) -> bool:
    if right is None:
        raise FilterError("'regex' needs a pattern in rightValue")
    compiled = _compile_pattern(_text(right))
    if isinstance(compiled, str):
        raise FilterError(compiled)
    subject = _text(left)
    if len(subject) > limits.MAX_REGEX_INPUT_CHARS:
        raise FilterError(f"'regex' input is too long (limit {limits.MAX_REGEX_INPUT_CHARS} characters)")
    return compiled.search(subject) is not None


_OPERATIONS: dict[str, Callable[[Any, Any, str | None], bool]] = {
    "eq": _equal,
    "neq": lambda a, b, cast: not _equal(a, b, cast),
    "gt": _compare("gt", lambda a, b: a > b),
    "gte": _compare("gte", lambda a, b: a >= b),
    "lt": _compare("lt", lambda a, b: a < b),
    "lte": _compare("lte", lambda a, b: a <= b),
    "contains": _contains,
    "not_contains": lambda a, b, cast: not _contains(a, b, cast),
    "is_empty": lambda a, b, cast: _is_empty(a),
    "not_empty": lambda a, b, cast: not _is_empty(a),
    "regex": _regex,
}


# --------------------------------------------------------------------------- evaluation


def _option(item: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        return default
    if value not in allowed:
        raise FilterError(f"invalid {key} {value!r} (expected one of {', '.join(allowed)})", path=f".{key}")
    return value


def _render_side(item: Mapping[str, Any], key: str, scope: Scope, where: str) -> Any:
    try:
        return render(item.get(key), scope)
    except ExpressionError as exc:
        exc.path = _join_path(f"{where}.{key}", exc.path)
        raise


def _evaluate_one(item: Any, scope: Scope, index: int) -> bool:
    where = f"[{index}]"
    if not isinstance(item, Mapping):
        raise FilterError("each filter must be an object", path=where)
    try:
        op = item.get("operator")
        if op not in _OPERATIONS:
            raise FilterError(f"unknown operator {op!r}", path=".operator")
        cast = _option(item, "cast", CASTS, None)
    except FilterError as exc:
        exc.path = where + exc.path
        raise
    left = _render_side(item, "leftValue", scope, where)
    right = None if op in _UNARY else _render_side(item, "rightValue", scope, where)
    try:
        return _OPERATIONS[op](_cast(left, cast), _cast(right, cast), cast)
    except FilterError as exc:
        exc.path = exc.path or where
        raise
    except ExpressionError as exc:  # to_text limits reached while comparing
        raise FilterError(exc.message, path=where) from None
    except Exception as exc:  # noqa: BLE001 - e.g. comparing nested lists of mixed types
        raise FilterError(f"'{op}' failed: {exc}", path=where) from None


def evaluate_filters(filters: list[dict[str, Any]] | None, scope: Scope) -> bool:
    """True when the filter list passes (an empty or missing list passes).

    Raises FilterError (code FILTER_ERROR) for malformed filters, failed casts and bad
    regular expressions, and ExpressionError when a value's expression fails.
    Evaluation stops as soon as the outcome is known.
    """
    if filters is None:
        return True
    if not isinstance(filters, (list, tuple)):
        raise FilterError("filters must be a list")
    with limits.EvaluationBudget():
        has_or = False
        or_passed = False
        for index, item in enumerate(filters):
            mode = "and"
            if isinstance(item, Mapping):
                try:
                    mode = _option(item, "mode", MODES, "and")  # type: ignore[assignment]
                except FilterError as exc:
                    exc.path = f"[{index}]{exc.path}"
                    raise
            if mode == "and":
                if not _evaluate_one(item, scope, index):
                    return False
            else:
                has_or = True
                if not or_passed and _evaluate_one(item, scope, index):
                    or_passed = True
        return or_passed or not has_or


def explain_filters(filters: Any, scope: Scope) -> list[dict[str, Any]]:
    """Each filter of a list with the values it compared and its verdict, for people.

    ``[{"index", "mode", "operator", "cast", "left", "right", "passed", "error"}]``: every
    item is evaluated (no short cut), so a page can show why a step was FILTERED.
    ``passed`` is None and ``error`` the message when an item could not be evaluated.
    """
    if not isinstance(filters, (list, tuple)):
        return []
    verdicts: list[dict[str, Any]] = []
    with limits.EvaluationBudget():
        for index, item in enumerate(filters):
            if not isinstance(item, Mapping):
                verdicts.append({"index": index, "passed": None, "error": "each filter must be an object"})
                continue
            entry: dict[str, Any] = {
                "index": index,
                "mode": item.get("mode") or "and",
                "operator": item.get("operator"),
                "cast": item.get("cast"),
                "leftExpr": item.get("leftValue"),
                "rightExpr": item.get("rightValue"),
                "passed": None,
                "error": None,
            }
            try:
                entry["left"] = _render_side(item, "leftValue", scope, f"[{index}]")
                if item.get("operator") not in _UNARY:
                    entry["right"] = _render_side(item, "rightValue", scope, f"[{index}]")
                entry["passed"] = _evaluate_one(item, scope, index)
            except (FilterError, ExpressionError) as exc:
                entry["error"] = str(exc)
            verdicts.append(entry)
    return verdicts


# --------------------------------------------------------------------------- validation


def check_filters(filters: Any) -> dict[str, list[str]]:
    """Validate a filter list's shape and expressions.

    Returns ``{path: [messages]}`` with paths like "[0].operator" or
    "[1].leftValue"; empty means valid. ``None`` counts as an empty list.
    """
    if filters is None:
        return {}
    if not isinstance(filters, (list, tuple)):
        return {"": ["filters must be a list of objects"]}
    problems: dict[str, list[str]] = {}

    def add(path: str, message: str) -> None:
        problems.setdefault(path, []).append(message)

    for index, item in enumerate(filters):
        where = f"[{index}]"
        if not isinstance(item, Mapping):
            add(where, "each filter must be an object")
            continue
        op = item.get("operator")
        if op is None or op == "":
            add(f"{where}.operator", "operator is required")
        elif op not in _OPERATIONS:
            add(f"{where}.operator", f"unknown operator {op!r} (expected one of {', '.join(OPERATORS)})")
        for key, allowed in (("cast", CASTS), ("mode", MODES)):
            value = item.get(key)
            if value is not None and value != "" and value not in allowed:
                add(f"{where}.{key}", f"invalid {key} {value!r} (expected one of {', '.join(allowed)})")
        if "leftValue" not in item:
            add(f"{where}.leftValue", "leftValue is required")
        if op in _OPERATIONS and op not in _UNARY and "rightValue" not in item:
            add(f"{where}.rightValue", f"rightValue is required for operator '{op}'")
        for key in ("leftValue", "rightValue"):
            if key in item:
                for path, messages in check(item[key]).items():
                    problems.setdefault(_join_path(f"{where}.{key}", path), []).extend(messages)
        pattern = item.get("rightValue")
        if op == "regex" and isinstance(pattern, str) and "{{" not in pattern:
            compiled = _compile_pattern(pattern)
            if isinstance(compiled, str):
                add(f"{where}.rightValue", compiled)
    return problems
