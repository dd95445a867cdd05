//! Cached attention for few query rows per KV head (a decode step, a short draft): each
//! task streams the K and V rows of one (sequence, kv head, key range) once, in order,
//! against all the rows of the group held in registers and L1.
//!
//! A task visits its keys in blocks of [`BLOCK`]: the block's scores are dot products of
//! each K row (read where it lies; f16/bf16 widened in registers, never copied) with the
//! rows' scaled queries, then each row's online softmax step, then `O += P V` with the
//! output held in registers a column chunk at a time over the block's V rows (fresh in L1
//! from the score pass, which prefetches them). No tile is packed and nothing is copied, so
//! the work per cached byte stays far below what the memory delivers. Keys are cut into
//! ranges so that every thread has several tasks; the ranges of a row are merged in f64 by
//! log-sum-exp, as the tiled task's are.
//!
//! Numerics are those of the tiled task: scores in f32, weights by the same `exp2`, P V
//! summed in f32 over at most [`MERGE_BLOCKS`] blocks and then added to an f64 sum. A key
//! a row removes (causal cut, window) never meets that row's products: blocks where some
//! row removes a key take each row's P V over its own keys only, so a NaN or inf in a
//! removed key's V reaches no row.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use super::{exp2, fmadd, hsum, try_zeroed, Element, Isa, Plan, RawPtrs, LOG2_E, MR, NR};
use crate::error::Result;

/// Most query rows (query heads of a group times queries) a decode task takes.
pub(super) const DECODE_ROWS: usize = 16;

/// Keys per block: their K rows (and then V rows) stay in L1 between the score pass and
/// the P V pass.
const BLOCK: usize = 32;

/// Keys ahead of the one being scored whose K row is prefetched.
const K_AHEAD: usize = 2 * BLOCK;

/// Blocks whose P V products are summed in f32 before they are added to the f64 output
/// (256 keys: as few terms as the tiled task's f32 partials hold).
const MERGE_BLOCKS: usize = 8;

/// Lanes of one chunk of a row in the portable loops (two AVX2 vectors): the tiled task's,
/// so its pairwise lane sum serves both.
const W: usize = NR;

/// Most bytes of the partial rows of one call; beyond it the keys are cut into fewer
/// ranges.
const PARTIAL_BYTES: usize = 64 << 20;

/// Whether `plan`'s tasks take the decode path: one task holds every query of every head
/// of a group (no query blocks, no head chunks) within [`DECODE_ROWS`] rows, no mask.
pub(super) fn eligible(plan: &Plan) -> bool {
    plan.mask.is_none()
        && plan.head_chunks == 1
        && plan.q_blocks == 1
        && plan.group.saturating_mul(plan.seq_q) <= DECODE_ROWS
}

/// The instruction set the decode task is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The kernel `isa` allows on this CPU (the AVX2 kernel widens f16 with F16C).
    fn of(isa: Isa) -> Kernel {
        #[cfg(test)]
        if let Some(k) = tests::FORCED.with(|f| f.get()) {
            return k;
        }
        match isa {
            Isa::Portable => Kernel::Portable,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma | Isa::Amx => {
                if is_x86_feature_detected!("f16c") {
                    Kernel::Avx2
                } else {
                    Kernel::Portable
                }
            }
        }
    }
}

/// The products of [`task`]: the portable loops or x86 intrinsics (the compiler does not
/// vectorise the portable dot products along the lanes).
const PORTABLE: u8 = 0;
#[cfg(target_arch = "x86_64")]
const AVX2: u8 = 1;

/// A task's working set, reused from task to task.
struct Scratch {
    /// Scaled queries, `[rows_pad, dim_pad]`, padding zero.
    q: Vec<f32>,
    /// Scores, then weights, of one block: `[rows_pad, BLOCK]`.
    s: Vec<f32>,
    /// Unnormalised output of the last few blocks, `[rows_pad, dim_pad]`.
    p: Vec<f32>,
    /// Unnormalised output, f64, `[rows_pad, dim_pad]`.
    o: Vec<f64>,
    /// Running max per row.
    m: Vec<f32>,
    /// Running sum of weights per row.
    l: Vec<f64>,
}

impl Scratch {
    fn new(rows_pad: usize, dp: usize) -> Result<Self> {
        let what = "cpu decode scratch";
        // 64 bytes more each keep two workers' buffers off a shared cache line.
        let f32s = |n: usize| try_zeroed::<f32>(n + 16, what);
        Ok(Scratch {
            q: f32s(rows_pad * dp)?,
            s: f32s(rows_pad * BLOCK)?,
            p: f32s(rows_pad * dp)?,
            o: try_zeroed::<f64>(rows_pad * dp + 8, what)?,
            m: f32s(rows_pad)?,
            l: try_zeroed::<f64>(rows_pad + 8, what)?,
        })
    }
}

/// How many key ranges each (sequence, kv head) pair's keys are cut into and the keys of
/// one range: at least eight tasks per thread where the keys allow (so the threads finish
/// together), ranges of at least `min_split_keys` keys, partial rows within
/// [`PARTIAL_BYTES`].
fn key_splits(plan: &Plan, min_split_keys: usize) -> (usize, usize) {
    let pairs = plan.batch * plan.num_kv_heads;
    let want = 8 * rayon::current_num_threads();
    let per_task_bytes = plan.rows_pad * (plan.head_dim + 2) * 8;
    let splits = want
        .div_ceil(pairs.max(1))
        .min(plan.seq_k.div_ceil(min_split_keys.max(1)))
        .min(PARTIAL_BYTES / pairs.saturating_mul(per_task_bytes).max(1))
        .max(1);
    if splits == 1 {
        return (1, plan.seq_k);
    }
    let split_keys = plan.seq_k.div_ceil(splits).next_multiple_of(BLOCK);
    (plan.seq_k.div_ceil(split_keys), split_keys)
}

/// A pointer to the partial rows of the key-range tasks, each writing its own part.
#[derive(Clone, Copy)]
struct Parts(*mut f64);

// SAFETY: every task writes only its own part of the buffer (see `run`).
unsafe impl Send for Parts {}
unsafe impl Sync for Parts {}

impl Parts {
    /// The `n` values from `i` on (a method, so closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// `i + n` lies inside the buffer and no one else uses those values meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, i: usize, n: usize) -> &mut [f64] {
        // SAFETY: forwarded.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i), n) }
    }
}

/// Runs every decode task of `plan` (see [`eligible`]) on rayon's pool, the keys cut into
/// ranges of at least `min_split_keys` keys when the pairs are too few for the threads,
/// and merges the ranges. Fails only when scratch or the partial rows cannot be had, and
/// then before writing any output.
///
/// # Safety
/// As the tiled task's `run` (`super::cached::attend` states it), with `raw.table` valid
/// for every held key when `plan` is paged.
pub(super) unsafe fn run<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    isa: Isa,
    min_split_keys: usize,
) -> Result<()> {
    let kernel = Kernel::of(isa);
    let pairs = plan.batch * plan.num_kv_heads;
    let (splits, split_keys) = key_splits(plan, min_split_keys);
    let tasks = pairs * splits;
    let rows_pad = plan.rows_pad;
    let dp = plan.head_dim.next_multiple_of(W);
    let workers = rayon::current_num_threads().min(tasks).max(1);
    let mut scratch = Vec::new();
    scratch
        .try_reserve_exact(workers)
        .map_err(|e| crate::error::AttentionError::OutOfMemory {
            device: crate::device::Device::Cpu.to_string(),
            requested_bytes: workers as u64,
            detail: format!("cpu decode scratch: {e}"),
            source: Some(crate::error::ErrorSource::new(e)),
        })?;
    for _ in 0..workers {
        scratch.push(Scratch::new(rows_pad, dp)?);
    }
    let per = rows_pad * (plan.head_dim + 2);
    let mut partials: Vec<f64> = if splits > 1 {
        try_zeroed(tasks * per, "cpu decode partials")?
    } else {
        Vec::new()
    };
    let parts = Parts(partials.as_mut_ptr());
    let next = AtomicUsize::new(0);
    scratch.par_iter_mut().for_each(|sc| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        if t >= tasks {
            break;
        }
        let (pair, s) = (t / splits, t % splits);
        let keys = s * split_keys..((s + 1) * split_keys).min(plan.seq_k);
        // SAFETY: task t alone owns values t*per .. (t+1)*per of the buffer, which
        // outlives the tasks.
        let partial = (splits > 1).then(|| unsafe { parts.part(t * per, per) });
        // SAFETY: forwarded from `run`'s contract.
        unsafe { kernel.task::<T>(plan, raw, pair, keys, sc, partial) }
    });
    if splits > 1 {
        partials
            .par_chunks_mut(splits * per)
            .enumerate()
            .for_each(|(g, ranges)| {
                // SAFETY: forwarded from `run`'s contract; group g (a pair: one task per
                // pair) writes its own rows.
                unsafe { super::cached::merge::<T>(plan, raw, g, ranges) }
            });
    }
    Ok(())
}

impl Kernel {
    /// Runs [`task`] compiled for this kernel's instruction set.
    ///
    /// # Safety
    /// See [`task`]; the CPU has the kernel's instruction set ([`Kernel::of`] checks it).
    #[inline(always)]
    unsafe fn task<T: Element>(
        self,
        plan: &Plan,
        raw: RawPtrs,
        pair: usize,
        keys: Range<usize>,
        sc: &mut Scratch,
        partial: Option<&mut [f64]>,
    ) {
        // SAFETY: forwarded.
        unsafe {
            match self {
                Kernel::Portable => task_portable::<T>(plan, raw, pair, keys, sc, partial),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => task_avx2::<T>(plan, raw, pair, keys, sc, partial),
            }
        }
    }
}

/// [`task`] for the baseline instruction set (fused multiply-add where it is baseline).
///
/// # Safety
/// See [`task`].
unsafe fn task_portable<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    pair: usize,
    keys: Range<usize>,
    sc: &mut Scratch,
    partial: Option<&mut [f64]>,
) {
    // SAFETY: forwarded.
    unsafe {
        task::<T, { cfg!(target_arch = "aarch64") }, PORTABLE>(plan, raw, pair, keys, sc, partial)
    }
}

/// [`task`] compiled with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; see [`task`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    pair: usize,
    keys: Range<usize>,
    sc: &mut Scratch,
    partial: Option<&mut [f64]>,
) {
    // SAFETY: forwarded.
    unsafe { task::<T, true, AVX2>(plan, raw, pair, keys, sc, partial) }
}

/// Asks for the `bytes` from `p` on to be brought into the cache (a hint: it never faults
/// and changes nothing); a no-op off x86-64.
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes).step_by(64) {
        // SAFETY: a prefetch reads nothing architecturally and cannot fault; the address is
        // formed with wrapping arithmetic, never dereferenced.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(off) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// The [`W`] values of `x` widened to f32.
#[inline(always)]
fn widen<T: Element>(x: &[T; W]) -> [f32; W] {
    let mut out = [0.0f32; W];
    for l in 0..W {
        out[l] = x[l].widen();
    }
    out
}

/// The dot products of the `MR` query rows `q[r * dp..]` (zero past `k.len()`) with the
/// key row `k`, one row at a time over the row's chunks (the K row stays in L1 after the
/// first), `W` independent lanes each, the tail one by one.
#[inline(always)]
fn dots<T: Element, const FMA: bool>(q: &[f32], dp: usize, k: &[T]) -> [f32; MR] {
    let (chunks, tail) = k.as_chunks::<W>();
    let base = chunks.len() * W;
    let mut out = [0.0f32; MR];
    for (r, o) in out.iter_mut().enumerate() {
        let row = &q[r * dp..(r + 1) * dp];
        let mut acc = [0.0f32; W];
        for (kc, qc) in chunks.iter().zip(row.as_chunks::<W>().0) {
            for l in 0..W {
                acc[l] = fmadd::<FMA>(qc[l], kc[l].widen(), acc[l]);
            }
        }
        let mut t = hsum(&acc);
        for (x, kx) in tail.iter().enumerate() {
            t = fmadd::<FMA>(row[base + x], kx.widen(), t);
        }
        *o = t;
    }
    out
}

/// `o[r * dp..] += sum_jj w[r * BLOCK + jj] * v_rows[jj]` for the `MR` rows: each column
/// chunk of the rows held in registers over the block's V rows, the tail one by one.
#[inline(always)]
fn axpys<T: Element, const FMA: bool>(w: &[f32], v_rows: &[&[T]], o: &mut [f32], dp: usize) {
    let d = v_rows.first().map_or(0, |v| v.len());
    let full = d / W;
    for c in 0..full {
        let mut acc = [[0.0f32; W]; MR];
        for r in 0..MR {
            acc[r].copy_from_slice(&o[r * dp + c * W..r * dp + (c + 1) * W]);
        }
        for (jj, v) in v_rows.iter().enumerate() {
            let vc = widen(&v.as_chunks::<W>().0[c]);
            for r in 0..MR {
                let p = w[r * BLOCK + jj];
                for l in 0..W {
                    acc[r][l] = fmadd::<FMA>(p, vc[l], acc[r][l]);
                }
            }
        }
        for r in 0..MR {
            o[r * dp + c * W..r * dp + (c + 1) * W].copy_from_slice(&acc[r]);
        }
    }
    for x in full * W..d {
        for r in 0..MR {
            let mut acc = o[r * dp + x];
            for (jj, v) in v_rows.iter().enumerate() {
                acc = fmadd::<FMA>(w[r * BLOCK + jj], v[x].widen(), acc);
            }
            o[r * dp + x] = acc;
        }
    }
}

/// One row's online softmax step over a block's scores `s` ([`BLOCK`] of them, removed
/// keys at `-inf`), lane-wise so it vectorises: the new max (the larger of `m` and the
/// scores; NaN scores are passed over and poison the row through their weights), each
/// score its weight `e^(s - max)` (against 0 while the max is `-inf`: `-inf` scores give
/// 0, a NaN one NaN) and the weights' sum.
#[inline(always)]
fn block_softmax<const FMA: bool>(s: &mut [f32], m: f32) -> (f32, f32) {
    let Some((s, _)) = s.split_first_chunk_mut::<BLOCK>() else {
        return (m, 0.0);
    };
    let mut lanes = [m; W];
    for c in s.as_chunks::<W>().0 {
        for l in 0..W {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let mx = lanes.iter().fold(m, |a, &x| if x > a { x } else { a });
    let u = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
    let mut sums = [0.0f32; W];
    for c in s.as_chunks_mut::<W>().0 {
        for l in 0..W {
            c[l] = exp2::<FMA>((c[l] - u) * LOG2_E);
            sums[l] += c[l];
        }
    }
    (mx, hsum(&sums))
}

/// The products of a decode task in AVX2 (with F16C for f16 rows).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Element, BLOCK, MR};
    use crate::dtype::DType;
    use std::arch::x86_64::*;

    /// 8 values of `p` widened to f32.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `p` reads 8 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<T: Element>(p: *const T) -> __m256 {
        // SAFETY: forwarded; T's bits are those of its DTYPE.
        unsafe {
            match T::DTYPE {
                DType::F32 => _mm256_loadu_ps(p as *const f32),
                DType::BF16 => {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
                _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            }
        }
    }

    /// The sums of four vectors' lanes, side by side.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn sum4(a: [__m256; 4]) -> [f32; 4] {
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        let mut out = [0.0f32; 4];
        // SAFETY: four floats.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    /// `super::dots` in AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `q` holds `MR` rows of `dp >= k.len()` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn dots256<T: Element>(q: *const f32, dp: usize, k: &[T]) -> [f32; MR] {
        let d = k.len();
        let kp = k.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2 * MR];
        let mut c = 0;
        // SAFETY: c + 16 <= d (then c + 8 <= d) values of the key row and each query row.
        unsafe {
            while c + 16 <= d {
                let (k0, k1) = (load8(kp.add(c)), load8(kp.add(c + 8)));
                for r in 0..MR {
                    let qr = q.add(r * dp + c);
                    acc[2 * r] = _mm256_fmadd_ps(_mm256_loadu_ps(qr), k0, acc[2 * r]);
                    acc[2 * r + 1] =
                        _mm256_fmadd_ps(_mm256_loadu_ps(qr.add(8)), k1, acc[2 * r + 1]);
                }
                c += 16;
            }
            if c + 8 <= d {
                let k0 = load8(kp.add(c));
                for r in 0..MR {
                    let qr = q.add(r * dp + c);
                    acc[2 * r] = _mm256_fmadd_ps(_mm256_loadu_ps(qr), k0, acc[2 * r]);
                }
                c += 8;
            }
        }
        let mut out = sum4([0, 1, 2, 3].map(|r| _mm256_add_ps(acc[2 * r], acc[2 * r + 1])));
        for (r, o) in out.iter_mut().enumerate() {
            for (x, kx) in k.iter().enumerate().skip(c) {
                // SAFETY: x < d <= dp, inside query row r.
                *o += unsafe { *q.add(r * dp + x) } * kx.widen();
            }
        }
        out
    }

    /// `super::axpys` in AVX2: 16 columns of the `MR` rows in registers over the V rows.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` holds `MR` rows of [`BLOCK`] weights, `o` `MR`
    /// rows of `dp` floats, every V row `d <= dp` values (all the same length).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn axpys256<T: Element>(w: *const f32, v: &[&[T]], o: *mut f32, dp: usize) {
        let d = v.first().map_or(0, |v| v.len());
        let mut c = 0;
        // SAFETY: columns c..c + 16 (or + 8) < d of each V row and each output row; weights
        // jj < v.len() <= BLOCK of each row.
        unsafe {
            while c + 16 <= d {
                let at = |r: usize| o.add(r * dp + c);
                let mut acc =
                    [0, 1, 2, 3].map(|r| [_mm256_loadu_ps(at(r)), _mm256_loadu_ps(at(r).add(8))]);
                for (jj, row) in v.iter().enumerate() {
                    let p = row.as_ptr().add(c);
                    let (v0, v1) = (load8(p), load8(p.add(8)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*w.add(r * BLOCK + jj));
                        a[0] = _mm256_fmadd_ps(x, v0, a[0]);
                        a[1] = _mm256_fmadd_ps(x, v1, a[1]);
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(at(r), a[0]);
                    _mm256_storeu_ps(at(r).add(8), a[1]);
                }
                c += 16;
            }
            if c + 8 <= d {
                let at = |r: usize| o.add(r * dp + c);
                let mut acc = [0, 1, 2, 3].map(|r| _mm256_loadu_ps(at(r)));
                for (jj, row) in v.iter().enumerate() {
                    let v0 = load8(row.as_ptr().add(c));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*w.add(r * BLOCK + jj)), v0, *a);
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(at(r), *a);
                }
                c += 8;
            }
            for x in c..d {
                for r in 0..MR {
                    let mut acc = *o.add(r * dp + x);
                    for (jj, row) in v.iter().enumerate() {
                        acc += *w.add(r * BLOCK + jj) * row[x].widen();
                    }
                    *o.add(r * dp + x) = acc;
                }
            }
        }
    }
}

/// Computes the rows of (sequence, kv head) pair `pair` over the keys in `keys`: every
/// query of every head of the group. With `partial` (`rows_pad * head_dim` output sums,
/// then `rows_pad` maxima and `rows_pad` weight sums, as `super::cached::merge` reads them)
/// the unnormalised rows go there instead of the output.
///
/// # Safety
/// See [`run`]; `pair < batch * num_kv_heads`, `keys.end <= seq_k`; `sc` was made for
/// `plan`'s rows and head_dim.
#[inline(always)]
unsafe fn task<T: Element, const FMA: bool, const K: u8>(
    plan: &Plan,
    raw: RawPtrs,
    pair: usize,
    keys: Range<usize>,
    sc: &mut Scratch,
    partial: Option<&mut [f64]>,
) {
    let kvh = pair % plan.num_kv_heads;
    let (b, h0, nh, q0, nq) = plan.rows_of(pair, 0, 0);
    let seq_k = plan.seq_k_of(b);
    let d = plan.head_dim;
    let dp = d.next_multiple_of(W);
    let rows = nh * nq;
    let rows_pad = rows.next_multiple_of(MR);
    let head_of = |r: usize| h0 + r / nq;
    let query_of = |r: usize| q0 + r % nq;
    let Scratch {
        q: qs,
        s: ss,
        p: ps,
        o: os,
        m: ms,
        l: ls,
    } = sc;

    let qp = raw.q as *const T;
    for r in 0..rows {
        let off = b * plan.q.batch + head_of(r) * plan.q.head + query_of(r) * plan.q.seq;
        // SAFETY: a row of q inside its view.
        let src = unsafe { std::slice::from_raw_parts(qp.add(off), d) };
        for (x, &s) in qs[r * dp..r * dp + d].iter_mut().zip(src) {
            *x = s.widen() * plan.q_scale;
        }
    }
    // Padding rows: zero queries, finite scores, zero weights, never written out.
    qs[rows * dp..rows_pad * dp].fill(0.0);
    ps[..rows_pad * dp].fill(0.0);
    ms[..rows_pad].fill(f32::NEG_INFINITY);
    ls[..rows_pad].fill(0.0);
    // Each row's keys within the range; the block loop covers their union.
    let span = |r: usize| {
        let i = query_of(r);
        let lo = plan.visible_start_in(seq_k, i).max(keys.start);
        let hi = plan.visible_end_in(seq_k, i).min(keys.end).min(seq_k);
        (lo, hi.max(lo))
    };
    let (mut kv_lo, mut kv_hi) = (usize::MAX, 0);
    for r in 0..rows {
        let (lo, hi) = span(r);
        if lo < hi {
            kv_lo = kv_lo.min(lo);
            kv_hi = kv_hi.max(hi);
        }
    }
    let (kp, vp) = (raw.k as *const T, raw.v as *const T);
    let row_bytes = d * std::mem::size_of::<T>();
    // SAFETY (both): key j < kv_hi <= seq_k_of(b), a row of d values inside its view.
    let k_row = |j: usize| unsafe {
        std::slice::from_raw_parts(kp.add(plan.key_row(raw, plan.k, b, kvh, j)), d)
    };
    let v_row = |j: usize| unsafe {
        std::slice::from_raw_parts(vp.add(plan.key_row(raw, plan.v, b, kvh, j)), d)
    };
    let mut merged = false;
    let mut unmerged = 0;
    let mut j0 = kv_lo;
    let empty: &[T] = &[];
    while j0 < kv_hi {
        let nk = BLOCK.min(kv_hi - j0);
        let mut v_rows = [empty; BLOCK];
        // Scores: each K row once, against every row group; the block's V rows and the
        // next block's K rows are fetched meanwhile.
        for jj in 0..nk {
            let j = j0 + jj;
            let k = k_row(j);
            v_rows[jj] = v_row(j);
            // V is read a column chunk at a time after the scores: its rows come in whole
            // now. K runs ahead by two blocks, so its misses overlap the products.
            prefetch(v_rows[jj].as_ptr() as *const u8, row_bytes);
            if j + K_AHEAD < kv_hi {
                prefetch(k_row(j + K_AHEAD).as_ptr() as *const u8, row_bytes);
            }
            for rb in (0..rows_pad).step_by(MR) {
                let q = &qs[rb * dp..(rb + MR) * dp];
                // SAFETY: MR rows of dp >= d floats, a key row of d values; the kernel's
                // instruction set is the task's.
                let s = unsafe {
                    match K {
                        #[cfg(target_arch = "x86_64")]
                        AVX2 => x86::dots256(q.as_ptr(), dp, k),
                        _ => dots::<T, FMA>(q, dp, k),
                    }
                };
                for r in 0..MR {
                    ss[(rb + r) * BLOCK + jj] = s[r];
                }
            }
        }
        // Options, cuts and the online softmax step, row by row; scores become weights.
        let mut uniform = true;
        for r in 0..rows {
            let (lo, hi) = span(r);
            let lo = lo.saturating_sub(j0).min(nk);
            let hi = hi.saturating_sub(j0).min(nk).max(lo);
            uniform &= lo == 0 && hi == nk;
            let s = &mut ss[r * BLOCK..(r + 1) * BLOCK];
            if let Some(o) = &plan.opts {
                let a = plan.aligned(seq_k, query_of(r));
                o.shape_scores(s, 1, nk, head_of(r), a, j0);
            }
            // Keys past the block's end as well: the fixed-size loops below give them 0.
            s[..lo].fill(f32::NEG_INFINITY);
            s[hi..].fill(f32::NEG_INFINITY);
            let (mx, sum) = block_softmax::<FMA>(s, ms[r]);
            if mx == f32::NEG_INFINITY {
                // Nothing visible yet: the weights are 0 (NaN for a NaN score).
                ls[r] += sum as f64;
                continue;
            }
            let alpha = exp2::<FMA>((ms[r] - mx) * LOG2_E);
            ls[r] = ls[r] * alpha as f64 + sum as f64;
            ms[r] = mx;
            if alpha != 1.0 {
                for x in &mut ps[r * dp..(r + 1) * dp] {
                    *x *= alpha;
                }
                if merged {
                    let alpha = alpha as f64;
                    for x in &mut os[r * dp..(r + 1) * dp] {
                        *x *= alpha;
                    }
                }
            }
        }
        // O += P V.
        if uniform {
            for rb in (0..rows_pad).step_by(MR) {
                let w = &ss[rb * BLOCK..(rb + MR) * BLOCK];
                let o = &mut ps[rb * dp..(rb + MR) * dp];
                // SAFETY: MR rows of BLOCK weights and of dp >= d outputs, V rows of d
                // values; the kernel's instruction set is the task's.
                unsafe {
                    match K {
                        #[cfg(target_arch = "x86_64")]
                        AVX2 => x86::axpys256(w.as_ptr(), &v_rows[..nk], o.as_mut_ptr(), dp),
                        _ => axpys::<T, FMA>(w, &v_rows[..nk], o, dp),
                    }
                }
            }
        } else {
            // Some row removes some key of the block: each row over its own keys only.
            for r in 0..rows {
                let (lo, hi) = span(r);
                let lo = lo.saturating_sub(j0).min(nk);
                let hi = hi.saturating_sub(j0).min(nk).max(lo);
                let o = &mut ps[r * dp..r * dp + d];
                for (jj, v) in v_rows.iter().enumerate().take(hi).skip(lo) {
                    let w = ss[r * BLOCK + jj];
                    for (x, &y) in o.iter_mut().zip(v.iter()) {
                        *x = fmadd::<FMA>(w, y.widen(), *x);
                    }
                }
            }
        }
        j0 += nk;
        unmerged += 1;
        // The last partial is not merged: the output below adds it.
        if unmerged == MERGE_BLOCKS && j0 < kv_hi {
            let (o, p) = (&mut os[..rows * dp], &mut ps[..rows * dp]);
            for (o, p) in o.iter_mut().zip(p.iter_mut()) {
                *o = if merged { *o + *p as f64 } else { *p as f64 };
                *p = 0.0;
            }
            unmerged = 0;
            merged = true;
        }
    }

    let total = |r: usize, x: usize| {
        let p = ps[r * dp + x] as f64;
        if merged {
            os[r * dp + x] + p
        } else {
            p
        }
    };
    if let Some(part) = partial {
        let (o, ml) = part.split_at_mut(rows_pad * d);
        let (m, l) = ml.split_at_mut(rows_pad);
        for r in 0..rows {
            for x in 0..d {
                o[r * d + x] = total(r, x);
            }
            m[r] = ms[r] as f64;
            l[r] = ls[r];
        }
        return;
    }
    let op = raw.out as *mut T;
    for r in 0..rows {
        // SAFETY: this task owns row r of sequence b (its output and its lse element).
        let inv = unsafe { plan.row_scale(&raw, b, head_of(r), query_of(r), ms[r] as f64, ls[r]) };
        let off = b * plan.out.batch + head_of(r) * plan.out.head + query_of(r) * plan.out.seq;
        // SAFETY: one output row inside `out`, written by this task only.
        let dst = unsafe { std::slice::from_raw_parts_mut(op.add(off), d) };
        for (x, v) in dst.iter_mut().enumerate() {
            *v = T::from_f32((total(r, x) * inv) as f32);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::{key_splits, Kernel, BLOCK};
    use crate::backend::cpu::{cached, Isa, Plan};
    use crate::config::{AttentionConfig, Layout};
    use crate::device::Device;
    use crate::dtype::DType;
    use crate::kv_cache::{KvCache, KvCacheSpec};
    use crate::options::AttentionOptions;
    use crate::reference::{
        attention_f64_with, attention_naive_in_dtype_with, random_values, relative_l2_error,
    };
    use crate::tensor::DeviceTensor;
    use crate::KvCacheLayout;
    use std::cell::Cell;

    thread_local! {
        /// The kernel a test makes this thread's calls use (`None`: as detected).
        pub(in super::super) static FORCED: Cell<Option<Kernel>> = const { Cell::new(None) };
    }

    /// Every kernel this CPU can run, with the instruction set that leads to it.
    fn kernels() -> Vec<(Isa, Kernel)> {
        let mut all = vec![(Isa::Portable, Kernel::Portable)];
        #[cfg(target_arch = "x86_64")]
        if Isa::detect().has_avx2() && is_x86_feature_detected!("f16c") {
            all.push((Isa::Avx2Fma, Kernel::Avx2));
        }
        all
    }

    /// A small deterministic generator for the drawn cases.
    struct Draw(u64);

    impl Draw {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    #[derive(Debug, Clone)]
    struct Case {
        group: usize,
        kv_heads: usize,
        head_dim: usize,
        seq_q: usize,
        lens: Vec<usize>,
        causal: bool,
        dtype: DType,
        layout: Layout,
        page: Option<usize>,
        window: Option<(Option<usize>, Option<usize>)>,
        softcap: bool,
        alibi: bool,
        sinks: bool,
        lse: bool,
    }

    fn draw(d: &mut Draw) -> Case {
        let group = [1, 2, 4, 8, 16][d.below(5)];
        let seq_q = 1 + d.below(16 / group);
        let batch = 1 + d.below(3);
        let mut lens: Vec<usize> = (0..batch)
            .map(|_| [0, 1, 5, 31, 33, 200, 700][d.below(7)])
            .collect();
        // A cache holding no token at all is refused before any path runs.
        if lens.iter().all(|&l| l == 0) {
            lens[0] = 33;
        }
        Case {
            group,
            kv_heads: 1 + d.below(2),
            head_dim: [8, 24, 64, 72, 128][d.below(5)],
            seq_q,
            lens,
            causal: d.below(2) == 0,
            dtype: [DType::F32, DType::F16, DType::BF16][d.below(3)],
            layout: [Layout::Bshd, Layout::Bhsd][d.below(2)],
            page: [None, Some(3), Some(16)][d.below(3)],
            window: match d.below(4) {
                0 => Some((Some(d.below(40)), None)),
                1 => Some((Some(d.below(300)), Some(d.below(3)))),
                _ => None,
            },
            softcap: d.below(4) == 0,
            alibi: d.below(4) == 0,
            sinks: d.below(3) == 0,
            lse: d.below(2) == 0,
        }
    }

    fn per_head(h: usize, seed: u64, scale: f32) -> DeviceTensor {
        let v: Vec<f32> = random_values(h, seed).iter().map(|x| x * scale).collect();
        DeviceTensor::from_host(&v, &[h], Device::Cpu).unwrap()
    }

    /// Runs `c` through the cached path under `kernel` with ranges of `min_split` keys and
    /// returns the output's and the log-sum-exp's errors against the f64 reference on each
    /// sequence's own keys, with the naive in-dtype error (0 for f32).
    fn run_case(
        c: &Case,
        isa: Isa,
        kernel: Kernel,
        min_split: usize,
        seed: u64,
    ) -> (f64, f64, f64) {
        let (hk, d, sq) = (c.kv_heads, c.head_dim, c.seq_q);
        let h = hk * c.group;
        let b = c.lens.len();
        let max = c.lens.iter().copied().max().unwrap_or(0);
        let spec = KvCacheSpec {
            batch: b,
            num_kv_heads: hk,
            head_dim: d,
            capacity: max.max(1),
            dtype: c.dtype,
        };
        let mut cache = match c.page {
            None => KvCache::contiguous(spec, KvCacheLayout::Contiguous, Device::Cpu).unwrap(),
            Some(ps) => KvCache::paged(spec, ps, b * max.max(1).div_ceil(ps), Device::Cpu).unwrap(),
        };
        let n = max.max(1);
        let kv = |s: u64| {
            DeviceTensor::from_f32(
                &random_values(b * n * hk * d, s),
                &[b, n, hk, d],
                c.dtype,
                Device::Cpu,
            )
            .unwrap()
        };
        let (kt, vt) = (kv(seed + 1), kv(seed + 2));
        if max > 0 {
            cache.append_ragged(&kt, &vt, &c.lens).unwrap();
        }
        let q_shape = |bb: usize| match c.layout {
            Layout::Bshd => [bb, sq, h, d],
            Layout::Bhsd => [bb, h, sq, d],
        };
        let qv = random_values(b * sq * h * d, seed + 3);
        let q = DeviceTensor::from_f32(&qv, &q_shape(b), c.dtype, Device::Cpu).unwrap();
        let mut o = AttentionOptions::new();
        if let Some((l, r)) = c.window {
            o = o.with_window(l, r);
        }
        if c.softcap {
            o = o.with_softcap(2.0);
        }
        if c.alibi {
            o = o.with_alibi_slopes(per_head(h, seed + 4, 0.1));
        }
        if c.sinks {
            o = o.with_sinks(per_head(h, seed + 5, 2.0));
        }
        let config = AttentionConfig::new(h * d, h, max.max(1))
            .with_num_kv_heads(hk)
            .with_causal(c.causal)
            .with_layout(c.layout);
        let mut out = DeviceTensor::zeros(&q_shape(b), c.dtype, Device::Cpu).unwrap();
        let mut lse = DeviceTensor::zeros(&[b, h, sq], DType::F32, Device::Cpu).unwrap();
        FORCED.with(|f| f.set(Some(kernel)));
        let ran = cached::forward(
            &config,
            &o,
            &q,
            &cache,
            &mut out,
            c.lse.then_some(&mut lse),
            isa,
            min_split,
        );
        FORCED.with(|f| f.set(None));
        ran.unwrap();
        let (got, got_lse) = (out.to_f32_vec().unwrap(), lse.to_f32_vec().unwrap());
        let (kh, vh) = (kt.to_f32_vec().unwrap(), vt.to_f32_vec().unwrap());
        let (mut want, mut want_lse, mut naive, mut got_rows, mut got_lses) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let row = sq * h * d;
        for (bb, &len) in c.lens.iter().enumerate() {
            let qb = DeviceTensor::from_f32(
                &qv[bb * row..(bb + 1) * row],
                &q_shape(1),
                c.dtype,
                Device::Cpu,
            )
            .unwrap();
            got_rows.extend_from_slice(&got[bb * row..(bb + 1) * row]);
            got_lses.extend_from_slice(&got_lse[bb * h * sq..(bb + 1) * h * sq]);
            if len == 0 {
                // No key: zeros, and the sink (or -inf) as log-sum-exp.
                want.extend(std::iter::repeat_n(0.0, row));
                naive.extend(std::iter::repeat_n(0.0, row));
                let sinks = c.sinks.then(|| random_values(h, seed + 5));
                for hh in 0..h {
                    let l = sinks
                        .as_ref()
                        .map_or(f64::NEG_INFINITY, |s| (s[hh] * 2.0) as f64);
                    want_lse.extend(std::iter::repeat_n(l, sq));
                }
                continue;
            }
            let take = |x: &[f32]| {
                let per = n * hk * d;
                DeviceTensor::from_f32(
                    &x[bb * per..bb * per + len * hk * d],
                    &[1, len, hk, d],
                    c.dtype,
                    Device::Cpu,
                )
                .unwrap()
            };
            let (kb, vb) = (take(&kh), take(&vh));
            let cfg = AttentionConfig::new(h * d, h, len)
                .with_num_kv_heads(hk)
                .with_causal(c.causal)
                .with_layout(c.layout);
            // K/V as the layout names them (a permuted view for BHSD).
            let (kb, vb) = match c.layout {
                Layout::Bshd => (kb, vb),
                Layout::Bhsd => (
                    kb.permute(&[0, 2, 1, 3]).unwrap(),
                    vb.permute(&[0, 2, 1, 3]).unwrap(),
                ),
            };
            let (w, wl) = attention_f64_with(&cfg, &o, &qb, &kb, &vb, None).unwrap();
            want.extend(w);
            want_lse.extend(wl);
            naive.extend(
                attention_naive_in_dtype_with(&cfg, &o, &qb, &kb, &vb, None)
                    .unwrap()
                    .into_iter()
                    .map(|x| x as f64),
            );
        }
        let err = relative_l2_error(&got_rows, &want);
        let naive32: Vec<f32> = naive.iter().map(|&x| x as f32).collect();
        let naive_err = relative_l2_error(&naive32, &want);
        let lse_err = if c.lse {
            got_lses
                .iter()
                .zip(&want_lse)
                .map(|(&g, &w)| {
                    if w == f64::NEG_INFINITY {
                        if g == f32::NEG_INFINITY {
                            0.0
                        } else {
                            f64::INFINITY
                        }
                    } else {
                        (g as f64 - w).abs() / w.abs().max(1.0)
                    }
                })
                .fold(0.0, f64::max)
        } else {
            0.0
        };
        (err, lse_err, naive_err)
    }

    /// Drawn shapes (groups, query counts up to 16 rows, head_dims off the chunk size,
    /// ragged and empty sequences, paged and contiguous, both layouts, every dtype and
    /// option) under every kernel, with and without short key ranges, against the f64
    /// reference.
    #[test]
    fn drawn_decode_cases_agree_with_the_reference() {
        let mut d = Draw(7);
        for i in 0..60 {
            let c = draw(&mut d);
            for (isa, kernel) in kernels() {
                for min_split in [cached::MIN_SPLIT_KEYS, 32] {
                    let (err, lse_err, naive) = run_case(&c, isa, kernel, min_split, i);
                    let bound = match c.dtype {
                        DType::F32 => 1e-5,
                        _ => (2.0 * naive).clamp(1e-3, 1e-2),
                    };
                    assert!(
                        err <= bound,
                        "{c:?} {kernel:?} {min_split}: {err:e} > {bound:e}"
                    );
                    assert!(
                        lse_err < 1e-4,
                        "{c:?} {kernel:?} {min_split}: lse {lse_err:e}"
                    );
                }
            }
        }
    }

    /// A long f32 cache split into many short ranges stays within the contract's 1e-5.
    #[test]
    fn many_ranges_over_a_long_cache_stay_within_the_contract() {
        let c = Case {
            group: 4,
            kv_heads: 2,
            head_dim: 128,
            seq_q: 1,
            lens: vec![9000, 4100],
            causal: true,
            dtype: DType::F32,
            layout: Layout::Bshd,
            page: None,
            window: None,
            softcap: false,
            alibi: false,
            sinks: false,
            lse: true,
        };
        for (isa, kernel) in kernels() {
            for min_split in [64, 1 << 20] {
                let (err, lse_err, _) = run_case(&c, isa, kernel, min_split, 3);
                assert!(err < 1e-5, "{kernel:?} {min_split}: {err:e}");
                assert!(lse_err < 1e-5, "{kernel:?} {min_split}: lse {lse_err:e}");
            }
        }
    }

    fn plan(group: usize, seq_q: usize, seq_k: usize) -> Plan {
        let (b, hk, d) = (2, 2, 64);
        let h = group * hk;
        let config = AttentionConfig::new(h * d, h, seq_k).with_num_kv_heads(hk);
        let q = DeviceTensor::zeros(&[b, seq_q, h, d], DType::F32, Device::Cpu).unwrap();
        let k = DeviceTensor::zeros(&[b, seq_k, hk, d], DType::F32, Device::Cpu).unwrap();
        let p = crate::problem::AttentionProblem::new(&config, &q, &k, &k, None).unwrap();
        cached::plan_for_tests(&p)
    }

    /// The decode path takes every call of at most 16 rows per kv head, no other.
    #[test]
    fn the_path_takes_up_to_sixteen_rows_per_kv_head() {
        assert!(super::eligible(&plan(4, 1, 100)));
        assert!(super::eligible(&plan(4, 4, 100)));
        assert!(super::eligible(&plan(16, 1, 100)));
        assert!(super::eligible(&plan(1, 16, 100)));
        assert!(!super::eligible(&plan(4, 5, 100)));
        assert!(!super::eligible(&plan(1, 17, 100)));
    }

    /// Ranges cover the keys in whole blocks, at least `min_split_keys` each, enough for
    /// every thread when the keys allow, one when they do not.
    #[test]
    fn key_ranges_cover_the_keys_and_use_every_thread() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(16)
            .build()
            .unwrap();
        pool.install(|| {
            let p = plan(4, 1, 16384);
            let (splits, keys) = key_splits(&p, 512);
            assert!(splits * 4 >= 8 * 16, "{splits}");
            assert!(splits * keys >= 16384 && (splits - 1) * keys < 16384);
            assert!(keys >= 512 && keys % BLOCK == 0);
            assert_eq!(key_splits(&p, 1 << 20), (1, 16384));
            let short = plan(4, 1, 100);
            assert_eq!(key_splits(&short, 512), (1, 100));
            let (s, k) = key_splits(&short, 10);
            assert!(s > 1 && s * k >= 100 && k % BLOCK == 0);
        });
    }
}
