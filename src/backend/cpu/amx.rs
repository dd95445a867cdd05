//! bf16 attention tasks on the host's AMX tile units (Intel Sapphire Rapids and later).
//!
//! Both products of a key tile run as `tdpbf16ps` tile products: 16 x 16 f32 outputs from
//! 16 x 32 bf16 rows times 32 x 16 bf16 columns, at 16 times the multiply rate of an
//! AVX-512 FMA. Their operands take the tile unit's layouts:
//! - `S = Q K^T`: Q as bf16 rows (copied once per task, unscaled, so no value is rounded
//!   twice); K transposed into pairs, `kt[p][j] = (K[j][2p], K[j][2p + 1])` (a 16 x 16
//!   transpose of 32-bit words per block);
//! - `O += P V`: P rounded to bf16 rows, V interleaved into pairs of keys,
//!   `vv[p][x] = (V[2p][x], V[2p + 1][x])`.
//!
//! K and V tiles are packed once per call for all the query blocks that read them
//! ([`pack_ahead`]), or by each task when that copy would be too large or no other task
//! shares it. Scores are kept row-major (`s[r * block_k + j]`), so the softmax runs along a
//! row's keys, 16 lanes at a time, and writes the weights as bf16 for the second product.
//! Everything else is [`super::task`]'s contract: f32 scores and softmax, the f32 partial
//! output merged into f64 every few tiles, removed keys never read, V rows holding NaN/inf
//! taken out of the product and added back where the key is kept. The differences are
//! P's rounding to bf16 in the second product (the row sums use the f32 weights), an error
//! of at most 2^-9 per weight, and exponentials good to about 3e-6 (not 1e-7): both below
//! the bf16 output's own rounding.
//!
//! The tile registers are enabled per process (Linux `arch_prctl`), configured per thread
//! at the start of each task and released at its end.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use half::bf16;

use rayon::prelude::*;

use super::{
    add_non_finite_key, exp2, finish_rows, merge_partial, try_zeroed, PackedTiles, Plan, RawPtrs,
    Result, Scratch, Work, BLOCK_K, LOG2_E, MERGE_TILES, SCRATCH_BYTES,
};

/// Keys (and head-dim values) one tile row holds: 64 bytes of bf16.
const K_STEP: usize = 32;
/// Rows (and f32 columns) of one tile.
const T_ROWS: usize = 16;

/// Whether this process can run the AMX task: the CPU has AMX-TILE, AMX-BF16 and
/// AVX-512 (F, BW, VL, BF16), and the OS granted the tile data state. Decided once;
/// `FORGE_ATTN_CPU_AMX=0` turns it off (the AVX-512 `gemm` products then run bf16 too).
pub(super) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        if std::env::var_os("FORGE_ATTN_CPU_AMX").is_some_and(|v| v == "0") {
            return false;
        }
        detect()
    })
}

fn detect() -> bool {
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma"))
    {
        return false;
    }
    // Leaf 7 exists on every CPU with AVX-512; EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let edx = __cpuid_count(7, 0).edx;
    if edx >> 22 & 1 == 0 || edx >> 24 & 1 == 0 {
        return false;
    }
    request_tile_data()
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`),
/// process-wide; true when granted (or already held).
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl with this request only changes the process's permitted xsave
    // features; the syscall clobbers rcx and r11 and nothing else.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        )
    };
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// Whether a task of `plan` on element type `dtype` takes the AMX path: bf16, head_dim
/// and key tiles in whole tile rows, and more rows than the direct products serve.
pub(super) fn fits(plan: &Plan, dtype: crate::dtype::DType) -> bool {
    dtype == crate::dtype::DType::BF16
        && plan.head_dim.is_multiple_of(K_STEP)
        && plan.head_dim == plan.dim_pad
        && plan.block_k.is_multiple_of(K_STEP)
        && plan.rows_pad > super::DIRECT_ROWS
}

/// Palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = T_ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

/// Loads [`CONFIG`] on this thread.
///
/// # Safety
/// [`usable`] returned true.
#[inline(always)]
unsafe fn configure() {
    // SAFETY: a valid 64-byte configuration; the tiles are the task's alone.
    unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
}

/// Returns this thread's tile state to its initial (unused) state.
///
/// # Safety
/// [`usable`] returned true.
#[inline(always)]
unsafe fn release() {
    // SAFETY: no tile value is live after a task.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// `s[r * ls + j] = q[r] . k[j]` for rows `0..rows` (a multiple of 16) and keys `0..keys`
/// (a multiple of 32) over `d` values (a multiple of 32): `q` bf16 rows `ldq` apart, `kt`
/// the keys in pairs (`kt[p * ldk + j]` holds values `2p, 2p + 1` of key `j`).
///
/// # Safety
/// The tiles are configured; every element named lies inside its buffer.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scores(
    q: *const u16,
    ldq: usize,
    kt: *const u32,
    ldk: usize,
    d: usize,
    rows: usize,
    keys: usize,
    s: *mut f32,
    ls: usize,
) {
    let (qs, ks, ss) = (ldq * 2, ldk * 4, ls * 4);
    let mut rb = 0;
    while rb < rows {
        let two = rb + 2 * T_ROWS <= rows;
        for jb in (0..keys).step_by(2 * T_ROWS) {
            // SAFETY: rows rb.. (16 or 32) and keys jb..jb + 32 lie inside every buffer.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    out("tmm0") _,
                    out("tmm1") _,
                    out("tmm2") _,
                    out("tmm3") _,
                    options(nostack, nomem)
                );
                for c in (0..d).step_by(K_STEP) {
                    let a0 = q.add(rb * ldq + c);
                    let b0 = kt.add(c / 2 * ldk + jb);
                    let b1 = b0.add(T_ROWS);
                    if two {
                        asm!(
                            "tileloadd tmm4, [{a0} + {qs}*1]",
                            "tileloadd tmm5, [{a1} + {qs}*1]",
                            "tileloadd tmm6, [{b0} + {ks}*1]",
                            "tileloadd tmm7, [{b1} + {ks}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(T_ROWS * ldq),
                            b0 = in(reg) b0,
                            b1 = in(reg) b1,
                            qs = in(reg) qs,
                            ks = in(reg) ks,
                            out("tmm0") _,
                            out("tmm1") _,
                            out("tmm2") _,
                            out("tmm3") _,
                            out("tmm4") _,
                            out("tmm5") _,
                            out("tmm6") _,
                            out("tmm7") _,
                            options(nostack, readonly)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a0} + {qs}*1]",
                            "tileloadd tmm6, [{b0} + {ks}*1]",
                            "tileloadd tmm7, [{b1} + {ks}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            a0 = in(reg) a0,
                            b0 = in(reg) b0,
                            b1 = in(reg) b1,
                            qs = in(reg) qs,
                            ks = in(reg) ks,
                            out("tmm0") _,
                            out("tmm1") _,
                            out("tmm4") _,
                            out("tmm6") _,
                            out("tmm7") _,
                            options(nostack, readonly)
                        );
                    }
                }
                let c0 = s.add(rb * ls + jb);
                store_tiles(c0, ss, ls, two);
            }
        }
        rb += if two { 2 * T_ROWS } else { T_ROWS };
    }
}

/// Stores tiles 0, 1 (and 2, 3 when `two`) as the f32 blocks at `c0`, `c0 + 16` (and 16
/// rows below), rows `ld` elements (`st` bytes) apart.
///
/// # Safety
/// The blocks lie inside their buffer.
#[inline(always)]
unsafe fn store_tiles(c0: *mut f32, st: usize, ld: usize, two: bool) {
    // SAFETY: forwarded.
    unsafe {
        asm!(
            "tilestored [{c0} + {st}*1], tmm0",
            "tilestored [{c1} + {st}*1], tmm1",
            c0 = in(reg) c0,
            c1 = in(reg) c0.add(T_ROWS),
            st = in(reg) st,
            options(nostack)
        );
        if two {
            let c2 = c0.add(T_ROWS * ld);
            asm!(
                "tilestored [{c2} + {st}*1], tmm2",
                "tilestored [{c3} + {st}*1], tmm3",
                c2 = in(reg) c2,
                c3 = in(reg) c2.add(T_ROWS),
                st = in(reg) st,
                options(nostack)
            );
        }
    }
}

/// `o[r * ldo + x] += p[r] . v[.., x]` for rows `0..rows` (a multiple of 16) and columns
/// `0..dp` (a multiple of 32) over keys `0..keys` (a multiple of 32): `p` bf16 rows `ldp`
/// apart, `vv` the keys in pairs (`vv[p * ldv + x]` holds keys `2p, 2p + 1` of column `x`).
///
/// # Safety
/// The tiles are configured; every element named lies inside its buffer.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv(
    p: *const u16,
    ldp: usize,
    vv: *const u32,
    ldv: usize,
    keys: usize,
    rows: usize,
    dp: usize,
    o: *mut f32,
    ldo: usize,
) {
    let (ps, vs, os) = (ldp * 2, ldv * 4, ldo * 4);
    let mut rb = 0;
    while rb < rows {
        let two = rb + 2 * T_ROWS <= rows;
        for xb in (0..dp).step_by(2 * T_ROWS) {
            // SAFETY: rows rb.. (16 or 32), columns xb..xb + 32 and keys 0..keys lie
            // inside every buffer.
            unsafe {
                let c0 = o.add(rb * ldo + xb);
                asm!(
                    "tileloadd tmm0, [{c0} + {os}*1]",
                    "tileloadd tmm1, [{c1} + {os}*1]",
                    c0 = in(reg) c0,
                    c1 = in(reg) c0.add(T_ROWS),
                    os = in(reg) os,
                    out("tmm0") _,
                    out("tmm1") _,
                    options(nostack, readonly)
                );
                if two {
                    let c2 = c0.add(T_ROWS * ldo);
                    asm!(
                        "tileloadd tmm2, [{c2} + {os}*1]",
                        "tileloadd tmm3, [{c3} + {os}*1]",
                        c2 = in(reg) c2,
                        c3 = in(reg) c2.add(T_ROWS),
                        os = in(reg) os,
                        out("tmm2") _,
                        out("tmm3") _,
                        options(nostack, readonly)
                    );
                }
                for kc in (0..keys).step_by(K_STEP) {
                    let a0 = p.add(rb * ldp + kc);
                    let b0 = vv.add(kc / 2 * ldv + xb);
                    let b1 = b0.add(T_ROWS);
                    if two {
                        asm!(
                            "tileloadd tmm4, [{a0} + {ps}*1]",
                            "tileloadd tmm5, [{a1} + {ps}*1]",
                            "tileloadd tmm6, [{b0} + {vs}*1]",
                            "tileloadd tmm7, [{b1} + {vs}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(T_ROWS * ldp),
                            b0 = in(reg) b0,
                            b1 = in(reg) b1,
                            ps = in(reg) ps,
                            vs = in(reg) vs,
                            out("tmm0") _,
                            out("tmm1") _,
                            out("tmm2") _,
                            out("tmm3") _,
                            out("tmm4") _,
                            out("tmm5") _,
                            out("tmm6") _,
                            out("tmm7") _,
                            options(nostack, readonly)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a0} + {ps}*1]",
                            "tileloadd tmm6, [{b0} + {vs}*1]",
                            "tileloadd tmm7, [{b1} + {vs}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            a0 = in(reg) a0,
                            b0 = in(reg) b0,
                            b1 = in(reg) b1,
                            ps = in(reg) ps,
                            vs = in(reg) vs,
                            out("tmm0") _,
                            out("tmm1") _,
                            out("tmm4") _,
                            out("tmm6") _,
                            out("tmm7") _,
                            options(nostack, readonly)
                        );
                    }
                }
                store_tiles(c0, os, ldo, two);
            }
        }
        rb += if two { 2 * T_ROWS } else { T_ROWS };
    }
}

/// Transposes a 16 x 16 block of 32-bit words held as 16 rows.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose16(r: &mut [__m512i; 16]) {
    // Pairs of rows, then pairs of pairs, interleaved inside each 128-bit lane: `b[4i + c]`
    // holds, in lane L, column 4L + c of rows 4i..4i + 4.
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    // Then a 4 x 4 transpose of 128-bit lanes across b[c], b[4 + c], b[8 + c], b[12 + c].
    for c in 0..4 {
        let e0 = _mm512_shuffle_i32x4::<0x44>(b[c], b[4 + c]);
        let e1 = _mm512_shuffle_i32x4::<0xEE>(b[c], b[4 + c]);
        let e2 = _mm512_shuffle_i32x4::<0x44>(b[8 + c], b[12 + c]);
        let e3 = _mm512_shuffle_i32x4::<0xEE>(b[8 + c], b[12 + c]);
        r[c] = _mm512_shuffle_i32x4::<0x88>(e0, e2);
        r[4 + c] = _mm512_shuffle_i32x4::<0xDD>(e0, e2);
        r[8 + c] = _mm512_shuffle_i32x4::<0x88>(e1, e3);
        r[12 + c] = _mm512_shuffle_i32x4::<0xDD>(e1, e3);
    }
}

/// K of `rows.len()` keys (a multiple of 16; each a row of `d` bf16 values, `d` a multiple
/// of 32) into pairs: `kt[p * ldk + j]` holds values `2p, 2p + 1` of key `j`.
///
/// # Safety
/// Each pointer names `d` values; `kt` holds `d / 2` rows of `ldk >= rows.len()` words.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pack_keys(rows: &[*const u16], d: usize, kt: *mut u32, ldk: usize) {
    for jb in (0..rows.len()).step_by(16) {
        for pb in (0..d / 2).step_by(16) {
            // SAFETY: values 2 pb .. 2 pb + 32 of each row, words pb .. pb + 16 of rows
            // pb .. pb + 16 of kt at columns jb .. jb + 16.
            unsafe {
                let mut r = [_mm512_setzero_si512(); 16];
                for (i, x) in r.iter_mut().enumerate() {
                    *x = _mm512_loadu_si512(rows[jb + i].add(2 * pb) as *const _);
                }
                transpose16(&mut r);
                for (i, x) in r.iter().enumerate() {
                    _mm512_storeu_si512(kt.add((pb + i) * ldk + jb) as *mut _, *x);
                }
            }
        }
    }
}

/// V of `rows.len()` keys (even; rows of `d` bf16 values, `d` a multiple of 32) into key
/// pairs: `vv[p * ldv + x]` holds column `x` of keys `2p, 2p + 1`. A row holding NaN or
/// inf enters as zeros and is flagged in the returned mask (bit `j` for key `j`), as in
/// [`super::load_tile`]; rows past `real` are padding and never flagged.
///
/// # Safety
/// Each pointer names `d` values, `zero` `d` zeros; `vv` holds `rows.len() / 2` rows of
/// `ldv >= d` words.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn pack_values(
    rows: &[*const u16],
    real: usize,
    d: usize,
    zero: *const u16,
    vv: *mut u32,
    ldv: usize,
) -> u64 {
    // Word i of the result: value i / 2 of the first row (i even) or the second (odd).
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let exp = _mm512_set1_epi16(0x7f80);
    let mut bad = 0u64;
    for p in 0..rows.len() / 2 {
        let mut pair = [rows[2 * p], rows[2 * p + 1]];
        // A row is non-finite when some value has every exponent bit set.
        for (i, row) in pair.iter_mut().enumerate() {
            let j = 2 * p + i;
            if j >= real {
                continue;
            }
            let mut hit = 0u32;
            for x in (0..d).step_by(32) {
                // SAFETY: 32 values of the row.
                let v = unsafe { _mm512_loadu_si512(row.add(x) as *const _) };
                hit |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, exp), exp);
            }
            if hit != 0 {
                *row = zero;
                bad |= 1 << j;
            }
        }
        for x in (0..d).step_by(16) {
            // SAFETY: values x..x + 16 of both rows, words x..x + 16 of row p of vv.
            unsafe {
                let a = _mm256_loadu_si256(pair[0].add(x) as *const _);
                let b = _mm256_loadu_si256(pair[1].add(x) as *const _);
                let ab = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                let w = _mm512_permutexvar_epi16(idx, ab);
                _mm512_storeu_si512(vv.add(p * ldv + x) as *mut _, w);
            }
        }
    }
    bad
}

/// One row's online softmax step over its scores `scale * s` (row-major), as
/// [`super::online_softmax`] does it across rows: returns the row's new max (the larger
/// of `m_old` and its scores, NaN passed over) and the sum of the weights
/// `e^(scale * s - m_new)` (`m_new = -inf`: weighed against 0), which are written to `w`
/// rounded to bf16, with zeros from `s.len()` to `keys`.
///
/// # Safety
/// `w` holds `keys >= s.len()` values, `keys` a multiple of 16; `scale > 0`.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn softmax_row(s: &[f32], scale: f32, m_old: f32, w: *mut u16, keys: usize) -> (f32, f32) {
    let n = s.len();
    let mask = |c: usize| -> __mmask16 { ((1u32 << n.saturating_sub(c).min(16)) - 1) as __mmask16 };
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m = ninf;
    for c in (0..n).step_by(16) {
        // SAFETY: the masked lanes lie inside `s`.
        let x = unsafe { _mm512_mask_loadu_ps(ninf, mask(c), s.as_ptr().add(c)) };
        // `x > m ? x : m`: a NaN score is passed over.
        m = _mm512_max_ps(x, m);
    }
    // A positive scale keeps the order, so the raw max scales to the scaled one.
    let raw = _mm512_reduce_max_ps(m) * scale;
    let top = if raw > m_old { raw } else { m_old };
    let u = if top == f32::NEG_INFINITY { 0.0 } else { top };
    // The difference is taken before the scaling to log2 units, so scores near -f32::MAX
    // (a huge negative mask value) do not overflow to -inf first.
    let (sc, u, log2e) = (
        _mm512_set1_ps(scale),
        _mm512_set1_ps(u),
        _mm512_set1_ps(LOG2_E),
    );
    let mut sum = _mm512_setzero_ps();
    for c in (0..keys).step_by(16) {
        let k = mask(c);
        // SAFETY: as above; values c..c + 16 of `w`.
        unsafe {
            let x = _mm512_maskz_loadu_ps(k, s.as_ptr().add(c));
            let t = _mm512_mul_ps(_mm512_fmsub_ps(x, sc, u), log2e);
            let e = _mm512_maskz_mov_ps(k, exp2_lanes(t));
            sum = _mm512_add_ps(sum, e);
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(w.add(c) as *mut __m256i, h);
        }
    }
    (top, _mm512_reduce_add_ps(sum))
}

/// `2^x` on 16 lanes for `x <= 0` (to bf16 precision and better: relative error about
/// 3e-6): a degree-5 Taylor polynomial of `2^f`, `f` in [-0.5, 0.5], scaled by `2^n`
/// (`vscalefps`). Below 2^-126 it returns 0, as [`super::exp2`] does (`-inf` included);
/// those lanes are masked out of the scaling, whose subnormal results would each cost a
/// microcode assist. NaN stays NaN.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp2_lanes(x: __m512) -> __m512 {
    const C: [f32; 6] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
    ];
    // NaN compares false, so it is kept (and stays NaN through the polynomial).
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-126.0));
    let xc = _mm512_maskz_mov_ps(keep, x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
    let f = _mm512_sub_ps(xc, n);
    let mut p = _mm512_set1_ps(C[5]);
    for &c in C[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// Points `k_rows` / `v_rows` at the K and V rows of keys `j0..j0 + nk` of pair
/// (`b`, `kvh`), and the rows from `nk` to `nk` rounded up to 32 at `zero`; returns that
/// rounded count.
///
/// # Safety
/// `j0 + nk <= seq_k_of(b)`; see [`super::run`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_rows(
    plan: &Plan,
    raw: RawPtrs,
    b: usize,
    kvh: usize,
    j0: usize,
    nk: usize,
    zero: *const u16,
    k_rows: &mut [*const u16; BLOCK_K],
    v_rows: &mut [*const u16; BLOCK_K],
) -> usize {
    let n32 = nk.next_multiple_of(K_STEP);
    for jj in 0..n32 {
        if jj < nk {
            // SAFETY: key j0 + jj < seq_k of this pair.
            unsafe {
                k_rows[jj] = (raw.k as *const u16).add(plan.key_row(raw, plan.k, b, kvh, j0 + jj));
                v_rows[jj] = (raw.v as *const u16).add(plan.key_row(raw, plan.v, b, kvh, j0 + jj));
            }
        } else {
            k_rows[jj] = zero;
            v_rows[jj] = zero;
        }
    }
    n32
}

/// Every key tile of every pair of `plan`, packed for the products (see
/// [`PackedTiles`]); empty when the copy would pass [`SCRATCH_BYTES`].
///
/// # Safety
/// [`usable`] returned true and [`fits`] holds; see [`super::run`].
pub(super) unsafe fn pack_ahead(plan: &Plan, raw: RawPtrs) -> Result<PackedTiles> {
    let (d, bk) = (plan.head_dim, plan.block_k);
    let pairs = plan.batch * plan.num_kv_heads;
    let tiles = plan.seq_k.div_ceil(bk);
    let words = d / 2 * bk;
    let entries = pairs.saturating_mul(tiles);
    if entries.saturating_mul(words).saturating_mul(8) > SCRATCH_BYTES {
        return Ok(PackedTiles::default());
    }
    let what = "cpu attention packed K/V tiles";
    let mut k = try_zeroed::<u32>(entries * words, what)?;
    let mut v = try_zeroed::<u32>(entries * words, what)?;
    let mut bad = try_zeroed::<u64>(entries, what)?;
    let zero = vec![0u16; d];
    k.par_chunks_mut(words)
        .zip(v.par_chunks_mut(words))
        .zip(bad.par_iter_mut())
        .enumerate()
        .for_each(|(e, ((kt, vv), bad))| {
            let (pair, j0) = (e / tiles, e % tiles * bk);
            let (b, kvh) = (pair / plan.num_kv_heads, pair % plan.num_kv_heads);
            let seq_k = plan.seq_k_of(b);
            if j0 >= seq_k {
                return;
            }
            let nk = bk.min(seq_k - j0);
            let mut k_rows = [zero.as_ptr(); BLOCK_K];
            let mut v_rows = [zero.as_ptr(); BLOCK_K];
            // SAFETY: keys j0..j0 + nk of pair (b, kvh) lie inside the problem (the
            // caller's contract); the tile buffers hold `words` words each.
            unsafe {
                let n32 = tile_rows(
                    plan,
                    raw,
                    b,
                    kvh,
                    j0,
                    nk,
                    zero.as_ptr(),
                    &mut k_rows,
                    &mut v_rows,
                );
                pack_keys(&k_rows[..n32], d, kt.as_mut_ptr(), bk);
                *bad = pack_values(&v_rows[..n32], nk, d, zero.as_ptr(), vv.as_mut_ptr(), d);
            }
        });
    Ok(PackedTiles {
        k,
        v,
        bad,
        tiles,
        words,
    })
}

/// [`super::task`] for bf16 on AMX tiles (see the module docs).
///
/// # Safety
/// [`usable`] returned true and [`fits`] holds for `plan` and bf16; plus [`super::task`]'s
/// contract with `T = bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
pub(super) unsafe fn task(plan: &Plan, raw: RawPtrs, work: Work<'_>, sc: &mut Scratch) {
    let Work {
        pair,
        hc,
        qb,
        keys,
        partial,
        v_bad: _,
        packed,
    } = work;
    let kvh = pair % plan.num_kv_heads;
    let (b, h0, nh, q0, nq) = plan.rows_of(pair, hc, qb);
    let seq_k = plan.seq_k_of(b);
    let (d, bk) = (plan.head_dim, plan.block_k);
    let rows = nh * nq;
    let lt = rows.next_multiple_of(T_ROWS);
    let head_of = |r: usize| h0 + r / nq;
    let query_of = |r: usize| q0 + r % nq;
    let Scratch {
        q: qs,
        kt,
        v: vs,
        s: ss,
        p: ps,
        o: os,
        m: ms,
        l: ls,
        w: ws,
        zero,
        ..
    } = sc;
    // Buffers of other element types in the f32 scratch: Q `[lt, d]` bf16, K pairs
    // `[d / 2, bk]`, V pairs `[bk / 2, d]` (see `Plan::q_floats` and `Scratch::new`).
    let q16 = qs.as_mut_ptr() as *mut u16;
    let kt32 = kt.as_mut_ptr() as *mut u32;
    let vv32 = vs.as_mut_ptr() as *mut u32;
    let zero16 = zero.as_ptr() as *const u16;

    let qp = raw.q as *const u16;
    for r in 0..lt {
        // SAFETY: row r of the task's Q buffer (lt * d bf16 fit in lanes * dim_pad f32).
        let dst = unsafe { std::slice::from_raw_parts_mut(q16.add(r * d), d) };
        if r < rows {
            let off = b * plan.q.batch + head_of(r) * plan.q.head + query_of(r) * plan.q.seq;
            // SAFETY: a row of q inside its view (bf16).
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(qp.add(off), d) });
        } else {
            dst.fill(0);
        }
    }
    // Padding rows weigh nothing; they are never written afterwards.
    ws[rows * bk..lt * bk].fill(0);
    ps[..lt * d].fill(0.0);
    ms[..lt].fill(f32::NEG_INFINITY);
    ls[..lt].fill(0.0);
    let mut unmerged = 0;
    let mut merged = false;

    // SAFETY: usable() (the caller's contract).
    unsafe { configure() };
    let kv_end = plan.visible_end_in(seq_k, q0 + nq - 1).min(keys.end);
    let mut k_rows = [zero16; BLOCK_K];
    let mut v_rows = [zero16; BLOCK_K];
    let mut j0 = keys.start.max(plan.visible_start_in(seq_k, q0) / bk * bk);
    while j0 < kv_end {
        let nk = bk.min(kv_end - j0);
        // SAFETY: forwarded; the ranges lie inside the problem.
        if plan.mask.is_some()
            && unsafe { plan.tile_removed(raw, b, h0..h0 + nh, q0..q0 + nq, j0, nk) }
        {
            j0 += bk;
            continue;
        }
        let n32 = nk.next_multiple_of(K_STEP);
        let (kt_at, vv_at, bad) = match packed {
            Some(pt) => {
                let t = j0 / bk;
                let w = pt.words;
                (pt.k[t * w..].as_ptr(), pt.v[t * w..].as_ptr(), pt.bad[t])
            }
            None => {
                // SAFETY: j0 + nk <= kv_end <= seq_k; rows of d values (zero holds
                // dim_pad f32, so 2 d zero words); kt holds dim_pad * bk f32 >= d / 2 * bk
                // words, vv bk * dim_pad >= bk / 2 * d.
                let bad = unsafe {
                    tile_rows(plan, raw, b, kvh, j0, nk, zero16, &mut k_rows, &mut v_rows);
                    pack_keys(&k_rows[..n32], d, kt32, bk);
                    pack_values(&v_rows[..n32], nk, d, zero16, vv32, d)
                };
                (kt32 as *const u32, vv32 as *const u32, bad)
            }
        };
        // SAFETY: lt rows of the Q buffer, n32 <= bk keys, lt * bk scores.
        unsafe { scores(q16, d, kt_at, bk, d, lt, n32, ss.as_mut_ptr(), bk) };

        // Plain calls scale inside the softmax step; options and masks need the scores in
        // natural units first.
        let shaped = plan.opts.is_some() || plan.mask.is_some();
        for r in 0..rows {
            let i = query_of(r);
            let row = &mut ss[r * bk..r * bk + nk];
            if shaped {
                for x in row.iter_mut() {
                    *x *= plan.q_scale;
                }
            }
            if let Some(o) = &plan.opts {
                o.shape_scores(row, 1, nk, head_of(r), plan.aligned(seq_k, i), j0);
            }
            if let Some(mst) = plan.mask {
                let off = b * mst.batch + head_of(r) * mst.head + i * mst.query + j0;
                // SAFETY: nk keys of one mask row inside the mask view.
                let m = unsafe { std::slice::from_raw_parts(raw.mask.add(off), nk) };
                for (x, &a) in row.iter_mut().zip(m) {
                    *x = if a == f32::NEG_INFINITY {
                        f32::NEG_INFINITY
                    } else {
                        *x + a
                    };
                }
            }
            // -inf whatever the scale.
            let valid = plan.visible_end_in(seq_k, i).saturating_sub(j0).min(nk);
            row[valid..].fill(f32::NEG_INFINITY);
            if plan.opts.is_some() {
                let first = plan.visible_start_in(seq_k, i).saturating_sub(j0).min(nk);
                row[..first].fill(f32::NEG_INFINITY);
            }
            let scale = if shaped { 1.0 } else { plan.q_scale };
            // SAFETY: row r of the weights holds bk >= n32 values.
            let (m_new, sum) =
                unsafe { softmax_row(row, scale, ms[r], ws.as_mut_ptr().add(r * bk), n32) };
            if m_new == f32::NEG_INFINITY {
                ls[r] += sum as f64;
                continue;
            }
            let alpha = exp2::<true>((ms[r] - m_new) * LOG2_E);
            ls[r] = ls[r] * alpha as f64 + sum as f64;
            ms[r] = m_new;
            if alpha != 1.0 {
                for x in &mut ps[r * d..(r + 1) * d] {
                    *x *= alpha;
                }
                if merged {
                    let alpha = alpha as f64;
                    for x in &mut os[r * d..(r + 1) * d] {
                        *x *= alpha;
                    }
                }
            }
        }
        // SAFETY: the product's operands as sized above, lt x d of the partial.
        unsafe { pv(ws.as_ptr(), bk, vv_at, d, n32, lt, d, ps.as_mut_ptr(), d) };
        let mut pending = bad & (u64::MAX >> (64 - nk));
        while pending != 0 {
            let jj = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            // The key's weights, as the product used them, where the scores were.
            for r in 0..rows {
                ss[r * bk + jj] = bf16::from_bits(ws[r * bk + jj]).to_f32();
            }
            // SAFETY: forwarded; j0 + jj < kv_end <= seq_k.
            unsafe {
                add_non_finite_key::<bf16>(
                    plan,
                    raw,
                    b,
                    kvh,
                    j0 + jj,
                    rows,
                    &head_of,
                    &query_of,
                    &ss[jj..],
                    bk,
                    ps,
                )
            };
        }
        j0 += bk;
        unmerged += 1;
        if unmerged == MERGE_TILES && j0 < kv_end {
            merge_partial(&mut os[..rows * d], &mut ps[..rows * d], merged);
            unmerged = 0;
            merged = true;
        }
    }
    // SAFETY: usable().
    unsafe { release() };
    // SAFETY: forwarded.
    unsafe {
        finish_rows::<bf16>(
            plan, raw, b, rows, &head_of, &query_of, ps, os, ms, ls, merged, partial,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn transpose_moves_every_word() {
        if !usable() {
            return;
        }
        let src = words(256, 7);
        let mut r = [unsafe { _mm512_setzero_si512() }; 16];
        for (i, x) in r.iter_mut().enumerate() {
            // SAFETY: 16 words of row i; AVX-512 present (usable).
            *x = unsafe { _mm512_loadu_si512(src[i * 16..].as_ptr() as *const _) };
        }
        // SAFETY: usable() implies AVX-512 F.
        unsafe { transpose16(&mut r) };
        let mut out = vec![0u32; 256];
        for (i, x) in r.iter().enumerate() {
            // SAFETY: 16 words.
            unsafe { _mm512_storeu_si512(out[i * 16..].as_mut_ptr() as *mut _, *x) };
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[j * 16 + i], src[i * 16 + j], "row {i} column {j}");
            }
        }
    }

    #[test]
    fn exp2_lanes_is_accurate_and_keeps_the_special_values() {
        if !usable() {
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| -(i as f32) * 0.037).collect();
        for chunk in xs.chunks_exact(16) {
            let mut out = [0f32; 16];
            // SAFETY: usable() implies AVX-512 F; 16 values each way.
            unsafe {
                let y = exp2_lanes(_mm512_loadu_ps(chunk.as_ptr()));
                _mm512_storeu_ps(out.as_mut_ptr(), y);
            }
            for (&x, &y) in chunk.iter().zip(&out) {
                let want = (x as f64).exp2();
                let err = (y as f64 - want).abs();
                // Below 2^-126 the result is 0.
                assert!(
                    err <= 4e-6 * want + f32::MIN_POSITIVE as f64,
                    "2^{x}: {y} vs {want}"
                );
            }
        }
        let special = [f32::NEG_INFINITY, f32::NAN, 0.0, -1e30];
        let mut v = [0f32; 16];
        v[..4].copy_from_slice(&special);
        // SAFETY: as above.
        unsafe {
            let y = exp2_lanes(_mm512_loadu_ps(v.as_ptr()));
            _mm512_storeu_ps(v.as_mut_ptr(), y);
        }
        assert_eq!(v[0], 0.0);
        assert!(v[1].is_nan());
        assert_eq!(v[2], 1.0);
        assert_eq!(v[3], 0.0);
    }

    fn bf(x: f32) -> u16 {
        bf16::from_f32(x).to_bits()
    }

    fn f(x: u16) -> f64 {
        bf16::from_bits(x).to_f64()
    }

    /// Both tile products against f64 sums of the same bf16 values, with one and two row
    /// blocks and a key count that is not a whole tile.
    #[test]
    fn tile_products_match_f64_sums() {
        if !usable() {
            return;
        }
        let (rows, d, keys, real) = (48, 64, 64, 50);
        let vals = |n: usize, seed: u64| crate::reference::random_values(n, seed);
        let q: Vec<u16> = vals(rows * d, 1).iter().map(|&x| bf(x)).collect();
        let k: Vec<u16> = vals(keys * d, 2).iter().map(|&x| bf(x)).collect();
        let v: Vec<u16> = vals(keys * d, 3).iter().map(|&x| bf(x)).collect();
        let zero = vec![0u16; d];
        let k_rows: Vec<*const u16> = (0..keys)
            .map(|j| {
                if j < real {
                    k[j * d..].as_ptr()
                } else {
                    zero.as_ptr()
                }
            })
            .collect();
        let v_rows: Vec<*const u16> = (0..keys)
            .map(|j| {
                if j < real {
                    v[j * d..].as_ptr()
                } else {
                    zero.as_ptr()
                }
            })
            .collect();
        let mut kt = vec![0u32; d / 2 * keys];
        let mut vv = vec![0u32; keys / 2 * d];
        let mut s = vec![0f32; rows * keys];
        let mut w = vec![0u16; rows * keys];
        let mut o = vec![0.5f32; rows * d];
        // SAFETY: usable(); every buffer as sized for the calls.
        unsafe {
            configure();
            pack_keys(&k_rows, d, kt.as_mut_ptr(), keys);
            let bad = pack_values(&v_rows, real, d, zero.as_ptr(), vv.as_mut_ptr(), d);
            assert_eq!(bad, 0);
            scores(
                q.as_ptr(),
                d,
                kt.as_ptr(),
                keys,
                d,
                rows,
                keys,
                s.as_mut_ptr(),
                keys,
            );
            for r in 0..rows {
                let row = &s[r * keys..r * keys + real];
                let (m, l) = softmax_row(
                    row,
                    0.125,
                    f32::NEG_INFINITY,
                    w.as_mut_ptr().add(r * keys),
                    keys,
                );
                let want_m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) * 0.125;
                let want_l: f64 = row
                    .iter()
                    .map(|&x| ((x * 0.125 - want_m) as f64).exp())
                    .sum();
                assert_eq!(m, want_m);
                assert!(
                    (l as f64 - want_l).abs() < 1e-5 * want_l,
                    "row {r}: {l} vs {want_l}"
                );
            }
            pv(
                w.as_ptr(),
                keys,
                vv.as_ptr(),
                d,
                keys,
                rows,
                d,
                o.as_mut_ptr(),
                d,
            );
            release();
        }
        for r in 0..rows {
            for j in 0..real {
                let want: f64 = (0..d).map(|x| f(q[r * d + x]) * f(k[j * d + x])).sum();
                let got = s[r * keys + j] as f64;
                assert!((got - want).abs() < 1e-4, "score {r},{j}: {got} vs {want}");
            }
            for x in 0..d {
                let want: f64 = 0.5
                    + (0..real)
                        .map(|j| f(w[r * keys + j]) * f(v[j * d + x]))
                        .sum::<f64>();
                let got = o[r * d + x] as f64;
                assert!((got - want).abs() < 1e-4, "output {r},{x}: {got} vs {want}");
            }
            assert!(w[r * keys + real..(r + 1) * keys].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn non_finite_value_rows_are_zeroed_and_flagged() {
        if !usable() {
            return;
        }
        let d = 32;
        let mut v = vec![bf(1.0); 4 * d];
        v[d + 5] = bf(f32::NAN);
        v[3 * d] = bf(f32::INFINITY);
        let zero = vec![0u16; d];
        let rows: Vec<*const u16> = (0..4).map(|j| v[j * d..].as_ptr()).collect();
        let mut vv = vec![0u32; 2 * d];
        // SAFETY: usable(); sizes as the call names.
        let bad = unsafe { pack_values(&rows, 3, d, zero.as_ptr(), vv.as_mut_ptr(), d) };
        // Row 3 is padding (past `real`): packed as it is, never flagged.
        assert_eq!(bad, 0b10);
        for x in 0..d {
            assert_eq!(vv[x], bf(1.0) as u32, "keys 0, 1 column {x}");
            assert_eq!(vv[d + x] & 0xffff, bf(1.0) as u32);
        }
    }
}
