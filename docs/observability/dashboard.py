"""The Grafana dashboard (grafana-dashboard.json) and its rendering from a real Prometheus.

    python docs/observability/dashboard.py json > docs/observability/grafana-dashboard.json
    python docs/observability/dashboard.py render http://127.0.0.1:9090 docs/screenshots/observability-dashboard.png

The panels are defined once here; ``render`` asks Prometheus (``/api/v1/query_range``) for
each panel's expressions over the last minutes and draws them with matplotlib
(``pip install matplotlib``), the way Grafana would from the same queries.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

RATE = "$__rate_interval"

# (title, unit, [(expression, legend)], kind)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Plays finished per minute, by state",
        "short",
        [(f"sum by (state) (rate(flowplay_plays_finished_total[{RATE}])) * 60", "{{state}}")],
        "timeseries",
    ),
    (
        "Plays started per minute, by flow",
        "short",
        [(f"sum by (flow) (rate(flowplay_plays_started_total[{RATE}])) * 60", "{{flow}}")],
        "timeseries",
    ),
    (
        "Failure ratio by flow",
        "percentunit",
        [
            (
                f'sum by (flow) (rate(flowplay_plays_finished_total{{state="FAIL"}}[{RATE}])) / '
                f"sum by (flow) (rate(flowplay_plays_finished_total[{RATE}]))",
                "{{flow}}",
            )
        ],
        "timeseries",
    ),
    (
        "Step duration p95, by module",
        "s",
        [
            (
                f"histogram_quantile(0.95, sum by (le, module) (rate(flowplay_step_duration_seconds_bucket[{RATE}])))",
                "{{module}}",
            )
        ],
        "timeseries",
    ),
    (
        "Trigger → first step (p50, p95)",
        "s",
        [
            (f"histogram_quantile(0.5, sum by (le) (rate(flowplay_play_start_latency_seconds_bucket[{RATE}])))", "p50"),
            (
                f"histogram_quantile(0.95, sum by (le) (rate(flowplay_play_start_latency_seconds_bucket[{RATE}])))",
                "p95",
            ),
        ],
        "timeseries",
    ),
    (
        "Queue depth (plays waiting for a worker)",
        "short",
        [("sum by (queue) (flowplay_queue_depth)", "{{queue}}")],
        "timeseries",
    ),
    (
        "Oldest waiting play, by queue",
        "s",
        [("max by (queue) (flowplay_queue_oldest_waiting_seconds)", "{{queue}}")],
        "timeseries",
    ),
    ("Live workers per queue", "short", [("sum by (queue) (flowplay_queue_workers)", "{{queue}}")], "timeseries"),
    (
        "Deferred backlog and release lag",
        "short",
        [
            ("sum by (kind) (flowplay_deferred_plays)", "{{kind}}"),
            ("flowplay_deferred_release_lag_seconds", "release lag (s)"),
        ],
        "timeseries",
    ),
    (
        "Waiting for approval / on hold",
        "short",
        [("flowplay_plays_waiting_approval", "waiting approval"), ("flowplay_plays_on_hold", "on hold")],
        "timeseries",
    ),
    (
        "Reaper requeues per minute",
        "short",
        [(f"sum by (reason) (rate(flowplay_reaper_requeues_total[{RATE}])) * 60", "{{reason}}")],
        "timeseries",
    ),
    (
        "WebSocket connections and event lag p99",
        "short",
        [
            ("sum(flowplay_ws_connections)", "connections"),
            (
                f"histogram_quantile(0.99, sum by (le) (rate(flowplay_ws_event_delivery_seconds_bucket[{RATE}])))",
                "event lag p99 (s)",
            ),
        ],
        "timeseries",
    ),
    (
        "HTTP latency p95, by route",
        "s",
        [
            (
                f"histogram_quantile(0.95, sum by (le, route) (rate(flowplay_http_request_duration_seconds_bucket[{RATE}])))",
                "{{route}}",
            )
        ],
        "timeseries",
    ),
]


def grafana() -> dict[str, Any]:
    panels = []
    for i, (title, unit, targets, kind) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": kind,
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {
                    "h": 8,
                    "w": 12 if i < 12 else 24,
                    "x": 0 if i % 2 == 0 or i >= 12 else 12,
                    "y": (i // 2) * 8,
                },
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [
                    {
                        "refId": chr(65 + n),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    }
                    for n, (expr, legend) in enumerate(targets)
                ],
            }
        )
    return {
        "title": "flowplay",
        "uid": "flowplay-overview",
        "tags": ["flowplay"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render(prometheus: str, out: str, minutes: float = 10.0, step: float = 5.0) -> None:
    import httpx
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - minutes * 60
    fig, axes = plt.subplots(7, 2, figsize=(16, 26))
    for ax, (title, unit, targets, _) in zip(axes.flat, PANELS, strict=False):
        for expr, legend in targets:
            query = expr.replace(RATE, "1m")
            r = httpx.get(
                f"{prometheus}/api/v1/query_range",
                params={"query": query, "start": start, "end": end, "step": step},
                timeout=30,
            )
            r.raise_for_status()
            for series in r.json()["data"]["result"]:
                xs = [(float(t) - end) / 60 for t, _ in series["values"]]
                ys = [float(v) if v not in ("NaN", "+Inf", "-Inf") else float("nan") for _, v in series["values"]]
                label = legend
                for key, val in series["metric"].items():
                    label = label.replace("{{" + key + "}}", val)
                ax.plot(xs, ys, label=label[:40])
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_xlabel("minutes ago")
        ax.set_ylabel({"s": "seconds", "percentunit": "ratio", "short": ""}[unit])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(
        f"flowplay — from Prometheus at {prometheus}, last {minutes:g} min "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))})",
        fontsize=14,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    if sys.argv[1:2] == ["json"]:
        print(json.dumps(grafana(), indent=2))
    elif sys.argv[1:2] == ["render"]:
        render(sys.argv[2], sys.argv[3], *(float(a) for a in sys.argv[4:5]))
    else:
        print(__doc__)
