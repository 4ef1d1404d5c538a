"""The audit log: who triggered, held, resumed, approved, declined, cancelled or retried which
play, and who created, changed or deleted which flow.

Call ``record(user, action, obj, **details)`` right after the change succeeded, inside the
same transaction when there is one, from the API views and from admin actions alike::

    from flows.audit import record
    record(request.user, "play.cancelled", play, source="admin")

Actions are ``"<object>.<verb in the past>"``; ``ACTIONS`` lists the known ones. Entries are
only ever added (the admin registration in ``flows.audit_admin`` is read-only).
"""

from __future__ import annotations

import logging
from typing import Any

from .models import AuditEntry

log = logging.getLogger(__name__)

ACTIONS = {
    "play.triggered": "Triggered a play",
    "play.started": "Started a play created with start=false",
    "play.held": "Put a play on hold",
    "play.resumed": "Resumed a play",
    "play.approved": "Approved a step",
    "play.declined": "Declined a step",
    "play.cancelled": "Cancelled a play",
    "play.retried": "Retried a failed play",
    "bulk.retried": "Retried failed plays in bulk",
    "bulk.cancelled": "Cancelled plays in bulk",
    "bulk.held": "Held plays in bulk",
    "bulk.resumed": "Resumed plays in bulk",
    "bulk.approved": "Approved waiting steps in bulk",
    "bulk.declined": "Declined waiting steps in bulk",
    "flow.created": "Created a flow",
    "flow.changed": "Changed a flow",
    "flow.deleted": "Deleted a flow",
    "api_key.created": "Issued an API key",
    "api_key.revoked": "Revoked an API key",
    "credential.created": "Created a credential",
    "credential.rotated": "Rotated a credential's value",
    "credential.changed": "Changed a credential's description",
    "credential.deleted": "Deleted a credential",
    "schedule.created": "Created a schedule",
    "schedule.changed": "Changed a schedule",
    "schedule.deleted": "Deleted a schedule",
    "schedule.paused": "Paused a schedule",
    "schedule.resumed": "Resumed a schedule",
    "schedule.triggered": "Fired a schedule by hand",
}

# The past tense of the play verbs of plays.models.Play, by method name.
PLAY_VERBS = {"hold": "play.held", "resume": "play.resumed", "cancel": "play.cancelled", "begin": "play.started"}


def record(user: Any, action: str, obj: Any, **details: Any) -> AuditEntry:
    """Store one audit entry of ``user`` doing ``action`` to ``obj`` (a model instance)."""
    if action not in ACTIONS:
        raise ValueError(f"Unknown audit action {action!r}")
    actor = user if getattr(user, "pk", None) else None
    company_id = getattr(obj, "company_id", None) or getattr(actor, "company_id", None)
    if company_id is None and hasattr(obj, "user"):
        company_id = getattr(obj.user, "company_id", None)
    entry = AuditEntry.objects.create(
        company_id=company_id,
        actor=actor,
        actor_name=getattr(actor, "username", "") or "",
        action=action,
        object_type=obj._meta.model_name,
        object_id=str(obj.pk),
        object_repr=str(obj)[:200],
        details=details,
    )
    log.info("audit: %s %s %s %s", entry.actor_name or "system", action, entry.object_type, entry.object_id)
    return entry


def history(obj: Any) -> Any:
    """The audit entries of one object, newest first."""
    return AuditEntry.objects.filter(object_type=obj._meta.model_name, object_id=str(obj.pk))


__all__ = ["ACTIONS", "PLAY_VERBS", "record", "history"]
