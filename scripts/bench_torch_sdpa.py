#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention on the shapes of the forge-attn
prefill bench (read from its CSV), on the same GPU right after it, and prints the ratios.

usage: bench_torch_sdpa.py OURS.csv [--out DIR]
Writes DIR/prefill.md (table) and DIR/prefill.png (TFLOP/s against S, one line per path
and peer) when --out is given.
"""
import argparse
import csv
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
PEERS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def time_ms(fn, reps=15):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def torch_peers(dtype, d, s, causal):
    b, h = 16384 // s, 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.rand(b, h, s, d, device="cuda", dtype=DTYPES[dtype], generator=g) * 2 - 1 for _ in range(3))
    flops = 4 * b * s * s * h * d * (0.5 if causal else 1.0)
    out = {}
    for name, backend in PEERS.items():
        try:
            with sdpa_kernel([backend]):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal)))
            out[name] = (ms, flops / ms / 1e9)
        except RuntimeError:
            pass  # backend does not take this dtype/shape
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--out")
    args = ap.parse_args()
    ours = defaultdict(dict)
    cfgs = {}
    for r in csv.DictReader(open(args.csv)):
        key = (r["dtype"], int(r["head_dim"]), int(r["seq"]), int(r["causal"]))
        ours[key][r["path"]] = (float(r["ms"]), float(r["tflops"]))
        if r["path"] == "flash":
            cfgs[key] = r["config"]
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    lines = [
        "| dtype | D | S | causal | flash | tf32 | traditional | cpu | torch flash | torch cudnn | torch efficient | flash/best torch | tf32/best torch | flash/traditional |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    series = defaultdict(list)
    for key in sorted(ours):
        dtype, d, s, causal = key
        peers = torch_peers(dtype, d, s, causal)
        mine = ours[key]
        fl = mine.get("flash", (None, None))[1]
        tf = mine.get("tf32", (None, None))[1]
        tr = mine.get("traditional", (None, None))[1]
        cp = mine.get("cpu", (None, None))[1]
        best = max((t for _, t in peers.values()), default=None)
        fmt = lambda x: "-" if x is None else f"{x:.1f}"
        fmt3 = lambda x: "-" if x is None else f"{x:.3f}"
        ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}x"
        lines.append(
            f"| {dtype} | {d} | {s} | {causal} | {fmt(fl)} | {fmt(tf)} | {fmt(tr)} | {fmt3(cp)} | "
            + " | ".join(fmt(peers.get(p, (None, None))[1]) for p in PEERS)
            + f" | {ratio(fl, best)} | {ratio(tf, best)} | {ratio(fl, tr)} |"
        )
        for path, (_, t) in mine.items():
            if path == "cpu":
                continue
            series[(dtype, d, causal, f"forge {path}")].append((s, t))
        for p, (_, t) in peers.items():
            series[(dtype, d, causal, f"torch {p}")].append((s, t))
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "prefill.md"), "w").write(table + "\n")
        plot(series, os.path.join(args.out, "prefill.png"))


def plot(series, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(dt, d, c) for dt, d, c, _ in series})
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (dt, d, c) in zip(axes.flat, panels):
        for (dt2, d2, c2, name), pts in sorted(series.items()):
            if (dt2, d2, c2) != (dt, d, c):
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="-" if name.startswith("forge") else "--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dt} D={d} {'causal' if c else 'non-causal'}", fontsize=9)
        ax.set_xlabel("seq len")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
