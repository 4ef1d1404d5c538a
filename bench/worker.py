"""``python -m bench.worker <celery worker args>``: a Celery worker that knows ``bench-cpu``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")

import django  # noqa: E402

django.setup()

from bench import cpu  # noqa: E402
from flowplay.celery import app  # noqa: E402

cpu.install()

if __name__ == "__main__":
    app.worker_main(["worker", *sys.argv[1:]])
