"""The play page: every step of the play's flow version, reached or not, and how it went.

What it shows of a step:

- its state (or "not reached"), attempts, timings, and whether a retry reused it;
- its args resolved against what the play has stored (the play's args and the outputs of
  the steps before it), the way the runner resolves them after a resume; credentials show
  as ``[REDACTED]`` and every value goes through ``plays.redaction.redact``. Steps not
  reached show their args as written;
- its filters, each with the two values it compared and the verdict;
- its attempts from the stored events (``play:layer:started`` per attempt, with the error
  code the previous attempt failed with), and the final error;
- its output as a bounded preview; the whole value is fetched on demand from
  ``/plays/<id>/layers/<layer id>/out`` (JSON, or the bytes of a base64 field, as a
  download) and shown by static/flowplay/play.js as a collapsible tree.

The steps of a loop body are summarised per step (counts by state, p50 and max duration)
with the loop's items paged and filterable by step and state (query parameters ``lstep``,
``lstate``, ``lpage``), so a 10,000-item loop is as long a page as a 10-item one.

The stored event history and the audit entries of the play (who triggered, held, resumed,
approved, cancelled, retried) make a collapsible timeline under the steps.

The access rule is the other pages': another company's play is a 404.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required, permission_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from flows.expr import ExpressionError, Scope
from flows.expr import render as render_args
from flows.expr.filters import explain_filters
from flows.modules.iterator import loop_end
from tenancy.audit import ACTIONS, history
from tenancy.permissions import VIEW_PLAY

from .models import (
    TERMINAL,
    Decision,
    Event,
    EventType,
    Layer,
    LayerState,
    Play,
    State,
    duration_ms,
    iso,
)
from .pages import ACTION_LABELS, ACTION_STATES, _head_cursor, _may_operate, _plays, _queue_warning, fmt_ms, pretty
from .redaction import MASK, redact, secrets_of

# The preview of an output or error on the page; the whole value is a click away.
PREVIEW_CHARS = 4_000
# A string this long that is all base64 is shown as binary (size, type, download).
BINARY_MIN_CHARS = 256
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
# Magic numbers of common files, as their base64 starts.
_SNIFF = (
    ("JVBERi", "application/pdf", "pdf"),
    ("iVBORw0KGgo", "image/png", "png"),
    ("/9j/", "image/jpeg", "jpg"),
    ("R0lGOD", "image/gif", "gif"),
    ("UEsDB", "application/zip", "zip"),
    ("H4sI", "application/gzip", "gz"),
)
# Items of a loop per page, and events on the page (the API pages through all of them).
ITEMS_PER_PAGE = 25
MAX_EVENTS = 500


# --- Values -------------------------------------------------------------------------


def binary_info(value: Any) -> dict[str, Any] | None:
    """``{"bytes", "type", "ext"}`` when ``value`` is a long base64 string, else None."""
    if not isinstance(value, str) or len(value) < BINARY_MIN_CHARS or len(value) % 4:
        return None
    if not _BASE64.match(value[:4096]) or not _BASE64.match(value[-4096:]):
        return None
    padding = len(value) - len(value.rstrip("="))
    kind, ext = "application/octet-stream", "bin"
    for prefix, mime, extension in _SNIFF:
        if value.startswith(prefix):
            kind, ext = mime, extension
            break
    return {"bytes": len(value) // 4 * 3 - padding, "type": kind, "ext": ext}


def fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def _shrink(value: Any, depth: int = 0) -> Any:
    """The value for a preview: binary strings named by size and type, long strings cut."""
    if isinstance(value, str):
        info = binary_info(value)
        if info:
            return f"<binary: {fmt_bytes(info['bytes'])}, {info['type']}>"
        return value if len(value) <= 300 else value[:300] + f"… (+{len(value) - 300} characters)"
    if depth > 6:
        return "…"
    if isinstance(value, Mapping):
        return {k: _shrink(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, list):
        head = [_shrink(v, depth + 1) for v in value[:20]]
        return head + ([f"… (+{len(value) - 20} items)"] if len(value) > 20 else [])
    return value


def binaries(value: Any, path: str = "", found: list | None = None) -> list[dict[str, Any]]:
    """The base64 fields of a value with their paths (``body``, ``files.0``), at most 10."""
    found = [] if found is None else found
    if len(found) >= 10:
        return found
    info = binary_info(value)
    if info:
        found.append({**info, "path": path, "size": fmt_bytes(info["bytes"])})
    elif isinstance(value, Mapping):
        for k, v in value.items():
            binaries(v, f"{path}.{k}" if path else str(k), found)
    elif isinstance(value, list):
        for i, v in enumerate(value[:1000]):
            binaries(v, f"{path}.{i}" if path else str(i), found)
    return found


def describe(value: Any) -> dict[str, Any]:
    """What the page shows of an output: a preview, its size, its binary fields."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    preview = json.dumps(_shrink(value), indent=2, ensure_ascii=False, default=str)
    if len(preview) > PREVIEW_CHARS:
        preview = preview[:PREVIEW_CHARS] + "\n…"
    found = binaries(value)
    return {
        "preview": preview,
        # What a tree has to lay out: binary fields are one line each.
        "tree_bytes": len(text.encode()) - sum(4 * b["bytes"] // 3 for b in found),
        "size": len(text.encode()),
        "size_text": fmt_bytes(len(text.encode())),
        "cut": preview != json.dumps(value, indent=2, ensure_ascii=False, default=str),
        "binaries": found,
        "kind": {"dict": "object", "list": "array", "str": "string", "int": "number", "float": "number",
                 "bool": "boolean"}.get(type(value).__name__, type(value).__name__),
    }


def at_path(value: Any, path: str) -> Any:
    """``value`` at a dotted path (``body``, ``items.3.name``); KeyError if it is not there."""
    for part in [p for p in path.split(".") if p]:
        if isinstance(value, Mapping):
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


class _MaskedFields(Mapping):
    """A credential's fields on a page: every one reads as [REDACTED]."""

    def __getitem__(self, key: str) -> str:
        return MASK

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _MaskedCredentials(Mapping):
    """``$credentials`` when a page resolves args: nothing is looked up, nothing recorded."""

    def __getitem__(self, name: str) -> _MaskedFields:
        return _MaskedFields()

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _resolve(args: Any, scope: Scope) -> tuple[Any, str | None]:
    try:
        rendered = render_args(args, scope)
        # As the runner masks a step's outcome: by key and form, and every credential
        # string the args carry (a header's token, a URL's password) wherever else it is.
        return redact(rendered, secrets_of(rendered)), None
    except ExpressionError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a page must render whatever the args are
        return None, f"{type(exc).__name__}: {exc}"


# --- Steps --------------------------------------------------------------------------


def _percentile(sorted_values: list[int], q: float) -> int | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def _attempts(layer: Layer, events: list[Event]) -> list[dict[str, Any]]:
    """Each attempt of a layer: when it began and ended, how long it took, how it ended."""
    starts = [e for e in events if e.type == EventType.LAYER_STARTED]
    end = next((e for e in reversed(events) if e.type in (EventType.LAYER_COMPLETED, EventType.LAYER_FAILED)), None)
    attempts: list[dict[str, Any]] = []
    for i, event in enumerate(starts):
        began = event.created_at
        following = starts[i + 1] if i + 1 < len(starts) else None
        ended = following.created_at if following else (end.created_at if end else None)
        outcome, error = "running", None
        if following is not None:
            note = following.payload.get("note") or ""
            outcome = "failed"
            error = redact(following.payload.get("previousError")) or (note.removeprefix("retry after ").strip() or None)
        elif end is not None:
            outcome = end.payload.get("state", "").lower() or "ended"
            error = redact(end.payload.get("error"))
        attempts.append({
            "n": event.payload.get("attempt") or i + 1,
            "began": began,
            "ended": ended,
            "duration_text": fmt_ms(duration_ms(began, ended)) if ended else "",
            "outcome": outcome,
            "error": error,
            "note": event.payload.get("note") or "",
        })
    return attempts


def _loops(steps: list[dict[str, Any]]) -> dict[int, int]:
    """iterator index → the index after its loop body (its aggregator's, or the end)."""
    return {s["index"]: loop_end(steps, s["index"]) for s in steps if s.get("appId") == "iterator"}


def _step_scope(play: Play, outputs: dict[str, Any]) -> Scope:
    return Scope(prev={"args": play.args, **outputs}, flow_id=play.flow_id, play_id=play.pk,
                 credentials=_MaskedCredentials())


def _summarise_loop(play: Play, iterator: dict[str, Any], body: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    ref = iterator["ref"]
    refs = [s["ref"] for s in body]
    rows = play.layers.filter(ref__in=refs, iteration__isnull=False).values_list(
        "ref", "state", "started_at", "completed_at"
    )
    per: dict[str, dict[str, Any]] = {r: {"counts": {}, "durations": []} for r in refs}
    for r, state, started, completed in rows:
        entry = per[r]
        entry["counts"][state] = entry["counts"].get(state, 0) + 1
        d = duration_ms(started, completed)
        if d is not None and completed is not None:
            entry["durations"].append(d)
    total = play.iterations.filter(ref=ref).count()
    summary = []
    for step in body:
        entry = per[step["ref"]]
        durations = sorted(entry["durations"])
        reached = sum(entry["counts"].values())
        summary.append({
            "step": step,
            "counts": [(s, entry["counts"][s]) for s in LayerState.values if entry["counts"].get(s)],
            "reached": reached,
            "not_reached": max(0, total - reached),
            "p50": fmt_ms(_percentile(durations, 0.5)),
            "max": fmt_ms(durations[-1]) if durations else "",
        })

    # The items: paged, and filtered to those whose step `lstep` is in state `lstate`.
    mine = query.get("loop") in (None, "", ref)
    lstep = query.get("lstep", "") if mine else ""
    lstate = query.get("lstate", "").upper() if mine else ""
    try:
        lpage = max(0, int(query.get("lpage", "0"))) if mine else 0
    except ValueError:
        lpage = 0
    iterations = play.iterations.filter(ref=ref)
    if lstate in LayerState.values or lstate == "UNREACHED":
        layers = play.layers.filter(iteration__isnull=False, ref__in=[lstep] if lstep in refs else refs)
        if lstate == "UNREACHED":
            if lstep in refs:
                iterations = iterations.exclude(index__in=layers.values("iteration"))
        else:
            iterations = iterations.filter(index__in=layers.filter(state=lstate).values("iteration"))
    matching = iterations.count()
    pages = max(1, (matching + ITEMS_PER_PAGE - 1) // ITEMS_PER_PAGE)
    lpage = min(lpage, pages - 1)
    page_items = list(iterations.order_by("index")[lpage * ITEMS_PER_PAGE : (lpage + 1) * ITEMS_PER_PAGE])
    indexes = [it.index for it in page_items]
    by_item: dict[int, dict[str, Layer]] = {}
    for layer in play.layers.filter(iteration__in=indexes, ref__in=refs).order_by("iteration", "index"):
        by_item.setdefault(layer.iteration, {})[layer.ref] = layer
    items = []
    for it in page_items:
        cells = []
        for step in body:
            layer = by_item.get(it.index, {}).get(step["ref"])
            if layer is not None:
                layer.duration_text = fmt_ms(layer.duration)
                layer.error_text = _error_text(layer.error)
                layer.has_out = layer.out is not None
            cells.append({"step": step, "layer": layer})
        item_text = json.dumps(redact(it.item), ensure_ascii=False, default=str)
        items.append({
            "index": it.index,
            "state": it.state,
            "item": item_text if len(item_text) <= 120 else item_text[:119] + "…",
            "cells": cells,
        })

    def url(**changes: Any) -> str:
        params = {"loop": ref, "lstep": lstep, "lstate": lstate, "lpage": str(lpage), **changes}
        return "?" + urlencode({k: v for k, v in params.items() if v not in ("", None, "0")}) + f"#loop-{ref}"

    return {
        "iterator": iterator,
        "body": body,
        "total": total,
        "summary": summary,
        "items": items,
        "matching": matching,
        "lstep": lstep,
        "lstate": lstate,
        "lpage": lpage,
        "pages": pages,
        "first": lpage * ITEMS_PER_PAGE + 1 if items else 0,
        "last": lpage * ITEMS_PER_PAGE + len(items),
        "prev_url": url(lpage=str(lpage - 1)) if lpage > 0 else None,
        "next_url": url(lpage=str(lpage + 1)) if lpage + 1 < pages else None,
        "states": list(LayerState.values) + ["UNREACHED"],
        "signature": f"{total}:{len(rows)}:" + ",".join(f"{s['step']['ref']}={s['counts']}" for s in summary),
    }


def _error_text(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, Mapping):
        text = f"{error.get('code', 'ERROR')}: {error.get('message', '')}"
    else:
        text = str(error)
    text = str(redact(text))
    return text if len(text) <= 300 else text[:299] + "…"


def build_steps(play: Play, query: Any) -> list[dict[str, Any]]:
    """The steps of the play's flow version in order, each with what the play did of it."""
    steps: list[dict[str, Any]] = list((play.definition or {}).get("layers", []))
    layers = {layer.ref: layer for layer in play.layers.filter(iteration__isnull=True).select_related("reused_from")}
    events_by_layer: dict[str, list[Event]] = {}
    layer_ids = {layer.pk for layer in layers.values()}
    if layer_ids:
        # Only the top-level layers' events: a 10,000-item loop's are not read here.
        for event in Event.objects.filter(play=play, payload__layerId__in=list(layer_ids), type__in=[
            EventType.LAYER_STARTED, EventType.LAYER_COMPLETED, EventType.LAYER_FAILED
        ]).order_by("seq"):
            layer_id = event.payload.get("layerId")
            if layer_id in layer_ids:
                events_by_layer.setdefault(layer_id, []).append(event)
    loops = _loops(steps)
    in_body: dict[int, int] = {}
    for start, end in loops.items():
        for index in range(start + 1, end):
            in_body.setdefault(index, start)
    outputs: dict[str, Any] = {}
    cards: list[dict[str, Any]] = []
    for step in steps:
        index = step["index"]
        if index in in_body:
            continue  # summarised with its loop
        layer = layers.get(step["ref"])
        card: dict[str, Any] = {"step": step, "layer": layer, "number": index + 1, "kind": "step"}
        scope = _step_scope(play, outputs)
        if layer is not None:
            card["args"], card["args_error"] = _resolve(step.get("args") or {}, scope)
            card["args_resolved"] = True
            if step.get("filters"):
                card["filters"] = [
                    {**f, "left": redact(f.get("left")), "right": redact(f.get("right"))}
                    for f in explain_filters(step["filters"], scope)
                ]
            card["attempts"] = _attempts(layer, events_by_layer.get(layer.pk, []))
            card["duration_text"] = fmt_ms(layer.duration)
            card["out"] = describe(redact(layer.out)) if layer.out is not None else None
            card["error"] = redact(layer.error) if layer.error is not None else None
            card["error_json"] = pretty(layer.error) if layer.error is not None else None
            card["waiting"] = layer.state == LayerState.WAIT
        else:
            card["args"], card["args_error"] = redact(step.get("args") or {}), None
            card["args_resolved"] = False
            if step.get("filters"):
                card["filters_written"] = redact(step["filters"])
        card["args_json"] = json.dumps(card["args"], indent=2, ensure_ascii=False, default=str) if card["args"] is not None else ""
        if len(card["args_json"]) > PREVIEW_CHARS:
            card["args_json"] = card["args_json"][:PREVIEW_CHARS] + "\n… (the API returns the whole value)"
        if index in loops:
            body = [s for s in steps if index < s["index"] < loops[index]]
            card["loop"] = _summarise_loop(play, step, body, query)
        card["signature"] = (
            f"{layer.state}:{layer.attempts}:{iso(layer.completed_at)}:{card.get('loop', {}).get('signature', '')}"
            if layer is not None
            else "unreached"
        )
        cards.append(card)
        if layer is not None:
            outputs[step["ref"]] = layer.out if layer.state == LayerState.DONE else None
    return cards


def build_history(play: Play) -> dict[str, Any]:
    """The play's stored events and audit entries, in time order, for the timeline."""
    events = list(Event.objects.filter(play=play).order_by("seq")[: MAX_EVENTS + 1])
    more = len(events) > MAX_EVENTS
    events = events[:MAX_EVENTS]
    entries: list[dict[str, Any]] = []
    for event in events:
        p = event.payload
        what = {
            EventType.PLAY_STARTED: "Play started",
            EventType.PLAY_COMPLETED: f"Play ended {p.get('state', 'DONE')}",
            EventType.PLAY_FAILED: "Play failed",
            EventType.PLAY_WAITING: f"Step {p.get('ref', '')} waits for an approval",
            EventType.PLAY_STATE: f"Play {p.get('previousState', '?')} → {p.get('state', '?')}",
        }.get(event.type)
        if what is None:
            item = f"[{p['iteration']}]" if p.get("iteration") is not None else ""
            if event.type == EventType.LAYER_STARTED:
                attempt = p.get("attempt") or 1
                what = f"Step {p.get('ref', '')}{item} started" + (f" (attempt {attempt})" if attempt > 1 else "")
            else:
                what = f"Step {p.get('ref', '')}{item} {p.get('state', '')}"
        error = p.get("error")
        entries.append({
            "at": event.created_at,
            "kind": "event",
            "type": event.type,
            "seq": event.seq,
            "what": what,
            "detail": _error_text(error) if error else (p.get("note") or ""),
            "error": bool(error),
            "by": "",
        })
    for entry in history(play).order_by("created_at")[:200]:
        entries.append({
            "at": entry.created_at,
            "kind": "audit",
            "type": entry.action,
            "seq": None,
            "what": ACTIONS.get(entry.action, entry.action),
            "detail": ", ".join(f"{k}={v}" for k, v in (entry.details or {}).items() if k != "source"),
            "error": False,
            "by": entry.actor_name or "system",
        })
    entries.sort(key=lambda e: (e["at"], 0 if e["kind"] == "audit" else 1, e["seq"] or 0))
    return {"entries": entries, "more": more, "count": len(events)}


# --- Views ----------------------------------------------------------------------------


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def play_detail(request: HttpRequest, play_id: str) -> HttpResponse:
    since = _head_cursor(request.user.company_id)
    play = get_object_or_404(
        _plays(request).select_related("flow", "flow_version", "parent", "retry_of", "triggered_by"), pk=play_id
    )
    now = timezone.now()
    pending = play.pending_approval() if play.state == State.WAIT else None
    may = _may_operate(request.user)
    actions = [
        {"verb": verb, "label": ACTION_LABELS[verb], "states": " ".join(sorted(states))}
        for verb, states in ACTION_STATES.items()
        if may and play.state in states
    ]
    cards = build_steps(play, request.GET)
    reached = sum(1 for c in cards if c["layer"] is not None)
    flow_filters = None
    definition = play.definition or {}
    if definition.get("filters") and play.started_at is None or (play.state == State.SKIP and definition.get("filters")):
        scope = Scope(prev={"args": play.args}, flow_id=play.flow_id, play_id=play.pk, credentials=_MaskedCredentials())
        flow_filters = [
            {**f, "left": redact(f.get("left")), "right": redact(f.get("right"))}
            for f in explain_filters(definition["filters"], scope)
        ]
    context = {
        "play": play,
        "play_duration_text": fmt_ms(play.duration),
        "flow": play.flow,
        "cards": cards,
        "reached": reached,
        "history": build_history(play),
        "approvals": list(play.approvals.select_related("layer", "decided_by").order_by("decided_at")),
        "pending": pending if may else None,
        "decisions": Decision,
        "actions": actions,
        "children": list(play.children.order_by("created_at", "id")[:100]),
        "retries": list(play.retries.order_by("created_at", "id")),
        "reused": play.layers.filter(reused_from__isnull=False).count() if play.retry_of_id else 0,
        "args_json": pretty(play.args),
        "error_json": pretty(play.error) if play.error else None,
        "flow_filters": flow_filters,
        "is_terminal": play.state in TERMINAL,
        "queue_warning": _queue_warning(play),
        "live": {
            "playId": play.pk,
            "since": since,
            "state": play.state,
            "startedAt": iso(play.started_at),
            "completedAt": iso(play.completed_at),
            "createdAt": iso(play.created_at),
            "serverNow": iso(now),
        },
    }
    return render(request, "flowplay/play_detail.html", context)


@login_required
@permission_required(VIEW_PLAY, raise_exception=True)
def layer_out(request: HttpRequest, play_id: str, layer_id: str) -> HttpResponse:
    """The whole output of a layer (redacted), or one field of it.

    ``?path=body`` picks a field; ``&raw=1`` answers a base64 field with its bytes (the
    type sniffed from them); ``&download=1`` makes it an attachment.
    """
    play = get_object_or_404(_plays(request), pk=play_id)
    layer = get_object_or_404(Layer.objects.filter(play=play), pk=layer_id)
    value = redact(layer.out)
    path = request.GET.get("path", "")
    try:
        value = at_path(value, path)
    except KeyError:
        raise Http404("No such field") from None
    name = f"{play.pk}-{layer.ref}" + (f"-{layer.iteration}" if layer.iteration is not None else "")
    name += f"-{path}" if path else ""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if request.GET.get("raw"):
        info = binary_info(value)
        if info is None:
            raise Http404("Not a base64 field")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise Http404("Not a base64 field") from None
        response = HttpResponse(data, content_type=info["type"])
        response["Content-Disposition"] = f'attachment; filename="{name}.{info["ext"]}"'
    else:
        response = JsonResponse(value, safe=False, json_dumps_params={"ensure_ascii": False, "indent": 2})
        if request.GET.get("download"):
            response["Content-Disposition"] = f'attachment; filename="{name}.json"'
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response
