#!/usr/bin/env python3
"""Times torch SDPA decode (one query token, GQA 32/8, D=128) on the shapes of the
forge-attn decode bench (from its CSV), on the same GPU right after it, and prints the ratios.

usage: bench_torch_decode.py OURS.csv [--out DIR]   (writes DIR/decode.md)
"""
import argparse
import csv
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, HKV, D = 32, 8, 128
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def bench(dtype, b, l, backend, graph=False):
    """Median us per call: calls queued back to back, or (graph=True) one rotation of the
    caches recorded as a CUDA graph and replayed."""
    dt = DTYPES[dtype]
    kv_bytes = 2 * b * l * HKV * D * torch.finfo(dt).bits // 8
    copies = max(1, min(16, -(-(256 << 20) // kv_bytes)))
    q = torch.rand(b, H, 1, D, device="cuda", dtype=dt) * 2 - 1
    caches = [(torch.rand(b, HKV, l, D, device="cuda", dtype=dt) * 2 - 1,
               torch.rand(b, HKV, l, D, device="cuda", dtype=dt) * 2 - 1) for _ in range(copies)]
    with sdpa_kernel([backend]):
        def run(i):
            k, v = caches[i % copies]
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        for i in range(copies):
            run(i)
        torch.cuda.synchronize()
        reps = 20 * copies
        g = None
        if graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for i in range(copies):
                    run(i)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(copies):
                    run(i)
            g.replay()
            torch.cuda.synchronize()
        samples = []
        for _ in range(7):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if g is not None:
                for _ in range(reps // copies):
                    g.replay()
            else:
                for i in range(reps):
                    run(i)
            e.record()
            e.synchronize()
            samples.append(a.elapsed_time(e) * 1e3 / reps)
    samples.sort()
    us = samples[len(samples) // 2]
    return us, kv_bytes / (us * 1e-6) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = [r for r in csv.DictReader(open(args.csv)) if r["kind"] == "attention"]
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    lines = ["| dtype | B | L | forge us | forge TB/s | torch best | torch us | torch TB/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dtype, b, l = r["dtype"], int(r["batch"]), int(r["kv_len"])
        peers = {}
        names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        for name, be in names.items():
            if name == "math" and dtype != "f32":
                continue
            try:
                peers[name] = bench(dtype, b, l, be)
            except RuntimeError:
                pass
        if not peers:
            continue
        best = min(peers, key=lambda n: peers[n][0])
        us, tb = peers[best]
        ours = float(r["us"])
        lines.append(f"| {dtype} | {b} | {l} | {ours:.1f} | {float(r['tbps']):.2f} | {best} | {us:.1f} | {tb:.2f} | {us / ours:.2f}x |")
    graphs = [r for r in csv.DictReader(open(args.csv)) if r["kind"] == "attention_graph"]
    if graphs:
        lines += ["", "Recorded once and replayed as a graph (forge: `Device::capture_graph`; torch: "
                  "`torch.cuda.CUDAGraph` of its fastest backend for the shape above):", "",
                  "| dtype | B | L | forge us | forge TB/s | torch backend | torch us | torch TB/s | speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in graphs:
            dtype, b, l = r["dtype"], int(r["batch"]), int(r["kv_len"])
            best = None
            for name, be in {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}.items():
                if name == "math" and dtype != "f32":
                    continue
                try:
                    us, tb = bench(dtype, b, l, be, graph=True)
                except RuntimeError:
                    continue
                if best is None or us < best[1]:
                    best = (name, us, tb)
            if best is None:
                continue
            ours = float(r["us"])
            lines.append(f"| {dtype} | {b} | {l} | {ours:.1f} | {float(r['tbps']):.2f} | {best[0]} | {best[1]:.1f} | {best[2]:.2f} | {best[1] / ours:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        open(os.path.join(args.out, "decode.md"), "w").write(table + "\n")


if __name__ == "__main__":
    main()
