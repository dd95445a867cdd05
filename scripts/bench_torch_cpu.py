#!/usr/bin/env python3
"""Times torch's CPU scaled_dot_product_attention on the shapes that
`CPU_VS_TORCH= cargo bench --bench cpu_backend` times for the CPU backend.

Usage: python3 scripts/bench_torch_cpu.py [--threads N] [--ours FILE] [FILTER]
Prints `torch NAME MEDIAN_MS GFLOP/s` (GB/s for the decode step and the streaming read),
median of a few calls after one warm-up call. Prefill: B*S = 16384, H = 2048/D, layout
[B, H, S, D]; f32 and bf16 at D = 64 and 128, S = 512 to 4096, causal and not.
Decode: one query per sequence, B=8, 32 query heads over 8 KV heads (enable_gqa),
D=128, 4096 and 16384 cached keys, f32 and bf16, each followed by a streaming read of the same bytes (K and V summed) and the decode's fraction of its
bandwidth (`fraction NAME F`).

With `--ours FILE` (the output of `CPU_VS_TORCH= cargo bench --bench cpu_backend`, or of
the bench binary, run with the same thread count), a markdown table follows: each shape's
time on both sides and the speed of ours relative to torch (torch ms / ours ms), then the
decode steps' GB/s on both sides with each one's fraction of the streaming read of its
own run.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


# The decode steps: batch, query heads, kv heads, head_dim; cached keys.
DECODE_SHAPE = (8, 32, 8, 128)
DECODE_LENS = (4096, 16384)


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
    ap.add_argument("--ours", help="output of the cpu_backend bench to compare with")
    ap.add_argument("filter", nargs="?", default="")
    a = ap.parse_args()
    results = {}
    try:
        run(a, results)
    finally:
        if a.ours:
            table(a.ours, results)


def table(path, torch_ms):
    """Prints the shapes both sides timed as a markdown table."""
    ours = {}
    threads = None
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[0] == "ours":
                ours[parts[1]] = float(parts[2])
            elif len(parts) == 2 and parts[0] == "threads":
                threads = int(parts[1])
    print()
    print(f"ours: {threads} threads; torch: {torch.get_num_threads()} threads")
    print()
    print("| shape | ours (ms) | torch (ms) | speed vs torch (torch ms / ours ms) |")
    print("|---|---:|---:|---:|")
    for name, t in torch_ms.items():
        if name in ours:
            print(f"| {name} | {ours[name]:.2f} | {t:.2f} | {t / ours[name]:.2f}x |")
    # Decode steps against the streaming read of the same bytes, each side in its own run.
    decodes = [n for n in ours if n.startswith("decode_") and f"stream_read_{n}" in ours]
    if not decodes:
        return
    print()
    print("| decode | ours (GB/s) | ours / its streaming read | torch (GB/s) | torch / its streaming read |")
    print("|---|---:|---:|---:|---:|")
    for name in decodes:
        nbytes = decode_bytes(name)
        gbs = lambda ms: nbytes / (ms * 1e-3) / 1e9
        ours_frac = ours[f"stream_read_{name}"] / ours[name]
        if name in torch_ms and f"stream_read_{name}" in torch_ms:
            t = torch_ms[name]
            torch_cols = f"{gbs(t):.1f} | {torch_ms[f'stream_read_{name}'] / t:.2f}"
        else:
            torch_cols = "- | -"
        print(f"| {name} | {gbs(ours[name]):.1f} | {ours_frac:.2f} | {torch_cols} |")


def decode_bytes(name):
    """Bytes of K and V of a decode shape named `decode_KIND_bB_hH_kvK_dD_lL`."""
    fields = dict((f[:2], f[2:]) if f.startswith("kv") else (f[0], f[1:]) for f in name.split("_")[2:])
    size = 4 if name.split("_")[1] == "f32" else 2
    return 2.0 * int(fields["b"]) * int(fields["kv"]) * int(fields["l"]) * int(fields["d"]) * size

def run(a, results):
    torch.set_num_threads(a.threads)
    print(f"threads {torch.get_num_threads()} torch {torch.__version__}")
    torch.manual_seed(0)
    seqs = (512, 1024, 2048, 4096)
    shapes = [(torch.float32, d, s, c) for d in (64, 128) for s in seqs for c in (False, True)]
    shapes += [(torch.bfloat16, d, s, c) for d in (64, 128) for s in seqs for c in (False, True)]
    with torch.inference_mode():
        for dtype, d, s, causal in shapes:
            kind = "f32" if dtype == torch.float32 else "bf16"
            name = f"prefill_{kind}_d{d}_s{s}{'_causal' if causal else ''}"
            if a.filter not in name:
                continue
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))
            flops = 4.0 * b * s * s * h * d / (2.0 if causal else 1.0)
            secs = median_secs(
                3 if s >= 2048 else 5,
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            )
            print(f"torch {name} {secs * 1e3:.2f} {flops / secs / 1e9:.1f}", flush=True)
            results[name] = secs * 1e3

        b, h, hk, d = DECODE_SHAPE
        for dtype in (torch.float32, torch.bfloat16):
            for length in DECODE_LENS:
                kind = "f32" if dtype == torch.float32 else "bf16"
                name = f"decode_{kind}_b{b}_h{h}_kv{hk}_d{d}_l{length}"
                if a.filter not in name:
                    continue
                q = torch.randn(b, h, 1, d, dtype=dtype)
                k = torch.randn(b, hk, length, d, dtype=dtype)
                v = torch.randn(b, hk, length, d, dtype=dtype)
                nbytes = 2.0 * k.numel() * k.element_size()
                secs = median_secs(
                    10, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                )
                print(f"torch {name} {secs * 1e3:.3f} {nbytes / secs / 1e9:.1f}")
                results[name] = secs * 1e3
                # The same bytes read once (summed in f32 for both dtypes).
                stream = median_secs(
                    10, lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32))
                )
                print(f"torch stream_read_{name} {stream * 1e3:.3f} {nbytes / stream / 1e9:.1f}")
                print(f"fraction {name} {stream / secs:.2f}", flush=True)
                results[f"stream_read_{name}"] = stream * 1e3
                del q, k, v

if __name__ == "__main__":
    main()
