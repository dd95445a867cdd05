#!/usr/bin/env bash
# Checks the crate's rust-version (Cargo.toml) without installing that toolchain:
#  1. no locked dependency of any feature (normal and build dependencies) declares a newer
#     rust-version;
#  2. clippy's incompatible_msrv lint, denied, finds no std API newer than it in the crate
#     (every target, with the features given as arguments, e.g. --features rocm).
# Exits non-zero on the first violation.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo metadata --format-version 1 --all-features --locked | python3 -c '
import json, sys

def ver(v):
    return tuple(int(x) for x in v.split(".")) + (0,) * (3 - len(v.split(".")))

m = json.load(sys.stdin)
pkgs = {p["id"]: p for p in m["packages"]}
nodes = {n["id"]: n for n in m["resolve"]["nodes"]}
root = m["resolve"]["root"]
msrv = pkgs[root]["rust_version"]
if not msrv:
    sys.exit("Cargo.toml has no rust-version")
seen, todo = set(), [root]
while todo:
    i = todo.pop()
    if i in seen:
        continue
    seen.add(i)
    for d in nodes[i]["deps"]:
        if any(k["kind"] in (None, "build") for k in d["dep_kinds"]):
            todo.append(d["pkg"])
bad = [
    (pkgs[i]["name"], pkgs[i]["version"], pkgs[i]["rust_version"])
    for i in sorted(seen - {root})
    if pkgs[i]["rust_version"] and ver(pkgs[i]["rust_version"]) > ver(msrv)
]
for name, v, rv in bad:
    print(f"{name} {v} declares rust-version {rv}, newer than the crate'"'"'s {msrv}")
if bad:
    sys.exit(1)
print(f"rust-version {msrv}: {len(seen) - 1} locked dependencies declare it or less")
'

cargo clippy --release --all-targets "$@" -- -D clippy::incompatible_msrv
