"""Moved to tenancy.ids; the old migrations name this module."""

from tenancy.ids import new_id  # noqa: F401
