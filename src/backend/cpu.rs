//! The CPU backend: tiled online-softmax attention over host tensors.
//!
//! Work is split into tasks of (batch, kv head, query block); a task holds the query rows of
//! every query head that shares its kv head (GQA), so a K/V tile serves all of them (for a
//! very large head_dim the group is split over several tasks so a task's rows stay small).
//! Inside a task, keys are visited in tiles with a running max and sum per row (online
//! softmax), so no `[Sq, Sk]` matrix is ever formed, and tiles whose keys every row of the
//! task has removed (causal cut or a `-inf` mask) are skipped without reading them: under a
//! causal mask a query block stops at its last visible key. The tasks are handed out to
//! the threads one at a time, each pair's last query blocks (the most keys) first, so the
//! short ones fill the gaps at the end.
//!
//! A task's two matrix products, `S = Q K^T` over a tile and `O += P V`, are calls of the
//! `gemm` crate (cache- and register-blocked kernels for AVX2+FMA, AVX-512 where enabled,
//! NEON or plain code, chosen at run time), each single-threaded inside its task. f32 K and
//! V rows are read where they lie (any row stride); f16 and bf16 rows are widened a tile at
//! a time into the task's own f32 buffer, so no f32 copy of K/V is ever made. The
//! element-wise work (mask, causal cut, options, online softmax) is compiled for AVX2+FMA
//! as well and picked at run time. On CPUs with AMX (bf16 tiles) bf16 tasks of head dims
//! that are multiples of 32 run both products as tile products instead (`amx.rs`), with
//! each key tile packed once per call for the tile unit. Tasks of few rows (a decode step) take their scores and
//! P V from the K/V rows directly instead (up to `DIRECT_ROWS` rows).
//!
//! Cached attention (`cached.rs`) runs the same task over a `KvCache`'s storage: per-sequence
//! lengths, page lookups for each key row, and optionally one key range per task with the
//! ranges merged afterwards.
//!
//! Numerics (the contract of [`CpuAttentionBackend`]):
//! - Scores are `scale * (q . k) + mask` in f32, as torch computes them; a finite mask value
//!   is added as it is, however negative.
//! - A key is *removed* for a query row when the causal cut hides it or its mask value is
//!   exactly `-inf`. A removed key contributes nothing whatever its K and V hold (NaN and
//!   inf included): its score is replaced, never summed, and its V row never meets its zero
//!   weight (rows of V holding NaN/inf are taken out of the vectorized product and added
//!   back only for the rows that keep the key).
//! - Row sums and outputs are kept in f64; the f32 products of a few key tiles at a time
//!   (`MERGE_TILES`) are summed from zero and then added to them, so the f32 error does
//!   not grow with the number of keys.

use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use rayon::prelude::*;

use super::{AttentionPath, DeviceAttentionBackend};
use crate::config::{AttentionConfig, KvCacheLayout};
use crate::device::Device;
use crate::dtype::{DType, HostElement};
use crate::error::{AttentionError, Result};
use crate::kv_cache::KvCache;
use crate::options::{AttentionOptions, LseStrides};
use crate::problem::{AttentionProblem, HeadStrides, MaskStrides};
use crate::tensor::DeviceTensor;

#[cfg(target_arch = "x86_64")]
mod amx;
mod cached;
mod decode;
pub(crate) mod merge;
mod varlen;

/// Keys per tile at most (a multiple of [`NR`]).
const BLOCK_K: usize = 64;
/// Query rows (group heads x queries) a task aims for: enough to amortise reading a K/V
/// tile, few enough that the task's scratch stays in L2.
const ROWS_TARGET: usize = 128;
/// Rows of the micro-kernel's register block.
const MR: usize = 4;
/// Columns of the micro-kernel's register block (two AVX2 vectors).
const NR: usize = 16;

/// Most bytes of one widened K/V tile pair; a head_dim too large for [`BLOCK_K`] keys gets
/// narrower tiles (down to [`NR`] keys).
const TILE_BYTES: usize = 4 << 20;
/// Most bytes of a task's query and output rows; a head_dim too large for the usual rows
/// gets fewer (down to one row).
const ROWS_BYTES: usize = 8 << 20;
/// Most bytes of per-worker scratch in all; when one scratch is larger, fewer workers run
/// (at least one).
const SCRATCH_BYTES: usize = 1 << 30;

/// Most rows (rounded up to [`MR`]) a task may have for its scores to be taken as direct
/// dot products over the K rows: for a decode step's few rows, a blocked matrix product's
/// packing costs more than the products it feeds, and reading the rows in place (f32) or
/// widening them row by row streams the cache once.
const DIRECT_ROWS: usize = 16;

/// Key tiles whose P V products are summed in f32 before they are added to the f64
/// output accumulator: few enough that the f32 partial stays accurate (a few hundred
/// terms), enough that the f64 additions cost little next to the products.
const MERGE_TILES: usize = 4;

/// Most key tiles whose V rows are checked ahead of the tasks (8 bytes each).
const V_CHECKS_MAX: usize = 1 << 23;

const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// Attention on the host: f32/f16/bf16 tensors on [`Device::Cpu`], any strides with a
/// contiguous head_dim, GQA/MQA, additive masks and bottom-right causal masking. Spreads
/// its tasks over rayon's global thread pool.
///
/// [`forward_cached`](DeviceAttentionBackend::forward_cached) attends over a [`KvCache`]
/// on the host in place: contiguous or paged, each sequence over its own length (causal
/// bottom-right per sequence, a sequence holding no token gives zeros), any number of
/// queries, either layout. One pass over a K/V tile serves every query head of the group
/// and up to 16 queries (more where the group is small), so a decode step reads each cached
/// row once; when (sequence, KV head) tasks are fewer than the threads, the keys are cut
/// into ranges merged in f64 (log-sum-exp), so one sequence still uses every core. The
/// contract below holds there as well.
///
/// Numerical contract, on top of the crate's (f32 within 1e-5 relative L2 of
/// the f64 reference `reference::attention_f64` at any sequence length):
/// - A key is removed for query row `i` when the causal cut hides it (key `j` is visible
///   iff `j <= i + seq_k - seq_q`) or its mask value is exactly `-inf`. Removed keys
///   contribute nothing, whatever K and V hold there (NaN/inf included); a row with every
///   key removed is zeros.
/// - Finite mask values are added to the scaled score in f32, as torch does, however
///   negative: with `-f32::MAX` on every key of a row, each score rounds to `-f32::MAX`,
///   so the row is the uniform average of the V rows (the f64 reference agrees there; it
///   differs for huge masks that f32 rounding blurs and f64 does not, such as `-1e12`).
///   Mixed `0` / `-f32::MAX` gives the softmax over the keys with mask `0`.
/// - A NaN mask value at a key that is not removed, or a NaN/inf in Q, or in K or V at a
///   kept key, makes that row NaN (as torch's softmax does); other rows are unaffected.
#[derive(Debug, Default, Clone)]
pub struct CpuAttentionBackend;

impl CpuAttentionBackend {
    /// A CPU backend.
    pub fn new() -> Self {
        CpuAttentionBackend
    }
}

impl DeviceAttentionBackend for CpuAttentionBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn required_kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout::Contiguous
    }

    fn forward_into(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        forward_tuned(config, q, k, v, mask, out, Tuning::detect())
    }

    /// Every option on every call (see [`crate::options`]): key tiles wholly outside the
    /// window are never read, so the cost follows the window; softcap, ALiBi and sinks are
    /// applied per tile row in f32 (the sinks' and the log-sum-exp's final step in f64), so
    /// the numerical contract of [`forward_into`](DeviceAttentionBackend::forward_into)
    /// holds with them.
    fn forward_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        forward_opts(config, options, q, k, v, mask, out, lse, Tuning::detect())
    }

    /// Every option the configuration validates with; see
    /// [`forward_with`](DeviceAttentionBackend::forward_with).
    fn supports_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
    ) -> super::Support {
        match options.validate() {
            Ok(()) => self.supports(config),
            Err(e) => super::Support::No(e.to_string()),
        }
    }

    /// Attention over `cache` in place, whatever its layout: contiguous or paged, each
    /// sequence over its own length, any number of queries, with the numerical contract of
    /// [`forward_into`](DeviceAttentionBackend::forward_into) (see [`CpuAttentionBackend`]).
    fn forward_cached(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        let plain = AttentionOptions::default();
        cached::forward(
            config,
            &plain,
            q,
            cache,
            out,
            None,
            Isa::detect(),
            cached::MIN_SPLIT_KEYS,
        )
    }

    /// Each sequence over views of the packed operands (no copy), by the tiled task of
    /// [`forward_with`](DeviceAttentionBackend::forward_with); a sequence with no key
    /// gives zeros (and its sink, or `-inf`, as log-sum-exp), one with no query is skipped.
    fn forward_varlen(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        batch: &crate::varlen::VarlenBatch,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        varlen::forward_varlen(config, options, q, k, v, batch, out, lse, Tuning::detect())
    }

    /// K/V read through the block table in place (the tiles a task visits are gathered
    /// page by page into its scratch), by the task of
    /// [`forward_cached`](DeviceAttentionBackend::forward_cached): any page size, either
    /// pool layout, any number of queries, every option.
    fn forward_paged(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        kv: &crate::paged::PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let (isa, split) = (Isa::detect(), cached::MIN_SPLIT_KEYS);
        varlen::forward_paged(config, options, q, kv, out, lse, isa, split)
    }

    /// [`forward_paged`](DeviceAttentionBackend::forward_paged) one sequence at a time
    /// over views of the packed queries.
    fn forward_paged_varlen(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cu_seqlens_q: &DeviceTensor,
        max_seqlen_q: usize,
        kv: &crate::paged::PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let (isa, split) = (Isa::detect(), cached::MIN_SPLIT_KEYS);
        varlen::forward_paged_varlen(
            config,
            options,
            q,
            cu_seqlens_q,
            max_seqlen_q,
            kv,
            out,
            lse,
            isa,
            split,
        )
    }

    /// Every option over every cache, as [`forward_with`](DeviceAttentionBackend::forward_with)
    /// runs them; each sequence's aligned diagonal is `i + L - Sq` for its own length `L`.
    fn forward_cached_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let (isa, split) = (Isa::detect(), cached::MIN_SPLIT_KEYS);
        cached::forward(config, options, q, cache, out, lse, isa, split)
    }
}

/// How a call runs: the instruction set of the element-wise code and whether f32 K/V rows
/// are read where they lie. Tests set them to reach the paths this machine (or f32) would
/// not take.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    isa: Isa,
    in_place: bool,
}

impl Tuning {
    fn detect() -> Self {
        Tuning {
            isa: Isa::detect(),
            in_place: true,
        }
    }
}

/// `forward_into` under an explicit [`Tuning`].
fn forward_tuned(
    config: &AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
    out: &mut DeviceTensor,
    tuning: Tuning,
) -> Result<AttentionPath> {
    let plain = AttentionOptions::default();
    forward_opts(config, &plain, q, k, v, mask, out, None, tuning)
}

/// `forward_with` under an explicit [`Tuning`].
#[allow(clippy::too_many_arguments)]
fn forward_opts(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
    out: &mut DeviceTensor,
    lse: Option<&mut DeviceTensor>,
    tuning: Tuning,
) -> Result<AttentionPath> {
    let problem = AttentionProblem::new(config, q, k, v, mask)?;
    let mut inputs = vec![q, k, v];
    inputs.extend(mask);
    inputs.extend(options.alibi_slopes.as_ref());
    inputs.extend(options.sinks.as_ref());
    let os = problem.output_strides(config.layout, out, &inputs)?;
    let mut others = inputs.clone();
    others.push(&*out);
    let lse_strides = options.check(&problem, lse.as_deref(), &others)?;
    if problem.device != Device::Cpu {
        return Err(AttentionError::DeviceMismatch {
            what: "q".into(),
            expected: Device::Cpu.to_string(),
            got: problem.device.to_string(),
        });
    }
    execute(
        &problem,
        os,
        options,
        [q, k, v],
        mask,
        out,
        lse.zip(lse_strides),
        tuning,
    )
}

/// Runs a validated dense call: `problem` (with `os`, the output strides) was checked
/// against the operands, the options' per-head tensors and `lse` (with its strides) too.
#[allow(clippy::too_many_arguments)]
fn execute(
    problem: &AttentionProblem,
    os: HeadStrides,
    options: &AttentionOptions,
    [q, k, v]: [&DeviceTensor; 3],
    mask: Option<&DeviceTensor>,
    out: &mut DeviceTensor,
    lse: Option<(&mut DeviceTensor, LseStrides)>,
    tuning: Tuning,
) -> Result<AttentionPath> {
    let (lse, lse_strides) = match lse {
        Some((l, st)) => (Some(l), Some(st)),
        None => (None, None),
    };
    let mut inputs = vec![q, k, v];
    inputs.extend(mask);
    inputs.extend(options.alibi_slopes.as_ref());
    inputs.extend(options.sinks.as_ref());
    let mut writes = vec![&*out];
    writes.extend(lse.as_deref());
    // Tasks write disjoint (batch, head, query) rows in parallel; that is only sound if
    // distinct indices never name the same element, which `output_strides` (and
    // `check_lse`) checked. Held until the tasks are done: no other thread writes the
    // inputs or touches `out` and `lse`.
    let _access = crate::tensor::HostAccess::acquire(&inputs, &writes)?;
    let host = |t: &DeviceTensor, what: &str| {
        t.host_ptr().ok_or_else(|| AttentionError::DeviceMismatch {
            what: what.into(),
            expected: Device::Cpu.to_string(),
            got: t.device().to_string(),
        })
    };
    let raw = RawPtrs {
        q: host(q, "q")?,
        k: host(k, "k")?,
        v: host(v, "v")?,
        mask: match mask {
            Some(m) => host(m, "mask")? as *const f32,
            None => std::ptr::null(),
        },
        out: host(out, "out")?,
        table: std::ptr::null(),
        lse: match lse.as_deref() {
            Some(l) => host(l, "lse")? as *mut f32,
            None => std::ptr::null_mut(),
        },
    };
    let mut plan = Plan::new(problem, os);
    plan.in_place = tuning.in_place;
    // SAFETY: `options.check` checked the per-head tensors; `_access` covers them.
    plan.opts = unsafe { row_options(options, problem.num_heads, lse_strides) }?;
    // SAFETY: `problem` checked every operand's shape against the others and each view
    // lies inside its buffer; `out` is on the host, overlaps no input and has distinct
    // elements, so the parallel tasks' writes never alias a read or each other; `_access`
    // keeps other threads off these ranges.
    unsafe {
        match problem.dtype {
            DType::F32 => run::<f32>(&plan, raw, tuning.isa),
            DType::F16 => run::<f16>(&plan, raw, tuning.isa),
            DType::BF16 => run::<bf16>(&plan, raw, tuning.isa),
            // AttentionProblem::new refused these already.
            d @ (DType::I32 | DType::U32 | DType::I64) => d.check_attention("q"),
        }
    }?;
    Ok(AttentionPath::Cpu)
}

/// The options as the tasks apply them, `None` for a plain call without `lse` (whose task
/// loop then runs exactly as without options).
///
/// # Safety
/// The per-head tensors were checked (f32 `[heads]`) and a [`HostAccess`] covering them is
/// held.
///
/// [`HostAccess`]: crate::tensor::HostAccess
unsafe fn row_options(
    options: &AttentionOptions,
    heads: usize,
    lse: Option<LseStrides>,
) -> Result<Option<Box<RowOptions>>> {
    if options.is_default() && lse.is_none() {
        return Ok(None);
    }
    let per_head = |t: &Option<DeviceTensor>, what: &str| -> Result<Option<Vec<f32>>> {
        let Some(t) = t else { return Ok(None) };
        let p = t.host_ptr().ok_or_else(|| AttentionError::DeviceMismatch {
            what: what.into(),
            expected: Device::Cpu.to_string(),
            got: t.device().to_string(),
        })? as *const f32;
        let st = t.strides()[0];
        // SAFETY: h < heads elements of a checked `[heads]` f32 view (see the contract).
        Ok(Some(
            (0..heads).map(|h| unsafe { *p.add(h * st) }).collect(),
        ))
    };
    Ok(Some(Box::new(RowOptions {
        left: options.window_left,
        right: options.window_right,
        softcap: options.softcap,
        alibi: per_head(&options.alibi_slopes, "alibi_slopes")?,
        sinks: per_head(&options.sinks, "sinks")?,
        lse,
    })))
}

/// Host base pointers of the operands (bytes, view offsets applied).
#[derive(Clone, Copy)]
struct RawPtrs {
    q: *mut u8,
    k: *mut u8,
    v: *mut u8,
    mask: *const f32,
    out: *mut u8,
    /// Block table of paged K/V (`[batch, max_pages]` page ids), null otherwise.
    table: *const i32,
    /// Log-sum-exp output (f32, strides in [`RowOptions::lse`]), null otherwise.
    lse: *mut f32,
}

// SAFETY: the pointers are only dereferenced inside `run`, under the aliasing rules stated
// at its call site (inputs are read-only, every task writes its own output rows).
unsafe impl Send for RawPtrs {}
unsafe impl Sync for RawPtrs {}

impl Plan {
    /// The factor that turns row (b, head, query)'s output sum into its output, from its
    /// max `m` and weight sum `l`: 1 / l, 0 when no key was visible (that row's output is
    /// zero by contract), NaN for a NaN l (a poisoned row); with options the sink-aware
    /// factor, the row's log-sum-exp then written to `raw.lse` when asked for.
    ///
    /// # Safety
    /// The caller is the one task writing that row (its lse element included).
    unsafe fn row_scale(
        &self,
        raw: &RawPtrs,
        b: usize,
        head: usize,
        query: usize,
        m: f64,
        l: f64,
    ) -> f64 {
        match &self.opts {
            None => {
                if l == 0.0 {
                    0.0
                } else {
                    1.0 / l
                }
            }
            Some(o) => {
                let (inv, lse) = o.finish(m, l, head);
                if let Some(st) = o.lse {
                    let at = b * st.batch + head * st.head + query * st.query;
                    // SAFETY: one element of `lse`, written by this task only (the caller's
                    // contract).
                    unsafe { *raw.lse.add(at) = lse as f32 };
                }
                inv
            }
        }
    }
}

/// Everything a task needs besides the data: sizes, strides and tiling.
struct Plan {
    batch: usize,
    seq_q: usize,
    seq_k: usize,
    num_kv_heads: usize,
    head_dim: usize,
    group: usize,
    causal: bool,
    /// Scale folded into Q on load; scores are in natural units, so a mask value is added
    /// as it is (never multiplied, which could overflow a huge one to -inf).
    q_scale: f32,
    q: HeadStrides,
    k: HeadStrides,
    v: HeadStrides,
    out: HeadStrides,
    mask: Option<MaskStrides>,
    /// Keys per tile, a multiple of [`NR`], at most [`BLOCK_K`].
    block_k: usize,
    /// Query heads per task (all of the group unless head_dim is very large).
    heads_per_task: usize,
    /// Tasks the group's heads are split over.
    head_chunks: usize,
    /// Queries per task.
    block_q: usize,
    /// Query blocks per (batch, kv head).
    q_blocks: usize,
    /// head_dim rounded up to [`NR`].
    dim_pad: usize,
    /// Most rows a task has, rounded up to [`MR`].
    rows_pad: usize,
    /// Whether f32 K/V rows of unpaged views are given to the matrix products where they
    /// lie (else they are copied into the task's tile buffers, as other types are widened).
    in_place: bool,
    /// Keys of each sequence when they differ (a ragged cache); empty: `seq_k` for all.
    lens: Vec<usize>,
    /// Paged K/V: key `j` of sequence `b` lies at position `j % page_size` of page
    /// `table[b * max_pages + j / page_size]`, the page taking the place of the batch.
    paging: Option<Paging>,
    /// Per-call options; `None` for plain attention, whose loop then has no option code
    /// but a branch per row and tile.
    opts: Option<Box<RowOptions>>,
}

/// The per-call options as a task applies them (see [`crate::options`]).
#[derive(Debug, Default)]
struct RowOptions {
    left: Option<usize>,
    right: Option<usize>,
    softcap: Option<f32>,
    /// ALiBi slope of each query head.
    alibi: Option<Vec<f32>>,
    /// Sink logit of each query head.
    sinks: Option<Vec<f32>>,
    /// Strides of the log-sum-exp output, when there is one.
    lse: Option<LseStrides>,
}

impl RowOptions {
    /// Softcap, then ALiBi, on the scores `s[jj * stride]` of keys `j0 + jj`, `jj < n`, for
    /// query head `h` whose aligned diagonal is `a` (before the mask is added).
    #[inline(always)]
    fn shape_scores(&self, s: &mut [f32], stride: usize, n: usize, h: usize, a: i128, j0: usize) {
        if let Some(cap) = self.softcap {
            let inv = 1.0 / cap;
            for jj in 0..n {
                let x = &mut s[jj * stride];
                *x = cap * (*x * inv).tanh();
            }
        }
        if let Some(slopes) = &self.alibi {
            let slope = slopes[h] as f64;
            for jj in 0..n {
                let dist = (a - (j0 + jj) as i128).unsigned_abs() as f64;
                s[jj * stride] += (-slope * dist) as f32;
            }
        }
    }

    /// The factor the unnormalised output of a row with running max `m` and sum `l`
    /// (relative to `m`) is multiplied by, and its log-sum-exp, for query head `h`: the
    /// sink (if any) joins the denominator.
    #[inline(always)]
    fn finish(&self, m: f64, l: f64, h: usize) -> (f64, f64) {
        let Some(sinks) = &self.sinks else {
            return plain_finish(m, l);
        };
        let sink = sinks[h] as f64;
        if l == 0.0 && sink == f64::NEG_INFINITY {
            return (0.0, f64::NEG_INFINITY);
        }
        // l == 0: no key, m is -inf and the sink alone is the denominator.
        let top = if l == 0.0 { sink } else { m.max(sink) };
        let denom = l * (m - top).exp() + (sink - top).exp();
        ((m - top).exp() / denom, top + denom.ln())
    }
}

/// [`RowOptions::finish`] without sinks: `1 / l` and `m + ln(l)`; a row with no key (l = 0)
/// gives 0 and `-inf`, a poisoned one (l NaN) NaN.
#[inline(always)]
fn plain_finish(m: f64, l: f64) -> (f64, f64) {
    if l == 0.0 {
        (0.0, f64::NEG_INFINITY)
    } else {
        (1.0 / l, m + l.ln())
    }
}

/// Page geometry of paged K/V (the block table itself is in [`RawPtrs`]).
#[derive(Debug, Clone, Copy)]
struct Paging {
    page_size: usize,
    max_pages: usize,
}

/// One task's share of the work: query block `qb` of (batch, kv head) pair `pair`, the
/// query heads of head chunk `hc`, over the keys in `keys` (all of them unless the keys
/// are split over several tasks).
struct Work<'a> {
    pair: usize,
    hc: usize,
    qb: usize,
    keys: std::ops::Range<usize>,
    /// Where a key-split task leaves its unnormalised rows for the merge; `None`: the task
    /// writes the finished output.
    partial: Option<Partial<'a>>,
    /// The non-finite V rows of each of the pair's key tiles (bit `jj` of entry `t`: key
    /// `t * block_k + jj`), found ahead of the tasks for f32 V read in place; `None`: each
    /// task checks the rows of the tiles it reads.
    v_bad: Option<&'a [u64]>,
    /// The pair's key tiles already in the AMX products' layouts (see [`PackedTiles`]);
    /// `None`: the AMX task packs each tile it reads.
    packed: Option<PairTiles<'a>>,
}

/// K and V of every key tile of every (batch, kv head) pair in the AMX products' layouts
/// (`amx.rs`), packed once per call ahead of the tasks, so the query blocks that share a
/// tile do not each pack it again. Tile `t` of pair `p` is entry `p * tiles + t`.
#[derive(Default)]
struct PackedTiles {
    /// K in pairs of values, `words` per tile.
    k: Vec<u32>,
    /// V in pairs of keys, `words` per tile.
    v: Vec<u32>,
    /// Rows of V holding NaN or inf, per tile (bit `jj` for key `t * block_k + jj`).
    bad: Vec<u64>,
    tiles: usize,
    words: usize,
}

impl PackedTiles {
    /// Pair `pair`'s tiles.
    fn of_pair(&self, pair: usize) -> Option<PairTiles<'_>> {
        if self.tiles == 0 {
            return None;
        }
        let (t, w) = (self.tiles, self.words);
        Some(PairTiles {
            k: &self.k[pair * t * w..(pair + 1) * t * w],
            v: &self.v[pair * t * w..(pair + 1) * t * w],
            bad: &self.bad[pair * t..(pair + 1) * t],
            words: w,
        })
    }
}

/// One pair's share of [`PackedTiles`].
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct PairTiles<'a> {
    k: &'a [u32],
    v: &'a [u32],
    bad: &'a [u64],
    words: usize,
}

/// A task's unnormalised result over its key range: per row `r`, the output sum `o[r*d..]`,
/// the running max `m[r]` and the sum of weights `l[r]` (relative to `m[r]`).
struct Partial<'a> {
    o: &'a mut [f64],
    m: &'a mut [f64],
    l: &'a mut [f64],
}

impl Plan {
    fn new(p: &AttentionProblem, out: HeadStrides) -> Self {
        let group = p.num_heads / p.num_kv_heads;
        // head_dim is that of a real output buffer, so these products stay small.
        let dim_pad = p.head_dim.next_multiple_of(NR);
        let block_k = (TILE_BYTES / (2 * 4 * dim_pad)).clamp(NR, BLOCK_K) / NR * NR;
        // A row costs its f32 query and its f64 output accumulator.
        let max_rows = (ROWS_BYTES / (12 * dim_pad)).max(1);
        let heads_per_task = group.min(max_rows);
        let head_chunks = group.div_ceil(heads_per_task);
        let mut block_q = (ROWS_TARGET / group)
            .min(max_rows / heads_per_task)
            .clamp(1, p.seq_q);
        // Small problems: trade K/V reuse for enough tasks to keep every thread busy.
        let want_tasks = 4 * rayon::current_num_threads();
        let pairs = p.batch.saturating_mul(p.num_kv_heads);
        while block_q > 1
            && pairs
                .saturating_mul(head_chunks)
                .saturating_mul(p.seq_q.div_ceil(block_q))
                < want_tasks
        {
            block_q = block_q.div_ceil(2);
        }
        Plan {
            batch: p.batch,
            seq_q: p.seq_q,
            seq_k: p.seq_k,
            num_kv_heads: p.num_kv_heads,
            head_dim: p.head_dim,
            group,
            causal: p.causal,
            q_scale: p.scale,
            q: p.q,
            k: p.k,
            v: p.v,
            out,
            mask: p.mask,
            block_k,
            heads_per_task,
            head_chunks,
            block_q,
            q_blocks: p.seq_q.div_ceil(block_q),
            dim_pad,
            rows_pad: (heads_per_task * block_q).next_multiple_of(MR),
            in_place: true,
            lens: Vec::new(),
            paging: None,
            opts: None,
        }
    }

    /// Keys of sequence `b`.
    #[inline(always)]
    fn seq_k_of(&self, b: usize) -> usize {
        if self.lens.is_empty() {
            self.seq_k
        } else {
            self.lens[b]
        }
    }

    /// Batch, first query head, heads, first query and queries of a task's rows (row `r`
    /// is head `h0 + r / nq`, query `q0 + r % nq`).
    #[inline(always)]
    fn rows_of(&self, pair: usize, hc: usize, qb: usize) -> (usize, usize, usize, usize, usize) {
        let (b, kvh) = (pair / self.num_kv_heads, pair % self.num_kv_heads);
        let q0 = qb * self.block_q;
        let nq = self.block_q.min(self.seq_q - q0);
        let h0 = kvh * self.group + hc * self.heads_per_task;
        let nh = self.heads_per_task.min((kvh + 1) * self.group - h0);
        (b, h0, nh, q0, nq)
    }

    /// Element offset of key `j`'s row for (batch `b`, kv head `kvh`) in a K or V view
    /// with strides `st`.
    ///
    /// # Safety
    /// `j < seq_k_of(b)`; with paging, `raw.table` holds valid page ids for those keys.
    #[inline(always)]
    unsafe fn key_row(
        &self,
        raw: RawPtrs,
        st: HeadStrides,
        b: usize,
        kvh: usize,
        j: usize,
    ) -> usize {
        match self.paging {
            None => b * st.batch + kvh * st.head + j * st.seq,
            Some(pg) => {
                // SAFETY: the entry lies in row b of the table (see the contract).
                let page = unsafe { *raw.table.add(b * pg.max_pages + j / pg.page_size) } as usize;
                page * st.batch + kvh * st.head + (j % pg.page_size) * st.seq
            }
        }
    }

    /// Tasks per (batch, kv head).
    fn tasks_per_pair(&self) -> usize {
        self.head_chunks * self.q_blocks
    }

    /// One past the last key query `i` sees (bottom-right causal: key `j` is visible iff
    /// `j <= i + seq_k - seq_q`), computed without signed casts so no size can wrap.
    #[cfg(test)]
    fn visible_end(&self, i: usize) -> usize {
        self.visible_end_in(self.seq_k, i)
    }

    /// [`visible_end`](Self::visible_end) for a sequence of `seq_k` keys, the window's
    /// right bound included.
    #[inline(always)]
    fn visible_end_in(&self, seq_k: usize, i: usize) -> usize {
        let end = if self.causal {
            // i < seq_q, so the subtraction cannot underflow.
            seq_k.saturating_sub(self.seq_q - 1 - i)
        } else {
            seq_k
        };
        match self.opts.as_ref().and_then(|o| o.right) {
            None => end,
            Some(right) => {
                let a = self.aligned(seq_k, i);
                end.min((a + right as i128 + 1).clamp(0, seq_k as i128) as usize)
            }
        }
    }

    /// The first key query `i` sees in a sequence of `seq_k` keys: the window's left
    /// bound, 0 without one.
    #[inline(always)]
    fn visible_start_in(&self, seq_k: usize, i: usize) -> usize {
        match self.opts.as_ref().and_then(|o| o.left) {
            None => 0,
            Some(left) => {
                let a = self.aligned(seq_k, i);
                (a - left as i128).clamp(0, seq_k as i128) as usize
            }
        }
    }

    /// Query `i`'s aligned diagonal `i + seq_k - seq_q` (wide, so no size wraps).
    #[inline(always)]
    fn aligned(&self, seq_k: usize, i: usize) -> i128 {
        i as i128 + seq_k as i128 - self.seq_q as i128
    }

    /// Whether every key in `j0..j0 + nk` is removed (causal cut or a `-inf` mask) for
    /// every row of batch `b`, query heads `heads`, queries `queries`. Bottom rows are
    /// tried first: they see the most keys, so a visible key is usually found at once.
    ///
    /// # Safety
    /// `raw.mask` must match `self.mask`; the ranges must lie inside the problem.
    unsafe fn tile_removed(
        &self,
        raw: RawPtrs,
        b: usize,
        heads: std::ops::Range<usize>,
        queries: std::ops::Range<usize>,
        j0: usize,
        nk: usize,
    ) -> bool {
        let seq_k = self.seq_k_of(b);
        for i in queries.rev() {
            let start = self.visible_start_in(seq_k, i).max(j0);
            let end = self.visible_end_in(seq_k, i).min(j0 + nk);
            if end <= start {
                continue;
            }
            let Some(mst) = self.mask else {
                return false;
            };
            // A head-broadcast mask holds one row for every head.
            let heads = if mst.head == 0 {
                heads.start..heads.start + 1
            } else {
                heads.clone()
            };
            for h in heads {
                let off = b * mst.batch + h * mst.head + i * mst.query + start;
                // SAFETY: keys start..end of one mask row inside the mask view.
                let row = unsafe { std::slice::from_raw_parts(raw.mask.add(off), end - start) };
                if row.iter().any(|&a| a != f32::NEG_INFINITY) {
                    return false;
                }
            }
        }
        true
    }

    /// Whether the tiles' K/V rows are given to the matrix products where they lie: f32
    /// rows of an unpaged view (unless a test turned it off).
    fn reads_in_place<T: Element>(&self) -> bool {
        T::IS_F32 && self.in_place && self.paging.is_none()
    }

    /// Bytes of one worker's [`Scratch`].
    fn scratch_bytes(&self) -> usize {
        let (r, d, k, t) = (self.rows_pad, self.dim_pad, self.block_k, self.lanes());
        4 * (self.q_floats() + t * d + 2 * d * k + t * k + 3 * t + d)
            + 2 * t * k
            + 8 * (r * d + t)
            + 11 * 64
    }

    /// Rows of a task rounded up to [`NR`]: the lanes of the transposed scores.
    fn lanes(&self) -> usize {
        self.rows_pad.next_multiple_of(NR)
    }

    /// f32 values of a task's scaled queries: rows of `dim_pad` for the direct products,
    /// transposed (`[head_dim, lanes]`) for the blocked ones.
    fn q_floats(&self) -> usize {
        if self.rows_pad <= DIRECT_ROWS {
            self.rows_pad * self.dim_pad
        } else {
            self.lanes() * self.dim_pad
        }
    }
}

/// A zeroed vector of `n` values, or `OutOfMemory` when the host cannot give it.
fn try_zeroed<T: Copy + Default>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| AttentionError::OutOfMemory {
            device: Device::Cpu.to_string(),
            requested_bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
            detail: format!("{what}: {e}"),
            source: Some(crate::error::ErrorSource::new(e)),
        })?;
    v.resize(n, T::default());
    Ok(v)
}

/// Per-worker working set of a task, reused from task to task.
struct Scratch {
    /// Scaled queries (see [`Plan::q_floats`]).
    q: Vec<f32>,
    /// Key tile widened (or copied), `[block_k, dim_pad]`.
    kt: Vec<f32>,
    /// Value tile, `[block_k, dim_pad]`.
    v: Vec<f32>,
    /// Scores, then probabilities, transposed: `[block_k, lanes]`.
    s: Vec<f32>,
    /// Unnormalised output of the last few key tiles (at most [`MERGE_TILES`]),
    /// `[lanes, dim_pad]` (the AMX product stores whole 16-row tiles).
    p: Vec<f32>,
    /// Unnormalised output, `[rows_pad, dim_pad]`, in f64 so that adding the partials
    /// loses nothing as the keys add up.
    o: Vec<f64>,
    /// Running row max.
    m: Vec<f32>,
    /// Running row sum (f64, as `o`).
    l: Vec<f64>,
    /// Per-row values of one tile's softmax step: new max, then sum.
    lanes: Vec<f32>,
    /// `[dim_pad]` zeros: the V row of a key whose V holds NaN/inf on the direct path.
    zero: Vec<f32>,
    /// bf16 weights of the AMX product, `[lanes, block_k]` (unused elsewhere).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    w: Vec<u16>,
}

impl Scratch {
    /// Zeroed buffers: the padding columns of Q are never written afterwards, so they stay
    /// zero and add nothing to the products.
    fn new(plan: &Plan) -> Result<Self> {
        let (rows, dim, bk, lanes) = (plan.rows_pad, plan.dim_pad, plan.block_k, plan.lanes());
        let what = "cpu attention scratch";
        // Every worker's buffers are allocated by one thread, so they may sit next to each
        // other: 64 unused bytes at the end of each keep two workers' hot values (row max
        // and sum above all) off a shared cache line.
        let f32s = |n: usize| try_zeroed::<f32>(n + 64 / 4, what);
        let f64s = |n: usize| try_zeroed::<f64>(n + 64 / 8, what);
        Ok(Scratch {
            q: f32s(plan.q_floats())?,
            kt: f32s(dim * bk)?,
            v: f32s(bk * dim)?,
            s: f32s(lanes * bk)?,
            p: f32s(lanes * dim)?,
            o: f64s(rows * dim)?,
            m: f32s(lanes)?,
            l: f64s(lanes)?,
            lanes: f32s(2 * lanes)?,
            zero: f32s(dim)?,
            w: try_zeroed::<u16>(lanes * bk + 64 / 2, what)?,
        })
    }
}

/// One scratch per worker, allocated before any output is written (a call that cannot get
/// its memory changes nothing): as many workers as threads, tasks and [`SCRATCH_BYTES`]
/// allow, at least one.
fn scratches(plan: &Plan, tasks: usize) -> Result<Vec<Scratch>> {
    let workers = rayon::current_num_threads()
        .min(tasks)
        .min(SCRATCH_BYTES / plan.scratch_bytes().max(1))
        .max(1);
    let mut all = Vec::new();
    all.try_reserve_exact(workers)
        .map_err(|e| AttentionError::OutOfMemory {
            device: Device::Cpu.to_string(),
            requested_bytes: (workers as u64).saturating_mul(plan.scratch_bytes() as u64),
            detail: format!("cpu attention scratch: {e}"),
            source: Some(crate::error::ErrorSource::new(e)),
        })?;
    for _ in 0..workers {
        all.push(Scratch::new(plan)?);
    }
    Ok(all)
}

/// Runs `tasks` tasks over `workers`, each worker taking the next task index as it
/// finishes one; indices are handed out from the last (the heaviest when causal: the last
/// query blocks see the most keys), so the stragglers at the end are short ones.
fn for_each_task(workers: &mut [Scratch], tasks: usize, f: impl Fn(&mut Scratch, usize) + Sync) {
    let next = AtomicUsize::new(0);
    workers.par_iter_mut().for_each(|sc| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        if t >= tasks {
            break;
        }
        f(sc, tasks - 1 - t);
    });
}

/// The key tiles packed ahead for the AMX task where it runs and more than one task reads
/// each tile (empty otherwise, or when the copy would pass [`SCRATCH_BYTES`]).
///
/// # Safety
/// See [`run`].
#[allow(unused_variables)]
unsafe fn packed_tiles<T: Element>(plan: &Plan, raw: RawPtrs, isa: Isa) -> Result<PackedTiles> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && amx::fits(plan, T::DTYPE) && plan.tasks_per_pair() > 1 {
        // SAFETY: forwarded; Amx is only chosen where `amx::usable()`.
        return unsafe { amx::pack_ahead(plan, raw) };
    }
    Ok(PackedTiles::default())
}

/// Runs every task of `plan` on rayon's pool. Fails only when scratch cannot be allocated,
/// and then before writing any output.
///
/// # Safety
/// `raw` must point at host views of element type `T` (mask: f32) that match `plan`'s
/// sizes and strides, the output must overlap no input and have distinct elements.
unsafe fn run<T: Element>(plan: &Plan, raw: RawPtrs, isa: Isa) -> Result<()> {
    let per_task = plan.tasks_per_pair();
    let pairs = plan.batch * plan.num_kv_heads;
    let tasks = pairs * per_task;
    let mut workers = scratches(plan, tasks)?;
    // f32 V read in place by several query blocks: its rows are checked for NaN/inf once
    // here rather than by every task that reads them (unless stride-0 views show more
    // keys than such a list should hold).
    let k_tiles = plan.seq_k.div_ceil(plan.block_k);
    let checks = pairs.saturating_mul(k_tiles);
    let mut v_bad: Vec<u64> =
        if plan.reads_in_place::<T>() && plan.q_blocks > 1 && checks <= V_CHECKS_MAX {
            try_zeroed(checks, "cpu attention V checks")?
        } else {
            Vec::new()
        };
    v_bad.par_iter_mut().enumerate().for_each(|(i, bad)| {
        let (pair, j0) = (i / k_tiles, i % k_tiles * plan.block_k);
        // SAFETY: forwarded from `run`'s contract; j0 < seq_k.
        *bad = unsafe { v_non_finite(plan, raw, pair, j0) };
    });
    let v_bad = &v_bad;
    let packed = packed_tiles::<T>(plan, raw, isa)?;
    let packed = &packed;
    // Task indices are handed out from the last, so each (batch, kv head) pair's query
    // blocks run from the last one down: neighbouring tasks share the pair's K/V in the
    // cache, and under a causal mask every pair's long tasks come before its short ones.
    for_each_task(&mut workers, tasks, |sc, t| {
        let work = Work {
            pair: t / per_task,
            hc: t % per_task / plan.q_blocks,
            qb: t % plan.q_blocks,
            keys: 0..plan.seq_k,
            partial: None,
            v_bad: if v_bad.is_empty() {
                None
            } else {
                let p = t / per_task;
                Some(&v_bad[p * k_tiles..(p + 1) * k_tiles])
            },
            packed: packed.of_pair(t / per_task),
        };
        // SAFETY: forwarded from `run`'s contract.
        unsafe { isa.task::<T>(plan, raw, work, sc) }
    });
    Ok(())
}

/// One key tile as the matrix products read it: `nk` K rows and `nk` V rows of
/// `head_dim` f32 values each, K row `jj` at `k + jj * k_ld`, V row `jj` at `v + jj * v_ld`.
#[derive(Clone, Copy)]
struct Tile {
    k: *const f32,
    k_ld: usize,
    v: *const f32,
    v_ld: usize,
}

/// Keys `j0..` (at most `block_k`) of one (batch, kv head) pair as a [`Tile`]: f32 rows of an
/// unpaged view where they lie (see [`Plan::in_place`]), else rows widened into `k` and `v`
/// (`[block_k, dim_pad]`). A V row holding NaN or inf is zeroed (in `v`: a tile with one is
/// copied there) and flagged in the returned mask (bit `jj` for key `j0 + jj`): the
/// product would otherwise spread it to every row through the zero weights of rows that
/// removed the key; [`task`] adds it back where it is kept. K needs no such care: a score
/// belongs to one row, and a removed key's score is replaced, never used.
///
/// # Safety
/// See [`run`]; `pair < batch * num_kv_heads`, `j0 < seq_k_of(batch of pair)`.
#[inline(always)]
unsafe fn load_tile<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    pair: usize,
    j0: usize,
    known_bad: Option<u64>,
    k: &mut [f32],
    v: &mut [f32],
) -> (Tile, u64) {
    let (b, kvh) = (pair / plan.num_kv_heads, pair % plan.num_kv_heads);
    let (d, dp) = (plan.head_dim, plan.dim_pad);
    let nk = plan.block_k.min(plan.seq_k_of(b) - j0);
    let (kp, vp) = (raw.k as *const T, raw.v as *const T);
    // SAFETY: key rows j0 + jj < seq_k_of(b) inside their views, d values each.
    let k_row = |jj: usize| unsafe {
        std::slice::from_raw_parts(kp.add(plan.key_row(raw, plan.k, b, kvh, j0 + jj)), d)
    };
    // SAFETY: as above.
    let v_row = |jj: usize| unsafe {
        std::slice::from_raw_parts(vp.add(plan.key_row(raw, plan.v, b, kvh, j0 + jj)), d)
    };
    let mut bad = 0u64;
    if plan.reads_in_place::<T>() {
        // SAFETY: forwarded.
        bad = known_bad.unwrap_or_else(|| unsafe { v_non_finite(plan, raw, pair, j0) });
        let kf = k_row(0).as_ptr() as *const f32;
        let vf = v_row(0).as_ptr() as *const f32;
        if bad == 0 {
            let tile = Tile {
                k: kf,
                k_ld: plan.k.seq,
                v: vf,
                v_ld: plan.v.seq,
            };
            return (tile, 0);
        }
        // Rare (garbage or overflowed values): V goes through the tile buffer, zeroed where
        // it is not finite.
        for jj in 0..nk {
            let row = &mut v[jj * dp..jj * dp + d];
            if bad & (1 << jj) == 0 {
                // SAFETY: T is f32 (IS_F32).
                row.copy_from_slice(unsafe {
                    std::slice::from_raw_parts(v_row(jj).as_ptr() as *const f32, d)
                });
            } else {
                row.fill(0.0);
            }
        }
        let tile = Tile {
            k: kf,
            k_ld: plan.k.seq,
            v: v.as_ptr(),
            v_ld: dp,
        };
        return (tile, bad);
    }
    for jj in 0..nk {
        for (x, &s) in k[jj * dp..jj * dp + d].iter_mut().zip(k_row(jj)) {
            *x = s.widen();
        }
        let row = &mut v[jj * dp..jj * dp + d];
        for (x, &s) in row.iter_mut().zip(v_row(jj)) {
            *x = s.widen();
        }
        if !all_finite(row) {
            row.fill(0.0);
            bad |= 1 << jj;
        }
    }
    let tile = Tile {
        k: k.as_ptr(),
        k_ld: dp,
        v: v.as_ptr(),
        v_ld: dp,
    };
    (tile, bad)
}

/// The V rows holding NaN or inf among keys `j0..` (at most `block_k`) of one (batch, kv
/// head) pair of f32 V (bit `jj` for key `j0 + jj`).
///
/// # Safety
/// See [`run`]; V is f32; `pair < batch * num_kv_heads`, `j0 < seq_k_of(batch of pair)`.
#[inline(always)]
unsafe fn v_non_finite(plan: &Plan, raw: RawPtrs, pair: usize, j0: usize) -> u64 {
    let (b, kvh) = (pair / plan.num_kv_heads, pair % plan.num_kv_heads);
    let nk = plan.block_k.min(plan.seq_k_of(b) - j0);
    let mut bad = 0u64;
    for jj in 0..nk {
        // SAFETY: value row j0 + jj < seq_k_of(b) inside its view, head_dim f32 values.
        let row = unsafe {
            let off = plan.key_row(raw, plan.v, b, kvh, j0 + jj);
            std::slice::from_raw_parts((raw.v as *const f32).add(off), plan.head_dim)
        };
        if !all_finite(row) {
            bad |= 1 << jj;
        }
    }
    bad
}

/// `c = a b` (`accumulate`: `c += a b`) for f32 matrices `c` (`m x n`), `a` (`m x k`) and
/// `b` (`k x n`), each given by its first element and its `[row, column]` strides (element
/// `(i, j)` of `c` at `c + i * c_st[0] + j * c_st[1]`): single-threaded, the caller being
/// one task of many.
///
/// # Safety
/// Every element named lies inside a live allocation; `c` overlaps neither input.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_st: [usize; 2],
    accumulate: bool,
    a: *const f32,
    a_st: [usize; 2],
    b: *const f32,
    b_st: [usize; 2],
) {
    // Strides of live allocations are below isize::MAX elements, so the casts are exact.
    let st = |x: usize| x as isize;
    // SAFETY: forwarded; `gemm` reads and writes only the elements its sizes and strides
    // name, f32 is one of its types (it panics for others), and `Parallelism::None` keeps it
    // on this thread.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            st(c_st[1]),
            st(c_st[0]),
            accumulate,
            a,
            st(a_st[1]),
            st(a_st[0]),
            b,
            st(b_st[1]),
            st(b_st[0]),
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Points `k_rows` and `v_rows` at the K and V rows of keys `j0..` (at most `block_k`) of
/// one (batch, kv head) pair, each `dim_pad` f32 values: the rows themselves where they are
/// f32 of a head_dim that needs no padding, else rows widened into `k` and `v`
/// (`[block_k, dim_pad]`, padding zeroed). A V row holding NaN or inf points at `zero`
/// instead and is flagged in the returned mask, as in [`load_tile`] (checking each V row
/// as it is fetched also brings it into the cache a whole row at a time, ahead of the
/// product that reads it a column block at a time).
///
/// # Safety
/// As [`load_tile`]; `zero` holds `dim_pad` zeros.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gather_rows<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    pair: usize,
    j0: usize,
    k: &mut [f32],
    v: &mut [f32],
    zero: &[f32],
    k_rows: &mut [*const f32; BLOCK_K],
    v_rows: &mut [*const f32; BLOCK_K],
) -> u64 {
    let (b, kvh) = (pair / plan.num_kv_heads, pair % plan.num_kv_heads);
    let (d, dp) = (plan.head_dim, plan.dim_pad);
    let nk = plan.block_k.min(plan.seq_k_of(b) - j0);
    let (kp, vp) = (raw.k as *const T, raw.v as *const T);
    let in_place = T::IS_F32 && d == dp;
    let mut bad = 0u64;
    for jj in 0..nk {
        // SAFETY: key row j0 + jj < seq_k_of(b) inside its views, d values each.
        let (ks, vs) = unsafe {
            (
                std::slice::from_raw_parts(kp.add(plan.key_row(raw, plan.k, b, kvh, j0 + jj)), d),
                std::slice::from_raw_parts(vp.add(plan.key_row(raw, plan.v, b, kvh, j0 + jj)), d),
            )
        };
        if in_place {
            k_rows[jj] = ks.as_ptr() as *const f32;
            // SAFETY: T is f32 (IS_F32), so the row is d = dim_pad f32 values.
            let row = unsafe { std::slice::from_raw_parts(vs.as_ptr() as *const f32, d) };
            if all_finite(row) {
                v_rows[jj] = row.as_ptr();
            } else {
                v_rows[jj] = zero.as_ptr();
                bad |= 1 << jj;
            }
            continue;
        }
        let krow = &mut k[jj * dp..(jj + 1) * dp];
        for (x, &s) in krow.iter_mut().zip(ks) {
            *x = s.widen();
        }
        krow[d..].fill(0.0);
        k_rows[jj] = krow.as_ptr();
        let row = &mut v[jj * dp..(jj + 1) * dp];
        for (x, &s) in row.iter_mut().zip(vs) {
            *x = s.widen();
        }
        row[d..].fill(0.0);
        if !all_finite(row) {
            row.fill(0.0);
            bad |= 1 << jj;
        }
        v_rows[jj] = row.as_ptr();
    }
    bad
}

/// Sum of the lanes, pairwise (so it vectorizes).
#[inline(always)]
fn hsum(a: &[f32; NR]) -> f32 {
    let mut h = [0.0f32; NR / 2];
    for i in 0..NR / 2 {
        h[i] = a[i] + a[i + NR / 2];
    }
    let mut g = [0.0f32; NR / 4];
    for i in 0..NR / 4 {
        g[i] = h[i] + h[i + NR / 4];
    }
    (g[0] + g[2]) + (g[1] + g[3])
}

/// `s[jj * ls + r] = q[r * dp..] . k_rows[jj]` for rows `0..rows_pad` (a multiple of
/// [`MR`]) and every given key: direct dot products over `dp` values, `MR` rows per pass
/// over a key row.
///
/// # Safety
/// Each pointer in `k_rows` reads `dp` f32 values; `q` holds `rows_pad * dp` values and `s`
/// `k_rows.len() * ls`, `ls >= rows_pad`.
#[inline(always)]
unsafe fn direct_scores<const FMA: bool>(
    q: &[f32],
    dp: usize,
    rows_pad: usize,
    k_rows: &[*const f32],
    s: &mut [f32],
    ls: usize,
) {
    assert!(rows_pad * dp <= q.len() && k_rows.len() * ls <= s.len() && rows_pad <= ls);
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA on x86-64 is only compiled into the AVX2+FMA task; sizes checked.
        return unsafe { avx2::direct_scores(q.as_ptr(), dp, rows_pad, k_rows, s, ls) };
    }
    let q = q.as_ptr();
    for rb in (0..rows_pad).step_by(MR) {
        for (jj, &kr) in k_rows.iter().enumerate() {
            let mut acc = [[0.0f32; NR]; MR];
            for c in (0..dp).step_by(NR) {
                // SAFETY: c + NR <= dp, inside the key row and each query row.
                let kc = unsafe { &*(kr.add(c) as *const [f32; NR]) };
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // SAFETY: as above; rb + r < rows_pad.
                    let qc = unsafe { &*(q.add((rb + r) * dp + c) as *const [f32; NR]) };
                    for l in 0..NR {
                        acc_r[l] = fmadd::<FMA>(qc[l], kc[l], acc_r[l]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                s[jj * ls + rb + r] = hsum(acc_r);
            }
        }
    }
}

/// `o[r * dp..] += sum_jj p[jj * lp + r] * v_rows[jj]` for rows `0..rows_pad` (a multiple
/// of [`MR`]): `MR` rows by [`NR`] columns held in registers over the keys.
///
/// # Safety
/// Each pointer in `v_rows` reads `dp` f32 values; `o` holds `rows_pad * dp` values and `p`
/// `v_rows.len() * lp`, `lp >= rows_pad`.
#[inline(always)]
unsafe fn direct_pv<const FMA: bool>(
    p: &[f32],
    lp: usize,
    rows_pad: usize,
    v_rows: &[*const f32],
    o: &mut [f32],
    dp: usize,
) {
    assert!(rows_pad * dp <= o.len() && v_rows.len() * lp <= p.len() && rows_pad <= lp);
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `direct_scores`.
        return unsafe { avx2::direct_pv(p.as_ptr(), lp, rows_pad, v_rows, o, dp) };
    }
    for rb in (0..rows_pad).step_by(MR) {
        for db in (0..dp).step_by(NR) {
            let mut acc = [[0.0f32; NR]; MR];
            for (r, row) in acc.iter_mut().enumerate() {
                let at = (rb + r) * dp + db;
                row.copy_from_slice(&o[at..at + NR]);
            }
            for (jj, &vr) in v_rows.iter().enumerate() {
                // SAFETY: db + NR <= dp, inside the value row.
                let vc = unsafe { &*(vr.add(db) as *const [f32; NR]) };
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // SAFETY: rb + r < rows_pad <= lp, jj < v_rows.len().
                    let w = unsafe { *p.get_unchecked(jj * lp + rb + r) };
                    for l in 0..NR {
                        acc_r[l] = fmadd::<FMA>(w, vc[l], acc_r[l]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let at = (rb + r) * dp + db;
                o[at..at + NR].copy_from_slice(row);
            }
        }
    }
}

/// AVX2+FMA forms of the direct kernels: the portable loops above keep their accumulators
/// in memory once inlined into the task (the compiler does not keep them in registers).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// [`super::direct_scores`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the sizes are as `direct_scores` checks them.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn direct_scores(
        q: *const f32,
        dp: usize,
        rows_pad: usize,
        k_rows: &[*const f32],
        s: &mut [f32],
        ls: usize,
    ) {
        const _: () = assert!(MR == 4 && NR == 16);
        for rb in (0..rows_pad).step_by(MR) {
            // SAFETY: rows rb..rb + 4 of q, dp values each.
            let qr = unsafe { [0, 1, 2, 3].map(|r| q.add((rb + r) * dp)) };
            for (jj, &kr) in k_rows.iter().enumerate() {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..dp).step_by(NR) {
                    // SAFETY: c + 16 <= dp, inside the key row and the query rows.
                    unsafe {
                        let k0 = _mm256_loadu_ps(kr.add(c));
                        let k1 = _mm256_loadu_ps(kr.add(c + 8));
                        for r in 0..MR {
                            let q0 = _mm256_loadu_ps(qr[r].add(c));
                            let q1 = _mm256_loadu_ps(qr[r].add(c + 8));
                            acc[2 * r] = _mm256_fmadd_ps(q0, k0, acc[2 * r]);
                            acc[2 * r + 1] = _mm256_fmadd_ps(q1, k1, acc[2 * r + 1]);
                        }
                    }
                }
                // The four rows' sums in one vector: halves added, then pairwise.
                let a = [0, 1, 2, 3].map(|r| _mm256_add_ps(acc[2 * r], acc[2 * r + 1]));
                let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                let sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                // The four rows lie side by side (scores transposed).
                let at = &mut s[jj * ls + rb..jj * ls + rb + MR];
                // SAFETY: four floats.
                unsafe { _mm_storeu_ps(at.as_mut_ptr(), sums) };
            }
        }
    }

    /// [`super::direct_pv`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the sizes are as `direct_pv` checks them.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn direct_pv(
        p: *const f32,
        lp: usize,
        rows_pad: usize,
        v_rows: &[*const f32],
        o: &mut [f32],
        dp: usize,
    ) {
        let op = o.as_mut_ptr();
        for rb in (0..rows_pad).step_by(MR) {
            for db in (0..dp).step_by(NR) {
                // SAFETY: rows rb..rb + 4 of o and p; db + 16 <= dp; rb + 4 <= lp.
                unsafe {
                    let at = |r: usize| op.add((rb + r) * dp + db);
                    let mut acc = [0, 1, 2, 3]
                        .map(|r| [_mm256_loadu_ps(at(r)), _mm256_loadu_ps(at(r).add(8))]);
                    for (jj, &vr) in v_rows.iter().enumerate() {
                        let v0 = _mm256_loadu_ps(vr.add(db));
                        let v1 = _mm256_loadu_ps(vr.add(db + 8));
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let w = _mm256_broadcast_ss(&*p.add(jj * lp + rb + r));
                            acc_r[0] = _mm256_fmadd_ps(w, v0, acc_r[0]);
                            acc_r[1] = _mm256_fmadd_ps(w, v1, acc_r[1]);
                        }
                    }
                    for (r, acc_r) in acc.iter().enumerate() {
                        _mm256_storeu_ps(at(r), acc_r[0]);
                        _mm256_storeu_ps(at(r).add(8), acc_r[1]);
                    }
                }
            }
        }
    }
}

/// Whether `row` holds no NaN or inf: `x * 0` is NaN exactly for those, lane-wise so it
/// vectorizes.
#[inline(always)]
fn all_finite(row: &[f32]) -> bool {
    let mut lanes = [0.0f32; NR];
    let mut chunks = row.chunks_exact(NR);
    for chunk in &mut chunks {
        for c in 0..NR {
            lanes[c] += chunk[c] * 0.0;
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane += x * 0.0;
    }
    lanes.iter().all(|x| *x == 0.0)
}

/// The instruction set the task loop is compiled for, picked once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// AVX2+FMA, and bf16 tasks on AMX tiles where they fit (`amx.rs`).
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if amx::usable() {
            return Isa::Amx;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// Whether the element-wise code may use AVX2 and FMA.
    #[cfg(all(test, target_arch = "x86_64"))]
    fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2Fma | Isa::Amx)
    }

    /// Runs [`task`] in this instruction set.
    ///
    /// # Safety
    /// See [`task`].
    #[inline(always)]
    unsafe fn task<T: Element>(self, plan: &Plan, raw: RawPtrs, work: Work<'_>, sc: &mut Scratch) {
        // SAFETY: forwarded; Avx2Fma is only chosen when the CPU has both.
        unsafe {
            match self {
                Isa::Portable => task_portable::<T>(plan, raw, work, sc),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => task_avx2::<T>(plan, raw, work, sc),
                // Amx is only chosen when the CPU has AMX-BF16 and AVX-512, and `fits`
                // only holds for bf16 (so the task's elements are bf16).
                #[cfg(target_arch = "x86_64")]
                Isa::Amx => {
                    if amx::fits(plan, T::DTYPE) {
                        amx::task(plan, raw, work, sc)
                    } else {
                        task_avx2::<T>(plan, raw, work, sc)
                    }
                }
            }
        }
    }
}

/// [`task`] compiled with AVX2 and FMA enabled.
///
/// # Safety
/// The CPU must support AVX2 and FMA; plus [`task`]'s contract.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<T: Element>(plan: &Plan, raw: RawPtrs, work: Work<'_>, sc: &mut Scratch) {
    // SAFETY: forwarded.
    unsafe { task::<T, true>(plan, raw, work, sc) }
}

/// [`task`] for the baseline instruction set (fused multiply-add where it is baseline).
///
/// # Safety
/// See [`task`].
unsafe fn task_portable<T: Element>(plan: &Plan, raw: RawPtrs, work: Work<'_>, sc: &mut Scratch) {
    // SAFETY: forwarded.
    unsafe { task::<T, { cfg!(target_arch = "aarch64") }>(plan, raw, work, sc) }
}

/// Computes the output rows of `work` (see [`Work`]): one (batch, kv head) pair's query
/// block, for the query heads of one head chunk of the group, over the keys of
/// `work.keys` (whose start is a multiple of `block_k`). With `work.partial` the
/// unnormalised rows go there instead of the output.
///
/// # Safety
/// See [`run`]; `pair < batch * num_kv_heads`, `hc < head_chunks`, `qb < q_blocks`; a
/// partial holds `rows * head_dim` output values and `rows` maxima and sums.
#[inline(always)]
unsafe fn task<T: Element, const FMA: bool>(
    plan: &Plan,
    raw: RawPtrs,
    work: Work<'_>,
    sc: &mut Scratch,
) {
    let Work {
        pair,
        hc,
        qb,
        keys,
        partial,
        v_bad,
        packed: _,
    } = work;
    let kvh = pair % plan.num_kv_heads;
    let (b, h0, nh, q0, nq) = plan.rows_of(pair, hc, qb);
    let seq_k = plan.seq_k_of(b);
    let (d, dp, bk) = (plan.head_dim, plan.dim_pad, plan.block_k);
    // Row r is query head h0 + r/nq, query q0 + r%nq.
    let rows = nh * nq;
    let rows_pad = rows.next_multiple_of(MR);
    // Scores are kept transposed, `ss[jj * lt + r]` for key j0 + jj and row r: the rows of
    // one key side by side, so the softmax's per-row steps run across rows in vector
    // lanes, and the product that writes them reads Q (transposed too) without packing it.
    let lt = rows.next_multiple_of(NR);
    let head_of = |r: usize| h0 + r / nq;
    let query_of = |r: usize| q0 + r % nq;
    let Scratch {
        q: qs,
        kt: kt_own,
        v: v_own,
        s: ss,
        p: ps,
        o: os,
        m: ms,
        l: ls,
        lanes,
        zero,
        ..
    } = sc;
    // Few rows: scores and P V from K/V rows as they lie (see [`DIRECT_ROWS`]).
    let direct = rows_pad <= DIRECT_ROWS;

    let qp = raw.q as *const T;
    // Rows are read whole (row-major, into `qs` or for the transposed form first into
    // `ps`, free until the first tile): contiguous vector loads keep many cache misses in
    // flight, where a strided gather would wait for them one by one.
    let rows_to: &mut [f32] = if direct { qs } else { ps };
    for r in 0..rows {
        let off = b * plan.q.batch + head_of(r) * plan.q.head + query_of(r) * plan.q.seq;
        // SAFETY: a row of q inside its view.
        let src = unsafe { std::slice::from_raw_parts(qp.add(off), d) };
        for (x, &s) in rows_to[r * dp..r * dp + d].iter_mut().zip(src) {
            *x = s.widen() * plan.q_scale;
        }
    }
    if !direct {
        for r in 0..rows {
            for (x, &v) in ps[r * dp..r * dp + d].iter().enumerate() {
                qs[x * lt + r] = v;
            }
        }
    }
    // Rows past `rows` (to a multiple of MR, or of NR transposed): zero queries, so their
    // scores are finite and their outputs are never written.
    if direct {
        qs[rows * dp..rows_pad * dp].fill(0.0);
    } else {
        for x in 0..d {
            qs[x * lt + rows..(x + 1) * lt].fill(0.0);
        }
    }
    ps[..rows_pad * dp].fill(0.0);
    let mut unmerged = 0;
    // Whether `os` holds the merged partials; until the first merge its contents are stale
    // (the first merge assigns, so it is never cleared).
    let mut merged = false;
    ms[..lt].fill(f32::NEG_INFINITY);
    ls[..lt].fill(0.0);

    // Key tiles past the last query's horizon (or this task's key range) are never touched.
    let kv_end = plan.visible_end_in(seq_k, q0 + nq - 1).min(keys.end);
    let mut k_rows = [zero.as_ptr(); BLOCK_K];
    let mut v_rows = [zero.as_ptr(); BLOCK_K];

    // The first query sees the window's leftmost keys; tiles before them are skipped.
    let mut j0 = keys.start.max(plan.visible_start_in(seq_k, q0) / bk * bk);
    while j0 < kv_end {
        // Only the keys this block may see; the rest of the tile is cut below.
        let nk = bk.min(kv_end - j0);
        // SAFETY: forwarded; the ranges lie inside the problem.
        if plan.mask.is_some()
            && unsafe { plan.tile_removed(raw, b, h0..h0 + nh, q0..q0 + nq, j0, nk) }
        {
            j0 += bk;
            continue;
        }
        let (tile, bad): (Option<Tile>, u64) = if direct {
            // SAFETY: forwarded; j0 < kv_end <= seq_k.
            let bad = unsafe {
                gather_rows::<T>(
                    plan,
                    raw,
                    pair,
                    j0,
                    kt_own,
                    v_own,
                    zero,
                    &mut k_rows,
                    &mut v_rows,
                )
            };
            (None, bad)
        } else {
            let known = v_bad.map(|t| t[j0 / bk]);
            // SAFETY: forwarded; j0 < kv_end <= seq_k.
            let (tile, bad) = unsafe { load_tile::<T>(plan, raw, pair, j0, known, kt_own, v_own) };
            (Some(tile), bad)
        };

        // S = Q K^T (already scaled), transposed.
        if let Some(t) = tile {
            // SAFETY: lt x head_dim of `qs` (transposed), nk x head_dim of the tile (see
            // `load_tile`), lt x nk of the task's own `ss` (transposed).
            unsafe {
                matmul(
                    lt,
                    nk,
                    d,
                    ss.as_mut_ptr(),
                    [1, lt],
                    false,
                    qs.as_ptr(),
                    [1, lt],
                    t.k,
                    [1, t.k_ld],
                )
            };
        } else {
            // SAFETY: the first nk pointers are rows of dim_pad floats (gather_rows).
            unsafe { direct_scores::<FMA>(qs, dp, rows_pad, &k_rows[..nk], ss, lt) };
            // Lanes the direct product leaves alone: zero scores, like zero queries.
            for jj in 0..nk {
                ss[jj * lt + rows_pad..(jj + 1) * lt].fill(0.0);
            }
        }

        // Options, mask and causal cut, one row at a time (strided over the keys).
        for r in 0..rows {
            let i = query_of(r);
            if let Some(o) = &plan.opts {
                o.shape_scores(&mut ss[r..], lt, nk, head_of(r), plan.aligned(seq_k, i), j0);
            }
            if let Some(mst) = plan.mask {
                let off = b * mst.batch + head_of(r) * mst.head + i * mst.query + j0;
                // SAFETY: nk keys of one mask row inside the mask view.
                let m = unsafe { std::slice::from_raw_parts(raw.mask.add(off), nk) };
                // A select, not a sum: NaN or inf scores of removed keys are dropped.
                for (jj, &a) in m.iter().enumerate() {
                    let x = &mut ss[jj * lt + r];
                    *x = if a == f32::NEG_INFINITY {
                        f32::NEG_INFINITY
                    } else {
                        *x + a
                    };
                }
            }
            let valid = plan.visible_end_in(seq_k, i).saturating_sub(j0).min(nk);
            for jj in valid..nk {
                ss[jj * lt + r] = f32::NEG_INFINITY;
            }
            if plan.opts.is_some() {
                let first = plan.visible_start_in(seq_k, i).saturating_sub(j0).min(nk);
                for jj in 0..first {
                    ss[jj * lt + r] = f32::NEG_INFINITY;
                }
            }
        }
        // The online softmax update, across rows in vector lanes; S becomes P.
        let (m_new, sums) = lanes.split_at_mut(lt);
        let sums = &mut sums[..lt];
        online_softmax::<FMA>(&mut ss[..nk * lt], &ms[..lt], m_new, sums);
        for r in 0..rows {
            if m_new[r] == f32::NEG_INFINITY {
                // Nothing visible yet: contributes nothing (the weights are 0), keeps the
                // zero output. A NaN score among removed ones (a NaN mask value) still
                // poisons the row: its weight, and so the sum, is NaN.
                ls[r] += sums[r] as f64;
                continue;
            }
            let alpha = exp2::<FMA>((ms[r] - m_new[r]) * LOG2_E);
            ls[r] = ls[r] * alpha as f64 + sums[r] as f64;
            ms[r] = m_new[r];
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

        // O += P V, in the f32 partial; every MERGE_TILES tiles it is added to the f64 sum.
        if let Some(t) = tile {
            // SAFETY: rows x nk of `ss` (transposed), nk x head_dim of the tile, rows x
            // head_dim of the task's own `ps` (dp apart).
            unsafe {
                matmul(
                    rows,
                    d,
                    nk,
                    ps.as_mut_ptr(),
                    [dp, 1],
                    true,
                    ss.as_ptr(),
                    [1, lt],
                    t.v,
                    [t.v_ld, 1],
                )
            };
        } else {
            // SAFETY: as for the scores; rows holding NaN/inf point at zeros.
            unsafe { direct_pv::<FMA>(ss, lt, rows_pad, &v_rows[..nk], ps, dp) };
        }

        // V rows holding NaN/inf were zeroed in the tile: add them for the rows that keep
        // their key (rare: only garbage or overflowed values get here).
        let mut pending = bad & (u64::MAX >> (64 - nk));
        while pending != 0 {
            let jj = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            // SAFETY: forwarded; j0 + jj < kv_end <= seq_k.
            unsafe {
                add_non_finite_key::<T>(
                    plan,
                    raw,
                    b,
                    kvh,
                    j0 + jj,
                    rows,
                    &head_of,
                    &query_of,
                    &ss[jj * lt..],
                    1,
                    ps,
                )
            };
        }
        j0 += bk;
        unmerged += 1;
        // The last partial is not merged: the output below adds it.
        if unmerged == MERGE_TILES && j0 < kv_end {
            merge_partial(&mut os[..rows * dp], &mut ps[..rows * dp], merged);
            unmerged = 0;
            merged = true;
        }
    }

    // SAFETY: forwarded.
    unsafe {
        finish_rows::<T>(
            plan, raw, b, rows, &head_of, &query_of, ps, os, ms, ls, merged, partial,
        )
    };
}

/// The end of a task: its `rows` rows' unnormalised output (`ps`, plus `os` when
/// `merged`), max `ms` and sum `ls` into `partial`, or normalised into the output (and
/// lse).
///
/// # Safety
/// See [`task`]: the task owns these rows of batch `b`; `ps`/`os` hold `rows` rows of
/// `dim_pad`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn finish_rows<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    b: usize,
    rows: usize,
    head_of: &impl Fn(usize) -> usize,
    query_of: &impl Fn(usize) -> usize,
    ps: &[f32],
    os: &[f64],
    ms: &[f32],
    ls: &[f64],
    merged: bool,
    partial: Option<Partial<'_>>,
) {
    let (d, dp) = (plan.head_dim, plan.dim_pad);
    if let Some(Partial { o, m, l }) = partial {
        for r in 0..rows {
            let dst = &mut o[r * d..(r + 1) * d];
            let partial = &ps[r * dp..r * dp + d];
            if merged {
                for ((x, &sum), &p) in dst.iter_mut().zip(&os[r * dp..r * dp + d]).zip(partial) {
                    *x = sum + p as f64;
                }
            } else {
                for (x, &p) in dst.iter_mut().zip(partial) {
                    *x = p as f64;
                }
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
        let partial = &ps[r * dp..r * dp + d];
        if merged {
            for ((x, &o), &p) in dst.iter_mut().zip(&os[r * dp..r * dp + d]).zip(partial) {
                *x = T::from_f32(((o + p as f64) * inv) as f32);
            }
        } else {
            for (x, &p) in dst.iter_mut().zip(partial) {
                *x = T::from_f32((p as f64 * inv) as f32);
            }
        }
    }
}

/// `o += p; p = 0` (`o = p` when `o` holds nothing yet): the f32 partial output into the
/// f64 one.
#[inline(always)]
fn merge_partial(o: &mut [f64], p: &mut [f32], add: bool) {
    if add {
        for (o, p) in o.iter_mut().zip(p.iter_mut()) {
            *o += *p as f64;
            *p = 0.0;
        }
    } else {
        for (o, p) in o.iter_mut().zip(p.iter_mut()) {
            *o = *p as f64;
            *p = 0.0;
        }
    }
}

/// Adds key `j`'s V row (which holds NaN or inf) times each row's weight to the partial
/// outputs of the rows that keep the key; rows that removed it (causal cut or `-inf` mask) are left
/// alone. `p[r * ldp]` is row r's weight for the key.
///
/// # Safety
/// See [`run`]; `j < seq_k_of(b)`, the rows lie inside the problem.
#[allow(clippy::too_many_arguments)]
unsafe fn add_non_finite_key<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    b: usize,
    kvh: usize,
    j: usize,
    rows: usize,
    head_of: &impl Fn(usize) -> usize,
    query_of: &impl Fn(usize) -> usize,
    p: &[f32],
    ldp: usize,
    ps: &mut [f32],
) {
    let (d, dp) = (plan.head_dim, plan.dim_pad);
    let seq_k = plan.seq_k_of(b);
    // SAFETY: value row j < seq_k inside its view.
    let vs = unsafe {
        let off = plan.key_row(raw, plan.v, b, kvh, j);
        std::slice::from_raw_parts((raw.v as *const T).add(off), d)
    };
    for r in 0..rows {
        let i = query_of(r);
        if j >= plan.visible_end_in(seq_k, i) || j < plan.visible_start_in(seq_k, i) {
            continue;
        }
        if let Some(mst) = plan.mask {
            let at = b * mst.batch + head_of(r) * mst.head + i * mst.query + j;
            // SAFETY: one value of a mask row inside the mask view.
            if unsafe { *raw.mask.add(at) } == f32::NEG_INFINITY {
                continue;
            }
        }
        let w = p[r * ldp];
        for (o, &x) in ps[r * dp..r * dp + d].iter_mut().zip(vs) {
            *o += w * x.widen();
        }
    }
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// One tile's online softmax step over transposed scores `s` (`s[jj * lt + r]`, `lt =
/// m_old.len()`, a multiple of [`NR`]), lane-wise so it vectorizes: `m_new[r]` becomes the
/// larger of `m_old[r]` and row r's scores (NaN scores are passed over and poison the row
/// through its weights), each score its weight `e^(s - m_new)` and `sums[r]` their sum. A
/// row whose `m_new` is `-inf` (nothing visible yet) is weighed against 0 instead: its
/// `-inf` scores give 0, a NaN one NaN. The difference is taken before the scaling to log2
/// units, so scores near `-f32::MAX` do not overflow to `-inf` first.
#[inline(always)]
fn online_softmax<const FMA: bool>(
    s: &mut [f32],
    m_old: &[f32],
    m_new: &mut [f32],
    sums: &mut [f32],
) {
    let lt = m_old.len();
    let cols = s.len() / lt;
    // NR rows at a time down the keys, their maxima and sums held in registers.
    for c0 in (0..lt).step_by(NR) {
        let mut m = [0.0f32; NR];
        m.copy_from_slice(&m_old[c0..c0 + NR]);
        for jj in 0..cols {
            let x = &s[jj * lt + c0..jj * lt + c0 + NR];
            for c in 0..NR {
                m[c] = if x[c] > m[c] { x[c] } else { m[c] };
            }
        }
        let mut u = [0.0f32; NR];
        for c in 0..NR {
            u[c] = if m[c] == f32::NEG_INFINITY { 0.0 } else { m[c] };
        }
        let mut sum = [0.0f32; NR];
        for jj in 0..cols {
            let x = &mut s[jj * lt + c0..jj * lt + c0 + NR];
            for c in 0..NR {
                x[c] = exp2::<FMA>((x[c] - u[c]) * LOG2_E);
                sum[c] += x[c];
            }
        }
        m_new[c0..c0 + NR].copy_from_slice(&m);
        sums[c0..c0 + NR].copy_from_slice(&sum);
    }
}

/// `2^x` for `x <= 0`, branch-free so loops over it vectorize (libm's `exp2` would not).
/// Below 2^-126 it returns 0, which includes `x = -inf`. Relative error about 1e-7: a
/// degree-7 Taylor polynomial of `2^f` on `f` in [-0.5, 0.5] times `2^n` built from bits.
#[inline(always)]
fn exp2<const FMA: bool>(x: f32) -> f32 {
    const C: [f32; 8] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_734,
    ];
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < -126.0 { -126.0 } else { x };
    let t = xc + ROUND;
    let n = t - ROUND;
    let f = xc - n;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2n = f32::from_bits((ni.wrapping_add(127) as u32).wrapping_shl(23));
    let mut p = C[7];
    for &c in C[..7].iter().rev() {
        p = fmadd::<FMA>(p, f, c);
    }
    if x < -126.0 {
        0.0
    } else {
        p * pow2n
    }
}

/// Element types the kernel reads, with a branch-free widening that vectorizes.
trait Element: HostElement {
    /// Whether the type is `f32` itself (rows can be read in place).
    const IS_F32: bool = false;
    fn widen(self) -> f32;
}

impl Element for f32 {
    const IS_F32: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Element for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
}

/// IEEE half to single without branches (selects only): rebias the exponent, fix up
/// inf/NaN, renormalise subnormals through a float subtraction.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    const EXP_MASK: u32 = 0x7c00 << 13;
    let h = h as u32;
    let mut u = (h & 0x7fff) << 13;
    let exp = u & EXP_MASK;
    u += (127 - 15) << 23;
    let normal_or_special = if exp == EXP_MASK {
        u + ((128 - 16) << 23)
    } else {
        u
    };
    // Subnormal/zero: one more exponent step, then subtract the implicit bit 2^-14.
    let sub = f32::from_bits(u + (1 << 23)) - f32::from_bits(113 << 23);
    let mag = if exp == 0 {
        sub.to_bits()
    } else {
        normal_or_special
    };
    f32::from_bits(mag | ((h & 0x8000) << 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layout;
    use crate::reference::{attention_f64, random_values, relative_l2_error};

    /// Runs one problem under `tuning` and returns its error against the reference.
    fn error_under(tuning: Tuning, dtype: DType, layout: Layout, sq: usize, sk: usize) -> f64 {
        error_at(tuning, dtype, layout, 72, sq, sk)
    }

    /// [`error_under`] at head_dim `d`.
    fn error_at(
        tuning: Tuning,
        dtype: DType,
        layout: Layout,
        d: usize,
        sq: usize,
        sk: usize,
    ) -> f64 {
        let (b, h, hk) = (2, 4, 2);
        let shape = |s: usize, heads: usize| match layout {
            Layout::Bshd => [b, s, heads, d],
            Layout::Bhsd => [b, heads, s, d],
        };
        let make = |s: usize, heads: usize, seed: u64| {
            let sh = shape(s, heads);
            let n = sh.iter().product();
            DeviceTensor::from_f32(&random_values(n, seed), &sh, dtype, Device::Cpu).unwrap()
        };
        let (q, k, v) = (make(sq, h, 1), make(sk, hk, 2), make(sk, hk, 3));
        let mask_values: Vec<f32> = random_values(sq * sk, 4)
            .into_iter()
            .map(|x| if x > 0.7 { f32::NEG_INFINITY } else { x })
            .collect();
        let mask = DeviceTensor::from_host(&mask_values, &[sq, sk], Device::Cpu).unwrap();
        let config = AttentionConfig::new(h * d, h, 512)
            .with_num_kv_heads(hk)
            .with_causal(true)
            .with_layout(layout);
        let mut out = DeviceTensor::zeros(&shape(sq, h), dtype, Device::Cpu).unwrap();
        forward_tuned(&config, &q, &k, &v, Some(&mask), &mut out, tuning).unwrap();
        let want = attention_f64(&config, &q, &k, &v, Some(&mask)).unwrap();
        relative_l2_error(&out.to_f32_vec().unwrap(), &want)
    }

    /// Every instruction set and tile source (f32 rows in place or copied) a call can run
    /// under.
    fn tunings() -> Vec<Tuning> {
        let mut tunings = vec![
            Tuning::detect(),
            Tuning {
                isa: Isa::detect(),
                in_place: false,
            },
            Tuning {
                isa: Isa::Portable,
                in_place: true,
            },
            Tuning {
                isa: Isa::Portable,
                in_place: false,
            },
        ];
        #[cfg(target_arch = "x86_64")]
        if Isa::detect().has_avx2() {
            tunings.push(Tuning {
                isa: Isa::Avx2Fma,
                in_place: false,
            });
        }
        tunings
    }

    #[test]
    fn every_isa_and_tile_source_agree_with_the_reference() {
        for tuning in tunings() {
            for layout in [Layout::Bshd, Layout::Bhsd] {
                // 150 queries: several query blocks (matrix products); 1 query: direct.
                for (sq, sk) in [(150, 170), (1, 130), (170, 150)] {
                    let err = error_under(tuning, DType::F32, layout, sq, sk);
                    assert!(err < 1e-5, "{tuning:?} {layout:?} {sq}x{sk}: {err:e}");
                    let err = error_under(tuning, DType::F16, layout, sq, sk);
                    assert!(err < 2e-3, "{tuning:?} {layout:?} {sq}x{sk} f16: {err:e}");
                }
            }
        }
    }

    /// bf16 tasks on AMX tiles (where this CPU has them) at every head dim they take, both
    /// layouts, query blocks of one and several tiles, a causal cut and a `-inf` mask, next
    /// to the same problems on the AVX2 products.
    #[test]
    fn amx_tasks_agree_with_the_reference() {
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::detect() != Isa::Amx {
                eprintln!("no AMX on this CPU: the AMX task is not run");
                return;
            }
            let amx = Tuning::detect();
            let avx2 = Tuning {
                isa: Isa::Avx2Fma,
                in_place: true,
            };
            for d in [32, 64, 128, 256] {
                for layout in [Layout::Bshd, Layout::Bhsd] {
                    for (sq, sk) in [(150, 170), (40, 300), (170, 150), (20, 1)] {
                        let err = error_at(amx, DType::BF16, layout, d, sq, sk);
                        let base = error_at(avx2, DType::BF16, layout, d, sq, sk);
                        let what = format!("d {d} {layout:?} {sq}x{sk}: {err:e} (avx2 {base:e})");
                        assert!(err < 4e-3 && err < 2.0 * base + 1e-3, "{what}");
                    }
                }
            }
        }
    }

    /// Every per-call option (window, softcap, ALiBi, sinks) and the lse output on the AMX
    /// task, against the f64 reference and the AVX2 products on the same problem.
    #[test]
    fn amx_tasks_honour_every_option() {
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::detect() != Isa::Amx {
                eprintln!("no AMX on this CPU: the AMX task is not run");
                return;
            }
            let (b, h, hk, d, sq, sk) = (2, 4, 2, 64, 130, 200);
            let t = |n: usize, sh: &[usize], seed: u64| {
                DeviceTensor::from_f32(&random_values(n, seed), sh, DType::BF16, Device::Cpu)
                    .unwrap()
            };
            let q = t(b * sq * h * d, &[b, sq, h, d], 1);
            let k = t(b * sk * hk * d, &[b, sk, hk, d], 2);
            let v = t(b * sk * hk * d, &[b, sk, hk, d], 3);
            let per_head = |x: [f32; 4]| DeviceTensor::from_host(&x, &[4], Device::Cpu).unwrap();
            let options = AttentionOptions::new()
                .with_window(Some(70), Some(9))
                .with_softcap(3.0)
                .with_alibi_slopes(per_head([0.5, 0.25, 0.125, 0.0625]))
                .with_sinks(per_head([0.0, -1.0, 2.0, f32::NEG_INFINITY]));
            let config = AttentionConfig::new(h * d, h, 512)
                .with_num_kv_heads(hk)
                .with_causal(true);
            let (want, want_lse) =
                crate::reference::attention_f64_with(&config, &options, &q, &k, &v, None).unwrap();
            let avx2 = Tuning {
                isa: Isa::Avx2Fma,
                in_place: true,
            };
            let mut errs = Vec::new();
            for tuning in [Tuning::detect(), avx2] {
                let mut out =
                    DeviceTensor::zeros(&[b, sq, h, d], DType::BF16, Device::Cpu).unwrap();
                let mut lse = DeviceTensor::zeros(&[b, h, sq], DType::F32, Device::Cpu).unwrap();
                forward_opts(
                    &config,
                    &options,
                    &q,
                    &k,
                    &v,
                    None,
                    &mut out,
                    Some(&mut lse),
                    tuning,
                )
                .unwrap();
                let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
                let lse_gap = lse
                    .to_f32_vec()
                    .unwrap()
                    .iter()
                    .zip(&want_lse)
                    .map(|(&a, &w)| (a as f64 - w).abs())
                    .fold(0.0, f64::max);
                errs.push((err, lse_gap));
            }
            let (amx, base) = (errs[0], errs[1]);
            assert!(
                amx.0 < 4e-3 && amx.0 < 2.0 * base.0 + 1e-3,
                "{amx:?} vs avx2 {base:?}"
            );
            assert!(amx.1 < 1e-2, "lse {amx:?} vs avx2 {base:?}");
        }
    }

    /// NaN/inf in K and V at keys a `-inf` mask removes (every 5th key and the whole
    /// second tile) give the clean result under every tuning: f32 tiles read in place (V
    /// then copied with the poisoned rows zeroed) or copied, the direct path's rows read in
    /// place (one query, head_dim 64) or widened (head_dim 72), and both instruction sets.
    #[test]
    fn poison_at_removed_keys_is_dropped_under_every_tuning() {
        let (b, h, hk) = (2, 4, 2);
        let cases = tunings().into_iter().flat_map(|t| {
            [
                (t, 72, DType::F32),
                (t, 64, DType::F32),
                (t, 64, DType::BF16),
            ]
        });
        for (tuning, d, dtype) in cases {
            for (sq, sk) in [(150, 170), (1, 130)] {
                let removed = |j: usize| j.is_multiple_of(5) || (BLOCK_K..2 * BLOCK_K).contains(&j);
                let shape = |s: usize, heads: usize| [b, s, heads, d];
                let clean_k = random_values(b * sk * hk * d, 2);
                let clean_v = random_values(b * sk * hk * d, 3);
                let (mut pk, mut pv) = (clean_k.clone(), clean_v.clone());
                for (x, (k, v)) in pk.iter_mut().zip(pv.iter_mut()).enumerate() {
                    let j = x / (hk * d) % sk;
                    if removed(j) {
                        *k = [f32::NAN, f32::INFINITY][j % 2];
                        *v = [f32::NEG_INFINITY, f32::NAN][x % 2];
                    }
                }
                let m: Vec<f32> = (0..sq * sk)
                    .map(|x| {
                        if removed(x % sk) {
                            f32::NEG_INFINITY
                        } else {
                            0.5
                        }
                    })
                    .collect();
                let t = |vals: &[f32], sh: [usize; 4]| {
                    DeviceTensor::from_f32(vals, &sh, dtype, Device::Cpu).unwrap()
                };
                let mask = DeviceTensor::from_host(&m, &[sq, sk], Device::Cpu).unwrap();
                let config = AttentionConfig::new(h * d, h, 512)
                    .with_num_kv_heads(hk)
                    .with_causal(true);
                let q = t(&random_values(b * sq * h * d, 1), shape(sq, h));
                let (k, v) = (t(&pk, shape(sk, hk)), t(&pv, shape(sk, hk)));
                let mut out = DeviceTensor::zeros(&shape(sq, h), dtype, Device::Cpu).unwrap();
                forward_tuned(&config, &q, &k, &v, Some(&mask), &mut out, tuning).unwrap();
                let (ck, cv) = (t(&clean_k, shape(sk, hk)), t(&clean_v, shape(sk, hk)));
                let want = attention_f64(&config, &q, &ck, &cv, Some(&mask)).unwrap();
                let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
                let bound = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
                assert!(err < bound, "{tuning:?} {dtype:?} d {d} {sq}x{sk}: {err:e}");
            }
        }
    }

    fn problem(d: usize, heads: usize, kv: usize, sq: usize, sk: usize) -> AttentionProblem {
        AttentionProblem {
            batch: 1,
            seq_q: sq,
            seq_k: sk,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: d,
            scale: 1.0,
            causal: false,
            dtype: DType::F32,
            device: Device::Cpu,
            q: HeadStrides::default(),
            k: HeadStrides::default(),
            v: HeadStrides::default(),
            mask: None,
        }
    }

    /// Usual head dims keep the usual tiling; very large ones get narrower key tiles and
    /// fewer rows per task (the group split over tasks), so one worker's scratch stays
    /// bounded by the tile and row budgets.
    #[test]
    fn tiling_shrinks_for_large_head_dims() {
        // The query block also shrinks to give every thread work: fix the thread count.
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a two-thread pool")
            .install(tiling_on_two_threads);
    }

    fn tiling_on_two_threads() {
        let plan = Plan::new(&problem(128, 8, 2, 512, 512), HeadStrides::default());
        assert_eq!(
            (plan.block_k, plan.heads_per_task, plan.head_chunks),
            (BLOCK_K, 4, 1)
        );
        assert_eq!(plan.block_q, ROWS_TARGET / 4);
        let plan = Plan::new(&problem(65_536, 16, 1, 4, 4), HeadStrides::default());
        assert_eq!(
            (plan.block_k, plan.heads_per_task, plan.head_chunks),
            (NR, 10, 2)
        );
        assert_eq!(plan.block_q, 1);
        for d in [65_536, 1 << 20, 1 << 24] {
            let plan = Plan::new(&problem(d, 64, 1, 4, 4), HeadStrides::default());
            let dp = plan.dim_pad;
            assert!(plan.heads_per_task * plan.head_chunks >= 64);
            assert!(
                plan.heads_per_task * plan.block_q * dp * 12 <= ROWS_BYTES.max(dp * 12),
                "d {d}"
            );
            assert!(
                2 * 4 * plan.block_k * dp <= TILE_BYTES.max(2 * 4 * NR * dp),
                "d {d}"
            );
            assert!(plan.scratch_bytes() <= 4 * (TILE_BYTES + ROWS_BYTES).max(dp * 200));
        }
    }

    #[test]
    fn scratch_that_cannot_be_had_is_out_of_memory() {
        let err = try_zeroed::<f64>(usize::MAX / 4, "scratch").unwrap_err();
        assert!(matches!(err, AttentionError::OutOfMemory { .. }), "{err}");
    }

    #[test]
    fn visible_end_is_bottom_right_without_wrapping() {
        let mut plan = Plan::new(&problem(16, 1, 1, 3, 5), HeadStrides::default());
        plan.causal = true;
        assert_eq!(
            (0..3).map(|i| plan.visible_end(i)).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        (plan.seq_q, plan.seq_k) = (5, 2);
        assert_eq!(
            (0..5).map(|i| plan.visible_end(i)).collect::<Vec<_>>(),
            [0, 0, 0, 1, 2]
        );
        (plan.seq_q, plan.seq_k) = (2, usize::MAX);
        assert_eq!(plan.visible_end(0), usize::MAX - 1);
    }

    #[test]
    fn f16_widening_matches_half_for_every_value() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_widening_is_exact() {
        for bits in (0..=u16::MAX).step_by(7) {
            let x = bf16::from_bits(bits);
            let (got, want) = (x.widen(), x.to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
        }
    }

    /// Transposed scores of 16 rows over 3 keys: row 0 plain, row 1 all removed (`-inf`),
    /// row 2 removed but for a NaN, row 3 with an earlier max above its scores.
    #[test]
    fn online_softmax_weighs_each_row_against_its_max() {
        let lt = NR;
        let mut s = vec![0.0f32; 3 * lt];
        let mut m_old = vec![f32::NEG_INFINITY; lt];
        m_old[3] = 5.0;
        for (jj, x) in [1.0f32, 2.0, 3.0].iter().enumerate() {
            s[jj * lt] = *x;
            s[jj * lt + 1] = f32::NEG_INFINITY;
            s[jj * lt + 2] = if jj == 1 { f32::NAN } else { f32::NEG_INFINITY };
            s[jj * lt + 3] = *x;
        }
        for fma in [false, true] {
            let (mut t, mut m_new, mut sums) = (s.clone(), vec![0.0; lt], vec![0.0; lt]);
            if fma {
                online_softmax::<true>(&mut t, &m_old, &mut m_new, &mut sums);
            } else {
                online_softmax::<false>(&mut t, &m_old, &mut m_new, &mut sums);
            }
            assert_eq!(m_new[..4], [3.0, f32::NEG_INFINITY, f32::NEG_INFINITY, 5.0]);
            let want0: f64 = [-2.0f64, -1.0, 0.0].iter().map(|x| x.exp()).sum();
            let want3: f64 = [-4.0f64, -3.0, -2.0].iter().map(|x| x.exp()).sum();
            assert!((sums[0] as f64 - want0).abs() < 1e-6 * want0, "{}", sums[0]);
            assert!((sums[3] as f64 - want3).abs() < 1e-6 * want3, "{}", sums[3]);
            assert_eq!((sums[1], t[lt + 1]), (0.0, 0.0));
            assert!(sums[2].is_nan() && t[lt + 2].is_nan());
            assert!((t[2 * lt] - 1.0).abs() < 1e-6, "{}", t[2 * lt]);
        }
    }

    #[test]
    fn exp2_is_accurate_and_underflows_to_zero() {
        let mut x = -130.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp2();
            for got in [exp2::<false>(x), exp2::<true>(x)] {
                if x < -126.0 {
                    assert_eq!(got, 0.0);
                } else {
                    let rel = ((got as f64 - want) / want).abs();
                    assert!(rel < 3e-7, "x = {x}: {got} vs {want}");
                }
            }
            x += 0.0137;
        }
        assert_eq!(exp2::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2::<false>(0.0), 1.0);
    }

    #[test]
    fn an_output_that_repeats_elements_is_refused() {
        // Parallel tasks write disjoint rows: an output whose indices alias is refused first.
        let cfg = AttentionConfig::new(8, 2, 4);
        let t = |shape: &[usize]| DeviceTensor::zeros(shape, DType::F32, Device::Cpu).unwrap();
        let (q, k) = (t(&[1, 3, 2, 4]), t(&[1, 3, 2, 4]));
        let mut out = t(&[1, 1, 2, 4]).broadcast_dim(1, 3).unwrap();
        let e = CpuAttentionBackend::new()
            .forward_into(&cfg, &q, &k, &k, None, &mut out)
            .unwrap_err();
        assert!(
            matches!(&e, AttentionError::UnsupportedLayout { what, .. } if what == "out"),
            "{e:?}"
        );
    }
}
