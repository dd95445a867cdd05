#!/usr/bin/env python3
"""Compile-only check of every kernel variant, with no GPU.

NVRTC (loaded through ctypes) compiles each variant the way the runtime does: quoted
includes of kernels/ inlined textually (each header once), one variant per compilation
selected with -DFA_VARIANT_*, PTX for compute_90 and compute_80. A cubin for sm_90 of the
hot variants reports registers and spills. If hipcc is installed, every .hip file is also
built for gfx90a.

NVRTC comes from NVRTC_LIB, or the pip wheel:
  python -m pip install --target /tmp/nvrtc-wheel nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96

Exit status is non-zero on any compile error, any compiler warning, a missing kernel name,
or (with --fail-on-spill) a spill in a hot variant.
"""
import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KDIR = os.path.join(ROOT, "kernels")
DTYPES = ["f32", "f16", "bf16"]
FLASH_FILES = [
    ("flash_attention_nocausal.hip", "flash_attention_nocausal"),
    ("flash_attention_causal.hip", "flash_attention_causal"),
    ("flash_attention.hip", "flash_attention_masked"),
]
# Variants whose register use and spills are reported (and gated with --fail-on-spill).
HOT = [(dt, hd) for dt in ("f32", "bf16") for hd in (64, 128)]


# ---------------------------------------------------------------------------- NVRTC
def find_nvrtc():
    cands = []
    if os.environ.get("NVRTC_LIB"):
        cands.append(os.environ["NVRTC_LIB"])
    for base in ["/tmp/nvrtc-wheel"] + sys.path:
        cands += glob.glob(os.path.join(base, "nvidia", "cu13", "lib", "libnvrtc.so*"))
        cands += glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") + [
        "/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu"]:
        if d:
            cands += glob.glob(os.path.join(d, "libnvrtc.so*"))
    for c in cands:
        if os.path.isfile(c) and "builtins" not in c and "alt" not in os.path.basename(c):
            return c
    sys.exit("nvrtc_check: libnvrtc not found; set NVRTC_LIB or install the pip wheel "
             "(see this script's docstring)")


class Nvrtc:
    def __init__(self, path):
        libdir = os.path.dirname(os.path.realpath(path))
        # libnvrtc dlopens its builtins by soname; loading them first makes that succeed
        # without LD_LIBRARY_PATH (which the loader only reads at process start).
        for b in sorted(glob.glob(os.path.join(libdir, "libnvrtc-builtins.so*"))):
            if ".alt." not in b:
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                break
        self.lib = ctypes.CDLL(path)
        self.path = path
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = (major.value, minor.value)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def compile(self, src, name, opts, want="ptx"):
        """Returns (ok, log, output bytes or None)."""
        lib = self.lib
        prog = ctypes.c_void_p()
        r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
        if r != 0:
            return False, "nvrtcCreateProgram: %s" % lib.nvrtcGetErrorString(r).decode(), None
        enc = [o.encode() for o in opts]
        arr = (ctypes.c_char_p * len(enc))(*enc)
        r = lib.nvrtcCompileProgram(prog, len(enc), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        out = None
        if r == 0:
            getsz, get = ((lib.nvrtcGetPTXSize, lib.nvrtcGetPTX) if want == "ptx"
                          else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN))
            sz = ctypes.c_size_t()
            getsz(prog, ctypes.byref(sz))
            ob = ctypes.create_string_buffer(sz.value)
            get(prog, ob)
            out = ob.raw
        else:
            log = "%s\n%s" % (lib.nvrtcGetErrorString(r).decode(), log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return r == 0, log, out


# ---------------------------------------------------------------------------- sources
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"\s*$')


def inline_includes(path, seen=None):
    """Replaces each quoted include by the file's text (each file once), as the host does."""
    if seen is None:
        seen = set()
    out = []
    name = os.path.basename(path)
    with open(path) as f:
        lines = f.read().split("\n")
    for no, line in enumerate(lines, 1):
        m = INCLUDE_RE.match(line)
        if not m:
            out.append(line)
            continue
        inc = m.group(1)
        if inc in seen:
            out.append("")
            continue
        seen.add(inc)
        out.append('#line 1 "%s"' % inc)
        out.append(inline_includes(os.path.join(KDIR, inc), seen))
        out.append('#line %d "%s"' % (no + 1, name))
    return "\n".join(out)


TILE_RE = re.compile(r"^FA_TILE\(([^)]*)\)")


def tile_rows(prefix="FA_TILE"):
    rows = []
    rx = re.compile(r"^%s\(([^)]*)\)" % prefix)
    with open(os.path.join(KDIR, "flash_config.h")) as f:
        for line in f:
            m = rx.match(line)
            if m:
                parts = [p.strip() for p in m.group(1).split(",")]
                dt, hd, bm, bn, th, sm = parts[0], *map(int, parts[1:])
                rows.append(dict(dt=dt, hd=hd, bm=bm, bn=bn, threads=th, smem=sm))
    return rows


def variant_defines(r):
    return ["-DFA_VARIANT_DT=%s" % r["dt"], "-DFA_VARIANT_HD=%d" % r["hd"],
            "-DFA_VARIANT_BM=%d" % r["bm"], "-DFA_VARIANT_BN=%d" % r["bn"],
            "-DFA_VARIANT_THREADS=%d" % r["threads"], "-DFA_VARIANT_SMEM=%d" % r["smem"]]


def jobs():
    """(label, file, defines, expected kernel names)"""
    out = []
    rows = tile_rows()
    for fname, prefix in FLASH_FILES:
        for r in rows:
            out.append(("%s %s hd%d" % (fname, r["dt"], r["hd"]), fname, variant_defines(r),
                        ["%s_%s_hd%d" % (prefix, r["dt"], r["hd"])], r))
    for dt in DTYPES:
        out.append(("attention_traditional.hip %s" % dt, "attention_traditional.hip",
                    ["-DFA_VARIANT_DT=%s" % dt],
                    ["attn_scores_%s" % dt, "attn_softmax_rows", "attn_pv_%s" % dt], None))
    out.append(("attention_traditional.hip all", "attention_traditional.hip", [],
                ["attn_scores_%s" % d for d in DTYPES] + ["attn_pv_%s" % d for d in DTYPES] +
                ["attn_softmax_rows"], None))
    out.append(("tensor_ops.hip", "tensor_ops.hip", [],
                ["copy_strided_b2", "copy_strided_b4", "fill_b2", "fill_b4"], None))
    return out


ENTRY_RE = re.compile(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)")
WARN_RE = re.compile(r"warning", re.I)
PTXAS_RE = re.compile(
    r"Compiling entry function '([^']+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def amd_devlibs(work="/tmp/fa-amd-devlibs"):
    """ROCm 5.2's device libraries lack gfx1100 and gfx942 ISA-version files; each is one
    constant, derived from a neighbour with llvm-dis/llvm-as. Returns the folder or None."""
    src = "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode"
    dis = shutil.which("llvm-dis-15") or shutil.which("llvm-dis")
    asm = shutil.which("llvm-as-15") or shutil.which("llvm-as")
    if not (os.path.isdir(src) and dis and asm):
        return None
    os.makedirs(work, exist_ok=True)
    for f in glob.glob(os.path.join(src, "*.bc")):
        dst = os.path.join(work, os.path.basename(f))
        if not os.path.exists(dst):
            shutil.copy(f, dst)
    for new, old, a, b in (("1100", "1036", "10306", "11000"), ("942", "940", "9400", "9402")):
        dst = os.path.join(work, "oclc_isa_version_%s.bc" % new)
        if os.path.exists(dst):
            continue
        text = subprocess.run([dis, os.path.join(src, "oclc_isa_version_%s.bc" % old), "-o", "-"],
                              capture_output=True, text=True).stdout
        text = text.replace("i32 %s," % a, "i32 %s," % b)
        subprocess.run([asm, "-o", dst], input=text, text=True, check=True)
    return work


def amd_checks(filt):
    failures = []
    files = [f for f in sorted(glob.glob(os.path.join(KDIR, "*.hip")))
             if not filt or filt in os.path.basename(f)]
    builds = []
    hipcc = shutil.which("hipcc") or ("/usr/bin/hipcc" if os.path.exists("/usr/bin/hipcc") else None)
    if hipcc:
        builds.append(("hipcc gfx90a", lambda f, o: [hipcc, "--genco", "--offload-arch=gfx90a",
                                                      "-I", KDIR, f, "-o", o]))
    else:
        print("\nhipcc not found: gfx90a not checked")
    clang = None
    for v in (21, 20, 19, 18, 17):
        clang = shutil.which("clang++-%d" % v)
        if clang:
            break
    libs = amd_devlibs() if clang else None
    if clang and libs:
        for arch in ("gfx942", "gfx1100"):
            builds.append(("%s %s" % (os.path.basename(clang), arch),
                           lambda f, o, arch=arch: [
                               clang, "-x", "hip", "--offload-arch=" + arch, "--cuda-device-only",
                               "--no-gpu-bundle-output", "-O3", "-std=c++11", "--rocm-path=/usr",
                               "--rocm-device-lib-path=" + libs, "-D__HIP_PLATFORM_AMD__",
                               "-I", KDIR, f, "-o", o]))
    else:
        print("clang >= 17 or ROCm device libraries not found: gfx942/gfx1100 not checked")
    # hipcc asks rocm_agent_enumerator for a GPU unless a target is in the environment.
    env = dict(os.environ, HCC_AMDGPU_TARGET="gfx90a")
    for label, cmd in builds:
        print("\n%s:" % label)
        for f in files:
            outp = "/tmp/nvrtc_check_%s_%s.hsaco" % (label.split()[-1], os.path.basename(f))
            p = subprocess.run(cmd(f, outp), capture_output=True, text=True, env=env)
            log = (p.stderr + p.stdout).strip()
            bad = p.returncode != 0 or "warning" in log.lower()
            print("  %-40s %s" % (os.path.basename(f), "FAIL" if bad else "ok"))
            if log:
                print("    " + log.replace("\n", "\n    "))
            if bad:
                failures.append((os.path.basename(f), label))
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", action="append", help="virtual archs (default compute_90, compute_80)")
    ap.add_argument("--filter", default="", help="only jobs whose label contains this")
    ap.add_argument("--no-report", action="store_true", help="skip the sm_90 register report")
    ap.add_argument("--report-all", action="store_true", help="register report for every flash variant")
    ap.add_argument("--fail-on-spill", action="store_true")
    ap.add_argument("--emit", help="write PTX/cubin files into this directory")
    ap.add_argument("--xmacro", action="store_true",
                    help="also compile each flash file whole (every row, no FA_VARIANT_*)")
    ap.add_argument("--no-amd", action="store_true", help="skip the hipcc / clang AMD builds")
    ap.add_argument("-j", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    archs = args.arch or ["compute_90", "compute_80"]

    nv = Nvrtc(find_nvrtc())
    print("NVRTC %d.%d from %s" % (nv.version + (nv.path,)))
    srcs = {}

    def source(fname):
        if fname not in srcs:
            srcs[fname] = inline_includes(os.path.join(KDIR, fname))
        return srcs[fname]

    base_opts = ["-std=c++17"]
    failures = []
    tasks = []
    for label, fname, defs, names, row in jobs():
        if args.filter and args.filter not in label:
            continue
        for arch in archs:
            tasks.append((label, fname, defs, names, arch))
    if args.xmacro:
        for fname, prefix in FLASH_FILES:
            names = ["%s_%s_hd%d" % (prefix, r["dt"], r["hd"]) for r in tile_rows()]
            for arch in archs:
                tasks.append(("%s (all rows)" % fname, fname, [], names, arch))

    def run(task):
        label, fname, defs, names, arch = task
        ok, log, ptx = nv.compile(source(fname), fname, base_opts + defs +
                                  ["--gpu-architecture=%s" % arch])
        problems = []
        if not ok:
            problems.append("compile failed")
        elif log.strip() and WARN_RE.search(log):
            problems.append("warnings")
        if ok:
            entries = set(ENTRY_RE.findall(ptx.decode(errors="replace")))
            missing = [n for n in names if n not in entries]
            extra = sorted(entries - set(names)) if defs else []
            if missing:
                problems.append("missing kernels %s" % missing)
            if extra:
                problems.append("unexpected kernels %s" % extra)
            if args.emit:
                os.makedirs(args.emit, exist_ok=True)
                tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", "%s_%s" % (label, arch))
                with open(os.path.join(args.emit, tag + ".ptx"), "wb") as f:
                    f.write(ptx.rstrip(b"\0"))
        return label, arch, problems, log

    with ThreadPoolExecutor(max_workers=max(1, args.j)) as ex:
        for label, arch, problems, log in ex.map(run, tasks):
            status = "ok" if not problems else "FAIL (%s)" % ", ".join(problems)
            print("%-48s %-11s %s" % (label, arch, status))
            if log.strip():
                print("    " + log.strip().replace("\n", "\n    "))
            if problems:
                failures.append((label, arch))

    # Registers and spills on sm_90 (what ptxas really does with the hot variants).
    if not args.no_report:
        print("\nsm_90 resource usage (ptxas -v):")
        rep = []
        for fname, prefix in FLASH_FILES:
            for r in tile_rows():
                if args.report_all or (r["dt"], r["hd"]) in HOT:
                    rep.append(("%s %s hd%d" % (fname, r["dt"], r["hd"]), fname, variant_defines(r),
                                (r["dt"], r["hd"]) in HOT))
        rep.append(("attention_traditional.hip f32", "attention_traditional.hip",
                    ["-DFA_VARIANT_DT=f32"], False))
        rep.append(("attention_traditional.hip bf16", "attention_traditional.hip",
                    ["-DFA_VARIANT_DT=bf16"], False))
        rep.append(("tensor_ops.hip", "tensor_ops.hip", [], False))
        rep = [x for x in rep if not args.filter or args.filter in x[0]]

        def run_rep(item):
            label, fname, defs, hot = item
            ok, log, cubin = nv.compile(source(fname), fname, base_opts + defs +
                                        ["--gpu-architecture=sm_90", "--ptxas-options=-v"],
                                        want="cubin")
            if args.emit and ok:
                tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
                with open(os.path.join(args.emit, tag + ".sm_90.cubin"), "wb") as f:
                    f.write(cubin)
            return label, hot, ok, log

        with ThreadPoolExecutor(max_workers=max(1, args.j)) as ex:
            for label, hot, ok, log in ex.map(run_rep, rep):
                if not ok:
                    print("  %-44s FAIL\n    %s" % (label, log.replace("\n", "\n    ")))
                    failures.append((label, "sm_90"))
                    continue
                for m in PTXAS_RE.finditer(log):
                    fn, stack, st, ld, regs = m.group(1), *map(int, m.groups()[1:])
                    spill = st + ld
                    flag = ""
                    if spill and hot:
                        flag = "  <-- SPILLS in a hot variant"
                        if args.fail_on_spill:
                            failures.append((label, "spill"))
                    print("  %-34s regs %3d  stack %4d  spill st/ld %d/%d%s" %
                          (fn, regs, stack, st, ld, flag))

    # AMD: hipcc builds every .hip file for gfx90a when it is installed; clang >= 17 also
    # builds gfx942 (wave64) and gfx1100 (wave32).
    if not args.no_amd:
        failures += amd_checks(args.filter)

    if failures:
        print("\n%d FAILED: %s" % (len(failures), ", ".join("%s [%s]" % f for f in failures)))
        return 1
    print("\nall %d compilations passed" % len(tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
