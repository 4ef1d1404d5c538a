"""User regular expressions, matched in linear time by RE2 (google-re2).

Python's ``re`` backtracks: ``(a+)+$`` on 26 ``a``s and a ``!`` takes seconds, on 40 hours,
and holds the GIL all along, so neither the step timeout nor the lease heartbeat of its
worker can run. Every pattern a user writes (the ``regex`` module, the ``regex`` filter
operator) is compiled here instead. RE2 guarantees time linear in the input, at the price
of the constructs that need backtracking; those are refused with a message that says so:

* backreferences (``\\1``, ``(?P=name)``) and conditionals (``(?(1)a|b)``);
* lookahead and lookbehind (``(?=…)``, ``(?!…)``, ``(?<=…)``, ``(?<!…)``);
* atomic groups and possessive quantifiers (``(?>…)``, ``a*+``).

What stays Python's: the syntax is checked by Python's parser first (so errors read as
before), ``\\Z``, ``\\uXXXX``, ``\\UXXXXXXXX``, ``\\N{name}`` and ``{,n}`` are translated,
the ``x`` flag (verbose) is applied before RE2 sees the pattern, and replacement templates
(``\\1``, ``\\g<name>``, ``\\n``) are expanded by Python's own template parser. What differs:
``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only (as with Python's ``(?a)``; use
``\\p{L}``, ``\\p{N}`` for any script), and ``$`` without the ``m`` flag matches only at the
very end, not also before a final newline.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

import re2

FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}

#: Memory RE2 may use for one compiled pattern (its DFA falls back to a slower, still
#: linear, engine when full). Patterns whose program alone exceeds it are refused.
MAX_MEM = 32 << 20

UNSUPPORTED = (
    "is not supported: patterns run on RE2, which matches in linear time and has no "
    "backreferences, lookaround, conditionals, atomic groups or possessive quantifiers"
)


class PatternError(ValueError):
    """The pattern cannot be used; the message says why, for a person."""


class Pattern:
    """A pattern compiled for RE2, with the Python pattern used for replacement templates."""

    __slots__ = ("python", "re2")

    def __init__(self, python: re.Pattern[str], compiled: Any):
        self.python = python
        self.re2 = compiled

    @property
    def groups(self) -> int:
        return self.python.groups

    def search(self, text: str) -> Any:
        return self.re2.search(text)

    def finditer(self, text: str) -> Iterator[Any]:
        return self.re2.finditer(text)

    def template(self, replacement: str) -> Any:
        """Parse a replacement as ``re.sub`` does; raise PatternError if it is invalid."""
        try:
            parsed = re._parser.parse_template(replacement, self.python)  # type: ignore[attr-defined]
        except (re.error, IndexError) as exc:
            raise PatternError(f"is not a valid replacement: {exc}") from None
        if isinstance(parsed, tuple):  # Python 3.11: (groups, literals)
            return parsed
        # Python 3.12+: [literal, group, literal, group, …, literal]
        groups, literals = [], []
        for position, part in enumerate(parsed):
            if position % 2:
                groups.append((len(literals), part))
                literals.append(None)
            else:
                literals.append(part)
        return groups, literals


def expand(template: Any, match: Any) -> str:
    groups, literals = template
    literals = list(literals)
    for index, group in groups:
        literals[index] = match.group(group) or ""
    return "".join(literals)


def template_size(template: Any) -> int:
    """Characters of a template's literal parts (group values come on top)."""
    return sum(len(part) for part in template[1] if part is not None)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str, flags: str = "") -> Pattern:
    """Compile a user pattern for RE2; raise PatternError with a message for a person."""
    bits = 0
    for letter in flags:
        bits |= FLAGS[letter]
    try:
        python = re.compile(pattern, bits)
        _refuse_backtracking(re._parser.parse(pattern, bits))  # type: ignore[attr-defined]
    except re.error as exc:
        raise PatternError(f"is not a valid regular expression: {exc}") from None
    except RecursionError:
        raise PatternError("is nested too deeply") from None
    lead = re.match(r"\(\?([aiLmsux]+)\)", pattern)
    if lead:  # RE2 knows only i, m, s (and U) as inline flags; the others are applied here
        kept = "".join(letter for letter in lead.group(1) if letter in "ims")
        pattern = (f"(?{kept})" if kept else "") + pattern[lead.end() :]
    translated = _translate(pattern, verbose=bool(python.flags & re.VERBOSE))
    inline = "".join(letter for letter in flags if letter in "ims")
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False
    try:
        compiled = re2.compile(f"(?{inline}){translated}" if inline else translated, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(f"is not supported by the RE2 engine: {reason}") from None
    return Pattern(python, compiled)


def _refuse_backtracking(parsed: Any) -> None:
    from re import _constants as c  # noqa: PLC0415 - the parse tree is the point

    names = {
        c.GROUPREF: "a backreference",
        c.GROUPREF_EXISTS: "a conditional group",
        c.ASSERT: "a lookahead or lookbehind",
        c.ASSERT_NOT: "a negative lookahead or lookbehind",
    }
    for name, what in (("ATOMIC_GROUP", "an atomic group"), ("POSSESSIVE_REPEAT", "a possessive quantifier")):
        if hasattr(c, name):
            names[getattr(c, name)] = what
    stack = [parsed]
    while stack:
        for op, av in stack.pop():
            if op in names:
                raise PatternError(f"uses {names[op]}, which {UNSUPPORTED}")
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                stack.append(av[2])
            elif op is c.SUBPATTERN:
                stack.append(av[-1])
            elif op is c.BRANCH:
                stack.extend(av[1])


def _translate(pattern: str, verbose: bool) -> str:
    """Python spellings RE2 reads otherwise; verbose whitespace and comments removed."""
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt == "Z" and not in_class:
                out.append(r"\z")
                i += 2
            elif nxt in "uU":
                width = 4 if nxt == "u" else 8
                out.append(r"\x{" + pattern[i + 2 : i + 2 + width] + "}")
                i += 2 + width
            elif nxt == "N" and pattern[i + 2 : i + 3] == "{":
                end = pattern.index("}", i)
                out.append("\\x{" + format(ord(unicodedata.lookup(pattern[i + 3 : end])), "x") + "}")
                i = end + 1
            else:
                out.append(pattern[i : i + 2])
                i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            out.append(ch)
            i += 1
            # A ] right after [ or [^ is a literal.
            if pattern[i : i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i : i + 1] == "]":
                out.append("]")
                i += 1
            continue
        if verbose and ch in " \t\n\r\f\v":
            i += 1
            continue
        if verbose and ch == "#":
            end = pattern.find("\n", i)
            i = n if end == -1 else end + 1
            continue
        if ch == "{" and pattern[i + 1 : i + 2] == "," and out and re.match(r"\{,\d+\}", pattern[i:]):
            out.append("{0")
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)
