"""`curl`: an HTTP request, through a transport that refuses denied addresses (``flows.egress``)."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from opentelemetry import propagate

from ..egress import GuardedTransport, OutboundPolicy
from .base import (
    _SCALAR,
    Module,
    RunContext,
    StepError,
    _deferred,
    _format_path,
    _invalid,
    _obj,
    _reject_constant,
    register,
)

MAX_RESPONSE_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 10

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _apply_credential(name: str, material: dict | None, headers: dict[str, str]) -> tuple[dict[str, str], Any]:
    """Headers and basic auth for the credential the runner resolved (flows.credentials)."""
    if not material or material.get("credential") != name:
        raise StepError(f"Credential {name!r} was not resolved for this step", "CREDENTIAL_ERROR", retryable=False)
    if material["scheme"] == "basic":
        return headers, (material["username"], material["password"])
    header, value = ("Authorization", f"Bearer {material['token']}") if material["scheme"] == "bearer" else (
        material["header"], material["value"])
    headers = {k: v for k, v in headers.items() if k.lower() != header.lower()}
    headers[header] = value
    return headers, None


def _same_origin_only(url: str, header: str) -> Any:
    """A request hook that sends a credential's header to the step's own origin only."""
    try:
        first = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        first = None

    def hook(request: httpx.Request) -> None:
        if first is None or (request.url.scheme, request.url.host, request.url.port) != (
            first.scheme, first.host, first.port
        ):
            request.headers.pop(header, None)

    return hook


def _is_json_type(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime in ("application/json", "text/json") or mime.endswith("+json")


@register
class Curl(Module):
    app_id = "curl"
    name = "HTTP request (curl)"
    summary = "Make an HTTP request; a non-2xx status is an ordinary result, not a failure."
    uses_credentials = True
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
            "auth": {
                "type": "string",
                "minLength": 1,
                "description": "the name of a credential: a bearer token, basic, a header or an OAuth2 client",
            },
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
        if args.get("auth") is not None and (args.get("basicAuth") is not None or args.get("bearerToken") is not None):
            yield "auth", "cannot be combined with basicAuth or bearerToken"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        budget = min(float(args["timeout"]), ctx.timeout)
        if budget <= 0:
            raise StepError("No time left for the request", "TIMEOUT")
        headers = dict(args.get("headers", {}))
        if not any(name.lower() == "user-agent" for name in headers):
            headers["User-Agent"] = "flowplay"
        if not any(name.lower() == "traceparent" for name in headers):
            propagate.inject(headers)  # W3C traceparent of the step's span, when tracing is on
        if "bearerToken" in args:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["Authorization"] = f"Bearer {args['bearerToken']}"
        auth = None
        if "basicAuth" in args:
            auth = (args["basicAuth"]["username"], args["basicAuth"]["password"])
        hooks = None
        if "auth" in args:
            headers, auth = _apply_credential(args["auth"], ctx.auth, headers)
            if ctx.auth and ctx.auth.get("scheme") == "header":
                # httpx drops Authorization on a redirect to another origin, not other headers.
                hooks = {"request": [_same_origin_only(args["url"], ctx.auth["header"])]}
        body, form = args.get("body"), args.get("bodyForm")

        started = time.monotonic()
        deadline = started + budget
        transport = GuardedTransport(OutboundPolicy.from_settings())
        # trust_env=False: an environment proxy would make us connect to the proxy and
        # check its address instead of the target's.
        with httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(budget),
            follow_redirects=args["followRedirects"],
            max_redirects=MAX_REDIRECTS,
            trust_env=False,
            event_hooks=hooks,
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
