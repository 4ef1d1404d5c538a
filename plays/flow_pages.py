"""The flow page: its steps as a read-only view of any version, its versions, a Run form.

The Run form starts a play the way ``POST /api/flows/{id}/run`` does (``Play.trigger``,
the same size limit, idempotency rule and audit entry); it needs the role's
``plays.add_play`` (RUN_FLOW), like the API. Args are a JSON object, the run-at time is
read in the time zone the browser reports (UTC without one).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from flows.modules.iterator import loop_end
from tenancy.audit import entry as audit_entry
from tenancy.permissions import RUN_FLOW, VIEW_FLOW

from .models import IdempotencyConflict, Play, State
from .pages import _flow_or_404, _plays
from .redaction import redact


def _steps_of(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps of a version for the read-only view, loop bodies marked by depth."""
    steps = list(definition.get("layers", []))
    depth = {s["index"]: 0 for s in steps}
    for s in steps:
        if s.get("appId") == "iterator":
            for i in range(s["index"] + 1, loop_end(steps, s["index"])):
                depth[i] = depth.get(i, 0) + 1
    rows = []
    for s in steps:
        shown = {k: v for k, v in s.items() if k not in ("ref", "appId", "index", "args", "id")}
        rows.append({
            "step": s,
            "depth": depth.get(s["index"], 0),
            "args_json": json.dumps(redact(s.get("args") or {}), indent=2, ensure_ascii=False),
            "options_json": json.dumps(redact(shown), indent=2, ensure_ascii=False) if shown else "",
        })
    return rows


def _context(request: HttpRequest, flow: Any, form: dict[str, str] | None = None) -> dict[str, Any]:
    versions = list(flow.versions.order_by("-version").values("id", "version", "created_at")[:200])
    counts = dict(
        _plays(request).filter(flow=flow).order_by().values_list("flow_version__version").annotate(n=Count("id"))
    )
    for v in versions:
        v["plays"] = counts.get(v["version"], 0)
    try:
        wanted = int(request.GET.get("version") or flow.version)
    except ValueError:
        wanted = flow.version
    version = flow.versions.filter(version=wanted).first() or flow.versions.filter(version=flow.version).first()
    definition = version.definition if version else {}
    since = timezone.now() - timedelta(hours=24)
    day = dict(
        _plays(request).filter(flow=flow, created_at__gte=since).order_by().values_list("state").annotate(n=Count("id"))
    )
    return {
        "flow": flow,
        "nav": "flows",
        "version": version,
        "versions": versions,
        "steps": _steps_of(definition),
        "flow_filters_json": json.dumps(redact(definition.get("filters")), indent=2) if definition.get("filters") else "",
        "day_counts": [(s, day[s]) for s in State.values if day.get(s)],
        "day_total": sum(day.values()),
        "may_run": request.user.has_perm(RUN_FLOW),
        "form": form or {"args": "{}", "key": "", "run_at": "", "tz": ""},
        # A flow offered as an MCP tool declares the JSON Schema of its args: a guide for the form.
        "args_schema": json.dumps(flow.tool.get("inputSchema"), indent=2) if isinstance(flow.tool, dict)
        and flow.tool.get("inputSchema") else "",
    }


@login_required
@permission_required(VIEW_FLOW, raise_exception=True)
def flow_detail(request: HttpRequest, flow_key: str) -> HttpResponse:
    flow = _flow_or_404(request, flow_key)
    return render(request, "flowplay/flow_detail.html", _context(request, flow))


def _run_at(text: str, tz_name: str) -> datetime | None:
    """``2024-01-15T10:00`` from a datetime-local field, in the browser's zone."""
    if not text.strip():
        return None
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        try:
            zone = ZoneInfo(tz_name) if tz_name else UTC
        except (ZoneInfoNotFoundError, ValueError):
            zone = UTC
        moment = moment.replace(tzinfo=zone)
    return moment


@login_required
@require_POST
@permission_required(RUN_FLOW, raise_exception=True)
def flow_run(request: HttpRequest, flow_key: str) -> HttpResponse:
    flow = _flow_or_404(request, flow_key)
    form = {
        "args": request.POST.get("args", "").strip() or "{}",
        "key": request.POST.get("idempotency_key", "").strip(),
        "run_at": request.POST.get("run_at", "").strip(),
        "tz": request.POST.get("tz", "").strip(),
    }
    errors: dict[str, str] = {}
    limit = settings.FLOWPLAY["MAX_ARGS_BYTES"]
    args: Any = {}
    try:
        args = json.loads(form["args"])
        if not isinstance(args, dict):
            errors["args"] = "The args must be a JSON object, such as {\"invoiceId\": \"INV-001\"}."
        elif len(json.dumps(args, separators=(",", ":"))) > limit:
            errors["args"] = f"The args are larger than {limit} bytes."
    except ValueError as exc:
        errors["args"] = f"This is not valid JSON: {exc}."
    run_at = None
    try:
        run_at = _run_at(form["run_at"], form["tz"])
    except ValueError:
        errors["run_at"] = "Not a date and time."
    if len(form["key"]) > 255:
        errors["key"] = "At most 255 characters."
    if not flow.enabled:
        errors["flow"] = "This flow is disabled: enable it before running it."
    if not errors:
        try:
            play, created = Play.trigger(
                flow, args, idempotency_key=form["key"] or None, run_at=run_at, user=request.user,
                audit=lambda play: audit_entry(request.user, "play.triggered", play, flowId=flow.id, source="page"),
            )
        except IdempotencyConflict as exc:
            errors["key"] = f"This key was used by play {exc.play.id} with different args."
        else:
            if created:
                messages.success(request, f"Play {play.id} created ({play.state}).")
            else:
                messages.info(request, f"The key {form['key']!r} already belongs to this play: it was not run again.")
            return redirect("pages:play-detail", play_id=play.pk)
    context = _context(request, flow, form)
    context["errors"] = errors
    return render(request, "flowplay/flow_detail.html", context, status=400)
