#!/usr/bin/env bash
# Runs on the GPU machine (nvcc needed): builds scripts/wgmma_probe.cu, prints the register
# use of each wgmma configuration, then checks and times them (see the .cu file's header).
set -euo pipefail
cd "$(dirname "$0")"
d=$(mktemp -d)
# Variant build: the -D flags in $PROBE_FLAGS, timed after the default build.
if [ -n "${PROBE_FLAGS:-}" ]; then
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a $PROBE_FLAGS wgmma_probe.cu -o $d/p2 &
fi
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v wgmma_probe.cu -o $d/p 2>&1 \
  | grep -E "Compiling entry|registers|spill" | grep -B2 -A0 "registers" | grep -E "k_wg|registers" | sed 's/.*k_wg/k_wg/' | head -60 || true
wait
for a in "${@:-1}"; do $d/p $a; [ -n "${PROBE_FLAGS:-}" ] && { echo "== $PROBE_FLAGS"; $d/p2 $a | grep -v "^check"; }; done
