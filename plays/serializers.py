from __future__ import annotations

from typing import Any

from rest_framework import serializers

from .models import Approval, Layer, Play, iso
from .redaction import redact


class ApprovalSerializer(serializers.ModelSerializer):
    layerId = serializers.CharField(source="layer_id")
    ref = serializers.CharField(source="layer.ref")
    decidedBy = serializers.SerializerMethodField()
    decidedAt = serializers.DateTimeField(source="decided_at")

    class Meta:
        model = Approval
        fields = ["layerId", "ref", "decision", "note", "decidedBy", "decidedAt"]

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
    error = serializers.JSONField(allow_null=True)
    trigger = serializers.JSONField(source="trigger_source")

    class Meta:
        model = Play
        fields = ["id", "flowId", "flowVersion", "state", "args", "idempotencyKey", "createdAt", "startedAt",
                  "completedAt", "duration", "runAt", "retryOf", "parentPlayId", "error", "trigger"]

    def to_representation(self, play: Play) -> dict[str, Any]:
        # Hand-rolled: this runs for every row of a history page.
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
    pendingApproval = serializers.JSONField(allow_null=True)

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
    out = serializers.JSONField(allow_null=True)
    error = serializers.JSONField(allow_null=True)
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


class RunSerializer(serializers.Serializer):
    args = serializers.JSONField(required=False, allow_null=True)
    idempotencyKey = serializers.CharField(required=False, allow_null=True, min_length=1, max_length=255, trim_whitespace=False)
    runAt = serializers.DateTimeField(required=False, allow_null=True)
    delayMs = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=366 * 24 * 3600 * 1000)
    start = serializers.BooleanField(required=False, default=True)

    def validate_args(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise serializers.ValidationError("args must be a JSON object")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("runAt") is not None and attrs.get("delayMs") is not None:
            raise serializers.ValidationError({"runAt": ["Give runAt or delayMs, not both"]})
        return attrs


class ApproveSerializer(serializers.Serializer):
    layerId = serializers.CharField(max_length=24)
    decision = serializers.ChoiceField(choices=["approved", "declined"])
    note = serializers.CharField(required=False, allow_blank=True, max_length=10000, default="")


class PayloadSerializer(serializers.Serializer):
    """An event as stored and sent on the WebSocket (see the spec's event table)."""

    type = serializers.CharField()
    seq = serializers.IntegerField()
    playId = serializers.CharField()
    flowId = serializers.CharField()
    timestamp = serializers.DateTimeField()
