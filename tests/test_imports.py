"""Every module a process may load first imports cleanly in a fresh interpreter.

The test process itself cannot show an import cycle: by the time a test runs, Django's URL
conf and DRF have loaded everything in a benign order. A web process serving only `/hooks/`
or `/mcp` since it started loads modules in another order, and a cycle there (DRF's settings
importing the parser class from a half-imported module) was a 500 for every hook request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FIRST_IMPORTS = [
    "flows.api",
    "flows.parsers",
    "flows.views",
    "plays.consumers",
    "plays.views",
    "triggers.channels",
    "triggers.mcp",
    "triggers.tasks",
    "flowplay.asgi",
]


@pytest.mark.parametrize("module", FIRST_IMPORTS)
def test_a_module_imported_first_after_setup_loads_and_builds_drf_views(module: str) -> None:
    code = (
        "import django; django.setup()\n"
        f"import {module}\n"
        # Build what DRF builds lazily on the first request: the parser and handler settings.
        "from rest_framework.settings import api_settings\n"
        "api_settings.DEFAULT_PARSER_CLASSES; api_settings.EXCEPTION_HANDLER\n"
        "from triggers.channels import parse_body\n"
        "assert parse_body('application/json', b'{\"a\": 1}') == {'a': 1}\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flowplay.settings"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
