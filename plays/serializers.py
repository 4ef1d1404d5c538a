from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from flows.strict import NO_NUL, StrictJSONMixin

from .models import Approval, EventType, Layer, LayerState, Play, State, TriggerKind, iso
from .redaction import redact

# --- POST /api/flows/{flowId}/run ------------------------------------------------------


class RunSerializer(StrictJSONMixin, serializers.Serializer):
    """POST /run. Every field may be left out; none may be null (the schema says so, and a
    generated client never sends null for a field it does not set)."""

    args = serializers.DictField(required=False, help_text="Any JSON object (default {}): $prev.args")
    idempotencyKey = serializers.RegexField(NO_NUL, required=False, min_length=1, max_length=255, trim_whitespace=False)
    runAt = serializers.DateTimeField(required=False, help_text="Start at this time (not with delayMs)")
    delayMs = serializers.IntegerField(required=False, min_value=0, max_value=366 * 24 * 3600 * 1000,
                                       help_text="Start after this many milliseconds (not with runAt)")
    start = serializers.BooleanField(required=False, default=True, help_text="false: create the play in NEW")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "runAt" in attrs and "delayMs" in attrs:
            raise serializers.ValidationError({"runAt": ["Give runAt or delayMs, not both"]})
        return attrs


class RunResponseSerializer(serializers.Serializer):
    playId = serializers.CharField()
    state = serializers.ChoiceField(choices=State.values)
    startedAt = serializers.DateTimeField(allow_null=True)
    createdAt = serializers.DateTimeField()
    idempotencyKey = serializers.CharField(allow_null=True)
    runAt = serializers.DateTimeField(allow_null=True)


# Output shapes for the OpenAPI document. The serializers below hand-roll their
# to_representation for speed; these fields only describe what they send.


class StepErrorSerializer(serializers.Serializer):
    """Why a step or a play failed (more keys may follow, e.g. a module's details)."""

    code = serializers.CharField(help_text="e.g. STEP_FAILED, STEP_TIMEOUT, CANCELLED, PLAY_TIMEOUT")
    message = serializers.CharField()
    ref = serializers.CharField(required=False, help_text="The step that failed, when one did")


class TriggerSerializer(serializers.Serializer):
    """``kind``, then what the kind adds (a schedule's id and fire time, a channel's route…)."""

    kind = serializers.ChoiceField(choices=TriggerKind.choices)


class DecidedBySerializer(serializers.Serializer):
    id = serializers.CharField()
    email = serializers.EmailField()
    name = serializers.CharField()


class PendingApprovalSerializer(serializers.Serializer):
    layerId = serializers.CharField()
    ref = serializers.CharField()


@extend_schema_field({"description": "Any JSON value: the step's output", "nullable": True})
class AnyJSONField(serializers.JSONField):
    pass


class ApprovalSerializer(serializers.ModelSerializer):
    layerId = serializers.CharField(source="layer_id")
    ref = serializers.CharField(source="layer.ref")
    decidedBy = serializers.SerializerMethodField()
    decision = serializers.ChoiceField(choices=["approved", "declined"])
    decidedAt = serializers.DateTimeField(source="decided_at")

    class Meta:
        model = Approval
        fields = ["layerId", "ref", "decision", "note", "decidedBy", "decidedAt"]

    @extend_schema_field(DecidedBySerializer(allow_null=True))
    def get_decidedBy(self, approval: Approval) -> dict[str, Any] | None:
        user = approval.decided_by
        if user is None:
            return None
        return {"id": str(user.pk), "email": user.email, "name": user.display_name}


class PlaySerializer(serializers.ModelSerializer):
    flowId = serializers.CharField(source="flow_id")
    flowVersion = serializers.IntegerField(source="flow_version.version")
    idempotencyKey = serializers.CharField(source="idempotency_key", allow_null=True)
    createdAt = serializers.DateTimeField(source="created_at")
    startedAt = serializers.DateTimeField(source="started_at", allow_null=True)
    completedAt = serializers.DateTimeField(source="completed_at", allow_null=True)
    duration = serializers.IntegerField(allow_null=True)
    runAt = serializers.DateTimeField(source="run_at", allow_null=True)
    retryOf = serializers.CharField(source="retry_of_id", allow_null=True)
    parentPlayId = serializers.CharField(source="parent_id", allow_null=True)
    args = serializers.DictField(help_text="The trigger args")
    error = StepErrorSerializer(allow_null=True)
    trigger = TriggerSerializer(source="trigger_source", help_text="What started the play")

    class Meta:
        model = Play
        fields = ["id", "flowId", "flowVersion", "state", "args", "idempotencyKey", "createdAt", "startedAt",
                  "completedAt", "duration", "runAt", "retryOf", "parentPlayId", "error", "trigger"]

    def to_representation(self, play: Play) -> dict[str, Any]:
        # Hand-rolled: this runs for every row of a history page. The declared fields above are
        # the schema; tests/test_serializer_shapes.py holds the two to the same keys.
        return {
            "id": play.id,
            "flowId": play.flow_id,
            "flowVersion": play.flow_version.version,
            "state": play.state,
            # Run args are stored as given; what is shown is masked (plays/redaction.py).
            "args": redact(play.args),
            "idempotencyKey": play.idempotency_key,
            "createdAt": iso(play.created_at),
            "startedAt": iso(play.started_at),
            "completedAt": iso(play.completed_at),
            "duration": play.duration,
            "runAt": iso(play.run_at),
            "retryOf": play.retry_of_id,
            "parentPlayId": play.parent_id,
            "error": redact(play.error),
            "trigger": play.trigger_source,
        }


class PlayDetailSerializer(PlaySerializer):
    approvals = ApprovalSerializer(many=True)
    pendingApproval = PendingApprovalSerializer(allow_null=True, help_text="The step waiting for a decision (state WAIT)")

    class Meta(PlaySerializer.Meta):
        fields = PlaySerializer.Meta.fields + ["approvals", "pendingApproval"]

    def to_representation(self, play: Play) -> dict[str, Any]:
        data = super().to_representation(play)
        data["approvals"] = ApprovalSerializer(play.approvals.select_related("layer", "decided_by").order_by("decided_at"), many=True).data
        pending = play.pending_approval()
        data["pendingApproval"] = {"layerId": pending.id, "ref": pending.ref} if pending else None
        return data


class LayerSerializer(serializers.ModelSerializer):
    playId = serializers.CharField(source="play_id")
    appId = serializers.CharField(source="app_id")
    startedAt = serializers.DateTimeField(source="started_at", allow_null=True)
    completedAt = serializers.DateTimeField(source="completed_at", allow_null=True)
    duration = serializers.IntegerField(allow_null=True)
    state = serializers.ChoiceField(choices=LayerState.choices)
    out = AnyJSONField(allow_null=True)
    error = StepErrorSerializer(allow_null=True)
    iteration = serializers.IntegerField(allow_null=True, help_text="The item's index inside a loop, else null")
    reusedFrom = serializers.CharField(source="reused_from_id", allow_null=True)

    class Meta:
        model = Layer
        fields = ["id", "playId", "ref", "appId", "index", "state", "attempts", "startedAt", "completedAt",
                  "duration", "out", "error", "iteration", "reusedFrom"]

    def to_representation(self, layer: Layer) -> dict[str, Any]:
        return {
            "id": layer.id,
            "playId": layer.play_id,
            "ref": layer.ref,
            "appId": layer.app_id,
            "index": layer.index,
            "state": layer.state,
            "attempts": layer.attempts,
            "startedAt": iso(layer.started_at),
            "completedAt": iso(layer.completed_at),
            "duration": layer.duration,
            "out": redact(layer.out),
            "error": redact(layer.error),
            "iteration": layer.iteration,
            "reusedFrom": layer.reused_from_id,
        }


class RetryResponseSerializer(serializers.Serializer):
    playId = serializers.CharField()
    state = serializers.ChoiceField(choices=State.choices)
    retryOf = serializers.CharField()
    startedAt = serializers.DateTimeField(allow_null=True)


class ApproveSerializer(serializers.Serializer):
    layerId = serializers.CharField(max_length=24)
    decision = serializers.ChoiceField(choices=["approved", "declined"])
    note = serializers.CharField(required=False, allow_blank=True, max_length=10000, default="")


class PayloadSerializer(serializers.Serializer):
    """An event as stored and sent on the WebSocket (the spec's event table).

    Every event has type, seq, cursor, playId, flowId and timestamp; the others depend on the type:
    play:started (state), play:layer:started (layerId, ref, state, attempt, iteration in a
    loop), play:layer:completed (layerId, ref, state, out), play:layer:failed (layerId, ref,
    state, error), play:completed (state, duration), play:failed (state, ref, error,
    duration), play:waiting (layerId, ref, state), play:state (state, previousState).
    """

    type = serializers.ChoiceField(choices=EventType.choices)
    seq = serializers.IntegerField(help_text="The event's number within its play: 1, 2, 3 …")
    cursor = serializers.CharField(help_text="Opaque; increases in the order events become visible, company-wide (?since=)")
    playId = serializers.CharField()
    flowId = serializers.CharField()
    timestamp = serializers.DateTimeField()
    layerId = serializers.CharField(required=False)
    ref = serializers.CharField(required=False, allow_null=True, help_text="The step (play:failed: null if no step failed)")
    state = serializers.CharField(required=False, help_text="The play's or the layer's new state")
    previousState = serializers.CharField(required=False)
    out = AnyJSONField(required=False, allow_null=True)
    error = StepErrorSerializer(required=False, allow_null=True)
    attempt = serializers.IntegerField(required=False, help_text="play:layer:started: 1, then 2… on retries")
    iteration = serializers.IntegerField(required=False, allow_null=True)
    duration = serializers.IntegerField(required=False, allow_null=True, help_text="Milliseconds")
    note = serializers.CharField(required=False, help_text="Why an attempt started again (resumed, interrupted)")
    previousError = StepErrorSerializer(
        required=False, help_text="play:layer:started of a retry: the error the previous attempt failed with"
    )
