#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with the executables staged by
# ../shared/tools/gpu-pack in .gpu/. One call does a whole check-and-measure sequence:
#   scripts/device-check.sh tests            GPU tests (every test, ignored ones included)
#   scripts/device-check.sh sanitize [FILT]  compute-sanitizer memcheck + racecheck on the GPU tests
#   scripts/device-check.sh prefill [ARGS]   prefill bench + torch SDPA side by side (+ plot)
#   scripts/device-check.sh decode [ARGS]    decode bench + torch SDPA side by side
#   scripts/device-check.sh example [ARGS]   examples/decode_step
# Logs and tables go to $OUT (or ./device-out).
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
mode=${1:-tests}; [ $# -gt 0 ] && shift
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
case "$mode" in
  tests)
    .gpu/gpu-run tests --skip known_gap "$@" 2>&1 | tee "$out/tests.log" | grep -E "^(test |test result|==|gpu-run|NVIDIA|.*panicked|.*error)" ;;
  sanitize)
    # The GPU test binaries under memcheck, racecheck, synccheck and initcheck, on the small
    # cases only. The out-of-memory test is skipped: the failed allocation it provokes is an
    # API error there. SANITIZE_TOOLS picks the tools (default: all four).
    export FORGE_ATTN_SANITIZE=1
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
      for t in gpu_backend gpu_robustness kv_cache zero_transfers device_graph; do
        echo "== compute-sanitizer --tool $tool $t"
        compute-sanitizer --tool "$tool" --error-exitcode 9 ".gpu/tests/$t" --include-ignored --test-threads 1 --skip out_of_memory_is_an_error "$@" 2>&1 \
          | tee -a "$out/sanitize-$tool.log" | grep -E "(ERROR SUMMARY|RACECHECK SUMMARY|test result|Invalid|hazard)"
        echo "exit ${PIPESTATUS[0]}"
      done
    done ;;
  prefill)
    .gpu/gpu-run exec benches/gpu_attention --csv "$out/prefill.csv" "$@" 2>&1 | tee "$out/prefill.log"
    python3 scripts/bench_torch_sdpa.py "$out/prefill.csv" --out "$out" 2>&1 | tee "$out/prefill-torch.log" ;;
  decode)
    .gpu/gpu-run exec benches/gpu_decode --csv "$out/decode.csv" "$@" 2>&1 | tee "$out/decode.log"
    python3 scripts/bench_torch_decode.py "$out/decode.csv" --out "$out" 2>&1 | tee "$out/decode-torch.log" ;;
  example)
    .gpu/gpu-run exec examples/decode_step "$@" 2>&1 | tee "$out/decode_step.log" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
