"""The ``{{ … }}`` expression language: parsing, sandboxed evaluation, checks.

Expressions are Jinja2 expressions (never statements) compiled by a locked-down
``ImmutableSandboxedEnvironment``:

* Only ``$prev``, ``$flowId``, ``$playId``, ``$date``, ``$rand``, ``$schedule`` and ``$credentials`` exist (plain names
  in ``render_template``). The source is rewritten (``$prev`` -> ``_prev``) outside
  string literals, then every name becomes a lookup in one root mapping, so nothing
  else (``range``, ``lipsum``, ``self``...) is reachable.
* ``$credentials`` is only read whole, as ``{{ $credentials.<name>.<field> }}`` (no filter,
  operator or computed name), so a credential is sent as it is and can be masked by value.
* ``a.b`` / ``a["b"]`` / ``a[0]`` only read mapping keys and list items; there is no
  attribute access to Python objects, so no methods and no ``__class__``. Function
  calls are refused. A missing path is ``None`` at any depth.
* Operators are intercepted to refuse huge strings, lists and integers before they
  are allocated; filters and operators share a per-call time budget.
* ``{%`` and ``{#`` have no meaning: they are ordinary text.
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import json
import math
import operator
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.runtime import Context, new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import limits
from .errors import ExpressionError
from .pipes import INTERNAL_PIPES, PIPES, TESTS
from .values import a_type, to_json, to_text, type_name

__all__ = [
    "Scope",
    "render",
    "render_template",
    "check",
    "check_template",
    "references",
    "credential_references",
    "credential_paths",
    "is_expression",
]

# `$name` -> internal Jinja name; the `_` prefix keeps user-typed names apart (see _prepare).
_SIGILS = {
    "prev": "_prev",
    "flowId": "_flowId",
    "playId": "_playId",
    "date": "_date",
    "rand": "_rand",
    "schedule": "_schedule",
    "credentials": "_credentials",
}
_INTERNAL_NAMES = {internal: name for name, internal in _SIGILS.items()}
_ROOT = "fp_root"
_PREV = "_prev"
_CREDENTIALS = "_credentials"

# Strings up to this length have their parsed form cached; longer ones are rare
# (templates, documents) and would make the cache memory unbounded.
_CACHEABLE_TEXT = 4096


@dataclass
class Scope:
    """What names in an expression resolve to."""

    prev: Mapping[str, Any]
    flow_id: str = ""
    play_id: str = ""
    # name -> {field: value}; the runner's is lazy and records each use (flows.credentials).
    credentials: Mapping[str, Any] = _field(default_factory=dict)
    # A schedule's fire ({"id", "firedAt"}) while its args are rendered; null elsewhere.
    schedule: Mapping[str, Any] | None = None


def is_expression(value: Any) -> bool:
    """True for a string that contains ``{{``."""
    return isinstance(value, str) and "{{" in value


# --------------------------------------------------------------------------- names


class _LazyMapping(Mapping[str, Any]):
    """A mapping whose values are computed on each read ($date.now, $rand.uuid)."""

    __slots__ = ("_factories",)

    def __init__(self, factories: dict[str, Callable[[], Any]]) -> None:
        self._factories = factories

    def __getitem__(self, key: str) -> Any:
        return self._factories[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_DATE = _LazyMapping(
    {
        "now": _now,
        "today": lambda: _dt.datetime.now(_dt.UTC).date().isoformat(),
        "timestamp": lambda: int(_dt.datetime.now(_dt.UTC).timestamp()),
    }
)
_RAND = _LazyMapping({"uuid": lambda: str(uuid.uuid4())})


# --------------------------------------------------------------------------- sandbox


def _forbidden(name: str) -> ExpressionError:
    return ExpressionError(f"access to '{name}' is not allowed")


def _lookup_missing(key: Any) -> None:
    if isinstance(key, str) and key.startswith("__"):
        raise _forbidden(key)
    return None


def _weight(value: Any, cap: int) -> int:
    """Serialised size of a value in characters/items, counting no further than ``cap``."""
    total = 0
    stack = list(value) if isinstance(value, (list, tuple)) else [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 1
        elif isinstance(item, (list, tuple)):
            total += 1
            stack.extend(item)
        elif isinstance(item, Mapping):
            total += 1 + len(item)
            stack.extend(item.values())
        else:
            total += 1
        if total > cap:
            break
    return total


def _check_repeat(left: Any, right: Any) -> None:
    if isinstance(left, (str, list, tuple)):
        seq, times = left, right
    elif isinstance(right, (str, list, tuple)):
        seq, times = right, left
    else:
        if type(left) is int and type(right) is int and left.bit_length() + right.bit_length() > limits.MAX_INT_BITS:
            raise ExpressionError("number is too large")
        return
    if not isinstance(times, int) or times <= 0 or not seq:
        return
    cap = limits.MAX_OUTPUT_CHARS
    # Weigh nested items too: [[1] * 1000] * 1000 shares one inner list, yet comparing
    # or serialising the result walks a million items.
    size = len(seq) * times if isinstance(seq, str) else _weight(seq, cap // times + 1) * times
    if size > cap:
        raise ExpressionError(f"repeating {a_type(seq)} of length {len(seq)} {times} times exceeds the limit of {cap}")
    limits.charge(len(seq) * times)


def _check_concat(left: Any, right: Any) -> None:
    if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        size = len(left) + len(right)
        if size > limits.MAX_OUTPUT_CHARS:
            raise ExpressionError(f"result is too large (limit {limits.MAX_OUTPUT_CHARS})")
        limits.charge(size)


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > limits.MAX_INT_BITS:
            raise ExpressionError("number is too large")


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
}
_UNOPS: dict[str, Callable[[Any], Any]] = {"+": operator.pos, "-": operator.neg}


class _Environment(ImmutableSandboxedEnvironment):
    """Sandbox whose lookups only read JSON data and whose operators are size-checked."""

    intercepted_binops = frozenset(_BINOPS)
    intercepted_unops = frozenset(_UNOPS)

    def __init__(self) -> None:
        # optimized=False: the optimizer would run filters at compile time.
        super().__init__(autoescape=False, cache_size=0, auto_reload=False, optimized=False)
        self.globals.clear()
        self.filters = {**PIPES, **INTERNAL_PIPES}
        self.tests = dict(TESTS)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict or isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except KeyError:
                return _lookup_missing(attribute)
        if attribute.startswith("_"):
            raise _forbidden(attribute)
        return None

    def getitem(self, obj: Any, argument: Any) -> Any:
        kind = type(obj)
        if kind is dict or isinstance(obj, Mapping):
            try:
                return obj[argument]
            except (KeyError, TypeError):
                pass
            # `$prev.row.0` parses as an integer index; JSON keys are strings.
            if type(argument) is int:
                return obj.get(str(argument))
            return _lookup_missing(argument)
        if kind is list or kind is tuple or kind is str:
            if type(argument) is int:
                try:
                    return obj[argument]
                except IndexError:
                    return None
        if isinstance(argument, str) and argument.startswith("_"):
            raise _forbidden(argument)
        return None

    def call(self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        raise ExpressionError("function calls are not allowed")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        limits.check_deadline()
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "+":
            _check_concat(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            raise ExpressionError("'%' needs numbers (string formatting is not supported)")
        try:
            result = _BINOPS[operator](left, right)
        except ZeroDivisionError:
            raise ExpressionError("division by zero") from None
        except TypeError:
            raise ExpressionError(f"cannot apply '{operator}' to {type_name(left)} and {type_name(right)}") from None
        except OverflowError:
            raise ExpressionError("number is too large") from None
        if type(result) is complex:
            raise ExpressionError("result is not a real number")
        return result

    def call_unop(self, context: Context, operator: str, arg: Any) -> Any:
        try:
            return _UNOPS[operator](arg)
        except TypeError:
            raise ExpressionError(f"cannot apply unary '{operator}' to {type_name(arg)}") from None


_ENV = _Environment()


# --------------------------------------------------------------------------- compiling


class _CompileError(Exception):
    """A syntax or policy error found while compiling one expression."""


class _StackExhausted(Exception):
    """Compiling hit Python's recursion limit.

    Raised instead of returning a cached error: whether it happens depends on how deep
    the caller's stack already is, so the next attempt may succeed.
    """


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One compiled ``{{ … }}`` body (or the reason it does not compile)."""

    source: str
    run: Callable[[Context], Iterator[str]] | None
    refs: frozenset[str]
    error: str | None
    credentials: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Program:
    """A string split into literal text and compiled expressions."""

    parts: tuple[str | _Compiled, ...]
    # Set when the whole string is one expression (keeps its JSON type).
    whole: _Compiled | None


_IDENT = re.compile(r"[^\W\d]\w*")
_NUMBER = re.compile(r"\d\w*")
_CLOSING = {")": "(", "]": "[", "}": "{"}
_OPERATOR_WORDS = frozenset({"not", "and", "or", "in", "is", "if", "else"})


def _string_end(text: str, start: int) -> int:
    """Index just past the quoted string starting at ``start`` (len(text) if unclosed)."""
    quote = text[start]
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == quote:
            return i + 1
        i += 1
    return n


def _prepare(body: str, template_mode: bool) -> str:
    """Rewrite ``$names`` and ``null`` outside string literals; enforce size and nesting."""
    if len(body) > limits.MAX_EXPRESSION_CHARS:
        raise _CompileError(f"expression is too long (limit {limits.MAX_EXPRESSION_CHARS} characters)")
    if not body.strip():
        raise _CompileError("empty expression")
    out: list[str] = []
    i = 0
    n = len(body)
    depth = 0
    after_dot = False
    # Jinja's parser recurses on brackets, unary operators and `if … else` chains;
    # bounding them here keeps parsing well inside Python's stack.
    operand_before = False
    unary_run = 0
    conditionals = 0
    while i < n:
        c = body[i]
        if c == "'" or c == '"':
            end = _string_end(body, i)
            out.append(body[i:end])
            i = end
            after_dot = False
            operand_before = True
            unary_run = 0
            continue
        if c == "$":
            match = _IDENT.match(body, i + 1)
            name = match.group() if match else ""
            if template_mode or after_dot or name not in _SIGILS:
                if template_mode:
                    raise _CompileError("unexpected '$' (template variables have no '$')")
                if not name:
                    raise _CompileError("unexpected '$'")
                raise _CompileError(f"unknown variable '${name}' (use $prev, $flowId, $playId, $date, $rand, $schedule or $credentials)")
            out.append(_SIGILS[name])
            i = match.end()  # type: ignore[union-attr]
            after_dot = False
            operand_before = True
            unary_run = 0
            continue
        match = _IDENT.match(body, i)
        if match:
            word = match.group()
            if not after_dot:
                if word == "null":
                    word = "none"
                elif not template_mode and word in _INTERNAL_NAMES:
                    raise _CompileError(f"unknown name '{word}'")
                elif word == "not":
                    unary_run += 1
                elif word == "if":
                    conditionals += 1
            if unary_run > limits.MAX_NESTING or conditionals > limits.MAX_NESTING:
                raise _CompileError("expression is nested too deeply")
            operand_before = after_dot or word not in _OPERATOR_WORDS
            if operand_before:
                unary_run = 0
            out.append(word)
            i = match.end()
            after_dot = False
            continue
        match = _NUMBER.match(body, i)
        if match:
            out.append(match.group())
            i = match.end()
            after_dot = False
            operand_before = True
            unary_run = 0
            continue
        if c in "([{":
            depth += 1
            if depth > limits.MAX_NESTING:
                raise _CompileError(f"expression is nested too deeply (limit {limits.MAX_NESTING} brackets)")
        elif c in ")]}":
            depth -= 1
        elif (c == "-" or c == "+") and not operand_before:
            unary_run += 1
            if unary_run > limits.MAX_NESTING:
                raise _CompileError("expression is nested too deeply")
        if not c.isspace():
            after_dot = c == "."
            operand_before = c in ")]}"
            if operand_before:
                unary_run = 0
        out.append(c)
        i += 1
    return "".join(out)


_JINJA_WORDING = (
    ("unexpected end of template", "unexpected end of expression"),
    ("'end of template'", "end of expression"),
    ("expected token 'end of print statement'", "expected end of expression"),
    ("'end of print statement'", "end of expression"),
    ("end of print statement", "end of expression"),
    ("Encountered unknown tag", "unexpected"),
)
_INTERNAL_IN_MESSAGE = re.compile(r"\b_(prev|flowId|playId|date|rand|credentials)\b")


def _clean_message(message: str, template_mode: bool) -> str:
    for old, new in _JINJA_WORDING:
        message = message.replace(old, new)
    if not template_mode:
        message = _INTERNAL_IN_MESSAGE.sub(r"$\1", message)
    return message.rstrip(".")


_ALLOWED_NODES: frozenset[type[nodes.Node]] = frozenset(
    {
        nodes.Const,
        nodes.Name,
        nodes.Getattr,
        nodes.Getitem,
        nodes.Tuple,
        nodes.List,
        nodes.Dict,
        nodes.Pair,
        nodes.Keyword,
        nodes.CondExpr,
        nodes.Filter,
        nodes.Test,
        nodes.Concat,
        nodes.Compare,
        nodes.Operand,
        nodes.Add,
        nodes.Sub,
        nodes.Mul,
        nodes.Div,
        nodes.FloorDiv,
        nodes.Mod,
        nodes.Pow,
        nodes.And,
        nodes.Or,
        nodes.Not,
        nodes.Neg,
        nodes.Pos,
    }
)


@functools.cache
def _signature(func: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(func)


def _check_arguments(kind: str, name: str, func: Callable[..., Any], node: nodes.Filter | nodes.Test) -> None:
    if node.dyn_args is not None or node.dyn_kwargs is not None:
        raise _CompileError(f"{kind} '{name}' does not take * or ** arguments")
    placeholders = [None] * len(node.args)
    named = {keyword.key: None for keyword in node.kwargs}
    try:
        _signature(func).bind(None, *placeholders, **named)
    except TypeError as exc:
        raise _CompileError(f"{kind} '{name}': {exc}") from None


class _Transformer:
    """Validates a parsed expression against the language and rewrites it for the sandbox."""

    def __init__(self, template_mode: bool) -> None:
        self.template_mode = template_mode
        self.refs: set[str] = set()
        self.credentials: set[str] = set()

    def _root_lookup(self, key: str) -> nodes.Node:
        return nodes.Getitem(nodes.Name(_ROOT, "load", lineno=1), nodes.Const(key, lineno=1), "load", lineno=1)

    def _note_ref(self, node: nodes.Getattr | nodes.Getitem) -> None:
        inner = node.node
        if not self.template_mode and isinstance(inner, nodes.Name) and inner.name == _CREDENTIALS:
            self.credentials.add(_credential_name(node))
            return
        if self.template_mode or not (isinstance(inner, nodes.Name) and inner.name == _PREV):
            return
        if isinstance(node, nodes.Getattr):
            key: Any = node.attr
        elif isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            return
        if isinstance(key, str) and key != "args":
            self.refs.add(key)

    def visit(self, node: nodes.Node, depth: int = 0) -> nodes.Node:
        if depth > limits.MAX_AST_DEPTH:
            raise _CompileError("expression is too complex")
        cls = type(node)
        if cls is nodes.Const:
            if isinstance(node.value, float) and not math.isfinite(node.value):  # type: ignore[attr-defined]
                raise _CompileError("number is out of range")
            return node
        if cls is nodes.Name:
            return self._name(node)  # type: ignore[arg-type]
        if cls is nodes.Call:
            raise _CompileError("function calls are not allowed")
        if cls not in _ALLOWED_NODES:
            raise _CompileError(f"unsupported syntax ({cls.__name__})")
        if cls is nodes.Getattr:
            if node.attr.startswith("__"):  # type: ignore[attr-defined]
                raise _CompileError(f"access to '{node.attr}' is not allowed")  # type: ignore[attr-defined]
            self._note_ref(node)  # type: ignore[arg-type]
        elif cls is nodes.Getitem:
            arg = node.arg  # type: ignore[attr-defined]
            if isinstance(arg, nodes.Const) and isinstance(arg.value, str) and arg.value.startswith("__"):
                raise _CompileError(f"access to '{arg.value}' is not allowed")
            self._note_ref(node)  # type: ignore[arg-type]
            if isinstance(arg, nodes.Slice):
                return self._slice(node, depth)  # type: ignore[arg-type]
        elif cls is nodes.Filter:
            self._filter(node)  # type: ignore[arg-type]
        elif cls is nodes.Test:
            func = TESTS.get(node.name)  # type: ignore[attr-defined]
            if func is None:
                raise _CompileError(f"unknown test '{node.name}'")  # type: ignore[attr-defined]
            _check_arguments("test", node.name, func, node)  # type: ignore[arg-type, attr-defined]
        elif cls is nodes.CondExpr and node.expr2 is None:  # type: ignore[attr-defined]
            # `a if b` without else: null rather than Jinja's Undefined.
            node.expr2 = nodes.Const(None, lineno=1)  # type: ignore[attr-defined]
        self._children(node, depth)
        if cls is nodes.Concat:
            # `~` becomes a helper that renders like text interpolation and is size-checked.
            operands = nodes.List(node.nodes, lineno=1)  # type: ignore[attr-defined]
            return nodes.Filter(operands, "_concat", [], [], None, None, lineno=1)
        return node

    def _children(self, node: nodes.Node, depth: int) -> None:
        for field in node.fields:
            value = getattr(node, field)
            if isinstance(value, nodes.Node):
                setattr(node, field, self.visit(value, depth + 1))
            elif isinstance(value, list):
                setattr(
                    node,
                    field,
                    [self.visit(item, depth + 1) if isinstance(item, nodes.Node) else item for item in value],
                )

    def _name(self, node: nodes.Name) -> nodes.Node:
        if node.ctx != "load":
            raise _CompileError("assignment is not allowed")
        name = node.name
        if self.template_mode:
            if name.startswith("__"):
                raise _CompileError(f"access to '{name}' is not allowed")
            return self._root_lookup(name)
        if name in _INTERNAL_NAMES:
            return self._root_lookup(_INTERNAL_NAMES[name])
        raise _CompileError(f"unknown name '{name}' (use $prev, $flowId, $playId, $date, $rand, $schedule or $credentials; text needs quotes)")

    def _filter(self, node: nodes.Filter) -> None:
        func = PIPES.get(node.name)
        if func is None:
            raise _CompileError(f"unknown filter '{node.name}'")
        _check_arguments("filter", node.name, func, node)

    def _slice(self, node: nodes.Getitem, depth: int) -> nodes.Node:
        target = self.visit(node.node, depth + 1)
        bounds = [
            self.visit(part, depth + 1) if part is not None else nodes.Const(None, lineno=1)
            for part in (node.arg.start, node.arg.stop, node.arg.step)  # type: ignore[attr-defined]
        ]
        return nodes.Filter(target, "_slice", bounds, [], None, None, lineno=1)


def _const_key(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _credential_name(node: nodes.Getattr | nodes.Getitem) -> str:
    return _const_key(node) or ""


def _check_credential_use(expr: nodes.Node) -> None:
    """``$credentials`` only as the whole expression ``$credentials.<name>.<field>``."""
    names = [expr] if isinstance(expr, nodes.Name) else list(expr.find_all(nodes.Name))
    if not any(name.name == _CREDENTIALS for name in names):
        return
    inner = getattr(expr, "node", None)
    if (
        isinstance(expr, (nodes.Getattr, nodes.Getitem))
        and _const_key(expr) is not None
        and isinstance(inner, (nodes.Getattr, nodes.Getitem))
        and _const_key(inner) is not None
        and isinstance(inner.node, nodes.Name)
        and inner.node.name == _CREDENTIALS
    ):
        return
    raise _CompileError(
        "$credentials can only be used whole, as {{ $credentials.<name>.<field> }} "
        "(no filters, operators or computed names)"
    )


def _compile_uncached(body: str, template_mode: bool) -> _Compiled:
    transformer = _Transformer(template_mode)
    try:
        source = _prepare(body, template_mode)
        parser = Parser(_ENV, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            token = parser.stream.current
            raise _CompileError(f"unexpected '{token.value}' after the expression")
        if not template_mode:
            _check_credential_use(expr)
        expr = transformer.visit(expr)
        target = nodes.Name("result", "store", lineno=1)
        template_node = nodes.Template([nodes.Assign(target, expr, lineno=1)], lineno=1)
        template_node.set_environment(_ENV)
        template = _ENV.from_string(template_node)
    except _CompileError as exc:
        return _Compiled(body, None, frozenset(), str(exc))
    except RecursionError:
        raise _StackExhausted from None
    except MemoryError:
        return _Compiled(body, None, frozenset(), "expression is too large")
    except Exception as exc:  # TemplateSyntaxError and the rare ValueError from the lexer
        message = getattr(exc, "message", None) or str(exc)
        return _Compiled(body, None, frozenset(), _clean_message(message, template_mode))
    return _Compiled(
        body, template.root_render_func, frozenset(transformer.refs), None, frozenset(transformer.credentials)
    )


# About 5 KB per entry.
_compile = functools.lru_cache(maxsize=4096)(_compile_uncached)


def _split_uncached(text: str, template_mode: bool) -> _Program:
    """Split text into literal parts and compiled ``{{ … }}`` bodies.

    The closing ``}}`` is searched outside string literals and balanced brackets,
    so ``{{ {'a': {'b': 1}} }}`` and ``{{ '}}' }}`` work as in Jinja.
    """
    parts: list[str | _Compiled] = []
    pos = 0
    n = len(text)
    while pos < n:
        start = text.find("{{", pos)
        if start < 0:
            parts.append(text[pos:])
            break
        if start > pos:
            parts.append(text[pos:start])
        i = start + 2
        stack: list[str] = []
        end = -1
        while i < n:
            c = text[i]
            if c == "'" or c == '"':
                i = _string_end(text, i)
                continue
            if c in "([{":
                stack.append(c)
            elif c == "}" and (not stack or stack[-1] != "{"):
                if text.startswith("}}", i):
                    end = i
                    break
            elif c in ")]}":
                if stack and stack[-1] == _CLOSING[c]:
                    stack.pop()
            i += 1
        if end < 0:
            body = text[start + 2 :]
            parts.append(_Compiled(body, None, frozenset(), "'{{' is never closed with '}}'"))
            break
        parts.append(_compile(text[start + 2 : end], template_mode))
        pos = end + 2
    expressions = [part for part in parts if not isinstance(part, str)]
    whole = None
    if len(expressions) == 1 and all(isinstance(part, _Compiled) or not part.strip() for part in parts):
        whole = expressions[0]
    return _Program(tuple(parts), whole)


_split_cached = functools.lru_cache(maxsize=4096)(_split_uncached)


def _program(text: str, template_mode: bool) -> _Program:
    if len(text) <= _CACHEABLE_TEXT:
        return _split_cached(text, template_mode)
    return _split_uncached(text, template_mode)


# --------------------------------------------------------------------------- evaluating


def _runtime_error(exc: BaseException) -> ExpressionError:
    if isinstance(exc, ExpressionError):
        return exc
    if isinstance(exc, ZeroDivisionError):
        return ExpressionError("division by zero")
    if isinstance(exc, _StackExhausted):
        return ExpressionError("expression is nested too deeply")
    if isinstance(exc, RecursionError):
        return ExpressionError("value is nested too deeply")
    if isinstance(exc, MemoryError):
        return ExpressionError("out of memory")
    if isinstance(exc, TypeError):
        return ExpressionError(f"type error: {exc}")
    if isinstance(exc, (ValueError, OverflowError)):
        return ExpressionError(f"invalid value: {exc}")
    return ExpressionError(f"evaluation failed: {exc}")


class _Evaluation:
    """State of one render()/render_template() call: the root names and time budget."""

    __slots__ = ("root", "context", "budget")

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.context: Context | None = None
        self.budget: limits.EvaluationBudget | None = None

    def close(self) -> None:
        if self.budget is not None:
            self.budget.__exit__()
            self.budget = None

    def evaluate(self, compiled: _Compiled, as_text: bool) -> Any:
        if compiled.error is not None:
            raise ExpressionError(compiled.error, expression=compiled.source)
        context = self.context
        if context is None:
            self.budget = limits.EvaluationBudget().__enter__()
            context = self.context = new_context(_ENV, "expr", {}, {_ROOT: self.root}, True, None, None)
        try:
            for _ in compiled.run(context):  # type: ignore[misc]
                pass
            value = context.vars["result"]
            return to_text(value) if as_text else to_json(value)
        except Exception as exc:  # noqa: BLE001 - nothing raw may escape an evaluation
            error = _runtime_error(exc)
        if error.expression is None:
            error.expression = compiled.source
        raise error

    def text(self, text: str, template_mode: bool) -> Any:
        program = _program(text, template_mode)
        if program.whole is not None and not template_mode:
            return self.evaluate(program.whole, as_text=False)
        out: list[str] = []
        size = 0
        for part in program.parts:
            piece = part if isinstance(part, str) else self.evaluate(part, as_text=True)
            size += len(piece)
            if size > limits.MAX_OUTPUT_CHARS:
                raise ExpressionError(f"rendered text is too large (limit {limits.MAX_OUTPUT_CHARS} characters)")
            out.append(piece)
        return "".join(out)

    def value(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            return value if "{{" not in value else self.text(value, False)
        if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
            out = {}
            for key, item in value.items():
                try:
                    out[key] = self.value(item)
                except ExpressionError as exc:
                    exc.path = _join_path(_key_segment(key), exc.path)
                    raise
            return out
        if kind is list or kind is tuple:
            items = []
            for index, item in enumerate(value):
                try:
                    items.append(self.value(item))
                except ExpressionError as exc:
                    exc.path = _join_path(f"[{index}]", exc.path)
                    raise
            return items
        if isinstance(value, str):
            return self.value(str(value))
        return value


_PLAIN_KEY = re.compile(r"[^.\[\]\"'\s]+")


def _key_segment(key: Any) -> str:
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return key
    return "[" + json.dumps(key if isinstance(key, (str, int, float, bool)) or key is None else str(key)) + "]"


def _join_path(segment: str, rest: str) -> str:
    if not rest:
        return segment
    if rest.startswith("["):
        return segment + rest
    return f"{segment}.{rest}"


def _guarded(func: Callable[[], Any]) -> Any:
    """Run ``func``, turning anything but ExpressionError into ExpressionError."""
    try:
        return func()
    except ExpressionError:
        raise
    except Exception as exc:  # noqa: BLE001 - includes RecursionError and MemoryError
        raise _runtime_error(exc) from None


def render(value: Any, scope: Scope) -> Any:
    """Evaluate every ``{{ }}`` in value (dict/list/str at any depth).

    A string that is exactly one expression takes the value's JSON type; other
    strings are rendered as text. Non-strings are returned as is, in new containers;
    the input is not mutated. Raises ExpressionError.
    """
    if type(value) is str and "{{" not in value:
        return value
    root = {
        "prev": scope.prev,
        "flowId": scope.flow_id,
        "playId": scope.play_id,
        "date": _DATE,
        "rand": _RAND,
        "credentials": scope.credentials,
        "schedule": scope.schedule,
    }
    evaluation = _Evaluation(root)
    try:
        return _guarded(lambda: evaluation.value(value))
    finally:
        evaluation.close()


def render_template(text: str, data: Mapping[str, Any]) -> str:
    """Render text whose ``{{ name }}`` expressions read plain names from ``data``.

    Same sandbox and limits as render(); missing values render as "".
    """
    if not isinstance(text, str):
        raise ExpressionError(f"a template must be a string, not {type_name(text)}")
    if "{{" not in text:
        return text
    evaluation = _Evaluation(data if isinstance(data, Mapping) else {})
    try:
        return _guarded(lambda: evaluation.text(text, True))
    finally:
        evaluation.close()


# --------------------------------------------------------------------------- static checks


def _walk_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    kind = type(value)
    if isinstance(value, str):
        if "{{" in value:
            yield path, value
    elif kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
        for key, item in value.items():
            yield from _walk_strings(item, _join_path(path, _key_segment(key)) if path else _key_segment(key))
    elif kind is list or kind is tuple:
        for index, item in enumerate(value):
            yield from _walk_strings(item, f"{path}[{index}]")


def _errors_in(text: str, template_mode: bool) -> list[str]:
    try:
        program = _program(text, template_mode)
    except _StackExhausted:
        return ["expression is nested too deeply"]
    return [
        str(ExpressionError(part.error, expression=part.source))
        for part in program.parts
        if isinstance(part, _Compiled) and part.error is not None
    ]


def check(value: Any) -> dict[str, list[str]]:
    """Syntax-check every expression in value.

    Returns ``{path: [messages]}`` with paths relative to value ("" for the value
    itself, "url", "headers.Authorization", "items[2].name"); empty means valid.
    """
    try:
        problems: dict[str, list[str]] = {}
        for path, text in _walk_strings(value):
            errors = _errors_in(text, False)
            if errors:
                problems[path] = errors
        return problems
    except RecursionError:
        return {"": ["value is nested too deeply"]}


def check_template(text: str) -> list[str]:
    """Syntax errors of a render_template() text (empty list = valid)."""
    if not isinstance(text, str):
        return [f"a template must be a string, not {type_name(text)}"]
    return _errors_in(text, True) if "{{" in text else []


def references(value: Any) -> set[str]:
    """Step refs read through ``$prev.<ref>`` / ``$prev["ref"]`` anywhere in value.

    ``args`` (the trigger arguments) is not a step and is left out; expressions that
    do not compile contribute nothing.
    """
    refs: set[str] = set()
    try:
        for _, text in _walk_strings(value):
            for part in _program(text, False).parts:
                if isinstance(part, _Compiled):
                    refs |= part.refs
    except (RecursionError, _StackExhausted):
        pass
    return refs


def credential_references(value: Any) -> set[str]:
    """Credential names read through ``$credentials.<name>`` anywhere in value."""
    names: set[str] = set()
    try:
        for _, text in _walk_strings(value):
            for part in _program(text, False).parts:
                if isinstance(part, _Compiled):
                    names |= part.credentials
    except (RecursionError, _StackExhausted):
        pass
    return names


def credential_paths(value: Any) -> Iterator[tuple[str, set[str]]]:
    """(path, credential names) of every string in value that reads ``$credentials``."""
    try:
        for path, text in _walk_strings(value):
            names: set[str] = set()
            for part in _program(text, False).parts:
                if isinstance(part, _Compiled):
                    names |= part.credentials
            if names:
                yield path, names
    except (RecursionError, _StackExhausted):
        return
