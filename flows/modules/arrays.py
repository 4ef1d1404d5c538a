"""`array-filter` and `array-map`: one expression evaluated per item of a list.

The expression is left unrendered by the runner (``raw_args``) and evaluated here once per
item, with the item where an iterator puts it: ``$prev.<thisRef>.item``, ``.index`` and
``.total`` (``$prev.item`` / ``$prev.index`` / ``$prev.total`` for short). Values from
earlier steps come in through ``data`` (rendered as usual), read as ``$prev.data``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import Module, RunContext, StepError, _obj, json_size, max_output_bytes, output_too_large, register

MAX_ARRAY_ITEMS = 100_000


def _problems(text: Any) -> list[str]:
    from flows.expr import check

    return [m for messages in check(text).values() for m in messages]


def _each(args: dict, ctx: RunContext, name: str) -> Iterable[tuple[Any, Any]]:
    """Yield (item, value of the expression for it)."""
    from flows.expr import ExpressionError, Scope, render

    items = args["items"]
    if len(items) > MAX_ARRAY_ITEMS:
        raise StepError(f"More than {MAX_ARRAY_ITEMS} items", "INVALID_INPUT", retryable=False)
    # Each item's value has its own expression budget, so the list as a whole is counted
    # here, as it grows (an out of 100,000 items of 1 MB each is never built).
    limit, size = max_output_bytes(), 0
    for index, item in enumerate(items):
        here = {"item": item, "index": index, "total": len(items)}
        prev = {**here, "data": args["data"]}
        if ctx.ref:
            prev[ctx.ref] = here
        try:
            value = render(args[name], Scope(prev=prev, flow_id=ctx.flow_id, play_id=ctx.play_id))
        except ExpressionError as exc:
            raise StepError(f"{name} for item {index}: {exc}", "EXPRESSION_ERROR", retryable=False) from exc
        size += len(value) + 3 if isinstance(value, str) else json_size(value) + 1
        if size > limit:
            raise output_too_large(size)
        yield item, value


class _ArrayModule(Module):
    expression_arg: str
    cpu_bound = True

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        if lenient and self.expression_arg in args:
            for message in _problems(args[self.expression_arg]):
                yield self.expression_arg, message


@register
class ArrayFilter(_ArrayModule):
    app_id = "array-filter"
    summary = "Keep the items for which `condition` is true (the item is `$prev.<thisRef>.item`)."
    expression_arg = "condition"
    args_schema = _obj(
        {
            "items": {"type": "array"},
            "condition": {"type": ["string", "boolean"], "description": "e.g. {{ $prev.item.amount > 100 }}"},
            "data": {"type": "object", "default": {}},
        },
        ["items", "condition"],
    )
    out_schema = _obj({"items": {"type": "array"}, "count": {"type": "integer"}}, ["items", "count"])
    raw_args = frozenset({"condition"})

    def execute(self, args: dict, ctx: RunContext) -> Any:
        from .router import _truthy

        kept = [item for item, verdict in _each(args, ctx, "condition") if _truthy(verdict)]
        return {"items": kept, "count": len(kept)}


@register
class ArrayMap(_ArrayModule):
    app_id = "array-map"
    summary = "Turn each item into the value of `expression` (the item is `$prev.<thisRef>.item`)."
    expression_arg = "expression"
    args_schema = _obj(
        {
            "items": {"type": "array"},
            "expression": {"description": "any JSON value; its {{ }} are evaluated per item"},
            "data": {"type": "object", "default": {}},
        },
        ["items", "expression"],
    )
    out_schema = _obj({"items": {"type": "array"}, "count": {"type": "integer"}}, ["items", "count"])
    raw_args = frozenset({"expression"})

    def execute(self, args: dict, ctx: RunContext) -> Any:
        mapped = [value for _, value in _each(args, ctx, "expression")]
        return {"items": mapped, "count": len(mapped)}
