"""Model rows from hand-written SQL, for the reads of a hot request path.

The ORM compiles a queryset into SQL on every evaluation: for ``POST /api/flows/{id}/run``
the API key's read (with its user, company and role flags) and the flow's (with its
version) cost more CPU to compile than the rest of the request. Those reads are written
once as SQL here, their column lists taken from the models' ``_meta``, and their rows
turned into model instances as the ORM does it (its converters, then ``Model.from_db``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from django.db import models


def columns(model: type[models.Model], alias: str, connection: Any) -> str:
    """``alias."col", …`` of every concrete field of ``model``, in ``_meta`` order."""
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(f.column)}" for f in model._meta.concrete_fields)


def instance(model: type[models.Model], values: Sequence[Any], connection: Any) -> models.Model:
    """``model`` from the values of ``columns(model, …)``, converted as the ORM converts them."""
    names, converters = _converters(model, connection.alias, connection.vendor)
    converted = []
    for value, (col, convert) in zip(values, converters, strict=True):
        for one in convert:
            value = one(value, col, connection)
        converted.append(value)
    return model.from_db(connection.alias, names, converted)


@functools.cache
def _converters(model: type[models.Model], alias: str, vendor: str) -> tuple[list[str], list[tuple[Any, tuple]]]:
    """``instance``'s field names and, per field, its column and the ORM's converters,
    looked up once per model and database (``vendor``: the key's part that says which)."""
    from django.db import connections

    connection = connections[alias]
    fields = model._meta.concrete_fields
    converters = []
    for field in fields:
        col = field.cached_col
        converters.append((col, (*connection.ops.get_db_converters(col), *col.get_db_converters(connection))))
    return [f.attname for f in fields], converters


def instances(
    row: Sequence[Any], models_: Sequence[type[models.Model]], connection: Any
) -> tuple[list[models.Model | None], Sequence[Any]]:
    """One instance per model from consecutive ``columns()`` of ``row`` (None where the
    primary key is NULL: an outer join that found nothing), and the values after them."""
    out: list[models.Model | None] = []
    offset = 0
    for model in models_:
        n = len(model._meta.concrete_fields)
        values = row[offset : offset + n]
        pk = [f.attname for f in model._meta.concrete_fields].index(model._meta.pk.attname)
        out.append(None if values[pk] is None else instance(model, values, connection))
        offset += n
    return out, row[offset:]
