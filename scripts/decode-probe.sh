#!/usr/bin/env bash
# Runs on the GPU machine (nvcc needed): builds scripts/decode_probe.cu against
# kernels/flash_decode.hip and times the decode kernel alone for each
# "length:chunks:caches[:batch:page:launches:tensor_cores]" argument (default: the B=1
# latency shapes, caches from DRAM and from L2; decode_probe.cu explains each field). PROBE_FLAGS adds
# nvcc flags (a -D of a kernel macro, or -DDEC_PROBE_KERNEL="path" for another source).
set -euo pipefail
cd "$(dirname "$0")"
bin=$(mktemp -d)/decode_probe
nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -DFA_VARIANT_DT=bf16 -DFA_VARIANT_HD=128 \
  -I../kernels ${PROBE_FLAGS:-} decode_probe.cu -o "$bin"
for c in "${@:-4096:16:16 4096:16:1 4096:32:16 1024:16:1}"; do
  for one in $c; do "$bin" ${one//:/ }; done
done
