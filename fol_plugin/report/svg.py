"""Line charts as inline SVG: the report's precision-recall and adaptive re-ranking curves,
drawn without a plotting library or any file beside the page."""
from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, PLOT_HEIGHT = 380, 190
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 46, 12, 24, 38
LEGEND_LINE = 15  # pixels per series in the legend, under the plot
MAX_POINTS = 400  # per series; longer ones are sampled evenly (first and last kept)
TICKS = 5


@dataclass
class Series:
    """One line: points (xs[i], ys[i]), a legend label and a CSS colour."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: str
    dashed: bool = False


def _sampled(values: Sequence[float]) -> list[float]:
    if len(values) <= MAX_POINTS:
        return list(values)
    step = (len(values) - 1) / (MAX_POINTS - 1)
    return [values[round(i * step)] for i in range(MAX_POINTS)]


def _number(value: float) -> str:
    return f"{value:.3g}"


def line_chart(
    title: str,
    series: list[Series],
    x_label: str,
    y_label: str,
    x_range: tuple[float, float] = (0.0, 1.0),
    y_range: tuple[float, float] = (0.0, 1.0),
) -> str:
    """An ``<svg>`` of ``series`` in the box ``x_range`` x ``y_range``, with ticks and a legend."""
    plot_width, plot_height = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, PLOT_HEIGHT
    bottom = MARGIN_TOP + plot_height
    height = bottom + MARGIN_BOTTOM + LEGEND_LINE * len(series)
    (x0, x1), (y0, y1) = x_range, y_range

    def x_pixel(x: float) -> float:
        return MARGIN_LEFT + (x - x0) / ((x1 - x0) or 1) * plot_width

    def y_pixel(y: float) -> float:
        return MARGIN_TOP + (1 - (y - y0) / ((y1 - y0) or 1)) * plot_height

    parts = [
        f'<svg class="chart" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{WIDTH / 2}" y="15" text-anchor="middle" class="ct">{html.escape(title)}</text>',
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_width}" height="{plot_height}" class="cf"/>',
    ]
    for i in range(TICKS):
        x, y = x0 + (x1 - x0) * i / (TICKS - 1), y0 + (y1 - y0) * i / (TICKS - 1)
        parts.append(f'<text x="{x_pixel(x):.1f}" y="{bottom + 13}" text-anchor="middle">{_number(x)}</text>')
        parts.append(f'<text x="{MARGIN_LEFT - 4}" y="{y_pixel(y) + 3:.1f}" text-anchor="end">{_number(y)}</text>')
    parts.append(f'<text x="{MARGIN_LEFT + plot_width / 2}" y="{bottom + 28}" text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(11 {MARGIN_TOP + plot_height / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_label)}</text>"
    )
    for index, line in enumerate(series):
        points = " ".join(f"{x_pixel(x):.1f},{y_pixel(y):.1f}" for x, y in zip(_sampled(line.xs), _sampled(line.ys)))
        dash = ' stroke-dasharray="4 3"' if line.dashed else ""
        parts.append(f'<polyline points="{points}" fill="none" stroke="{line.colour}" stroke-width="1.8"{dash}/>')
        legend_y = bottom + MARGIN_BOTTOM + 10 + LEGEND_LINE * index
        parts.append(
            f'<line x1="{MARGIN_LEFT + 8}" y1="{legend_y - 4}" x2="{MARGIN_LEFT + 24}" y2="{legend_y - 4}" '
            f'stroke="{line.colour}" stroke-width="2"{dash}/>'
            f'<text x="{MARGIN_LEFT + 28}" y="{legend_y}">{html.escape(line.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
