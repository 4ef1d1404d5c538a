"""The bulk actions' pages: the dry run, the confirmation, the job's progress and result.

The history pages and the approval inbox post a selection here: ``scope=selected`` with the
ticked ``play`` ids, or ``scope=all`` with the list's ``query`` (and ``flow``), meaning every
play that query selects (plays/history.py ``filtered_plays``, at most ``bulk.MAX_PLAYS``).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required, permission_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from flows.permissions import VIEW_PLAY

from . import bulk
from .bulk import Action, BulkJob, JobState
from .history import plays_for_query
from .pages import _may_operate


class IdsField(forms.Field):
    """Play ids as posted (any string; the job's company scope decides what they name)."""

    widget = forms.MultipleHiddenInput

    def to_python(self, value: Any) -> list[str]:
        return [v for v in (value or []) if isinstance(v, str) and 0 < len(v) <= 24]


class SelectionForm(forms.Form):
    action = forms.ChoiceField(choices=Action.choices)
    scope = forms.ChoiceField(choices=[("selected", "selected"), ("all", "all")])
    play = IdsField(required=False)
    query = forms.CharField(required=False, max_length=4000)
    flow = forms.CharField(required=False, max_length=200)
    back = forms.CharField(required=False, max_length=4000)
    note = forms.CharField(required=False, max_length=2000, widget=forms.Textarea)

    def clean_back(self) -> str:
        back = self.cleaned_data.get("back") or ""
        # Only a path on this site (no //host, no scheme): it is put into links.
        return back if back.startswith("/") and not back.startswith("//") else "/plays/"


def _selection(request: HttpRequest, form: SelectionForm) -> tuple[list[str], list[str]]:
    data = form.cleaned_data
    if data["scope"] == "all":
        ids, errors = plays_for_query(request, data.get("flow") or "", data.get("query") or "", bulk.MAX_PLAYS + 1)
        if len(ids) > bulk.MAX_PLAYS:
            errors.append(f"More than {bulk.MAX_PLAYS} plays match: narrow the filter (e.g. a shorter date range).")
        return ids, errors
    ids = data["play"]
    if not ids:
        return [], ["Select at least one play, or choose “all matching this filter”."]
    if len(ids) > bulk.MAX_PLAYS:
        return [], [f"At most {bulk.MAX_PLAYS} plays at once."]
    return ids, []


def _form_or_404(request: HttpRequest) -> SelectionForm:
    if not _may_operate(request.user):
        raise Http404("No such action")
    return SelectionForm(request.POST)


@login_required
@require_POST
def preview(request: HttpRequest) -> HttpResponse:
    """The dry run: what the action would do to each selected play, and a confirm button."""
    form = _form_or_404(request)
    if not form.is_valid():
        return render(request, "flowplay/bulk_preview.html", {"form_errors": form.errors, "nav": "history"}, status=400)
    ids, errors = _selection(request, form)
    return render_preview(request, form.cleaned_data["action"], ids, errors=errors, data=form.cleaned_data)


def render_preview(request: HttpRequest, action: str, ids: list[str], *, errors: list[str] | None = None,
                   data: dict[str, Any] | None = None, back: str = "/plays/") -> HttpResponse:
    """The dry run page for ``ids`` (also the admin's bulk actions' intermediate page)."""
    errors = list(errors or [])
    data = data or {"action": action, "scope": "selected", "query": "", "flow": "", "back": back, "note": ""}
    if len(ids) > bulk.MAX_PLAYS and not errors:
        errors.append(f"More than {bulk.MAX_PLAYS} plays selected: narrow the filter.")
    dry = bulk.classify(action, request.user.company_id, ids) if not errors else None
    context = {
        "nav": "history",
        "action": action,
        "action_label": Action(action).label,
        "data": data,
        "ids": ids if data["scope"] == "selected" else [],
        "dry": dry,
        "summary": bulk.summary(action, dry) if dry else "",
        "errors": errors,
        "needs_note": action in (Action.APPROVE, Action.DECLINE),
        "count": len(ids),
    }
    return render(request, "flowplay/bulk_preview.html", context, status=400 if errors else 200)


@login_required
@require_POST
def confirm(request: HttpRequest) -> HttpResponse:
    """Create the job for the selection (as it is now) and show its page."""
    form = _form_or_404(request)
    if not form.is_valid():
        return render(request, "flowplay/bulk_preview.html", {"form_errors": form.errors, "nav": "history"}, status=400)
    ids, errors = _selection(request, form)
    data = form.cleaned_data
    if errors:
        return render(request, "flowplay/bulk_preview.html",
                      {"errors": errors, "data": data, "nav": "history", "action_label": Action(data["action"]).label},
                      status=400)
    selection: dict[str, Any] = {"scope": data["scope"], "back": data["back"]}
    if data["scope"] == "all":
        selection.update(query=data.get("query") or "", flow=data.get("flow") or "")
    job = bulk.create(request.user, data["action"], ids, note=data.get("note") or "", selection=selection)
    return redirect("pages:bulk-job", job_id=job.pk)


def _job_json(job: BulkJob) -> dict[str, Any]:
    return {"id": job.pk, "state": job.state, "total": job.total, "processed": job.processed, "percent": job.percent}


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def job_page(request: HttpRequest, job_id: str) -> HttpResponse:
    job = get_object_or_404(BulkJob.objects.select_related("created_by"), pk=job_id, company_id=request.user.company_id)
    if request.GET.get("format") == "json":
        return JsonResponse(_job_json(job))
    items = list(job.items.select_related("new_play").order_by("id"))
    context = {
        "nav": "history",
        "job": job,
        "items": items,
        "counts": job.counts(),
        "finished": job.state == JobState.DONE,
        "progress": _job_json(job),
        "new_plays": [i.new_play_id for i in items if i.new_play_id],
        "may_resume": _may_operate(request.user) and job.state != JobState.DONE,
    }
    return render(request, "flowplay/bulk_job.html", context)


@login_required
@require_POST
def job_resume(request: HttpRequest, job_id: str) -> HttpResponse:
    """Send an unfinished job to a worker again (its broker message was lost, its worker died)."""
    if not _may_operate(request.user):
        raise Http404("No such action")
    job = get_object_or_404(BulkJob, pk=job_id, company_id=request.user.company_id)
    if job.state != JobState.DONE:
        job.enqueue()
    return redirect("pages:bulk-job", job_id=job.pk)


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = list(
        BulkJob.objects.filter(company_id=request.user.company_id).select_related("created_by").order_by("-created_at")[:50]
    )
    return render(request, "flowplay/bulk_jobs.html", {"jobs": jobs, "nav": "history"})


__all__ = ["preview", "confirm", "job_page", "job_list", "job_resume", "render_preview"]
