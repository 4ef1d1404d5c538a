"""The approval inbox: every play of the company waiting on an approval, across flows.

Each row approves or declines its waiting step with a note in one click (the model's
``Play.decide``, the same audit entry as the API's approve); ticked rows go to the bulk
actions' dry run (plays/bulk_pages.py). ``waiting_approvals`` is a template context
processor: the header of every page shows the count.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import OuterRef, Subquery
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.functional import SimpleLazyObject
from django.views.decorators.http import require_POST

from flows.audit import record
from flows.permissions import VIEW_PLAY

from .models import Decision, InvalidState, Layer, LayerState, Play, State
from .pages import _may_operate, summarize

# The inbox shows the longest-waiting plays first, this many at a time.
INBOX_ROWS = 200


def waiting_count(company_id: str) -> int:
    # plays_play_company_state: (company, state, …).
    return Play.objects.filter(company_id=company_id, state=State.WAIT).count()


def waiting_approvals(request: HttpRequest) -> dict[str, Any]:
    """Context processor: ``waiting_approvals``, counted only if a template reads it."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not getattr(user, "company_id", None):
        return {}
    return {"waiting_approvals": SimpleLazyObject(lambda: waiting_count(user.company_id))}


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def inbox(request: HttpRequest) -> HttpResponse:
    waiting = Layer.objects.filter(play=OuterRef("pk"), state=LayerState.WAIT).order_by("index", "iteration")
    plays = list(
        Play.objects.for_company(request.user.company_id)
        .filter(state=State.WAIT)
        .select_related("flow")
        .annotate(
            layer_id=Subquery(waiting.values("id")[:1]),
            layer_ref=Subquery(waiting.values("ref")[:1]),
            waiting_since=Subquery(waiting.values("started_at")[:1]),
        )
        .order_by("updated_at", "id")[:INBOX_ROWS]
    )
    steps: dict[str, str] = {}
    for play in plays:
        play.args_summary = summarize(play.args)
        play.waiting_since = play.waiting_since or play.updated_at
        play.step_name = steps.get(play.layer_ref) or ""
    total = len(plays) if len(plays) < INBOX_ROWS else Play.objects.for_company(request.user.company_id).filter(
        state=State.WAIT).count()
    context = {
        "nav": "inbox",
        "plays": plays,
        "total": total,
        "may_operate": _may_operate(request.user),
        "decisions": Decision,
    }
    return render(request, "flowplay/inbox.html", context)


class DecideForm(forms.Form):
    play_id = forms.CharField(max_length=24)
    layer_id = forms.CharField(max_length=24)
    decision = forms.ChoiceField(choices=Decision.choices)
    note = forms.CharField(max_length=2000, required=False)


@login_required
@require_POST
def decide(request: HttpRequest) -> HttpResponse:
    """One row's Approve or Decline: decide, record, and back to the inbox."""
    if not _may_operate(request.user):
        raise Http404("No such action")
    form = DecideForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The decision was not understood.")
        return redirect("pages:inbox")
    data = form.cleaned_data
    play = get_object_or_404(Play.objects.for_company(request.user.company_id), pk=data["play_id"])
    try:
        play.decide(data["layer_id"], data["decision"], request.user, data["note"])
    except InvalidState as exc:
        messages.error(request, exc.message)
    else:
        record(request.user, f"play.{data['decision']}", play, layerId=data["layer_id"], source="inbox")
        play.refresh_from_db(fields=["state"])
        messages.success(request, f"Play {play.pk}: step {data['decision']}, play is now {play.state}.")
    return redirect("pages:inbox")


__all__ = ["inbox", "decide", "waiting_approvals", "waiting_count"]
