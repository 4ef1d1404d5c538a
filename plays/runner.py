"""The step runner: executes a RUN play's steps in order inside one Celery task.

1. ``run(play_id)`` takes the play's lease (a duplicate delivery loses and returns).
2. Each step from the cursor: filters → FILTERED, ``needsApproval`` → WAIT, else its layer
   opens RUN and the module runs (in a thread, or a killable fork: ``killable``), bounded
   by its timeout and retried with backoff; ``Park`` gives the worker up.
3. A success is recorded in the transaction that opens the next step (one commit per
   step), through ``Runner.record``, which retries transient database errors with the
   outcome it holds: a step runs again only when its worker died (the reaper requeues it).
``IterationRunner`` does the same for one item of a loop, with the iteration's cursor and lease.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.utils import timezone

from flows import credentials, vault
from flows.expr import ExpressionError, FilterError, Scope, evaluate_filters, render
from flows.models import Flow
from flows.modules import Park, RunContext, StepError, get_module
from flows.modules.base import check_output_size, json_size, max_output_bytes
from tenancy.storable import UnstorableValue, storable

from . import killable, observe
from .models import (
    LAYER_TERMINAL,
    TERMINAL,
    Iteration,
    IterationState,
    Layer,
    LayerState,
    Parked,
    Play,
    State,
    batched_events,
    error_body,
)
from .redaction import redact, redact_text, secrets_of

log = logging.getLogger(__name__)

_executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="flowplay-step")


def config(name: str) -> Any:
    return settings.FLOWPLAY[name]


class Stop(Exception):
    """The runner stops: the play left RUN or its lease moved (the lease is given up), or
    ``done``: it ended or was handed back (nothing to give up)."""

    def __init__(self, done: bool = False):
        super().__init__("done" if done else "stop")
        self.done = done


class StorageFailure(Exception):
    """A step's outcome cannot be recorded, and trying again would not change that."""


T = TypeVar("T")


def transient(exc: DatabaseError) -> bool:
    """Whether a database error is about the connection or the moment (a restart, a dropped
    connection, a deadlock, a lock timeout) rather than about what was written."""
    if isinstance(exc, InterfaceError):
        return True
    if isinstance(exc, OperationalError):
        # PostgreSQL's class 54, "program limit exceeded" (e.g. a too deep document), is
        # an OperationalError that no retry changes.
        return not str(getattr(exc.__cause__, "sqlstate", "") or "").startswith("54")
    return False


def reset_connection() -> None:
    """Drop this thread's database connection (or give it back to the pool, which checks
    it): the next query opens a working one."""
    try:
        connection.close()
    except Exception:  # already broken: nothing to close cleanly
        log.debug("closing a broken database connection failed", exc_info=True)


# --- Heartbeat ------------------------------------------------------------------------


class Heartbeat:
    """Extend the leases of the plays this process runs, and notice cancellations.

    One daemon thread per worker process. A worker killed with SIGKILL stops
    heartbeating, its leases expire after LEASE_SECONDS, and reap_stuck() requeues them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key → (play id, iteration pk or None, runner)
        self._owned: dict[str, tuple[str, int | None, str]] = {}
        self._ended: dict[str, threading.Event] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0

    def track(self, play_id: str, runner: str, iteration: int | None = None) -> threading.Event:
        key = play_id if iteration is None else f"{play_id}/{iteration}"
        with self._lock:
            self._owned[key] = (play_id, iteration, runner)
            ended = self._ended[key] = threading.Event()
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="flowplay-heartbeat", daemon=True)
                self._thread.start()
        return ended

    def untrack(self, play_id: str, iteration: int | None = None) -> None:
        key = play_id if iteration is None else f"{play_id}/{iteration}"
        with self._lock:
            self._owned.pop(key, None)
            self._ended.pop(key, None)

    def _loop(self) -> None:
        while True:
            time.sleep(config("HEARTBEAT_SECONDS"))
            try:
                self.beat()
            except Exception:  # a database restart must not kill the thread
                log.exception("heartbeat failed")
                try:
                    close_old_connections()  # reconnect on the next beat
                except Exception:  # the database is still down: try again next beat
                    log.warning("heartbeat could not reset its database connection", exc_info=True)

    def beat(self) -> None:
        with self._lock:
            owned = dict(self._owned)
        if not owned:
            return
        until = timezone.now() + timedelta(seconds=config("LEASE_SECONDS"))
        for play_id, iteration, runner in owned.values():
            if iteration is None:
                Play.renew_lease(play_id, runner, until)
            else:
                Iteration.renew_lease(iteration, runner, until)
        plays = {play_id for play_id, _, _ in owned.values()}
        gone = set(Play.objects.filter(pk__in=plays, state__in=TERMINAL).values_list("pk", flat=True))
        with self._lock:
            for key, (play_id, _, _) in self._owned.items():
                if play_id in gone and key in self._ended:
                    self._ended[key].set()


heartbeat = Heartbeat()

_definitions: dict[tuple[int, str, int], dict[str, Any]] = {}


def definition_of(play: Play) -> dict[str, Any]:
    # FlowVersion rows never change, so their definitions can be cached for good. The key
    # holds more than the pk because a rolled-back transaction can hand a pk out again.
    version = play.flow_version
    key = (version.pk, version.flow_id, version.version)
    found = _definitions.get(key)
    if found is None:
        if len(_definitions) > 1000:
            _definitions.clear()
        found = _definitions[key] = version.definition
    return found


def _runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run(play_id: str) -> None:
    runner = _runner_name()
    # Lease first, then one read: the play as it is once it is ours (two round trips).
    play = Play.take_lease(play_id, runner, config("LEASE_SECONDS"))
    if play is None:
        return
    ended = heartbeat.track(play.id, runner)
    try:
        with observe.running(play):
            Runner(play, runner, ended).loop()
    finally:
        heartbeat.untrack(play.id)


def run_iteration(iteration_id: int) -> None:
    """Run one iteration of a loop body: the same runner, on a slice of the steps."""
    runner = _runner_name()
    iteration = Iteration.objects.select_related("play__flow_version").filter(pk=iteration_id).first()
    if iteration is None or iteration.state != IterationState.RUN or iteration.play.state != State.RUN:
        return
    play = iteration.play
    if not iteration.claim(runner, config("LEASE_SECONDS")):
        return
    iteration.play = play
    ended = heartbeat.track(play.id, runner, iteration.pk)
    try:
        with observe.running(play, iteration):
            IterationRunner(play, runner, ended, iteration).loop()
    finally:
        heartbeat.untrack(play.id, iteration.pk)


def lease() -> datetime:
    return timezone.now() + timedelta(seconds=config("LEASE_SECONDS"))


class Runner:
    """Runs a play's steps from its cursor (``IterationRunner``: one loop iteration's)."""

    iteration: Iteration | None = None

    def __init__(self, play: Play, runner: str, ended: threading.Event):
        self.play = play
        self.runner = runner
        self.ended = ended
        self.definition = definition_of(play)
        self.steps: list[dict[str, Any]] = self.definition["layers"]
        self.start, self.end = -1, len(self.steps)
        self.loop_scope: dict[str, Any] = {}
        self.layers: dict[str, Layer] = {}
        self.outputs: dict[str, Any] = {}
        self.setup()
        self.load_layers()
        self.slice_ends = time.monotonic() + config("RUNNER_SLICE_SECONDS")
        # The layer that succeed() opened for the next step, whose first attempt has begun.
        self.opened: str | None = None

    # -- what a play's runner and an iteration's runner do differently ---------------------

    def setup(self) -> None:
        """The part of the flow this runner runs (``start``, ``end``) and its loop scope."""

    @property
    def cursor(self) -> int:
        return self.play.next_index

    @property
    def iteration_index(self) -> int | None:
        return None

    def load_layers(self) -> None:
        """Read the play's layers (an iteration's: also those of its loop body) as stored."""
        self.layers, self.outputs = {}, {}
        # Every layer is created with an event, except a retry's copies: a play whose only
        # event is play:started has none to read (one query less per play).
        if self.play.event_seq > 1 or self.play.retry_of_id is not None or self.play.next_index:
            self._add_layers(self.play.layers.filter(iteration__isnull=True))

    def _add_layers(self, layers: Any) -> None:
        for layer in layers:
            layer.play = self.play
            self.layers[layer.ref] = layer
            self.outputs[layer.ref] = layer.out if layer.state == LayerState.DONE else None

    def holds(self, until: datetime | None) -> bool:
        """In the current transaction: whether the play is still ours and RUN (lease renewed)."""
        return self.play.hold_lease(self.runner, until)

    def move(self, to: int) -> bool:
        return self.play.move_cursor(self.runner, to)

    def give_up(self) -> bool:
        """After a Stop: release the lease; False if the play is RUN again and ours to go on."""
        if self.play.release(self.runner):
            return True
        self.play.refresh_from_db()  # resumed while we were stopping: go on with it
        return self.play.state != State.RUN

    def hand_back(self) -> None:
        self.play.hand_back(self.runner)

    def at_end(self) -> None:
        with transaction.atomic():
            self.own(update_lease=False)
            self.play.finish(self.runner, self.all_filtered())

    def step_past(self, index: int, to: int) -> bool:
        """Move the cursor to ``to``: True if the play is still ours and RUN (lease renewed),
        False if it was held meanwhile (the step is recorded all the same)."""
        if self.play.step_past(self.runner, to, lease()):
            return True
        self.advance(index, to)  # ON_HOLD: recorded, nothing new starts
        return False

    def finishes(self) -> bool:
        """Inside succeed()'s transaction, past the last step: the play is DONE."""
        if not self.play.finish(self.runner, self.all_filtered()):
            raise Stop
        return True

    def all_filtered(self) -> bool:
        """Whether every step was filtered out (the runner holds all of the play's own layers)."""
        return bool(self.layers) and all(layer.state == LayerState.FILTERED for layer in self.layers.values())

    def take_back(self) -> None:
        """Before a retried write: hold the lease again. While the database was away no
        heartbeat could renew it; if the reaper requeued the play but no other runner took
        it yet, take it back, so that the outcome held here is written, not run again."""
        Play.take_lease(self.play.pk, self.runner, config("LEASE_SECONDS"))

    def refresh(self) -> None:
        self.play.refresh_from_db()

    def park_runner(self, until: datetime, ready: Callable[[], bool] | None) -> None:
        self.play.park(self.runner, until)
        if ready is not None and ready():
            self.play.wake()  # what it waits for ended before the park: go on now

    # A sleep step gives the worker up (an iteration's waits in its worker; others go on).
    parks_sleeps = True

    def parks(self, seconds: float) -> bool:
        """Whether a retry delay this long gives the worker up."""
        return seconds >= config("RETRY_PARK_SECONDS")

    def fan_out(self, step: dict[str, Any], layer: Layer, items: list[Any], concurrency: int) -> int | None:
        """RunContext.fan_out: create the loop's iterations (or see to them when the play
        wakes up at its iterator); the play waits without a runner until the last ends."""
        with transaction.atomic():
            self.own()
            if layer.loop_concurrency is None:
                Iteration.fan_out(self.play, layer, items, step["index"] + 1, concurrency)
                done = Iteration.dispatch(self.play, layer)
            else:
                done = Iteration.dispatch(self.play, layer, relaunch=True)
            if done is None:
                layer.park(Parked.RECHECK)
                self.play.wait_for_iterations(self.runner)
        return done

    # -- main loop ------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            try:
                self.step()
            except Stop as stop:
                if stop.done or self.give_up():
                    return

    def step(self) -> None:
        play = self.play
        if time.monotonic() > self.slice_ends and self.opened is None:
            self.hand_back()
            raise Stop(done=True)
        index = self.cursor
        if index >= self.end:
            self.at_end()
            raise Stop(done=True)
        step = self.steps[index]
        if play.deadline_at is not None and timezone.now() >= play.deadline_at:
            timeout = self.definition["execution"]["timeout"]
            self.fail_play(error_body("PLAY_TIMEOUT", f"The play exceeded its timeout of {timeout} s", step["ref"]))
        layer = self.layers.get(step["ref"])
        if layer is not None and layer.state in LAYER_TERMINAL:
            # Recorded before a crash that came between the layer and next_index; both are
            # written in one transaction, so this only guards against hand edits.
            self.advance(index, self.after(step) if layer.state == LayerState.DONE else None)
            return
        if layer is None:
            layer = self.open(step)
            if layer is None:
                return
        elif layer.state == LayerState.WAIT:
            with transaction.atomic():
                self.own()
                play.wait_for_approval(layer)
            raise Stop
        elif layer.parked == Parked.RECHECK:
            layer.unpark()  # woken up to look again (a child ended): the same attempt goes on
        elif layer.parked == Parked.RETRY:
            with transaction.atomic():  # woken up after a retry delay: the next attempt
                self.own()
                note = f"retry after {layer.retry_code}"
                layer.unpark()
                layer.begin_attempt(play, note)
        elif layer.parked == Parked.RESULT:
            self.succeed(step, layer, layer.parked_out)  # a sleep is over
            return
        elif layer.pk == self.opened:
            self.opened = None  # opened by succeed(): this is its first attempt
        else:
            with transaction.atomic():
                self.own()
                note = None if layer.approved and layer.attempts == 0 else "previous attempt interrupted"
                layer.begin_attempt(play, note)
        with observe.step(self, step, layer):  # span, log ids, step metrics
            self.execute(step, layer)

    def own(self, update_lease: bool = True) -> None:
        """Stop unless the play is still ours and RUN (checked inside the caller's transaction)."""
        if not self.holds(lease() if update_lease else None):
            raise Stop

    def advance(self, index: int, to: int | None = None) -> None:
        """Move the cursor past step ``index`` (or to ``to``)."""
        if not self.move(index + 1 if to is None else to):
            raise Stop

    def after(self, step: dict[str, Any]) -> int:
        """The index of the step that follows ``step`` when it succeeds (a loop: its end)."""
        module = get_module(step["appId"])
        return module.after(self.steps, step["index"]) if module is not None else step["index"] + 1

    def scope(self) -> Scope:
        return Scope(
            prev={"args": self.play.args, **self.outputs, **self.loop_scope},
            flow_id=self.play.flow_id,
            play_id=self.play.id,
            credentials=credentials.CredentialsView(self.play.company_id, self.play.id),
        )

    # -- RunContext callbacks ---------------------------------------------------------------

    def collect(self, ref: str) -> list[Any]:
        """The outputs of a loop step's finished iterations, in item order."""
        return list(
            Layer.objects.filter(play_id=self.play.pk, ref=ref, iteration__isnull=False, state=LayerState.DONE)
            .order_by("iteration")
            .values_list("out", flat=True)
        )

    def child_state(self, layer: Layer) -> dict[str, Any] | None:
        """RunContext.child_state: the child play that ``layer`` started, if any."""
        child = Play.objects.filter(parent_layer_id=layer.pk).order_by("created_at").first()
        if child is None:
            return None
        out = None
        if child.state in TERMINAL:
            last = child.layers.filter(state=LayerState.DONE, iteration__isnull=True).order_by("-index").first()
            out = last.out if last is not None else None
        ended = child.state in TERMINAL
        return {"id": child.id, "state": str(child.state), "ended": ended, "error": child.error, "out": out}

    def start_child(self, layer: Layer, key: str, args: dict[str, Any]) -> dict[str, Any]:
        """RunContext.start_child: trigger flow ``key`` (id or permanentId) as a child play
        of this step, within FLOWPLAY_MAX_SUBFLOW_DEPTH and FLOWPLAY_MAX_DESCENDANT_PLAYS."""
        parent = self.play
        depth, above = 1, parent.parent_id
        limit = settings.FLOWPLAY["MAX_SUBFLOW_DEPTH"]
        while above is not None and depth <= limit:
            depth += 1
            above = Play.objects.filter(pk=above).values_list("parent_id", flat=True).first()
        if depth + 1 > limit:
            raise StepError(
                f"Subflow depth limit of {limit} plays reached (a flow calling itself?)", "SUBFLOW_DEPTH", False
            )
        flow = Flow.objects.resolve(parent.company_id, key)
        if flow is None:
            raise StepError(f"No flow {key!r}", "NOT_FOUND", retryable=False)
        if not flow.enabled:
            raise StepError(f"Flow {key!r} is disabled", "FLOW_DISABLED", retryable=False)
        budget = settings.FLOWPLAY["MAX_DESCENDANT_PLAYS"]
        with transaction.atomic():
            # Iterations of one play start children at once: lock the root so that
            # counting and starting are one step per tree (SQLite serializes anyway).
            Play.objects.select_for_update().filter(pk=parent.root_id or parent.pk).first()
            if budget and parent.descendants() >= budget:
                raise StepError(
                    f"The root play {parent.root_id or parent.pk} already started {budget} subflow plays "
                    "(FLOWPLAY_MAX_DESCENDANT_PLAYS)",
                    "SUBFLOW_LIMIT",
                    retryable=False,
                )
            child, _ = Play.trigger(flow, args, parent=parent, parent_layer=layer)
        ended = child.state in TERMINAL
        return {"id": child.id, "state": str(child.state), "ended": ended, "error": child.error, "out": None}

    # -- opening a step -------------------------------------------------------------------

    def filter_verdict(self, step: dict[str, Any]) -> bool | FilterError | ExpressionError:
        """Whether the step's filters let it run, or the error that evaluating them raised."""
        if not step.get("filters"):
            return True
        try:
            return evaluate_filters(step["filters"], self.scope())
        except (FilterError, ExpressionError) as exc:  # a value's expression can fail too
            return exc

    def open(self, step: dict[str, Any]) -> Layer | None:
        """Create the step's layer; return it if the step must run now."""
        play = self.play
        verdict = self.filter_verdict(step)
        if verdict is True and not step.get("needsApproval") and self.iteration_index is None:
            opened = self.one_statement(lambda: play.open_on(self.runner, step, lease()))
            if opened is not None:
                self.layers[step["ref"]] = opened
                return opened
        with transaction.atomic():
            self.own()
            iteration = self.iteration_index
            if isinstance(verdict, (FilterError, ExpressionError)):
                layer = Layer.open(play, step, LayerState.RUN, iteration=iteration)
            elif not verdict:
                self.advance(step["index"])
                self.layers[step["ref"]] = Layer.open(play, step, LayerState.FILTERED, iteration=iteration)
                self.outputs[step["ref"]] = None
                return None
            elif step.get("needsApproval"):
                layer = Layer.open(play, step, LayerState.WAIT, iteration=iteration)
                play.wait_for_approval(layer)
            else:
                layer = Layer.open(play, step, LayerState.RUN, iteration=iteration)
        self.layers[step["ref"]] = layer
        if layer.state == LayerState.WAIT:
            raise Stop  # after commit: raising inside atomic() would roll the wait back
        if isinstance(verdict, (FilterError, ExpressionError)):
            code = "FILTER_ERROR" if isinstance(verdict, FilterError) else "EXPRESSION_ERROR"
            self.finish_failed(step, layer, error_body(code, str(verdict)))
            return None
        return layer

    # -- executing a step -------------------------------------------------------------------

    def execute(self, step: dict[str, Any], layer: Layer) -> None:
        retry = step.get("retry") or {}
        retries = int(retry.get("count") or 0)
        delay = float(retry.get("delayMs") or 0) / 1000
        multiplier = float(retry.get("backoffMultiplier") or 1)
        jitter = bool(retry.get("jitter"))
        module = get_module(step["appId"])
        timeout = float(step.get("timeout") or config("DEFAULT_STEP_TIMEOUT"))
        while True:
            error = self.attempt(step, layer, module, timeout)
            if error is None:
                return
            retryable = error.pop("retryable", True)
            if not retryable or layer.attempts > retries:
                self.finish_failed(step, layer, error)
                return
            wait = delay * multiplier ** (layer.attempts - 1)
            if jitter:
                wait *= random.uniform(0.8, 1.2)
            if self.parks(wait):
                # A long delay gives the worker up: the play is DEFERRED until the next attempt.
                until = timezone.now() + timedelta(seconds=wait)
                self.park(layer, until, Parked.RETRY, retry_code=error["code"])
            self.sleep(wait)
            with transaction.atomic():
                self.own()
                layer.begin_attempt(self.play, f"retry after {error['code']}", error=redact(error))

    def context(self, step: dict[str, Any], layer: Layer, timeout: float, auth: Any) -> RunContext:
        return RunContext(
            play_id=self.play.id,
            flow_id=self.play.flow_id,
            company_id=self.play.company_id,
            ref=step["ref"],
            attempt=layer.attempts,
            timeout=timeout,
            layer_id=layer.id,
            iteration=layer.iteration,
            collect=self.collect,
            auth=auth,
            fan_out=lambda items, concurrency: self.fan_out(step, layer, items, concurrency),
            start_child=lambda key, args: self.start_child(layer, key, args),
            child_state=lambda: self.child_state(layer),
        )

    def attempt(self, step: dict[str, Any], layer: Layer, module: Any, timeout: float) -> dict[str, Any] | None:
        """Run one attempt; record success; return the error of a failed attempt."""
        if module is None:
            return {**error_body("UNKNOWN_MODULE", f"No module with appId {step['appId']!r}"), "retryable": False}
        # The credentials this attempt reads ($credentials, `auth`) are masked in what it leaves.
        with vault.collecting() as secrets:
            try:
                args = step.get("args") or {}
                if module.raw_args:
                    raw = {k: v for k, v in args.items() if k in module.raw_args}
                    args = {**render({k: v for k, v in args.items() if k not in module.raw_args}, self.scope()), **raw}
                else:
                    args = render(args, self.scope())
                auth = None
                if module.uses_credentials and isinstance(args.get("auth"), str):
                    auth = credentials.resolve_auth(self.play.company_id, args["auth"], self.play.id)
            except ExpressionError as exc:
                return {**error_body("EXPRESSION_ERROR", redact_text(str(exc), secrets)), "retryable": False}
            except credentials.CredentialError as exc:
                return {**error_body(exc.code, redact_text(exc.message, secrets)), "retryable": exc.retryable}
        if self.play.deadline_at is not None:
            timeout = min(timeout, max(0.0, (self.play.deadline_at - timezone.now()).total_seconds()))
        ctx = self.context(step, layer, timeout, auth)
        try:
            if module.inline:
                out = _masked(module, args, ctx, secrets)
            elif module.cpu_bound and not module.cheap(args) and config("KILLABLE_STEPS") and killable.available():
                # A forked child that a timeout or a cancel kills (plays/killable.py). It runs
                # _masked, not _call: it must not close the database connection it inherited.
                out = killable.call(
                    _masked, module, args, ctx, secrets, timeout=timeout, ended=self.ended, max_bytes=max_output_bytes()
                )
            else:
                # The step's thread sees this one's context: log ids, the trace (curl's traceparent).
                out = self.wait(
                    _executor.submit(contextvars.copy_context().run, _call, module, args, ctx, secrets), timeout
                )
        except killable.Cancelled:
            raise Stop from None
        except FutureTimeout:
            if self.play.deadline_at is not None and timezone.now() >= self.play.deadline_at:
                self.fail_play(error_body("PLAY_TIMEOUT", "The play exceeded its timeout", step["ref"]))
            return error_body("TIMEOUT", f"Step {step['ref']} timed out after {timeout:g} s")
        except Park as park:
            if park.until is None:
                raise Stop(done=True) from None  # fan_out handed the play over already
            if park.out is not None and not self.parks_sleeps:
                self.sleep(max(0.0, (park.until - timezone.now()).total_seconds()))
                self.succeed(step, layer, park.out)
                return None
            parked = Parked.RECHECK if park.out is None else Parked.RESULT
            self.park(layer, park.until, parked, out=park.out, ready=park.ready)
        except StepError as exc:
            return {**error_body(exc.code, str(exc)), "retryable": exc.retryable}
        except Stop:
            raise  # from a RunContext callback (the play is no longer ours)
        except Exception as exc:  # a module bug must not kill the runner
            log.exception("step %s of play %s raised", step["ref"], self.play.id)
            return error_body("STEP_ERROR", f"{type(exc).__name__}: {exc}")
        self.succeed(step, layer, out)
        return None

    def park(
        self,
        layer: Layer,
        until: datetime,
        parked: str,
        *,
        out: Any = None,
        retry_code: str = "",
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """Give the worker up until ``until``, or until ``ready`` says so."""
        try:
            out = storable(out) if out is not None else None

            def write(retry: bool) -> None:
                with transaction.atomic():
                    self.own()
                    layer.park(parked, out, retry_code)
                    self.park_runner(until, ready)

            self.record(write)
        except (StorageFailure, UnstorableValue) as exc:
            self.store_failed(self.steps[layer.index], layer, exc)
        raise Stop

    def wait(self, future: Future, timeout: float) -> Any:
        """Wait for a step, abandoning it if the play is cancelled meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FutureTimeout
            try:
                return future.result(timeout=min(remaining, 0.25))
            except FutureTimeout:
                if self.ended.is_set():
                    raise Stop from None
                continue

    def sleep(self, seconds: float) -> None:
        if self.ended.wait(seconds):
            raise Stop

    # -- recording outcomes -----------------------------------------------------------------

    def record(self, write: Callable[[bool], T]) -> T:
        """Write a step's outcome: ``write(retry)`` is one transaction (or one statement).

        A transient database error is retried here on a fresh connection, with backoff, for
        up to RECORD_RETRY_SECONDS, with the outcome this runner holds (the step does not run
        again; ``retry``: an earlier try may have committed). Past that the error propagates
        and the reaper requeues the play; any other error raises ``StorageFailure``.
        """
        deadline = time.monotonic() + config("RECORD_RETRY_SECONDS")
        pause = 0.05
        retry = False
        while True:
            try:
                if retry:
                    self.take_back()
                return write(retry)
            except UnstorableValue as exc:
                raise StorageFailure(str(exc)) from exc
            except DatabaseError as exc:
                if not transient(exc):
                    raise StorageFailure(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
                # Inside a caller's transaction (tests) there is nothing to reconnect.
                if connection.in_atomic_block or time.monotonic() + pause > deadline:
                    raise
                log.warning("recording play %s failed (%s); retrying in %.2f s", self.play.id, exc, pause)
                reset_connection()
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                retry = True

    def recorded(self, layer: Layer) -> bool:
        """Whether ``layer`` has ended in the database: a retried write's earlier try committed."""
        if not Layer.objects.filter(pk=layer.pk).exclude(state__in=[LayerState.RUN, LayerState.WAIT]).exists():
            return False
        # Carry on from what is stored, like a runner that took the play over.
        self.refresh()
        self.load_layers()
        following = self.steps[self.cursor] if self.cursor < self.end else None
        opened = self.layers.get(following["ref"]) if following is not None else None
        self.opened = opened.pk if opened is not None and opened.state == LayerState.RUN else None
        return True

    def store_failed(self, step: dict[str, Any], layer: Layer, exc: Exception) -> None:
        """The step's outcome cannot be stored: the step fails once, and onError decides."""
        log.error("the outcome of step %s of play %s cannot be stored: %s", step["ref"], self.play.id, exc)
        self.outputs[step["ref"]] = None
        message = f"The outcome of step {step['ref']} could not be stored: {exc}"
        self.finish_failed(step, layer, error_body("STORAGE_ERROR", message[:1000]))

    def succeed(self, step: dict[str, Any], layer: Layer, out: Any) -> None:
        """Record the step DONE and, in the same transaction, go on: open the next step's
        layer when it can start at once, or finish the play after its last step."""
        try:
            out = storable(out)  # the next steps see what is stored, here and after a resume
        except UnstorableValue as exc:
            self.store_failed(step, layer, exc)
            return
        self.outputs[step["ref"]] = out  # the next step's filters may read it
        following = self.opens_next(step)
        try:
            finished = self.record(lambda retry: self._record_success(step, layer, out, following, retry))
        except StorageFailure as exc:
            self.store_failed(step, layer, exc)
            return
        if finished:
            raise Stop(done=True)

    def _record_success(self, step: dict[str, Any], layer: Layer, out: Any, following: Any, retry: bool) -> bool:
        """succeed()'s write; True when the play finished."""
        if retry and self.recorded(layer):
            return self.play.state in TERMINAL
        if following is not None and self.step_on(layer, out, following):
            return False
        if following is None and self.finish_on(step, layer, out):
            return True
        with transaction.atomic(), batched_events():
            running = self.step_past(step["index"], self.after(step))
            if not layer.end(LayerState.DONE, out=out):
                raise Stop
            if running:
                return self.go_on(following)
        return False

    def opens_next(self, step: dict[str, Any]) -> dict[str, Any] | None:
        """The step after ``step`` if its layer opens RUN in the transaction that ends
        ``step``; None if there is none or it needs step() (an approval, a filter that says
        no, a deadline, the end of the time slice)."""
        index = self.after(step)
        if index >= self.end:
            return None
        following = self.steps[index]
        if (
            following.get("needsApproval")
            or following["ref"] in self.layers
            or time.monotonic() > self.slice_ends
            or (self.play.deadline_at is not None and timezone.now() >= self.play.deadline_at)
        ):
            return None
        return following if self.filter_verdict(following) is True else None

    def step_on(self, layer: Layer, out: Any, following: dict[str, Any]) -> bool:
        """succeed() in one statement where the database can (Play.step_on): a play's step
        DONE and ``following`` started. False: nothing written, succeed() goes on."""
        opened = self.one_statement(lambda: self.play.step_on(self.runner, layer, out, following, lease()))
        if opened is None:
            return False
        self.layers[following["ref"]] = opened
        self.opened = opened.pk
        return True

    def finish_on(self, step: dict[str, Any], layer: Layer, out: Any) -> bool:
        """succeed() after a play's last step in one statement where the database can
        (Play.finish_on): the step DONE and the play DONE. False: nothing written."""
        to = self.after(step)
        if self.iteration is not None or to < self.end:
            return False
        return bool(self.one_statement(lambda: self.play.finish_on(self.runner, layer, out, to)))

    @staticmethod
    def one_statement(write: Callable[[], T]) -> T | None:
        """``write`` (one of the Play verbs that write a step boundary in one statement) where
        the database can; None elsewhere. Alone it is atomic; inside a caller's transaction
        (tests) a savepoint keeps a failed statement from breaking that transaction."""
        if not Play.can_step_on():
            return None
        with transaction.atomic() if connection.in_atomic_block else nullcontext():
            return write()

    def go_on(self, following: dict[str, Any] | None) -> bool:
        """Inside succeed()'s transaction, on a play that is ours and RUN: open the layer of
        ``following`` (see opens_next), or finish after the last step. True when the play finished."""
        if self.cursor >= self.end:
            return self.finishes()
        if following is None:
            return False
        layer = Layer.open(self.play, following, LayerState.RUN, iteration=self.iteration_index)
        self.layers[following["ref"]] = layer
        self.opened = layer.pk
        return False

    def finish_failed(self, step: dict[str, Any], layer: Layer, error: dict[str, Any]) -> None:
        try:
            failed = self.record(lambda retry: self._record_failure(step, layer, error))
        except StorageFailure as exc:
            # Not even the failure could be stored: the play fails with a plain error.
            log.error("the failure of step %s of play %s cannot be stored: %s", step["ref"], self.play.id, exc)
            failed = self.record(
                lambda retry: self.play.fail(
                    error_body(
                        "STORAGE_ERROR", f"Step {step['ref']} failed and its error could not be stored", step["ref"]
                    ),
                    from_states=[State.RUN, State.ON_HOLD],
                )
            )
        self.outputs[step["ref"]] = None
        if failed is not None:
            raise Stop(done=failed)

    def _record_failure(self, step: dict[str, Any], layer: Layer, error: dict[str, Any]) -> bool | None:
        """finish_failed()'s write: whether the play failed (None: onError let it go on)."""
        on_error = step.get("onError") or "fail"
        with transaction.atomic():
            if on_error in ("skip", "continue"):
                self.advance(step["index"])
                layer.end(LayerState.SKIP if on_error == "skip" else LayerState.FAIL, error=error)
                return None
            layer.end(LayerState.FAIL, error=error)
            message = f"Step {step['ref']} failed: {error['message']}"
            return self.play.fail(
                error_body("STEP_FAILED", message, step["ref"]), from_states=[State.RUN, State.ON_HOLD]
            )

    def fail_play(self, error: dict[str, Any]) -> None:
        def write(retry: bool) -> None:
            with transaction.atomic():
                self.play.fail(error, from_states=[State.RUN])

        self.record(write)
        raise Stop(done=True)


class IterationRunner(Runner):
    """Runs one iteration of a loop: the loop body's steps for one item, with the
    iteration's own cursor and lease; the play's row stays the lock of every write."""

    def __init__(self, play: Play, runner: str, ended: threading.Event, iteration: Iteration):
        self.iteration = self.it = iteration  # ``it``: never None here
        super().__init__(play, runner, ended)

    def setup(self) -> None:
        iteration = self.it
        loop = next(s for s in self.steps if s["ref"] == iteration.ref)
        self.start, self.end = loop["index"], self.after(loop)
        total = self.play.iterations.filter(ref=iteration.ref).count()
        self.loop_scope = {
            iteration.ref: {
                "item": iteration.item,
                "index": iteration.index,
                "total": total,
                "isLast": iteration.index == total - 1,
            }
        }

    @property
    def cursor(self) -> int:
        return self.it.next_index

    @property
    def iteration_index(self) -> int | None:
        return self.it.index

    def load_layers(self) -> None:
        super().load_layers()
        layers = self.play.layers.filter(iteration=self.iteration_index, index__gt=self.start, index__lt=self.end)
        self._add_layers(layers)

    def holds(self, until: datetime | None) -> bool:
        # Lock the play row first, as every writer of the play does (its events take their
        # seq on it): taken after this iteration's layer, it could deadlock with a cancel
        # that holds the play and ends that layer.
        return self.lock_play() == State.RUN and self.it.hold_lease(self.runner, until)

    def lock_play(self) -> str | None:
        """Lock the play's row for this transaction; its state."""
        return Play.objects.select_for_update().filter(pk=self.play.pk).values_list("state", flat=True).first()

    def move(self, to: int) -> bool:
        return self.it.move_cursor(self.runner, to)

    def give_up(self) -> bool:
        self.it.release(self.runner)
        return True

    def hand_back(self) -> None:
        self.it.release(self.runner)
        with transaction.atomic():
            self.it.enqueue()

    def at_end(self) -> None:
        """This iteration is over: launch the next ones; the last one wakes the play up."""
        with transaction.atomic():
            if self.it.end(self.runner, IterationState.DONE):
                loop = self.play.layers.filter(ref=self.it.ref, iteration__isnull=True).first()
                if loop is not None and Iteration.dispatch(self.play, loop) is not None:
                    self.play.wake_from_loop()

    def step_past(self, index: int, to: int) -> bool:
        self.lock_play()  # before the iteration's rows (see holds)
        self.advance(index, to)
        try:
            self.own()
        except Stop:
            return False
        return True

    def finishes(self) -> bool:
        return False  # the next step() ends the iteration

    def take_back(self) -> None:
        self.it.claim(self.runner, config("LEASE_SECONDS"))

    def refresh(self) -> None:
        super().refresh()
        self.it.refresh_from_db()

    def park_runner(self, until: datetime, ready: Callable[[], bool] | None) -> None:
        self.it.release(self.runner)
        if ready is not None and ready():
            self.it.enqueue()  # what it waits for ended before the release: go on now

    parks_sleeps = False  # iterations are not parked one by one: it waits in its worker

    def parks(self, seconds: float) -> bool:
        return False

    def fan_out(self, step: dict[str, Any], layer: Layer, items: list[Any], concurrency: int) -> int | None:
        raise StepError("An iterator cannot run inside another iterator's loop", "NESTED_LOOP", retryable=False)

    def step_on(self, layer: Layer, out: Any, following: dict[str, Any]) -> bool:
        return False


def _call(module: Any, args: dict[str, Any], ctx: RunContext, revealed: Any = ()) -> Any:
    try:
        return _masked(module, args, ctx, revealed)
    finally:
        # Modules that touch the ORM (kv, subflow) open a connection in this thread.
        close_old_connections()


def _masked(module: Any, args: dict[str, Any], ctx: RunContext, revealed: Any = ()) -> Any:
    # Credentials in the step's args, and those it read by name, never reach its stored
    # out, error, events or logs.
    secrets = secrets_of(args) | set(revealed)
    try:
        out = redact(module.run(args, ctx), secrets)
        check_output_size(json_size(out))  # FLOWPLAY_MAX_OUTPUT_BYTES → OUTPUT_TOO_LARGE
        return out
    except StepError as exc:
        exc.message = redact_text(exc.message, secrets)
        exc.args = (exc.message,)
        raise
    except Park as park:
        park.out = redact(park.out, secrets) if park.out is not None else None
        raise
    except Exception as exc:
        if any(secret in str(exc) for secret in secrets):
            raise StepError(redact_text(f"{type(exc).__name__}: {exc}", secrets)) from None
        raise
