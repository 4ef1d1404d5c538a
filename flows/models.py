"""Flow definitions, their versions, the KV store and credentials."""

from __future__ import annotations

import copy
from typing import Any

from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from tenancy.ids import new_id
from tenancy.models import Company, User
from tenancy.storable import StorableJSONField

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

    def resolve(self, company: Company | str, key: str) -> Flow | None:
        """The company's live flow whose id, or else permanentId, is ``key`` (``{flowId}`` in a path)."""
        alive = self.alive().for_company(getattr(company, "pk", company))
        return alive.filter(pk=key).first() or alive.filter(permanent_id=key).first()


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
