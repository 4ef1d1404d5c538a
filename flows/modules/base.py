"""The module base class, the registry and the helpers every module shares.

One class per module, registered in ``REGISTRY`` by its ``app_id`` (the same shape as
healthchecks' transports); the modules themselves are the other files of this package.
A module declares JSON Schemas for its args and its out, may add checks a schema cannot
express, and implements ``execute()``.

Two validation passes use the same schema:

* ``check()`` runs at save time on *unrendered* args, where any string containing
  ``{{`` is an expression that will produce the real value at run time, so it is
  accepted wherever any type is expected.
* ``run()`` runs on *rendered* args and is strict: a bad value there is a bad input
  that no retry can fix (``StepError`` code ``INVALID_INPUT``, ``retryable=False``).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError


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


def max_output_bytes() -> int:
    """FLOWPLAY_MAX_OUTPUT_BYTES: the largest out (as JSON) a step may produce."""
    from django.conf import settings

    return int(settings.FLOWPLAY.get("MAX_OUTPUT_BYTES", DEFAULT_MAX_OUTPUT_BYTES))


DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024


def output_too_large(size: int | None = None) -> StepError:
    limit = max_output_bytes()
    what = f"about {size:,} bytes" if size is not None else "too large"
    return StepError(
        f"The step's output would be {what}, more than FLOWPLAY_MAX_OUTPUT_BYTES ({limit:,} bytes)",
        "OUTPUT_TOO_LARGE",
        retryable=False,
    )


def check_output_size(size: int) -> None:
    """Raise OUTPUT_TOO_LARGE if an output of ``size`` bytes (estimated before building it)
    would exceed the limit."""
    if size > max_output_bytes():
        raise output_too_large(size)


def json_size(value: Any) -> int:
    """Bytes of ``value`` as stored (compact JSON, UTF-8)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode("utf-8", "surrogatepass"))


class Park(Exception):
    """Raised by a module that wants the play to wait without holding a worker.

    ``until`` (aware) ends the wait at the latest; ``out`` is the step's result then (a
    sleep), or None: the module is called again when the play wakes, and ``ready`` says
    whether what it waits for has happened already. ``until`` None: a ``RunContext``
    callback (``fan_out``) has handed the play over already.
    """

    def __init__(self, until: datetime | None, out: Any = None, ready: Callable[[], bool] | None = None):
        super().__init__(f"park until {until.isoformat() if until else 'woken'}")
        self.until = until
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
    # The credential named by the step's `auth` arg, resolved by the runner
    # (flows.credentials.resolve_auth); only for modules with `uses_credentials`.
    auth: dict | None = None
    # Control flow, provided by the runner (plays), so that modules never import it:
    # fan_out(items, concurrency): start (or, when called again, see to) one iteration of
    # the loop body per item; the number DONE once all have ended, else None (then raise
    # Park(None)). start_child(flow key, args) and child_state(): this step's child play,
    # as {"id", "state", "ended", "error", "out"} (child_state: None before it exists).
    fan_out: Callable[[list, int], int | None] | None = None
    start_child: Callable[[str, dict], dict] | None = None
    child_state: Callable[[], dict | None] | None = None


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
    # A display name for lists and docs; default: the appId in words ("kv set").
    name: ClassVar[str] = ""
    summary: ClassVar[str]
    args_schema: ClassVar[dict]
    out_schema: ClassVar[dict]
    # Args the engine passes through unrendered because the module gives their {{ }} its
    # own meaning (the `template` text is rendered over `data` by the module itself).
    raw_args: ClassVar[frozenset[str]] = frozenset()
    # Modules that only read and write flowplay's own database (subflow, kv, iterator) or
    # only return their rendered args (var) run in the runner's thread and connection, not
    # in the step thread pool: they are quick, and they see what the runner has written.
    inline: ClassVar[bool] = False
    # Modules whose work is CPU-bound and unbounded by any wait (parsing, matching, mapping)
    # run in a forked process that the runner kills on timeout or cancel
    # (plays/killable.py): a thread cannot be stopped, and it would keep the CPU and the GIL.
    cpu_bound: ClassVar[bool] = False

    def cheap(self, args: Any) -> bool:
        """For a cpu_bound module: True when these (rendered) args are small enough for its
        worst case to be short, so that the step runs in a thread and no fork is paid."""
        return False

    # Modules that send credentials to another service (curl): their args may read
    # `$credentials` and their `auth` arg names a credential. Elsewhere a credential's value
    # could come back in the step's out, so saving such a flow is refused.
    uses_credentials: ClassVar[bool] = False

    def __init__(self) -> None:
        Draft202012Validator.check_schema(self.args_schema)
        Draft202012Validator.check_schema(self.out_schema)
        self._validator = Draft202012Validator(self.args_schema)

    # Subclasses add what a schema cannot say. Only called with a dict; must not raise.
    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        return ()

    def execute(self, args: dict, ctx: RunContext) -> Any:
        raise NotImplementedError

    def after(self, steps: list[dict], index: int) -> int:
        """The index of the step that follows this one at ``index`` (a loop skips its body)."""
        return index + 1

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
    """Every module's appId, name, description and args/out JSON Schemas, by appId."""
    # Copies, so a caller decorating the answer cannot change what check() validates.
    return [
        {
            "appId": m.app_id,
            "name": m.name or m.app_id.replace("-", " ").capitalize(),
            "description": m.summary,
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


# --- Shared by several modules -------------------------------------------------------

_SCALAR = ["string", "number", "boolean", "null"]


def _b64decode(text: str) -> bytes:
    """Standard or urlsafe base64, with or without padding and line breaks."""
    compact = re.sub(r"\s+", "", text).replace("-", "+").replace("_", "/")
    compact = compact.rstrip("=")
    if len(compact) % 4 == 1:
        raise ValueError("truncated base64 input")
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
