"""What the runner tells the observability side: one context manager per play run and per step.

``running(play)`` wraps a runner's turn on a play (``plays.runner.run``/``run_iteration``):
its log lines carry ``playId``/``flowId``/``companyId``/``traceId``, and a ``flowplay.run``
span joins the trace stored with the play (``Play.traceparent``, set when the play is
created inside a traced request; see ``_remember_trace``), so steps run later by any worker,
after a sleep, an approval or a reaper requeue, land in the trace of the ``POST /run`` that
created the play.

``step(runner, step, layer)`` wraps one step's execution: a ``step <ref>`` span with the
flow, play and module, ``layerRef`` on the log lines, the ``flowplay_step_duration_seconds``
histogram by module and outcome, and the trigger → first step latency.

With tracing off (the default) the spans are OpenTelemetry's no-op ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db.models.signals import post_save, pre_save
from django.dispatch import receiver
from django.utils import timezone
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flowplay.logs import bind

from . import metrics
from .models import LayerState, Play

log = logging.getLogger(__name__)
tracer = trace.get_tracer("flowplay.runner")
_propagator = TraceContextTextMapPropagator()


def traceparent_now() -> str:
    """The W3C traceparent of the current span, or "" when there is none (tracing off)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def context_of(play: Play) -> otel_context.Context | None:
    """The trace context a play was created in, for the spans of its steps."""
    if not play.traceparent:
        return None
    return _propagator.extract({"traceparent": play.traceparent})


@receiver(pre_save, sender=Play, dispatch_uid="flowplay-remember-trace")
def _remember_trace(sender: Any, instance: Play, **kwargs: Any) -> None:
    if instance._state.adding and not instance.traceparent:
        instance.traceparent = traceparent_now()


@receiver(post_save, sender=Play, dispatch_uid="flowplay-count-trigger")
def _count_trigger(sender: Any, instance: Play, created: bool, **kwargs: Any) -> None:
    if created:
        metrics.play_created(str(instance.trigger_kind))


@contextmanager
def running(play: Play, iteration: Any = None) -> Iterator[None]:
    attributes = {"flowplay.play_id": play.id, "flowplay.flow_id": play.flow_id, "flowplay.company_id": play.company_id}
    if iteration is not None:
        attributes["flowplay.iteration"] = iteration.index
    with (
        bind(playId=play.id, flowId=play.flow_id, companyId=play.company_id),
        tracer.start_as_current_span(
            "flowplay.run",
            context=context_of(play),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ),
    ):
        yield


def _outcome(layer: Any) -> str:
    if layer.state == LayerState.RUN:
        return "parked" if layer.parked else "stopped"
    return str(layer.state).lower()


@contextmanager
def step(runner: Any, step: dict[str, Any], layer: Any) -> Iterator[None]:
    play = runner.play
    module = step.get("appId") or "unknown"
    # Trigger → first step: not for a step that waited for an approval (a person's time).
    if runner.iteration is None and layer.attempts <= 1 and not layer.approved and play.started_at is not None:
        others = [other for other in runner.layers.values() if other.pk != layer.pk]
        if all(other.state == LayerState.FILTERED for other in others):
            metrics.START_LATENCY.observe(max(0.0, (timezone.now() - play.started_at).total_seconds()))
    attributes: dict[str, Any] = {
        "flowplay.play_id": play.id,
        "flowplay.flow_id": play.flow_id,
        "flowplay.module": module,
        "flowplay.layer_ref": step["ref"],
        "flowplay.layer_id": layer.pk,
        "flowplay.attempt": layer.attempts,
    }
    if layer.iteration is not None:
        attributes["flowplay.iteration"] = layer.iteration
    started = time.perf_counter()
    with (
        bind(layerRef=step["ref"]),
        tracer.start_as_current_span(
            f"step {step['ref']}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span,
    ):
        log.debug("step %s (%s) running", step["ref"], module)
        try:
            yield
        finally:
            outcome = _outcome(layer)
            elapsed = time.perf_counter() - started
            span.set_attribute("flowplay.outcome", outcome)
            if layer.state == LayerState.FAIL:
                span.set_status(Status(StatusCode.ERROR, str((layer.error or {}).get("message", ""))[:200]))
            try:
                metrics.STEP_DURATION.labels(module[:64], outcome).observe(elapsed)
            except Exception:  # metrics must never break a step
                log.warning("could not record the step's duration", exc_info=True)
            log.debug("step %s (%s) %s in %.3f s", step["ref"], module, outcome, elapsed)


__all__ = ["running", "step", "traceparent_now", "context_of"]
