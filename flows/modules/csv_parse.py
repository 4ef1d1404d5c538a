"""`csv-parse`: CSV text into rows."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from .base import (
    Module,
    RunContext,
    _invalid,
    _obj,
    register,
)

MAX_CSV_INPUT = 10 * 1024 * 1024
MAX_CSV_ROWS = 100_000


@register
class CsvParse(Module):
    app_id = "csv-parse"
    name = "CSV parse"
    summary = "Parse CSV text into rows (objects keyed by the header row, or lists)."
    args_schema = _obj(
        {
            "input": {"type": "string", "maxLength": MAX_CSV_INPUT},
            "delimiter": {"type": "string", "minLength": 1, "maxLength": 1, "default": ","},
            "header": {"type": "boolean", "default": True},
        },
        ["input"],
    )
    out_schema = _obj({"rows": {"type": "array"}, "count": {"type": "integer"}}, ["rows", "count"])

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        delimiter = args.get("delimiter")
        if isinstance(delimiter, str) and delimiter in ('"', "\r", "\n"):
            yield "delimiter", "must not be a quote or a line break"

    @staticmethod
    def _names(header: list[str]) -> list[str]:
        names: list[str] = []
        for i, raw in enumerate(header):
            name = raw.strip() or f"column{i + 1}"
            base, n = name, 2
            # Duplicate names would silently drop columns from each row object.
            while name in names:
                name, n = f"{base}_{n}", n + 1
            names.append(name)
        return names

    def execute(self, args: dict, ctx: RunContext) -> Any:
        text = args["input"].removeprefix("\ufeff")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=args["delimiter"], strict=True)
        rows: list[Any] = []
        names: list[str] | None = None
        try:
            for record in reader:
                if not record:
                    continue
                if args["header"] and names is None:
                    names = self._names(record)
                    continue
                if len(rows) >= MAX_CSV_ROWS:
                    raise _invalid(f"More than {MAX_CSV_ROWS} rows")
                if names is None:
                    rows.append(record)
                    continue
                while len(names) < len(record):
                    names.append(f"column{len(names) + 1}")
                rows.append({name: record[i] if i < len(record) else "" for i, name in enumerate(names)})
        except csv.Error as exc:
            raise _invalid(f"Invalid CSV at line {reader.line_num}: {exc}") from exc
        return {"rows": rows, "count": len(rows)}
