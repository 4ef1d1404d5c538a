"""Plays in the admin: read-only rows, changed only through the bulk actions.

The actions call the same model verbs as the API (``Play.hold`` and friends), so a play
in the wrong state is refused the same way; each refusal is reported by play id.
Acting needs the ``plays.operate_play`` permission (the "Operators" group has it, see
``manage.py ensure_roles``). Staff who are not superusers see their own company only.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin, messages
from django.forms.models import BaseInlineFormSet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from flows.audit import PLAY_VERBS, record

from .bulk import Action
from .models import Approval, Decision, Event, InvalidState, Layer, Play
from .redaction import redact

OPERATE = "plays.operate_play"
_current = threading.local()
# A value longer than this (as indented JSON) is cut on the admin page, with a link to the whole.
MAX_CHARS = 2_000
PRE_STYLE = ("white-space: pre-wrap; overflow-wrap: anywhere; max-height: 24em; overflow: auto; min-width: 24em; "
             "max-width: 60em; font-size: 12px; line-height: 1.35; background: #f8f8f8; padding: 4px 6px; margin: 0")


def pretty_json(value: Any, full_url: str | None = None) -> str:
    """``value`` as indented JSON in a <pre>, escaped, credentials masked (plays/redaction.py), and
    cut at ``MAX_CHARS`` with a link to the whole value (``full_url``)."""
    if value is None:
        return "-"
    text = json.dumps(redact(value), indent=2, ensure_ascii=False, sort_keys=True, default=str)
    if len(text) <= MAX_CHARS:
        return format_html('<pre style="{}">{}</pre>', PRE_STYLE, text)
    more = f"… {len(text) - MAX_CHARS:,} more characters ({len(text):,} in all)"
    if full_url:
        return format_html('<pre style="{}">{}</pre><a href="{}">{} — the whole value</a>',
                           PRE_STYLE, text[:MAX_CHARS], full_url, more)
    return format_html('<pre style="{}">{}</pre>{}', PRE_STYLE, text[:MAX_CHARS], more)


def moment(value: datetime | None) -> str:
    """``2024-01-15 10:05:01 UTC``: seconds and the zone, always."""
    if value is None:
        return "-"
    return timezone.localtime(value, timezone.get_fixed_timezone(0)).strftime("%Y-%m-%d %H:%M:%S UTC")


def value_url(play_id: str, kind: str, obj_id: Any) -> str:
    return reverse("admin:plays_play_value", args=[play_id, kind, str(obj_id)])


class TenantMixin:
    """Staff see their own company's rows; superusers see all."""

    company_field = "company_id"

    def get_queryset(self, request: Any) -> Any:
        qs = super().get_queryset(request)  # type: ignore[misc]
        if request.user.is_superuser:
            return qs
        return qs.filter(**{self.company_field: request.user.company_id})


# A play of a 10,000-item loop has some 30,000 layers and more events: the admin page shows
# them a page of this many rows at a time (?layers=<page>&events=<page>).
INLINE_ROWS = 50


class FirstRowsFormSet(BaseInlineFormSet):
    """A read-only inline formset over one page of ``INLINE_ROWS`` rows (``offset``, set by PlayAdmin)."""

    offset = 0

    def get_queryset(self) -> Any:
        if not hasattr(self, "_first_rows"):
            self._first_rows = super().get_queryset()[self.offset : self.offset + INLINE_ROWS]
        return self._first_rows


class ReadOnlyInline(admin.TabularInline):
    formset = FirstRowsFormSet
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class LayerInline(ReadOnlyInline):
    model = Layer
    fields = ["index", "iteration", "ref", "app_id", "state", "attempts", "started", "completed",
              "reused_from", "out_pretty", "error_pretty"]
    readonly_fields = fields
    ordering = ["index", "iteration"]

    @admin.display(description="started")
    def started(self, layer: Layer) -> str:
        return moment(layer.started_at)

    @admin.display(description="completed")
    def completed(self, layer: Layer) -> str:
        return moment(layer.completed_at)

    @admin.display(description="out")
    def out_pretty(self, layer: Layer) -> str:
        return pretty_json(layer.out, value_url(layer.play_id, "layer-out", layer.pk))

    @admin.display(description="error")
    def error_pretty(self, layer: Layer) -> str:
        return pretty_json(layer.error, value_url(layer.play_id, "layer-error", layer.pk))


class ApprovalInline(ReadOnlyInline):
    model = Approval
    fields = ["layer", "decision", "decided_by", "decided", "note"]
    readonly_fields = fields

    @admin.display(description="decided at")
    def decided(self, approval: Approval) -> str:
        return moment(approval.decided_at)


class EventInline(ReadOnlyInline):
    model = Event
    fields = ["seq", "type", "created", "payload_pretty"]
    readonly_fields = fields
    ordering = ["seq"]

    @admin.display(description="created at")
    def created(self, event: Event) -> str:
        return moment(event.created_at)

    @admin.display(description="payload")
    def payload_pretty(self, event: Event) -> str:
        return pretty_json(event.payload, value_url(event.play_id, "event", event.pk))


def _run(admin_obj: PlayAdmin, request: Any, queryset: Any, label: str, verb: Any) -> None:
    """Apply ``verb(play)`` to each selected play; report successes (with links to the plays
    they created) and each refusal."""
    done = 0
    refused: list[str] = []
    created: list[tuple[str, str]] = []
    for play in queryset.order_by("created_at", "id"):
        try:
            new = verb(play)
        except InvalidState as exc:
            refused.append(f"{play.id}: {exc.message}")
            continue
        done += 1
        if isinstance(new, Play):
            created.append((play.id, new.id))
    if done and created:
        links = format_html_join(", ", '{} → <a href="{}">{}</a>',
                                 ((old, reverse("pages:play-detail", args=[new]), new) for old, new in created[:50]))
        admin_obj.message_user(request, format_html("{}: {} play(s): {}", label, done, links), messages.SUCCESS)
    elif done:
        admin_obj.message_user(request, f"{label}: {done} play(s).", messages.SUCCESS)
    if refused:
        admin_obj.message_user(request, f"{label} refused for {len(refused)} play(s) in the wrong state — "
                               + "; ".join(refused), messages.ERROR)


def _verb_action(verb: str, label: str) -> Any:
    def action(admin_obj: PlayAdmin, request: Any, queryset: Any) -> None:
        def apply(play: Play) -> None:
            getattr(play, verb)(by=request.user)
            record(request.user, PLAY_VERBS[verb], play, source="admin")

        _run(admin_obj, request, queryset, label, apply)

    action.__name__ = f"{verb}_plays"
    return admin.action(description=f"{label} selected plays", permissions=["operate"])(action)


def _decide_action(decision: str, label: str) -> Any:
    def action(admin_obj: PlayAdmin, request: Any, queryset: Any) -> None:
        def apply(play: Play) -> None:
            layer = play.pending_approval()
            if layer is None:
                raise InvalidState(f"Play {play.id} is {play.state} with no step waiting for approval")
            play.decide(layer.id, decision, request.user, note=f"{label} in the admin")
            record(request.user, f"play.{decision}", play, layerId=layer.id, source="admin")

        _run(admin_obj, request, queryset, label, apply)

    action.__name__ = f"{decision}_plays"
    return admin.action(description=f"{label} the waiting step of selected plays", permissions=["operate"])(action)


def _retry(admin_obj: PlayAdmin, request: Any, queryset: Any) -> None:
    def apply(play: Play) -> Play:
        new = play.retry(by=request.user)
        record(request.user, "play.retried", play, newPlayId=new.id, source="admin")
        return new

    _run(admin_obj, request, queryset, "Retry", apply)


retry_plays = admin.action(description="Retry selected plays", permissions=["operate"])(_retry)
retry_plays.__name__ = "retry_plays"


def _bulk_action(action: str) -> Any:
    """The selection (or "all N" with select-across) to the bulk dry run, then a background job."""

    def run(admin_obj: PlayAdmin, request: Any, queryset: Any) -> HttpResponse:
        from . import bulk
        from .bulk_pages import render_preview

        ids = list(queryset.order_by("created_at", "id").values_list("id", flat=True)[: bulk.MAX_PLAYS + 1])
        back = reverse("admin:plays_play_changelist") + ("?" + request.GET.urlencode() if request.GET else "")
        return render_preview(request, action, ids, back=back)

    run.__name__ = f"bulk_{action}_plays"
    return admin.action(description=f"{Action(action).label} selected plays in the background (dry run first)",
                        permissions=["operate"])(run)


class CreatedRangeFilter(admin.SimpleListFilter):
    """Created: the last hour, 24 hours, today, yesterday (UTC), the last 7 days."""

    title = "created"
    parameter_name = "created"
    RANGES = {"1h": "Last hour", "24h": "Last 24 hours", "today": "Today (UTC)", "yesterday": "Yesterday (UTC)",
              "7d": "Last 7 days"}

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return list(self.RANGES.items())

    def queryset(self, request: Any, queryset: Any) -> Any:
        now = timezone.now()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        bounds = {
            "1h": (now - timedelta(hours=1), None),
            "24h": (now - timedelta(hours=24), None),
            "today": (midnight, None),
            "yesterday": (midnight - timedelta(days=1), midnight),
            "7d": (midnight - timedelta(days=6), None),
        }.get(self.value() or "")
        if bounds is None:
            return queryset
        start, end = bounds
        queryset = queryset.filter(created_at__gte=start)
        return queryset.filter(created_at__lt=end) if end else queryset


class RetriedFilter(admin.SimpleListFilter):
    title = "retried"
    parameter_name = "retried"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Not yet retried"), ("yes", "Retried")]

    def queryset(self, request: Any, queryset: Any) -> Any:
        from django.db.models import Exists, OuterRef

        retried = Exists(Play.objects.filter(retry_of=OuterRef("pk")))
        if self.value() == "no":
            return queryset.filter(~retried)
        if self.value() == "yes":
            return queryset.filter(retried)
        return queryset


@admin.register(Play)
class PlayAdmin(TenantMixin, admin.ModelAdmin):
    list_display = ["id", "flow", "state", "created", "duration_text", "error_text", "idempotency_key"]
    list_filter = ["state", ("flow", admin.RelatedOnlyFieldListFilter), CreatedRangeFilter, RetriedFilter,
                   ("created_at", admin.DateFieldListFilter)]
    search_fields = ["=id", "=idempotency_key"]
    list_select_related = ["flow", "company"]
    show_full_result_count = False
    ordering = ["-created_at", "-id"]
    readonly_fields = ["id", "company", "flow", "flow_version", "state", "rows", "args_pretty", "idempotency_key",
                       "error_pretty", "created", "started", "completed", "updated", "run_at",
                       "deadline_at", "retry_of", "retries_list", "parent", "triggered_by", "next_index", "runner",
                       "lease_until"]
    fields = readonly_fields
    inlines = [LayerInline, ApprovalInline, EventInline]
    actions = [
        _verb_action("hold", "Hold"),
        _verb_action("resume", "Resume"),
        _verb_action("cancel", "Cancel"),
        retry_plays,
        _decide_action(Decision.APPROVED, "Approve"),
        _decide_action(Decision.DECLINED, "Decline"),
        *[_bulk_action(a) for a in Action.values],
    ]

    def get_list_display(self, request: Any) -> list[str]:
        # Superusers see every company's plays, and which company each is.
        return [*self.list_display, "company"] if request.user.is_superuser else self.list_display

    @admin.display(description="created", ordering="created_at")
    def created(self, play: Play) -> str:
        return moment(play.created_at)

    @admin.display(description="started", ordering="started_at")
    def started(self, play: Play) -> str:
        return moment(play.started_at)

    @admin.display(description="completed", ordering="completed_at")
    def completed(self, play: Play) -> str:
        return moment(play.completed_at)

    @admin.display(description="updated")
    def updated(self, play: Play) -> str:
        return moment(play.updated_at)

    @admin.display(description="duration")
    def duration_text(self, play: Play) -> str:
        from .pages import fmt_ms

        return fmt_ms(play.duration) or "-"

    @admin.display(description="error")
    def error_text(self, play: Play) -> str:
        if not isinstance(play.error, dict):
            return "-"
        ref = f" at {play.error.get('ref')}" if play.error.get("ref") else ""
        return f"{play.error.get('code', '')}{ref}"

    @admin.display(description="retried as")
    def retries_list(self, play: Play) -> str:
        retries = list(play.retries.order_by("created_at", "id").values_list("id", "state")[:20])
        if not retries:
            return "-"
        return format_html_join(", ", '<a href="{}">{}</a> ({})',
                                ((reverse("admin:plays_play_change", args=[pid]), pid, st) for pid, st in retries))

    def get_urls(self) -> list[Any]:
        return [
            path("<str:play_id>/value/<str:kind>/<str:obj_id>/", self.admin_site.admin_view(self.value_view),
                 name="plays_play_value"),
            *super().get_urls(),
        ]

    def value_view(self, request: HttpRequest, play_id: str, kind: str, obj_id: str) -> JsonResponse:
        """One whole value (args, error, a layer's out or error, an event's payload) as JSON, redacted."""
        if not self.has_view_permission(request):
            raise Http404("No such value")
        play = get_object_or_404(self.get_queryset(request), pk=play_id)
        if kind in ("args", "error"):
            value = getattr(play, kind)
        elif kind in ("layer-out", "layer-error"):
            layer = get_object_or_404(Layer, pk=obj_id, play=play)
            value = layer.out if kind == "layer-out" else layer.error
        elif kind == "event":
            value = get_object_or_404(Event, pk=obj_id, play=play).payload
        else:
            raise Http404("No such value")
        return JsonResponse(redact(value), safe=False, json_dumps_params={"indent": 2, "ensure_ascii": False})

    def get_formsets_with_inlines(self, request: Any, obj: Any = None) -> Any:
        # Layers and events a page at a time: ?layers=<page>&events=<page> (0-based).
        for inline in self.get_inline_instances(request, obj):
            formset = inline.get_formset(request, obj)
            param = {LayerInline: "layers", EventInline: "events"}.get(type(inline))
            if param:
                formset.offset = _page_param(request, param) * INLINE_ROWS
            yield formset, inline

    @admin.display(description="layers and events")
    def rows(self, play: Play) -> str:
        layers, events = play.layers.count(), play.events.count()
        request = getattr(_current, "request", None)
        pagers = [_pager(request, "layers", layers), _pager(request, "events", events)] if request else []
        return format_html(
            "{} layers, {} events — <a href=\"{}\">the play's page</a>, <a href=\"{}\">its events (API)</a>{}",
            layers, events, reverse("pages:play-detail", args=[play.pk]), f"/api/plays/{play.pk}/events",
            format_html_join("", "<br>{}", ((p,) for p in pagers if p)),
        )

    def change_view(self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None) -> Any:
        _current.request = request  # for the pagers in rows() (one ModelAdmin serves every thread)
        try:
            response = super().change_view(request, object_id, form_url, extra_context)
            if hasattr(response, "render") and not response.is_rendered:
                response.render()  # the readonly fields are drawn while the template renders
            return response
        finally:
            _current.request = None

    @admin.display(description="args")
    def args_pretty(self, play: Play) -> str:
        return pretty_json(play.args, value_url(play.pk, "args", "-"))

    @admin.display(description="error")
    def error_pretty(self, play: Play) -> str:
        return pretty_json(play.error, value_url(play.pk, "error", "-"))

    def has_operate_permission(self, request: Any) -> bool:
        return request.user.is_active and request.user.is_staff and request.user.has_perm(OPERATE)

    def has_view_permission(self, request: Any, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff and (
            request.user.has_perm("plays.view_play") or request.user.has_perm(OPERATE)))

    def has_module_permission(self, request: Any) -> bool:
        return self.has_view_permission(request)

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        # Rows are not editable; the list page still offers the actions.
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


def _page_param(request: Any, name: str) -> int:
    try:
        return max(0, min(10**6, int(request.GET.get(name, 0))))
    except ValueError:
        return 0


def _pager(request: Any, name: str, total: int) -> str:
    """``Layers 51–100 of 153: ‹ previous · next ›`` for a paged inline; "" when one page holds all."""
    if total <= INLINE_ROWS:
        return ""
    page = _page_param(request, name)
    pages = (total + INLINE_ROWS - 1) // INLINE_ROWS
    page = min(page, pages - 1)

    def url(n: int) -> str:
        query = request.GET.copy()
        query[name] = str(n)
        return "?" + query.urlencode()

    first, last = page * INLINE_ROWS + 1, min(total, (page + 1) * INLINE_ROWS)
    prev = format_html('<a href="{}">‹ previous {}</a>', url(page - 1), INLINE_ROWS) if page > 0 else ""
    nxt = format_html('<a href="{}">next {} ›</a>', url(page + 1), INLINE_ROWS) if page + 1 < pages else ""
    return format_html("{} {}–{} of {} below: {} {}", name.capitalize(), first, last, total, prev, nxt)
