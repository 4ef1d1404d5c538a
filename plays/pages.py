"""Server-rendered pages: flows, play history and play detail, for logged-in people.

The access rule is the API's: a user sees only their company's objects; another company's
flow or play is a 404. The history pages take their rows from the API's own queryset
(``PlayViewSet.get_queryset``: company scope, newest first on the history indexes) and
filterset (``PlayFilter``), so a bookmarked ``?state=FAIL&page=0&size=25`` selects the same
plays as ``GET /api/plays?state=FAIL&page=0&size=25``. The operator buttons post to views
that call the same model verbs as the API's actions, and write the same audit entries.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required, permission_required
from django.contrib.auth.forms import AuthenticationForm
from django.db.models import Count, OuterRef, Subquery
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from flows.models import Flow
from flows.views import LoginThrottle
from tenancy.auth import authenticate_by_login
from tenancy.permissions import OPERATE_PLAY, VIEW_FLOW

from .models import (
    HOLDABLE,
    NON_TERMINAL,
    Decision,
    Event,
    InvalidState,
    Play,
    State,
    encode_cursor,
)
from .redaction import redact

# What a layer's out or error may show inline; the API has the whole value.
MAX_JSON_CHARS = 20_000

# Which play states each button is legal in (plays/models.py verbs).
ACTION_STATES: dict[str, frozenset[str]] = {
    "start": frozenset({State.NEW}),
    "hold": HOLDABLE,
    "resume": frozenset({State.ON_HOLD}),
    "cancel": NON_TERMINAL,
    "retry": frozenset({State.FAIL}),
}
ACTION_LABELS = {"start": "Start", "hold": "Hold", "resume": "Resume", "cancel": "Cancel", "retry": "Retry"}
# The model verb behind each button (a play created with start=false is begun, as by /start).
VERBS = {"start": "begin", "hold": "hold", "resume": "resume", "cancel": "cancel"}


# --- Login ----------------------------------------------------------------------------


class EmailAuthenticationForm(AuthenticationForm):
    """Django's login form, asking for the email the API's login takes (a username works too)."""

    username = forms.CharField(
        label="Email",
        max_length=254,
        widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"}),
    )
    error_messages = {
        **AuthenticationForm.error_messages,
        "invalid_login": "Wrong email or password.",
    }

    def clean(self) -> dict[str, Any]:
        # The same login as POST /api/auth/login (tenancy.auth.authenticate_by_login).
        login, password = self.cleaned_data.get("username"), self.cleaned_data.get("password")
        if login is not None and password:
            self.user_cache = authenticate_by_login(self.request, login, password)
            if self.user_cache is None:
                raise self.get_invalid_login_error()
            self.confirm_login_allowed(self.user_cache)
        return self.cleaned_data


class LoginPage(auth_views.LoginView):
    template_name = "flowplay/login.html"
    authentication_form = EmailAuthenticationForm
    redirect_authenticated_user = True

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        # The page shares the API login's attempt budget, so it is no way around its throttle.
        throttle = LoginThrottle()
        if not throttle.allow_request(request, self):
            form = self.get_form_class()(request, initial={"username": request.POST.get("username", "")})
            context = self.get_context_data(form=form)
            context["throttled"] = f"Too many login attempts. Try again in {math.ceil(throttle.wait() or 60)} seconds."
            return self.render_to_response(context, status=429)
        return super().post(request, *args, **kwargs)


class LogoutPage(auth_views.LogoutView):
    next_page = "pages:login"


# --- Helpers --------------------------------------------------------------------------


def _head_cursor(company_id: str) -> str:
    """The company's event stream position now, as a cursor.

    Read *before* the page's data: every event behind it is committed, so it is already
    reflected in what the page renders, and ``/api/ws?since=<it>`` brings the rest.
    """
    return encode_cursor(Event.objects.head(company_id))


def _plays(request: HttpRequest) -> Any:
    return Play.objects.for_company(request.user.company_id)


def _flow_or_404(request: HttpRequest, key: str) -> Flow:
    flow = Flow.objects.resolve(request.user.company_id, key)
    if flow is None:
        raise Http404("No such flow")
    return flow


def summarize(args: Any, limit: int = 80) -> str:
    """``invoiceId=INV-001, amount=1250`` for a history row; cut at ``limit`` characters."""
    if not args:
        return ""
    args = redact(args)
    if isinstance(args, dict):
        text = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}" for k, v in args.items())
    else:
        text = json.dumps(args, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_ms(ms: int | None) -> str:
    """``812 ms``, ``3.2 s``, ``4 min 05 s``, ``2 h 03 min`` (live.js formats the same way)."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _moment(moment: datetime | None, day: Any) -> str:
    if moment is None:
        return ""
    moment = timezone.localtime(moment)
    return moment.strftime("%H:%M:%S" if moment.date() == day else "%Y-%m-%d %H:%M:%S")


def pretty(value: Any) -> str:
    text = json.dumps(redact(value), indent=2, ensure_ascii=False, sort_keys=False, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n… ({len(text) - MAX_JSON_CHARS} more characters; the API returns the whole value)"
    return text


def _may_operate(user: Any) -> bool:
    # The API's and the admin's rule: the role's plays.operate_play (tenancy/permissions.py);
    # the play was already looked up within the user's company.
    return bool(user.is_authenticated and user.is_active and user.has_perm(OPERATE_PLAY))


# --- Flows ----------------------------------------------------------------------------


@login_required
@permission_required(VIEW_FLOW, raise_exception=True)
def flow_list(request: HttpRequest) -> HttpResponse:
    company_id = request.user.company_id
    last = Play.objects.filter(flow=OuterRef("pk")).order_by("-created_at", "-id")
    flows = list(
        Flow.objects.alive()
        .for_company(company_id)
        .annotate(
            last_play_id=Subquery(last.values("id")[:1]),
            last_play_state=Subquery(last.values("state")[:1]),
            last_play_at=Subquery(last.values("created_at")[:1]),
        )
        .order_by("category", "name")
    )
    since = timezone.now() - timedelta(hours=24)
    # One GROUP BY over the company's last day (plays_play_company_created), not one per flow.
    counts: dict[str, dict[str, int]] = {}
    rows = (
        _plays(request).filter(created_at__gte=since).order_by().values_list("flow_id", "state").annotate(n=Count("id"))
    )
    for flow_id, state, n in rows:
        counts.setdefault(flow_id, {})[state] = n
    for flow in flows:
        per_state = counts.get(flow.pk, {})
        flow.day_counts = [(state, per_state[state]) for state in State.values if per_state.get(state)]
        flow.day_total = sum(per_state.values())
    return render(request, "flowplay/flow_list.html", {"flows": flows, "since": since, "nav": "flows"})


# --- Play detail (the page itself is plays/play_page.py) -------------------------------


def _queue_warning(play: Play) -> dict[str, Any] | None:
    """A RUN play that no runner has taken, on a queue no live worker consumes (plays/workers.py)."""
    if play.state != State.RUN or play.runner:
        return None
    from .workers import live_seconds, queue_of, queue_warning

    warning = queue_warning(queue_of(play.definition))
    return {**warning, "seconds": live_seconds()} if warning else None


# --- Verbs ----------------------------------------------------------------------------


@login_required
@require_POST
def play_action(request: HttpRequest, play_id: str, verb: str) -> HttpResponse:
    """POST start/hold/resume/cancel/retry: the model verb, an audit entry, a message, back to the play."""
    play = get_object_or_404(_plays(request), pk=play_id)
    if verb not in ACTION_STATES or not _may_operate(request.user):
        raise Http404("No such action")
    try:
        if verb == "retry":
            new = play.retry(by=request.user, source="page")
            messages.success(request, f"Retry {new.id} created ({new.state}).")
            return redirect("pages:play-detail", play_id=new.pk)
        getattr(play, VERBS[verb])(by=request.user, source="page")
        play.refresh_from_db(fields=["state"])
        messages.success(request, f"{ACTION_LABELS[verb]}: play is now {play.state}.")
    except InvalidState as exc:
        messages.error(request, exc.message)
    return redirect("pages:play-detail", play_id=play.pk)


class DecisionForm(forms.Form):
    layer_id = forms.CharField(max_length=24)
    decision = forms.ChoiceField(choices=Decision.choices)
    note = forms.CharField(max_length=2000, required=False)


@login_required
@require_POST
def play_decide(request: HttpRequest, play_id: str) -> HttpResponse:
    play = get_object_or_404(_plays(request), pk=play_id)
    if not _may_operate(request.user):
        raise Http404("No such action")
    form = DecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The decision was not understood: " + "; ".join(
            f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
        return redirect("pages:play-detail", play_id=play.pk)
    data = form.cleaned_data
    try:
        play.decide(data["layer_id"], data["decision"], request.user, data["note"], source="page")
    except InvalidState as exc:
        messages.error(request, exc.message)
    else:
        play.refresh_from_db(fields=["state"])
        messages.success(request, f"Step {data['decision']}: play is now {play.state}.")
    return redirect("pages:play-detail", play_id=play.pk)


def home(request: HttpRequest) -> HttpResponse:
    return redirect(reverse("pages:flows"))
