"""`subflow`: run another flow as a child play.

Synchronous (the default): the child is triggered, and the parent play parks (it holds no
worker) until the child ends; the step's ``out`` is ``{state, playId, out}`` with the
child's last step output. A child that fails fails the step (``onError`` applies).
``async: true`` returns the child's ``playId`` at once.

The runner provides ``ctx.start_child`` and ``ctx.child_state``: the child records its
parent (holding or cancelling the parent holds or cancels it), a step re-run after a crash
finds the child it already started (one per parent layer), and the limits are checked
there (``FLOWPLAY_MAX_SUBFLOW_DEPTH``, ``FLOWPLAY_MAX_DESCENDANT_PLAYS``; cycles are also
refused when a flow is saved).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .base import Module, Park, RunContext, StepError, _obj, register

# A parked parent is woken when its child ends; this is only the safety net.
RECHECK = timedelta(minutes=10)


@register
class Subflow(Module):
    app_id = "subflow"
    summary = "Run another flow as a child play and wait for it (or not, with `async`)."
    args_schema = _obj(
        {
            "flowId": {"type": "string", "minLength": 1, "description": "The child flow's id or permanentId."},
            "args": {"type": "object", "default": {}},
            "async": {"type": "boolean", "default": False},
        },
        ["flowId"],
    )
    out_schema = _obj(
        {"state": {"type": "string"}, "playId": {"type": "string"}, "out": {}},
        ["state", "playId", "out"],
    )
    inline = True

    def execute(self, args: dict, ctx: RunContext) -> Any:
        if ctx.start_child is None or ctx.child_state is None:
            raise StepError("subflow needs the play runner", "INTERNAL", retryable=False)
        child_state = ctx.child_state
        child = child_state() or ctx.start_child(args["flowId"], args["args"])
        if args["async"]:
            return {"state": child["state"], "playId": child["id"], "out": None}
        if child["state"] == "FAIL":
            message = (child["error"] or {}).get("message", "failed")
            raise StepError(f"Subflow play {child['id']} failed: {message}", "SUBFLOW_FAILED", retryable=False)
        if child["ended"]:
            return {"state": child["state"], "playId": child["id"], "out": child["out"]}
        raise Park(until=datetime.now(UTC) + RECHECK, ready=lambda: bool((child_state() or {}).get("ended")))
