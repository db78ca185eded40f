#!/usr/bin/env python3
"""Draws the S1 scale curves from the bench table's JSON, as one SVG of four panels.

Usage: python3 server/benches/plot_scale.py [target/bench-table.json] [out.svg]

Standard library only. Every series of the S1 row carries the region count it was measured at
(`regions`) and ends its name with ` n=COUNT`; each panel draws some kinds of series against the
region count, both axes logarithmic, median with a bar from the slowest to the fastest sample:
restart (held, unheld, and the raw loops), one reconcile pass's CPU time, ListRegions and
GetRegion latency, and the agent's RSS, open fds and database size. A dashed grey line in the
first three panels has slope 1 (linear growth) through the first point of the first series.
"""

import json
import math
import sys
from xml.sax.saxutils import escape

PANELS = [
    (
        "restart (ms)",
        [
            ("restart held", "#1f77b4"),
            ("raw loop", "#2ca02c"),
            ("restart unheld", "#d62728"),
            ("raw loop with memfd_create", "#ff7f0e"),
        ],
    ),
    (
        "one reconcile pass (ms)",
        [("reconcile pass CPU", "#1f77b4"), ("reconcile pass wall", "#9467bd")],
    ),
    (
        "latency (ms)",
        [
            ("ListRegions", "#1f77b4"),
            ("ListRegions agent CPU", "#2ca02c"),
            ("GetRegion", "#d62728"),
        ],
    ),
    (
        "agent footprint",
        [
            ("RSS", "#1f77b4"),
            ("open fds", "#2ca02c"),
            ("database", "#ff7f0e"),
        ],
    ),
]
UNITS = {"RSS": "MiB", "open fds": "fds", "database": "MiB"}


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def kinds_of(doc):
    s1 = next((r for r in doc["rows"] if r["id"] == "S1"), None)
    if s1 is None:
        sys.exit("no S1 row in the JSON (run the bench with MEMPLACE_BENCH_ONLY=S1)")
    kinds = {}
    for s in s1["series"]:
        n = s.get("regions")
        if not n or not s["samples"]:
            continue
        kind = s["name"].rsplit(" n=", 1)[0]
        v = s["samples"]
        kinds.setdefault(kind, []).append((n, median(v), min(v), max(v)))
    for v in kinds.values():
        v.sort()
    return s1, kinds


def panel(ox, oy, pw, ph, title, wanted, kinds, linear):
    present = [(k, c) for (k, c) in wanted if k in kinds]
    out = [f'<text x="{ox}" y="{oy - 8}" font-size="13">{escape(title)}</text>']
    if not present:
        return out
    pts = [p for k, _c in present for p in kinds[k]]
    xs = [p[0] for p in pts]
    lo = min(max(p[2], 1e-3) for p in pts)
    hi = max(p[3] for p in pts)
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if y1 <= y0:
        y1 = y0 + 1
    if x1 <= x0:
        x1 = x0 + 1

    def x(n):
        return ox + pw * (math.log10(n) - x0) / (x1 - x0)

    def y(v):
        return oy + ph - ph * (math.log10(max(v, 1e-3)) - y0) / (y1 - y0)

    out += [
        f'<line x1="{ox}" y1="{oy + ph}" x2="{ox + pw}" y2="{oy + ph}" stroke="black"/>',
        f'<line x1="{ox}" y1="{oy}" x2="{ox}" y2="{oy + ph}" stroke="black"/>',
    ]
    for n in sorted(set(xs)):
        out.append(
            f'<text x="{x(n):.1f}" y="{oy + ph + 15}" text-anchor="middle">{n:,}</text>'
        )
    for e in range(y0, y1 + 1):
        out.append(
            f'<line x1="{ox}" y1="{y(10 ** e):.1f}" x2="{ox + pw}" y2="{y(10 ** e):.1f}" stroke="#eee"/>'
        )
        out.append(
            f'<text x="{ox - 5}" y="{y(10 ** e) + 4:.1f}" text-anchor="end">{10 ** e:g}</text>'
        )
    if linear:
        n0, m0 = kinds[present[0][0]][0][:2]
        n1 = max(xs)
        out.append(
            f'<line x1="{x(n0):.1f}" y1="{y(m0):.1f}" x2="{x(n1):.1f}" y2="{y(m0 * n1 / n0):.1f}" '
            'stroke="#999" stroke-dasharray="4 3"/>'
        )
    ly = oy + 4
    for kind, color in present:
        p = kinds[kind]
        path = " ".join(f"{x(n):.1f},{y(m):.1f}" for (n, m, _l, _h) in p)
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
        )
        for n, m, l, h in p:
            out.append(
                f'<line x1="{x(n):.1f}" y1="{y(l):.1f}" x2="{x(n):.1f}" y2="{y(h):.1f}" stroke="{color}"/>'
            )
            out.append(f'<circle cx="{x(n):.1f}" cy="{y(m):.1f}" r="3.5" fill="{color}"/>')
        label = kind + (f" ({UNITS[kind]})" if kind in UNITS else "")
        out.append(f'<rect x="{ox + 8}" y="{ly}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{ox + 22}" y="{ly + 9}">{escape(label)}</text>')
        ly += 15
    return out


def svg(s1, kinds, header):
    w, h = 900, 700
    pw, ph = 340, 230
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="20" y="20" font-size="14">{escape(s1["what"])} (log-log; dashed: linear)</text>',
        f'<text x="20" y="36" fill="#555">{escape(header)}</text>',
    ]
    origins = [(70, 80), (510, 80), (70, 400), (510, 400)]
    for (title, wanted), (ox, oy) in zip(PANELS, origins):
        out += panel(ox, oy, pw, ph, title, wanted, kinds, title != "agent footprint")
        out.append(
            f'<text x="{ox + pw / 2}" y="{oy + ph + 32}" text-anchor="middle">regions</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench-table.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "target/bench-scale.svg"
    with open(src) as f:
        doc = json.load(f)
    s1, kinds = kinds_of(doc)
    header = doc["header"][1] if len(doc["header"]) > 1 else ""
    header = header.split(", memplaced")[0]
    with open(dst, "w") as f:
        f.write(svg(s1, kinds, header))
    print(dst)


if __name__ == "__main__":
    main()
