"""Celery tasks: each finds the rows it works on and calls their model verbs (which write).

Sweeps (``release_due``, ``reap_stuck``, ``expire_timed_out``) each have a ``*_one``
function that handles one unit of work and returns whether it found any, so tests drive
them step by step; the periodic task loops over it within a small time budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from celery import Task, shared_task
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import metrics, runner
from .models import ACTIVE, NON_TERMINAL, Iteration, IterationState, Play, State, error_body

log = logging.getLogger(__name__)


class StepTask(Task):
    """The hot step tasks: their outcome is the play's rows, so their results are ignored,
    and they share one result backend per process. Celery keeps a result backend per thread
    and Django serves each ASGI request in a thread of its own, so every ``apply_async`` of
    a request built a new one (~7% of a ``POST /run``'s CPU, profiled)."""

    ignore_result = True
    acks_late = True
    _process_backend = None

    @property
    def backend(self):  # noqa: ANN201  (Celery's own property, shared instead of per thread)
        if self._backend is not None:
            return self._backend
        if StepTask._process_backend is None:
            StepTask._process_backend = self.app.backend
        return StepTask._process_backend

    @backend.setter
    def backend(self, value: object) -> None:
        self._backend = value


@shared_task(base=StepTask)
def run_play(play_id: str) -> None:
    """Run a RUN play's steps; a duplicate delivery loses the lease race and returns."""
    runner.run(play_id)


@shared_task(base=StepTask)
def run_iteration(iteration_id: int) -> None:
    """Run one iteration of a loop; iterations of one loop run in parallel across workers."""
    runner.run_iteration(iteration_id)


def _drain(one: Callable[[], bool], budget: float = 2.0) -> int:
    done = 0
    ends = time.monotonic() + budget
    while time.monotonic() < ends and one():
        done += 1
    return done


def release_due_one() -> bool:
    """Start one DEFERRED play whose due time has come. Return False when there is none."""
    with transaction.atomic():
        # skip_locked: several schedulers (or a slow previous run) never claim the same row.
        play = (
            Play.objects.select_for_update(skip_locked=True, of=("self",))  # not the joined flow version
            .select_related("flow_version")
            .filter(state=State.DEFERRED, run_at__lte=timezone.now())
            .order_by("run_at", "created_at")
            .first()
        )
        if play is None:
            return False
        # No slot free: admit() cleared run_at, release_flow() starts it later.
        play.admit()
    return True


@shared_task(ignore_result=True)
def release_due() -> int:
    """Periodic: release due deferred plays, and plays waiting for a slot that has freed."""
    released = _drain(release_due_one)
    flows = (
        Play.objects.filter(state=State.DEFERRED, run_at__isnull=True)
        .values_list("flow_id", flat=True)
        .distinct()[:100]
    )
    for flow_id in flows:
        released += release_flow_slots(flow_id)
    return released


def release_flow_slots(flow_id: str) -> int:
    """Start the oldest DEFERRED plays of a flow that wait for a slot, while slots are free."""
    started = 0
    while True:
        with transaction.atomic():
            play = (
                Play.objects.select_for_update(skip_locked=True, of=("self",))  # not the joined flow version
                .select_related("flow_version")
                .filter(flow_id=flow_id, state=State.DEFERRED, run_at__isnull=True)
                .order_by("created_at")
                .first()
            )
            if play is None or not play.admit() or play.state != State.RUN:
                return started
            started += 1


@shared_task(ignore_result=True)
def release_flow(flow_id: str) -> int:
    return release_flow_slots(flow_id)


def reap_stuck_one(idle_seconds: float = 30.0) -> bool:
    """Requeue one RUN play whose runner died (lease expired) or whose task was lost."""
    now = timezone.now()
    with transaction.atomic():
        play = (
            Play.objects.select_for_update(skip_locked=True, of=("self",))  # not the joined flow version
            .select_related("flow_version")
            .filter(state=State.RUN)
            .filter(Q(lease_until__lt=now) | Q(runner="", updated_at__lt=now - timedelta(seconds=idle_seconds)))
            .order_by("updated_at")
            .first()
        )
        if play is None:
            return False
        metrics.reaped("play", lease_expired=bool(play.runner))
        log.warning("requeueing play %s (runner %r lost)", play.pk, play.runner)
        play.requeue()
    return True


def reap_stuck_iteration_one(idle_seconds: float = 30.0) -> bool:
    """Requeue one running iteration whose runner died or whose task was lost."""
    now = timezone.now()
    with transaction.atomic():
        iteration = (
            Iteration.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(state=IterationState.RUN, play__state=State.RUN)
            .filter(Q(lease_until__lt=now) | Q(runner="", updated_at__lt=now - timedelta(seconds=idle_seconds)))
            .order_by("updated_at")
            .first()
        )
        if iteration is None:
            return False
        metrics.reaped("iteration", lease_expired=bool(iteration.runner))
        if iteration.runner:
            log.warning("requeueing iteration %s (runner %r lost)", iteration, iteration.runner)
        iteration.requeue()
    return True


@shared_task(ignore_result=True)
def reap_stuck() -> int:
    from django.conf import settings

    from . import bulk

    idle = settings.FLOWPLAY.get("REAP_IDLE_SECONDS", 30.0)
    return (
        _drain(lambda: reap_stuck_one(idle))
        + _drain(lambda: reap_stuck_iteration_one(idle))
        + _drain(lambda: bulk.resend_stalled_one(idle))
    )


def expire_timed_out_one() -> bool:
    """Fail one unfinished play whose whole-play timeout has passed."""
    play = (
        Play.objects.select_related("flow_version")
        .filter(state__in=NON_TERMINAL - {State.NEW}, deadline_at__lt=timezone.now())
        .order_by("deadline_at")
        .first()
    )
    if play is None:
        return False
    with transaction.atomic():
        timeout = play.definition.get("execution", {}).get("timeout")
        play.fail(error_body("PLAY_TIMEOUT", f"The play exceeded its timeout of {timeout} s"), from_states=list(NON_TERMINAL))
    return True


@shared_task(ignore_result=True)
def expire_timed_out() -> int:
    return _drain(expire_timed_out_one)



@shared_task(ignore_result=True)
def prune_old_plays() -> int:
    """Periodic: delete finished plays past their flow's retention, in small batches."""
    from .retention import prune

    return prune()


__all__ = ["ACTIVE", "run_play", "run_iteration", "release_due", "release_flow", "reap_stuck", "expire_timed_out", "prune_old_plays"]


@shared_task(ignore_result=True, acks_late=True)
def run_bulk_job(job_id: str) -> None:
    """Work through a confirmed bulk job (plays/bulk.py); a duplicate delivery acts on no play twice."""
    from . import bulk

    bulk.run(job_id)
