#!/usr/bin/env bash
# Runs on the GPU machine (nvcc needed): builds scripts/wgmma_probe.cu, prints the register
# use of each wgmma configuration, then checks and times them (see the .cu file's header).
set -euo pipefail
cd "$(dirname "$0")"
d=$(mktemp -d)
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v wgmma_probe.cu -o $d/p 2>&1 | grep -E "error|warning|registers|spill|k_wg|k_mma" | grep -A2 "k_wg" | grep -E "registers|spill" | head -40 || true
for a in "${@:-1}"; do $d/p $a; done
