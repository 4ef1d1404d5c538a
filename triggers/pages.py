"""Server-rendered channel pages: the company's channels, and one channel with its routes
and request log (newest first), for logged-in people. Another company's channel is a 404."""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import Count, Max
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from flows.models import Flow

from .models import Channel, ChannelRequest

PAGE_SIZE = 50


def _channel_or_404(request: HttpRequest, key: str) -> Channel:
    channel = (
        Channel.objects.for_company(request.user.company_id).filter(pk=key).first()
        or Channel.objects.for_company(request.user.company_id).filter(slug=key).first()
    )
    if channel is None:
        raise Http404("No such channel")
    return channel


@login_required
def channel_list(request: HttpRequest) -> HttpResponse:
    channels = (
        Channel.objects.for_company(request.user.company_id)
        .annotate(route_count=Count("routes", distinct=True), last_request_at=Max("requests__received_at"))
        .order_by("name", "id")
    )
    return render(request, "flowplay/channel_list.html", {"channels": channels, "nav": "channels"})


@login_required
def channel_detail(request: HttpRequest, channel_key: str) -> HttpResponse:
    channel = _channel_or_404(request, channel_key)
    routes = list(channel.routes.order_by("path", "method"))
    names = dict(
        Flow.objects.filter(
            company_id=channel.company_id, pk__in={pk for r in routes for pk in r.flow_ids}
        ).values_list("pk", "name")
    )
    for route in routes:
        route.flow_names = [(pk, names.get(pk, pk)) for pk in route.flow_ids]
    try:
        page = max(0, int(request.GET.get("page", "0")))
    except ValueError:
        page = 0
    entries = list(
        ChannelRequest.objects.filter(channel=channel).order_by("-received_at", "-id")[
            page * PAGE_SIZE : (page + 1) * PAGE_SIZE + 1
        ]
    )
    more = len(entries) > PAGE_SIZE
    entries = entries[:PAGE_SIZE]
    for entry in entries:
        entry.body_text = _pretty(entry.body)
        entry.headers_text = _pretty(entry.headers)
    return render(
        request,
        "flowplay/channel_detail.html",
        {
            "channel": channel,
            "routes": routes,
            "entries": entries,
            "page": page,
            "more": more,
            "nav": "channels",
        },
    )


def _pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return text if len(text) <= 20_000 else text[:20_000] + "\n…"
