#!/usr/bin/env bash
# Stages the test, example and bench executables in .gpu/ for the GPU machine:
# ../shared/tools/gpu-pack, plus the harness-free bench binaries it leaves out.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/tools/gpu-pack "$@" | tail -2
mkdir -p .gpu/benches
for b in gpu_attention gpu_decode gpu_features; do
  f=$(ls -t target/release/deps/$b-* | grep -v '\.d$' | head -1)
  cp "$f" ".gpu/benches/$b" && strip ".gpu/benches/$b"
done
ls .gpu/benches
