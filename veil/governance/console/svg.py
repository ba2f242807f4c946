"""Inline SVG pictures (no JavaScript, no images to fetch): op graphs and budget curves."""

from __future__ import annotations

import time

from markupsafe import Markup, escape

from veil.governance.cli import shown
from veil.governance.graphtext import ordered_nodes

_W, _H, _GX, _GY = 190, 46, 40, 14


def graph_svg(graph: dict, root: str) -> Markup:
    """Boxes in columns by depth (sources left, the requested object right), edges between them."""
    nodes = ordered_nodes(graph, root)
    if not nodes:
        return Markup("")
    by_name = {n["name"]: n for n in nodes}
    depth: dict[str, int] = {}
    for n in nodes:
        depth[n["name"]] = 1 + max((depth.get(i, -1) for i in n["input_names"] if i in by_name), default=-1)
    columns: dict[int, list[str]] = {}
    for n in nodes:
        columns.setdefault(depth[n["name"]], []).append(n["name"])
    pos = {}
    for d, names in columns.items():
        for row, name in enumerate(names):
            pos[name] = (10 + d * (_W + _GX), 10 + row * (_H + _GY))
    width = 20 + (max(columns) + 1) * (_W + _GX)
    height = 20 + max(len(v) for v in columns.values()) * (_H + _GY)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="opgraph" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="op graph">']
    for n in nodes:
        x, y = pos[n["name"]]
        for i in n["input_names"]:
            if i in pos:
                sx, sy = pos[i]
                parts.append(f'<line x1="{sx + _W}" y1="{sy + _H / 2}" x2="{x}" y2="{y + _H / 2}" class="edge"/>')
    for n in nodes:
        x, y = pos[n["name"]]
        kind = "src" if n["op"] == "dataset" else "inp" if n["op"] == "input" else "root" if n["is_root"] else "op"
        title = n.get("label") if n["op"] in ("dataset", "input") else n["op"].rsplit(".", 1)[-1]
        count = f" ({n.get('plan_ops', len(n['plan']))} ops)" if n.get("plan") else ""  # (never cut off)
        if count:
            title = n.get("label", "plan")
        title = str(title or "")
        if len(title) + len(count) > 28:
            title = title[:27 - len(count)] + "\u2026"
        title += count
        sub = f"{n['name']}  {n.get('shape', [])} {n.get('dtype', '')}"
        # shown(): escaped as `veil requests show` prints them (bidi and line-separator characters included)
        parts.append(f'<g class="node {kind}"><title>{escape(shown(n["op"]))} {escape(shown(n.get("args", "")))}'
                     f'</title><rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="6"/>'
                     f'<text x="{x + 8}" y="{y + 19}" class="t1">{escape(shown(title))}</text>'
                     f'<text x="{x + 8}" y="{y + 36}" class="t2">{escape(shown(sub))}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


#: the most points a budget curve draws: a scientist's charges are unbounded (a budget of 1 allows a million
#: charges of 1e-6), the owner's page must not be
MAX_CURVE_POINTS = 300


def _downsample(points: list, t0: float, t1: float, buckets: int) -> list:
    """The last charge in each of ``buckets`` equal time slices (the curve is cumulative, so the last one is
    the slice's total); a merged point's label says how many charges it stands for."""
    if len(points) <= buckets:
        return points
    last: dict[int, tuple] = {}
    count: dict[int, int] = {}
    for t, v, reason in points:
        b = min(buckets - 1, int((t - t0) / (t1 - t0) * buckets))
        last[b], count[b] = (t, v, reason), count.get(b, 0) + 1
    return [(t, v, reason if count[b] == 1 else f"{count[b]} charges, the last {reason}")
            for b, (t, v, reason) in sorted(last.items())]


def budget_svg(points: list, total: float, width: int = 520, height: int = 160,
               span: tuple[float, float] | None = None) -> Markup:
    """Cumulative epsilon spent over time, with the budget as a dashed line. ``span``: the curve's (first
    charge, now) when ``points`` are already downsampled (budget_curve.curve); else computed from them."""
    pad = 34
    if total <= 0:
        return Markup("")
    if span is None:
        now = time.time()
        xs = [p[0] for p in points] or [now]
        span = (min(xs), max(now, min(xs) + 1))
    t0, t1 = span
    points = _downsample(points, t0, t1, MAX_CURVE_POINTS)
    top = max(total, max((p[1] for p in points), default=0)) * 1.1

    def sx(t: float) -> float:
        return pad + (t - t0) / (t1 - t0) * (width - 2 * pad)

    def sy(v: float) -> float:
        return height - pad + 10 - v / top * (height - pad - 10)

    path = [f"{sx(t0):.1f},{sy(0):.1f}"]
    last = 0.0
    for t, v, _ in points:
        path.append(f"{sx(t):.1f},{sy(last):.1f}")
        path.append(f"{sx(t):.1f},{sy(v):.1f}")
        last = v
    path.append(f"{sx(t1):.1f},{sy(last):.1f}")
    dots = "".join(f'<circle cx="{sx(t):.1f}" cy="{sy(v):.1f}" r="3"><title>{escape(shown(r))}: '
                   f'total {v:.3g}</title></circle>' for t, v, r in points)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="epsilon spent over time">'
        f'<line x1="{pad}" y1="{sy(total):.1f}" x2="{width - pad}" y2="{sy(total):.1f}" class="budget"/>'
        f'<text x="{width - pad}" y="{sy(total) - 4:.1f}" class="lbl" text-anchor="end">budget \u03b5={total:g}</text>'
        f'<polyline points="{" ".join(path)}" class="spent"/>{dots}'
        f'<line x1="{pad}" y1="{height - pad + 10}" x2="{width - pad}" y2="{height - pad + 10}" class="axis"/>'
        f'<text x="{pad}" y="{height - 6}" class="lbl">{escape(time.strftime("%H:%M:%S", time.localtime(t0)))}</text>'
        f'<text x="{width - pad}" y="{height - 6}" class="lbl" text-anchor="end">'
        f'{escape(time.strftime("%H:%M:%S", time.localtime(t1)))}</text></svg>'
    )
