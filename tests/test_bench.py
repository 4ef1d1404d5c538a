"""``manage.py bench``: the in-process scenario (history) on tiny sizes, the results file, the table.

Scenarios that need worker processes and daphne run against a real database in
``manage.py bench --quick``; the test database is not visible to subprocesses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management import call_command

from flows.modules import base
from plays.management.commands.bench import pct, table
from plays.models import Play
from tenancy.models import Company


def test_history_scenario_writes_results_and_cleans_up(db: Any, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    call_command("bench", quick=True, only="5", history=300, output=str(out), stdout=open("/dev/null", "w"))
    results = json.loads(out.read_text())
    assert set(results) >= {"date", "database", "broker", "machine", "options", "scenarios", "total_seconds"}
    history = results["scenarios"]["history"]
    assert "error" not in history, history
    assert history["plays"] == 300
    assert set(history["timings"]) >= {"state=FAIL", "date range", "page=0"}
    for t in history["timings"].values():
        assert t["p50_ms"] > 0 and t["p95_ms"] >= t["p50_ms"]
    assert history["plans"]["page=0"]
    # Everything made under the company "bench" is gone, and bench-cpu is not public.
    assert not Company.objects.filter(slug="bench").exists()
    assert not Play.objects.exists()
    assert "bench-cpu" not in base.REGISTRY
    assert "| 5 history" in table(results)


def test_keep_keeps_the_bench_data(db: Any, tmp_path: Path) -> None:
    call_command(
        "bench", only="history", history=50, keep=True, output=str(tmp_path / "r.json"), stdout=open("/dev/null", "w")
    )
    assert Play.objects.filter(company__slug="bench").count() == 50


def test_table_reports_a_failed_scenario_and_percentiles() -> None:
    results = {
        "date": "d",
        "database": "sqlite",
        "broker": "filesystem",
        "machine": {"cpus": 2},
        "scenarios": {"sequential": {"error": "boom"}},
    }
    assert "| sequential | error | boom" in table(results)
    assert pct([3, 1, 2], 50) == 2 and pct([], 50) is None
