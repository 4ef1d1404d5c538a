"""`iterator` and `aggregator`: run a part of the flow once per item, then gather the results.

The steps between an ``iterator`` and the first ``aggregator`` whose ``sourceRef`` names
one of them are the loop body (``loop_end``). The iterator hands its items to
``ctx.fan_out``: each item becomes an iteration, a task of its own, so that items run in
parallel across the worker fleet, at most ``concurrency`` at a time; the play waits
meanwhile, and its iterator step ends with ``{count}`` once all have ended. Inside the
body, ``$prev.<iteratorRef>`` is ``{item, index, total, isLast}``.
"""

from __future__ import annotations

from typing import Any

from .base import Module, Park, RunContext, StepError, _obj, register


@register
class Iterator(Module):
    app_id = "iterator"
    summary = "Run the steps up to the matching aggregator once per item, in parallel across workers."
    args_schema = _obj(
        {
            "items": {"type": "array", "description": "The list to iterate over (an expression giving a list)."},
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
        },
        ["items"],
    )
    out_schema = _obj({"count": {"type": "integer"}}, ["count"])

    inline = True  # fan_out writes in the runner's transaction

    def run(self, args: dict, ctx: RunContext) -> Any:
        items = (args or {}).get("items")
        if isinstance(items, dict) and "items" in items:
            args = {**args, "items": items["items"]}  # an enumeration's or aggregator's out
        return self.execute(self.clean(args), ctx)

    def execute(self, args: dict, ctx: RunContext) -> Any:
        from django.conf import settings

        items, limit = args["items"], settings.FLOWPLAY["MAX_ITERATOR_ITEMS"]
        if len(items) > limit:
            raise StepError(f"{len(items)} items exceed the limit of {limit} per iterator", "TOO_MANY_ITEMS", False)
        if not items:
            return {"count": 0}
        if ctx.fan_out is None:
            raise StepError("iterator needs the play runner", "INTERNAL", retryable=False)
        done = ctx.fan_out(items, args["concurrency"])
        if done is None:
            raise Park(None)  # the last iteration to end wakes the play up
        return {"count": done}

    def after(self, steps: list[dict], index: int) -> int:
        return loop_end(steps, index)


def _pluck(value: Any, field: str) -> Any:
    for part in field.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        else:
            return None
    return value


@register
class Aggregator(Module):
    app_id = "aggregator"
    summary = "Gather the outputs of a loop step, in item order, once every iteration has ended."
    args_schema = _obj(
        {
            "sourceRef": {"type": "string", "minLength": 1, "description": "A step inside the loop."},
            "field": {"type": "string", "minLength": 1, "description": "A path inside each output to keep (e.g. `result.id`)."},
        },
        ["sourceRef"],
    )
    out_schema = _obj({"items": {"type": "array"}, "count": {"type": "integer"}}, ["items", "count"])
    inline = True

    def execute(self, args: dict, ctx: RunContext) -> Any:
        if ctx.collect is None:
            raise StepError("aggregator needs the play's loop outputs", "INTERNAL", retryable=False)
        outputs = ctx.collect(args["sourceRef"])
        if args.get("field"):
            outputs = [_pluck(out, args["field"]) for out in outputs]
        return {"items": outputs, "count": len(outputs)}


def loop_end(steps: list[dict[str, Any]], start: int) -> int:
    """Index of the aggregator that closes the loop of the iterator at ``start``.

    It is the first ``aggregator`` after the iterator whose ``sourceRef`` names a step
    inside the loop; without one, the loop body runs to the end of the flow. ``steps``
    are definition steps (``ref``, ``appId``, ``args``).
    """
    body: set[str] = set()
    for index in range(start + 1, len(steps)):
        step = steps[index]
        if step["appId"] == "aggregator" and (step.get("args") or {}).get("sourceRef") in body:
            return index
        body.add(step["ref"])
    return len(steps)
