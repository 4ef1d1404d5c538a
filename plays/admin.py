"""Plays in the admin: read-only rows, changed only through the bulk actions.

The actions call the same model verbs as the API (``Play.hold`` and friends), so a play
in the wrong state is refused the same way; each refusal is reported by play id.
Acting needs the ``plays.operate_play`` permission (the "Operators" group has it, see
``manage.py ensure_roles``). Staff who are not superusers see their own company only.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.forms.models import BaseInlineFormSet
from django.urls import reverse
from django.utils.html import format_html

from flows.admin import FlowAdmin as FlowDefinitionAdmin
from flows.models import Flow
from tenancy.admin import TenantMixin
from tenancy.audit import record

from .audit import PLAY_VERBS
from .models import Approval, Decision, Event, InvalidState, Layer, Play
from .redaction import redact
from .workers import queue_warning

OPERATE = "plays.operate_play"


def pretty_json(value: Any) -> str:
    """``value`` as indented JSON in a <pre>, escaped, with credentials masked (plays/redaction.py)."""
    if value is None:
        return "-"
    return format_html("<pre style=\"white-space: pre-wrap\">{}</pre>",
                       json.dumps(redact(value), indent=2, ensure_ascii=False, sort_keys=True, default=str))


# A play of a 10,000-item loop has some 30,000 layers and more events: the admin page shows
# the first rows of each and links to the play's page and the API for the rest.
INLINE_ROWS = 200


class FirstRowsFormSet(BaseInlineFormSet):
    """A read-only inline formset over the first ``INLINE_ROWS`` rows only."""

    def get_queryset(self) -> Any:
        if not hasattr(self, "_first_rows"):
            self._first_rows = super().get_queryset()[:INLINE_ROWS]
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
    fields = ["index", "iteration", "ref", "app_id", "state", "attempts", "started_at", "completed_at",
              "reused_from", "out_pretty", "error_pretty"]
    readonly_fields = fields
    ordering = ["index", "iteration"]

    @admin.display(description="out")
    def out_pretty(self, layer: Layer) -> str:
        return pretty_json(layer.out)

    @admin.display(description="error")
    def error_pretty(self, layer: Layer) -> str:
        return pretty_json(layer.error)


class ApprovalInline(ReadOnlyInline):
    model = Approval
    fields = ["layer", "decision", "decided_by", "decided_at", "note"]
    readonly_fields = fields


class EventInline(ReadOnlyInline):
    model = Event
    fields = ["seq", "type", "created_at", "payload_pretty"]
    readonly_fields = fields
    ordering = ["seq"]

    @admin.display(description="payload")
    def payload_pretty(self, event: Event) -> str:
        return pretty_json(event.payload)


def _run(admin_obj: PlayAdmin, request: Any, queryset: Any, label: str, verb: Any) -> None:
    """Apply ``verb(play)`` to each selected play; report successes and each refusal."""
    done = 0
    refused: list[str] = []
    for play in queryset.order_by("created_at", "id"):
        try:
            verb(play)
        except InvalidState as exc:
            refused.append(f"{play.id}: {exc.message}")
            continue
        done += 1
    if done:
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
    def apply(play: Play) -> None:
        new = play.retry(by=request.user)
        record(request.user, "play.retried", play, newPlayId=new.id, source="admin")

    _run(admin_obj, request, queryset, "Retry", apply)


retry_plays = admin.action(description="Retry selected plays", permissions=["operate"])(_retry)
retry_plays.__name__ = "retry_plays"


@admin.register(Play)
class PlayAdmin(TenantMixin, admin.ModelAdmin):
    list_display = ["id", "flow", "state", "created_at", "started_at", "completed_at", "idempotency_key", "company"]
    list_filter = ["state", ("flow", admin.RelatedOnlyFieldListFilter), ("created_at", admin.DateFieldListFilter)]
    search_fields = ["=id", "=idempotency_key"]
    list_select_related = ["flow", "company"]
    show_full_result_count = False
    ordering = ["-created_at", "-id"]
    readonly_fields = ["id", "company", "flow", "flow_version", "state", "rows", "args_pretty", "idempotency_key",
                       "error_pretty", "created_at", "started_at", "completed_at", "updated_at", "run_at",
                       "deadline_at", "retry_of", "parent", "triggered_by", "next_index", "runner", "lease_until"]
    fields = readonly_fields
    inlines = [LayerInline, ApprovalInline, EventInline]
    actions = [
        _verb_action("hold", "Hold"),
        _verb_action("resume", "Resume"),
        _verb_action("cancel", "Cancel"),
        retry_plays,
        _decide_action(Decision.APPROVED, "Approve"),
        _decide_action(Decision.DECLINED, "Decline"),
    ]

    @admin.display(description="layers and events")
    def rows(self, play: Play) -> str:
        layers, events = play.layers.count(), play.events.count()
        more = layers > INLINE_ROWS or events > INLINE_ROWS
        return format_html(
            "{} layers, {} events{} — <a href=\"{}\">the play's page</a>, <a href=\"{}\">its events (API)</a>",
            layers, events, f" (the first {INLINE_ROWS} of each below)" if more else "",
            reverse("pages:play-detail", args=[play.pk]), f"/api/plays/{play.pk}/events",
        )

    @admin.display(description="args")
    def args_pretty(self, play: Play) -> str:
        return pretty_json(play.args)

    @admin.display(description="error")
    def error_pretty(self, play: Play) -> str:
        return pretty_json(play.error)

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


admin.site.unregister(Flow)


@admin.register(Flow)
class FlowAdmin(FlowDefinitionAdmin):
    """The flow admin of ``flows.admin``, warning when the flow's queue has no live worker."""

    def save_model(self, request: Any, obj: Flow, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if warning := queue_warning(obj.queue or "default"):
            messages.warning(request, warning["message"])
