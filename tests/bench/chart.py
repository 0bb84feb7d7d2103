"""An SVG chart of a saved benchmark run: seconds per image and memory, one row per case.

``scripts/bench --chart run.json docs/performance.svg`` draws it; docs/performance.md leads with
it. Plain SVG written here (no plotting library to install): two panels of horizontal bars,
the median seconds per image with its best run marked, and the peak memory beside it.
"""

from __future__ import annotations

import html
from typing import Any

ROW_HEIGHT = 34
LABEL_WIDTH = 330
PANEL_WIDTH = 300
GAP = 40
TOP = 70
BAR_COLOUR = "#3b6ea8"
MEMORY_COLOUR = "#c07a2c"
BEST_COLOUR = "#1c2f45"


def _peak_gib(row: dict[str, Any]) -> float | None:
    """The generating process's peak resident memory (the table's "peak GiB")."""
    peak = (row.get("memory") or {}).get("peak_gib")
    return None if peak is None else float(peak)


def _scale(values: list[float]) -> float:
    """Return a round axis maximum above every value."""
    top = max(values, default=1.0)
    for step in (1, 2, 5, 10, 20, 50, 100, 200):
        if top <= step:
            return float(step)
    return top


def _text(x: float, y: float, content: str, **attributes: str) -> str:
    extra = "".join(f' {name.replace("_", "-")}="{value}"' for name, value in attributes.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{html.escape(content)}</text>'


def draw(report: dict[str, Any]) -> str:
    """Return the SVG of a run saved by ``scripts/bench --json``."""
    rows = report["cases"]
    seconds_axis = _scale([row["latency_median_s"] for row in rows])
    memory_axis = _scale([peak for row in rows if (peak := _peak_gib(row)) is not None])
    width = LABEL_WIDTH + 2 * PANEL_WIDTH + 2 * GAP + 20
    height = TOP + ROW_HEIGHT * len(rows) + 50
    left = LABEL_WIDTH
    right = LABEL_WIDTH + PANEL_WIDTH + GAP
    header = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">'
    )
    parts = [
        header,
        f'<rect width="{width}" height="{height}" fill="white"/>',
        _text(
            10, 22, "edgeai-agent: one 512x512 image, SDXL-Turbo's architecture", font_weight="bold"
        ),
        _text(10, 40, html.unescape(report.get("machine", ""))[:110], fill="#555", font_size="11"),
        _text(left, TOP - 12, "seconds per image (median; | best)"),
        _text(right, TOP - 12, "peak memory, GiB"),
    ]
    for index, row in enumerate(rows):
        y = TOP + index * ROW_HEIGHT
        label = f"({row['case']}) {row['title']}"
        if len(label) > 48:
            label = label[:47] + "…"
        parts.append(_text(10, y + 20, label))
        median = row["latency_median_s"]
        bar = PANEL_WIDTH * median / seconds_axis
        parts.append(
            f'<rect x="{left}" y="{y + 6}" width="{bar:.1f}" height="20" fill="{BAR_COLOUR}"/>'
        )
        best = left + PANEL_WIDTH * row["latency_min_s"] / seconds_axis
        parts.append(
            f'<line x1="{best:.1f}" y1="{y + 3}" x2="{best:.1f}" y2="{y + 29}" '
            f'stroke="{BEST_COLOUR}" stroke-width="2"/>'
        )
        parts.append(_text(left + bar + 6, y + 20, f"{median:.2f} s"))
        peak = _peak_gib(row)
        if peak is not None:
            span = PANEL_WIDTH * peak / memory_axis
            parts.append(
                f'<rect x="{right}" y="{y + 6}" width="{span:.1f}" height="20" '
                f'fill="{MEMORY_COLOUR}"/>'
            )
            parts.append(_text(right + span + 6, y + 20, f"{peak:.1f}"))
    axis_y = TOP + ROW_HEIGHT * len(rows) + 14
    for origin, axis, unit in ((left, seconds_axis, "s"), (right, memory_axis, "GiB")):
        parts.append(
            f'<line x1="{origin}" y1="{axis_y - 8}" x2="{origin + PANEL_WIDTH}" '
            f'y2="{axis_y - 8}" stroke="#999"/>'
        )
        parts.extend(
            _text(
                origin + PANEL_WIDTH * fraction,
                axis_y + 8,
                f"{axis * fraction:g} {unit}",
                fill="#555",
                font_size="11",
                text_anchor="middle",
            )
            for fraction in (0.0, 0.5, 1.0)
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
