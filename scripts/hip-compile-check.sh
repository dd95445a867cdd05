#!/usr/bin/env bash
# Compiles every kernels/*.hip to HSACO code objects for AMD targets, with no AMD GPU.
#
#   gfx1100 (wave32) and gfx90a (wave64): hipcc (on Debian 12: ROCm 5.2.3, clang-15)
#   gfx942  (wave64):                     clang-19 -x hip --cuda-device-only
#
# Debian's device libraries lack the ISA-version bitcode of newer targets
# (oclc_isa_version_1100.bc, _942.bc). They are generated from oclc_isa_version_1036.bc by
# rewriting its one constant (llvm-dis, sed, llvm-as) into an overlay directory that links
# every other library of the distribution, so nothing system-wide is modified.
#
# Usage: scripts/hip-compile-check.sh [OUT_DIR]      (default target/hip-check)
# Environment: HIPCC_ARCHS (default "gfx1100 gfx90a"), CLANG_ARCHS (default "gfx942"),
#   CLANG (default clang-19), JOBS (default nproc).
# Output: OUT_DIR/<arch>/<file stem>.hsaco, logs in OUT_DIR/logs/, the overlay in
# OUT_DIR/device-libs (pass --rocm-device-lib-path=<it> to hipcc, e.g. through
# FORGE_ATTN_HIPCC_FLAGS for build.rs). Exit status 1 if any file fails for any target.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$root/target/hip-check}" && cd "${1:-$root/target/hip-check}" && pwd)
hipcc_archs=${HIPCC_ARCHS-gfx1100 gfx90a}
clang_archs=${CLANG_ARCHS-gfx942}
clang=${CLANG:-clang-19}
jobs=${JOBS:-$(nproc)}
kdir=$root/kernels
overlay=$out/device-libs

die() { echo "hip-compile-check: $*" >&2; exit 1; }

# ---------------------------------------------------------------- device-libs overlay
find_device_libs() {
    local d
    for d in /usr/lib/x86_64-linux-gnu/amdgcn/bitcode /opt/rocm/amdgcn/bitcode \
             /opt/rocm/lib/llvm/lib/clang/*/lib/amdgcn/bitcode; do
        [[ -f $d/oclc_isa_version_1036.bc ]] && { echo "$d"; return; }
    done
    d=$(find / -xdev -name oclc_isa_version_1036.bc -not -path '/proc/*' 2>/dev/null | head -n1)
    [[ -n $d ]] && dirname "$d"
}

# The LLVM tools of the oldest installed version, so clang-15 and clang-19 both read the
# generated bitcode.
find_llvm_tool() {
    local v
    for v in 15 16 17 18 19 20; do
        command -v "$1-$v" >/dev/null && { echo "$1-$v"; return; }
    done
    command -v "$1" || true
}

# __oclc_ISA_version of gfxXY[Z]: major*1000 + minor*100 + stepping (hex digit), e.g.
# gfx1036 -> 10306, gfx1100 -> 11000, gfx942 -> 9402, gfx90a -> 9010.
isa_constant() {
    local id=${1#gfx}
    id=${id%%:*}
    local major=${id:0:${#id}-2} minor=${id: -2:1} step=${id: -1}
    echo $((major * 1000 + minor * 100 + 16#$step))
}

libs=$(find_device_libs) || true
[[ -n ${libs:-} ]] || die "ROCm device libraries not found (apt-get install rocm-device-libs)"
mkdir -p "$overlay"
for f in "$libs"/*.bc; do ln -sfn "$f" "$overlay/$(basename "$f")"; done
llvm_dis=$(find_llvm_tool llvm-dis)
llvm_as=$(find_llvm_tool llvm-as)
for arch in $hipcc_archs $clang_archs; do
    id=${arch#gfx}; id=${id%%:*}
    bc=$overlay/oclc_isa_version_$id.bc
    [[ -e $bc ]] && continue
    [[ -n $llvm_dis && -n $llvm_as ]] || die "llvm-dis/llvm-as needed to generate $bc"
    value=$(isa_constant "$arch")
    "$llvm_dis" "$libs/oclc_isa_version_1036.bc" -o - \
        | sed "s/constant i32 10306,/constant i32 $value,/" > "$out/isa_$id.ll"
    grep -q "constant i32 $value," "$out/isa_$id.ll" || die "unexpected layout of oclc_isa_version_1036.bc"
    "$llvm_as" "$out/isa_$id.ll" -o "$bc"
    rm -f "$out/isa_$id.ll"
    echo "generated $(basename "$bc") (__oclc_ISA_version = $value)"
done

# ---------------------------------------------------------------- compile
shopt -s nullglob
sources=("$kdir"/*.hip)
(( ${#sources[@]} )) || die "no kernels/*.hip"
command -v hipcc >/dev/null || die "hipcc not found (apt-get install hipcc libamdhip64-dev)"
if [[ -n $clang_archs ]]; then
    command -v "$clang" >/dev/null || die "$clang not found (apt-get install clang-19 lld-19)"
fi
mkdir -p "$out/logs"
rm -f "$out"/logs/*.log "$out"/logs/*.fail

# One job: <compiler> <arch> <source>
compile_one() {
    local tool=$1 arch=$2 src=$3 stem log obj
    stem=$(basename "$src" .hip)
    mkdir -p "$out/$arch"
    obj=$out/$arch/$stem.hsaco
    log=$out/logs/$arch.$stem.log
    local start=$SECONDS
    local cmd
    if [[ $tool == hipcc ]]; then
        cmd=(hipcc --genco "--offload-arch=$arch" "--rocm-device-lib-path=$overlay"
             -O3 -std=c++17 -I "$kdir" -o "$obj" "$src")
    else
        cmd=("$clang" -x hip "--offload-arch=$arch" --cuda-device-only --no-gpu-bundle-output
             "--rocm-path=${ROCM_PATH:-/usr}" "--rocm-device-lib-path=$overlay"
             -O3 -std=c++17 -I "$kdir" -o "$obj" "$src")
    fi
    if "${cmd[@]}" > "$log" 2>&1 && [[ -s $obj ]]; then
        printf '  ok    %-8s %-32s %4ds\n' "$arch" "$stem.hip" $((SECONDS - start))
    else
        printf '  FAIL  %-8s %-32s %4ds\n' "$arch" "$stem.hip" $((SECONDS - start))
        { echo "\$ ${cmd[*]}"; cat "$log"; } > "$out/logs/$arch.$stem.fail"
    fi
}
export -f compile_one
export out overlay kdir clang

{
    for arch in $hipcc_archs; do for src in "${sources[@]}"; do echo "hipcc $arch $src"; done; done
    for arch in $clang_archs; do for src in "${sources[@]}"; do echo "clang $arch $src"; done; done
} | xargs -P "$jobs" -L 1 bash -c 'compile_one "$@"' _

fails=("$out"/logs/*.fail)
if (( ${#fails[@]} )); then
    for f in "${fails[@]}"; do
        echo "---- $(basename "$f" .fail)"
        head -c 8000 "$f"
        echo
    done
    die "${#fails[@]} compile failure(s); logs in $out/logs"
fi
echo "hip-compile-check: every kernel file compiled for: $hipcc_archs $clang_archs"
