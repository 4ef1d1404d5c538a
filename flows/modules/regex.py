"""`regex`: match, find, findAll, replace, split (Python syntax, matched by RE2).

Patterns are compiled by ``flows.patterns``: linear-time matching, so no pattern can hold
a worker; backreferences and lookaround are refused when the flow is saved.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from flows.patterns import PatternError, compile_pattern, expand, template_size

from .base import (
    Module,
    RunContext,
    _deferred,
    _invalid,
    _obj,
    max_output_bytes,
    output_too_large,
    register,
)

MAX_REGEX_PATTERN = 2000
MAX_REGEX_INPUT = 1024 * 1024
MAX_REGEX_MATCHES = 10_000
CHEAP_REGEX_INPUT = 10_000


def _match_out(m: Any) -> dict:
    return {"match": m.group(0), "index": m.start(), "groups": list(m.groups()), "named": m.groupdict()}


def _compile(args: dict) -> Any:
    try:
        return compile_pattern(args["pattern"], args.get("flags", ""))
    except PatternError as exc:
        raise _invalid(f"pattern {exc}") from None


@register
class Regex(Module):
    app_id = "regex"
    summary = (
        "Regular expressions (Python syntax, matched in linear time by RE2: no backreferences "
        "or lookaround): match, find, findAll, replace, split."
    )
    # One RE2 search is linear, but findAll/replace/split search again after each match,
    # and a pattern such as a(?:.*z)? rescans the rest of the input each time (quadratic:
    # 3 s for 40,000 characters, half an hour for 1 MiB), holding the GIL.
    cpu_bound = True

    def cheap(self, args: Any) -> bool:
        # Quadratic at worst: 10,000 characters is a fraction of a second.
        text = args.get("input") if isinstance(args, dict) else None
        return isinstance(text, str) and len(text) <= CHEAP_REGEX_INPUT

    args_schema = _obj(
        {
            "input": {"type": "string", "maxLength": MAX_REGEX_INPUT},
            "pattern": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_REGEX_PATTERN,
                "description": (
                    "Python syntax, matched by RE2 in linear time: no backreferences, lookaround, "
                    "atomic groups or possessive quantifiers (refused when the flow is saved); "
                    "\\d \\w \\s \\b are ASCII-only (\\p{L}, \\p{N} for any script); "
                    "$ without the m flag matches only at the very end"
                ),
            },
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

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        pattern, flags = args.get("pattern"), args.get("flags", "")
        if not isinstance(pattern, str) or _deferred(pattern, lenient) or len(pattern) > MAX_REGEX_PATTERN:
            return
        if _deferred(flags, lenient):
            return  # "x" changes what is valid syntax, so wait for the real flags
        if not isinstance(flags, str) or not re.fullmatch("[imsx]*", flags):
            flags = ""
        try:
            compiled = compile_pattern(pattern, flags)
        except PatternError as exc:
            yield "pattern", str(exc)
            return
        replacement = args.get("replacement")
        if isinstance(replacement, str) and not _deferred(replacement, lenient):
            try:
                compiled.template(replacement)
            except PatternError as exc:
                yield "replacement", str(exc)

    def execute(self, args: dict, ctx: RunContext) -> Any:
        compiled = _compile(args)
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
        limit = max_output_bytes()
        if operation == "findAll":
            matches, size = [], 0
            for m in compiled.finditer(text):
                if len(matches) >= MAX_REGEX_MATCHES:
                    raise _invalid(f"More than {MAX_REGEX_MATCHES} matches")
                found = _match_out(m)
                size += 64 + len(found["match"]) + sum(len(g or "") + 8 for g in found["groups"]) * 2
                if size > limit:
                    raise output_too_large(size)
                matches.append(found)
            return {"matches": matches, "count": len(matches)}
        if operation == "replace":
            return self._replace(compiled, args["replacement"], text, limit)
        parts, size, end = [], 0, 0
        for m in compiled.finditer(text):
            pieces = [text[end : m.start()], *m.groups()]
            size += sum(len(p or "") + 4 for p in pieces)
            if size > limit:
                raise output_too_large(size)
            parts.extend(pieces)
            end = m.end()
        parts.append(text[end:])
        return {"parts": parts}

    @staticmethod
    def _replace(compiled: Any, replacement: str, text: str, limit: int) -> dict:
        """re.subn, with the result's size known before it is built: the matches are
        counted first, and the literal part of each replacement costs its length once per
        match (a 100,000-character replacement of each x in 1,000 x is refused at once)."""
        try:
            template = compiled.template(replacement)
        except PatternError as exc:
            raise _invalid(f"replacement {exc}") from None
        count, matched = 0, 0
        for m in compiled.finditer(text):  # a first pass that keeps nothing
            count += 1
            matched += m.end() - m.start()
        estimate = len(text) - matched + template_size(template) * count
        if estimate > limit:
            raise output_too_large(estimate)
        pieces, size, end = [], 0, 0
        for m in compiled.finditer(text):
            piece = expand(template, m)
            size += (m.start() - end) + len(piece)
            if size > limit:  # group references can make each piece longer than its literal part
                raise output_too_large(size)
            pieces.append(text[end : m.start()])
            pieces.append(piece)
            end = m.end()
        pieces.append(text[end:])
        return {"result": "".join(pieces), "count": count}
