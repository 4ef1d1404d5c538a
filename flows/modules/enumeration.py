"""`enumeration`: the numbers from `from` to `to` by `step`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .base import (
    Module,
    RunContext,
    _obj,
    register,
)

MAX_ENUM_ITEMS = 100_000


def _enumeration_size(start: float, stop: float, step: float) -> int:
    if step == 0 or (step > 0 and stop < start) or (step < 0 and stop > start):
        return 0
    if all(isinstance(x, int) for x in (start, stop, step)):
        return (stop - start) // step + 1
    steps = (stop - start) / step
    if not math.isfinite(steps) or steps > MAX_ENUM_ITEMS:
        return MAX_ENUM_ITEMS + 1
    # The epsilon keeps 0..1 step 0.1 from losing its last item to float error.
    return math.floor(steps + 1e-9) + 1


@register
class Enumeration(Module):
    app_id = "enumeration"
    summary = "List the numbers from `from` to `to` inclusive."
    args_schema = _obj(
        {
            "from": {"type": "number"},
            "to": {"type": "number"},
            "step": {"type": "number", "description": "non-zero; default 1, or -1 when from > to"},
        },
        ["from", "to"],
    )
    out_schema = _obj({"items": {"type": "array", "items": {"type": "number"}}}, ["items"])

    @staticmethod
    def _step(args: dict) -> Any:
        if "step" in args:
            return args["step"]
        start, stop = args.get("from"), args.get("to")
        if isinstance(start, (int, float)) and isinstance(stop, (int, float)) and start > stop:
            return -1
        return 1

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        values = [args.get("from"), args.get("to"), self._step(args)]
        for name, value in zip(("from", "to", "step"), values, strict=True):
            if isinstance(value, float) and not math.isfinite(value):
                yield name, "must be a finite number"
                return
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return
        if values[2] == 0:
            yield "step", "must not be 0"
        elif _enumeration_size(*values) > MAX_ENUM_ITEMS:
            yield "", f"would produce more than {MAX_ENUM_ITEMS} items"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        start, stop, step = args["from"], args["to"], self._step(args)
        count = _enumeration_size(start, stop, step)
        if all(isinstance(x, int) for x in (start, stop, step)):
            return {"items": list(range(start, start + count * step, step))}
        return {"items": [round(start + i * step, 12) for i in range(count)]}
