"""Bulk verbs: retry, cancel, hold, resume, approve or decline many plays as one job.

A person selects plays (rows, or every play matching a history filter), sees a dry run
(``classify``: "5 will be retried, 1 is not FAIL"), and confirms. That creates a ``BulkJob``
holding the frozen list of play ids; a Celery task (``plays.tasks.run_bulk_job``) works
through it in the background and the job's page shows the progress and, per play, what
happened and the play it created.

1. Every play is acted on in its own transaction together with its ``BulkItem`` row; the
   unique (job, play) constraint makes a redelivered or concurrently running task skip
   (or roll back) what is already done, so running the job twice acts once per play.
2. Plays are looked up within the job's company only: an id of another company's play in
   the selection is reported as not found and never touched.
3. The job ends with one audit entry for the whole batch (``bulk.<verb>``), written in the
   same transaction as the job's RUN → DONE compare-and-set, so only once.
4. A job whose task was lost (never sent, or its worker died) is sent again by the reaper
   (``resend_stalled_one``, from ``plays.tasks.reap_stuck``) once it has made no progress
   for ``REAP_IDLE_SECONDS``; by 1 that is harmless even when it was only slow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from tenancy.ids import new_id
from tenancy.models import Company

from .models import HOLDABLE, NON_TERMINAL, InvalidState, Play, State

log = logging.getLogger(__name__)

# One job acts on at most this many plays: a wider selection is refused with "narrow the filter".
MAX_PLAYS = 5_000


class Action(models.TextChoices):
    RETRY = "retry", "Retry"
    CANCEL = "cancel", "Cancel"
    HOLD = "hold", "Hold"
    RESUME = "resume", "Resume"
    APPROVE = "approve", "Approve"
    DECLINE = "decline", "Decline"


# The play states each action is legal in (plays/models.py verbs).
ELIGIBLE: dict[str, frozenset[str]] = {
    Action.RETRY: frozenset({State.FAIL}),
    Action.CANCEL: NON_TERMINAL,
    Action.HOLD: HOLDABLE,
    Action.RESUME: frozenset({State.ON_HOLD}),
    Action.APPROVE: frozenset({State.WAIT}),
    Action.DECLINE: frozenset({State.WAIT}),
}
# What the dry run says of the plays an action will act on ("5 will be retried").
WILL = {
    Action.RETRY: "will be retried",
    Action.CANCEL: "will be cancelled",
    Action.HOLD: "will be held",
    Action.RESUME: "will be resumed",
    Action.APPROVE: "will be approved",
    Action.DECLINE: "will be declined",
}
# ... and of the others ("1 is not FAIL").
NOT_ELIGIBLE = {
    Action.RETRY: "not FAIL",
    Action.CANCEL: "already finished",
    Action.HOLD: "not in a state that can be held",
    Action.RESUME: "not ON_HOLD",
    Action.APPROVE: "not waiting for an approval",
    Action.DECLINE: "not waiting for an approval",
}
AUDIT_ACTIONS = {
    Action.RETRY: "bulk.retried",
    Action.CANCEL: "bulk.cancelled",
    Action.HOLD: "bulk.held",
    Action.RESUME: "bulk.resumed",
    Action.APPROVE: "bulk.approved",
    Action.DECLINE: "bulk.declined",
}


class JobState(models.TextChoices):
    PENDING = "PENDING"
    """Confirmed, waiting for a worker."""
    RUN = "RUN"
    DONE = "DONE"


class Outcome(models.TextChoices):
    DONE = "done"
    """The verb was applied (for a retry: ``new_play`` is the retry)."""
    REFUSED = "refused"
    """The play was in a state the verb is not legal in (or already retried)."""
    MISSING = "missing"
    """No such play in the job's company."""
    ERROR = "error"
    """An unexpected error (logged); the play was left as it was."""


class BulkJob(models.Model):
    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    company = models.ForeignKey(Company, on_delete=models.CASCADE, related_name="+")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    action = models.CharField(max_length=16, choices=Action)
    note = models.TextField(blank=True, default="")
    # How the plays were chosen: {"scope": "selected"} or {"scope": "all", "query": "state=FAIL&…", "path": …}.
    selection = models.JSONField(default=dict, blank=True)
    play_ids = models.JSONField(default=list)
    state = models.CharField(max_length=8, choices=JobState, default=JobState.PENDING)
    total = models.IntegerField(default=0)
    processed = models.IntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    # Its last sign of life: created, claimed, a play done, or sent again by the reaper.
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "plays"
        indexes = [models.Index(fields=["company", "-created_at"], name="plays_bulkjob_company_created")]

    def __str__(self) -> str:
        return f"{self.get_action_display()} of {self.total} play(s) ({self.state})"

    @property
    def percent(self) -> int:
        return 100 if not self.total else min(100, round(100 * self.processed / self.total))

    def counts(self) -> dict[str, int]:
        return dict(self.items.values_list("outcome").annotate(n=models.Count("id")).order_by())

    def enqueue(self) -> None:
        """Send the job to a worker after commit. If the broker is down it stays PENDING and
        its page offers to send it again (running a job twice is harmless, see above)."""
        from .outbox import send_on_commit
        from .tasks import run_bulk_job

        job_id = self.id
        send_on_commit(lambda: run_bulk_job.delay(job_id), f"bulk job {job_id}")


class BulkItem(models.Model):
    job = models.ForeignKey(BulkJob, on_delete=models.CASCADE, related_name="items")
    play_id = models.CharField(max_length=24)
    outcome = models.CharField(max_length=8, choices=Outcome)
    message = models.CharField(max_length=500, blank=True, default="")
    new_play = models.ForeignKey(Play, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "plays"
        constraints = [
            # A redelivered task cannot act on a play twice (see the module docstring).
            models.UniqueConstraint(fields=["job", "play_id"], name="plays_bulkitem_one_per_play"),
        ]

    def __str__(self) -> str:
        return f"{self.play_id}: {self.outcome}"


# --- Dry run ---------------------------------------------------------------------------


def not_retried(qs: Any) -> Any:
    return qs.filter(~Exists(Play.objects.filter(retry_of=OuterRef("pk"))))


def classify(action: str, company_id: str, play_ids: Iterable[str]) -> dict[str, Any]:
    """What ``action`` would do to each play: ``{"will": [...], "skip": [(reason, [ids]), ...]}``."""
    ids = list(dict.fromkeys(play_ids))
    rows = dict(Play.objects.for_company(company_id).filter(pk__in=ids).values_list("id", "state"))
    retried: set[str] = set()
    if action == Action.RETRY:
        retried = set(
            Play.objects.for_company(company_id).filter(retry_of_id__in=ids).values_list("retry_of_id", flat=True)
        )
    legal = ELIGIBLE[action]
    will: list[str] = []
    skip: dict[str, list[str]] = {}
    for pid in ids:
        state = rows.get(pid)
        if state is None:
            skip.setdefault("not found", []).append(pid)
        elif state not in legal:
            skip.setdefault(NOT_ELIGIBLE[action], []).append(pid)
        elif pid in retried:
            skip.setdefault("already retried", []).append(pid)
        else:
            will.append(pid)
    return {"will": will, "skip": sorted(skip.items()), "total": len(ids), "states": rows}


def summary(action: str, dry: dict[str, Any]) -> str:
    """``5 will be retried, 1 is not FAIL``."""
    parts = [f"{len(dry['will'])} {WILL[action]}"]
    parts += [f"{len(ids)} {'is' if len(ids) == 1 else 'are'} {reason}" for reason, ids in dry["skip"]]
    return ", ".join(parts)


# --- The job ---------------------------------------------------------------------------


def create(user: Any, action: str, play_ids: list[str], note: str = "", selection: dict[str, Any] | None = None) -> BulkJob:
    """Store a confirmed job and enqueue it after commit."""
    if action not in Action.values:
        raise ValueError(f"Unknown bulk action {action!r}")
    ids = list(dict.fromkeys(play_ids))
    with transaction.atomic():
        job = BulkJob.objects.create(
            company_id=user.company_id,
            created_by=user if getattr(user, "pk", None) else None,
            action=action,
            note=note,
            selection=selection or {},
            play_ids=ids,
            total=len(ids),
        )
        job.enqueue()
    return job


def _apply(job: BulkJob, play: Play, user: Any) -> tuple[str, str, Play | None]:
    action = job.action
    if action == Action.RETRY:
        if Play.objects.filter(retry_of=play).exists():
            return Outcome.REFUSED, "already retried", None
        new = play.retry(by=user, source="bulk")
        return Outcome.DONE, f"retried as {new.id}", new
    if action in (Action.APPROVE, Action.DECLINE):
        layer = play.pending_approval()
        if layer is None:
            raise InvalidState(f"Play {play.id} is {play.state} with no step waiting for approval")
        decision = "approved" if action == Action.APPROVE else "declined"
        play.decide(layer.id, decision, user, note=job.note, source="bulk")
        return Outcome.DONE, decision, None
    verb = {Action.CANCEL: "cancel", Action.HOLD: "hold", Action.RESUME: "resume"}[action]
    getattr(play, verb)(by=user, source="bulk")
    play.refresh_from_db(fields=["state"])
    return Outcome.DONE, f"now {play.state}", None


def run_one(job: BulkJob, play_id: str) -> bool:
    """Act on one play of the job. Return False when it had been done already."""
    user = job.created_by
    try:
        with transaction.atomic():
            if BulkItem.objects.filter(job=job, play_id=play_id).exists():
                return False
            play = Play.objects.for_company(job.company_id).filter(pk=play_id).first()
            new: Play | None = None
            if play is None:
                outcome, message = Outcome.MISSING, "no such play"
            else:
                try:
                    with transaction.atomic():
                        outcome, message, new = _apply(job, play, user)
                except InvalidState as exc:
                    outcome, message = Outcome.REFUSED, exc.message
                except Exception as exc:  # one bad play must not stop the batch (nor leave it RUN forever)
                    log.exception("bulk job %s: %s of play %s failed", job.id, job.action, play_id)
                    outcome, message, new = Outcome.ERROR, f"{type(exc).__name__}: {exc}", None
            BulkItem.objects.create(job=job, play_id=play_id, outcome=outcome, message=message[:500], new_play=new)
            BulkJob.objects.filter(pk=job.pk).update(processed=F("processed") + 1, updated_at=timezone.now())
    except IntegrityError:
        # Another delivery of this job did this play in the meantime; ours was rolled back.
        return False
    return True


def resend_stalled_one(idle_seconds: float) -> bool:
    """Send one unfinished job again whose task was lost: never sent (the broker was down),
    or its worker died (no play done for ``idle_seconds``). Running a job twice acts once per
    play (see above), so a job that was only slow loses nothing either. False: none."""
    now = timezone.now()
    with transaction.atomic():
        job = (
            BulkJob.objects.select_for_update(skip_locked=True)
            .filter(state__in=[JobState.PENDING, JobState.RUN], updated_at__lt=now - timedelta(seconds=idle_seconds))
            .order_by("updated_at")
            .first()
        )
        if job is None:
            return False
        log.warning("sending bulk job %s again (%s, no progress since %s)", job.pk, job.state, job.updated_at)
        BulkJob.objects.filter(pk=job.pk).update(updated_at=now)
        job.enqueue()
    return True


def run(job_id: str) -> bool:
    """Work through a job. Return False if it was already finished (a duplicate delivery)."""
    from tenancy.audit import record

    now = timezone.now()
    claimed = BulkJob.objects.filter(pk=job_id, state__in=[JobState.PENDING, JobState.RUN]).update(
        state=JobState.RUN, started_at=now, updated_at=now
    )
    if not claimed:
        return False
    job = BulkJob.objects.select_related("created_by").get(pk=job_id)
    for play_id in job.play_ids:
        run_one(job, play_id)
    with transaction.atomic():
        if not BulkJob.objects.filter(pk=job.pk, state=JobState.RUN).update(
            state=JobState.DONE, completed_at=timezone.now(), processed=job.items.count()
        ):
            return False
        job.refresh_from_db()
        items = list(job.items.order_by("id").values_list("play_id", "outcome", "new_play_id"))
        record(
            job.created_by,
            AUDIT_ACTIONS[job.action],
            job,
            source="bulk",
            total=job.total,
            counts=job.counts(),
            selection=job.selection,
            note=job.note,
            # The ids that changed (and the retries they got); the job's page has every row.
            plays=[[pid, new] if new else pid for pid, outcome, new in items if outcome == Outcome.DONE],
        )
    log.info("bulk job %s: %s of %s play(s) done", job.id, job.action, job.total)
    return True
