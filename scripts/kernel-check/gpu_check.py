#!/usr/bin/env python3
"""On-GPU check of the kernels, independent of the Rust runtime (CUDA machine with PyTorch).

Compiles variants with NVRTC exactly as nvrtc_check.py does (cubin for the device's arch),
launches them through the driver API (ctypes), and compares with a float64 PyTorch reference:
every flash variant (3 mask modes x 3 dtypes x 9 buckets) on awkward shapes (tile edges,
head_dim < bucket, GQA/MQA, seq_q != seq_k both ways, both layouts, -inf masks with fully
masked rows, lse), the unfused three-launch path, the copy/fill kernels, one case with
offsets past 2^31 elements, then timings.

  python3 scripts/kernel-check/gpu_check.py [--quick] [--bench-only] [--no-bench]
"""
import argparse
import ctypes
import math
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvrtc_check as nc  # noqa: E402

import torch  # noqa: E402

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2}


class AttnParams(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "k", "v", "mask", "out", "lse", "workspace")] +
                [(n, ctypes.c_int64) for n in ("q_sb", "q_sh", "q_ss", "k_sb", "k_sh", "k_ss",
                                               "v_sb", "v_sh", "v_ss", "o_sb", "o_sh", "o_ss",
                                               "m_sb", "m_sh", "m_sq")] +
                [("batch", ctypes.c_int), ("num_heads", ctypes.c_int), ("num_kv_heads", ctypes.c_int),
                 ("seq_q", ctypes.c_int), ("seq_k", ctypes.c_int), ("head_dim", ctypes.c_int),
                 ("scale", ctypes.c_float), ("causal", ctypes.c_int)])


class CopyParams(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("shape", ctypes.c_int64 * 4),
                ("src_strides", ctypes.c_int64 * 4), ("dst_strides", ctypes.c_int64 * 4),
                ("numel", ctypes.c_int64)]


class FillParams(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("value", ctypes.c_uint32), ("numel", ctypes.c_int64)]


class FillParamsB2(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("value", ctypes.c_uint16), ("numel", ctypes.c_int64)]


assert ctypes.sizeof(AttnParams) == 208


# ---------------------------------------------------------------------------- driver
class Driver:
    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        cu = self.cu
        cu.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        cu.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        cu.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        cu.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        cu.cuFuncGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_void_p]
        self.mods = {}

    def check(self, r, what):
        if r != 0:
            raise RuntimeError("%s failed: CUresult %d" % (what, r))

    def load(self, key, cubin):
        mod = ctypes.c_void_p()
        buf = ctypes.create_string_buffer(cubin)
        self.check(self.cu.cuModuleLoadData(ctypes.byref(mod), ctypes.cast(buf, ctypes.c_void_p)),
                   "cuModuleLoadData")
        self.mods[key] = (mod, buf)
        return mod

    def function(self, mod, name, smem=0):
        f = ctypes.c_void_p()
        self.check(self.cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), "get " + name)
        if smem > 48 * 1024:
            self.check(self.cu.cuFuncSetAttribute(f, 8, smem), "smem attr " + name)
        return f

    def regs(self, f):
        v = ctypes.c_int()
        self.cu.cuFuncGetAttribute(ctypes.byref(v), 4, f)  # CU_FUNC_ATTRIBUTE_NUM_REGS
        return v.value

    def launch(self, f, grid, block, smem, params):
        ptr = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        stream = torch.cuda.current_stream().cuda_stream
        self.check(self.cu.cuLaunchKernel(f, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                          smem, stream, ptr, None), "cuLaunchKernel")


# ---------------------------------------------------------------------------- compile
class Kernels:
    def __init__(self, arch, extra=(), nv=None, drv=None):
        self.nv = nv or nc.Nvrtc(nc.find_nvrtc())
        self.extra = list(extra)
        self.arch = arch
        self.drv = drv or Driver()
        self.rows = {(r["dt"], r["hd"]): r for r in nc.tile_rows()}
        self.src = {}
        self.cache = {}

    def _compile(self, fname, defs):
        if fname not in self.src:
            self.src[fname] = nc.inline_includes(os.path.join(nc.KDIR, fname))
        ok, log, cubin = self.nv.compile(self.src[fname], fname,
                                         ["-std=c++17", "--gpu-architecture=" + self.arch] + defs +
                                         self.extra,
                                         want="cubin")
        if not ok:
            raise RuntimeError("compile %s %s:\n%s" % (fname, defs, log))
        return cubin

    def precompile(self, items):
        todo = [it for it in items if it not in self.cache]

        def one(it):
            fname, defs = it
            return it, self._compile(fname, list(defs))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
            for it, cubin in ex.map(one, todo):
                self.cache[it] = cubin

    def flash_item(self, mode, dt, hd):
        fname = nc.FLASH_FILES[mode][0]
        return (fname, tuple(nc.variant_defines(self.rows[(dt, hd)])))

    def flash(self, mode, dt, hd):
        it = self.flash_item(mode, dt, hd)
        if it not in self.cache:
            self.precompile([it])
        key = ("flash", mode, dt, hd, tuple(self.extra))
        if key not in self.drv.mods:
            self.drv.load(key, self.cache[it])
        row = self.rows[(dt, hd)]
        name = "%s_%s_hd%d" % (nc.FLASH_FILES[mode][1], dt, hd)
        return self.drv.function(self.drv.mods[key][0], name, row["smem"]), row

    def module(self, fname, defs=()):
        it = (fname, tuple(defs))
        if it not in self.cache:
            self.precompile([it])
        key = it + (tuple(self.extra),)
        if key not in self.drv.mods:
            self.drv.load(key, self.cache[it])
        return self.drv.mods[key][0]


# ---------------------------------------------------------------------------- helpers
def bucket_of(d):
    for b in (32, 64, 80, 96, 128, 160, 192, 224, 256):
        if d <= b:
            return b
    raise ValueError(d)


def make_qkv(B, Sq, Sk, H, Hkv, D, dt, layout, gen):
    def t(S, Hh):
        if layout == "bshd":
            x = torch.randn(B, S, Hh, D, generator=gen, device="cuda", dtype=torch.float32)
        else:
            x = torch.randn(B, Hh, S, D, generator=gen, device="cuda", dtype=torch.float32).transpose(1, 2)
        return x.to(DT[dt])  # logical [B, S, H, D], strides per layout
    return t(Sq, H), t(Sk, Hkv), t(Sk, Hkv)


def strides_bsh(x):
    # x is logical [B, S, H, D]; returns (sb, sh, ss) in elements
    return x.stride(0), x.stride(2), x.stride(1)


def fill_params(q, k, v, out, mask, lse, ws, B, Sq, Sk, H, Hkv, D, scale, causal):
    p = AttnParams()
    p.q, p.k, p.v, p.out = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.mask = mask.data_ptr() if mask is not None else None
    p.lse = lse.data_ptr() if lse is not None else None
    p.workspace = ws.data_ptr() if ws is not None else None
    p.q_sb, p.q_sh, p.q_ss = strides_bsh(q)
    p.k_sb, p.k_sh, p.k_ss = strides_bsh(k)
    p.v_sb, p.v_sh, p.v_ss = strides_bsh(v)
    p.o_sb, p.o_sh, p.o_ss = strides_bsh(out)
    if mask is not None:  # mask given as a [B, H, Sq, Sk] view (broadcast dims have stride 0)
        p.m_sb, p.m_sh, p.m_sq = mask.stride(0), mask.stride(1), mask.stride(2)
        assert mask.stride(3) == 1
    p.batch, p.num_heads, p.num_kv_heads = B, H, Hkv
    p.seq_q, p.seq_k, p.head_dim = Sq, Sk, D
    p.scale, p.causal = scale, int(causal)
    return p


def reference(q, k, v, mask, scale, causal):
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    qd = q.double().permute(0, 2, 1, 3)
    kd = k.double().permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    vd = v.double().permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    if causal:
        i = torch.arange(Sq, device=q.device).view(-1, 1)
        j = torch.arange(Sk, device=q.device).view(1, -1)
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    p = torch.where(torch.isinf(lse).unsqueeze(-1), torch.zeros_like(p), p)
    o = torch.matmul(p, vd).permute(0, 2, 1, 3)  # [B, Sq, H, D]
    return o, lse


def naive_in_dtype(q, k, v, mask, scale, causal):
    """The same attention done plainly in q's dtype (FlashAttention's yardstick for f16/bf16)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    qd = q.permute(0, 2, 1, 3)
    kd = k.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    vd = v.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(s.dtype)
    if causal:
        i = torch.arange(Sq, device=q.device).view(-1, 1)
        j = torch.arange(Sk, device=q.device).view(1, -1)
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    pr = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.matmul(pr, vd).permute(0, 2, 1, 3)


def rel_err(a, ref):
    a = a.double()
    if torch.isnan(a).any():
        return float("nan")
    den = ref.norm().item()
    return (a - ref).norm().item() / (den if den > 0 else 1.0)


def poison(t):
    if t.dtype == torch.float32:
        t.fill_(float("nan"))
    else:
        t.fill_(float("nan"))


# ---------------------------------------------------------------------------- tests
STATS = []  # f16/bf16: kernel error / naive-in-dtype error, per case


class Results:
    def __init__(self):
        self.fails = []
        self.n = 0

    def check(self, label, cond, detail=""):
        self.n += 1
        if not cond:
            self.fails.append(label + " " + detail)
            print("FAIL", label, detail, flush=True)


def run_flash_case(K, R, mode, dt, D, B, Sq, Sk, H, Hkv, layout, mask_kind, causal, seed, label_extra=""):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dt, layout, gen)
    scale = 1.0 / math.sqrt(D)
    mask = None
    if mask_kind is not None:
        if mask_kind == "full":
            m = torch.randn(B, H, Sq, Sk, generator=gen, device="cuda")
        else:  # broadcast [Sq, Sk]
            m = torch.randn(Sq, Sk, generator=gen, device="cuda").view(1, 1, Sq, Sk).expand(B, H, Sq, Sk)
        base = m if mask_kind == "full" else m[0, 0]
        drop = torch.rand(base.shape, generator=gen, device="cuda") < 0.3
        base.masked_fill_(drop, float("-inf"))
        # fully masked rows (every third query row at least once)
        if mask_kind == "full":
            base[:, :, ::3, :] = float("-inf")
        else:
            base[::3, :] = float("-inf")
        mask = m
    hd_bucket = bucket_of(D)
    f, row = K.flash(mode, dt, hd_bucket)
    out = torch.empty(B, Sq, H, D, device="cuda", dtype=DT[dt])
    if layout == "bhsd":
        out = torch.empty(B, H, Sq, D, device="cuda", dtype=DT[dt]).transpose(1, 2)
    poison(out)
    lse = torch.full((B, H, Sq), float("nan"), device="cuda")
    p = fill_params(q, k, v, out, mask, lse, None, B, Sq, Sk, H, Hkv, D, scale, causal)
    grid = ((Sq + row["bm"] - 1) // row["bm"], H, B)
    K.drv.launch(f, grid, (row["threads"], 1, 1), row["smem"], p)
    torch.cuda.synchronize()
    eff_causal = (mode == 1) or (mode == 2 and causal)
    ref_o, ref_lse = reference(q, k, v, mask if mode == 2 else None, scale, eff_causal)
    e = rel_err(out, ref_o)
    lab = "flash m%d %s D%d B%d Sq%d Sk%d H%d/%d %s mask=%s causal=%d %s" % (
        mode, dt, D, B, Sq, Sk, H, Hkv, layout, mask_kind, int(eff_causal), label_extra)
    R.check(lab, not math.isnan(e) and e < TOL[dt], "out rel err %.3g" % e)
    if dt != "f32":
        en = rel_err(naive_in_dtype(q, k, v, mask if mode == 2 else None, scale, eff_causal), ref_o)
        STATS.append(e / en if en > 0 else 0.0)
        R.check(lab + " vs naive", e <= 2.0 * en + 1e-6 and e < 1e-2,
                "rel err %.3g, naive-in-%s %.3g" % (e, dt, en))
    R.check(lab + " written", not torch.isnan(out).any().item(), "NaN left in output")
    # lse: -inf rows must match exactly; finite rows closely
    inf_ref = torch.isinf(ref_lse)
    ok_inf = bool(((lse == float("-inf")) == inf_ref).all().item())
    fin = ~inf_ref
    lerr = (lse.double()[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    R.check(lab + " lse", ok_inf and lerr < (1e-4 if dt == "f32" else 2e-2),
            "lse inf-match %s max abs err %.3g" % (ok_inf, lerr))
    # fully masked rows must be exactly zero
    if inf_ref.any():
        zr = out.double().permute(0, 2, 1, 3)[inf_ref]
        R.check(lab + " masked rows zero", bool((zr == 0).all().item()), "")
    return e


def test_race_subset(K, R):
    # Smallest set that still crosses several K/V tiles, tile edges and every mask mode.
    for dt in ("f32", "bf16"):
        run_flash_case(K, R, 0, dt, 64, 1, 130, 150, 2, 1, "bshd", None, False, 1)
        run_flash_case(K, R, 1, dt, 120, 1, 140, 200, 1, 1, "bhsd", None, True, 2)
        run_flash_case(K, R, 2, dt, 64, 1, 70, 150, 1, 1, "bshd", "full", True, 3)
    mod = K.module("attention_traditional.hip", ["-DFA_VARIANT_DT=f32"])
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = make_qkv(1, 70, 90, 2, 1, 40, "f32", "bshd", gen)
    out = torch.full((1, 70, 2, 40), float("nan"), device="cuda")
    ws = torch.empty(1, 2, 70, 90, device="cuda")
    p = fill_params(q, k, v, out, None, None, ws, 1, 70, 90, 2, 1, 40, 0.2, True)
    run_traditional(K, mod, "f32", p, 1, 2, 70, 90, 40)
    torch.cuda.synchronize()
    ref, _ = reference(q, k, v, None, 0.2, True)
    R.check("traditional race subset", rel_err(out, ref) < 1e-5, "")


def test_flash(K, R, quick, small=False, only=None):
    dts = ["f32", "bf16", "f16"] if not small else ["f32", "bf16", "f16"]
    if only:
        dts = [d for d in dts if d in only]
    buckets = [32, 64, 80, 96, 128, 160, 192, 224, 256] if not small else [64, 80, 128]
    items = [K.flash_item(m, dt, hd) for m in range(3) for dt in dts for hd in buckets]
    t0 = time.time()
    K.precompile(items)
    print("compiled %d flash variants in %.1fs" % (len(items), time.time() - t0), flush=True)
    seed = 1000
    for dt in dts:
        for hd in buckets:
            for D in sorted({hd, hd - 8 if hd > 32 else hd, 72 if hd == 80 else hd}):
                seed += 1
                run_flash_case(K, R, 0, dt, D, 2, 77, 131, 4, 2, "bshd", None, False, seed)
                run_flash_case(K, R, 1, dt, D, 1, 200, 150, 3, 1, "bhsd", None, True, seed + 1)
                run_flash_case(K, R, 1, dt, D, 2, 33, 300, 2, 2, "bshd", None, True, seed + 2)
                run_flash_case(K, R, 2, dt, D, 2, 70, 90, 4, 2, "bshd", "full", False, seed + 3)
                run_flash_case(K, R, 2, dt, D, 1, 130, 129, 2, 1, "bhsd", "bcast", True, seed + 4)
                run_flash_case(K, R, 2, dt, D, 2, 65, 200, 2, 1, "bshd", None, True, seed + 5)
                run_flash_case(K, R, 2, dt, D, 1, 64, 64, 2, 2, "bshd", None, False, seed + 6)
            if quick:
                break
    if small:
        return
    # decode-like and long sequences
    for dt in dts:
        run_flash_case(K, R, 1, dt, 128, 2, 1, 4097, 8, 2, "bshd", None, True, 7)
        run_flash_case(K, R, 0, dt, 128, 1, 1, 1, 2, 1, "bshd", None, False, 8)
        run_flash_case(K, R, 0, dt, 64, 1, 1000, 3000, 2, 2, "bhsd", None, False, 9)
        run_flash_case(K, R, 1, dt, 128, 1, 1000, 1000, 2, 2, "bhsd", None, True, 10)
        run_flash_case(K, R, 2, dt, 128, 1, 257, 1023, 2, 1, "bshd", "full", True, 11)
    # mask of all -inf everywhere: every row zero, lse -inf
    for dt in dts:
        B, Sq, Sk, H, D = 1, 40, 50, 2, 64
        gen = torch.Generator(device="cuda").manual_seed(5)
        q, k, v = make_qkv(B, Sq, Sk, H, H, D, dt, "bshd", gen)
        m = torch.full((B, H, Sq, Sk), float("-inf"), device="cuda")
        out = torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=DT[dt])
        lse = torch.zeros(B, H, Sq, device="cuda")
        f, row = K.flash(2, dt, 64)
        p = fill_params(q, k, v, out, m, lse, None, B, Sq, Sk, H, H, D, 0.125, True)
        K.drv.launch(f, ((Sq + row["bm"] - 1) // row["bm"], H, B), (row["threads"], 1, 1), row["smem"], p)
        torch.cuda.synchronize()
        R.check("flash all -inf mask %s" % dt, bool((out == 0).all().item()) and
                bool((lse == float("-inf")).all().item()), "")


def test_large_offsets(K, R):
    # q's batch stride exceeds 2^31 elements: batch 1 lives past the 32-bit range.
    dt, D, Sq, Sk, H = "bf16", 128, 100, 100, 2
    off = (1 << 31) + 4096
    try:
        big = torch.empty(off + Sq * H * D, device="cuda", dtype=torch.bfloat16)
    except RuntimeError as e:
        print("skip large offsets:", e)
        return
    gen = torch.Generator(device="cuda").manual_seed(3)
    q0 = torch.randn(2, Sq, H, D, generator=gen, device="cuda").to(torch.bfloat16)
    big[:Sq * H * D].copy_(q0[0].reshape(-1))
    big[off:off + Sq * H * D].copy_(q0[1].reshape(-1))
    q = big.as_strided((2, Sq, H, D), (off, H * D, D, 1))
    _, k, v = make_qkv(2, Sq, Sk, H, H, D, dt, "bshd", gen)
    for mode in (0, 1, 2):
        f, row = K.flash(mode, dt, 128)
        out = torch.full((2, Sq, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
        p = fill_params(q, k, v, out, None, None, None, 2, Sq, Sk, H, H, D, 0.1, mode == 1)
        K.drv.launch(f, ((Sq + row["bm"] - 1) // row["bm"], H, 2), (row["threads"], 1, 1), row["smem"], p)
        torch.cuda.synchronize()
        ref, _ = reference(q0.to(torch.bfloat16), k, v, None, 0.1, mode == 1)
        e = rel_err(out, ref)
        print("flash large offset mode %d: rel err %.3g" % (mode, e))
        R.check("flash large offset mode %d" % mode, e < 1e-2, "rel %.3g" % e)
    # unfused path too
    mod = K.module("attention_traditional.hip", ["-DFA_VARIANT_DT=bf16"])
    out = torch.full((2, Sq, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    ws = torch.empty(2, H, Sq, Sk, device="cuda")
    p = fill_params(q, k, v, out, None, None, ws, 2, Sq, Sk, H, H, D, 0.1, False)
    run_traditional(K, mod, "bf16", p, 2, H, Sq, Sk, D)
    ref, _ = reference(q0.to(torch.bfloat16), k, v, None, 0.1, False)
    e = rel_err(out, ref)
    print("traditional large offset: rel err %.3g" % e)
    R.check("traditional large offset", e < 1e-2, "rel %.3g" % e)
    del big


def test_misaligned(K, R):
    # Pointers 4 bytes off 16-byte alignment and strides that are not multiples of 8
    # elements: the kernels must take their scalar paths and still be right.
    B, Sq, Sk, H, D = 2, 75, 140, 2, 64
    for dt in DT:
        gen = torch.Generator(device="cuda").manual_seed(21)

        def padded(S):
            buf = torch.randn(B * S * H * (D + 1) + 3, generator=gen, device="cuda").to(DT[dt])
            return buf[1:1 + B * S * H * (D + 1)].view(B, S, H, D + 1)[..., :D]
        q, k, v = padded(Sq), padded(Sk), padded(Sk)
        for mode in (0, 1, 2):
            ob = torch.full((B * Sq * H * (D + 1) + 3,), float("nan"), device="cuda", dtype=DT[dt])
            out = ob[1:1 + B * Sq * H * (D + 1)].view(B, Sq, H, D + 1)[..., :D]
            f, row = K.flash(mode, dt, 64)
            p = fill_params(q, k, v, out, None, None, None, B, Sq, Sk, H, H, D, 0.125, mode != 0)
            K.drv.launch(f, ((Sq + row["bm"] - 1) // row["bm"], H, B), (row["threads"], 1, 1), row["smem"], p)
            torch.cuda.synchronize()
            ref, _ = reference(q, k, v, None, 0.125, mode != 0)
            e = rel_err(out, ref)
            untouched = bool(torch.isnan(ob[0]).item()) and bool(torch.isnan(ob.view(-1)[1:].view(-1)[-2:]).all().item())
            R.check("flash misaligned %s mode %d" % (dt, mode), e < TOL[dt] and untouched, "rel %.3g" % e)


def run_traditional(K, mod, dt, p, B, H, Sq, Sk, D):
    fs = K.drv.function(mod, "attn_scores_" + dt)
    fm = K.drv.function(mod, "attn_softmax_rows")
    fp = K.drv.function(mod, "attn_pv_" + dt)
    K.drv.launch(fs, ((Sk + 63) // 64, (Sq + 63) // 64, B * H), (256, 1, 1), 0, p)
    K.drv.launch(fm, (B * H * Sq, 1, 1), (256, 1, 1), 0, p)
    K.drv.launch(fp, ((D + 63) // 64, (Sq + 63) // 64, B * H), (256, 1, 1), 0, p)


def test_traditional(K, R):
    K.precompile([("attention_traditional.hip", ("-DFA_VARIANT_DT=%s" % d,)) for d in DT])
    cases = [
        # B, Sq, Sk, H, Hkv, D, layout, mask, causal
        (2, 77, 131, 4, 2, 64, "bshd", None, False),
        (1, 200, 150, 3, 1, 100, "bhsd", None, True),
        (2, 70, 90, 4, 2, 37, "bshd", "full", False),
        (1, 130, 129, 2, 1, 128, "bhsd", "bcast", True),
        (2, 1, 1000, 4, 4, 256, "bshd", None, True),
        (1, 3, 5, 1, 1, 300, "bshd", "full", True),
    ]
    seed = 77
    for dt in DT:
        mod = K.module("attention_traditional.hip", ["-DFA_VARIANT_DT=%s" % dt])
        for (B, Sq, Sk, H, Hkv, D, layout, mk, causal) in cases:
            seed += 1
            gen = torch.Generator(device="cuda").manual_seed(seed)
            q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, dt, layout, gen)
            mask = None
            if mk == "full":
                mask = torch.randn(B, H, Sq, Sk, generator=gen, device="cuda")
                mask.masked_fill_(torch.rand(mask.shape, generator=gen, device="cuda") < 0.3, float("-inf"))
                mask[:, :, ::3, :] = float("-inf")
            elif mk == "bcast":
                base = torch.randn(Sq, Sk, generator=gen, device="cuda")
                base[::4, :] = float("-inf")
                mask = base.view(1, 1, Sq, Sk).expand(B, H, Sq, Sk)
            out = torch.full((B, Sq, H, D), float("nan"), device="cuda", dtype=DT[dt])
            ws = torch.full((B, H, Sq, Sk), float("nan"), device="cuda")
            scale = 1.0 / math.sqrt(D)
            p = fill_params(q, k, v, out, mask, None, ws, B, Sq, Sk, H, Hkv, D, scale, causal)
            run_traditional(K, mod, dt, p, B, H, Sq, Sk, D)
            torch.cuda.synchronize()
            ref, _ = reference(q, k, v, mask, scale, causal)
            e = rel_err(out, ref)
            R.check("traditional %s B%d Sq%d Sk%d H%d/%d D%d %s mask=%s causal=%d" %
                    (dt, B, Sq, Sk, H, Hkv, D, layout, mk, causal),
                    not math.isnan(e) and e < TOL[dt], "rel %.3g" % e)


def test_tensor_ops(K, R):
    mod = K.module("tensor_ops.hip")
    gen = torch.Generator(device="cuda").manual_seed(9)
    for name, dtype in (("copy_strided_b4", torch.float32), ("copy_strided_b2", torch.bfloat16)):
        f = K.drv.function(mod, name)
        src = torch.randn(3, 5, 7, 9, generator=gen, device="cuda").to(dtype).permute(2, 0, 3, 1)
        big = torch.zeros(7, 10, 9, 5, device="cuda", dtype=dtype)
        dst = big[:, 2:5]  # a view, like a KV-cache slice
        p = CopyParams()
        p.src, p.dst = src.data_ptr(), dst.data_ptr()
        for i in range(4):
            p.shape[i], p.src_strides[i], p.dst_strides[i] = src.shape[i], src.stride(i), dst.stride(i)
        p.numel = src.numel()
        K.drv.launch(f, (min((p.numel + 255) // 256, 4096), 1, 1), (256, 1, 1), 0, p)
        torch.cuda.synchronize()
        ok = torch.equal(dst, src) and big[:, :2].abs().sum().item() == 0 and big[:, 5:].abs().sum().item() == 0
        R.check(name, ok, "")
    for name, dtype, val, P in (("fill_b4", torch.int32, 0x7fc00001, FillParams),
                                ("fill_b2", torch.int16, 0x1234, FillParamsB2)):
        f = K.drv.function(mod, name)
        t = torch.zeros(1000003, device="cuda", dtype=dtype)
        p = P()
        p.dst, p.value, p.numel = t.data_ptr(), val, t.numel()
        K.drv.launch(f, (min((p.numel + 255) // 256, 4096), 1, 1), (256, 1, 1), 0, p)
        torch.cuda.synchronize()
        R.check(name, bool((t == val).all().item()), "")


# ---------------------------------------------------------------------------- bench
def bench_flash(K, dt, D, S, causal, reps=20, with_peer=True):
    B, H = 16384 // S, (2048 // D if D != 256 else 8)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = make_qkv(B, S, S, H, H, D, dt, "bhsd", gen)
    out = torch.empty(B, H, S, D, device="cuda", dtype=DT[dt]).transpose(1, 2)
    mode = 1 if causal else 0
    f, row = K.flash(mode, dt, D)
    p = fill_params(q, k, v, out, None, None, None, B, S, S, H, H, D, 1.0 / math.sqrt(D), causal)
    grid = ((S + row["bm"] - 1) // row["bm"], H, B)

    def run():
        K.drv.launch(f, grid, (row["threads"], 1, 1), row["smem"], p)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = sorted(times)[len(times) // 2]
    flops = 4.0 * B * S * S * H * D / (2 if causal else 1)
    # SDPA's memory-efficient kernel and (f16/bf16) its FlashAttention-2 kernel on the same
    # tensors, for a same-run comparison
    peer = float("nan")
    peer_fa = float("nan")
    if not with_peer:
        return ms, flops / (ms * 1e-3) / 1e12, peer, peer_fa, K.drv.regs(f)
    from torch.nn.attention import sdpa_kernel, SDPBackend
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def time_sdpa(backend):
        with sdpa_kernel([backend]):
            for _ in range(3):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            return flops / (sorted(ts)[len(ts) // 2] * 1e-3) / 1e12
    if dt != "f32":
        try:
            peer_fa = time_sdpa(SDPBackend.FLASH_ATTENTION)
        except Exception as e:  # noqa: BLE001
            print("sdpa flash peer failed:", e)
    try:
        peer = time_sdpa(SDPBackend.EFFICIENT_ATTENTION)
    except Exception as e:  # noqa: BLE001
        print("sdpa peer failed:", e)
    return ms, flops / (ms * 1e-3) / 1e12, peer, peer_fa, K.drv.regs(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", action="store_true", help="a few small cases (for compute-sanitizer)")
    ap.add_argument("--race", action="store_true", help="a handful of cases (for racecheck)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--bench-only", action="store_true")
    ap.add_argument("--dtypes", default="", help="comma list: flash correctness dtypes (default all)")
    ap.add_argument("--bench", default="", help="comma list dt:D:S:causal")
    ap.add_argument("--bench-opts", default="", help="';'-separated extra NVRTC option sets to time")
    args = ap.parse_args()
    torch.zeros(1, device="cuda")  # creates and binds the primary context
    cc = torch.cuda.get_device_capability()
    K = Kernels("sm_%d%d" % cc)
    print("device:", torch.cuda.get_device_name(), "NVRTC %d.%d" % K.nv.version, flush=True)
    R = Results()
    if args.race:
        test_race_subset(K, R)
        print("%d checks, %d failed" % (R.n, len(R.fails)))
        return 1 if R.fails else 0
    if not args.bench_only:
        for name, fn in (("tensor_ops", lambda: test_tensor_ops(K, R)),
                         ("traditional", lambda: test_traditional(K, R)),
                         ("flash", lambda: test_flash(K, R, args.quick, args.small,
                                                      args.dtypes.split(",") if args.dtypes else None)),
                         ("misaligned", lambda: test_misaligned(K, R)),
                         ("large offsets", lambda: None if args.small else test_large_offsets(K, R))):
            t0 = time.time()
            try:
                fn()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                R.fails.append(name + " raised")
            print("%s done in %.1fs" % (name, time.time() - t0), flush=True)
        if STATS:
            print("f16/bf16 error / naive-in-dtype error: max %.2f, median %.2f over %d cases" %
                  (max(STATS), sorted(STATS)[len(STATS) // 2], len(STATS)))
        print("\n%d checks, %d failed" % (R.n, len(R.fails)))
        for f in R.fails[:50]:
            print("  FAIL", f)
    if not args.no_bench:
        cfgs = []
        if args.bench:
            for c in args.bench.split(","):
                dt, D, S, cz = c.split(":")
                cfgs.append((dt, int(D), int(S), cz == "1"))
        else:
            cfgs = [(dt, D, S, cz) for dt in ("f32", "bf16") for D in (64, 128)
                    for S in (512, 2048, 8192) for cz in (False, True)]
        optsets = [""] + [o for o in args.bench_opts.split(";") if o.strip()]
        print("\n%-44s %-5s %4s %6s %6s %9s %8s %8s %8s %5s" % ("opts", "dt", "D", "S", "causal", "ms",
                                                               "TFLOP/s", "sdpa-eff", "sdpa-fa", "regs"))
        for opts in optsets:
            Kb = K if not opts else Kernels(K.arch, opts.split(), nv=K.nv, drv=K.drv)
            for dt, D, S, cz in cfgs:
                try:
                    ms, tf, peer, peer_fa, regs = bench_flash(Kb, dt, D, S, cz, with_peer=(opts == ""))
                    print("%-44s %-5s %4d %6d %6d %9.3f %8.1f %8.1f %8.1f %5d" % (
                        opts or "(default)", dt, D, S, cz, ms, tf, peer, peer_fa, regs), flush=True)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
    return 1 if R.fails else 0


if __name__ == "__main__":
    sys.exit(main())
