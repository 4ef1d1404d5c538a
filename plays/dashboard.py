"""The dashboard: a company's (or one flow's) plays over the last minutes or hours.

- **Ended per bucket, by state**: plays whose ``completed_at`` falls in each bucket (one
  minute up to an hour's range; 5 and 15 minutes for 6 and 24 hours), one series a state.
- **Failure rate**: FAIL among the plays that ended in the range.
- **p50 / p95 duration** of those plays (started → completed), for the range and per bucket.
- **Queue depth**: plays ready to run that no worker holds (RUN without a runner, DEFERRED
  whose run time has passed); **running**; **waiting approvals** (WAIT plays).
- For the company: the same per flow, worst failure rate first.

``/dashboard/data/`` answers the same as JSON; static/flowplay/dashboard.js draws it with
the vendored uPlot and asks again every few seconds, and samples queue depth and waiting
approvals into a chart of their own while the page is open.

The scan is bounded: plays created up to a day before the range began (the company's or
the flow's created-at index), at most ``MAX_ROWS`` of them for the durations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone

from flows.models import Flow
from tenancy.permissions import VIEW_PLAY

from .models import TERMINAL, Play, State, duration_ms
from .pages import _flow_or_404, fmt_ms

# Range (minutes) → bucket (minutes).
RANGES = {15: 1, 60: 1, 360: 5, 1440: 15}
DEFAULT_RANGE = 60
MAX_ROWS = 50_000
ENDED_STATES = [State.DONE, State.FAIL, State.SKIP, State.FILTERED]


def _percentile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))]


def stats(company_id: str, flow: Flow | None, minutes: int, now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, as JSON-ready values."""
    now = now or timezone.now()
    bucket = RANGES.get(minutes, 1)
    # Buckets aligned to the bucket size, the last one holding `now`.
    step = bucket * 60
    end_ts = (int(now.timestamp()) // step + 1) * step
    count = minutes // bucket
    start_ts = end_ts - count * step
    start = datetime.fromtimestamp(start_ts, tz=now.tzinfo)
    times = [start_ts + i * step for i in range(count)]

    plays = Play.objects.filter(company_id=company_id)
    if flow is not None:
        plays = plays.filter(flow=flow)
    ended = (
        plays.filter(created_at__gte=start - timedelta(days=1), state__in=ENDED_STATES, completed_at__gte=start)
        .order_by()
        .values_list("flow_id", "state", "started_at", "completed_at")[:MAX_ROWS]
    )
    series: dict[str, list[int]] = {s: [0] * count for s in ENDED_STATES}
    durations: list[list[int]] = [[] for _ in range(count)]
    all_durations: list[int] = []
    per_flow: dict[str, dict[str, Any]] = defaultdict(lambda: {"ended": 0, "failed": 0, "durations": []})
    rows = 0
    for flow_id, state, started, completed in ended:
        rows += 1
        i = (int(completed.timestamp()) - start_ts) // step
        if not 0 <= i < count:
            continue
        series[state][i] += 1
        entry = per_flow[flow_id]
        entry["ended"] += 1
        entry["failed"] += state == State.FAIL
        d = duration_ms(started, completed)
        if d is not None:
            durations[i].append(d)
            all_durations.append(d)
            entry["durations"].append(d)
    total_ended = sum(sum(v) for v in series.values())
    failed = sum(series[State.FAIL])
    now_counts = dict(
        plays.filter(state__in=[State.RUN, State.WAIT, State.DEFERRED, State.ON_HOLD, State.NEW])
        .order_by()
        .values_list("state")
        .annotate(n=Count("id"))
    )
    queue = plays.filter(
        Q(state=State.RUN, runner="") | Q(state=State.DEFERRED, run_at__lte=now) | Q(state=State.DEFERRED, run_at=None)
    ).count()
    created = plays.filter(created_at__gte=start).count()
    flows: list[dict[str, Any]] = []
    if flow is None and per_flow:
        names = dict(Flow.objects.filter(pk__in=list(per_flow)).values_list("id", "name"))
        keys = dict(Flow.objects.filter(pk__in=list(per_flow)).values_list("id", "permanent_id"))
        for flow_id, entry in per_flow.items():
            flows.append({
                "id": flow_id,
                "name": names.get(flow_id, flow_id),
                "permanentId": keys.get(flow_id, flow_id),
                "ended": entry["ended"],
                "failed": entry["failed"],
                "failureRate": entry["failed"] / entry["ended"] if entry["ended"] else 0,
                "p95": _percentile(entry["durations"], 0.95),
                "p95Text": fmt_ms(_percentile(entry["durations"], 0.95)),
            })
        flows.sort(key=lambda f: (-f["failureRate"], -f["failed"], -f["ended"], f["name"]))
    p50, p95 = _percentile(all_durations, 0.5), _percentile(all_durations, 0.95)
    return {
        "now": now.isoformat(),
        "minutes": minutes,
        "bucketMinutes": bucket,
        "times": times,
        "ended": series,
        "p50": [_percentile(d, 0.5) for d in durations],
        "p95": [_percentile(d, 0.95) for d in durations],
        "totals": {
            "created": created,
            "ended": total_ended,
            "failed": failed,
            "failureRate": failed / total_ended if total_ended else 0,
            "p50": p50,
            "p95": p95,
            "p50Text": fmt_ms(p50) or "—",
            "p95Text": fmt_ms(p95) or "—",
            "queueDepth": queue,
            "running": now_counts.get(State.RUN, 0),
            "waitingApprovals": now_counts.get(State.WAIT, 0),
            "deferred": now_counts.get(State.DEFERRED, 0),
            "onHold": now_counts.get(State.ON_HOLD, 0),
        },
        "flows": flows[:50],
        "sampled": rows >= MAX_ROWS,
    }


def _range(request: HttpRequest) -> int:
    try:
        minutes = int(request.GET.get("minutes", DEFAULT_RANGE))
    except ValueError:
        return DEFAULT_RANGE
    return minutes if minutes in RANGES else DEFAULT_RANGE


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def dashboard(request: HttpRequest, flow_key: str | None = None) -> HttpResponse:
    flow = _flow_or_404(request, flow_key) if flow_key else None
    minutes = _range(request)
    data = stats(request.user.company_id, flow, minutes)
    context = {
        "flow": flow,
        "nav": "dashboard" if flow is None else "flows",
        "data": data,
        "totals": data["totals"],
        "failure_pct": f"{100 * data['totals']['failureRate']:.1f}",
        "minutes": minutes,
        "ranges": [(m, _range_label(m)) for m in RANGES],
        "range_label": _range_label(minutes),
        "config": {
            "url": "/dashboard/data/",
            "flowId": flow.pk if flow else None,
            "minutes": minutes,
            "data": data,
            "terminal": sorted(TERMINAL),
        },
    }
    return render(request, "flowplay/dashboard.html", context)


def _range_label(minutes: int) -> str:
    return f"{minutes} minutes" if minutes < 60 else f"{minutes // 60} hour{'s' if minutes > 60 else ''}"


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def dashboard_data(request: HttpRequest) -> HttpResponse:
    flow = None
    flow_id = request.GET.get("flowId")
    if flow_id:
        try:
            flow = _flow_or_404(request, flow_id)
        except Http404:
            return JsonResponse({"error": "NOT_FOUND", "message": "No such flow", "statusCode": 404}, status=404)
    response = JsonResponse(stats(request.user.company_id, flow, _range(request)))
    response["Cache-Control"] = "private, no-store"
    return response
