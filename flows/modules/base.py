"""Modules: the things a flowlet calls by ``appId``.

One class per module, registered in ``REGISTRY`` by its ``app_id`` (the same shape as
healthchecks' transports). A module declares JSON Schemas for its args and its out, may
add checks a schema cannot express, and implements ``execute()``.

Two validation passes use the same schema:

* ``check()`` runs at save time on *unrendered* args, where any string containing
  ``{{`` is an expression that will produce the real value at run time, so it is
  accepted wherever any type is expected.
* ``run()`` runs on *rendered* args and is strict: a bad value there is a bad input
  that no retry can fix (``StepError`` code ``INVALID_INPUT``, ``retryable=False``).
"""

from __future__ import annotations

import base64
import binascii
import copy
import csv
import functools
import io
import ipaddress
import json
import math
import re
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote, unquote_plus, unquote_to_bytes, urlencode, urlsplit

import httpcore
import httpx
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

# Bounds that keep one step from eating a worker's memory or CPU.
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
MAX_PDF_BYTES = 20 * 1024 * 1024
MAX_PDF_PAGES = 2000
MAX_REGEX_PATTERN = 2000
MAX_REGEX_INPUT = 1024 * 1024
MAX_REGEX_MATCHES = 10_000
MAX_ENUM_ITEMS = 100_000
MAX_CSV_INPUT = 10 * 1024 * 1024
MAX_CSV_ROWS = 100_000
MAX_SLEEP_MS = 31 * 24 * 3600 * 1000
MAX_REDIRECTS = 10

DEFAULT_CURL_DENY = ["169.254.0.0/16", "fd00:ec2::254/128", "100.100.100.200/32"]


class StepError(Exception):
    """A step attempt failed.

    ``code`` is machine-readable ("HTTP_ERROR", "TIMEOUT", "INVALID_INPUT", "PDF_ERROR",
    ...). ``retryable=False`` marks errors a retry cannot fix, so the runner can fail the
    step at once instead of burning its retries.
    """

    def __init__(self, message: str, code: str = "STEP_ERROR", retryable: bool = True):
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"StepError({self.message!r}, code={self.code!r}, retryable={self.retryable!r})"


class Park(Exception):
    """Raised by a module that wants the play to wait without holding a worker.

    ``until`` is an aware datetime; ``out`` is what the step records once the wait is over.
    """

    def __init__(self, until: datetime, out: Any, ready: Callable[[], bool] | None = None):
        super().__init__(f"park until {until.isoformat()}")
        self.until = until
        # None: the module is called again when the play wakes (it waits for something,
        # e.g. a subflow's child play); ``ready`` tells whether that already happened.
        self.out = out
        self.ready = ready


@dataclass
class RunContext:
    play_id: str = ""
    flow_id: str = ""
    company_id: str = ""
    ref: str = ""
    attempt: int = 1
    timeout: float = 300.0  # seconds left for this attempt
    layer_id: str = ""
    iteration: int | None = None
    # The outputs of a loop step's iterations in item order (for `aggregator`).
    collect: Callable[[str], list] | None = None


def is_expression(value: Any) -> bool:
    # Same rule as flows.expr.is_expression; kept local so validation does not depend on
    # the template engine being importable.
    return isinstance(value, str) and "{{" in value


def _deferred(value: Any, lenient: bool) -> bool:
    """True when a value cannot be checked yet because it is rendered at run time."""
    return lenient and is_expression(value)


# --- Validation helpers ---------------------------------------------------------------

_PLAIN_KEY = re.compile(r'^[^.\[\]\s"]+$')


def _format_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            # Keys with dots or brackets would make the path ambiguous.
            out += f"[{json.dumps(part)}]"
    return out


def _ignorable(error: ValidationError) -> bool:
    if is_expression(error.instance):
        return True
    if error.validator in ("anyOf", "oneOf") and error.context:
        # The value is acceptable if some branch failed only because of expressions.
        branches: dict[Any, list[ValidationError]] = defaultdict(list)
        for sub in error.context:
            branches[sub.schema_path[0] if sub.schema_path else None].append(sub)
        return any(all(_ignorable(sub) for sub in subs) for subs in branches.values())
    return False


def _type_names(value: Any) -> str:
    names = value if isinstance(value, list) else [value]
    return " or ".join(names)


def _describe(error: ValidationError) -> list[tuple[str, str]]:
    """Turn one jsonschema error into (path, message) pairs a person can act on."""
    parts = list(error.absolute_path)
    path = _format_path(parts)
    v, vv, schema = error.validator, error.validator_value, error.schema
    if v == "required" and isinstance(error.instance, dict):
        missing = [p for p in vv if p not in error.instance and repr(p) in error.message]
        return [(_format_path([*parts, p]), "is required") for p in missing[:1]] or [(path, error.message)]
    if v == "additionalProperties" and isinstance(error.instance, dict) and vv is False:
        known = set(schema.get("properties", {}))
        extra = [k for k in error.instance if k not in known]
        return [(_format_path([*parts, k]), "is not an allowed property") for k in extra]
    if v == "type":
        return [(path, f"must be of type {_type_names(vv)}")]
    if v == "enum":
        return [(path, "must be one of: " + ", ".join(json.dumps(x) for x in vv))]
    if v == "minimum":
        return [(path, f"must be >= {vv}")]
    if v == "maximum":
        return [(path, f"must be <= {vv}")]
    if v == "exclusiveMinimum":
        return [(path, f"must be > {vv}")]
    if v == "minLength":
        return [(path, "must not be empty" if vv == 1 else f"must be at least {vv} characters")]
    if v == "maxLength":
        return [(path, f"must be at most {vv} characters")]
    if v == "minItems":
        return [(path, "must not be empty" if vv == 1 else f"must have at least {vv} items")]
    if v == "pattern":
        return [(path, schema.get("description") or f"must match {vv}")]
    if v in ("anyOf", "oneOf"):
        return [(path, schema.get("description") or "is not in an accepted form")]
    message = error.message
    return [(path, message if len(message) <= 200 else message[:197] + "...")]


def _coerce(value: Any, schema: Mapping) -> Any:
    """Undo stringification by the renderer for scalar args ("30" -> 30, "true" -> True)."""
    kind = schema.get("type")
    if isinstance(value, str):
        text = value.strip()
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind in ("integer", "number") and re.fullmatch(r"-?\d+", text):
            return int(text)
        if kind == "number":
            try:
                number = float(text)
            except ValueError:
                return value
            return number if math.isfinite(number) else value
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _accepts_null(schema: Mapping) -> bool:
    kind = schema.get("type")
    if kind is None:
        return "anyOf" not in schema and "oneOf" not in schema
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


# --- Module base and registry ---------------------------------------------------------


class Module:
    """Base class. Subclasses set the ClassVars and implement ``execute()``.

    ``run()`` is the entry point for the step runner: it validates the rendered args
    (filling schema defaults), then calls ``execute()`` with clean args.
    """

    app_id: ClassVar[str]
    summary: ClassVar[str]
    args_schema: ClassVar[dict]
    out_schema: ClassVar[dict]
    # Args the engine passes through unrendered because the module gives their {{ }} its
    # own meaning (the `template` text is rendered over `data` by the module itself).
    raw_args: ClassVar[frozenset[str]] = frozenset()
    # Modules that only read and write flowplay's own database (subflow, kv) run in the
    # runner's thread and connection, not in the step thread pool: they are quick, and
    # they see what the runner has written.
    inline: ClassVar[bool] = False

    def __init__(self) -> None:
        Draft202012Validator.check_schema(self.args_schema)
        Draft202012Validator.check_schema(self.out_schema)
        self._validator = Draft202012Validator(self.args_schema)

    # Subclasses add what a schema cannot say. Only called with a dict; must not raise.
    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        return ()

    def execute(self, args: dict, ctx: RunContext) -> Any:
        raise NotImplementedError

    def _problems(self, args: Any, lenient: bool) -> dict[str, list[str]]:
        problems: dict[str, list[str]] = {}
        if lenient and is_expression(args):
            return problems
        for error in self._validator.iter_errors(args):
            if lenient and _ignorable(error):
                continue
            for path, message in _describe(error):
                problems.setdefault(path, []).append(message)
        if isinstance(args, dict):
            for path, message in self.extra_checks(args, lenient):
                if message not in problems.get(path, []):
                    problems.setdefault(path, []).append(message)
        return problems

    def check(self, args: Any) -> dict[str, list[str]]:
        """Validate unrendered args: ``{path: [messages]}``, empty when fine. Never raises."""
        try:
            return self._problems(args, lenient=True)
        except Exception as exc:  # a bug here must not break saving a flow
            return {"": [f"could not validate args: {exc}"]}

    def clean(self, args: Any) -> dict:
        """Strictly validate rendered args and fill defaults; raise INVALID_INPUT."""
        if args is None:
            args = {}
        if isinstance(args, dict):
            properties = self.args_schema.get("properties", {})
            required = set(self.args_schema.get("required", []))
            args = dict(args)
            for name, schema in properties.items():
                if name in args and args[name] is None and name not in required and not _accepts_null(schema):
                    # An optional arg whose expression rendered to null was meant as "not set".
                    del args[name]
                if name in args:
                    args[name] = _coerce(args[name], schema)
                elif "default" in schema:
                    args[name] = json.loads(json.dumps(schema["default"]))
        problems = self._problems(args, lenient=False)
        if problems:
            detail = "; ".join(
                f"{path}: {message}" if path else message for path, messages in problems.items() for message in messages
            )
            raise StepError(f"Invalid args for {self.app_id}: {detail}", "INVALID_INPUT", retryable=False)
        return args

    def run(self, args: dict, ctx: RunContext) -> Any:
        return self.execute(self.clean(args), ctx)


REGISTRY: dict[str, Module] = {}


def register(cls: type[Module]) -> type[Module]:
    if cls.app_id in REGISTRY:
        raise ValueError(f"duplicate module appId {cls.app_id!r}")
    REGISTRY[cls.app_id] = cls()
    return cls


def get_module(app_id: str) -> Module | None:
    return REGISTRY.get(app_id)


def describe() -> list[dict]:
    # Copies, so a caller decorating the answer cannot change what check() validates.
    return [
        {
            "appId": m.app_id,
            "summary": m.summary,
            "args": copy.deepcopy(m.args_schema),
            "out": copy.deepcopy(m.out_schema),
        }
        for _, m in sorted(REGISTRY.items())
    ]


def _obj(properties: dict, required: Iterable[str] = (), **extra: Any) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
        **extra,
    }


_RESULT_STRING = _obj({"result": {"type": "string"}}, ["result"])


def _invalid(message: str) -> StepError:
    return StepError(message, "INVALID_INPUT", retryable=False)


# --- var, template --------------------------------------------------------------------


@register
class Var(Module):
    app_id = "var"
    summary = "Set values: out is the evaluated `values` object."
    args_schema = _obj({"values": {"type": "object"}}, ["values"])
    out_schema = {"type": "object"}

    def execute(self, args: dict, ctx: RunContext) -> Any:
        return args["values"]


@register
class Template(Module):
    app_id = "template"
    summary = "Render a text template with {{ name }} placeholders over `data`."
    args_schema = _obj(
        {
            "template": {"type": "string"},
            "data": {"type": "object", "default": {}},
        },
        ["template"],
    )
    out_schema = _RESULT_STRING
    raw_args = frozenset({"template"})

    def execute(self, args: dict, ctx: RunContext) -> Any:
        # Imported here so this module (and save-time checks) work without the
        # template engine loaded.
        from flows.expr import ExpressionError, render_template

        try:
            return {"result": render_template(args["template"], args["data"])}
        except ExpressionError as exc:
            raise StepError(str(exc), getattr(exc, "code", "EXPRESSION_ERROR"), retryable=False) from exc


# --- curl -----------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SCALAR = ["string", "number", "boolean", "null"]


def _flowplay_settings() -> Mapping[str, Any]:
    # Read on every call, not at import: this module must import without Django
    # configured, and tests override settings.
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return {}
    try:
        return getattr(settings, "FLOWPLAY", None) or {}
    except ImproperlyConfigured:
        return {}


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class OutboundPolicy:
    deny: tuple[IPNetwork, ...]
    allow_networks: tuple[IPNetwork, ...]
    allow_hosts: frozenset[str]

    @classmethod
    def from_settings(cls) -> OutboundPolicy:
        conf = _flowplay_settings()
        deny_conf = conf.get("CURL_DENY")
        deny_conf = DEFAULT_CURL_DENY if deny_conf is None else deny_conf
        deny = []
        for entry in deny_conf:
            try:
                deny.append(ipaddress.ip_network(str(entry).strip(), strict=False))
            except ValueError as exc:
                # Fail closed: a typo in the deny list must not open it.
                raise StepError(f"FLOWPLAY CURL_DENY entry {entry!r} is not a network", "CONFIG_ERROR") from exc
        allow_networks, allow_hosts = [], set()
        for entry in conf.get("CURL_ALLOW") or []:
            text = str(entry).strip()
            try:
                allow_networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                allow_hosts.add(text.lower().rstrip("."))
        return cls(tuple(deny), tuple(allow_networks), frozenset(allow_hosts))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow_hosts

    def address_denied(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        # ::ffff:169.254.169.254 reaches the same host as 169.254.169.254.
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        for candidate in candidates:
            if any(candidate in net for net in self.allow_networks if net.version == candidate.version):
                return False
        return any(c in net for c in candidates for net in self.deny if net.version == c.version)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves the host itself and connects to a checked address.

    Checking at connect time (rather than once per URL) covers every redirect hop and
    leaves no window for DNS to answer differently between the check and the connect.
    """

    def __init__(self, policy: OutboundPolicy):
        self.policy = policy
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not self.policy.host_allowed(host):
            denied = [a for a in addresses if self.policy.address_denied(a)]
            if denied:
                raise StepError(
                    f"Outbound connections to {host} ({denied[0]}) are not allowed",
                    "HOST_DENIED",
                    retryable=False,
                )
        last_error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last_error = exc
        raise last_error

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("unix sockets are not allowed")


class _CoreStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]):
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


class _GuardedTransport(httpx.BaseTransport):
    """httpx transport on an httpcore pool with our network backend.

    Built from public httpcore API rather than patching HTTPTransport's private pool, so
    an httpx upgrade cannot silently drop the outbound check.
    """

    def __init__(self, policy: OutboundPolicy):
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=4,
            network_backend=_GuardedBackend(policy),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_CoreStream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


@functools.lru_cache(maxsize=1)
def _ssl_context() -> Any:
    # Loading the CA bundle costs milliseconds; contexts are safe to share.
    return httpx.create_ssl_context()


def _is_json_type(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime in ("application/json", "text/json") or mime.endswith("+json")


@register
class Curl(Module):
    app_id = "curl"
    summary = "Make an HTTP request; a non-2xx status is an ordinary result, not a failure."
    args_schema = _obj(
        {
            "method": {
                "type": "string",
                "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                "default": "GET",
            },
            "url": {"type": "string", "minLength": 1},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "query": {
                "type": "object",
                "additionalProperties": {"type": [*_SCALAR, "array"], "items": {"type": _SCALAR}},
            },
            "body": {
                "type": ["object", "array", "string"],
                "description": "an object or array is sent as JSON, a string as is",
            },
            "bodyForm": {
                "type": "object",
                "additionalProperties": {"type": [*_SCALAR, "array"], "items": {"type": _SCALAR}},
            },
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 30},
            "followRedirects": {"type": "boolean", "default": True},
            "responseType": {
                "type": "string",
                "enum": ["json", "text", "binary"],
                "description": "binary = base64 body; default: json for a JSON content type that parses, else text",
            },
            "basicAuth": _obj(
                {"username": {"type": "string"}, "password": {"type": "string"}}, ["username", "password"]
            ),
            "bearerToken": {"type": "string", "minLength": 1},
        },
        ["url"],
    )
    out_schema = _obj(
        {
            "statusCode": {"type": "integer"},
            "body": {},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "duration": {"type": "integer", "description": "milliseconds"},
        },
        ["statusCode", "body", "headers", "duration"],
    )

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        url = args.get("url")
        if isinstance(url, str) and url and not _deferred(url, lenient):
            try:
                parts = urlsplit(url)
                ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
            except ValueError:
                ok = False
            if not ok:
                yield "url", "must be an http:// or https:// URL with a host"
        headers = args.get("headers")
        if isinstance(headers, dict):
            for name, value in headers.items():
                path = _format_path(["headers", name])
                if not _HEADER_NAME.match(name):
                    yield path, "is not a valid header name"
                elif isinstance(value, str) and not _deferred(value, lenient) and ("\r" in value or "\n" in value):
                    yield path, "must not contain line breaks"
        if args.get("body") is not None and args.get("bodyForm") is not None:
            yield "bodyForm", "cannot be combined with body"
        if args.get("basicAuth") is not None and args.get("bearerToken") is not None:
            yield "bearerToken", "cannot be combined with basicAuth"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        budget = min(float(args["timeout"]), ctx.timeout)
        if budget <= 0:
            raise StepError("No time left for the request", "TIMEOUT")
        headers = dict(args.get("headers", {}))
        if not any(name.lower() == "user-agent" for name in headers):
            headers["User-Agent"] = "flowplay"
        if "bearerToken" in args:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = f"Bearer {args['bearerToken']}"
        auth = None
        if "basicAuth" in args:
            auth = (args["basicAuth"]["username"], args["basicAuth"]["password"])
        body, form = args.get("body"), args.get("bodyForm")

        started = time.monotonic()
        deadline = started + budget
        transport = _GuardedTransport(OutboundPolicy.from_settings())
        # trust_env=False: an environment proxy would make us connect to the proxy and
        # check its address instead of the target's.
        with httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(budget),
            follow_redirects=args["followRedirects"],
            max_redirects=MAX_REDIRECTS,
            trust_env=False,
        ) as client:
            try:
                url = httpx.URL(args["url"])
                if args.get("query"):
                    # httpx's params= would replace a query already in the URL.
                    url = url.copy_merge_params(args["query"])
                request = client.build_request(
                    args["method"],
                    url,
                    headers=headers,
                    json=body if isinstance(body, (dict, list)) else None,
                    content=body.encode() if isinstance(body, str) else None,
                    data=form,
                )
            except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError, ValueError, TypeError) as exc:
                raise _invalid(f"Cannot build the request: {exc}") from exc
            try:
                response = client.send(request, stream=True, auth=auth)
                try:
                    content = self._read(response, deadline)
                finally:
                    response.close()
            except StepError:
                raise
            except (httpx.TimeoutException, httpcore.TimeoutException) as exc:
                raise StepError(f"Request timed out after {budget:g}s", "TIMEOUT") from exc
            except httpx.TooManyRedirects as exc:
                raise StepError(f"More than {MAX_REDIRECTS} redirects", "HTTP_ERROR") from exc
            except (httpx.UnsupportedProtocol, httpcore.UnsupportedProtocol) as exc:
                raise _invalid(f"Unsupported URL: {exc}") from exc
            except (httpx.HTTPError, httpcore.NetworkError, httpcore.ProtocolError) as exc:
                raise StepError(f"HTTP request failed: {exc or type(exc).__name__}", "HTTP_ERROR") from exc

        return {
            "statusCode": response.status_code,
            "body": self._decode(response, content, args.get("responseType")),
            "headers": {k.lower(): v for k, v in response.headers.items()},
            "duration": int((time.monotonic() - started) * 1000),
        }

    @staticmethod
    def _read(response: httpx.Response, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        # A HEAD answer declares the size of a body it does not send.
        if response.request.method != "HEAD" and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise StepError(
                f"Response body is {declared} bytes, more than {MAX_RESPONSE_BYTES}", "RESPONSE_TOO_LARGE", False
            )
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise StepError(f"Response body is larger than {MAX_RESPONSE_BYTES} bytes", "RESPONSE_TOO_LARGE", False)
            chunks.append(chunk)
            # httpx's timeout is per read; a server trickling bytes must still not
            # outlast the step's budget.
            if time.monotonic() > deadline:
                raise StepError("Request timed out while reading the response", "TIMEOUT")
        return b"".join(chunks)

    @staticmethod
    def _decode(response: httpx.Response, content: bytes, response_type: str | None) -> Any:
        if response_type == "binary":
            return base64.b64encode(content).decode("ascii")
        if response_type == "json" or (
            response_type is None and _is_json_type(response.headers.get("content-type", ""))
        ):
            if response_type == "json" and not content.strip():
                return None
            try:
                # NaN/Infinity would make an out the engine cannot store as JSON.
                return json.loads(content, parse_constant=_reject_constant)
            except (ValueError, RecursionError) as exc:
                if response_type == "json":
                    raise StepError(f"Response body is not JSON: {exc}", "INVALID_RESPONSE") from exc
        encoding = response.charset_encoding or "utf-8"
        try:
            return content.decode(encoding, errors="replace")
        except LookupError:
            return content.decode("utf-8", errors="replace")


# --- pdf-extract ----------------------------------------------------------------------


def _b64decode(text: str) -> bytes:
    """Standard or urlsafe base64, with or without padding and line breaks."""
    compact = re.sub(r"\s+", "", text).replace("-", "+").replace("_", "/")
    compact = compact.rstrip("=")
    if len(compact) % 4 == 1:
        raise ValueError("truncated base64 input")
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def _pdf_bytes(content: Any) -> bytes:
    if isinstance(content, dict):
        content = content.get("body")
        if not isinstance(content, str):
            raise StepError("content.body must be a base64 string", "PDF_ERROR", False)
    if content.startswith("data:"):
        header, sep, payload = content.partition(",")
        if not sep:
            raise StepError("Malformed data: URL", "PDF_ERROR", False)
        if header.lower().endswith(";base64"):
            return _b64decode(payload)
        return unquote_to_bytes(payload)
    return _b64decode(content)


@register
class PdfExtract(Module):
    app_id = "pdf-extract"
    summary = "Extract the text of a PDF given as base64, a data: URL or a curl binary download."
    args_schema = _obj(
        {
            "content": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "object", "properties": {"body": {"type": "string"}}, "required": ["body"]},
                ],
                "description": "must be base64 PDF text, a data: URL, or a curl out with a base64 body",
            }
        },
        ["content"],
    )
    out_schema = _obj({"text": {"type": "string"}, "pages": {"type": "integer", "minimum": 0}}, ["text", "pages"])

    def execute(self, args: dict, ctx: RunContext) -> Any:
        from pypdf import PdfReader

        try:
            data = _pdf_bytes(args["content"])
        except (ValueError, binascii.Error) as exc:
            raise StepError(f"content is not valid base64: {exc}", "PDF_ERROR", False) from exc
        if len(data) > MAX_PDF_BYTES:
            raise StepError(f"PDF is larger than {MAX_PDF_BYTES} bytes", "PDF_ERROR", False)
        # The spec lets the header sit anywhere in the first 1024 bytes.
        if b"%PDF-" not in data[:1024]:
            hint = " (for a curl download, set responseType to binary)" if isinstance(args["content"], dict) else ""
            raise StepError(f"content is not a PDF{hint}", "PDF_ERROR", False)
        try:
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise StepError("PDF is password-protected", "PDF_ERROR", False)
            pages = reader.pages
            if len(pages) > MAX_PDF_PAGES:
                raise StepError(f"PDF has more than {MAX_PDF_PAGES} pages", "PDF_ERROR", False)
            texts = [page.extract_text() or "" for page in pages]
        except StepError:
            raise
        except Exception as exc:  # pypdf raises many types on malformed files
            raise StepError(f"Cannot read PDF: {exc}", "PDF_ERROR", False) from exc
        return {"text": "\n".join(texts), "pages": len(texts)}


# --- regex ----------------------------------------------------------------------------

_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def _match_out(m: re.Match[str]) -> dict:
    return {"match": m.group(0), "index": m.start(), "groups": list(m.groups()), "named": m.groupdict()}


@register
class Regex(Module):
    app_id = "regex"
    summary = "Regular expressions (Python syntax): match, find, findAll, replace, split."
    args_schema = _obj(
        {
            "input": {"type": "string", "maxLength": MAX_REGEX_INPUT},
            "pattern": {"type": "string", "minLength": 1, "maxLength": MAX_REGEX_PATTERN},
            "flags": {"type": "string", "pattern": "^[imsx]*$", "description": "must be letters from i, m, s, x"},
            "operation": {
                "type": "string",
                "enum": ["match", "find", "findAll", "replace", "split"],
                "default": "match",
            },
            "replacement": {"type": "string", "default": "", "description": r"\1 or \g<name> refer to groups"},
        },
        ["input", "pattern"],
    )
    out_schema = {
        "oneOf": [
            _obj(
                {"matched": {"type": "boolean"}, "groups": {"type": "array"}, "named": {"type": "object"}},
                ["matched", "groups", "named"],
            ),
            _obj(
                {
                    "found": {"type": "boolean"},
                    "match": {"type": ["string", "null"]},
                    "index": {"type": ["integer", "null"]},
                    "groups": {"type": "array"},
                    "named": {"type": "object"},
                },
                ["found", "match", "index", "groups", "named"],
            ),
            _obj({"matches": {"type": "array"}, "count": {"type": "integer"}}, ["matches", "count"]),
            _obj({"result": {"type": "string"}, "count": {"type": "integer"}}, ["result", "count"]),
            _obj({"parts": {"type": "array", "items": {"type": ["string", "null"]}}}, ["parts"]),
        ]
    }

    @staticmethod
    def _flags(text: str) -> int:
        value = 0
        for letter in text:
            value |= _REGEX_FLAGS[letter]
        return value

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        pattern, flags = args.get("pattern"), args.get("flags", "")
        if not isinstance(pattern, str) or _deferred(pattern, lenient) or len(pattern) > MAX_REGEX_PATTERN:
            return
        if _deferred(flags, lenient):
            return  # "x" changes what is valid syntax, so wait for the real flags
        if not isinstance(flags, str) or not re.fullmatch("[imsx]*", flags):
            flags = ""
        try:
            compiled = re.compile(pattern, self._flags(flags))
        except re.error as exc:
            yield "pattern", f"is not a valid regular expression: {exc}"
            return
        replacement = args.get("replacement")
        if isinstance(replacement, str) and not _deferred(replacement, lenient):
            try:
                # The template is parsed before any matching, so "" is enough to vet it.
                compiled.sub(replacement, "")
            except (re.error, IndexError) as exc:
                yield "replacement", f"is not a valid replacement: {exc}"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        compiled = re.compile(args["pattern"], self._flags(args.get("flags", "")))
        text, operation = args["input"], args["operation"]
        if operation == "match":
            m = compiled.search(text)
            if not m:
                return {"matched": False, "groups": [], "named": {}}
            return {"matched": True, "groups": list(m.groups()), "named": m.groupdict()}
        if operation == "find":
            m = compiled.search(text)
            if not m:
                return {"found": False, "match": None, "index": None, "groups": [], "named": {}}
            return {"found": True, **_match_out(m)}
        if operation == "findAll":
            matches = []
            for m in compiled.finditer(text):
                if len(matches) >= MAX_REGEX_MATCHES:
                    raise _invalid(f"More than {MAX_REGEX_MATCHES} matches")
                matches.append(_match_out(m))
            return {"matches": matches, "count": len(matches)}
        if operation == "replace":
            result, count = compiled.subn(args["replacement"], text)
            return {"result": result, "count": count}
        return {"parts": compiled.split(text)}


# --- encoders -------------------------------------------------------------------------


@register
class Base64Encode(Module):
    app_id = "base64-encode"
    summary = "Base64-encode UTF-8 text."
    args_schema = _obj({"input": {"type": "string"}, "urlSafe": {"type": "boolean", "default": False}}, ["input"])
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        raw = args["input"].encode("utf-8")
        encoded = base64.urlsafe_b64encode(raw) if args["urlSafe"] else base64.b64encode(raw)
        return {"result": encoded.decode("ascii")}


@register
class Base64Decode(Module):
    app_id = "base64-decode"
    summary = "Decode base64 (standard or urlsafe, padding optional) to UTF-8 text."
    args_schema = _obj({"input": {"type": "string"}}, ["input"])
    out_schema = _RESULT_STRING

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        value = args.get("input")
        if lenient and isinstance(value, str) and not is_expression(value):
            try:
                _b64decode(value)
            except (ValueError, binascii.Error):
                yield "input", "is not valid base64"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        try:
            raw = _b64decode(args["input"])
        except (ValueError, binascii.Error) as exc:
            raise _invalid(f"input is not valid base64: {exc}") from exc
        try:
            return {"result": raw.decode("utf-8")}
        except UnicodeDecodeError as exc:
            raise _invalid("Decoded bytes are not UTF-8 text") from exc


def _query_value(value: Any) -> str:
    # JSON spellings, not Python's ("true", not "True").
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@register
class UrlEncode(Module):
    app_id = "url-encode"
    summary = "Percent-encode a string, or turn an object into a query string."
    args_schema = _obj(
        {
            "input": {
                "type": ["string", "object"],
                "additionalProperties": {"type": [*_SCALAR, "array"], "items": {"type": _SCALAR}},
            }
        },
        ["input"],
    )
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        value = args["input"]
        if isinstance(value, str):
            return {"result": quote(value, safe="")}
        pairs = []
        for key, item in value.items():
            for one in item if isinstance(item, list) else [item]:
                pairs.append((key, _query_value(one)))
        return {"result": urlencode(pairs, quote_via=quote)}


@register
class UrlDecode(Module):
    app_id = "url-decode"
    summary = "Decode percent-encoding (and + as space)."
    args_schema = _obj({"input": {"type": "string"}}, ["input"])
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        return {"result": unquote_plus(args["input"])}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@register
class JsonParse(Module):
    app_id = "json-parse"
    summary = "Parse JSON text."
    args_schema = _obj({"input": {"type": "string"}}, ["input"])
    out_schema = _obj({"result": {}}, ["result"])

    @staticmethod
    def _parse(text: str) -> Any:
        return json.loads(text, parse_constant=_reject_constant)

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        # Only literals at save time: at run time execute() parses once and reports.
        value = args.get("input")
        if lenient and isinstance(value, str) and not is_expression(value):
            try:
                self._parse(value)
            except (ValueError, RecursionError) as exc:
                yield "input", f"is not valid JSON: {exc}"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        try:
            return {"result": self._parse(args["input"])}
        except ValueError as exc:
            raise _invalid(f"input is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise _invalid("input is nested too deeply") from exc


@register
class JsonStringify(Module):
    app_id = "json-stringify"
    summary = "Serialize a value as JSON text."
    args_schema = _obj({"input": {}, "pretty": {"type": "boolean", "default": False}}, ["input"])
    out_schema = _RESULT_STRING

    def execute(self, args: dict, ctx: RunContext) -> Any:
        try:
            if args["pretty"]:
                text = json.dumps(args["input"], indent=2, ensure_ascii=False, allow_nan=False)
            else:
                text = json.dumps(args["input"], separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _invalid(f"input cannot be serialized: {exc}") from exc
        return {"result": text}


# --- control: router, sleep, enumeration ----------------------------------------------

_FALSE_STRINGS = frozenset({"", "false", "0", "null", "none", "undefined"})


def _truthy(value: Any) -> bool:
    # Conditions are usually rendered to text, where "False" / "None" are how a Python
    # renderer spells false and null.
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _FALSE_STRINGS:
            return False
        try:
            return float(text) != 0
        except ValueError:
            return True
    return bool(value)


@register
class Router(Module):
    app_id = "router"
    summary = 'Pick the label of the first route whose condition is truthy ("true" is a catch-all).'
    args_schema = _obj(
        {
            "routes": {
                "type": "array",
                "minItems": 1,
                "items": _obj({"condition": {}, "label": {"type": "string", "minLength": 1}}, ["condition", "label"]),
            }
        },
        ["routes"],
    )
    out_schema = _obj({"route": {"type": ["string", "null"]}}, ["route"])

    def execute(self, args: dict, ctx: RunContext) -> Any:
        for route in args["routes"]:
            if _truthy(route["condition"]):
                return {"route": route["label"]}
        return {"route": None}


@register
class Sleep(Module):
    app_id = "sleep"
    summary = "Wait `ms` milliseconds (up to 31 days) without holding a worker."
    args_schema = _obj({"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS}}, ["ms"])
    out_schema = _obj({"sleptMs": {"type": "integer"}}, ["sleptMs"])

    def clean(self, args: Any) -> dict:
        if isinstance(args, dict):
            ms = _coerce(args.get("ms"), {"type": "integer"})
            if isinstance(ms, int) and not isinstance(ms, bool) and ms < 0:
                # A computed "time until X" that has passed means: do not wait.
                args = {**args, "ms": 0}
        return super().clean(args)

    def execute(self, args: dict, ctx: RunContext) -> Any:
        ms = args["ms"]
        out = {"sleptMs": ms}
        if ms <= 0:
            return out
        raise Park(until=datetime.now(UTC) + timedelta(milliseconds=ms), out=out)


def _enumeration_size(start: float, stop: float, step: float) -> int:
    if step == 0 or (step > 0 and stop < start) or (step < 0 and stop > start):
        return 0
    if all(isinstance(x, int) for x in (start, stop, step)):
        return (stop - start) // step + 1
    steps = (stop - start) / step
    if not math.isfinite(steps) or steps > MAX_ENUM_ITEMS:
        return MAX_ENUM_ITEMS + 1
    # The epsilon keeps 0..1 step 0.1 from losing its last item to float error.
    return math.floor(steps + 1e-9) + 1


@register
class Enumeration(Module):
    app_id = "enumeration"
    summary = "List the numbers from `from` to `to` inclusive."
    args_schema = _obj(
        {
            "from": {"type": "number"},
            "to": {"type": "number"},
            "step": {"type": "number", "description": "non-zero; default 1, or -1 when from > to"},
        },
        ["from", "to"],
    )
    out_schema = _obj({"items": {"type": "array", "items": {"type": "number"}}}, ["items"])

    @staticmethod
    def _step(args: dict) -> Any:
        if "step" in args:
            return args["step"]
        start, stop = args.get("from"), args.get("to")
        if isinstance(start, (int, float)) and isinstance(stop, (int, float)) and start > stop:
            return -1
        return 1

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        values = [args.get("from"), args.get("to"), self._step(args)]
        for name, value in zip(("from", "to", "step"), values, strict=True):
            if isinstance(value, float) and not math.isfinite(value):
                yield name, "must be a finite number"
                return
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return
        if values[2] == 0:
            yield "step", "must not be 0"
        elif _enumeration_size(*values) > MAX_ENUM_ITEMS:
            yield "", f"would produce more than {MAX_ENUM_ITEMS} items"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        start, stop, step = args["from"], args["to"], self._step(args)
        count = _enumeration_size(start, stop, step)
        if all(isinstance(x, int) for x in (start, stop, step)):
            return {"items": list(range(start, start + count * step, step))}
        return {"items": [round(start + i * step, 12) for i in range(count)]}


# --- csv-parse ------------------------------------------------------------------------


@register
class CsvParse(Module):
    app_id = "csv-parse"
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
