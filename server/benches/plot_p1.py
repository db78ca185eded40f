#!/usr/bin/env python3
"""Draws P1 throughput against thread count from the bench table's JSON, as an SVG.

Usage: python3 server/benches/plot_p1.py [target/bench-table.json] [out.svg]

Standard library only. Each series of the P1 row that has a thread count (the agent's Populate
without verify, the fallocate floors on one file and on one file per thread, and at the row's
thread count the agent with verify and the prealloc peer) becomes one line of median GiB/s per
thread count, with a bar from the slowest to the fastest sample.
"""

import json
import sys
from xml.sax.saxutils import escape

GIB = 1 << 30
COLORS = {
    "agent": "#1f77b4",
    "floor one file": "#2ca02c",
    "floor t files": "#ff7f0e",
    "agent verify": "#9467bd",
    "prealloc peer": "#d62728",
}
LABELS = {
    "agent": "agent Populate (no verify)",
    "floor one file": "floor: fallocate, t threads, one file",
    "floor t files": "floor: fallocate, t threads, t files",
    "agent verify": "agent Populate with verify",
    "prealloc peer": "peer: prealloc, MADV_POPULATE_WRITE",
}


def series_by_kind(doc):
    p1 = next((r for r in doc["rows"] if r["id"] == "P1"), None)
    if p1 is None:
        sys.exit("no P1 row in the JSON (run the bench with P1)")
    kinds = {}
    for s in p1["series"]:
        if s.get("threads") is None or not s.get("bytes"):
            continue
        kind = s["name"].rsplit(" t=", 1)[0]
        gibps = [s["bytes"] / GIB / (v / 1e3) for v in s["samples"]]
        gibps.sort()
        n = len(gibps)
        med = gibps[n // 2] if n % 2 else (gibps[n // 2 - 1] + gibps[n // 2]) / 2
        kinds.setdefault(kind, []).append((s["threads"], med, gibps[0], gibps[-1]))
    for v in kinds.values():
        v.sort()
    return p1, kinds


def svg(p1, kinds, header):
    w, h = 720, 440
    left, right, top, bottom = 70, 260, 50, 60
    pw, ph = w - left - right, h - top - bottom
    threads = sorted({t for v in kinds.values() for (t, *_rest) in v})
    ymax = max(hi for v in kinds.values() for (_t, _m, _lo, hi) in v) * 1.1
    tmin, tmax = threads[0], threads[-1]

    def x(t):
        return left + (pw * (t - tmin) / (tmax - tmin) if tmax > tmin else pw / 2)

    def y(v):
        return top + ph - ph * v / ymax

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">{escape(p1["what"])}</text>',
        f'<text x="{left}" y="36" fill="#555">{escape(header)}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
        f'<text x="{left + pw / 2}" y="{h - 20}" text-anchor="middle">threads</text>',
        f'<text x="18" y="{top + ph / 2}" transform="rotate(-90 18 {top + ph / 2})" '
        f'text-anchor="middle">GiB/s (median; bar: min to max)</text>',
    ]
    for t in threads:
        out.append(
            f'<text x="{x(t)}" y="{top + ph + 16}" text-anchor="middle">{t}</text>'
        )
    steps = 5
    for i in range(steps + 1):
        v = ymax * i / steps
        out.append(
            f'<line x1="{left}" y1="{y(v)}" x2="{left + pw}" y2="{y(v)}" stroke="#eee"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y(v) + 4}" text-anchor="end">{v:.1f}</text>'
        )
    legend_y = top
    for kind, pts in kinds.items():
        color = COLORS.get(kind, "black")
        if len(pts) > 1:
            path = " ".join(f"{x(t):.1f},{y(m):.1f}" for (t, m, _lo, _hi) in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        for t, m, lo, hi in pts:
            out.append(
                f'<line x1="{x(t)}" y1="{y(lo)}" x2="{x(t)}" y2="{y(hi)}" stroke="{color}"/>'
            )
            out.append(f'<circle cx="{x(t)}" cy="{y(m)}" r="4" fill="{color}"/>')
        out.append(
            f'<rect x="{left + pw + 15}" y="{legend_y}" width="12" height="12" fill="{color}"/>'
        )
        out.append(
            f'<text x="{left + pw + 32}" y="{legend_y + 10}">'
            f"{escape(LABELS.get(kind, kind))}</text>"
        )
        legend_y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench-table.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "target/bench-p1.svg"
    with open(src) as f:
        doc = json.load(f)
    p1, kinds = series_by_kind(doc)
    header = doc["header"][1] if len(doc["header"]) > 1 else ""
    header = header.split(", memplaced")[0]
    with open(dst, "w") as f:
        f.write(svg(p1, kinds, header))
    print(dst)


if __name__ == "__main__":
    main()
