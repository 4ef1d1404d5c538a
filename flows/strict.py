"""Request bodies as the OpenAPI document describes them: JSON types, no NUL in strings.

Kept free of DRF's views so that serializers can import it (DRF's settings import flows.api).
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

# Strings in requests: no NUL (DRF refuses it; PostgreSQL could not store it). As an OpenAPI
# pattern, and the same with at least one non-space character for fields that are trimmed
# and must not be blank.
NO_NUL = "^[^\\x00]*$"
NOT_BLANK = "^[^\\x00]*[^\\s\\x00][^\\x00]*$"


# --- Request bodies are JSON: a field takes its own JSON type only ------------------------
#
# DRF coerces (`"5"` for an integer, `0` for a string, `"yes"` for a boolean); the OpenAPI
# document promises the JSON types, so the serializers of request bodies refuse the others.


def _json_type(field: Any) -> tuple[tuple[type, ...], str] | None:
    if isinstance(field, serializers.BooleanField):
        return (bool,), "a boolean"
    if isinstance(field, serializers.IntegerField):
        return (int,), "an integer"
    if isinstance(field, (serializers.FloatField, serializers.DecimalField)):
        return (int, float), "a number"
    if isinstance(
        field, (serializers.ChoiceField, serializers.CharField, serializers.DateTimeField, serializers.DateField)
    ):
        return (str,), "a string"
    if isinstance(field, (serializers.ListField, serializers.ListSerializer)):
        return (list,), "a list"
    if isinstance(field, (serializers.DictField, serializers.Serializer)):
        return (dict,), "an object"
    return None  # JSONField: any JSON value


def json_type_errors(field: Any, value: Any) -> list[str]:
    expected = _json_type(field)
    if value is None or expected is None:
        return []  # null is the field's own business (allow_null)
    types, name = expected
    if isinstance(value, bool) and bool not in types:
        return [f"Must be {name}"]
    if not isinstance(value, types):
        return [f"Must be {name}"]
    if isinstance(field, serializers.ListField) and field.child is not None:
        for i, item in enumerate(value):
            if item is None and not getattr(field.child, "allow_null", False):
                return [f"Item {i} must not be null"]
            if errs := json_type_errors(field.child, item):
                return [f"Item {i}: {errs[0]}"]
    return []


# For request serializers: each field accepts its JSON type only, nothing coerced. (A comment,
# not a docstring: drf-spectacular would show it as every serializer's description.)
class StrictJSONMixin:
    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            errors = {}
            for name, field in self.fields.items():  # type: ignore[attr-defined]
                if field.read_only or name not in data:
                    continue
                if errs := json_type_errors(field, data[name]):
                    errors[name] = errs
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)  # type: ignore[misc]


__all__ = ["NO_NUL", "NOT_BLANK", "StrictJSONMixin", "json_type_errors"]
