"""`router`: the label of the first route whose condition is true (`"true"` is a catch-all)."""

from __future__ import annotations

from typing import Any

from .base import (
    Module,
    RunContext,
    _obj,
    register,
)

_FALSE_STRINGS = frozenset({"", "false", "0", "null", "none", "undefined"})


def _truthy(value: Any) -> bool:
    # Conditions are usually rendered to text, where "False" / "None" are how a Python
    # renderer spells false and null.
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _FALSE_STRINGS:
            return False
        try:
            return float(text) != 0
        except ValueError:
            return True
    return bool(value)


@register
class Router(Module):
    app_id = "router"
    summary = 'Pick the label of the first route whose condition is truthy ("true" is a catch-all).'
    args_schema = _obj(
        {
            "routes": {
                "type": "array",
                "minItems": 1,
                "items": _obj({"condition": {}, "label": {"type": "string", "minLength": 1}}, ["condition", "label"]),
            }
        },
        ["routes"],
    )
    out_schema = _obj({"route": {"type": ["string", "null"]}}, ["route"])

    def execute(self, args: dict, ctx: RunContext) -> Any:
        for route in args["routes"]:
            if _truthy(route["condition"]):
                return {"route": route["label"]}
        return {"route": None}
