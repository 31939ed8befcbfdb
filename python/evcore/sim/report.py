"""The twin's report: a terminal table, JSON rows, and a self-contained HTML file with SVG plots.

The HTML has no script, no stylesheet link and no font or image from the network: every plot is an
inline SVG drawn here (site load against its limit and the price, per-node utilisation, state of
charge per vehicle, setpoint against measured current for one charger). This module only formats;
it never changes a number.
"""

from __future__ import annotations

import errno
import html
import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evcore.sim.twin import Comparison, PolicyResult

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (row key, header, format)
    ("policy", "policy", "s"),
    ("energy_requested_kwh", "requested kWh", ".1f"),
    ("energy_delivered_kwh", "delivered kWh", ".1f"),
    ("sessions_met", "met", "d"),
    ("energy_cost", "energy cost", ".2f"),
    ("peak_kw", "peak kW", ".1f"),
    ("demand_charge", "demand chg", ".2f"),
    ("total_cost", "total cost", ".2f"),
    ("max_utilisation", "max util", ".1%"),
    ("violations", "violations", "d"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the comparison (one line per policy)."""
    head = [h for _, h, _ in _COLUMNS]
    body: list[list[str]] = []
    for r in rows:
        line = []
        for key, _, fmt in _COLUMNS:
            v = r[key]
            if key == "sessions_met":
                line.append(f"{v}/{r['sessions']}")
            elif fmt == "s":
                line.append(str(v))
            else:
                line.append(format(v, fmt))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    out = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    ]
    out.append("  ".join("-" * w for w in widths))
    for b in body:
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(b, widths, strict=True))
            )
        )
    return "\n".join(out)


def to_json(cmp: Comparison) -> str:
    return json.dumps(cmp.rows(), indent=2)


# ---------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


class Line:
    def __init__(
        self,
        label: str,
        xs: Sequence[float],
        ys: Sequence[float],
        color: str,
        *,
        dashed: bool = False,
        step: bool = False,
        right: bool = False,
        width: float = 1.6,
    ) -> None:
        self.label = label
        self.xs = list(xs)
        self.ys = list(ys)
        self.color = color
        self.dashed = dashed
        self.step = step
        self.right = right
        self.width = width


def svg_chart(
    title: str,
    lines: Sequence[Line],
    *,
    x_label: str = "hours from start",
    y_label: str = "",
    y2_label: str = "",
    y_min: float | None = 0.0,
    y_max: float | None = None,
    width: int = 860,
    height: int = 300,
    legend: bool = True,
) -> str:
    """One line chart as an SVG element (left axis, optional right axis for ``right`` lines)."""
    ml, mr, mt, mb = 64, 64 if any(ln.right for ln in lines) else 20, 30, 42
    pw, ph = width - ml - mr, height - mt - mb
    xs = [x for ln in lines for x in ln.xs]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 <= x0:
        x1 = x0 + 1.0

    def yrange(right: bool) -> tuple[float, float]:
        ys = [y for ln in lines if ln.right == right for y in ln.ys if math.isfinite(y)]
        lo = min(ys) if ys else 0.0
        hi = max(ys) if ys else 1.0
        if not right:
            lo = y_min if y_min is not None else lo
            hi = y_max if y_max is not None else hi
        else:
            lo = min(0.0, lo)
        if hi <= lo:
            hi = lo + 1.0
        return lo, hi + (hi - lo) * 0.05

    ly0, ly1 = yrange(False)
    ry0, ry1 = yrange(True)

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float, right: bool) -> float:
        lo, hi = (ry0, ry1) if right else (ly0, ly1)
        y = min(max(y, lo), hi)
        return mt + ph - (y - lo) / (hi - lo) * ph

    e = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{ml}" y="18" font-size="14" font-weight="bold">{e(title)}</text>',
    ]
    for t in _nice_ticks(ly0, ly1):
        y = sy(t, False)
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(
            f'<text x="{ml - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>'
        )
    if any(ln.right for ln in lines):
        for t in _nice_ticks(ry0, ry1):
            y = sy(t, True)
            parts.append(f'<text x="{ml + pw + 6}" y="{y + 4:.1f}" font-size="11">{t:g}</text>')
    for t in _nice_ticks(x0, x1, 8):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#f4f4f4"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{mt + ph + 16}" font-size="11" text-anchor="middle">{t:g}</text>'
        )
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    parts.append(
        f'<text x="{ml + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
        f"{e(x_label)}</text>"
    )
    parts.append(
        f'<text x="14" y="{mt + ph / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {mt + ph / 2})">{e(y_label)}</text>'
    )
    if y2_label:
        xr = width - 10
        parts.append(
            f'<text x="{xr}" y="{mt + ph / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(90 {xr} {mt + ph / 2})">{e(y2_label)}</text>'
        )
    for ln in lines:
        pts: list[str] = []
        prev: tuple[float, float] | None = None
        for x, y in zip(ln.xs, ln.ys, strict=True):
            if not math.isfinite(y):
                prev = None
                continue
            px, py = sx(x), sy(y, ln.right)
            if ln.step and prev is not None:
                pts.append(f"{px:.1f},{prev[1]:.1f}")
            pts.append(f"{px:.1f},{py:.1f}")
            prev = (px, py)
        if not pts:
            continue
        dash = ' stroke-dasharray="6 4"' if ln.dashed else ""
        parts.append(
            f'<polyline fill="none" stroke="{ln.color}" stroke-width="{ln.width}"{dash} '
            f'points="{" ".join(pts)}"><title>{e(ln.label)}</title></polyline>'
        )
    if legend:
        lx, ly = ml + 8, mt + 14
        for ln in lines[:12]:
            dash = ' stroke-dasharray="6 4"' if ln.dashed else ""
            parts.append(
                f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{ln.color}" '
                f'stroke-width="2"{dash}/>'
            )
            parts.append(f'<text x="{lx + 22}" y="{ly}" font-size="11">{e(ln.label)}</text>')
            ly += 14
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
def _hours(ts: Sequence[float]) -> list[float]:
    return [t / 3600.0 for t in ts]


def _policy_sections(cmp: Comparison, r: PolicyResult) -> list[str]:
    s = r.series
    out = []
    nodes = [n.id for n in cmp.scenario.site.nodes]
    util_lines = [
        Line(
            node,
            _hours(s.t),
            [u[i] * 100.0 for u in s.node_util],
            PALETTE[i % len(PALETTE)],
        )
        for i, node in enumerate(nodes)
    ]
    util_lines.append(
        Line("limit", [0.0, cmp.scenario.duration_s / 3600.0], [100.0, 100.0], "#000", dashed=True)
    )
    out.append(
        svg_chart(
            f"{r.policy}: utilisation per node (highest phase)",
            util_lines,
            y_label="% of phase limit",
        )
    )
    soc_lines = []
    for i, (sid, pts) in enumerate(sorted(s.soc.items())):
        if pts:
            soc_lines.append(
                Line(
                    sid,
                    [p[0] / 3600.0 for p in pts],
                    [p[1] * 100.0 for p in pts],
                    PALETTE[i % len(PALETTE)],
                    width=1.0,
                )
            )
    out.append(
        svg_chart(
            f"{r.policy}: state of charge per vehicle",
            soc_lines,
            y_label="SoC %",
            y_max=100.0,
            legend=False,
        )
    )
    if s.chosen_setpoint:
        xs = _hours(s.chosen_t)
        unit = "W" if cmp.scenario.site.charger(cmp.chosen_charger).kind == "dc" else "A"
        out.append(
            svg_chart(
                f"{r.policy}: charger {cmp.chosen_charger}, setpoint vs measured",
                [
                    Line(f"setpoint ({unit})", xs, s.chosen_setpoint, PALETTE[1], step=True),
                    Line(f"measured ({unit})", xs, s.chosen_measured, PALETTE[0]),
                ],
                y_label=unit,
            )
        )
    return out


def html_report(cmp: Comparison) -> str:
    sc = cmp.scenario
    rows = cmp.rows()
    e = html.escape
    first = cmp.results[0].series if cmp.results else None
    load_lines = [
        Line(r.policy, _hours(r.series.t), r.series.site_kw, PALETTE[i % len(PALETTE)])
        for i, r in enumerate(cmp.results)
    ]
    if first is not None and first.t:
        load_lines.append(
            Line("site limit (kW)", _hours(first.t), first.limit_kw, "#000", dashed=True, step=True)
        )
        load_lines.append(
            Line(
                f"price ({sc.tariff.currency}/kWh)",
                _hours(first.t),
                first.price,
                "#888",
                step=True,
                right=True,
                width=1.0,
            )
        )
    start = datetime.fromtimestamp(sc.start, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    in_loop = []
    for r in cmp.results:
        for p in r.in_loop:
            if p not in in_loop:
                in_loop.append(p)
    body = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>evcore twin: {e(sc.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:960px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "svg{display:block;margin:12px 0}code{background:#f4f4f4;padding:1px 3px}</style>",
        "</head><body>",
        f"<h1>evcore digital twin: {e(sc.name)}</h1>",
        f"<p>{e(sc.description)}</p>",
        f"<p>Start {e(start)}, {sc.duration_s / 3600:g} h simulated, seed {cmp.seed}, "
        f"{len(cmp.arrivals.sessions)} sessions on {len(sc.site.chargers)} chargers, "
        f"meter interval {sc.meter_interval_s:g} s. Violations count every 100 ms sample of a "
        "node and phase above its limit (no averaging).</p>",
        "<h2>Comparison</h2><table><tr>",
    ]
    heads = [
        "policy",
        "requested kWh",
        "delivered kWh",
        "sessions met",
        f"energy cost ({sc.tariff.currency})",
        f"peak kW ({sc.demand_charge.window_min:g} min)",
        "peak kW (instant)",
        f"demand charge ({sc.tariff.currency})",
        "max node-phase util",
        "violations",
        "kW-cap samples over",
    ]
    body.append("".join(f"<th>{e(h)}</th>" for h in heads) + "</tr>")
    for row in rows:
        cells = [
            row["policy"],
            f"{row['energy_requested_kwh']:.1f}",
            f"{row['energy_delivered_kwh']:.1f}",
            f"{row['sessions_met']}/{row['sessions']}",
            f"{row['energy_cost']:.2f}",
            f"{row['peak_kw']:.1f}",
            f"{row['peak_instant_kw']:.1f}",
            f"{row['demand_charge']:.2f}",
            f"{row['max_utilisation']:.1%} ({row['max_utilisation_at']})",
            str(row["violations"]),
            str(row["violations_kw"]),
        ]
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    body.append("</table>")
    body.append("<h3>What was in the loop</h3><ul>")
    body.extend(f"<li>{e(p)}</li>" for p in in_loop)
    body.append("</ul>")
    for note in cmp.notes:
        body.append(f"<p><b>Note:</b> {e(note)}</p>")
    nw = sorted({f for r in cmp.results for f in r.faults_not_wired})
    if nw:
        body.append(f"<p><b>Faults not wired in this run:</b> {e(', '.join(nw))}</p>")
    body.append("<h2>Site load, limit and price</h2>")
    body.append(
        svg_chart(
            "Site meter load per policy",
            load_lines,
            y_label="kW",
            y2_label=f"{sc.tariff.currency}/kWh",
        )
    )
    for r in cmp.results:
        body.append(f"<h2>{e(r.policy)}</h2>")
        body.extend(_policy_sections(cmp, r))
    body.append("</body></html>")
    return "\n".join(body)


def write_html(cmp: Comparison, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(cmp), encoding="utf-8")
    return path


def check_writable(path: Path) -> None:
    """Create the report's directory and write a scratch file in it, so that a report that
    cannot be written is said before a run of minutes, not after it. Raises ``OSError``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    for parent in path.parents:  # mkdir would say only "File exists" of a file on the way
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", str(parent))
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path.parent):
        pass
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "not writable", str(path))


def in_loop(cmp: Comparison) -> list[str]:
    """Every part that took part in the comparison, once, in order of first use."""
    out: list[str] = []
    for r in cmp.results:
        for p in r.in_loop:
            if p not in out:
                out.append(p)
    return out
