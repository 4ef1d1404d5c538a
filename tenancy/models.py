"""Tenants, people, their API keys, and the audit log of what they did.

The tables keep the names they had in the ``flows`` app (``db_table``): the models moved
without their rows (tenancy/migrations/0001_initial.py).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.contrib.auth.models import AbstractUser, UserManager
from django.db import models, transaction
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone

from .ids import new_id
from .storable import StorableJSONField

DEFAULT_COMPANY_NAME = "Default"


class Company(models.Model):
    """A tenant. Every flow, play and event belongs to exactly one."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=200, unique=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        db_table = "flows_company"
        verbose_name_plural = "companies"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def default(cls) -> Company:
        company, _ = cls.objects.get_or_create(slug="default", defaults={"name": DEFAULT_COMPANY_NAME})
        return company


class User(AbstractUser):
    company = models.ForeignKey(Company, on_delete=models.PROTECT, related_name="users")

    objects = UserManager()

    class Meta:
        db_table = "flows_user"
        constraints = [
            models.UniqueConstraint(
                Lower("email"), condition=~Q(email=""), name="flows_user_unique_email"
            ),
        ]

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.company_id is None:
            # createsuperuser --noinput and plain create_user() land in the default company.
            self.company = Company.default()
        super().save(*args, **kwargs)

    @property
    def display_name(self) -> str:
        return self.get_full_name() or self.username


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def active(self) -> ApiKeyQuerySet:
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A bearer token for scripts. Only its SHA-256 is stored; the token is shown once."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=16, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    scopes = StorableJSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # The key that minted this one (None: minted with a session). Revoking a key revokes
    # every key it minted, recursively.
    parent = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, editable=False,
                               related_name="children")

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        db_table = "flows_apikey"
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    @transaction.atomic
    def issue(
        cls, user: User, name: str, scopes: list[str] | None = None, parent: ApiKey | None = None
    ) -> tuple[ApiKey, str]:
        """Create a key and return it with its token; the token is not recoverable later.

        Minted by ``parent`` (a key), the new key gets the parent's scopes when none are asked
        for, and must stay within them (``KeyScopeError``). No scopes: the user's full access.
        """
        from .permissions import key_allows

        scopes = list(dict.fromkeys(scopes or []))
        if parent is not None:
            # Locked, so that a revoke running now either sees this key or refuses it.
            alive = cls.objects.select_for_update().filter(pk=parent.pk, revoked_at__isnull=True).first()
            if alive is None:
                raise KeyScopeError("The minting API key was revoked")
            if alive.scopes and not scopes:
                scopes = list(alive.scopes)
            beyond = [scope for scope in scopes if not key_allows(alive.scopes, scope)]
            if beyond:
                raise KeyScopeError(f"An API key mints only keys within its own scopes; not: {', '.join(beyond)}")
        prefix = secrets.token_hex(4)
        token = f"fp_{prefix}_{secrets.token_urlsafe(32)}"
        key = cls.objects.create(
            user=user, name=name, prefix=prefix, token_hash=hash_token(token), scopes=scopes, parent=parent
        )
        return key, token

    def allows(self, scope: str) -> bool:
        from .permissions import key_allows

        return key_allows(self.scopes, scope)

    def family_ids(self) -> list[str]:
        """This key's id and those of every key it minted, recursively."""
        ids, frontier = [self.pk], [self.pk]
        while frontier:
            frontier = list(ApiKey.objects.filter(parent_id__in=frontier).exclude(pk__in=ids).values_list("pk", flat=True))
            ids += frontier
        return ids

    @classmethod
    def lookup(cls, token: str) -> ApiKey | None:
        key = cls.objects.active().select_related("user", "user__company").filter(token_hash=hash_token(token)).first()
        if key is None or not key.user.is_active:
            return None
        now = timezone.now()
        # Write at most once a minute: a busy script must not turn every read into a write.
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
            cls.objects.filter(pk=key.pk).update(last_used_at=now)
            key.last_used_at = now
        return key

    @transaction.atomic
    def revoke(self) -> None:
        """Revoke this key and every key minted from it (a child never outlives its parent)."""
        now = timezone.now()
        # First this key (the row lock makes a concurrent issue() from it wait, then refuse).
        ApiKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=now)
        ApiKey.objects.filter(pk__in=self.family_ids(), revoked_at__isnull=True).update(revoked_at=now)


class KeyScopeError(Exception):
    """A key asked to mint a key beyond its own scopes (or after its revocation)."""


# --- Audit ----------------------------------------------------------------------------


class AuditEntry(models.Model):
    """Who did what to which play or flow, from the API or the admin (see ``tenancy.audit``).

    Rows are only ever added; the admin shows them read-only to staff.
    """

    company = models.ForeignKey(Company, on_delete=models.CASCADE, null=True, blank=True, related_name="+")
    actor = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # The actor's username when the entry was written: it survives the user's deletion.
    actor_name = models.CharField(max_length=150, blank=True, default="")
    action = models.CharField(max_length=32)
    object_type = models.CharField(max_length=32)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=200, blank=True, default="")
    details = StorableJSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        db_table = "flows_auditentry"
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["object_type", "object_id", "-created_at"], name="flows_audit_object"),
            models.Index(fields=["company", "-created_at"], name="flows_audit_company"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name or 'system'} {self.action} {self.object_type} {self.object_id}"
