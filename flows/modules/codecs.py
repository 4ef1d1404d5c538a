"""`base64-encode`, `base64-decode`, `url-encode`, `url-decode`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode

from .base import (
    _RESULT_STRING,
    _SCALAR,
    Module,
    RunContext,
    _b64decode,
    _invalid,
    _obj,
    check_output_size,
    is_expression,
    register,
)


@register
class Base64Encode(Module):
    app_id = "base64-encode"
    summary = "Base64-encode UTF-8 text."
    args_schema = _obj({"input": {"type": "string"}, "urlSafe": {"type": "boolean", "default": False}}, ["input"])
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        raw = args["input"].encode("utf-8")
        check_output_size(4 * -(-len(raw) // 3) + 16)
        encoded = base64.urlsafe_b64encode(raw) if args["urlSafe"] else base64.b64encode(raw)
        return {"result": encoded.decode("ascii")}


@register
class Base64Decode(Module):
    app_id = "base64-decode"
    summary = "Decode base64 (standard or urlsafe, padding optional) to UTF-8 text."
    args_schema = _obj({"input": {"type": "string"}}, ["input"])
    out_schema = _RESULT_STRING

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        value = args.get("input")
        if lenient and isinstance(value, str) and not is_expression(value):
            try:
                _b64decode(value)
            except (ValueError, binascii.Error):
                yield "input", "is not valid base64"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        try:
            raw = _b64decode(args["input"])
        except (ValueError, binascii.Error) as exc:
            raise _invalid(f"input is not valid base64: {exc}") from exc
        try:
            return {"result": raw.decode("utf-8")}
        except UnicodeDecodeError as exc:
            raise _invalid("Decoded bytes are not UTF-8 text") from exc


def _query_value(value: Any) -> str:
    # JSON spellings, not Python's ("true", not "True").
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@register
class UrlEncode(Module):
    app_id = "url-encode"
    name = "URL encode"
    summary = "Percent-encode a string, or turn an object into a query string."
    args_schema = _obj(
        {
            "input": {
                "type": ["string", "object"],
                "additionalProperties": {"type": [*_SCALAR, "array"], "items": {"type": _SCALAR}},
            }
        },
        ["input"],
    )
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        value = args["input"]
        if isinstance(value, str):
            return {"result": quote(value, safe="")}
        pairs = []
        for key, item in value.items():
            for one in item if isinstance(item, list) else [item]:
                pairs.append((key, _query_value(one)))
        return {"result": urlencode(pairs, quote_via=quote)}


@register
class UrlDecode(Module):
    app_id = "url-decode"
    name = "URL decode"
    summary = "Decode percent-encoding (and + as space)."
    args_schema = _obj({"input": {"type": "string"}}, ["input"])
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        return {"result": unquote_plus(args["input"])}
