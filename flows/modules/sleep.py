"""`sleep`: wait without holding a worker (the play parks until then)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .base import (
    Module,
    Park,
    RunContext,
    _coerce,
    _obj,
    register,
)

MAX_SLEEP_MS = 31 * 24 * 3600 * 1000


@register
class Sleep(Module):
    app_id = "sleep"
    summary = "Wait `ms` milliseconds (up to 31 days) without holding a worker."
    args_schema = _obj({"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS}}, ["ms"])
    out_schema = _obj({"sleptMs": {"type": "integer"}}, ["sleptMs"])

    def clean(self, args: Any) -> dict:
        if isinstance(args, dict):
            ms = _coerce(args.get("ms"), {"type": "integer"})
            if isinstance(ms, int) and not isinstance(ms, bool) and ms < 0:
                # A computed "time until X" that has passed means: do not wait.
                args = {**args, "ms": 0}
        return super().clean(args)

    def execute(self, args: dict, ctx: RunContext) -> Any:
        ms = args["ms"]
        out = {"sleptMs": ms}
        if ms <= 0:
            return out
        raise Park(until=datetime.now(UTC) + timedelta(milliseconds=ms), out=out)
