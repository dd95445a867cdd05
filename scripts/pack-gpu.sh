#!/usr/bin/env bash
# Stages the test, example and bench executables in .gpu/ for the GPU machine:
# ../shared/tools/gpu-pack, plus the harness-free bench binaries it leaves out.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/tools/gpu-pack "$@" | tail -2
mkdir -p .gpu/benches
# The bench executables by cargo's own account (a test target may share a bench's name).
# The same arguments as gpu-pack's build, so nothing is rebuilt with other features.
cargo bench --no-run --message-format=json "$@" | python3 -c '
import json, shutil, subprocess, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        dst = ".gpu/benches/" + m["target"]["name"]
        shutil.copy(m["executable"], dst)
        subprocess.run(["strip", dst], check=True)
'
ls .gpu/benches
