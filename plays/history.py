"""The play history pages: all plays, and one flow's plays, filtered, paged and live.

The access rule is the API's: a user sees only their company's plays, and the filters are
the API's ``PlayFilter``, so a bookmarked ``?state=FAIL&page=0&size=25`` selects the same
plays as ``GET /api/plays?state=FAIL&page=0&size=25``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required, permission_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render

from flows.api import ApiError, PagePagination
from flows.models import Flow
from flows.permissions import VIEW_PLAY

from .models import Play, State, TriggerKind
from .pages import _flow_or_404, _head_cursor, _moment, fmt_ms, summarize
from .views import PlayFilter, PlayViewSet

# Query parameters of a history page, in the order of its canonical (bookmarkable) URL.
HISTORY_PARAMS = ("state", "from", "to", "idempotencyKey", "flowId", "trigger", "page", "size")


def _canonical_query(query: Any) -> dict[str, str]:
    """The history query in the API's form: one comma-separated ``state``, no empty values."""
    params: dict[str, str] = {}
    for name in HISTORY_PARAMS:
        values = [v.strip() for v in query.getlist(name) if v.strip()]
        if not values:
            continue
        params[name] = ",".join(values) if name == "state" else values[-1]
    return params


def _encode(params: dict[str, str]) -> str:
    # Commas and colons stay readable: state=FAIL,RUN&from=2024-01-15T10:00:00Z.
    return urlencode(params, safe=",:")


class _Query:
    """What ``PagePagination.parse`` reads from a DRF request."""

    def __init__(self, query: Any):
        self.query_params = query


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
    since = _head_cursor(request.user.company_id)
    errors: list[str] = []
    try:
        page, size = PagePagination.parse(_Query(request.GET))
    except ApiError as exc:
        errors += [f"{name}: {'; '.join(msgs)}" for name, msgs in (exc.details or {}).items()]
        page, size = 0, PagePagination.default_size

    view = PlayViewSet(request=request, kwargs={"flow_id": flow.pk} if flow else {}, format_kwarg=None, action="list")
    try:
        queryset = view.get_queryset().select_related("flow")
    except ApiError:  # the flow was deleted since _flow_or_404
        raise Http404("No such flow") from None
    filterset = PlayFilter(request.GET, queryset=queryset, request=request)
    plays: list[Play] = []
    total = 0
    if not filterset.is_valid():
        for name, msgs in filterset.errors.items():
            errors.append(f"{name}: {'; '.join(msgs)}")
    if not errors:
        qs = filterset.qs
        total = qs.count()
        plays = list(qs[page * size : page * size + size])
    for play in plays:
        play.args_summary = summarize(play.args)
        play.duration_text = fmt_ms(play.duration)
        # Started and completed show the time only when it is the day the play was created.
        day = play.created_at.date()
        play.started_text = _moment(play.started_at, day)
        play.completed_text = _moment(play.completed_at, day)
    pages = (total + size - 1) // size

    def page_url(n: int) -> str:
        return f"{request.path}?{_encode({**params, 'page': str(n), 'size': str(size)})}"

    selected = set(params.get("state", "").upper().split(",")) - {""}
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
        "first_row": page * size + 1 if plays else 0,
        "last_row": page * size + len(plays),
        "states": [(s, s in selected) for s in State.values],
        "params": params,
        "filtered": bool(set(params) - {"page", "size"}),
        "errors": errors,
        "flows": list(Flow.objects.alive().for_company(request.user.company_id).order_by("name").values("id", "name"))
        if flow is None
        else [],
        "sizes": [10, 25, 50, 100],
        "triggers": TriggerKind.values,
        # A flow's schedules (the triggers app's, through the reverse relation): spec, next fire, last play.
        "schedules": list(flow.schedules.select_related("last_play").order_by("created_at", "id")) if flow else [],
        "live": {"flowId": flow.pk if flow else None, "since": since, "page": page},
        "api_url": (f"/api/flows/{flow.pk}/plays" if flow else "/api/plays") + (f"?{query}" if query else ""),
    }
    return render(request, "flowplay/play_history.html", context, status=400 if errors else 200)
