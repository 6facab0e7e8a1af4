"""Line charts as inline SVG (no plotting library: the report must be written without
matplotlib, and a page of a few charts needs a few dozen elements, not a figure engine)."""

from __future__ import annotations

import math

from cnnx.report.page import esc

WIDTH, HEIGHT = 520, 250
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 30, 36  # plot margins in SVG units


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(float(v), 12))  # float: 10 ** k is an int
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def tick_texts(ticks: list[float]) -> list[str]:
    """The ticks' labels, with the fewest significant digits (3 or more) that tell every tick
    apart: a plateaued loss has ticks 2.3, 2.3002, ..., not five labels "2.3". Plain decimals
    from 0.001 to 99,999; beyond, an exponent (6e+12), which stays within the margin."""
    for digits in range(3, 13):
        texts = [_tick_text(t, digits) for t in ticks]
        if len(set(texts)) == len(texts):
            break
    return texts


def _tick_text(t: float, digits: int) -> str:
    if t == 0 or not 1e-3 <= abs(t) < 1e5:
        return f"{t:.{digits}g}"
    text = f"{t:.{max(0, digits - 1 - math.floor(math.log10(abs(t))))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def line_chart(title: str, xs: list[int], series: list[tuple[str, list, str, bool]], *,
               marker_x: int | None = None, marker_label: str = "") -> str:
    """An SVG chart of y-series over x (epochs). series: (name, ys, colour, dashed); values
    that are None or not finite are skipped. marker_x: a dashed vertical line (best epoch)."""
    ys_all = _finite(v for _, ys, _, _ in series for v in ys)
    if not xs or not ys_all:
        return ""
    ticks_y = nice_ticks(min(ys_all), max(ys_all))
    y0, y1 = ticks_y[0], ticks_y[-1]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y):
        return TOP + (1 - (y - y0) / ((y1 - y0) or 1)) * ph

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(title)}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>',
             f'<text x="{LEFT}" y="16" style="font-weight:600;font-size:12px">{esc(title)}</text>']
    for t, text in zip(ticks_y, tick_texts(ticks_y)):
        y = py(t)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(text)}</text>')
    step_x = max(1, math.ceil((max(xs) - min(xs) + 1) / 10))
    for x in range(min(xs), max(xs) + 1, step_x):
        parts.append(f'<text x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 15}" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{LEFT + pw / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">epoch</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#9ca3af"/>')
    if marker_x is not None and min(xs) <= marker_x <= max(xs):
        mx = px(marker_x)
        near_right = mx > LEFT + pw - 40  # label on the side of the line that has room
        lx, anchor = (mx - 3, "end") if near_right else (mx + 3, "start")
        parts.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#6b7280" '
                     f'stroke-dasharray="3 3"/><text x="{lx:.1f}" y="{TOP + 11}" text-anchor="{anchor}">'
                     f'{esc(marker_label)}</text>')
    legend_x = WIDTH - RIGHT
    for name, ys, colour, dashed in reversed(series):
        points = [(px(x), py(float(y))) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
        if not points:
            continue
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"/>' for a, b in points)
        legend_x -= 7 * len(name) + 24
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 14}" y1="12" y2="12" stroke="{colour}" '
                     f'stroke-width="2"{dash}/><text x="{legend_x + 17}" y="16">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
