"""Apply retention now: ``python manage.py prune_plays [--budget SECONDS] [--batch N]``.

The periodic task ``prune_old_plays`` does the same a little at a time; this command runs
batches until nothing is left to delete or the budget is spent (e.g. on the benchmark's
table of a million plays, while plays keep running) and reports the rate.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand

from plays.retention import prune


class Command(BaseCommand):
    help = "Delete finished plays past their flow's retention, in small batches."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--budget", type=float, default=3600.0, help="stop after this many seconds")
        parser.add_argument("--batch", type=int, default=None, help="plays per transaction (default: the setting)")

    def handle(self, *args: Any, budget: float, batch: int | None, **options: Any) -> None:
        started = time.monotonic()
        total = 0
        while time.monotonic() - started < budget:
            n = prune(batch=batch, budget_seconds=min(20.0, budget - (time.monotonic() - started)))
            total += n
            if n == 0:
                break
        elapsed = time.monotonic() - started
        rate = total / elapsed if elapsed > 0 else 0.0
        self.stdout.write(f"deleted {total} plays in {elapsed:.1f} s ({rate:.0f}/s)")
