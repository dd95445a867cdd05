//! Cached attention on the host: the tiled task of the parent module over a [`KvCache`]'s
//! own storage, contiguous or paged, each sequence with its own length.
//!
//! Tasks are (sequence, kv head, head chunk, query block) as for `forward_into`, so one pass
//! over a K/V tile serves every query head of the group and every query of the block: a
//! decode step reads each cached row once. When those tasks are too few for the threads
//! (a small batch), each one's keys are also cut into ranges of whole tiles; a range's task
//! leaves its unnormalised rows (output sum, max, weight sum) in a buffer, and a merge
//! combines the ranges of a row in f64 (log-sum-exp) before writing it.

use rayon::prelude::*;

use super::{
    for_each_task, scratches, try_zeroed, Element, Isa, Paging, Partial, Plan, RawPtrs, Work,
    ROWS_BYTES, ROWS_TARGET,
};
use crate::backend::AttentionPath;
use crate::config::AttentionConfig;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::kv_cache::KvCache;
use crate::options::AttentionOptions;
use crate::problem::AttentionProblem;
use crate::tensor::{DeviceTensor, HostAccess};
use half::{bf16, f16};

/// Fewest keys a key range is given when the keys are split: below this the merge and the
/// per-task setup cost more than the parallelism gains.
pub(super) const MIN_SPLIT_KEYS: usize = 512;

/// Queries of one task at least (where the rows allow): a decode step's or a short draft's
/// queries all share one pass over the cache.
const CACHED_BLOCK_Q: usize = 16;

/// Most bytes of the key-split partial rows of one call; beyond it the keys are cut into
/// fewer ranges.
const PARTIAL_BYTES: usize = 64 << 20;

/// `forward_cached` of the CPU backend, with the instruction set and the smallest key
/// range given (tests use a small one to split short caches).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    cache: &KvCache,
    out: &mut DeviceTensor,
    lse: Option<&mut DeviceTensor>,
    isa: Isa,
    min_split_keys: usize,
) -> Result<AttentionPath> {
    for (what, device) in [("q", q.device()), ("kv cache", cache.device())] {
        if device != Device::Cpu {
            return Err(AttentionError::DeviceMismatch {
                what: what.into(),
                expected: Device::Cpu.to_string(),
                got: device.to_string(),
            });
        }
    }
    let (p, os) = cache.problem(config, q, out, 0)?;
    let parts = cache.raw_parts();
    let mut others = vec![q, parts.k, parts.v];
    others.extend(parts.block_table);
    others.extend(options.alibi_slopes.as_ref());
    others.extend(options.sinks.as_ref());
    others.push(&*out);
    let lse_strides = options.check(&p, lse.as_deref(), &others)?;
    if let Some(i) = others[3..others.len() - 1]
        .iter()
        .position(|t| out.may_overlap(t))
    {
        return Err(AttentionError::UnsupportedLayout {
            what: "out".into(),
            reason: format!("overlaps per-head option tensor {i}; give it its own memory"),
        });
    }
    // A host copy of the (small) table: checked once, read by every task.
    let table = parts.block_table.map(|t| t.to_host::<i32>()).transpose()?;
    if let Some(ids) = &table {
        check_pages(
            ids,
            cache.lengths(),
            parts.page_size,
            parts.max_pages,
            parts.num_pages,
        )?;
    }
    let keys = Keys {
        k: parts.k,
        v: parts.v,
        lens: cache.lengths(),
        paging: table.as_deref().map(|t| {
            let pg = Paging {
                page_size: parts.page_size,
                max_pages: parts.max_pages,
            };
            (pg, t)
        }),
    };
    let lse = lse.zip(lse_strides);
    attend(&p, os, options, q, keys, out, lse, isa, min_split_keys)?;
    Ok(AttentionPath::Cpu)
}

/// The keys of a cached call as [`attend`] reads them.
pub(super) struct Keys<'a> {
    /// K storage (a batch of sequences, or a page pool with `paging`).
    pub k: &'a DeviceTensor,
    /// V storage, laid out as K.
    pub v: &'a DeviceTensor,
    /// Tokens of each sequence.
    pub lens: &'a [usize],
    /// Paged K/V: the page geometry and the block table (row-major `[batch, max_pages]`),
    /// every entry a held token uses inside the pool.
    pub paging: Option<(Paging, &'a [i32])>,
}

/// Runs a validated cached call: `p` (with `os`, the output strides) was checked against
/// q, out and the keys, the options' per-head tensors and `lse` (with its strides) too,
/// and `keys.lens[b] <= p.seq_k` for every sequence. Writes nothing on a refusal (busy
/// storage, scratch that cannot be had).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    p: &AttentionProblem,
    os: crate::problem::HeadStrides,
    options: &AttentionOptions,
    q: &DeviceTensor,
    keys: Keys<'_>,
    out: &mut DeviceTensor,
    lse: Option<(&mut DeviceTensor, crate::options::LseStrides)>,
    isa: Isa,
    min_split_keys: usize,
) -> Result<()> {
    let mut reads = vec![q, keys.k, keys.v];
    reads.extend(options.alibi_slopes.as_ref());
    reads.extend(options.sinks.as_ref());
    let (lse, lse_strides) = match lse {
        Some((l, st)) => (Some(l), Some(st)),
        None => (None, None),
    };
    let mut writes = vec![&*out];
    writes.extend(lse.as_deref());
    // Held until the tasks are done: no other thread writes the keys or touches `out`.
    let _access = HostAccess::acquire(&reads, &writes)?;
    let host = |t: &DeviceTensor, what: &str| {
        t.host_ptr().ok_or_else(|| AttentionError::DeviceMismatch {
            what: what.into(),
            expected: Device::Cpu.to_string(),
            got: t.device().to_string(),
        })
    };
    let raw = RawPtrs {
        q: host(q, "q")?,
        k: host(keys.k, "kv cache k")?,
        v: host(keys.v, "kv cache v")?,
        mask: std::ptr::null(),
        out: host(out, "out")?,
        table: keys.paging.map_or(std::ptr::null(), |(_, t)| t.as_ptr()),
        lse: match lse.as_deref() {
            Some(l) => host(l, "lse")? as *mut f32,
            None => std::ptr::null_mut(),
        },
    };
    let mut plan = cached_plan(p, os, keys.lens, keys.paging.map(|(pg, _)| pg));
    // SAFETY: the caller checked the per-head tensors; `_access` covers them.
    plan.opts = unsafe { super::row_options(options, p.num_heads, lse_strides) }?;
    if super::decode::eligible(&plan) {
        // SAFETY: as for the tiled tasks below.
        return unsafe {
            match p.dtype {
                DType::F32 => super::decode::run::<f32>(&plan, raw, isa, min_split_keys),
                DType::F16 => super::decode::run::<f16>(&plan, raw, isa, min_split_keys),
                DType::BF16 => super::decode::run::<bf16>(&plan, raw, isa, min_split_keys),
                d @ (DType::I32 | DType::U32 | DType::I64) => d.check_attention("q"),
            }
        };
    }
    let (splits, split_keys) = key_splits(&plan, min_split_keys);
    // SAFETY: `p` was checked against q, out and the keys; every key a task reads is below
    // its sequence's length, inside the key storage (pages checked by the caller); `out`
    // is on the host, overlaps no input and has distinct elements; `_access` keeps other
    // threads off these ranges.
    unsafe {
        match p.dtype {
            DType::F32 => run::<f32>(&plan, raw, isa, splits, split_keys),
            DType::F16 => run::<f16>(&plan, raw, isa, splits, split_keys),
            DType::BF16 => run::<bf16>(&plan, raw, isa, splits, split_keys),
            d @ (DType::I32 | DType::U32 | DType::I64) => d.check_attention("q"),
        }
    }
}

/// Refuses a block table whose page ids for the held tokens fall outside the pool.
fn check_pages(
    ids: &[i32],
    lens: &[usize],
    page_size: usize,
    max_pages: usize,
    num_pages: usize,
) -> Result<()> {
    for (b, &len) in lens.iter().enumerate() {
        for (page, &id) in ids[b * max_pages..][..len.div_ceil(page_size)]
            .iter()
            .enumerate()
        {
            if usize::try_from(id).map_or(true, |id| id >= num_pages) {
                return Err(AttentionError::Runtime {
                    op: "CpuAttentionBackend::forward_cached".into(),
                    detail: format!(
                        "block table entry {page} of sequence {b} is page {id}, outside the pool of {num_pages} pages"
                    ),
                    source: None,
                });
            }
        }
    }
    Ok(())
}

/// The plan of a cached call over `p` with every sequence full (for tests of the paths).
#[cfg(test)]
pub(super) fn plan_for_tests(p: &AttentionProblem) -> Plan {
    let os = crate::problem::HeadStrides {
        batch: p.seq_q * p.num_heads * p.head_dim,
        head: p.head_dim,
        seq: p.num_heads * p.head_dim,
    };
    cached_plan(p, os, &vec![p.seq_k; p.batch], None)
}

/// The tiling of `forward_into`, with the cache's lengths and paging, and query blocks of
/// at least [`CACHED_BLOCK_Q`] queries where the rows allow.
fn cached_plan(
    p: &AttentionProblem,
    out: crate::problem::HeadStrides,
    lens: &[usize],
    paging: Option<Paging>,
) -> Plan {
    let mut plan = Plan::new(p, out);
    let max_rows = (ROWS_BYTES / (12 * plan.dim_pad)).max(1);
    plan.block_q = (ROWS_TARGET / plan.group)
        .max(CACHED_BLOCK_Q)
        .min(max_rows / plan.heads_per_task)
        .clamp(1, p.seq_q);
    plan.q_blocks = p.seq_q.div_ceil(plan.block_q);
    plan.rows_pad = (plan.heads_per_task * plan.block_q).next_multiple_of(super::MR);
    if lens.iter().any(|&l| l != p.seq_k) {
        plan.lens = lens.to_vec();
    }
    plan.paging = paging;
    plan
}

/// How many key ranges each task's keys are cut into, and the keys of one range (a
/// multiple of the tile): enough tasks for every thread, ranges of at least
/// `min_split_keys` keys, partial rows within [`PARTIAL_BYTES`].
fn key_splits(plan: &Plan, min_split_keys: usize) -> (usize, usize) {
    let groups = plan.batch * plan.num_kv_heads * plan.tasks_per_pair();
    let want = 4 * rayon::current_num_threads();
    let per_task_bytes = plan.rows_pad * (plan.head_dim + 2) * 8;
    let splits = want
        .div_ceil(groups)
        .min(plan.seq_k.div_ceil(min_split_keys.max(1)))
        .min(PARTIAL_BYTES / groups.saturating_mul(per_task_bytes).max(1))
        .max(1);
    if splits == 1 {
        return (1, plan.seq_k);
    }
    let split_keys = plan.seq_k.div_ceil(splits).next_multiple_of(plan.block_k);
    (plan.seq_k.div_ceil(split_keys), split_keys)
}

/// A pointer to the partial rows that the key-range tasks fill, each its own part.
#[derive(Clone, Copy)]
struct PartialPtr(*mut f64);

// SAFETY: every task writes only its own part of the buffer (see `run`).
unsafe impl Send for PartialPtr {}
unsafe impl Sync for PartialPtr {}

impl PartialPtr {
    /// The pointer `i` values on (a method, so closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// `i` lies inside the buffer.
    unsafe fn at(self, i: usize) -> *mut f64 {
        // SAFETY: forwarded.
        unsafe { self.0.add(i) }
    }
}

/// Runs the tasks of `plan`, each over `splits` key ranges of `split_keys` keys, and merges
/// the ranges. Fails only when scratch or the partial rows cannot be allocated, and then
/// before writing any output.
///
/// # Safety
/// As [`super::run`], with `raw.table` valid for every held key when `plan` is paged.
unsafe fn run<T: Element>(
    plan: &Plan,
    raw: RawPtrs,
    isa: Isa,
    splits: usize,
    split_keys: usize,
) -> Result<()> {
    let groups = plan.batch * plan.num_kv_heads * plan.tasks_per_pair();
    let tasks = groups * splits;
    let mut workers = scratches(plan, tasks)?;
    if splits == 1 {
        for_each_task(&mut workers, tasks, |sc, t| {
            // SAFETY: forwarded from `run`'s contract.
            unsafe { isa.task::<T>(plan, raw, work_of(plan, splits, split_keys, t, None), sc) }
        });
        return Ok(());
    }
    let rows = plan.rows_pad;
    let d = plan.head_dim;
    let per = rows * (d + 2);
    let mut partials: Vec<f64> = try_zeroed(tasks * per, "cpu cached attention partials")?;
    let base = PartialPtr(partials.as_mut_ptr());
    for_each_task(&mut workers, tasks, |sc, t| {
        // SAFETY: task t alone owns values t*per .. (t+1)*per of the buffer, which outlives
        // the tasks.
        let part = unsafe { std::slice::from_raw_parts_mut(base.at(t * per), per) };
        let (o, ml) = part.split_at_mut(rows * d);
        let (m, l) = ml.split_at_mut(rows);
        let partial = Partial { o, m, l };
        let work = work_of(plan, splits, split_keys, t, Some(partial));
        // SAFETY: forwarded from `run`'s contract; the partial holds every row.
        unsafe { isa.task::<T>(plan, raw, work, sc) }
    });
    partials
        .par_chunks_mut(splits * per)
        .enumerate()
        .for_each(|(g, ranges)| {
            // SAFETY: forwarded from `run`'s contract; group g writes its own rows.
            unsafe { merge::<T>(plan, raw, g, ranges) }
        });
    Ok(())
}

/// Task `t` of a call whose tasks are (group, key range) pairs, `splits` ranges of
/// `split_keys` keys per group.
fn work_of<'a>(
    plan: &Plan,
    splits: usize,
    split_keys: usize,
    t: usize,
    partial: Option<Partial<'a>>,
) -> Work<'a> {
    let per_pair = plan.tasks_per_pair();
    let (g, s) = (t / splits, t % splits);
    Work {
        pair: g / per_pair,
        hc: g % per_pair / plan.q_blocks,
        qb: g % plan.q_blocks,
        keys: if splits == 1 {
            0..plan.seq_k
        } else {
            s * split_keys..(s + 1) * split_keys
        },
        partial,
        v_bad: None,
        packed: None,
    }
}

/// Combines the key ranges of task group `g` (`ranges`: the partials of
/// `rows_pad * (head_dim + 2)` values) in f64 and writes its output rows. The first
/// range's values are overwritten with the sums.
///
/// # Safety
/// As [`run`]; `g` is a task group of `plan`, whose rows no other thread writes.
pub(super) unsafe fn merge<T: Element>(plan: &Plan, raw: RawPtrs, g: usize, ranges: &mut [f64]) {
    let per_pair = plan.tasks_per_pair();
    let (pair, hc, qb) = (
        g / per_pair,
        g % per_pair / plan.q_blocks,
        g % plan.q_blocks,
    );
    let (b, h0, nh, q0, nq) = plan.rows_of(pair, hc, qb);
    let (rows_pad, d) = (plan.rows_pad, plan.head_dim);
    let per = rows_pad * (d + 2);
    let (first, rest) = ranges.split_at_mut(per);
    let (o_sum, ml) = first.split_at_mut(rows_pad * d);
    let (m0, l0) = ml.split_at_mut(rows_pad);
    let op = raw.out as *mut T;
    for r in 0..nh * nq {
        // The largest max; a range that saw no key has max -inf and weight 0 (its output
        // sum is zero), unless its sum is NaN (a poisoned row), which the product keeps.
        let mx = rest
            .chunks_exact(per)
            .map(|x| x[rows_pad * d + r])
            .fold(m0[r], f64::max);
        let weight = |m: f64| {
            if m == f64::NEG_INFINITY {
                0.0
            } else {
                (m - mx).exp()
            }
        };
        let w0 = weight(m0[r]);
        let mut l = l0[r] * w0;
        let o = &mut o_sum[r * d..(r + 1) * d];
        o.iter_mut().for_each(|x| *x *= w0);
        for x in rest.chunks_exact(per) {
            let w = weight(x[rows_pad * d + r]);
            l += x[rows_pad * d + rows_pad + r] * w;
            for (acc, &v) in o.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                *acc += v * w;
            }
        }
        let (h, i) = (h0 + r / nq, q0 + r % nq);
        // l is 0 only when no key was visible: that row's output is zero by contract.
        let inv = match &plan.opts {
            None => {
                if l == 0.0 {
                    0.0
                } else {
                    1.0 / l
                }
            }
            Some(opts) => {
                let (inv, lse) = opts.finish(mx, l, h);
                if let Some(st) = opts.lse {
                    // SAFETY: one element of `lse`, written by this group only.
                    unsafe { *raw.lse.add(b * st.batch + h * st.head + i * st.query) = lse as f32 };
                }
                inv
            }
        };
        let off = b * plan.out.batch + h * plan.out.head + i * plan.out.seq;
        // SAFETY: one output row inside `out`, written by this group only.
        let dst = unsafe { std::slice::from_raw_parts_mut(op.add(off), d) };
        for (x, &s) in dst.iter_mut().zip(o.iter()) {
            *x = T::from_f32((s * inv) as f32);
        }
    }
}
