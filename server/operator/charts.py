"""Line charts as inline SVG, drawn on the server: no JavaScript, no CDN, printable, testable.

A chart is a few polylines over nice round axis ticks. A missing value (None) breaks its line
instead of being drawn as zero; each point carries a ``<title>`` tooltip while there are few enough.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
DASHES = ("", "7 4", "2 3")  # lines that coincide stay distinguishable, and not by colour alone
MAX_MARKED_POINTS = 60  # above this, points get no marker or tooltip: the line says enough
LEGEND_CHAR_WIDTH = 6.5  # about, at the legend's 11 px: only spacing depends on it


@dataclass(frozen=True, slots=True)
class Series:
    """One line: ``points`` are (x, y) pairs, y None where the value is missing."""

    label: str
    points: Sequence[tuple[float, float | None]]


@dataclass(frozen=True, slots=True)
class Frame:
    """Where the plot area sits in the SVG, and the data ranges it maps."""

    width: int
    height: int
    left: int = 64
    right: int = 16
    top: int = 50
    bottom: int = 38
    x_range: tuple[float, float] = (0.0, 1.0)
    y_range: tuple[float, float] = (0.0, 1.0)

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / (high - low) * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.height - self.bottom - (value - low) / (high - low) * (self.height - self.top - self.bottom)


def line_chart(
    name: str,
    title: str,
    series: Sequence[Series],
    *,
    y_format: Callable[[float], str] | None = None,
    y_from_zero: bool = False,
    y_integer: bool = False,
    x_label: str = "round",
    width: int = 560,
    height: int = 240,
) -> Markup:
    """An ``<svg class="chart" data-chart=name>`` with one polyline per series and a legend.

    ``y_from_zero`` starts the y axis at 0 (counts, sizes); ``y_integer`` keeps its ticks whole.
    """
    values = [y for s in series for _, y in s.points if y is not None and math.isfinite(y)]
    xs = [x for s in series for x, _ in s.points]
    parts = [_open_svg(name, title, width, height), _text(8, 18, title, "chart-title")]
    if not values:
        parts.append(_text(width / 2, height / 2, "no data yet", "chart-empty", anchor="middle"))
        return Markup("".join(parts) + "</svg>")
    x_ticks = nice_ticks(min(xs), max(xs), integer=True)
    y_ticks = nice_ticks(min([*values, 0.0]) if y_from_zero else min(values), max(values), integer=y_integer)
    frame = Frame(width, height, x_range=(x_ticks[0], x_ticks[-1]), y_range=(y_ticks[0], y_ticks[-1]))
    parts += _axes(frame, x_ticks, y_ticks, y_format or tick_formatter(y_ticks), x_label)
    for index, one in enumerate(series):
        parts += _series(frame, one, index, y_format)
    parts += _legend(series)
    return Markup("".join(parts) + "</svg>")


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` evenly spaced round numbers (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if high == low:
        low, high = (low - 1, high + 1) if integer or low == 0 else (low - abs(low) * 0.1, high + abs(high) * 0.1)
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    if integer:
        step = max(1.0, math.ceil(step))
    start = math.floor(low / step) * step
    ticks = [start]
    while ticks[-1] < high - step * 1e-9:
        ticks.append(start + len(ticks) * step)
    return ticks


def tick_formatter(ticks: Sequence[float]) -> Callable[[float], str]:
    """Enough decimals to tell neighbouring ticks apart, and no more."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return lambda value: f"{value:.{decimals}f}"


def _open_svg(name: str, title: str, width: int, height: int) -> str:
    return (
        f'<svg class="chart" data-chart="{escape(name)}" role="img" aria-label="{escape(title)}"'
        f' xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
    )


def _axes(
    frame: Frame, x_ticks: list[float], y_ticks: list[float], y_format: Callable[[float], str], x_label: str
) -> list[str]:
    left, right = frame.left, frame.width - frame.right
    bottom = frame.height - frame.bottom
    parts = []
    for tick in y_ticks:
        y = frame.y(tick)
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        parts.append(_text(left - 6, y + 4, y_format(tick), "tick", anchor="end"))
    for tick in x_ticks:
        x = frame.x(tick)
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}"/>')
        parts.append(_text(x, bottom + 16, f"{tick:g}", "tick", anchor="middle"))
    parts.append(f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>')
    parts.append(_text((left + right) / 2, frame.height - 4, x_label, "axis-label", anchor="middle"))
    return parts


def _series(frame: Frame, series: Series, index: int, y_format: Callable[[float], str] | None) -> list[str]:
    colour, dash = _colour(index), DASHES[index % len(DASHES)]
    style = f'fill="none" stroke="{colour}"' + (f' stroke-dasharray="{dash}"' if dash else "")
    parts = []
    for run in _unbroken_runs(series.points):
        coordinates = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in run)
        parts.append(f'<polyline class="line" {style} points="{coordinates}"/>')
    present = [(x, y) for x, y in series.points if y is not None and math.isfinite(y)]
    if len(present) <= MAX_MARKED_POINTS:
        label = y_format or (lambda value: f"{value:.4g}")
        for x, y in present:
            tooltip = escape(f"{series.label}, {x:g}: {label(y)}")
            centre = f'cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}"'
            parts.append(f'<circle {centre} r="3" fill="{colour}"><title>{tooltip}</title></circle>')
    return parts


def _unbroken_runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """The points split where a value is missing; single points are kept (drawn as markers)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y):
            runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if len(run) > 1]


def _legend(series: Sequence[Series], x: float = 8, y: float = 36) -> list[str]:
    """Swatches and labels in a row under the title, each swatch right before its label."""
    parts = []
    for index, one in enumerate(series):
        swatch = f'x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{_colour(index)}"'
        parts.append(f'<rect class="swatch" {swatch}/>')
        parts.append(_text(x + 14, y, one.label, "legend"))
        x += 14 + LEGEND_CHAR_WIDTH * len(one.label) + 16
    return parts


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _text(x: float, y: float, content: str, css_class: str, anchor: str = "start") -> str:
    return f'<text class="{css_class}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{escape(content)}</text>'
