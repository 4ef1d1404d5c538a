"""Tests for flow/flowlet filter lists (flows.expr.filters)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from flows.expr import ExpressionError, FilterError, Scope, check_filters, evaluate_filters, limits
from flows.expr.filters import OPERATORS


@pytest.fixture
def scope() -> Scope:
    return Scope(
        prev={
            "args": {"id": "42", "name": "Ada", "flag": "yes"},
            "checkBalance": {"amount": 1500, "currency": "EUR", "tags": ["vip", "new"], "meta": {"k": 1}},
            "empty": {"text": "", "list": [], "obj": {}, "zero": 0, "no": False},
        }
    )


def one(scope: Scope, left: Any, operator: str, right: Any = None, **extra: Any) -> bool:
    item = {"leftValue": left, "operator": operator, **extra}
    if right is not None or operator not in ("is_empty", "not_empty"):
        item["rightValue"] = right
    return evaluate_filters([item], scope)


def test_empty_filter_list_passes(scope: Scope) -> None:
    assert evaluate_filters([], scope) is True
    assert evaluate_filters(None, scope) is True  # type: ignore[arg-type]


def test_spec_example_compares_as_numbers(scope: Scope) -> None:
    example = {
        "leftValue": "{{ $prev.checkBalance.amount }}",
        "operator": "gte",
        "rightValue": "1000",
        "cast": "number",
        "mode": "and",
    }
    assert evaluate_filters([example], scope) is True
    assert evaluate_filters([{**example, "rightValue": "2000"}], scope) is False
    # "9" > "10" as text, but not as numbers.
    assert evaluate_filters([{**example, "leftValue": "9", "rightValue": "10", "operator": "gt"}], scope) is False


@pytest.mark.parametrize(
    ("left", "operator", "right", "cast", "expected"),
    [
        # eq / neq without cast: numbers and numeric strings compare as numbers.
        ("{{ $prev.checkBalance.amount }}", "eq", "1500", None, True),
        ("{{ $prev.checkBalance.amount }}", "eq", "1500.0", None, True),
        ("{{ $prev.checkBalance.currency }}", "eq", "EUR", None, True),
        ("{{ $prev.checkBalance.currency }}", "eq", "eur", None, False),
        ("{{ $prev.checkBalance.currency }}", "neq", "USD", None, True),
        ("{{ true }}", "eq", "true", None, True),
        ("{{ $prev.nope }}", "eq", "", None, True),
        ("{{ $prev.nope }}", "eq", "0", None, False),
        ("{{ $prev.checkBalance.tags }}", "eq", '["vip","new"]', None, True),
        ("{{ $prev.checkBalance.tags }}", "eq", "{{ ['vip', 'new'] }}", None, True),
        # ordering
        ("{{ $prev.checkBalance.amount }}", "gt", "1000", None, True),
        ("{{ $prev.checkBalance.amount }}", "gt", "1500", None, False),
        ("{{ $prev.checkBalance.amount }}", "gte", "1500", None, True),
        ("{{ $prev.checkBalance.amount }}", "lt", "1500.5", None, True),
        ("{{ $prev.checkBalance.amount }}", "lte", "1499", None, False),
        ("apple", "lt", "banana", None, True),
        ("b", "gte", "a", None, True),
        ("{{ $prev.nope }}", "gt", "1", None, False),
        ("{{ $prev.nope }}", "lt", "1", None, False),
        # contains: substring, list membership, object key, number as text
        ("{{ $prev.args.name }}", "contains", "d", None, True),
        ("{{ $prev.args.name }}", "contains", "z", None, False),
        ("{{ $prev.checkBalance.tags }}", "contains", "vip", None, True),
        ("{{ $prev.checkBalance.tags }}", "contains", "vi", None, False),
        ("{{ [1, 2, 3] }}", "contains", "2", None, True),
        ("{{ $prev.checkBalance.meta }}", "contains", "k", None, True),
        ("{{ $prev.checkBalance.meta }}", "contains", "1", None, False),
        ("{{ 12345 }}", "contains", "234", None, True),
        ("{{ $prev.nope }}", "contains", "x", None, False),
        ("{{ $prev.checkBalance.tags }}", "not_contains", "old", None, True),
        ("{{ $prev.checkBalance.tags }}", "not_contains", "vip", None, False),
        ("{{ $prev.nope }}", "not_contains", "x", None, True),
        # regex
        ("{{ $prev.args.id }}", "regex", r"^\d+$", None, True),
        ("{{ $prev.args.name }}", "regex", "^a", None, False),
        ("{{ $prev.args.name }}", "regex", "(?i)^a", None, True),
        ("{{ $prev.checkBalance.amount }}", "regex", "^15", None, True),
        # casts
        ("{{ $prev.args.id }}", "eq", "42.0", "number", True),
        ("{{ $prev.args.id }}", "gt", "5", "number", True),
        ("{{ $prev.args.id }}", "gt", "5", "string", False),
        ("{{ $prev.args.id }}", "eq", "42.0", "string", False),
        ("{{ $prev.args.flag }}", "eq", "true", "boolean", True),
        ("{{ 0 }}", "eq", "no", "boolean", True),
        ("{{ true }}", "eq", "1", "number", True),
        ("{{ $prev.checkBalance.meta }}", "eq", '{"k":1}', "string", True),
        ("{{ true }}", "gt", "false", "boolean", True),
    ],
)
def test_operators(scope: Scope, left: Any, operator: str, right: Any, cast: str | None, expected: bool) -> None:
    extra = {"cast": cast} if cast else {}
    assert one(scope, left, operator, right, **extra) is expected


@pytest.mark.parametrize(
    ("left", "expected"),
    [
        ("{{ $prev.nope }}", True),
        ("{{ $prev.empty.text }}", True),
        ("{{ $prev.empty.list }}", True),
        ("{{ $prev.empty.obj }}", True),
        ("{{ $prev.empty.zero }}", False),
        ("{{ $prev.empty.no }}", False),
        (" ", False),
        ("{{ $prev.args.name }}", False),
        ("{{ $prev.checkBalance.tags }}", False),
    ],
)
def test_is_empty_and_not_empty(scope: Scope, left: str, expected: bool) -> None:
    assert one(scope, left, "is_empty") is expected
    assert one(scope, left, "not_empty") is (not expected)


def test_empty_string_casts_to_null_for_number_and_boolean(scope: Scope) -> None:
    assert one(scope, "{{ $prev.empty.text }}", "is_empty", cast="number") is True
    assert one(scope, "   ", "is_empty", cast="boolean") is True
    assert one(scope, "{{ $prev.empty.zero }}", "is_empty", cast="string") is False


def test_right_value_is_optional_for_emptiness(scope: Scope) -> None:
    assert evaluate_filters([{"leftValue": "x", "operator": "not_empty"}], scope) is True
    assert check_filters([{"leftValue": "x", "operator": "is_empty"}]) == {}


@pytest.mark.parametrize(
    ("left", "cast", "message"),
    [
        ("abc", "number", "cannot cast 'abc' to a number"),
        ("{{ [1] }}", "number", "cannot cast a list to a number"),
        ("maybe", "boolean", "cannot cast 'maybe' to a boolean"),
        ("{{ {'a': 1} }}", "boolean", "cannot cast an object to a boolean"),
        ("nan", "number", "cannot cast 'nan' to a number"),
    ],
)
def test_cast_failure_raises_filter_error(scope: Scope, left: str, cast: str, message: str) -> None:
    with pytest.raises(FilterError) as info:
        one(scope, left, "eq", "1", cast=cast)
    assert info.value.code == "FILTER_ERROR"
    assert message in str(info.value)
    assert info.value.path == "[0]"


def test_cast_failure_on_right_value(scope: Scope) -> None:
    with pytest.raises(FilterError, match="cannot cast 'lots' to a number"):
        one(scope, "5", "gt", "lots", cast="number")


def test_ordering_incompatible_values_raises_filter_error(scope: Scope) -> None:
    with pytest.raises(FilterError, match="'gt' cannot compare a list with '1'"):
        one(scope, "{{ [1] }}", "gt", "1")


def _f(result: bool, mode: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"leftValue": "a", "operator": "eq", "rightValue": "a" if result else "b"}
    if mode:
        item["mode"] = mode
    return item


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([_f(True), _f(True, "and")], True),
        ([_f(True), _f(False)], False),
        ([_f(False, "or"), _f(False, "or")], False),
        ([_f(False, "or"), _f(True, "or")], True),
        ([_f(True), _f(False, "or"), _f(True, "or")], True),
        ([_f(True), _f(False, "or")], False),
        ([_f(False), _f(True, "or")], False),
        ([_f(True, "or")], True),
        ([{**_f(True), "mode": None, "cast": ""}], True),
    ],
)
def test_and_or_semantics(scope: Scope, filters: list[dict[str, Any]], expected: bool) -> None:
    assert evaluate_filters(filters, scope) is expected


def test_failing_and_filter_stops_evaluation(scope: Scope) -> None:
    # The second filter would raise, but the first already decides the outcome.
    broken = {"leftValue": "x", "operator": "eq", "rightValue": "1", "cast": "number"}
    assert evaluate_filters([_f(False), broken], scope) is False
    with pytest.raises(FilterError):
        evaluate_filters([_f(True), broken], scope)


def test_regex_errors_raise_filter_error(scope: Scope, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FilterError, match="invalid regular expression"):
        one(scope, "abc", "regex", "(unclosed")
    with pytest.raises(FilterError, match="backreference"):
        one(scope, "aa", "regex", r"(a)\1")
    with pytest.raises(FilterError, match="needs a pattern"):
        one(scope, "abc", "regex", None)
    monkeypatch.setattr(limits, "MAX_REGEX_PATTERN_CHARS", 5)
    with pytest.raises(FilterError, match="regular expression is too long"):
        one(scope, "abc", "regex", "abcdef")
    monkeypatch.setattr(limits, "MAX_REGEX_INPUT_CHARS", 3)
    with pytest.raises(FilterError, match="input is too long"):
        one(scope, "abcd", "regex", "a")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"(a*)*b", False),
        (r"(\w+\s?)+$", False),
        (r"((ab)*c+)+", False),
        (r"(?:x|(y+))*z", False),
        (r"(.*a){100}", True),
    ],
)
@pytest.mark.timeout(60)
def test_catastrophic_patterns_run_in_linear_time(scope: Scope, pattern: str, expected: bool) -> None:
    # Python's backtracking re takes hours on these with 5,000 characters (the timeout
    # would end the test); RE2 answers at once.
    assert check_filters([{"leftValue": "x", "operator": "regex", "rightValue": pattern}]) == {}
    assert one(scope, "a" * 5000 + "!", "regex", pattern) is expected


@pytest.mark.parametrize("pattern", [r"^(\d{1,3}\.){3}\d{1,3}$", r"^[\w.+-]+@[\w-]+\.[\w.]+$", r"(ab|cd)+"])
def test_ordinary_patterns_are_allowed(scope: Scope, pattern: str) -> None:
    assert check_filters([{"leftValue": "x", "operator": "regex", "rightValue": pattern}]) == {}
    assert one(scope, "x", "regex", pattern) is False


@pytest.mark.parametrize(
    ("filters", "path", "message"),
    [
        ("nope", "", "filters must be a list"),
        ([3], "[0]", "each filter must be an object"),
        ([{"leftValue": "a", "operator": "like", "rightValue": "a"}], "[0].operator", "unknown operator 'like'"),
        ([{"leftValue": "a", "rightValue": "a"}], "[0].operator", "unknown operator None"),
        ([{"leftValue": "a", "operator": "eq", "rightValue": "a", "cast": "int"}], "[0].cast", "invalid cast 'int'"),
        ([_f(True), {**_f(True), "mode": "xor"}], "[1].mode", "invalid mode 'xor'"),
    ],
)
def test_malformed_filters_raise_filter_error(scope: Scope, filters: Any, path: str, message: str) -> None:
    with pytest.raises(FilterError) as info:
        evaluate_filters(filters, scope)
    assert info.value.path == path
    assert message in info.value.message


def test_expression_errors_in_values_propagate_with_path(scope: Scope) -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate_filters([_f(True), {"leftValue": "{{ 1 / 0 }}", "operator": "eq", "rightValue": "1"}], scope)
    assert info.value.path == "[1].leftValue"
    assert str(info.value) == "[1].leftValue: division by zero in {{ 1 / 0 }}"


def test_values_with_expressions_keep_their_types(scope: Scope) -> None:
    assert one(scope, "{{ $prev.checkBalance.tags | length }}", "eq", "{{ 1 + 1 }}") is True
    assert one(scope, "{{ $prev.checkBalance }}", "contains", "{{ 'currency' }}") is True


def test_every_operator_is_known() -> None:
    assert set(OPERATORS) == {
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
    }


def test_check_filters_paths() -> None:
    filters = [
        {"leftValue": "{{ $prev.a + }}", "operator": "eq", "rightValue": "1"},
        {"leftValue": "x", "operator": "nope", "cast": "decimal", "mode": "xor"},
        {"operator": "gt"},
        "not an object",
        {"leftValue": "x", "operator": "regex", "rightValue": r"(a)\1"},
        {"leftValue": {"deep": ["{{ ( }}"]}, "operator": "contains", "rightValue": "{{ $nope }}"},
        {"leftValue": "x", "operator": "regex", "rightValue": "{{ $prev.pattern }}"},
    ]
    problems = check_filters(filters)
    assert set(problems) == {
        "[0].leftValue",
        "[1].operator",
        "[1].cast",
        "[1].mode",
        "[2].leftValue",
        "[2].rightValue",
        "[3]",
        "[4].rightValue",
        "[5].leftValue.deep[0]",
        "[5].rightValue",
    }
    assert "unexpected end of expression" in problems["[0].leftValue"][0]
    assert problems["[2].leftValue"] == ["leftValue is required"]
    assert problems["[2].rightValue"] == ["rightValue is required for operator 'gt'"]
    assert "unknown operator 'nope'" in problems["[1].operator"][0]


def test_check_filters_accepts_valid_lists() -> None:
    assert check_filters([]) == {}
    assert check_filters(None) == {}
    assert (
        check_filters(
            [
                {"leftValue": "{{ $prev.x.amount }}", "operator": "gte", "rightValue": "10", "cast": "number"},
                {"leftValue": "{{ $prev.x.tags }}", "operator": "contains", "rightValue": "a", "mode": "or"},
                {"leftValue": "{{ $prev.x.name }}", "operator": "not_empty", "mode": "or"},
            ]
        )
        == {}
    )
    assert check_filters("bad") == {"": ["filters must be a list of objects"]}


def test_filter_error_survives_pickling() -> None:
    error = FilterError("cannot cast 'x' to a number", path="[2]")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == "[2]: cannot cast 'x' to a number"
    assert clone.code == "FILTER_ERROR"
