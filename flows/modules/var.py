"""`var`: set values; out is the evaluated `values` object."""

from __future__ import annotations

from typing import Any

from .base import (
    Module,
    RunContext,
    _obj,
    register,
)


@register
class Var(Module):
    app_id = "var"
    summary = "Set values: out is the evaluated `values` object."
    args_schema = _obj({"values": {"type": "object"}}, ["values"])
    out_schema = {"type": "object"}
    inline = True  # it returns its rendered args: a thread hop would cost more than the step

    def execute(self, args: dict, ctx: RunContext) -> Any:
        return args["values"]
