"""Flow, flowlet and account serializers, and the validation of a flow's steps."""

from __future__ import annotations

import re
from typing import Any

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tenancy.models import ApiKey
from tenancy.permissions import SCOPES

from . import credentials, expr
from .expr.filters import CASTS, MODES, OPERATORS
from .models import Flow, Flowlet, OnError
from .modules import get_module
from .modules.base import REGISTRY
from .modules.iterator import loop_end
from .strict import StrictJSONMixin

REF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_REFS = {"args"}


class RetrySerializer(StrictJSONMixin, serializers.Serializer):
    count = serializers.IntegerField(min_value=0, max_value=100, default=0)
    delayMs = serializers.IntegerField(min_value=0, max_value=24 * 3600 * 1000, default=1000)
    backoffMultiplier = serializers.FloatField(min_value=1, max_value=100, default=2)
    jitter = serializers.BooleanField(default=False)


class FilterSerializer(StrictJSONMixin, serializers.Serializer):
    """One condition of a step's or a flow's ``filters`` (values may hold expressions)."""

    leftValue = serializers.JSONField(help_text="A value or an expression such as {{ $prev.a.n }}")
    operator = serializers.ChoiceField(choices=OPERATORS)
    rightValue = serializers.JSONField(required=False, help_text="Required except for is_empty / not_empty")
    cast = serializers.ChoiceField(choices=CASTS, required=False)
    mode = serializers.ChoiceField(choices=MODES, required=False)


@extend_schema_field({"type": "string", "enum": sorted(REGISTRY)})
class AppIdField(serializers.CharField):
    """A module's appId. Checked with the whole flow (validate_steps), so that an unknown one
    is reported beside the flow's other problems; the document lists the known ones."""


# Defaults of omitted fields are applied when a step is created (_replace_flowlets), never by
# the serializer: a PATCH must leave what it does not name alone, and the OpenAPI document
# must not tell clients to send defaults with a PATCH.
class FlowletSerializer(StrictJSONMixin, serializers.ModelSerializer):
    ref = serializers.RegexField(REF_RE.pattern, max_length=100,
                                 help_text="Names the step's output in expressions ($prev.<ref>); not 'args'")
    appId = AppIdField(source="app_id", max_length=100, help_text="A module: GET /api/modules")
    index = serializers.IntegerField(required=False, min_value=0)
    args = serializers.DictField(required=False, help_text="The module's args (default {})")
    filters = serializers.ListField(child=FilterSerializer(), required=False, help_text="Run the step only if all hold")
    timeout = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=7 * 24 * 3600)
    retry = RetrySerializer(required=False, allow_null=True)  # shown as null when the step has none
    onError = serializers.ChoiceField(source="on_error", choices=OnError.choices, required=False,
                                      help_text="Default fail")
    needsApproval = serializers.BooleanField(source="needs_approval", required=False, help_text="Default false")
    id = serializers.CharField(required=False, max_length=24)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200, help_text='Default ""')


    class Meta:
        model = Flowlet
        fields = ["id", "ref", "name", "appId", "index", "args", "filters", "timeout", "retry", "onError", "needsApproval"]

    def validate_ref(self, value: str) -> str:
        if not REF_RE.match(value):
            raise serializers.ValidationError("ref must match ^[A-Za-z_][A-Za-z0-9_]*$")
        if value in RESERVED_REFS:
            raise serializers.ValidationError(f"ref {value!r} is reserved")
        return value

    def to_internal_value(self, data: Any) -> Any:
        values = super().to_internal_value(data)
        if "filters" in values:
            # As given: the checks and the runner read the client's keys, not defaults.
            values["filters"] = data["filters"]
        return values

    def to_representation(self, instance: Flowlet) -> dict[str, Any]:
        data = super().to_representation(instance)
        data["retry"] = instance.retry or None
        return data


def validate_steps(layers: list[dict[str, Any]], flow_filters: Any = None, *, company_id: str | None = None,
                   flow_id: str | None = None) -> dict[str, list[str]]:
    """Check a flow's steps as a whole; return ``{"layers[1].args.url": [...]}`` or {}.

    Unknown appId, args that break the module's schema, malformed expressions, duplicate
    or reserved refs, and expressions that read a later or unknown step are all errors.
    Each message names the flowlet's ref.
    """
    errors: dict[str, list[str]] = {}

    def add(path: str, message: str) -> None:
        errors.setdefault(path, []).append(message)

    seen: dict[str, int] = {}
    for i, layer in enumerate(layers):
        ref = layer.get("ref", "")
        if ref in seen:
            add(f"layers[{i}].ref", f"Duplicate ref {ref!r} (also used by layers[{seen[ref]}])")
        else:
            seen[ref] = i
    for i, layer in enumerate(layers):
        ref = layer.get("ref", "")
        where = f"Flowlet {ref!r}"
        module = get_module(layer.get("app_id") or layer.get("appId") or "")
        if module is None:
            add(f"layers[{i}].appId", f"{where}: unknown appId {layer.get('app_id') or layer.get('appId')!r}")
        args = layer.get("args") or {}
        raw = module.raw_args if module is not None else frozenset()
        rendered_args = {k: v for k, v in args.items() if k not in raw} if isinstance(args, dict) else args
        for path, messages in expr.check(rendered_args).items():
            for message in messages:
                add(_join(f"layers[{i}].args", path), f"{where}: {message}")
        if module is not None:
            for path, messages in module.check(args).items():
                for message in messages:
                    add(_join(f"layers[{i}].args", path), f"{where}: {message}")
        filters = layer.get("filters") or []
        for path, messages in expr.check_filters(filters).items():
            for message in messages:
                add(_join(f"layers[{i}].filters", path), f"{where}: {message}")
        for field, value in (("args", rendered_args), ("filters", filters)):
            try:
                refs = expr.references(value)
            except Exception:  # syntax errors are reported above
                continue
            for name in sorted(refs):
                if name not in seen:
                    add(f"layers[{i}].{field}", f"{where}: expression refers to unknown step {name!r}")
                elif seen[name] >= i:
                    add(f"layers[{i}].{field}", f"{where}: expression refers to {name!r}, which does not run before it")
    _check_loops(layers, add)
    credentials.check_flow(layers, company_id, add)
    if company_id is not None:
        _check_subflows(layers, company_id, flow_id, add)
    if flow_filters:
        for path, messages in expr.check_filters(flow_filters).items():
            for message in messages:
                add(_join("filters", path), message)
        try:
            refs = expr.references(flow_filters)
        except Exception:
            refs = set()
        for name in sorted(refs):
            add("filters", f"Flow filters run before any step and can only read $prev.args, not {name!r}")
        if expr.credential_references(flow_filters):
            add("filters", "$credentials cannot be used in filters")
    return errors


def _app(layer: dict[str, Any]) -> str:
    return layer.get("app_id") or layer.get("appId") or ""


def _check_loops(layers: list[dict[str, Any]], add: Any) -> None:
    """Loops do not nest, and an aggregator gathers a step of the loop before it."""
    steps = [{"ref": layer.get("ref", ""), "appId": _app(layer), "args": layer.get("args") or {}} for layer in layers]
    inside: set[int] = set()
    closers: set[int] = set()
    for i, step in enumerate(steps):
        if step["appId"] != "iterator":
            continue
        end = loop_end(steps, i)
        if i in inside:
            add(f"layers[{i}].appId", f"Flowlet {step['ref']!r}: an iterator cannot be inside another iterator's loop")
        inside.update(range(i + 1, end))
        closers.add(end)
    for i, step in enumerate(steps):
        if step["appId"] == "aggregator" and i not in closers:
            add(f"layers[{i}].args.sourceRef",
                f"Flowlet {step['ref']!r}: sourceRef must name a step inside the loop of an iterator before it")


def _check_subflows(layers: list[dict[str, Any]], company_id: str, flow_id: str | None, add: Any) -> None:
    """A subflow must name an existing flow, and flows must not call themselves back."""
    def callees(flow: Flow) -> list[str]:
        return [str((f.args or {}).get("flowId")) for f in flow.flowlets.filter(app_id="subflow")
                if isinstance((f.args or {}).get("flowId"), str) and not expr.is_expression(f.args["flowId"])]

    for i, layer in enumerate(layers):
        if _app(layer) != "subflow":
            continue
        key = (layer.get("args") or {}).get("flowId")
        if not isinstance(key, str) or expr.is_expression(key):
            continue  # known at run time only: the depth limit guards it
        where = f"Flowlet {layer.get('ref', '')!r}"
        target = Flow.objects.resolve(company_id, key)
        if target is None:
            add(f"layers[{i}].args.flowId", f"{where}: no flow {key!r}")
            continue
        if flow_id is None:
            continue
        # Walk what the target calls, breadth first; reaching this flow is a cycle.
        seen, queue, path = {target.pk}, [target], {target.pk: [target.name]}
        while queue:
            current = queue.pop(0)
            if current.pk == flow_id:
                chain = " → ".join(path[current.pk])
                add(f"layers[{i}].args.flowId", f"{where}: calling {key!r} makes a cycle ({chain})")
                break
            for callee_key in callees(current):
                callee = Flow.objects.resolve(company_id, callee_key)
                if callee is not None and callee.pk not in seen:
                    seen.add(callee.pk)
                    path[callee.pk] = path[current.pk] + [callee.name]
                    queue.append(callee)


def _join(prefix: str, path: str) -> str:
    if not path:
        return prefix
    if path.startswith("["):
        return prefix + path
    return f"{prefix}.{path}"


class ExecutionSerializer(StrictJSONMixin, serializers.Serializer):
    timeout = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=30 * 24 * 3600)
    maxConcurrency = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100000)
    queue = serializers.RegexField(r"^[A-Za-z0-9_.\-]{1,100}$", required=False)


TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolSerializer(StrictJSONMixin, serializers.Serializer):
    """A flow offered as an MCP tool; ``inputSchema`` is a JSON Schema for its args."""

    name = serializers.RegexField(TOOL_NAME_RE, max_length=64, error_messages={
        "invalid": "a tool name is 1 to 64 letters, digits, '_', '-' or '.'"})
    description = serializers.CharField(required=False, allow_blank=True, max_length=4000, default="")
    inputSchema = serializers.JSONField(required=False, default=None)

    def validate_inputSchema(self, value: Any) -> dict[str, Any]:  # noqa: N802 - the API's field name
        import jsonschema

        if value is None:
            return {"type": "object", "properties": {}}
        if not isinstance(value, dict) or value.get("type") != "object":
            raise serializers.ValidationError('inputSchema must be a JSON Schema object with "type": "object"')
        try:
            jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise serializers.ValidationError(f"not a valid JSON Schema: {exc.message}") from None
        return value


class FlowSerializer(StrictJSONMixin, serializers.ModelSerializer):
    permanentId = serializers.SlugField(source="permanent_id", required=False, max_length=200)
    category = serializers.CharField(required=False, allow_blank=True, max_length=100)
    enabled = serializers.BooleanField(required=False)
    version = serializers.IntegerField(read_only=True)
    createdAt = serializers.DateTimeField(source="created_at", read_only=True)
    updatedAt = serializers.DateTimeField(source="updated_at", read_only=True)
    filters = serializers.ListField(child=FilterSerializer(), required=False,
                                    help_text="Checked before the first step; they can read $prev.args only")
    execution = ExecutionSerializer(required=False)
    layers = FlowletSerializer(many=True, required=False)
    tool = ToolSerializer(required=False, allow_null=True)

    class Meta:
        model = Flow
        fields = ["id", "name", "permanentId", "category", "enabled", "version", "createdAt", "updatedAt",
                  "filters", "execution", "tool", "layers"]
        read_only_fields = ["id"]

    def to_representation(self, instance: Flow) -> dict[str, Any]:
        return {
            "id": instance.id,
            "name": instance.name,
            "permanentId": instance.permanent_id,
            "category": instance.category,
            "enabled": instance.enabled,
            "version": instance.version,
            "createdAt": serializers.DateTimeField().to_representation(instance.created_at),
            "updatedAt": serializers.DateTimeField().to_representation(instance.updated_at),
            "filters": instance.filters,
            "execution": instance.execution,
            "tool": instance.tool,
            "layers": FlowletSerializer(instance.flowlets.all(), many=True).data,
        }

    def to_internal_value(self, data: Any) -> Any:
        values = super().to_internal_value(data)
        if "filters" in values:
            values["filters"] = data["filters"]
        return values

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        layers = attrs.get("layers")
        if layers is None and self.instance is not None:
            layers = [f.definition() | {"app_id": f.app_id} for f in self.instance.flowlets.all()]
        ordered = _ordered(layers or [])
        filters = attrs.get("filters", self.instance.filters if self.instance is not None else [])
        request = self.context.get("request")
        company_id = request.user.company_id if request is not None else (self.instance.company_id if self.instance else None)
        errors = validate_steps(ordered, filters, company_id=company_id,
                                flow_id=self.instance.pk if self.instance is not None else None)
        if errors:
            raise serializers.ValidationError(errors)
        if "layers" in attrs:
            attrs["layers"] = ordered
        if attrs.get("tool") and company_id is not None:
            others = Flow.objects.alive().filter(company_id=company_id, tool__name=attrs["tool"]["name"])
            if self.instance is not None:
                others = others.exclude(pk=self.instance.pk)
            if others.exists():
                raise serializers.ValidationError({"tool.name": [f"tool name {attrs['tool']['name']!r} is already used"]})
        return attrs

    @transaction.atomic
    def create(self, validated: dict[str, Any]) -> Flow:
        layers = validated.pop("layers", [])
        execution = validated.pop("execution", {})
        flow = Flow(company=self.context["request"].user.company, **validated)
        _apply_execution(flow, execution)
        flow.permanent_id = flow.unique_permanent_id(validated.get("permanent_id"))
        if validated.get("permanent_id") and flow.permanent_id != validated["permanent_id"]:
            raise serializers.ValidationError({"permanentId": [f"permanentId {validated['permanent_id']!r} is already used"]})
        flow.save()
        _replace_flowlets(flow, layers)
        flow.snapshot()
        return flow

    @transaction.atomic
    def update(self, flow: Flow, validated: dict[str, Any]) -> Flow:
        # Serialise concurrent edits of one flow so each gets its own version number.
        Flow.objects.select_for_update().filter(pk=flow.pk).first()
        layers = validated.pop("layers", None)
        execution = validated.pop("execution", None)
        if "permanent_id" in validated and validated["permanent_id"] != flow.permanent_id:
            wanted = validated["permanent_id"]
            if Flow.objects.alive().filter(company_id=flow.company_id, permanent_id=wanted).exclude(pk=flow.pk).exists():
                raise serializers.ValidationError({"permanentId": [f"permanentId {wanted!r} is already used"]})
        for name, value in validated.items():
            setattr(flow, name, value)
        if execution is not None:
            _apply_execution(flow, execution, partial=self.partial)
        flow.updated_at = timezone.now()
        flow.save()
        if layers is not None:
            _replace_flowlets(flow, layers)
        flow.bump()
        return flow


def _apply_execution(flow: Flow, execution: dict[str, Any], partial: bool = False) -> None:
    if not partial or "timeout" in execution:
        flow.timeout = execution.get("timeout")
    if not partial or "maxConcurrency" in execution:
        flow.max_concurrency = execution.get("maxConcurrency")
    if not partial or "queue" in execution:
        flow.queue = execution.get("queue") or "default"


def _ordered(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order inline layers by their given index (stable), then make indexes dense."""
    keyed = sorted(enumerate(layers), key=lambda pair: (pair[1].get("index", pair[0]), pair[0]))
    ordered = []
    for position, (_, layer) in enumerate(keyed):
        layer = dict(layer)
        layer["index"] = position
        ordered.append(layer)
    return ordered


FLOWLET_FIELDS = ("ref", "name", "app_id", "args", "filters", "timeout", "retry", "on_error", "needs_approval")


def _replace_flowlets(flow: Flow, layers: list[dict[str, Any]]) -> None:
    """Make the flow's flowlets exactly ``layers``, keeping ids matched by id or ref."""
    existing = {f.id: f for f in flow.flowlets.all()}
    by_ref = {f.ref: f for f in existing.values()}
    keep: list[Flowlet] = []
    for layer in layers:
        match = existing.get(layer.get("id") or "") or by_ref.get(layer["ref"])
        flowlet = match or Flowlet(flow=flow)
        for name in FLOWLET_FIELDS:
            default = {"args": {}, "filters": [], "retry": {}, "on_error": OnError.FAIL, "needs_approval": False,
                       "name": "", "timeout": None}.get(name)
            setattr(flowlet, name, layer.get(name, default))
        flowlet.retry = dict(flowlet.retry or {})
        keep.append(flowlet)
    kept_ids = {f.id for f in keep if f.pk and f.id in existing}
    flow.flowlets.exclude(pk__in=kept_ids).delete()
    # Park surviving rows on negative indexes first: (flow, index) and (flow, ref) are unique.
    for offset, flowlet in enumerate(keep):
        if flowlet.id in existing:
            Flowlet.objects.filter(pk=flowlet.id).update(index=-1 - offset, ref=f"__moving_{offset}")
    for position, flowlet in enumerate(keep):
        flowlet.index = position
        if flowlet.id in existing:
            flowlet.save()
        else:
            flowlet.save(force_insert=True)


# --- Accounts -------------------------------------------------------------------------


class LoginSerializer(StrictJSONMixin, serializers.Serializer):
    email = serializers.CharField(max_length=254)
    password = serializers.CharField(max_length=1024, trim_whitespace=False)


class UserSerializer(serializers.Serializer):
    id = serializers.CharField(source="pk")
    email = serializers.EmailField()
    name = serializers.CharField(source="display_name")


class CompanySerializer(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()


class MeSerializer(UserSerializer):
    company = CompanySerializer()


class ApiKeySerializer(StrictJSONMixin, serializers.ModelSerializer):
    issuedAt = serializers.DateTimeField(source="created_at", read_only=True)
    lastUsedAt = serializers.DateTimeField(source="last_used_at", read_only=True, allow_null=True,
                                           help_text="null until the key is used")
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=sorted(SCOPES)), required=False, max_length=len(SCOPES),
        help_text="What the key may do (flows/permissions.py); none: everything its user may do. "
        "A key minting a key gets at most its own scopes.",
    )
    name = serializers.CharField(max_length=200)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "scopes", "issuedAt", "lastUsedAt"]
        read_only_fields = ["id"]


class ApiKeyCreatedSerializer(ApiKeySerializer):
    token = serializers.CharField(read_only=True)

    class Meta(ApiKeySerializer.Meta):
        fields = ["id", "name", "token", "scopes", "issuedAt"]
