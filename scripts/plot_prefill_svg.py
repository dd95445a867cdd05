#!/usr/bin/env python3
"""Plots a prefill table of BENCHMARKS.md as an SVG (standard library only).

Reads the first markdown table under the heading that contains SECTION, with columns
dtype | D | S | causal | forge-attn | torch flash | torch cudnn | ..., and draws TFLOP/s
against sequence length: one panel per (dtype, causal), one colour per head dim, forge-attn
solid and cuDNN dashed.

    python3 scripts/plot_prefill_svg.py BENCHMARKS.md "warp-specialized prefill" docs/prefill_h200.svg
"""
import math
import sys


def read_table(path, section):
    lines = open(path, encoding="utf-8").read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("#") and section in l)
    rows, header = [], None
    for l in lines[start + 1:]:
        if l.startswith("#"):
            break
        if not l.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in l.strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(cells[0]) <= set("-: "):
            rows.append(dict(zip(header, cells)))
    return rows


def main():
    path, section, out = sys.argv[1:4]
    rows = read_table(path, section)
    panels = sorted({(r["dtype"], r["causal"]) for r in rows})
    dims = sorted({int(r["D"]) for r in rows})
    seqs = sorted({int(r["S"]) for r in rows})
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    pw, ph, m = 330, 250, 50
    width, height = m + len(panels) * (pw + m), ph + 2 * m + 30
    ymax = max(max(float(r["forge-attn"]), float(r["torch cudnn"])) for r in rows)
    ymax = math.ceil(ymax / 100.0) * 100
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    lx = lambda s: (math.log2(s) - math.log2(seqs[0])) / max(1e-9, math.log2(seqs[-1]) - math.log2(seqs[0]))
    for pi, (dt, causal) in enumerate(panels):
        x0, y0 = m + pi * (pw + m), m
        svg.append(f'<text x="{x0 + pw / 2}" y="{y0 - 12}" text-anchor="middle" font-size="13">'
                   f'{dt}, {"causal" if causal == "1" else "non-causal"}</text>')
        svg.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        for t in range(0, int(ymax) + 1, 100):
            y = y0 + ph - ph * t / ymax
            svg.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + pw}" y2="{y}" stroke="#eee"/>')
            svg.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{t}</text>')
        for s in seqs:
            x = x0 + 10 + (pw - 20) * lx(s)
            svg.append(f'<text x="{x}" y="{y0 + ph + 14}" text-anchor="middle">{s}</text>')
        for di, d in enumerate(dims):
            c = colours[di % len(colours)]
            for col, dash in (("forge-attn", ""), ("torch cudnn", ' stroke-dasharray="5,4"')):
                pts = []
                for s in seqs:
                    r = next((r for r in rows if r["dtype"] == dt and r["causal"] == causal
                              and int(r["D"]) == d and int(r["S"]) == s), None)
                    if r is None:
                        continue
                    x = x0 + 10 + (pw - 20) * lx(s)
                    y = y0 + ph - ph * float(r[col]) / ymax
                    pts.append(f"{x:.1f},{y:.1f}")
                svg.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
    ly = height - 22
    svg.append(f'<text x="{m}" y="{ly}">TFLOP/s against S (B * S = 16384, H = 2048 / D); '
               'solid: forge-attn, dashed: torch cuDNN (same run)</text>')
    for di, d in enumerate(dims):
        x = m + 520 + di * 70
        svg.append(f'<line x1="{x}" y1="{ly - 4}" x2="{x + 18}" y2="{ly - 4}" '
                   f'stroke="{colours[di % len(colours)]}" stroke-width="3"/>')
        svg.append(f'<text x="{x + 22}" y="{ly}">D = {d}</text>')
    svg.append("</svg>")
    open(out, "w", encoding="utf-8").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
