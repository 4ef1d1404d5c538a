"""When a schedule fires: cron expressions (cronsim) and fixed intervals, in a time zone.

Framework-free. Times go in and out as aware datetimes; cron expressions are evaluated in
the schedule's IANA zone, so ``0 9 * * 1-5`` in ``Europe/Berlin`` is 09:00 Berlin time in
summer and winter alike. Across DST changes cronsim follows cron's (and healthchecks')
rules: a time skipped by a spring-forward change fires once at the first valid time after
it, and a time repeated by a fall-back change fires once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError

PRESETS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class ScheduleSpecError(ValueError):
    """A cron expression, interval or time zone that cannot be used; the message says why."""


def expand(cron: str) -> str:
    """The five-field form of ``cron`` (presets expanded); ScheduleSpecError if invalid."""
    text = " ".join(cron.split())
    text = PRESETS.get(text.lower(), text)
    if len(text.split(" ")) != 5:
        raise ScheduleSpecError(
            "a cron expression has 5 fields (minute hour day month weekday) or is a preset like @hourly"
        )
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ScheduleSpecError(f"invalid cron expression: {exc}") from None
    return text


def zone(name: str) -> ZoneInfo:
    if not name or name not in _zones():
        raise ScheduleSpecError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleSpecError(f"unknown time zone {name!r}") from None


_ZONES: set[str] | None = None


def _zones() -> set[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = available_timezones() | {"UTC"}
    return _ZONES


def explain(cron: str) -> str:
    """A sentence for people ("At 09:00 on Monday to Friday"); the expression if none."""
    try:
        return CronSim(expand(cron), datetime(2000, 1, 1, tzinfo=UTC)).explain()
    except Exception:  # explain() is best effort
        return cron


@dataclass(frozen=True)
class Spec:
    """A cron expression or a fixed interval, evaluated in ``tz``.

    Intervals count from ``anchor``: fire times are ``anchor + k × interval``.
    """

    cron: str | None
    interval: int | None
    tz: ZoneInfo
    anchor: datetime

    def after(self, moment: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``moment``, oldest first, in UTC."""
        if self.interval:
            step = timedelta(seconds=self.interval)
            k = max(0, int((moment - self.anchor) // step) + 1)
            t = self.anchor + k * step
            while t <= moment:  # float rounding at the boundary
                t += step
            while True:
                yield t.astimezone(UTC)
                t += step
        else:
            assert self.cron is not None
            local = moment.astimezone(self.tz).replace(microsecond=0)
            for t in CronSim(self.cron, local):
                if t > moment:
                    yield t.astimezone(UTC)

    def last_at_or_before(self, moment: datetime) -> datetime | None:
        """The newest fire time at or before ``moment``; None if there is none."""
        if self.interval:
            if moment < self.anchor:
                return None
            step = timedelta(seconds=self.interval)
            return (self.anchor + int((moment - self.anchor) // step) * step).astimezone(UTC)
        assert self.cron is not None
        local = (moment + timedelta(seconds=1)).astimezone(self.tz).replace(microsecond=0)
        for t in CronSim(self.cron, local, reverse=True):
            if t <= moment:
                return t.astimezone(UTC)
        return None


def plan(
    spec: Spec, due: datetime, now: datetime, *, catchup: str, grace: float, window: float, limit: int = 100
) -> tuple[list[datetime], datetime]:
    """The fire times to fire now and the next one after ``now``.

    ``due`` is the schedule's next fire time as stored (≤ now). Fire times within ``grace``
    seconds of ``now`` are on time and always fire; older ones were missed (the scheduler
    was down) and fire by the catch-up policy: ``none`` — not at all, ``latest`` — only the
    newest, ``all`` — every one within ``window`` seconds, the newest ``limit`` of them.
    """
    cutoff = now - timedelta(seconds=grace)
    fires: list[datetime] = []
    if due <= cutoff and catchup != "none":
        if catchup == "latest":
            last = spec.last_at_or_before(cutoff)
            if last is not None and last >= due:
                fires.append(last)
        else:
            start = max(due, now - timedelta(seconds=window))
            missed = []
            moment = start - timedelta(microseconds=1)
            for t in spec.after(moment):
                if t > cutoff:
                    break
                missed.append(t)
                if len(missed) > limit:
                    missed.pop(0)
            fires.extend(missed)
    on_time_from = max(due, cutoff + timedelta(microseconds=1)) - timedelta(microseconds=1)
    following = None
    for t in spec.after(on_time_from):
        if t > now:
            following = t
            break
        fires.append(t)
        if len(fires) > 2 * limit:  # an interval far shorter than a tick: keep the newest
            fires.pop(0)
    assert following is not None
    return fires, following
