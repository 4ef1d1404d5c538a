"""Tenants, people, API keys and flow definitions."""

from __future__ import annotations

import copy
import functools
import hashlib
import secrets
from typing import Any

from django.contrib.auth.models import AbstractUser, UserManager
from django.db import models, transaction
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.text import slugify

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
        """The active key of ``token`` with its user and company, in one query that also
        reads whether the user has a role (``know_roles``: the role check needs no query).
        Its SQL is written once (``_key_sql``): compiling the ORM's took longer than the
        rest of a run request."""
        from django.db import connection

        from flowplay.rows import instances

        from .permissions import know_roles

        with connection.cursor() as cursor:
            cursor.execute(_key_sql(connection.vendor), [hash_token(token)])
            row = cursor.fetchone()
        if row is None:
            return None
        (key, user, company), (has_roles,) = instances(row, (cls, User, Company), connection)
        user.company = company
        key.user = user
        if not user.is_active:
            return None
        know_roles(user, bool(has_roles))
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


@functools.cache
def _key_sql(vendor: str) -> str:
    """ApiKey.lookup's query: the active key by token hash, its user, the user's company, and
    whether the user is in a group or has permissions of their own."""
    from django.db import connection

    from flowplay.rows import columns

    quote = connection.ops.quote_name
    groups, perms = User.groups, User.user_permissions
    g_user, p_user = quote(groups.field.m2m_column_name()), quote(perms.field.m2m_column_name())
    return f"""
        SELECT {columns(ApiKey, "k", connection)}, {columns(User, "u", connection)},
            {columns(Company, "c", connection)},
            EXISTS (SELECT 1 FROM {quote(groups.through._meta.db_table)} g WHERE g.{g_user} = k.user_id)
            OR EXISTS (SELECT 1 FROM {quote(perms.through._meta.db_table)} p WHERE p.{p_user} = k.user_id)
        FROM {quote(ApiKey._meta.db_table)} k
        JOIN {quote(User._meta.db_table)} u ON u.id = k.user_id
        JOIN {quote(Company._meta.db_table)} c ON c.id = u.company_id
        WHERE k.token_hash = %s AND k.revoked_at IS NULL
    """


class KeyScopeError(Exception):
    """A key asked to mint a key beyond its own scopes (or after its revocation)."""


# --- Flows ----------------------------------------------------------------------------


class OnError(models.TextChoices):
    FAIL = "fail"
    CONTINUE = "continue"
    SKIP = "skip"


class FlowQuerySet(models.QuerySet):
    def alive(self) -> FlowQuerySet:
        return self.filter(deleted_at__isnull=True)

    def for_company(self, company_id: str) -> FlowQuerySet:
        return self.filter(company_id=company_id)

    def get_by_id_or_permanent_id(self, key: str) -> Flow:
        """Resolve ``{flowId}`` in a path: the id or the permanentId both work."""
        return self.filter(Q(pk=key) | Q(permanent_id=key)).get()


class Flow(models.Model):
    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    company = models.ForeignKey(Company, on_delete=models.PROTECT, related_name="flows")
    name = models.CharField(max_length=200)
    permanent_id = models.SlugField(max_length=200)
    category = models.CharField(max_length=100, blank=True, default="")
    enabled = models.BooleanField(default=True)
    version = models.PositiveIntegerField(default=1)
    filters = StorableJSONField(default=list, blank=True)
    timeout = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds for the whole play.")
    max_concurrency = models.PositiveIntegerField(null=True, blank=True)
    queue = models.CharField(max_length=100, default="default")
    retention_days = models.PositiveIntegerField(null=True, blank=True)
    # Retention keeps at least this many newest finished plays of the flow (None: the setting).
    retention_keep = models.PositiveIntegerField(null=True, blank=True)
    # The flow as an MCP tool: {"name", "description", "inputSchema"} (a JSON Schema for its
    # args); null = not a tool (triggers/mcp.py).
    tool = StorableJSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = FlowQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["company", "permanent_id"],
                condition=Q(deleted_at__isnull=True),
                name="flows_flow_unique_permanent_id",
            ),
        ]
        indexes = [models.Index(fields=["company", "name"], name="flows_flow_company_name")]

    def __str__(self) -> str:
        return self.name

    @property
    def execution(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "maxConcurrency": self.max_concurrency, "queue": self.queue}

    def unique_permanent_id(self, wanted: str | None) -> str:
        base = slugify(wanted or self.name)[:180] or "flow"
        taken = set(
            Flow.objects.alive()
            .filter(company_id=self.company_id, permanent_id__startswith=base)
            .exclude(pk=self.pk)
            .values_list("permanent_id", flat=True)
        )
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def definition(self) -> dict[str, Any]:
        """The flow as the runner needs it, frozen into a FlowVersion."""
        return {
            "name": self.name,
            "filters": self.filters,
            "execution": self.execution,
            "layers": [f.definition() for f in self.flowlets.order_by("index")],
        }

    def snapshot(self) -> FlowVersion:
        """Return the FlowVersion of the current version, creating it on first use."""
        existing = FlowVersion.objects.filter(flow=self, version=self.version).first()
        if existing is not None:
            return existing
        version, _ = FlowVersion.objects.get_or_create(
            flow=self, version=self.version, defaults={"definition": self.definition()}
        )
        return version

    @transaction.atomic
    def bump(self) -> None:
        """Record a change: version + 1 and a fresh snapshot for plays created from now on."""
        Flow.objects.filter(pk=self.pk).update(version=models.F("version") + 1, updated_at=timezone.now())
        self.refresh_from_db(fields=["version", "updated_at"])
        FlowVersion.objects.get_or_create(flow=self, version=self.version, defaults={"definition": self.definition()})

    def soft_delete(self) -> None:
        Flow.objects.filter(pk=self.pk, deleted_at__isnull=True).update(deleted_at=timezone.now())

    def renumber(self) -> None:
        """Keep flowlet indexes dense and unique, in their current order."""
        flowlets = list(self.flowlets.order_by("index", "id"))
        if [f.index for f in flowlets] == list(range(len(flowlets))):
            return
        # Two passes, because (flow, index) is unique and indexes may swap.
        for offset, flowlet in enumerate(flowlets):
            Flowlet.objects.filter(pk=flowlet.pk).update(index=-1 - offset)
        for position, flowlet in enumerate(flowlets):
            Flowlet.objects.filter(pk=flowlet.pk).update(index=position)


class Flowlet(models.Model):
    """One step of a flow (the flow's ``layers`` in the API)."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="flowlets")
    ref = models.CharField(max_length=100)
    name = models.CharField(max_length=200, blank=True, default="")
    app_id = models.CharField(max_length=100)
    index = models.IntegerField()
    args = StorableJSONField(default=dict, blank=True)
    filters = StorableJSONField(default=list, blank=True)
    timeout = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds for one attempt.")
    retry = StorableJSONField(default=dict, blank=True)
    on_error = models.CharField(max_length=10, choices=OnError, default=OnError.FAIL)
    needs_approval = models.BooleanField(default=False)

    class Meta:
        ordering = ["index"]
        constraints = [
            models.UniqueConstraint(fields=["flow", "ref"], name="flows_flowlet_unique_ref"),
            models.UniqueConstraint(fields=["flow", "index"], name="flows_flowlet_unique_index"),
        ]

    def __str__(self) -> str:
        return f"{self.ref} ({self.app_id})"

    def definition(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ref": self.ref,
            "name": self.name,
            "appId": self.app_id,
            "index": self.index,
            "args": copy.deepcopy(self.args),
            "filters": copy.deepcopy(self.filters),
            "timeout": self.timeout,
            "retry": copy.deepcopy(self.retry),
            "onError": self.on_error,
            "needsApproval": self.needs_approval,
        }


class FlowVersion(models.Model):
    """An immutable snapshot of a flow; a play runs the snapshot it was created with."""

    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    definition = StorableJSONField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["flow", "version"], name="flows_flowversion_unique_version"),
        ]

    def __str__(self) -> str:
        return f"{self.flow_id} v{self.version}"


class KVScope(models.TextChoices):
    GLOBAL = "global"
    FLOW = "flow"


class KV(models.Model):
    """A small key/value store for flows (`kv-set`, `kv-get`, `kv-append`)."""

    company = models.ForeignKey(Company, on_delete=models.CASCADE, related_name="kv")
    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, null=True, blank=True, related_name="kv")
    key = models.CharField(max_length=255)
    value = StorableJSONField(null=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "KV entry"
        verbose_name_plural = "KV entries"
        constraints = [
            models.UniqueConstraint(
                fields=["company", "key"], condition=Q(flow__isnull=True), name="flows_kv_unique_global_key"
            ),
            models.UniqueConstraint(
                fields=["company", "flow", "key"], condition=Q(flow__isnull=False), name="flows_kv_unique_flow_key"
            ),
        ]

    def __str__(self) -> str:
        return self.key

    @property
    def plain_value(self) -> Any:
        """The value, decrypted (it is stored encrypted, see ``flows.vault``)."""
        from .vault import unseal

        return unseal(self.value)


# --- Credentials ----------------------------------------------------------------------


class CredentialKind(models.TextChoices):
    TOKEN = "token"
    BASIC = "basic"
    HEADER = "header"
    OAUTH2_CLIENT = "oauth2-client"


class Credential(models.Model):
    """A secret that flows use by name and nobody reads back (see ``flows.credentials``).

    ``secret`` is the value encrypted with ``flows.vault`` (Fernet); the API and the admin
    show only ``fingerprint`` (a keyed hash) and ``last4``. ``public`` holds what is not
    secret (a basic credential's username, a header's name, an OAuth2 client's token URL,
    client id and scopes). An ``oauth2-client`` caches its access token, encrypted too.
    """

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    company = models.ForeignKey(Company, on_delete=models.CASCADE, related_name="credentials")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=CredentialKind)
    description = models.CharField(max_length=500, blank=True, default="")
    public = StorableJSONField(default=dict, blank=True)
    secret = models.TextField(editable=False)
    fingerprint = models.CharField(max_length=32, editable=False)
    last4 = models.CharField(max_length=4, blank=True, default="", editable=False)
    created_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_play_id = models.CharField(max_length=24, blank=True, default="", editable=False)
    use_count = models.PositiveBigIntegerField(default=0, editable=False)
    # oauth2-client: the cached access token (encrypted) and when it expires.
    access_token = models.TextField(blank=True, default="", editable=False)
    access_token_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["company", "name"], name="flows_credential_unique_name"),
        ]

    def __str__(self) -> str:
        return self.name


# --- Audit ----------------------------------------------------------------------------


class AuditEntry(models.Model):
    """Who did what to which play or flow, from the API or the admin (see ``flows.audit``).

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
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["object_type", "object_id", "-created_at"], name="flows_audit_object"),
            models.Index(fields=["company", "-created_at"], name="flows_audit_company"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name or 'system'} {self.action} {self.object_type} {self.object_id}"
