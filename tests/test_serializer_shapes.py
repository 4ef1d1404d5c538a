"""The hand-written ``to_representation`` of the hot serializers says exactly what their
declared fields say.

Flows, plays and layers are written out by hand (one dict per row: a history page of 100
plays through DRF's field machinery cost several times more), while their declared fields
are what the OpenAPI document shows. Two descriptions of one shape can drift: this holds
them together, so a field added to one and not the other fails here, not in a client.
"""

from __future__ import annotations

from typing import Any

from flows.models import Flow
from flows.serializers import FlowSerializer
from plays.models import Layer, Play
from plays.serializers import LayerSerializer, PlayDetailSerializer, PlaySerializer

from .factories import make_flow, run

STEPS = [
    {"ref": "a", "appId": "var", "args": {"values": {"n": 1}}},
    {"ref": "b", "appId": "var", "args": {"values": {"m": "{{ $prev.a.n }}"}}, "needsApproval": True},
]


def test_each_hand_written_shape_has_exactly_its_declared_fields(api: Any, drain: Any) -> None:
    made = make_flow(api, STEPS)
    play = Play.objects.get(pk=run(api, made, drain))
    flow = Flow.objects.get(pk=made["id"])
    for serializer, instance in [
        (FlowSerializer, flow),
        (PlaySerializer, play),
        (PlayDetailSerializer, play),
        (LayerSerializer, Layer.objects.filter(play=play).first()),
    ]:
        declared = set(serializer().fields)
        written = set(serializer(instance).data)
        assert written == declared, (serializer.__name__, written ^ declared)
