"""The module registry: every step calls a module, found here by its ``appId``.

``base`` holds the ``Module`` class, the registry and the errors a module raises; each
other file of this package is one module (or a small family), named after its appId
(``curl.py`` is ``curl``, ``codecs.py`` the base64/url encoders, ``json_.py`` the JSON
ones). Importing the package registers them all.
"""

from __future__ import annotations

import socket  # noqa: F401  (tests patch flows.modules.socket / .httpcore)

import httpcore  # noqa: F401

from ..egress import DEFAULT_CURL_DENY, OutboundPolicy
from . import (  # noqa: E402,F401  (importing registers them)
    arrays,
    base,
    codecs,
    csv_parse,
    curl,
    enumeration,
    iterator,
    json_,
    kv,
    pdf_extract,
    regex,
    router,
    send_mail,
    sleep,
    subflow,
    template,
    var,
)
from .base import (
    REGISTRY,
    Module,
    Park,
    RunContext,
    StepError,
    describe,
    get_module,
    is_expression,
    register,
)
from .enumeration import MAX_ENUM_ITEMS
from .regex import MAX_REGEX_INPUT, MAX_REGEX_PATTERN
from .sleep import MAX_SLEEP_MS

__all__ = [
    "DEFAULT_CURL_DENY",
    "MAX_ENUM_ITEMS",
    "MAX_REGEX_INPUT",
    "MAX_REGEX_PATTERN",
    "MAX_SLEEP_MS",
    "REGISTRY",
    "Module",
    "OutboundPolicy",
    "Park",
    "RunContext",
    "StepError",
    "base",
    "describe",
    "get_module",
    "is_expression",
    "register",
]
