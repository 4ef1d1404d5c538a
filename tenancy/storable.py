"""Values stored as JSON are made storable the same way on SQLite and PostgreSQL.

Every ``JSONField`` of flowplay is a ``StorableJSONField``: each value passes through
``storable()`` on its way to the database (``save``, ``update``, ``bulk_create`` and the raw
``Play.step_on`` statement all call the field's ``get_db_prep_save``), so no writer can skip
it. What it changes:

- NUL (U+0000) and lone surrogates (U+D800–U+DFFF not in a valid pair), in strings and in
  object keys, become U+FFFD (the replacement character). PostgreSQL's ``jsonb`` refuses
  both; SQLite stores them, and every page or API answer that shows them then fails to
  encode its UTF-8 output. A valid surrogate pair becomes the character it encodes.
- Numbers JSON cannot carry (NaN, ±Infinity, integers of more than 4,300 digits) become
  null.
- A value nested deeper than ``MAX_DEPTH`` levels is refused (``UnstorableValue``): it would
  come back as a RecursionError wherever it is read.

Request bodies are not repaired but refused (``input_problem``, called by the API's JSON
parser): a client learns that its input was not taken as sent. Step outputs come from the
outside world and are repaired; the runner applies ``storable`` to a step's output before it
records it, so the next steps see the value that is stored.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from django.db import models

REPLACEMENT = "\ufffd"
# Deepest nesting stored. Request bodies are refused deeper than MAX_JSON_DEPTH
# (100); events wrap a value in a few levels more.
MAX_DEPTH = 200
# Deeper JSON than this is refused in request bodies (flows.parsers, the hooks): it is no real
# document, and recursive code further on (serializers, the expression renderer, json.dumps)
# would hit Python's limit.
MAX_JSON_DEPTH = 100
# Python refuses to turn longer integers into text (sys.get_int_max_str_digits).
MAX_INT_DIGITS = 4300

_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
# What json.dumps(ensure_ascii=True) writes for NUL and for a lone surrogate (a high one
# not followed by a low one, a low one not preceded by a high one). A valid pair is left
# alone: it is the escaped form of a character beyond the BMP.
_BAD_ESCAPE = re.compile(r"\\u0000|\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f]")


_ESCAPE_PREFIX = re.compile(r"\\u(?:0000|d[89a-f])")


def _maybe_bad(text: str) -> bool:
    # The cheap search first: most texts have no such escape at all.
    return _ESCAPE_PREFIX.search(text) is not None and _BAD_ESCAPE.search(text) is not None


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DELTA = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth(text: str) -> int:
    """How deep the JSON ``text`` (as json.dumps writes it) nests."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot be deeper (a cheap bound for small values)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))  # brackets outside strings
    return max(accumulate(map(_DELTA.__getitem__, brackets)), default=0)


class UnstorableValue(ValueError):
    """A value that cannot be stored as JSON even after repair (nested too deep)."""


def clean_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD."""
    if not _BAD_CHAR.search(text):
        return text
    # surrogatepass keeps the surrogates as UTF-16 units: a valid pair decodes to its
    # character, a lone one to U+FFFD.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.replace("\x00", REPLACEMENT)


def _repair(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return None if value.bit_length() > 14000 and _too_long(value) else value
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_DEPTH:
            raise UnstorableValue(f"the value is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            return {(clean_text(k) if isinstance(k, str) else k): _repair(v, depth + 1) for k, v in value.items()}
        return [_repair(item, depth + 1) for item in value]
    return value  # not JSON: the encoder decides


def _too_long(value: int) -> bool:
    try:
        return len(str(abs(value))) > MAX_INT_DIGITS
    except ValueError:  # Python's own limit on int → str
        return True


def storable(value: Any) -> Any:
    """``value`` as it is stored: repaired as the module docstring says (the same object when
    nothing needs repair). Raises ``UnstorableValue`` for a value nested too deep."""
    if value is None or isinstance(value, bool | int | float):
        return _repair(value, 0)
    if isinstance(value, str):
        return clean_text(value)
    try:
        text = json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError):
        text = None  # NaN, Infinity, a huge integer or deep nesting: repair or refuse below
    except TypeError:
        return value  # not JSON at all: the field's encoder reports it as before
    if text is not None and not _maybe_bad(text) and _depth(text) <= MAX_DEPTH:
        return value  # the common case: C-speed passes over the text, nothing to repair
    try:
        return _repair(value, 0)
    except RecursionError:
        raise UnstorableValue(f"the value is nested more than {MAX_DEPTH} levels deep") from None


def input_problem(value: Any, path: str = "", depth: int = 0) -> tuple[str, str] | None:
    """The first place in a request body that ``storable`` would change: (path, problem)."""
    if isinstance(value, str):
        if "\x00" in value:
            return path or "body", "must not contain NUL (\\u0000) characters"
        if _BAD_CHAR.search(value):
            return path or "body", "must not contain unpaired surrogates (\\ud800-\\udfff)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return path or "body", "numbers must be finite"
    if depth > MAX_DEPTH:
        return path or "body", f"nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, dict):
        for key, item in value.items():
            where = clean_text(f"{path}.{key}" if path else str(key))
            if isinstance(key, str) and _BAD_CHAR.search(key):
                return input_problem(key, where, depth)
            found = input_problem(item, where, depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = input_problem(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
    return None


class StorableJSONField(models.JSONField):
    """A JSONField whose values pass through ``storable()`` before they are written."""

    def get_prep_value(self, value: Any) -> Any:
        return super().get_prep_value(storable(value))

    def deconstruct(self) -> tuple[str, str, list[Any], dict[str, Any]]:
        # The column is the same jsonb / JSON text: migrations see a plain JSONField, so
        # switching to this class needs none (on SQLite an AlterField rebuilds the table).
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.JSONField", args, kwargs


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests dicts and lists deeper than `limit` (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False
