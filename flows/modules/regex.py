"""`regex`: match, find, findAll, replace, split (Python syntax)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .base import (
    Module,
    RunContext,
    _deferred,
    _invalid,
    _obj,
    register,
)

MAX_REGEX_PATTERN = 2000
MAX_REGEX_INPUT = 1024 * 1024
MAX_REGEX_MATCHES = 10_000

_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def _match_out(m: re.Match[str]) -> dict:
    return {"match": m.group(0), "index": m.start(), "groups": list(m.groups()), "named": m.groupdict()}


@register
class Regex(Module):
    app_id = "regex"
    summary = "Regular expressions (Python syntax): match, find, findAll, replace, split."
    args_schema = _obj(
        {
            "input": {"type": "string", "maxLength": MAX_REGEX_INPUT},
            "pattern": {"type": "string", "minLength": 1, "maxLength": MAX_REGEX_PATTERN},
            "flags": {"type": "string", "pattern": "^[imsx]*$", "description": "must be letters from i, m, s, x"},
            "operation": {
                "type": "string",
                "enum": ["match", "find", "findAll", "replace", "split"],
                "default": "match",
            },
            "replacement": {"type": "string", "default": "", "description": r"\1 or \g<name> refer to groups"},
        },
        ["input", "pattern"],
    )
    out_schema = {
        "oneOf": [
            _obj(
                {"matched": {"type": "boolean"}, "groups": {"type": "array"}, "named": {"type": "object"}},
                ["matched", "groups", "named"],
            ),
            _obj(
                {
                    "found": {"type": "boolean"},
                    "match": {"type": ["string", "null"]},
                    "index": {"type": ["integer", "null"]},
                    "groups": {"type": "array"},
                    "named": {"type": "object"},
                },
                ["found", "match", "index", "groups", "named"],
            ),
            _obj({"matches": {"type": "array"}, "count": {"type": "integer"}}, ["matches", "count"]),
            _obj({"result": {"type": "string"}, "count": {"type": "integer"}}, ["result", "count"]),
            _obj({"parts": {"type": "array", "items": {"type": ["string", "null"]}}}, ["parts"]),
        ]
    }

    @staticmethod
    def _flags(text: str) -> int:
        value = 0
        for letter in text:
            value |= _REGEX_FLAGS[letter]
        return value

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        pattern, flags = args.get("pattern"), args.get("flags", "")
        if not isinstance(pattern, str) or _deferred(pattern, lenient) or len(pattern) > MAX_REGEX_PATTERN:
            return
        if _deferred(flags, lenient):
            return  # "x" changes what is valid syntax, so wait for the real flags
        if not isinstance(flags, str) or not re.fullmatch("[imsx]*", flags):
            flags = ""
        try:
            compiled = re.compile(pattern, self._flags(flags))
        except re.error as exc:
            yield "pattern", f"is not a valid regular expression: {exc}"
            return
        replacement = args.get("replacement")
        if isinstance(replacement, str) and not _deferred(replacement, lenient):
            try:
                # The template is parsed before any matching, so "" is enough to vet it.
                compiled.sub(replacement, "")
            except (re.error, IndexError) as exc:
                yield "replacement", f"is not a valid replacement: {exc}"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        compiled = re.compile(args["pattern"], self._flags(args.get("flags", "")))
        text, operation = args["input"], args["operation"]
        if operation == "match":
            m = compiled.search(text)
            if not m:
                return {"matched": False, "groups": [], "named": {}}
            return {"matched": True, "groups": list(m.groups()), "named": m.groupdict()}
        if operation == "find":
            m = compiled.search(text)
            if not m:
                return {"found": False, "match": None, "index": None, "groups": [], "named": {}}
            return {"found": True, **_match_out(m)}
        if operation == "findAll":
            matches = []
            for m in compiled.finditer(text):
                if len(matches) >= MAX_REGEX_MATCHES:
                    raise _invalid(f"More than {MAX_REGEX_MATCHES} matches")
                matches.append(_match_out(m))
            return {"matches": matches, "count": len(matches)}
        if operation == "replace":
            result, count = compiled.subn(args["replacement"], text)
            return {"result": result, "count": count}
        return {"parts": compiled.split(text)}
