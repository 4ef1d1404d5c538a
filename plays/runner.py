"""The step runner: executes a RUN play's steps in order inside one Celery task.

Consecutive steps run in the same worker without a broker round trip; the play goes back
to the broker only when something forces a hand-off (an approval, a sleep, the end of the
runner's time slice). Every state change is a model verb committed before the next step
starts, so a runner that dies loses at most the attempt it was in: the play's lease
expires, the reaper requeues the play, and the next runner counts the interrupted
attempt and carries on. A step that had finished is never run again.

1. ``run(play_id)`` claims the play's lease (a compare-and-set; a duplicate delivery of
   the task loses and returns).
2. For each step from ``play.next_index``: filters → ``FILTERED``; ``needsApproval`` →
   ``WAIT``; else the layer is opened (``RUN``), its args rendered and the module called
   in a thread (a ``cpu_bound`` one in a forked child that a timeout or cancel kills:
   ``plays/killable.py``), bounded by the step's timeout, retried with backoff.
3. The outcome is recorded together with ``next_index``; ``onError`` decides whether the
   play goes on. A success is recorded in the same transaction that opens the next step's
   layer (or finishes the play): one commit per step, each state change still durable
   before its event is sent.
4. Recording an outcome goes through ``Runner.record``: a transient database error (a
   restart, a dropped connection) is retried there with the outcome the runner holds, so
   the step does not run again; a write that cannot succeed (``StorageFailure``) fails the
   step once with ``STORAGE_ERROR``. A step runs again only when its worker died.
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
from datetime import timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.utils import timezone

from flows import credentials, vault
from flows.expr import ExpressionError, FilterError, Scope, evaluate_filters, render
from flows.modules import Park, RunContext, StepError, get_module
from flows.modules.base import check_output_size, json_size, max_output_bytes
from flows.modules.iterator import loop_end
from flows.storable import UnstorableValue, storable

from . import killable, observe
from .models import (
    LAYER_TERMINAL,
    TERMINAL,
    Iteration,
    IterationState,
    Layer,
    LayerState,
    Play,
    State,
    batched_events,
    dispatch,
    error_body,
    fan_out,
)
from .redaction import redact, redact_text, secrets_of

log = logging.getLogger(__name__)

_executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="flowplay-step")


def config(name: str) -> Any:
    return settings.FLOWPLAY[name]


class Stop(Exception):
    """The runner must stop: the play left RUN, or its lease moved to another runner."""


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
                Play.objects.filter(pk=play_id, runner=runner, state__in=[State.RUN, State.ON_HOLD]).update(
                    lease_until=until
                )
            else:
                Iteration.objects.filter(pk=iteration, runner=runner, state=IterationState.RUN).update(
                    lease_until=until
                )
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
            Runner(play, runner, ended, iteration).loop()
    finally:
        heartbeat.untrack(play.id, iteration.pk)


# Stored in a layer's parked_out while the play waits for something that the module must
# look at again when the play wakes up (a subflow's child play), as opposed to a sleep,
# whose result is known when it parks.
RERUN = {"$rerun": True}
# parked_out of a layer whose next attempt waits for its retry delay: {"$retry": <error code>}.
RETRY = "$retry"


class Runner:
    """Runs a play's steps from its cursor; or, for an iteration, the loop body's steps
    for one item, with the iteration's own cursor and lease."""

    def __init__(self, play: Play, runner: str, ended: threading.Event, iteration: Iteration | None = None):
        self.play = play
        self.runner = runner
        self.ended = ended
        self.iteration = iteration
        self.definition = definition_of(play)
        self.steps: list[dict[str, Any]] = self.definition["layers"]
        self.end = len(self.steps)
        self.layers: dict[str, Layer] = {}
        self.outputs: dict[str, Any] = {}
        self.loop_scope: dict[str, Any] = {}
        self.start = -1
        if iteration is not None:
            self.start = next(s["index"] for s in self.steps if s["ref"] == iteration.ref)
            self.end = loop_end(self.steps, self.start)
            total = iteration.play.iterations.filter(ref=iteration.ref).count()
            self.loop_scope = {
                iteration.ref: {
                    "item": iteration.item,
                    "index": iteration.index,
                    "total": total,
                    "isLast": iteration.index == total - 1,
                }
            }
        self.load_layers()
        self.slice_ends = time.monotonic() + config("RUNNER_SLICE_SECONDS")
        # The layer that succeed() opened for the next step, whose first attempt has begun.
        self.opened: str | None = None

    def load_layers(self) -> None:
        """Read the play's layers (an iteration's: those of its loop body) as they are stored."""
        play, iteration = self.play, self.iteration
        self.layers, self.outputs = {}, {}
        for layer in play.layers.filter(iteration__isnull=True):
            layer.play = play
            self.layers[layer.ref] = layer
            self.outputs[layer.ref] = layer.out if layer.state == LayerState.DONE else None
        if iteration is not None:
            for layer in play.layers.filter(iteration=iteration.index, index__gt=self.start, index__lt=self.end):
                layer.play = play
                self.layers[layer.ref] = layer
                self.outputs[layer.ref] = layer.out if layer.state == LayerState.DONE else None

    @property
    def cursor(self) -> int:
        return self.iteration.next_index if self.iteration is not None else self.play.next_index

    # -- main loop ------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            try:
                self.step()
            except Stop:
                if self.iteration is not None:
                    self.iteration.release(self.runner)
                    return
                if self.play.release(self.runner):
                    return
                # Resumed while we were stopping: carry on with the fresh state.
                self.play.refresh_from_db()
                if self.play.state != State.RUN:
                    return
            except _Done:
                return

    def step(self) -> None:
        play = self.play
        if time.monotonic() > self.slice_ends and self.opened is None:
            if self.iteration is not None:
                self.iteration.release(self.runner)
                with transaction.atomic():
                    self.iteration.enqueue()
            else:
                play.hand_back(self.runner)
            raise _Done
        index = self.cursor
        if index >= self.end:
            if self.iteration is not None:
                self.end_iteration(IterationState.DONE)
            with transaction.atomic():
                self.own(update_lease=False)
                play.finish(self.runner)
            raise _Done
        step = self.steps[index]
        if step["appId"] == "iterator":
            self.iterate(step)
            return
        if play.deadline_at is not None and timezone.now() >= play.deadline_at:
            self.fail_play(
                error_body(
                    "PLAY_TIMEOUT",
                    f"The play exceeded its timeout of {self.definition['execution']['timeout']} s",
                    step["ref"],
                )
            )
        layer = self.layers.get(step["ref"])
        if layer is not None and layer.state in LAYER_TERMINAL:
            # Recorded before a crash that came between the layer and next_index; both are
            # written in one transaction, so this only guards against hand edits.
            self.advance(index)
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
        elif layer.parked_out == RERUN:
            # Woken up to look again (a subflow's child ended): the same attempt goes on.
            Layer.objects.filter(pk=layer.pk).update(parked_out=None)
            layer.parked_out = None
        elif isinstance(layer.parked_out, dict) and RETRY in layer.parked_out:
            # Woken up after a retry delay: the next attempt begins.
            with transaction.atomic():
                self.own()
                Layer.objects.filter(pk=layer.pk).update(parked_out=None)
                layer.begin_attempt(play, f"retry after {layer.parked_out[RETRY]}")
            layer.parked_out = None
        elif layer.parked_out is not None:
            self.succeed(step, layer, layer.parked_out)
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
        """Check, inside the current transaction, that the play is still ours and RUN."""
        changes: dict[str, Any] = {}
        if update_lease:
            changes["lease_until"] = timezone.now() + timedelta(seconds=config("LEASE_SECONDS"))
        if self.iteration is not None:
            # Lock the play row first, as every writer of the play does (its events take
            # their seq on it): taken after this iteration's layer, it could deadlock with
            # a cancel that holds the play and ends that layer.
            if self.lock_play() != State.RUN:
                raise Stop
            query = Iteration.objects.filter(pk=self.iteration.pk, runner=self.runner, state=IterationState.RUN)
        else:
            query = Play.objects.filter(pk=self.play.pk, runner=self.runner, state=State.RUN)
        if not (query.update(**changes) if changes else query.exists()):
            raise Stop

    def lock_play(self) -> str | None:
        """Lock the play's row for this transaction; its state."""
        return Play.objects.select_for_update().filter(pk=self.play.pk).values_list("state", flat=True).first()

    def advance(self, index: int, to: int | None = None) -> None:
        """Move the cursor past step ``index`` (or to ``to``)."""
        after = index + 1 if to is None else to
        if self.iteration is not None:
            n = Iteration.objects.filter(pk=self.iteration.pk, runner=self.runner, state=IterationState.RUN).update(
                next_index=after
            )
            if not n:
                raise Stop
            self.iteration.next_index = after
            return
        n = (
            Play.objects.filter(pk=self.play.pk, runner=self.runner)
            .exclude(state__in=TERMINAL)
            .update(next_index=after)
        )
        if not n:
            raise Stop
        self.play.next_index = after

    def scope(self) -> Scope:
        return Scope(
            prev={"args": self.play.args, **self.outputs, **self.loop_scope},
            flow_id=self.play.flow_id,
            play_id=self.play.id,
            credentials=credentials.CredentialsView(self.play.company_id, self.play.id),
        )

    # -- loops ----------------------------------------------------------------------------

    def iterate(self, step: dict[str, Any]) -> None:
        """Start the loop of an iterator step, or see to a loop in progress.

        The iterations run as tasks of their own across the worker fleet; this runner
        gives the play up meanwhile, and the last iteration to end hands the play back
        to the broker at the step after the loop.
        """
        play = self.play
        if self.iteration is not None:
            layer = self.open(step)
            if layer is not None:
                self.finish_failed(
                    step, layer, error_body("NESTED_LOOP", "An iterator cannot run inside another iterator's loop")
                )
            return
        end = loop_end(self.steps, step["index"])
        layer = self.layers.get(step["ref"])
        if layer is None:
            layer = self.open(step)
            if layer is None:
                return
            try:
                args = render(step.get("args") or {}, self.scope())
                if isinstance(args.get("items"), dict) and "items" in args["items"]:
                    args["items"] = args["items"]["items"]  # an enumeration's or aggregator's out
                args = get_module("iterator").clean(args)
            except ExpressionError as exc:
                self.finish_failed(step, layer, error_body("EXPRESSION_ERROR", str(exc)))
                return
            except StepError as exc:
                self.finish_failed(step, layer, error_body(exc.code, str(exc)))
                return
            items, concurrency = args["items"], args["concurrency"]
            limit = config("MAX_ITERATOR_ITEMS")
            if len(items) > limit:
                self.finish_failed(
                    step,
                    layer,
                    error_body("TOO_MANY_ITEMS", f"{len(items)} items exceed the limit of {limit} per iterator"),
                )
                return
            with transaction.atomic():
                self.own()
                Layer.objects.filter(pk=layer.pk).update(parked_out={"concurrency": concurrency, "total": len(items)})
                layer.parked_out = {"concurrency": concurrency, "total": len(items)}
                fan_out(play, layer, items, step["index"] + 1)
                if not items:
                    layer.end(LayerState.DONE, out={"count": 0})
                    self.outputs[step["ref"]] = {"count": 0}
                    self.advance(step["index"], to=end)
                    return
                self.await_loop()
            raise _Done
        if layer.state in LAYER_TERMINAL:
            self.advance(step["index"], to=end if layer.state == LayerState.DONE else step["index"] + 1)
            return
        with transaction.atomic():
            self.own()
            if dispatch(play, layer, relaunch=True):
                layer.refresh_from_db()
                self.outputs[step["ref"]] = layer.out
                self.advance(step["index"], to=end)
                return
            self.await_loop()
        raise _Done

    def collect(self, ref: str) -> list[Any]:
        """The outputs of a loop step's finished iterations, in item order."""
        return list(
            Layer.objects.filter(play_id=self.play.pk, ref=ref, iteration__isnull=False, state=LayerState.DONE)
            .order_by("iteration")
            .values_list("out", flat=True)
        )

    def await_loop(self) -> None:
        """Give the play up while its loop's iterations run (it stays RUN)."""
        Play.objects.filter(pk=self.play.pk, runner=self.runner).update(
            runner="", lease_until=None, updated_at=timezone.now()
        )

    def end_iteration(self, state: str, error: dict[str, Any] | None = None) -> None:
        """This iteration is over: record it, launch the next ones, close the loop."""
        iteration = self.iteration
        assert iteration is not None
        with transaction.atomic():
            if not iteration.end(self.runner, state):
                raise _Done
            if state == IterationState.FAIL:
                self.play.fail(
                    error or error_body("STEP_FAILED", "An iteration failed"), from_states=[State.RUN, State.ON_HOLD]
                )
                raise _Done
            loop_layer = self.play.layers.filter(ref=iteration.ref, iteration__isnull=True).first()
            if loop_layer is not None and dispatch(self.play, loop_layer):
                # The last iteration ended: the play goes on after the loop.
                if Play.objects.filter(pk=self.play.pk, state=State.RUN, runner="").exists():
                    Play.objects.filter(pk=self.play.pk).update(next_index=loop_end(self.steps, loop_layer.index))
                    self.play.enqueue()
        raise _Done

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
        with transaction.atomic():
            self.own()
            iteration = self.iteration.index if self.iteration is not None else None
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
            if self.iteration is None and wait >= config("RETRY_PARK_SECONDS"):
                # A long delay gives the worker up: the play is DEFERRED until the next attempt.
                self.park(layer, Park(timezone.now() + timedelta(seconds=wait), out={RETRY: error["code"]}))
            self.sleep(wait)
            with transaction.atomic():
                self.own()
                layer.begin_attempt(self.play, f"retry after {error['code']}", error=redact(error))

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
        ctx = RunContext(
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
        )
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
            if self.iteration is not None and park.out is not None:
                # A sleep inside a loop: iterations are not parked one by one, so this one
                # waits in its worker (bounded by the step's timeout) while others go on.
                self.sleep(max(0.0, (park.until - timezone.now()).total_seconds()))
                self.succeed(step, layer, park.out)
                return None
            self.park(layer, park)
        except StepError as exc:
            return {**error_body(exc.code, str(exc)), "retryable": exc.retryable}
        except Exception as exc:  # a module bug must not kill the runner
            log.exception("step %s of play %s raised", step["ref"], self.play.id)
            return error_body("STEP_ERROR", f"{type(exc).__name__}: {exc}")
        self.succeed(step, layer, out)
        return None

    def park(self, layer: Layer, park: Park) -> None:
        """Give the worker up until ``park.until``, or until ``park.ready`` says so."""
        ready = getattr(park, "ready", None)
        try:
            parked = RERUN if park.out is None else storable(park.out)
            self.record(lambda retry: self._record_park(layer, parked, park, ready))
        except (StorageFailure, UnstorableValue) as exc:
            self.store_failed(self.steps[layer.index], layer, exc)
        raise Stop

    def _record_park(self, layer: Layer, parked: Any, park: Park, ready: Any) -> None:
        with transaction.atomic():
            self.own()
            Layer.objects.filter(pk=layer.pk).update(parked_out=parked)
            layer.parked_out = parked
            if self.iteration is not None:
                self.iteration.release(self.runner)
                # What it waits for may have ended before the release: then go on now.
                if ready is not None and ready():
                    self.iteration.enqueue()
            else:
                self.play.park(self.runner, park.until)
                if ready is not None and ready():
                    Play.objects.filter(pk=self.play.pk, state=State.DEFERRED).update(run_at=timezone.now())

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

        The one place where the runner survives its database. A transient error (see
        ``transient``: a restart, a dropped connection) is retried here, on a fresh
        connection, with backoff (0.05 s doubling to 1 s) for up to RECORD_RETRY_SECONDS,
        with the outcome this runner holds: the step does not run again. ``retry`` tells
        ``write`` that an earlier try may have committed although its answer was lost.
        Past the deadline the error propagates: the worker is as good as dead, its lease
        expires and the reaper requeues the play. Any other database error, or a value that
        cannot be stored, raises ``StorageFailure``: trying again would fail again.
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

    def take_back(self) -> None:
        """Before a retried write: hold the lease again. While the database was away no
        heartbeat could renew it; if it expired and the reaper requeued the play (or the
        iteration) but no other runner has taken it yet, take it back, so that the outcome
        held here is written rather than the step run again. A runner that took it first
        keeps it: the write then stops this runner."""
        if self.iteration is not None:
            self.iteration.claim(self.runner, config("LEASE_SECONDS"))
        else:
            Play.take_lease(self.play.pk, self.runner, config("LEASE_SECONDS"))

    def recorded(self, layer: Layer) -> bool:
        """Whether ``layer`` has ended in the database: a retried write's earlier try committed."""
        if not Layer.objects.filter(pk=layer.pk).exclude(state__in=[LayerState.RUN, LayerState.WAIT]).exists():
            return False
        # Carry on from what is stored, like a runner that took the play over.
        self.play.refresh_from_db()
        if self.iteration is not None:
            self.iteration.refresh_from_db()
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
            raise _Done

    def _record_success(self, step: dict[str, Any], layer: Layer, out: Any, following: Any, retry: bool) -> bool:
        """succeed()'s write; True when the play finished."""
        if retry and self.recorded(layer):
            return self.play.state in TERMINAL
        if following is not None and self.step_on(layer, out, following):
            return False
        with transaction.atomic(), batched_events():
            running = self.advance_running(step["index"])
            if not layer.end(LayerState.DONE, out=out):
                raise Stop
            if running:
                return self.go_on(following)
        return False

    def opens_next(self, step: dict[str, Any]) -> dict[str, Any] | None:
        """The step after ``step`` if its layer opens RUN in the transaction that ends
        ``step``; None if there is none or it needs step() (a loop, an approval, a filter
        that says no, a deadline, the end of the time slice)."""
        index = step["index"] + 1
        if index >= self.end:
            return None
        following = self.steps[index]
        if (
            following["appId"] == "iterator"
            or following.get("needsApproval")
            or following["ref"] in self.layers
            or time.monotonic() > self.slice_ends
            or (self.play.deadline_at is not None and timezone.now() >= self.play.deadline_at)
        ):
            return None
        return following if self.filter_verdict(following) is True else None

    def step_on(self, layer: Layer, out: Any, following: dict[str, Any]) -> bool:
        """succeed() in one statement where the database can (Play.step_on): a play's step
        DONE and ``following`` started. False: nothing written, succeed() goes on."""
        if self.iteration is not None or not Play.can_step_on():
            return False
        lease = timezone.now() + timedelta(seconds=config("LEASE_SECONDS"))
        # Alone it is atomic; inside a caller's transaction (tests) a savepoint keeps a
        # failed statement from breaking that transaction.
        with transaction.atomic() if connection.in_atomic_block else nullcontext():
            opened = self.play.step_on(self.runner, layer, out, following, lease)
        if opened is None:
            return False
        self.layers[following["ref"]] = opened
        self.opened = opened.pk
        return True

    def advance_running(self, index: int) -> bool:
        """Move the cursor past step ``index``; True if the play is still ours and RUN
        (its lease renewed), False if it was held meanwhile (the step is recorded all the
        same). Stop if it is no longer ours."""
        if self.iteration is None:
            lease = timezone.now() + timedelta(seconds=config("LEASE_SECONDS"))
            n = Play.objects.filter(pk=self.play.pk, runner=self.runner, state=State.RUN).update(
                next_index=index + 1, lease_until=lease
            )
            if n:
                self.play.next_index = index + 1
                return True
            self.advance(index)  # ON_HOLD: recorded, nothing new starts
            return False
        self.lock_play()  # before the iteration's rows (see own)
        self.advance(index)
        try:
            self.own()
        except Stop:
            return False
        return True

    def go_on(self, following: dict[str, Any] | None) -> bool:
        """Inside succeed()'s transaction, on a play that is ours and RUN: open the layer of
        ``following`` (see opens_next), or finish the play if there is no next step. True
        when the play finished."""
        if self.cursor >= self.end:
            if self.iteration is not None:
                return False
            if not self.play.finish(self.runner):
                raise Stop
            return True
        if following is None:
            return False
        iteration = self.iteration.index if self.iteration is not None else None
        layer = Layer.open(self.play, following, LayerState.RUN, iteration=iteration)
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
            raise _Done if failed else Stop

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
        self.record(lambda retry: self._record_play_failure(error))
        raise _Done

    def _record_play_failure(self, error: dict[str, Any]) -> None:
        with transaction.atomic():
            self.play.fail(error, from_states=[State.RUN])


class _Done(Exception):
    """The play reached a terminal state or was handed back: the runner is finished."""


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
