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
    max_output_bytes,
    output_too_large,
    register,
)

MAX_CSV_INPUT = 10 * 1024 * 1024
MAX_CSV_ROWS = 100_000


@register
class CsvParse(Module):
    app_id = "csv-parse"
    name = "CSV parse"
    summary = "Parse CSV text into rows (objects keyed by the header row, or lists)."
    cpu_bound = True

    def cheap(self, args: Any) -> bool:
        # Linear: 100 KB of CSV parses in milliseconds.
        text = args.get("input") if isinstance(args, dict) else None
        return isinstance(text, str) and len(text) <= 100_000

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
        """Unique names for the header's cells ("a", "a_2", "a_3", …), in linear time."""
        names: list[str] = []
        used: set[str] = set()
        # The next suffix to try per base name: a header of 2,000 "a" cells must not rescan
        # the names (that was O(n³): 40–60 s of CPU for 4 KB of input).
        following: dict[str, int] = {}
        for i, raw in enumerate(header):
            name = raw.strip() or f"column{i + 1}"
            if name in used:
                # Duplicate names would silently drop columns from each row object.
                base, n = name, following.get(name, 2)
                while f"{base}_{n}" in used:
                    n += 1
                following[base] = n + 1
                name = f"{base}_{n}"
            used.add(name)
            names.append(name)
        return names

    def execute(self, args: dict, ctx: RunContext) -> Any:
        text = args["input"].removeprefix("\ufeff")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=args["delimiter"], strict=True)
        rows: list[Any] = []
        names: list[str] | None = None
        limit, size, keys = max_output_bytes(), 0, 0
        try:
            for record in reader:
                if not record:
                    continue
                if args["header"] and names is None:
                    names = self._names(record)
                    continue
                if len(rows) >= MAX_CSV_ROWS:
                    raise _invalid(f"More than {MAX_CSV_ROWS} rows")
                # The row's size as JSON, roughly, before it is built: the keys of every row
                # object are the header's names again.
                if names is not None and (len(record) > len(names) or not keys):
                    while len(names) < len(record):
                        names.append(f"column{len(names) + 1}")
                    keys = sum(len(name) + 6 for name in names)
                size += keys + sum(len(value) + 3 for value in record) + 2
                if size > limit:
                    raise output_too_large(size)
                if names is None:
                    rows.append(record)
                    continue
                rows.append({name: record[i] if i < len(record) else "" for i, name in enumerate(names)})
        except csv.Error as exc:
            raise _invalid(f"Invalid CSV at line {reader.line_num}: {exc}") from exc
        return {"rows": rows, "count": len(rows)}
