"""`json-parse` and `json-stringify`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .base import (
    _RESULT_STRING,
    Module,
    RunContext,
    _invalid,
    _obj,
    _reject_constant,
    is_expression,
    register,
)


@register
class JsonParse(Module):
    app_id = "json-parse"
    name = "JSON parse"
    summary = "Parse JSON text."
    args_schema = _obj({"input": {"type": "string"}}, ["input"])
    out_schema = _obj({"result": {}}, ["result"])

    @staticmethod
    def _parse(text: str) -> Any:
        return json.loads(text, parse_constant=_reject_constant)

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        # Only literals at save time: at run time execute() parses once and reports.
        value = args.get("input")
        if lenient and isinstance(value, str) and not is_expression(value):
            try:
                self._parse(value)
            except (ValueError, RecursionError) as exc:
                yield "input", f"is not valid JSON: {exc}"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        try:
            return {"result": self._parse(args["input"])}
        except ValueError as exc:
            raise _invalid(f"input is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise _invalid("input is nested too deeply") from exc


@register
class JsonStringify(Module):
    app_id = "json-stringify"
    name = "JSON stringify"
    summary = "Serialize a value as JSON text."
    args_schema = _obj({"input": {}, "pretty": {"type": "boolean", "default": False}}, ["input"])
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        try:
            if args["pretty"]:
                text = json.dumps(args["input"], indent=2, ensure_ascii=False, allow_nan=False)
            else:
                text = json.dumps(args["input"], separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _invalid(f"input cannot be serialized: {exc}") from exc
        return {"result": text}
