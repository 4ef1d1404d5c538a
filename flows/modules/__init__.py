"""The module registry: every step calls a module, found here by its ``appId``.

``base`` holds the ``Module`` class, the registry and the errors a module raises; each
other file of this package is one module (or a small family), named after its appId.
Importing the package registers them all.
"""

from __future__ import annotations

from . import base
from .base import *  # noqa: F403
from .base import (
    DEFAULT_CURL_DENY,
    MAX_ENUM_ITEMS,
    MAX_REGEX_INPUT,
    MAX_REGEX_PATTERN,
    MAX_SLEEP_MS,
    REGISTRY,
    Module,
    OutboundPolicy,
    Park,
    RunContext,
    StepError,
    describe,
    get_module,
    register,
)
from . import iterator, subflow  # noqa: E402,F401  (registers them)

__all__ = [
    "DEFAULT_CURL_DENY", "MAX_ENUM_ITEMS", "MAX_REGEX_INPUT", "MAX_REGEX_PATTERN", "MAX_SLEEP_MS", "REGISTRY",
    "Module", "OutboundPolicy", "Park", "RunContext", "StepError", "base", "describe", "get_module", "register",
]
