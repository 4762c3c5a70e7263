"""Charts as inline SVG text (no plotting library, no script): line charts, a scatter, a ROC
and histograms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = ["PALETTE", "histogram_chart", "line_chart", "nice_ticks", "roc_chart", "scatter"]

#: Colours of classes and series (Tableau 20, dark then light).
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip

_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 14, 26, 36  # margins around the plot area


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^n)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    width: int = 560,
    height: int = 230,
    markers: bool = False,
) -> str:
    """An SVG line chart of ``series`` = [(name, xs, ys)] (one colour each, legend when there
    are several); the y axis spans the data (with a margin), within ``y_range`` when given;
    ``markers`` draws each point with a hover title (a series of one point always gets it)."""
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy if math.isfinite(y)]
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{_LEFT}" y="16" class="chart-title">{escape(title)}</text>',
    ]
    if not xs or not ys:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return "".join(parts) + "</svg>"
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = 0.08 * (y1 - y0) or 0.05 * (abs(y0) or 1)
    y0, y1 = y0 - pad, y1 + pad
    if y_range is not None:  # a bound the values cannot pass (e.g. 0..1 for a recall)
        y0, y1 = max(y0, y_range[0]), min(y1, y_range[1])
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return _TOP + (1 - (y - y0) / (y1 - y0)) * ph

    for t in nice_ticks(y0, y1):
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'class="grid"/><text x="{_LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
            f"{_fmt(t)}</text>"
        )
    for t in nice_ticks(x0, x1):
        parts.append(
            f'<text x="{px(t):.1f}" y="{_TOP + ph + 16}" text-anchor="middle">{_fmt(t)}</text>'
        )
    parts.append(
        f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" class="frame"/>'
        f'<text x="{_LEFT + pw / 2}" y="{height - 4}" text-anchor="middle">{escape(x_label)}'
        f'</text><text transform="translate(13 {_TOP + ph / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for n, (name, sx, sy) in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        points = [(px(x), py(y)) for x, y in zip(sx, sy) if math.isfinite(y)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if markers or len(points) == 1:  # a lone point draws no line: show it as a dot
            for (a, b), x, y in zip(points, sx, sy):
                parts.append(
                    f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{colour}"><title>'
                    f"{escape(name)}: iteration {x:g}, {y:.4f}</title></circle>"
                )
        if len(series) > 1:
            ly = _TOP + 14 + 16 * n
            parts.append(
                f'<line x1="{_LEFT + pw - 110}" x2="{_LEFT + pw - 92}" y1="{ly - 4}" '
                f'y2="{ly - 4}" stroke="{colour}" stroke-width="3"/><text '
                f'x="{_LEFT + pw - 86}" y="{ly}">{escape(name)}</text>'
            )
    return "".join(parts) + "</svg>"


def scatter(
    points: Sequence[tuple[float, float]],
    colours: Sequence[int],
    keys: Sequence[str],
    labels: Sequence[str],
    *,
    axis_name: str,
    width: int = 560,
    height: int = 430,
) -> str:
    """An SVG scatter of ``points`` (M,) coloured by ``colours`` (M,) (indices into
    :data:`PALETTE`, cycling); each circle carries its thumbnail key (``data-t``) and label
    (``data-label``) for the page's hover tooltip."""
    pad = 12
    parts = [
        f'<svg class="map" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="2-D map of the embeddings">'
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" class="frame"/>'
        f'<text x="{width - 8}" y="{height - 8}" text-anchor="end" class="axis">'
        f"{escape(axis_name)} 1 &#8594;</text>"
        f'<text transform="translate(16 {height - 8}) rotate(-90)" class="axis">'
        f"{escape(axis_name)} 2 &#8594;</text>"
    ]
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = (width - 2 * pad - 20) / ((x1 - x0) or 1)
        sy = (height - 2 * pad - 20) / ((y1 - y0) or 1)
        for (x, y), colour, key, label in zip(points, colours, keys, labels):
            cx = pad + 20 + (x - x0) * sx
            cy = height - pad - 20 - (y - y0) * sy
            parts.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{PALETTE[colour % len(PALETTE)]}"'
                f' data-t="{escape(key)}" data-label="{escape(label)}"/>'
            )
    return "".join(parts) + "</svg>"


def _frame(title: str, width: int, height: int, css: str = "chart") -> list[str]:
    """The opening of a chart: the <svg> element and its title."""
    return [
        f'<svg class="{css}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{_LEFT}" y="16" class="chart-title">{escape(title)}</text>',
    ]


def _axis_labels(x_label: str, y_label: str, width: int, height: int) -> str:
    """The plot area's frame and the two axis names."""
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    return (
        f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" class="frame"/>'
        f'<text x="{_LEFT + pw / 2}" y="{height - 4}" text-anchor="middle">{escape(x_label)}'
        f'</text><text transform="translate(13 {_TOP + ph / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )


def roc_chart(
    far: Sequence[float],
    tar: Sequence[float],
    marks: Sequence[tuple[float, float, str]],
    *,
    far_min: float,
    title: str,
    width: int = 560,
    height: int = 300,
) -> str:
    """An SVG ROC: TAR (0..1) against FAR on a log axis from ``far_min`` (a power of ten) to 1;
    the curve through the points ``far``, ``tar`` (P,) (FAR >= far_min), the chance line
    TAR = FAR dashed, each mark = (far, tar, label) a dot labelled with its TAR."""
    parts = _frame(title, width, height, "chart roc")
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    lo = math.log10(far_min)

    def px(f: float) -> float:
        return _LEFT + (math.log10(max(f, far_min)) - lo) / -lo * pw

    def py(t: float) -> float:
        return _TOP + (1 - t) * ph

    for t in nice_ticks(0.0, 1.0):
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'class="grid"/><text x="{_LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
            f"{_fmt(t)}</text>"
        )
    for power in range(round(lo), 1):
        x = px(10.0**power)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + ph}" class="grid"/>'
            f'<text x="{x:.1f}" y="{_TOP + ph + 16}" text-anchor="middle">'
            f"{'1' if power == 0 else f'1e{power}'}</text>"
        )
    parts.append(_axis_labels("FAR (false accept rate, log scale)", "TAR", width, height))
    chance = [10 ** (lo + i * -lo / 60) for i in range(61)]
    path = " ".join(f"{px(f):.1f},{py(f):.1f}" for f in chance)
    parts.append(f'<polyline points="{path}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    path = " ".join(f"{px(f):.1f},{py(t):.1f}" for f, t in zip(far, tar))
    parts.append(
        f'<polyline class="roc-curve" points="{path}" fill="none" stroke="{PALETTE[0]}" '
        'stroke-width="2"/>'
    )
    for f, t, label in marks:
        below = py(t) + 14 < _TOP + ph - 4  # the value below-right of its dot, else above it
        parts.append(
            f'<circle class="mark" cx="{px(f):.1f}" cy="{py(t):.1f}" r="4" fill="{PALETTE[0]}" '
            f'data-far="{f!r}" data-tar="{t!r}"><title>{escape(label)}</title></circle>'
            f'<text x="{px(f) + 5:.1f}" y="{py(t) + (14 if below else -7):.1f}" '
            f'class="halo">{t:.3f}</text>'
        )
    return "".join(parts) + "</svg>"


def histogram_chart(
    edges: Sequence[float],
    series: Sequence[tuple[str, str, Sequence[float]]],
    lines: Sequence[tuple[str, float]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 300,
) -> str:
    """SVG histograms over the bins ``edges`` (B + 1,): each of ``series`` = [(name, colour,
    heights (B,))] a lightly filled step outline, named in a legend above the plot; each of
    ``lines`` = [(name, x)] a vertical dashed line labelled "name: x"."""
    parts = _frame(title, width, height, "chart histogram")
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    x0, x1 = edges[0], edges[-1]
    top = max((h for _, _, heights in series for h in heights), default=0.0) or 1.0
    top /= 1 - (10 + 14 * len(lines)) / ph  # room above the bars for the lines' labels

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return _TOP + (1 - y / top) * ph

    for t in nice_ticks(0.0, top):
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'class="grid"/><text x="{_LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
            f"{_fmt(t)}</text>"
        )
    for t in nice_ticks(x0, x1, 8):
        parts.append(
            f'<text x="{px(t):.1f}" y="{_TOP + ph + 16}" text-anchor="middle">{_fmt(t)}</text>'
        )
    parts.append(_axis_labels(x_label, y_label, width, height))
    legend_x = _LEFT + pw
    for name, colour, _ in reversed(series):  # legend right-aligned, in series order
        legend_x -= 7 * len(name) + 30
        parts.append(
            f'<rect x="{legend_x}" y="7" width="12" height="10" fill="{colour}" '
            f'fill-opacity=".3" stroke="{colour}"/><text x="{legend_x + 16}" y="16">'
            f"{escape(name)}</text>"
        )
    for name, colour, heights in series:
        steps = [(px(x0), py(0))]
        for a, b, h in zip(edges[:-1], edges[1:], heights):
            steps += [(px(a), py(h)), (px(b), py(h))]
        steps.append((px(x1), py(0)))
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in steps)
        parts.append(
            f'<polygon class="bars" data-name="{escape(name)}" points="{path}" fill="{colour}" '
            f'fill-opacity=".25" stroke="{colour}" stroke-width="1.5"/>'
        )
    for n, (name, x) in enumerate(sorted(lines, key=lambda line: line[1])):
        at = px(x)
        right = at < _LEFT + pw / 2  # the label on the roomier side of its line
        parts.append(
            f'<line class="threshold" x1="{at:.1f}" x2="{at:.1f}" y1="{_TOP}" y2="{_TOP + ph}" '
            f'stroke="#333" stroke-dasharray="5 3" data-name="{escape(name)}" '
            f'data-score="{x!r}"/><text x="{at + (4 if right else -4):.1f}" '
            f'y="{_TOP + 13 + 14 * n}" text-anchor="{"start" if right else "end"}" '
            f'class="halo">{escape(name)}: {x:.3f}</text>'
        )
    return "".join(parts) + "</svg>"
