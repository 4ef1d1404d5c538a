"""`subflow`: run another flow as a child play.

Synchronous (the default): the child is triggered, and the parent play parks (it holds no
worker) until the child ends; the step's ``out`` is ``{state, playId, out}`` with the
child's last step output. A child that fails fails the step (``onError`` applies).
``async: true`` returns the child's ``playId`` at once.

The child records its parent (``parentPlayId``); holding or cancelling the parent holds
or cancels it (``plays.models.Play.hold`` / ``cancel``). Re-running the step after a
crash finds the child it already started (one child per parent layer). Cycles are refused
when a flow is saved (``flows.serializers``) and, for flow ids only known at run time, by
``FLOWPLAY_MAX_SUBFLOW_DEPTH``. Breadth is bounded too: one root play and all the plays
under it may start ``FLOWPLAY_MAX_DESCENDANT_PLAYS`` plays in all (``SUBFLOW_LIMIT``), so a
flow that starts itself asynchronously cannot multiply.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction

from .base import Module, Park, RunContext, StepError, _obj, register

# A parked parent is woken when its child ends; this is only the safety net.
RECHECK = timedelta(minutes=10)


def _last_out(child: Any) -> Any:
    layer = child.layers.filter(state="DONE", iteration__isnull=True).order_by("-index").first()
    return layer.out if layer is not None else None


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
        from flows.models import Flow
        from plays.models import TERMINAL, Layer, Play, State

        child = Play.objects.filter(parent_layer_id=ctx.layer_id).order_by("created_at").first()
        if child is None:
            parent = Play.objects.get(pk=ctx.play_id)
            depth, cursor = 1, parent
            limit = settings.FLOWPLAY["MAX_SUBFLOW_DEPTH"]
            while cursor.parent_id is not None and depth <= limit:
                depth += 1
                cursor = Play.objects.only("id", "parent_id").get(pk=cursor.parent_id)
            if depth + 1 > limit:
                raise StepError(f"Subflow depth limit of {limit} plays reached (a flow calling itself?)",
                                "SUBFLOW_DEPTH", retryable=False)
            key = args["flowId"]
            flow = (
                Flow.objects.filter(company_id=ctx.company_id, deleted_at__isnull=True)
                .filter(pk=key).first()
                or Flow.objects.filter(company_id=ctx.company_id, deleted_at__isnull=True, permanent_id=key).first()
            )
            if flow is None:
                raise StepError(f"No flow {key!r}", "NOT_FOUND", retryable=False)
            if not flow.enabled:
                raise StepError(f"Flow {key!r} is disabled", "FLOW_DISABLED", retryable=False)
            layer = Layer.objects.get(pk=ctx.layer_id)
            budget = settings.FLOWPLAY["MAX_DESCENDANT_PLAYS"]
            with transaction.atomic():
                # Iterations of one play start children at once: lock the root so that
                # counting and starting are one step per tree (SQLite serializes anyway).
                Play.objects.select_for_update().filter(pk=parent.root_id or parent.pk).first()
                if budget and parent.descendants() >= budget:
                    raise StepError(
                        f"The root play {parent.root_id or parent.pk} already started {budget} subflow plays "
                        "(FLOWPLAY_MAX_DESCENDANT_PLAYS)",
                        "SUBFLOW_LIMIT",
                        retryable=False,
                    )
                child, _ = Play.trigger(flow, args["args"], parent=parent, parent_layer=layer)
        if args["async"]:
            return {"state": child.state, "playId": child.id, "out": None}
        child.refresh_from_db(fields=["state", "error"])
        if child.state == State.FAIL:
            message = (child.error or {}).get("message", "failed")
            raise StepError(f"Subflow play {child.id} failed: {message}", "SUBFLOW_FAILED", retryable=False)
        if child.state in TERMINAL:
            return {"state": child.state, "playId": child.id, "out": _last_out(child)}
        child_id = child.id
        raise Park(
            until=datetime.now(UTC) + RECHECK,
            out=None,
            ready=lambda: Play.objects.filter(pk=child_id, state__in=TERMINAL).exists(),
        )
