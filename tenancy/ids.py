"""Opaque, roughly time-ordered string ids (like a MongoDB ObjectId: 24 hex characters)."""

from __future__ import annotations

import os
import time


def new_id() -> str:
    # Seconds first keeps b-tree inserts near the right edge of the primary-key index.
    return f"{int(time.time()):08x}{os.urandom(8).hex()}"
