"""`template`: render a text template over `data`."""

from __future__ import annotations

from typing import Any

from .base import (
    _RESULT_STRING,
    Module,
    RunContext,
    StepError,
    _obj,
    register,
)


@register
class Template(Module):
    app_id = "template"
    summary = "Render a text template with {{ name }} placeholders over `data`."
    args_schema = _obj(
        {
            "template": {"type": "string"},
            "data": {"type": "object", "default": {}},
        },
        ["template"],
    )
    out_schema = _RESULT_STRING
    raw_args = frozenset({"template"})

    def execute(self, args: dict, ctx: RunContext) -> Any:
        # Imported here so this module (and save-time checks) work without the
        # template engine loaded.
        from flows.expr import ExpressionError, render_template

        try:
            return {"result": render_template(args["template"], args["data"])}
        except ExpressionError as exc:
            raise StepError(str(exc), getattr(exc, "code", "EXPRESSION_ERROR"), retryable=False) from exc
