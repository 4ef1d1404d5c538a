"""API plumbing shared by both apps: the error body, domain exceptions, pagination."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, JsonResponse
from rest_framework import exceptions, serializers, status
from rest_framework.pagination import BasePagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .strict import NO_NUL, NOT_BLANK

log = logging.getLogger(__name__)



class ApiError(exceptions.APIException):
    """A domain error with the spec's code, e.g. ``FLOW_NOT_FOUND``."""

    def __init__(self, code: str, message: str, status_code: int, details: dict[str, Any] | None = None):
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_code = code
        self.message = message
        self.details = details


def not_found(entity: str, key: str) -> ApiError:
    return ApiError(f"{entity.upper()}_NOT_FOUND", f"{entity.capitalize()} with ID {key} not found", 404)


def invalid_state(message: str) -> ApiError:
    return ApiError("INVALID_STATE", message, 409)


def validation_error(details: dict[str, list[str]], message: str = "The request is not valid") -> ApiError:
    return ApiError("VALIDATION_ERROR", message, 400, details)


_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_ERROR",
}


def body(code: str, message: str, status_code: int, details: Any = None) -> dict[str, Any]:
    data: dict[str, Any] = {"error": code, "message": message, "statusCode": status_code}
    if details:
        data["details"] = details
    return data


def flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """Turn DRF's nested error detail into ``{"layers[1].args.url": ["…"]}``."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                path = prefix
            elif isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
                path = f"{prefix}[{key}]"
            else:
                path = f"{prefix}.{key}" if prefix else str(key)
            for k, v in flatten(value, path).items():
                out.setdefault(k, []).extend(v)
    elif isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            out.setdefault(prefix or "body", []).extend(str(item) for item in detail)
        else:
            for i, item in enumerate(detail):
                if item:
                    for k, v in flatten(item, f"{prefix}[{i}]").items():
                        out.setdefault(k, []).extend(v)
    else:
        out.setdefault(prefix or "body", []).append(str(detail))
    return out


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Shape every API error as ``{error, message, statusCode, details?}``."""
    if isinstance(exc, ApiError):
        return Response(body(exc.error_code, exc.message, exc.status_code, exc.details), status=exc.status_code)
    if isinstance(exc, RequestDataTooBig):
        return Response(body("PAYLOAD_TOO_LARGE", "The request body is too large", 413), status=413)
    if isinstance(exc, exceptions.UnsupportedMediaType):
        # The API speaks JSON only; anything else is a bad request like malformed JSON.
        return Response(body("VALIDATION_ERROR", f"{exc.detail} Send JSON with Content-Type: application/json.", 400,
                             {"Content-Type": ["must be application/json"]}), status=400)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        log.exception("unhandled API error", exc_info=exc)
        return Response(body("INTERNAL_ERROR", "Internal server error", 500), status=500)
    code = _CODES.get(response.status_code, "ERROR")
    if isinstance(exc, exceptions.ValidationError):
        details = flatten(exc.detail)
        message = "The request is not valid"
        if list(details) == ["body"]:
            message = details["body"][0]
        response.data = body(code, message, response.status_code, details)
    elif isinstance(exc, exceptions.ParseError):
        response.data = body("VALIDATION_ERROR", f"Malformed request body: {exc.detail}", 400)
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        response.data = body(code, str(detail), response.status_code)
    return response


class ErrorSerializer(serializers.Serializer):
    """The one error body of every API error (described by ERROR_SCHEMA in the document)."""

    error = serializers.CharField()
    message = serializers.CharField()
    statusCode = serializers.IntegerField()
    details = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message", "statusCode"],
    "properties": {
        "error": {"type": "string", "example": "FLOW_NOT_FOUND"},
        "message": {"type": "string"},
        "statusCode": {"type": "integer"},
        "details": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
    },
}
_ERROR_STATUSES = {
    "400": "Malformed JSON, wrong types, invalid values (VALIDATION_ERROR, with details per field)",
    "401": "Not logged in, or an unknown or revoked API key (UNAUTHORIZED)",
    "403": "Refused, e.g. a cookie request without its CSRF token (FORBIDDEN)",
    "404": "No such object in the caller's company (<ENTITY>_NOT_FOUND)",
    "405": "Method not allowed on this path (METHOD_NOT_ALLOWED)",
    "409": "INVALID_STATE, FLOW_DISABLED or IDEMPOTENCY_KEY_REUSED",
    "413": "The body or the args are larger than the limit (PAYLOAD_TOO_LARGE)",
    "429": "Too many requests, e.g. login attempts (TOO_MANY_REQUESTS)",
}


def add_error_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: what the serializers cannot say by themselves.

    - every operation documents the error body for the error statuses (an error response
      declared without a body, e.g. login's 401, gets it too);
    - a run takes runAt or delayMs, not both;
    - ``Patched…`` bodies carry no defaults;
    - strings in request bodies refuse NUL, and trimmed non-blank ones need a non-space
      character (a name of spaces is a 400), as patterns a client or a fuzzer can see.
    """
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    for methods in result.get("paths", {}).values():
        for operation in methods.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for code, description in _ERROR_STATUSES.items():
                operation["responses"].setdefault(code, {"description": description})
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")) and not response.get("content"):
                    response["content"] = {"application/json": {"schema": ref}}
    if "RunRequest" in schemas:
        schemas["RunRequest"]["not"] = {"required": ["runAt", "delayMs"]}  # one or the other
    for name, component in schemas.items():
        if name.endswith("Request"):
            for prop in component.get("properties", {}).values():
                _no_nul(prop)
        if name.startswith("Patched"):
            # A PATCH changes what it names; DRF applies no default to a partial update, and
            # a generated client must not send one (it would reset the field).
            for prop in component.get("properties", {}).values():
                prop.pop("default", None)
    return result


def _no_nul(prop: dict[str, Any]) -> None:
    if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
        _no_nul(prop["items"])
    if prop.get("type") != "string" or {"enum", "pattern", "format"} & set(prop):
        return
    prop["pattern"] = NOT_BLANK if prop.get("minLength") else NO_NUL


class PagePagination(BasePagination):
    """Zero-based ``page`` and ``size`` (default 25, at most 100) with the spec's envelope."""

    default_size = 25
    max_size = 100
    # Deeper pages are refused (400) instead of overflowing the database's OFFSET.
    max_page = 10_000_000

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> list[Any]:
        self.page, self.size = self.parse(request)
        # On millions of rows an exact COUNT(*) with filters is the slow part; the views
        # keep it on an index (see PlayFilter) and cap what a deep page may read.
        self.total = queryset.count()
        start = self.page * self.size
        return list(queryset[start : start + self.size])

    @classmethod
    def parse(cls, request: Any) -> tuple[int, int]:
        errors: dict[str, list[str]] = {}
        page = cls._int(request.query_params.get("page"), 0, "page", errors)
        size = cls._int(request.query_params.get("size"), cls.default_size, "size", errors)
        if "page" not in errors and page < 0:
            errors["page"] = ["page must be 0 or more"]
        elif "page" not in errors and page > cls.max_page:
            errors["page"] = [f"page must be at most {cls.max_page}"]
        if "size" not in errors and not 1 <= size <= cls.max_size:
            errors["size"] = [f"size must be between 1 and {cls.max_size}"]
        if errors:
            raise validation_error(errors, "Invalid pagination parameters")
        return page, size

    @staticmethod
    def _int(raw: str | None, default: int, name: str, errors: dict[str, list[str]]) -> int:
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            errors[name] = [f"{name} must be an integer"]
            return default

    def get_paginated_response(self, data: list[Any]) -> Response:
        pages = (self.total + self.size - 1) // self.size
        return Response({"data": data, "total": self.total, "page": self.page, "size": self.size, "pages": pages})

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["data", "total", "page", "size", "pages"],
            "properties": {
                "data": schema,
                "total": {"type": "integer"},
                "page": {"type": "integer"},
                "size": {"type": "integer"},
                "pages": {"type": "integer"},
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {"name": "page", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": self.max_page}},
            {"name": "size", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        ]


def json_error_view(code: str, message: str, status_code: int):  # noqa: ANN201
    def view(request: Any, exception: Any = None) -> JsonResponse:
        return JsonResponse(body(code, message, status_code), status=status_code)

    return view


def handler404(request: Any, exception: Any = None) -> Any:
    if request.path.startswith("/api/"):
        return JsonResponse(body("NOT_FOUND", f"No endpoint at {request.path}", 404), status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request: Any) -> Any:
    if request.path.startswith("/api/"):
        return JsonResponse(body("INTERNAL_ERROR", "Internal server error", 500), status=500)
    from django.views.defaults import server_error

    return server_error(request)


def handler400(request: Any, exception: Any = None) -> Any:
    if request.path.startswith("/api/"):
        return JsonResponse(body("VALIDATION_ERROR", "Bad request", 400), status=400)
    from django.views.defaults import bad_request

    return bad_request(request, exception)


__all__ = ["ApiError", "PagePagination", "exception_handler", "status"]
