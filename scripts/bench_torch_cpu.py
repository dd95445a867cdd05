#!/usr/bin/env python3
"""Times torch's CPU scaled_dot_product_attention on the shapes that
`CPU_VS_TORCH= cargo bench --bench cpu_backend` times for the CPU backend.

Usage: python3 scripts/bench_torch_cpu.py [--threads N] [FILTER]
Prints `torch NAME MEDIAN_MS GFLOP/s` (GB/s for the decode step and the streaming read),
median of a few calls after one warm-up call. Prefill: B*S = 4096, H = 2048/D, layout
[B, H, S, D]. Decode: one query per sequence, B=8, 32 query heads over 8 KV heads
(enable_gqa), D=128, 4096 cached keys, f32.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_secs(reps, f):
    f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("filter", nargs="?", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {torch.get_num_threads()} torch {torch.__version__}")
    torch.manual_seed(0)
    shapes = [(torch.float32, d, s, c) for d in (64, 128) for s in (512, 2048) for c in (False, True)]
    shapes.append((torch.bfloat16, 128, 2048, False))
    with torch.inference_mode():
        for dtype, d, s, causal in shapes:
            kind = "f32" if dtype == torch.float32 else "bf16"
            name = f"prefill_{kind}_d{d}_s{s}{'_causal' if causal else ''}"
            if a.filter not in name:
                continue
            b, h = 4096 // s, 2048 // d
            q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))
            flops = 4.0 * b * s * s * h * d / (2.0 if causal else 1.0)
            secs = median_secs(
                3 if s >= 2048 else 5,
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            )
            print(f"torch {name} {secs * 1e3:.2f} {flops / secs / 1e9:.1f}")

        b, h, hk, d, length = 8, 32, 8, 128, 4096
        name = f"decode_f32_b{b}_h{h}_kv{hk}_d{d}_l{length}"
        if a.filter not in name:
            return
        q = torch.randn(b, h, 1, d)
        k = torch.randn(b, hk, length, d)
        v = torch.randn(b, hk, length, d)
        nbytes = 2.0 * k.numel() * 4
        secs = median_secs(
            10, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        )
        print(f"torch {name} {secs * 1e3:.3f} {nbytes / secs / 1e9:.1f}")
        secs = median_secs(10, lambda: (k.sum(), v.sum()))
        print(f"torch stream_read_{name} {secs * 1e3:.3f} {nbytes / secs / 1e9:.1f}")


if __name__ == "__main__":
    main()
