"""The play history pages: all plays, and one flow's plays, filtered, sorted, paged and live.

The access rule is the API's: a user sees only their company's plays. The filters are the
API's ``PlayFilter`` (a django-filter FilterSet, used directly on the company's queryset),
so a bookmarked ``?state=FAIL&page=0&size=25`` selects the same plays as
``GET /api/plays?state=FAIL&page=0&size=25``. The pages add a few parameters of their own
(``PAGE_PARAMS``: search, "not yet retried", sort), which the "as JSON" link leaves out.

``filtered_plays`` is shared by the page, the live notice's ``/plays/match/`` and the bulk
actions' "all N matching this filter", so all three select the same plays.
"""

from __future__ import annotations

import math
from datetime import datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import DurationField, Exists, ExpressionWrapper, F, OuterRef, Q, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse, QueryDict
from django.shortcuts import render
from django.utils import timezone

from flows.api import ApiError, PagePagination
from flows.models import Flow
from flows.permissions import VIEW_PLAY

from .bulk import Action, not_retried
from .models import Play, State, TriggerKind
from .pages import _flow_or_404, _head_cursor, _may_operate, fmt_ms, summarize
from .views import PlayFilter

# The API's query parameters, in the order of the canonical (bookmarkable) URL ...
API_PARAMS = ("state", "from", "to", "idempotencyKey", "flowId", "trigger")
# ... and the pages' own: search by id or key prefix, "not yet retried", sort.
PAGE_PARAMS = ("q", "retried", "sort")
HISTORY_PARAMS = (*API_PARAMS, *PAGE_PARAMS, "page", "size")
SORTS = {
    "-created": ("Newest first", ("-created_at", "-id")),
    "created": ("Oldest first", ("created_at", "id")),
    "-duration": ("Longest first", None),
    "duration": ("Shortest first", None),
}
RETRIED = {"no": "Not yet retried", "yes": "Retried"}
# States in which a play has started and not ended: its row shows the time elapsed so far.
RUNNING = {State.RUN, State.WAIT, State.ON_HOLD}


def _canonical_query(query: Any) -> dict[str, str]:
    """The history query in the API's form: one comma-separated ``state``, no empty values."""
    params: dict[str, str] = {}
    for name in HISTORY_PARAMS:
        values = [v.strip() for v in query.getlist(name) if v.strip()]
        if not values:
            continue
        params[name] = ",".join(values) if name == "state" else values[-1]
    if params.get("sort") == "-created":
        del params["sort"]  # the default
    return params


def _encode(params: dict[str, str]) -> str:
    # Commas and colons stay readable: state=FAIL,RUN&from=2024-01-15T10:00:00Z.
    return urlencode(params, safe=",:")


class _Query:
    """What ``PagePagination.parse`` reads from a DRF request."""

    def __init__(self, query: Any):
        self.query_params = query


def resolve_flow(company_id: str, key: str | None) -> Flow | None:
    """The flow a ``flowId`` names, by id or permanentId (as the API's filter reads it)."""
    if not key:
        return None
    return Flow.objects.for_company(company_id).filter(Q(pk=key) | Q(permanent_id=key, deleted_at__isnull=True)).first()


def filtered_plays(request: HttpRequest, flow: Flow | None, query: QueryDict) -> tuple[Any, list[str]]:
    """The company's plays that ``query`` selects, in the order asked for, and the errors in it.

    The FilterSet runs on the company's queryset directly: no DRF view or request is built.
    """
    qs = Play.objects.for_company(request.user.company_id)
    if flow is not None:
        qs = qs.filter(flow=flow)
    errors: list[str] = []
    filterset = PlayFilter(query, queryset=qs, request=request)
    if not filterset.is_valid():
        errors += [f"{name}: {'; '.join(msgs)}" for name, msgs in filterset.errors.items()]
        return Play.objects.none(), errors
    qs = filterset.qs
    search = (query.get("q") or "").strip()
    if search:
        # A play id exactly, or the start of an idempotency key (plays_play_company_key).
        qs = qs.filter(Q(pk=search) | Q(idempotency_key__startswith=search))
    retried = query.get("retried") or ""
    if retried == "no":
        qs = not_retried(qs)
    elif retried == "yes":
        qs = qs.filter(Exists(Play.objects.filter(retry_of=OuterRef("pk"))))
    elif retried:
        errors.append("retried: must be yes or no")
    sort = query.get("sort") or "-created"
    if sort not in SORTS:
        errors.append(f"sort: must be one of {', '.join(SORTS)}")
        sort = "-created"
    order = SORTS[sort][1]
    if order is None:
        # Durations are not indexed: the sort reads every play the other filters leave.
        qs = qs.annotate(run_time=ExpressionWrapper(F("completed_at") - F("started_at"), output_field=DurationField()))
        key = F("run_time").desc(nulls_last=True) if sort.startswith("-") else F("run_time").asc(nulls_last=True)
        qs = qs.order_by(key, "-created_at", "-id")
    else:
        qs = qs.order_by(*order)
    return (Play.objects.none() if errors else qs), errors


def quick_ranges(now: datetime) -> list[tuple[str, str, dict[str, str]]]:
    """``(key, label, {from, to})`` in UTC; history.js redraws them in the browser's time zone."""
    today = now.date()
    yesterday = today - timedelta(days=1)

    def stamp(moment: datetime) -> str:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    return [
        ("1h", "Last hour", {"from": stamp(now - timedelta(hours=1))}),
        ("24h", "Last 24 h", {"from": stamp(now - timedelta(hours=24))}),
        ("today", "Today", {"from": today.isoformat(), "to": today.isoformat()}),
        ("yesterday", "Yesterday", {"from": yesterday.isoformat(), "to": yesterday.isoformat()}),
        ("7d", "Last 7 days", {"from": stamp(datetime.combine(today - timedelta(days=6), time.min, tzinfo=now.tzinfo))}),
    ]


def page_numbers(page: int, pages: int) -> list[int | None]:
    """``[0, None, 4, 5, 6, 7, 8, None, 81]``: the first, the last and two either side (None: a gap)."""
    shown = sorted({0, pages - 1, *range(max(0, page - 2), min(pages, page + 3))})
    out: list[int | None] = []
    for n in shown:
        if out and n - (out[-1] or 0) > 1:
            out.append(None)
        out.append(n)
    return out


# --- History --------------------------------------------------------------------------


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def flow_history(request: HttpRequest, flow_key: str) -> HttpResponse:
    return _history(request, _flow_or_404(request, flow_key))


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def play_history(request: HttpRequest) -> HttpResponse:
    return _history(request, None)


def _history(request: HttpRequest, flow: Flow | None) -> HttpResponse:
    params = _canonical_query(request.GET)
    query = _encode(params)
    if query != request.META.get("QUERY_STRING", ""):
        # The filter form sends state=FAIL&state=RUN and empty fields: redirect to the API's
        # form of the query (state=FAIL,RUN), which is the URL people bookmark and share.
        return HttpResponseRedirect(f"{request.path}?{query}" if query else request.path)
    company_id = request.user.company_id
    since = _head_cursor(company_id)
    errors: list[str] = []
    try:
        page, size = PagePagination.parse(_Query(request.GET))
    except ApiError as exc:
        errors += [f"{name}: {'; '.join(msgs)}" for name, msgs in (exc.details or {}).items()]
        page, size = 0, PagePagination.default_size

    qs, filter_errors = filtered_plays(request, flow, request.GET)
    errors += filter_errors
    plays: list[Play] = []
    total = 0
    if not errors:
        total = qs.count()
        pages = math.ceil(total / size)
        if page > 0 and page >= pages:
            # Past the end (an old bookmark, ?page=999): the last page there is.
            last = {**params, "page": str(max(0, pages - 1)), "size": str(size)}
            return HttpResponseRedirect(f"{request.path}?{_encode(last)}")
        latest_retry = Play.objects.filter(retry_of=OuterRef("pk")).order_by("-created_at", "-id")
        plays = list(
            qs.select_related("flow").annotate(retried_as=Subquery(latest_retry.values("id")[:1]))[
                page * size : page * size + size
            ]
        )
    now = timezone.now()
    for play in plays:
        play.args_summary = summarize(play.args)
        play.duration_text = fmt_ms(play.duration)
        play.running = play.state in RUNNING and play.started_at is not None and play.completed_at is None
        if play.running:
            play.duration_text = fmt_ms(int((now - play.started_at).total_seconds() * 1000))
        error = play.error if isinstance(play.error, dict) else None
        play.error_code = (error or {}).get("code", "")
        play.error_ref = (error or {}).get("ref") or ""
        message = str((error or {}).get("message") or "")
        play.error_text = message if len(message) <= 120 else message[:119] + "…"
    pages = math.ceil(total / size)

    def page_url(n: int, **changes: str) -> str:
        merged = {**params, **changes, "page": str(n), "size": str(size)}
        return f"{request.path}?{_encode({k: v for k, v in merged.items() if v})}"

    selected = set(params.get("state", "").upper().split(",")) - {""}
    flows = list(Flow.objects.alive().for_company(company_id).order_by("name").values("id", "name", "permanent_id"))
    filter_flow = resolve_flow(company_id, params.get("flowId")) if flow is None else None
    if filter_flow is not None and all(f["id"] != filter_flow.pk for f in flows):
        flows.append({"id": filter_flow.pk, "name": f"{filter_flow.name} (deleted)", "permanent_id": filter_flow.permanent_id})
    live_flow = flow or filter_flow
    filters_active = sorted(set(params) - {"page", "size", "sort"})
    api_params = {k: v for k, v in params.items() if k not in PAGE_PARAMS}
    may_operate = _may_operate(request.user)
    range_from, range_to = params.get("from", ""), params.get("to", "")
    ranges = [
        {"key": key, "label": label, "url": page_url(0, **{"from": "", "to": "", **bounds}),
         "current": bounds.get("from", "")[:13] == range_from[:13] and bounds.get("to", "") == range_to and bool(range_from)}
        for key, label, bounds in quick_ranges(now.replace(microsecond=0))
    ]
    context = {
        "flow": flow,
        "plays": plays,
        "total": total,
        "page": page,
        "size": size,
        "pages": pages,
        "nav": "history" if flow is None else "flows",
        "first_page_url": page_url(0),
        "prev_url": page_url(page - 1) if page > 0 else None,
        "next_url": page_url(page + 1) if page + 1 < pages else None,
        "page_links": [(n, page_url(n)) if n is not None else (None, None) for n in page_numbers(page, pages)],
        "first_row": page * size + 1 if plays else 0,
        "last_row": page * size + len(plays),
        "states": [(s, s in selected) for s in State.values],
        "params": params,
        "filtered": bool(filters_active),
        "filter_count": len(filters_active),
        "errors": errors,
        "flows": flows if flow is None else [],
        "selected_flow_id": filter_flow.pk if filter_flow else "",
        "sizes": [10, 25, 50, 100],
        "triggers": TriggerKind.values,
        "sorts": [(key, label) for key, (label, _) in SORTS.items()],
        "sort": params.get("sort", "-created"),
        "retried_choices": list(RETRIED.items()),
        "ranges": ranges,
        "may_operate": may_operate,
        "bulk_actions": Action.choices,
        "query": query,
        # A flow's schedules (the triggers app's, through the reverse relation): spec, next fire, last play.
        "schedules": list(flow.schedules.select_related("last_play").order_by("created_at", "id")) if flow else [],
        "live": {
            "flowId": live_flow.pk if live_flow else None,
            "since": since,
            "page": page,
            "filtered": bool(set(params) - {"page", "size", "sort"}),
            "match": f"{request.path.rstrip('/')}/match/" if flow else "/plays/match/",
            "query": query,
            "serverNow": now.isoformat().replace("+00:00", "Z"),
        },
        "api_url": (f"/api/flows/{flow.pk}/plays" if flow else "/api/plays")
        + (f"?{_encode(api_params)}" if api_params else ""),
    }
    return render(request, "flowplay/play_history.html", context, status=400 if errors else 200)


# --- Which plays match (the live notice) ----------------------------------------------------

# One request checks at most this many ids (the page batches what the WebSocket brings).
MAX_MATCH_IDS = 200


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def flow_match(request: HttpRequest, flow_key: str) -> HttpResponse:
    return _match(request, _flow_or_404(request, flow_key))


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def play_match(request: HttpRequest) -> HttpResponse:
    return _match(request, None)


def _match(request: HttpRequest, flow: Flow | None) -> JsonResponse:
    """``GET …/match/?<the list's query>&ids=a,b`` → ``{"match": [the ids the list's filters select]}``."""
    ids = [i for i in (request.GET.get("ids") or "").split(",") if i][:MAX_MATCH_IDS]
    qs, errors = filtered_plays(request, flow, request.GET)
    if errors:
        return JsonResponse({"error": "VALIDATION_ERROR", "details": errors}, status=400)
    if not ids:
        return JsonResponse({"match": []})
    found = set(qs.filter(pk__in=ids).order_by().values_list("id", flat=True))
    return JsonResponse({"match": [i for i in ids if i in found]})


def plays_for_query(request: HttpRequest, flow_key: str, query: str, limit: int) -> tuple[list[str], list[str]]:
    """The ids (at most ``limit``) a history query string selects, for "all N matching this filter"."""
    flow = _flow_or_404(request, flow_key) if flow_key else None
    qs, errors = filtered_plays(request, flow, QueryDict(query))
    if errors:
        return [], errors
    return list(qs.values_list("id", flat=True)[:limit]), []


__all__ = ["filtered_plays", "flow_history", "play_history", "flow_match", "play_match", "plays_for_query", "Http404"]
