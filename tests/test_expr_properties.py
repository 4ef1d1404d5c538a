"""Property tests of the expression evaluator and filters as an attack surface.

tests/test_expr.py already checks that arbitrary text and generated expressions only ever
raise ExpressionError. Here: filters with arbitrary operands, operators and casts only
ever raise FilterError; known sandbox-escape payloads and generated dunder paths reach no
Python internals; and expressions built to exhaust time or memory are stopped within the
evaluator's limits. Also: a filter whose expression fails at run time fails its step or its
play with EXPRESSION_ERROR instead of crashing the runner.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.expr import OPERATORS, ExpressionError, FilterError, Scope, evaluate_filters, limits, render
from flows.expr.filters import CASTS

SCOPE = Scope(
    prev={"args": {"id": 3, "name": "Ada", "tags": ["a", "b"], "n": None, "price": "12.50"},
          "step": {"items": [1, 2.5, "3", {"k": [True]}], "count": 2, "text": "hello"}},
    flow_id="f",
    play_id="p",
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)
OPERANDS = st.one_of(
    JSON,
    st.sampled_from(["{{ $prev.args.id }}", "{{ $prev.step.items }}", "{{ $prev.args.n }}", "{{ $prev.args.price }}",
                     "{{ $prev.missing.deep }}", "{{ 1 / 0 }}", "{{ $prev.step }}", "x{{ $prev.args.name }}y",
                     "(a+)+$", "[", "\\", "{{", "}}", ""]),
)
FILTER = st.fixed_dictionaries(
    {"leftValue": OPERANDS, "operator": st.sampled_from([*OPERATORS, "nope", None])},
    optional={"rightValue": OPERANDS, "cast": st.sampled_from([*CASTS, "float", None]),
              "mode": st.sampled_from(["and", "or", "xor", None])},
)

# CPU seconds of this thread, so that a busy machine (other processes) cannot fail the test;
# ten times what the largest allowed result takes to build.
BUDGET_SECONDS = 2.0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FILTER, max_size=4))
def test_filters_only_ever_raise_filter_or_expression_error(filters: list[dict[str, Any]]) -> None:
    """FILTER_ERROR for bad filters and casts, EXPRESSION_ERROR when a value's expression fails."""
    started = time.thread_time()
    try:
        verdict = evaluate_filters(filters, SCOPE)
    except (FilterError, ExpressionError) as error:
        assert str(error)
    else:
        assert verdict in (True, False)
    assert time.thread_time() - started < BUDGET_SECONDS


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(OPERATORS), JSON, JSON, st.sampled_from([*CASTS, None]))
def test_every_operator_with_any_values_decides_or_raises_filter_error(op: str, left: Any, right: Any, cast: str | None) -> None:
    item = {"leftValue": left, "operator": op, "rightValue": right}
    if cast:
        item["cast"] = cast
    try:
        assert evaluate_filters([item], SCOPE) in (True, False)
    except FilterError:
        pass  # plain JSON operands have no expression that could fail


ESCAPES = [
    "().__class__", "''.__class__.__mro__", "$prev.__class__", "$prev.args.__class__.__bases__",
    "$prev.__dict__", "$prev.args.__globals__", "$prev['__class__']", "$prev.args['__init__']",
    "__import__('os')", "__import__('os').system('id')", "open('/etc/passwd')", "eval('1')", "exec('x=1')",
    "globals()", "locals()", "vars()", "dir()", "getattr($prev, '__class__')", "lambda: 1", "(lambda x: x)(1)",
    "[x for x in ().__class__.__base__.__subclasses__()]", "''.join", "'{0.__class__}'.format(1)",
    "$prev.args.name.upper", "$prev.args.name.__len__()", "self", "config", "request", "cycler", "joiner",
    "namespace", "range(10)", "$prev.args | attr('__class__')", "$prev | map(attribute='__class__') | list",
    "'' | format('%s', $prev)", "$prev.args.tags.pop()", "$prev.args.tags.append(1)", "$prev.args.update({})",
    "$date.__class__", "$rand.__class__", "$flowId.__class__", "{'a': 1}.items()", "[].__class__",
]
LEAKS = ("<class", "<built-in", "<function", "<bound", "<module", "__", "object at 0x", "Undefined", "/etc/passwd")


@pytest.mark.parametrize("payload", ESCAPES)
def test_known_sandbox_escapes_reach_no_python_internals(payload: str) -> None:
    before = json.dumps(SCOPE.prev, sort_keys=True, default=str)
    try:
        result = render("{{ " + payload + " }}", SCOPE)
    except ExpressionError as error:
        assert str(error)
        return
    finally:
        # Nothing an expression does may change the values it reads.
        assert json.dumps(SCOPE.prev, sort_keys=True, default=str) == before
    text = json.dumps(result, allow_nan=False)
    assert not any(leak in text for leak in LEAKS), (payload, text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["__class__", "__mro__", "__subclasses__", "__globals__", "__builtins__", "__init__",
                                 "__dict__", "__getattribute__", "mro", "func_globals", "gi_frame", "f_back",
                                 "args", "step", "items", "0", "keys", "values", "format"]), min_size=1, max_size=5),
       st.sampled_from([".", "['", "|attr('"]))
def test_generated_dunder_paths_reach_no_python_internals(parts: list[str], style: str) -> None:
    path = "$prev"
    for part in parts:
        path += f".{part}" if style == "." else f"['{part}']" if style == "['" else f"|attr('{part}')"
    try:
        result = render("{{ " + path + " }}", SCOPE)
    except ExpressionError:
        return
    text = json.dumps(result, allow_nan=False)
    assert not any(leak in text for leak in LEAKS), (path, text)


def within_output_limit(result: Any) -> bool:
    """Strings and lists an expression builds stay within the evaluator's output limit."""
    if isinstance(result, (str, list)):
        return len(result) <= limits.MAX_OUTPUT_CHARS
    return len(json.dumps(result)) <= limits.MAX_OUTPUT_CHARS


BOMBS = [
    "'x' * 1000000000", "[1] * 1000000000", "'ab' * 999999 * 999999", "9 ** 9 ** 9", "10 ** 100000",
    "2 ** 100000000", "(" * 500 + "1" + ")" * 500, "[" * 500 + "]" * 500, "1" + " + 1" * 5000,
    "$prev.args.name" + " | upper" * 3000, "'a' * 600000 + 'b' * 600000", "$prev.step.items * 100000000",
    "'x' * 999999 | join(',')", "('x' * 999999) ~ ('y' * 999999)",
]


@pytest.mark.parametrize("bomb", BOMBS)
def test_time_and_memory_bombs_are_stopped(bomb: str) -> None:
    tracemalloc.start()
    started = time.thread_time()
    try:
        result = render("{{ " + bomb + " }}", SCOPE)
    except ExpressionError as error:
        result = None
        assert str(error)
    finally:
        elapsed = time.thread_time() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < BUDGET_SECONDS, (bomb, elapsed)
    # The output limit is 1,000,000 characters; allow some working room but nothing like GBs.
    assert peak < 64 * 1024 * 1024, (bomb, peak)
    if result is not None:
        assert within_output_limit(result), bomb


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 10**9), st.sampled_from(["'x'", "[0]", "'ab'", "$prev.args.tags", "$prev.args.name"]),
       st.sampled_from(["*", "**"]))
def test_repetition_and_power_of_any_size_stay_bounded(n: int, operand: str, op: str) -> None:
    started = time.thread_time()
    try:
        result = render("{{ " + f"{operand} {op} {n}" + " }}", SCOPE)
    except ExpressionError:
        result = None
    assert time.thread_time() - started < BUDGET_SECONDS
    if result is not None:
        assert within_output_limit(result)


# --- Failing filter expressions inside a play ----------------------------------------------------


FAILING = [{"leftValue": "{{ $prev.args.n / 0 }}", "operator": "eq", "rightValue": "1"}]


def test_a_step_filter_that_fails_at_run_time_fails_the_step_not_the_runner(api: Any, drain: Any) -> None:
    from plays.models import Play

    from .factories import make_flow

    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}, "filters": FAILING}])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"n": 1}}, format="json").json()["playId"]
    drain()
    play = Play.objects.get(pk=play_id)
    assert play.state == "FAIL" and play.runner == ""
    layer = play.layers.get(ref="a")
    assert layer.state == "FAIL" and layer.error["code"] == "EXPRESSION_ERROR"
    assert "division by zero" in layer.error["message"]


def test_a_flow_filter_that_fails_at_run_time_fails_the_play_not_the_request(api: Any, drain: Any) -> None:
    from .factories import make_flow

    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}], filters=FAILING)
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {"n": 1}}, format="json")
    assert r.status_code == 201, r.content
    play = api.get(f"/api/plays/{r.json()['playId']}").json()
    assert play["state"] == "FAIL" and play["error"]["code"] == "EXPRESSION_ERROR"
