"""The bench-only ``bench-cpu`` module and the bare Celery tasks it is compared with.

``install()`` registers ``bench-cpu`` in this process only (the bench command and the
workers it starts); it is never imported by the app, so the public module list
(``GET /api/modules``, docs/modules.md) does not show it. ``uninstall()`` removes it.
"""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from flows.modules import base

APP_ID = "bench-cpu"


def spin(ms: float) -> float:
    """Burn ``ms`` milliseconds of CPU; return the milliseconds it took."""
    start = time.perf_counter()
    ends = start + ms / 1000.0
    x = 0
    while time.perf_counter() < ends:
        for i in range(200):
            x += i * i
    return (time.perf_counter() - start) * 1000.0


class BenchCpu(base.Module):
    app_id = APP_ID
    summary = "Bench only: burn `ms` milliseconds of CPU."
    args_schema = base._obj({"ms": {"type": "number", "minimum": 0, "maximum": 1000}}, ["ms"])
    out_schema = {"type": "object"}

    def execute(self, args: dict, ctx: base.RunContext) -> Any:
        return {"ms": spin(float(args["ms"]))}


def install() -> None:
    if APP_ID not in base.REGISTRY:
        base.REGISTRY[APP_ID] = BenchCpu()


def uninstall() -> None:
    base.REGISTRY.pop(APP_ID, None)


@shared_task(name="bench.cpu.bare_step", ignore_result=True, acks_late=True)
def bare_step(ms: float) -> float:
    """One step of the bare Celery chain baseline."""
    return spin(ms) if ms else 0.0


@shared_task(name="bench.cpu.bare_done", ignore_result=False, acks_late=True)
def bare_done(ms: float) -> float:
    """The last task of a chain: its stored result tells when the chain ended."""
    return spin(ms) if ms else 0.0
