"""Issue 13: one tenant cannot stall every worker, and no step produces without bound.

Each test reproduces a finding first: on the code before the fix it hangs (and the
pytest-timeout ends it), fails, or finds a thread still burning CPU.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flows import modules
from flows.modules import Module, RunContext, StepError
from plays import killable
from plays.models import Play

from .factories import make_flow, run
from .helpers import make_pdf, make_pdf_bomb


class Spin(Module):
    """Burns CPU in pure Python until killed; writes its pid first."""

    app_id = "test-spin"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {"type": "object"}
    cpu_bound = True

    def run(self, args: dict, ctx: RunContext) -> Any:
        Path(args["pidfile"]).write_text(f"{os.getpid()} {threading.get_native_id()}")
        n = 0
        while True:
            n += 1


@pytest.fixture(autouse=True)
def spin_module() -> Any:
    modules.REGISTRY["test-spin"] = Spin()
    yield
    modules.REGISTRY.pop("test-spin", None)


def layer(api: Any, play_id: str, index: int = 0) -> dict[str, Any]:
    return api.get(f"/api/plays/{play_id}/layers").json()[index]


def cpu_ticks(pid: int, tid: int | None = None) -> int | None:
    """utime + stime of a process (or one of its threads) from /proc; None once it is gone."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[11]) + int(fields[12])


# --- a CPU-bound step stops when it times out or its play is cancelled -------------------


@pytest.mark.timeout(60)
def test_a_timed_out_cpu_bound_step_leaves_nothing_running(api: Any, drain: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "spin.pid"
    flow = make_flow(api, [{"ref": "spin", "appId": "test-spin", "args": {"pidfile": str(pidfile)}, "timeout": 1}])
    play_id = run(api, flow, drain)
    got = layer(api, play_id)
    assert (got["state"], got["error"]["code"]) == ("FAIL", "TIMEOUT")
    pid, tid = (int(x) for x in pidfile.read_text().split())
    # Before the fix the module ran in a thread of this very process, still spinning.
    assert pid != os.getpid()
    assert cpu_ticks(pid) is None
    assert not Path(f"/proc/{os.getpid()}/task/{tid}").exists()


def busiest_thread_share(seconds: float = 1.0) -> float:
    """The largest share of a core one thread of this process used over ``seconds``."""
    tasks = Path(f"/proc/{os.getpid()}/task")
    before = {t.name: cpu_ticks(os.getpid(), int(t.name)) or 0 for t in tasks.iterdir()}
    time.sleep(seconds)
    after = {t.name: cpu_ticks(os.getpid(), int(t.name)) or 0 for t in tasks.iterdir()}
    top = max((after[k] - before.get(k, 0) for k in after), default=0)
    return top / os.sysconf("SC_CLK_TCK") / seconds


@pytest.mark.timeout(120)
def test_a_quadratic_regex_is_stopped_at_its_timeout(api: Any, drain: Any) -> None:
    # RE2 searches again after each match; a(?:.*z)? rescans the rest of the input every
    # time: minutes for 200,000 characters. In a thread, it went on after the timeout.
    args = {"input": "a" * 200_000, "pattern": "a(?:.*z)?", "operation": "replace", "replacement": "b"}
    flow = make_flow(api, [{"ref": "r", "appId": "regex", "args": args, "timeout": 1}])
    play_id = run(api, flow, drain)
    got = layer(api, play_id)
    assert (got["state"], got["error"]["code"]) == ("FAIL", "TIMEOUT")
    assert busiest_thread_share() < 0.5


@pytest.mark.timeout(60)
def test_a_cancel_kills_the_child_at_once(tmp_path: Path) -> None:
    pidfile = tmp_path / "spin.pid"
    ended = threading.Event()
    threading.Timer(0.5, ended.set).start()
    with pytest.raises(killable.Cancelled):
        killable.call(Spin().run, {"pidfile": str(pidfile)}, RunContext(), timeout=30, ended=ended, max_bytes=1 << 20)
    pid = int(pidfile.read_text().split()[0])
    assert cpu_ticks(pid) is None


@pytest.mark.timeout(60)
def test_killable_timeout_and_outcomes() -> None:
    never = threading.Event()
    with pytest.raises(FutureTimeout):
        killable.call(time.sleep, 30, timeout=0.5, ended=never, max_bytes=1 << 20)
    assert killable.call(sum, [1, 2, 3], timeout=10, ended=never, max_bytes=1 << 20) == 6

    def refuse() -> None:
        raise StepError("nope", "SOME_CODE", retryable=False)

    with pytest.raises(StepError) as info:
        killable.call(refuse, timeout=10, ended=never, max_bytes=1 << 20)
    assert (info.value.code, info.value.message, info.value.retryable) == ("SOME_CODE", "nope", False)
    with pytest.raises(StepError) as info:
        killable.call(lambda: "x" * (4 << 20), timeout=10, ended=never, max_bytes=1 << 20)
    assert info.value.code == "OUTPUT_TOO_LARGE"
    with pytest.raises(StepError) as info:
        killable.call(os._exit, 3, timeout=10, ended=never, max_bytes=1 << 20)
    assert info.value.code == "STEP_CRASHED"


def test_cpu_bound_modules_are_marked() -> None:
    marked = {app_id for app_id, module in modules.REGISTRY.items() if module.cpu_bound}
    assert {"regex", "csv-parse", "pdf-extract", "array-map", "array-filter"} <= marked
    assert not {"curl", "subflow", "kv-get", "sleep"} & marked


# --- regular expressions run in linear time ------------------------------------------------


@pytest.mark.timeout(60)
def test_a_catastrophic_regex_finishes_at_once(api: Any, drain: Any) -> None:
    # Python's re needs about 2^40 steps here (hours, holding the GIL).
    flow = make_flow(api, [{"ref": "r", "appId": "regex", "args": {"input": "a" * 40 + "!", "pattern": "(a+)+$"}}])
    play_id = run(api, flow, drain)
    got = layer(api, play_id)
    assert got["state"] == "DONE" and got["out"] == {"matched": False, "groups": [], "named": {}}


@pytest.mark.timeout(60)
def test_the_regex_filter_operator_runs_in_linear_time(api: Any, drain: Any) -> None:
    nested = [{"leftValue": "{{ $prev.args.s }}", "operator": "regex", "rightValue": "^(a|aa)+$"}]
    flow = make_flow(api, [{"ref": "v", "appId": "var", "args": {"values": {"ok": True}}, "filters": nested}])
    play_id = run(api, flow, drain, {"s": "a" * 60 + "!"})
    assert layer(api, play_id)["state"] == "FILTERED"


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        (r"(\w)\1", "backreference"),
        (r"(?<=a)b", "lookahead or lookbehind"),
        (r"a(?!b)", "lookahead"),
        (r"(?>a+)", "atomic"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_at_save_time(api: Any, pattern: str, what: str) -> None:
    layers = [
        {"ref": "first", "appId": "var", "args": {"values": {}}},
        {"ref": "words", "appId": "regex", "args": {"input": "x", "pattern": pattern}},
    ]
    r = api.post("/api/flows", {"name": "Regex", "layers": layers}, format="json")
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "VALIDATION_ERROR"
    messages = " ".join(body["details"]["layers[1].args.pattern"])
    assert what in messages and "RE2" in messages and "Flowlet 'words'" in messages
    filtered = [
        {
            "ref": "v",
            "appId": "var",
            "args": {"values": {}},
            "filters": [{"leftValue": "x", "operator": "regex", "rightValue": pattern}],
        }
    ]
    r = api.post("/api/flows", {"name": "Regex filter", "layers": filtered}, format="json")
    assert r.status_code == 400 and what in str(r.json()["details"])


def test_a_pattern_known_only_at_run_time_fails_with_invalid_input(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "r", "appId": "regex", "args": {"input": "aa", "pattern": "{{ $prev.args.p }}"}}])
    play_id = run(api, flow, drain, {"p": r"(a)\1"})
    got = layer(api, play_id)
    assert (got["state"], got["error"]["code"]) == ("FAIL", "INVALID_INPUT")
    assert "backreference" in got["error"]["message"]


def test_python_spellings_keep_working_on_re2() -> None:
    regex = modules.get_module("regex")
    assert regex.run({"input": "ab\n", "pattern": r"b\Z"}, RunContext())["matched"] is False
    assert regex.run({"input": "ab", "pattern": r"b\Z"}, RunContext())["matched"] is True
    verbose = {"input": "2026-11-30", "pattern": r"(\d{4}) - (\d\d)  # year, month", "flags": "x"}
    assert regex.run(verbose, RunContext())["groups"] == ["2026", "11"]
    out = regex.run({"input": "café", "pattern": r"\u00e9", "operation": "find"}, RunContext())
    assert out["index"] == 3
    swapped = {"input": "a1 b2", "pattern": r"(?P<l>\w)(\d)", "operation": "replace", "replacement": r"\2\g<l>"}
    assert regex.run(swapped, RunContext())["result"] == "1a 2b"


# --- algorithmic bombs fixed at their root ---------------------------------------------------


@pytest.mark.timeout(30)
def test_csv_header_renaming_is_linear() -> None:
    # "a,"*1999 + "a": 2,000 duplicate names took 40-60 s of CPU (O(n^3)).
    out = modules.get_module("csv-parse").run({"input": "a," * 1999 + "a\n1\n"}, RunContext())
    names = list(out["rows"][0])
    assert names[:3] == ["a", "a_2", "a_3"] and names[-1] == "a_2000" and len(set(names)) == 2000


def test_csv_header_renaming_keeps_its_names() -> None:
    csv = modules.get_module("csv-parse")
    out = csv.run({"input": "a,a,a_2,,a\n1,2,3,4,5,6\n"}, RunContext())
    assert list(out["rows"][0]) == ["a", "a_2", "a_2_2", "column4", "a_3", "column6"]


@pytest.mark.timeout(60)
def test_a_pdf_whose_pages_share_a_huge_stream_is_refused() -> None:
    bomb = make_pdf_bomb(pages=100)
    assert len(bomb) < 100_000  # 5 MB of content per page, 500 MB in all
    with pytest.raises(StepError) as info:
        modules.get_module("pdf-extract").run({"content": base64.b64encode(bomb).decode()}, RunContext())
    assert info.value.code == "PDF_ERROR" and "bomb" in info.value.message
    ordinary = base64.b64encode(make_pdf("one", "two")).decode()
    assert modules.get_module("pdf-extract").run({"content": ordinary}, RunContext()) == {
        "text": "one\ntwo",
        "pages": 2,
    }


# --- every output is capped ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_huge_regex_replacement_fails_before_it_is_built(api: Any, drain: Any) -> None:
    args = {"input": "x" * 1000, "pattern": "x", "operation": "replace", "replacement": "y" * 100_000}
    flow = make_flow(api, [{"ref": "r", "appId": "regex", "args": args, "retry": {"count": 2, "delayMs": 1}}])
    play_id = run(api, flow, drain)
    got = layer(api, play_id)
    assert (got["state"], got["error"]["code"], got["attempts"]) == ("FAIL", "OUTPUT_TOO_LARGE", 1)
    assert "100,000,000" in got["error"]["message"]


def test_every_module_output_is_capped_by_the_setting(api: Any, drain: Any, settings: Any) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_OUTPUT_BYTES": 1000}
    flow = make_flow(
        api,
        [
            {"ref": "small", "appId": "var", "args": {"values": {"s": "{{ $prev.args.s }}"}}},
            {"ref": "big", "appId": "var", "args": {"values": {"s": "{{ $prev.args.s * 20 }}"}}},
        ],
    )
    play_id = run(api, flow, drain, {"s": "z" * 90})
    assert layer(api, play_id, 0)["state"] == "DONE"
    big = layer(api, play_id, 1)
    assert (big["state"], big["error"]["code"]) == ("FAIL", "OUTPUT_TOO_LARGE")


@pytest.mark.parametrize(
    ("app_id", "args"),
    [
        ("array-map", {"items": list(range(1000)), "expression": "{{ 'x' * 500 }}"}),
        ("base64-encode", {"input": "x" * 60_000}),
        ("csv-parse", {"input": "a,b\n" + "1,2\n" * 20_000}),
        ("regex", {"input": "ab" * 10_000, "pattern": "(a)(b)", "operation": "findAll"}),
    ],
)
def test_modules_estimate_their_output_before_building_it(settings: Any, app_id: str, args: dict) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_OUTPUT_BYTES": 50_000}
    with pytest.raises(StepError) as info:
        modules.get_module(app_id).run(args, RunContext())
    assert info.value.code == "OUTPUT_TOO_LARGE" and not info.value.retryable


# --- subflows: a budget per root play; a limit of running plays per company ---------------


@pytest.mark.timeout(120)
def test_a_self_calling_async_subflow_stops_at_the_descendant_budget(api: Any, drain: Any, settings: Any) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_DESCENDANT_PLAYS": 20}
    call = {
        "appId": "subflow",
        "args": {"flowId": "{{ $prev.args.f }}", "args": {"f": "{{ $prev.args.f }}"}, "async": True},
    }
    flow = make_flow(api, [{"ref": "one", **call}, {"ref": "two", **call}], name="Fork bomb", permanentId="fork-bomb")
    root = run(api, flow, drain, {"f": "fork-bomb"})
    # Without the budget: 2 + 4 + … + 128 = 254 descendants (the depth limit of 8 only).
    assert Play.objects.filter(root_id=root).count() == 20
    assert Play.objects.count() == 21
    codes = [err["code"] for err in Play.objects.exclude(error=None).values_list("error", flat=True)]
    assert codes and all(code == "STEP_FAILED" for code in codes)
    refused = [
        lay for p in Play.objects.all() for lay in p.layers.all() if lay.error and lay.error["code"] == "SUBFLOW_LIMIT"
    ]
    assert refused and "FLOWPLAY_MAX_DESCENDANT_PLAYS" in refused[0].error["message"]


def test_a_company_over_its_running_limit_waits_deferred(
    api: Any, charlie_api: Any, no_enqueue: list[str], drain: Any, settings: Any
) -> None:
    from plays import tasks

    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_RUNNING_PLAYS_PER_COMPANY": 2}
    flow = make_flow(api, [{"ref": "v", "appId": "var", "args": {"values": {}}}])
    ours = [api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json() for _ in range(3)]
    assert [p["state"] for p in ours] == ["RUN", "RUN", "DEFERRED"]
    other = make_flow(charlie_api, [{"ref": "v", "appId": "var", "args": {"values": {}}}])
    theirs = charlie_api.post(f"/api/flows/{other['id']}/run", {"args": {}}, format="json").json()
    assert theirs["state"] == "RUN"  # another company is not limited by this one
    drain()
    assert Play.objects.get(pk=ours[2]["playId"]).state == "DEFERRED"
    tasks.release_due()  # the scheduler's sweep: a slot is free now
    drain()
    assert {p.state for p in Play.objects.all()} == {"DONE"}
