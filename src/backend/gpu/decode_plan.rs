//! Decode planning (kernels/flash_decode.hip): which path a head dim takes, the key tile,
//! the shared memory of a block and how the cache is cut into splits. Pure functions of
//! the problem and the device's multiprocessor count, tested without a GPU.

use super::grid::MAX_GRID_X;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::kernels::catalog::DECODE_BUCKETS;
use crate::problem::AttentionProblem;

/// Longest query block the decode kernel takes.
pub const MAX_DECODE_QUERIES: usize = 16;
/// Query rows one decode block serves on the shared-memory path (`DEC_ROWS` in the kernel).
const ROWS: usize = 16;
/// Query rows one decode block serves on the register path (`DEC_RROWS` in the kernel).
const REG_ROWS: usize = 4;
/// Keys each lane group loads per tile on the register path (`DecReg::PER`).
const REG_PER: usize = 2;
/// Tiles in the register path's copy ring (`DEC_STAGES`).
const REG_STAGES: usize = 3;
pub(super) const THREADS: u32 = 256;
/// Fewest keys worth giving a block of their own (H200, bf16, B = 1, L = 4096: 16 chunks of
/// 256 keys 11.1 us, 32 of 128 11.7 us, the kernel alone from a graph)...
const MIN_SPLIT_KEYS: usize = 256;
/// ...except in short caches, where up to [`SHORT_CACHE_SPLITS`] chunks of at least this
/// many keys still pay off (measured on the H100 with 128-thread blocks: B=1, L=1024 ran in 10.9 us with 16
/// chunks of 64 keys, 14.1 us with 8 of 128; at L=4096, 64 chunks of 64 keys lose to 32
/// of 128 because the merge grows with the chunk count).
const MIN_SHORT_SPLIT_KEYS: usize = 64;
const SHORT_CACHE_SPLITS: usize = 16;

/// The smallest decode bucket holding `head_dim`.
pub fn decode_bucket(head_dim: usize) -> Option<usize> {
    DECODE_BUCKETS.iter().copied().find(|&b| b >= head_dim)
}

/// Keys per shared-memory tile (`DecodeTile<T, HD>::N` in the kernel): 16 KiB of K.
fn tile_keys(dtype: DType, bucket: usize) -> usize {
    (16384 / (bucket * dtype.size_in_bytes())).clamp(16, 64)
}

/// Lanes per key row on the register path (`DecReg::VPR`), or `None` when `bucket` takes the
/// shared-memory path (`DecReg::OK` false).
pub(super) fn reg_lanes(dtype: DType, bucket: usize) -> Option<usize> {
    let vec = 16 / dtype.size_in_bytes();
    let vpr = bucket / vec;
    // At least 8 lanes: the kernel's reduce-scatter takes 8 scores to one per lane.
    (bucket.is_multiple_of(vec) && (8..=32).contains(&vpr) && vpr.is_power_of_two()).then_some(vpr)
}

/// Whether the decode kernel can append new tokens itself in the same launch (the register
/// path, see [`GpuAttentionBackend::forward_cached_append`](super::GpuAttentionBackend::forward_cached_append)).
pub(crate) fn fuses_append(dtype: DType, head_dim: usize) -> bool {
    decode_bucket(head_dim).is_some_and(|b| reg_lanes(dtype, b).is_some())
}

/// Key granularity of a split of the body that runs: a tensor-core block's tile
/// (MMA_WARPS x MMA_KEYS keys), else [`split_granularity`].
fn granularity(tensor_cores: bool, dtype: DType, bucket: usize) -> usize {
    if tensor_cores {
        MMA_WARPS * MMA_KEYS
    } else {
        split_granularity(dtype, bucket)
    }
}

/// Key granularity of a split: a whole number of tiles of whichever path runs.
pub(super) fn split_granularity(dtype: DType, bucket: usize) -> usize {
    let smem = tile_keys(dtype, bucket);
    match reg_lanes(dtype, bucket) {
        // Both are powers of two, so the larger is a multiple of the smaller.
        Some(vpr) => smem.max(REG_PER * THREADS as usize / vpr),
        None => smem,
    }
}

/// Warps of a tensor-core block (`DEC_MWARPS`) and the keys each takes per tile (`DEC_MKEYS`).
const MMA_WARPS: usize = THREADS as usize / 32;
const MMA_KEYS: usize = 16;
/// Query rows of a tensor-core block: the M dimension of its products.
const MMA_ROWS: usize = 16;
/// Stages of the tensor-core body's copy ring (`DEC_MSTAGES`).
const MMA_STAGES: usize = 2;
/// Keys a tensor-core split should hold at least before that body is chosen over the
/// register path for one query row group (shorter splits spend their time in the fixed
/// costs, where the register path's two blocks per multiprocessor do better).
const MMA_MIN_SPLIT_KEYS: usize = 1024;

/// Whether the tensor-core body (kernels/flash_decode.hip, `DecMma`) exists for this dtype
/// and bucket: 16-bit caches with head dims 64 and 128 (CUDA sm_80+ only).
pub(crate) fn tensor_core_body(dtype: DType, bucket: usize) -> bool {
    dtype.size_in_bytes() == 2 && (bucket == 64 || bucket == 128)
}

/// Dynamic shared memory of a tensor-core block: the query rows, then the copy ring of
/// MMA_STAGES x MMA_WARPS x (K and V of MMA_KEYS keys), rows padded by 16 bytes.
pub(crate) fn tensor_core_smem_bytes(dtype: DType, bucket: usize) -> u32 {
    let row = (bucket + 8) * dtype.size_in_bytes();
    ((MMA_ROWS + MMA_STAGES * MMA_WARPS * 2 * MMA_KEYS) * row) as u32
}

/// Whether a device with mma.sync (`has_mma`) and `max_shared` bytes of shared memory per
/// block runs the tensor-core body of `p`'s dtype and head dim.
pub(crate) fn tensor_cores_fit(has_mma: bool, max_shared: u32, p: &AttentionProblem) -> bool {
    has_mma
        && decode_bucket(p.head_dim).is_some_and(|b| {
            tensor_core_body(p.dtype, b) && tensor_core_smem_bytes(p.dtype, b) <= max_shared
        })
}

/// `FORGE_ATTN_DECODE_TENSOR_CORES=0|1` forces the register path or the tensor-core body
/// where both could run (tuning runs).
fn tensor_cores_override() -> Option<bool> {
    static V: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        match std::env::var("FORGE_ATTN_DECODE_TENSOR_CORES")
            .ok()?
            .as_str()
        {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        }
    })
}

/// Query rows per block for this dtype and head-dim bucket.
pub(super) fn block_rows(dtype: DType, bucket: usize) -> usize {
    if reg_lanes(dtype, bucket).is_some() {
        REG_ROWS
    } else {
        ROWS
    }
}

/// Dynamic shared memory of one decode block (same layouts as the kernel's comments);
/// `bucket` is one of the decode head-dim buckets ([`decode_bucket`]).
pub(crate) fn decode_smem_bytes(dtype: DType, bucket: usize) -> u32 {
    let es = dtype.size_in_bytes();
    if reg_lanes(dtype, bucket).is_some() {
        // The ring of DEC_STAGES tiles, 2 x REG_PER 16-byte vectors per thread each; the
        // group merge and the split weights reuse it (both smaller).
        return (REG_STAGES * REG_PER * 2 * THREADS as usize * 16) as u32;
    }
    let row = bucket + 16 / es;
    let n = tile_keys(dtype, bucket);
    (2 * n * row * es + ROWS * bucket * 4 + ROWS * n * 4 + 3 * ROWS * 4) as u32
}

/// How a decode call is cut: chunks per (sequence, KV head) and keys per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    /// Chunks (blocks) per sequence and KV head.
    pub num_splits: usize,
    /// Keys per chunk (a multiple of the key tile).
    pub split_keys: usize,
}

/// Blocks of each body resident per multiprocessor: the register path's launch bounds
/// (`DEC_REG_BLOCKS`) and 48 KiB of shared memory allow two; the shared-memory path's
/// bounds promise one; a tensor-core block's 140 KiB leave room for one. The H100 plan
/// aimed for one register block per multiprocessor; on the H200 two measured faster where
/// the cache is long (bf16, 8 KV heads, D = 128, B = 8, L = 32768: 4 chunks 273.5 us, 2
/// chunks 352.0 us; short caches stay at 16 chunks through `MIN_SPLIT_KEYS`).
fn blocks_per_sm(tensor_cores: bool, dtype: DType, bucket: usize) -> usize {
    if tensor_cores || reg_lanes(dtype, bucket).is_none() {
        1
    } else {
        2
    }
}

/// The split of [`split_plan_for`] for the register or shared-memory path.
#[cfg(test)]
pub(crate) fn split_plan(
    multiprocessors: usize,
    batch: usize,
    kv_heads: usize,
    row_groups: usize,
    max_len: usize,
    dtype: DType,
    bucket: usize,
) -> SplitPlan {
    split_plan_for(
        false,
        multiprocessors,
        batch,
        kv_heads,
        row_groups,
        max_len,
        dtype,
        bucket,
    )
}

/// Chooses the split so the grid fills whole waves of the body's resident blocks
/// ([`blocks_per_sm`]; a last, partly filled wave costs about as much as a full one), with
/// at least one wave's worth of blocks where the cache is long enough, never giving a block
/// fewer than 256 keys (64 in short caches); among equally good cuts, the one with the
/// fewest splits. `tensor_cores`: for the tensor-core body.
#[allow(clippy::too_many_arguments)]
pub(crate) fn split_plan_for(
    tensor_cores: bool,
    multiprocessors: usize,
    batch: usize,
    kv_heads: usize,
    row_groups: usize,
    max_len: usize,
    dtype: DType,
    bucket: usize,
) -> SplitPlan {
    let base = (batch * kv_heads * row_groups).max(1);
    let slots = blocks_per_sm(tensor_cores, dtype, bucket) * multiprocessors.max(1);
    let by_occupancy = slots.div_ceil(base);
    let by_length = max_len
        .div_ceil(MIN_SPLIT_KEYS)
        .max(
            max_len
                .div_ceil(MIN_SHORT_SPLIT_KEYS)
                .min(SHORT_CACHE_SPLITS),
        )
        .max(1);
    let tile = granularity(tensor_cores, dtype, bucket);
    let cut = |want: usize| cut_into(want, max_len, tile);
    let efficiency = |s: &SplitPlan| {
        let blocks = base * s.num_splits;
        blocks as f64 / (blocks.div_ceil(slots) * slots) as f64
    };
    let mut best = cut(1);
    for want in 2..=(2 * by_occupancy).min(by_length) {
        let c = cut(want);
        if efficiency(&c) > efficiency(&best) + 0.02 {
            best = c;
        }
    }
    best
}

/// About `want` chunks of whole tiles covering `max_len` keys.
pub(super) fn cut_into(want: usize, max_len: usize, tile: usize) -> SplitPlan {
    let split_keys = (max_len.div_ceil(want.max(1)).div_ceil(tile) * tile).max(tile);
    SplitPlan {
        num_splits: max_len.div_ceil(split_keys).max(1),
        split_keys,
    }
}

/// `FORGE_ATTN_DECODE_SPLITS=N` fixes the number of chunks per sequence (tuning runs).
fn splits_override() -> Option<usize> {
    static N: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("FORGE_ATTN_DECODE_SPLITS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
    })
}
/// The split a launch over `len` keys uses: `FORGE_ATTN_DECODE_SPLITS` when set, else
/// [`split_plan`].
pub(super) fn chosen_split(
    multiprocessors: usize,
    tensor_cores: bool,
    p: &AttentionProblem,
    bucket: usize,
    row_groups: usize,
    len: usize,
) -> SplitPlan {
    match splits_override() {
        Some(n) => cut_into(n, len, granularity(tensor_cores, p.dtype, bucket)),
        None => split_plan_for(
            tensor_cores,
            multiprocessors,
            p.batch,
            p.num_kv_heads,
            row_groups,
            len,
            p.dtype,
            bucket,
        ),
    }
}

/// How one decode call is launched: the head-dim bucket, the path, the grid's row groups,
/// the split of this launch and the split the workspace is sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DecodeLaunch {
    /// The decode head-dim bucket ([`decode_bucket`]).
    pub bucket: usize,
    /// Whether the register path or the tensor-core body runs (both merge the splits in
    /// the kernel), else the shared-memory path.
    pub reg: bool,
    /// Whether the tensor-core body runs.
    pub tensor_cores: bool,
    /// Blocks per (sequence, KV head) along the query rows of the group.
    pub row_groups: usize,
    /// The cut of this launch.
    pub split: SplitPlan,
    /// Splits the workspace holds: this cut's or the capacity's, whichever is more.
    pub workspace_splits: usize,
    /// Dynamic shared memory of a block.
    pub smem: u32,
}

/// The split-result workspace of a decode launch, in f32 elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SplitWorkspace {
    /// f32 elements of the buffer: partial rows, then their log-sum-exps.
    pub elems: usize,
    /// Where this launch's log-sum-exps start, in elements.
    pub lse_offset: usize,
    /// Split counters of the register path's in-kernel merge (0 on the other path).
    pub counters: usize,
}

fn unsupported(reason: String) -> AttentionError {
    AttentionError::NotSupported {
        backend: "gpu (decode)".into(),
        reason,
    }
}

/// Plans a decode launch of `p` on a device with `multiprocessors` SMs over a cache that may
/// grow to `capacity` keys. A recorded call (`capturing`) is replayed while the cache grows
/// (the kernel reads the lengths from the device), so it is cut for the longest cache it may
/// see; the workspace always fits that cut too, so recording never needs more than the
/// calls before it had. `append`: the launch appends new tokens itself (register path only).
/// `tensor_cores`: the device runs the tensor-core body (CUDA sm_80+ with room for its
/// shared memory, see [`tensor_core_smem_bytes`]); it then runs where it exists and is
/// faster.
#[cfg(test)]
pub(super) fn plan_launch(
    multiprocessors: usize,
    tensor_cores: bool,
    p: &AttentionProblem,
    capacity: usize,
    capturing: bool,
    append: bool,
) -> Result<DecodeLaunch> {
    plan_launch_over(
        multiprocessors,
        tensor_cores,
        p,
        capacity,
        capturing,
        append,
        None,
    )
}

/// Keys of each sequence that some query's window reaches, with `seq_q` queries and a left
/// window bound `left` (the kernel's clamped value): the keys from `len - seq_q - left` to
/// the last one, at most `left + seq_q` (no right bound shortens it: the last query's
/// diagonal is the sequence's last key). `None` without a left bound: every key.
pub(crate) fn window_span(seq_q: usize, left: Option<usize>) -> Option<usize> {
    left.map(|l| l.saturating_add(seq_q))
}

/// [`plan_launch`] whose splits cover at most `span` keys per sequence
/// ([`window_span`]; the kernel lays them over the window's keys): a window's cost
/// follows the window, not the cache length. `None`: every key.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_launch_over(
    multiprocessors: usize,
    tensor_cores: bool,
    p: &AttentionProblem,
    capacity: usize,
    capturing: bool,
    append: bool,
    span: Option<usize>,
) -> Result<DecodeLaunch> {
    let bucket = decode_bucket(p.head_dim)
        .ok_or_else(|| unsupported(format!("head_dim {} exceeds 256", p.head_dim)))?;
    let reg = reg_lanes(p.dtype, bucket).is_some();
    if append && !reg {
        return Err(unsupported(format!(
            "a fused append needs the register path, {} head_dim {} takes the other",
            p.dtype, p.head_dim
        )));
    }
    let rows = (p.num_heads / p.num_kv_heads.max(1)).saturating_mul(p.seq_q);
    let keys = |len: usize| span.map_or(len, |w| w.min(len));
    let plan = |tc: bool| -> Result<DecodeLaunch> {
        let row_groups = rows.div_ceil(if tc {
            MMA_ROWS
        } else {
            block_rows(p.dtype, bucket)
        });
        // Grid x holds splits x row groups.
        if row_groups > MAX_GRID_X {
            return Err(unsupported(format!(
                "{rows} query rows per KV head need {row_groups} row groups, grid x allows {MAX_GRID_X}"
            )));
        }
        let max_splits = MAX_GRID_X / row_groups.max(1);
        let cut = |len: usize| {
            let s = remembered_split(multiprocessors, tc, p, bucket, row_groups, len);
            if s.num_splits <= max_splits {
                s
            } else {
                cut_into(max_splits, len, granularity(tc, p.dtype, bucket))
            }
        };
        let full = cut(keys(capacity.max(p.seq_k)));
        let split = if capturing { full } else { cut(keys(p.seq_k)) };
        Ok(DecodeLaunch {
            bucket,
            reg,
            tensor_cores: tc,
            row_groups,
            split,
            workspace_splits: split.num_splits.max(full.num_splits),
            smem: if tc {
                tensor_core_smem_bytes(p.dtype, bucket)
            } else {
                decode_smem_bytes(p.dtype, bucket)
            },
        })
    };
    if !(tensor_cores && reg && tensor_core_body(p.dtype, bucket)) {
        return plan(false);
    }
    let tc = plan(true)?;
    // The tensor-core body reads K/V once for up to 16 rows, the register path once per 4:
    // it takes every call with more rows than one register block holds, and the others
    // whose splits are long enough for its fixed costs not to show.
    let take = tensor_cores_override()
        .unwrap_or(rows > REG_ROWS || tc.split.split_keys >= MMA_MIN_SPLIT_KEYS);
    // A recording of this call may take the other body (its cut is the capacity's): the
    // workspace holds the splits of either, so that recording allocates nothing.
    let reg_plan = plan(false)?;
    let workspace_splits = tc.workspace_splits.max(reg_plan.workspace_splits);
    Ok(DecodeLaunch {
        workspace_splits,
        ..if take { tc } else { reg_plan }
    })
}

impl DecodeLaunch {
    /// The split workspace `p` needs with this plan, or `None` when the cache is not split.
    /// Refuses sizes that overflow.
    pub(super) fn workspace(&self, p: &AttentionProblem) -> Result<Option<SplitWorkspace>> {
        // Sized for the capacity's cut even when this one is whole, so that a recording of
        // the same call finds it.
        if self.workspace_splits <= 1 {
            return Ok(None);
        }
        let too_big = || {
            unsupported(format!(
                "split workspace of {} x {} x {} rows x {} splits x (head_dim {} + 1) overflows",
                p.batch, p.num_heads, p.seq_q, self.workspace_splits, p.head_dim
            ))
        };
        let rows = p
            .batch
            .checked_mul(p.num_heads)
            .and_then(|x| x.checked_mul(p.seq_q))
            .ok_or_else(too_big)?;
        let elems = rows
            .checked_mul(self.workspace_splits)
            .and_then(|x| x.checked_mul(p.head_dim + 1))
            .ok_or_else(too_big)?;
        // Within `elems`: this cut has at most `workspace_splits` splits.
        let lse_offset = rows * self.split.num_splits * p.head_dim;
        let counters = if self.reg {
            p.batch
                .checked_mul(p.num_kv_heads)
                .and_then(|x| x.checked_mul(self.row_groups))
                .ok_or_else(too_big)?
        } else {
            0
        };
        Ok(Some(SplitWorkspace {
            elems,
            lse_offset,
            counters,
        }))
    }
}

/// Argument sets [`remembered_split`] keeps per thread.
const REMEMBERED_SPLITS: usize = 4;

/// One remembered [`chosen_split`] answer: the problem (its `seq_k` zeroed: the length is
/// `len`), the other arguments, the answer.
#[derive(Clone)]
struct RememberedSplit {
    p: AttentionProblem,
    args: (usize, bool, usize, usize, usize),
    split: SplitPlan,
}

thread_local! {
    /// The last [`REMEMBERED_SPLITS`] answers of this thread, and the next slot to replace.
    static SPLITS: std::cell::RefCell<([Option<RememberedSplit>; REMEMBERED_SPLITS], usize)> =
        const { std::cell::RefCell::new(([None, None, None, None], 0)) };
}

/// [`chosen_split`], remembered per thread for the last few argument sets: a decode loop
/// asks the same ones for every layer (the cut of the cache's length and the one of its
/// capacity), and the plan's search is the larger part of a call's host time. Exact:
/// `chosen_split` is a pure function of its arguments and of `FORGE_ATTN_DECODE_SPLITS`,
/// which is read once per process; the key is every argument and every field of `p` but
/// `seq_k`, whose part is `len`.
pub(super) fn remembered_split(
    multiprocessors: usize,
    tensor_cores: bool,
    p: &AttentionProblem,
    bucket: usize,
    row_groups: usize,
    len: usize,
) -> SplitPlan {
    let args = (multiprocessors, tensor_cores, bucket, row_groups, len);
    let key = AttentionProblem {
        seq_k: 0,
        ..p.clone()
    };
    let found = SPLITS.with(|m| {
        m.borrow()
            .0
            .iter()
            .flatten()
            .find(|e| e.args == args && e.p == key)
            .map(|e| e.split)
    });
    if let Some(split) = found {
        return split;
    }
    let split = chosen_split(multiprocessors, tensor_cores, p, bucket, row_groups, len);
    SPLITS.with(|m| {
        let (slots, next) = &mut *m.borrow_mut();
        slots[*next] = Some(RememberedSplit {
            p: key,
            args,
            split,
        });
        *next = (*next + 1) % REMEMBERED_SPLITS;
    });
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decode problem of `batch` sequences, 32 query / 8 KV heads, `seq_q` queries.
    fn problem(
        batch: usize,
        seq_q: usize,
        seq_k: usize,
        head_dim: usize,
        dtype: DType,
    ) -> AttentionProblem {
        let s = crate::problem::HeadStrides::default();
        AttentionProblem {
            batch,
            seq_q,
            seq_k,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim,
            scale: 1.0,
            causal: false,
            dtype,
            device: crate::device::Device::Cpu,
            q: s,
            k: s,
            v: s,
            mask: None,
        }
    }

    #[test]
    fn a_launch_plan_matches_the_pure_functions_and_sizes_its_workspace() {
        for dtype in FLOATS {
            for hd in [1, 64, 100, 128, 256] {
                let p = problem(2, 3, 4000, hd, dtype);
                let l = plan_launch(132, false, &p, 4000, false, false).unwrap();
                let bucket = decode_bucket(hd).unwrap();
                assert_eq!(l.bucket, bucket);
                assert_eq!(l.reg, reg_lanes(dtype, bucket).is_some());
                assert_eq!(
                    l.row_groups,
                    (4 * 3usize).div_ceil(block_rows(dtype, bucket))
                );
                assert_eq!(l.smem, decode_smem_bytes(dtype, bucket));
                assert_eq!(
                    l.split,
                    chosen_split(132, false, &p, bucket, l.row_groups, 4000)
                );
                assert_eq!(l.workspace_splits, l.split.num_splits);
                match l.workspace(&p).unwrap() {
                    None => assert_eq!(l.split.num_splits, 1),
                    Some(w) => {
                        let rows = 2 * 32 * 3;
                        assert_eq!(w.elems, rows * l.workspace_splits * (hd + 1));
                        assert_eq!(w.lse_offset, rows * l.split.num_splits * hd);
                        assert!(w.lse_offset + rows * l.split.num_splits <= w.elems);
                        let counters = if l.reg { 2 * 8 * l.row_groups } else { 0 };
                        assert_eq!(w.counters, counters);
                    }
                }
            }
        }
    }

    #[test]
    fn a_window_span_is_left_plus_the_queries() {
        assert_eq!(window_span(1, None), None);
        assert_eq!(window_span(1, Some(0)), Some(1));
        assert_eq!(window_span(16, Some(4095)), Some(4111));
        assert_eq!(window_span(3, Some(usize::MAX)), Some(usize::MAX));
    }

    #[test]
    fn a_windowed_launch_cuts_only_the_window_s_keys() {
        let p = problem(1, 1, 32768, 128, DType::BF16);
        let full = plan_launch(132, false, &p, 32768, false, false).unwrap();
        assert_eq!(
            plan_launch_over(132, false, &p, 32768, false, false, None).unwrap(),
            full
        );
        // A window of 1024 keys: the splits cover 1024 keys, not 32768.
        let w = plan_launch_over(
            132,
            false,
            &p,
            32768,
            false,
            false,
            window_span(1, Some(1023)),
        )
        .unwrap();
        let covered = w.split.num_splits * w.split.split_keys;
        assert!(covered >= 1024, "{w:?}");
        assert!(
            (w.split.num_splits - 1) * w.split.split_keys < 1024,
            "{w:?}"
        );
        assert!(covered < full.split.num_splits * full.split.split_keys);
        assert_eq!(
            w.split,
            chosen_split(132, false, &p, w.bucket, w.row_groups, 1024)
        );
        // A window wider than the cache changes nothing; a recorded call cuts
        // min(window, capacity).
        let wide = plan_launch_over(132, false, &p, 32768, false, false, Some(1 << 40)).unwrap();
        assert_eq!(wide, full);
        let small = problem(1, 4, 100, 128, DType::BF16);
        let rec = plan_launch_over(
            132,
            false,
            &small,
            65536,
            true,
            false,
            window_span(4, Some(2000)),
        )
        .unwrap();
        assert_eq!(
            rec.split,
            chosen_split(132, false, &small, rec.bucket, rec.row_groups, 2004)
        );
        assert!(rec.split.num_splits * rec.split.split_keys >= 2004);
        // The workspace follows the cut too.
        assert_eq!(rec.workspace_splits, rec.split.num_splits);
    }

    #[test]
    fn a_recorded_launch_is_cut_for_the_capacity() {
        let p = problem(1, 1, 100, 128, DType::BF16);
        let now = plan_launch(132, false, &p, 32768, false, false).unwrap();
        let recorded = plan_launch(132, false, &p, 32768, true, false).unwrap();
        assert_eq!(
            now.split,
            plan_launch(132, false, &p, 100, false, false)
                .unwrap()
                .split
        );
        assert!(recorded.split.num_splits * recorded.split.split_keys >= 32768);
        assert!(recorded.split.num_splits > now.split.num_splits);
        // Both size the workspace for the capacity's cut.
        assert_eq!(now.workspace_splits, recorded.split.num_splits);
        assert_eq!(recorded.workspace_splits, recorded.split.num_splits);
    }

    #[test]
    fn a_launch_plan_refuses_what_the_kernel_cannot_run() {
        let unsupported = |r: Result<DecodeLaunch>, what: &str| match r {
            Err(AttentionError::NotSupported { backend, reason }) => {
                assert_eq!(backend, "gpu (decode)");
                assert!(reason.contains(what), "{reason}");
            }
            other => panic!("expected NotSupported, got {other:?}"),
        };
        unsupported(
            plan_launch(
                132,
                false,
                &problem(1, 1, 10, 257, DType::F16),
                10,
                false,
                false,
            ),
            "head_dim 257",
        );
        // A fused append needs the register path: f16 head_dim 32 takes the other one.
        assert!(!fuses_append(DType::F16, 32));
        unsupported(
            plan_launch(
                132,
                false,
                &problem(1, 1, 10, 32, DType::F16),
                10,
                false,
                true,
            ),
            "register path",
        );
        plan_launch(
            132,
            false,
            &problem(1, 1, 10, 128, DType::F16),
            10,
            false,
            true,
        )
        .unwrap();
        // More row groups than grid x holds.
        let mut many = problem(1, 1, 10, 128, DType::F32);
        many.num_heads = usize::MAX / 2;
        many.num_kv_heads = 1;
        unsupported(
            plan_launch(132, false, &many, 10, false, false),
            "row groups",
        );
        // A workspace whose size overflows.
        let mut wide = problem(usize::MAX / 64, 1, 1 << 20, 128, DType::BF16);
        wide.num_kv_heads = 32;
        let l = DecodeLaunch {
            split: SplitPlan {
                num_splits: 4,
                split_keys: 1 << 18,
            },
            workspace_splits: 4,
            ..plan_launch(
                132,
                false,
                &problem(1, 1, 10, 128, DType::BF16),
                10,
                false,
                false,
            )
            .unwrap()
        };
        match l.workspace(&wide) {
            Err(AttentionError::NotSupported { reason, .. }) => {
                assert!(reason.contains("overflows"), "{reason}")
            }
            other => panic!("expected NotSupported, got {other:?}"),
        }
    }

    #[test]
    fn split_plan_fills_the_gpu_and_covers_the_cache() {
        for (b, hkv, len) in [
            (1, 8, 32768),
            (32, 8, 16384),
            (1, 8, 100),
            (8, 8, 4096),
            (3, 1, 1),
        ] {
            let s = split_plan(132, b, hkv, 1, len, DType::BF16, 128);
            assert!(s.num_splits * s.split_keys >= len, "{b} {hkv} {len}: {s:?}");
            assert!(
                (s.num_splits - 1) * s.split_keys < len.max(1),
                "{b} {hkv} {len}: empty split {s:?}"
            );
            assert_eq!(s.split_keys % 64, 0);
            let f = split_plan(132, b, hkv, 1, len, DType::F32, 128);
            assert!(f.num_splits * f.split_keys >= len && f.split_keys.is_multiple_of(32));
        }
        assert!(split_plan(132, 1, 8, 1, 32768, DType::BF16, 128).num_splits >= 16);
        // The measured best cuts of short caches at batch 1.
        assert_eq!(
            split_plan(132, 1, 8, 1, 1024, DType::BF16, 128).num_splits,
            16
        );
        assert_eq!(
            split_plan(132, 1, 8, 1, 4096, DType::BF16, 128).num_splits,
            16
        );
        // A short cache still gets two blocks per head when they fit in the first wave.
        assert_eq!(
            split_plan(132, 1, 8, 1, 100, DType::BF16, 128).num_splits,
            2
        );
    }

    #[test]
    fn split_plan_fills_whole_waves() {
        for (b, len, dtype, tc) in [
            (8, 16384, DType::BF16, false),
            (32, 16384, DType::BF16, false),
            (8, 16384, DType::F32, false),
            (32, 16384, DType::F32, false),
            (1, 32768, DType::BF16, false),
            (8, 16384, DType::BF16, true),
            (1, 32768, DType::BF16, true),
        ] {
            let slots = blocks_per_sm(tc, dtype, 128) * 132;
            let s = split_plan_for(tc, 132, b, 8, 1, len, dtype, 128);
            let blocks = b * 8 * s.num_splits;
            let waves = blocks.div_ceil(slots);
            assert!(blocks * 10 >= waves * slots * 9, "{b} {len} {dtype}: {s:?}");
        }
        // 32 x 8 heads already fill one wave of 264 register blocks, two of 132
        // tensor-core blocks.
        for tc in [false, true] {
            assert_eq!(
                split_plan_for(tc, 132, 32, 8, 1, 16384, DType::BF16, 128).num_splits,
                1
            );
        }
        // Two register blocks fit a multiprocessor: B = 8 takes 4 chunks (256 blocks), the
        // tensor-core body 2 (128 blocks of one per multiprocessor).
        assert_eq!(
            split_plan(132, 8, 8, 1, 32768, DType::BF16, 128).num_splits,
            4
        );
        assert_eq!(
            split_plan_for(true, 132, 8, 8, 1, 32768, DType::BF16, 128).num_splits,
            2
        );
    }

    #[test]
    fn shared_memory_fits_the_default_limit_up_to_head_dim_128() {
        // Tiles hold 16 KiB of K whatever the dtype, so no opt-in is needed up to 128.
        assert!(decode_smem_bytes(DType::F32, 128) <= 48 * 1024);
        assert!(decode_smem_bytes(DType::BF16, 128) <= 48 * 1024);
        assert!(decode_smem_bytes(DType::F32, 256) <= 227 * 1024);
    }

    const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    #[test]
    fn every_head_dim_up_to_256_has_the_smallest_bucket_that_holds_it() {
        for hd in 1..=256 {
            let b = decode_bucket(hd).expect("a bucket up to 256");
            assert!(DECODE_BUCKETS.contains(&b) && b >= hd, "{hd}: {b}");
            assert!(
                DECODE_BUCKETS.iter().all(|&o| o >= b || o < hd),
                "{hd}: {b} is not the smallest"
            );
        }
        assert_eq!(decode_bucket(257), None);
        assert_eq!(decode_bucket(4096), None);
    }

    #[test]
    fn shared_memory_of_every_bucket_fits_the_opt_in_limit() {
        for dtype in FLOATS {
            for b in DECODE_BUCKETS {
                let smem = decode_smem_bytes(dtype, b);
                assert!(smem > 0 && smem <= 227 * 1024, "{dtype} {b}: {smem}");
                // A K tile holds at most 16 KiB, at least 16 keys.
                let n = tile_keys(dtype, b);
                assert!((16..=64).contains(&n), "{dtype} {b}: {n}");
                assert!(n == 16 || n * b * dtype.size_in_bytes() <= 16384);
            }
        }
    }

    #[test]
    fn the_register_path_takes_the_documented_head_dims() {
        // The documented fused-append head dims (see `forward_cached_append`).
        for (dtype, fused) in [
            (DType::F16, [64, 128, 256]),
            (DType::BF16, [64, 128, 256]),
            (DType::F32, [32, 64, 128]),
        ] {
            for b in DECODE_BUCKETS {
                assert_eq!(fuses_append(dtype, b), fused.contains(&b), "{dtype} {b}");
            }
        }
        assert!(!fuses_append(DType::BF16, 512));
    }

    #[test]
    fn register_lanes_cover_a_key_row_exactly() {
        for dtype in FLOATS {
            for b in DECODE_BUCKETS {
                if let Some(vpr) = reg_lanes(dtype, b) {
                    // Each lane holds one 16-byte vector of the row; the reduce-scatter
                    // needs 8 to 32 lanes, a power of two.
                    assert_eq!(vpr * 16, b * dtype.size_in_bytes(), "{dtype} {b}");
                    assert!((8..=32).contains(&vpr) && vpr.is_power_of_two());
                    assert_eq!(block_rows(dtype, b), REG_ROWS);
                } else {
                    assert_eq!(block_rows(dtype, b), ROWS);
                }
                assert!(block_rows(dtype, b) <= MAX_DECODE_QUERIES);
            }
        }
    }

    #[test]
    fn a_split_is_a_whole_number_of_tiles_of_either_path() {
        for dtype in FLOATS {
            for b in DECODE_BUCKETS {
                let g = split_granularity(dtype, b);
                assert!(g.is_multiple_of(tile_keys(dtype, b)), "{dtype} {b}: {g}");
                if let Some(vpr) = reg_lanes(dtype, b) {
                    // Keys the register path's 256 threads load per tile.
                    assert!(g.is_multiple_of(REG_PER * THREADS as usize / vpr));
                }
            }
        }
    }

    #[test]
    fn cut_into_covers_the_cache_with_no_empty_chunk_and_no_more_than_asked() {
        for tile in [16, 32, 64, 128] {
            for len in (1..=5000).step_by(13) {
                for want in [0, 1, 2, 3, 7, 16, 64, 1000, 10_000] {
                    let s = cut_into(want, len, tile);
                    assert!(s.num_splits >= 1 && s.num_splits <= want.max(1));
                    assert!(s.split_keys > 0 && s.split_keys.is_multiple_of(tile));
                    assert!(
                        s.num_splits * s.split_keys >= len,
                        "{want} {len} {tile}: {s:?}"
                    );
                    assert!(
                        (s.num_splits - 1) * s.split_keys < len,
                        "{want} {len} {tile}: {s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn split_plan_never_gives_a_chunk_zero_keys() {
        for dtype in FLOATS {
            for b in DECODE_BUCKETS {
                let g = split_granularity(dtype, b);
                for batch in [1, 2, 3, 8, 32, 129] {
                    for (kv_heads, row_groups) in [(1, 1), (8, 1), (8, 4), (2, 16)] {
                        for len in (1..=5000).step_by(7) {
                            let s = split_plan(132, batch, kv_heads, row_groups, len, dtype, b);
                            let at = format!("{dtype} {b} B={batch} Hkv={kv_heads} L={len}: {s:?}");
                            assert!(s.num_splits >= 1 && s.split_keys.is_multiple_of(g), "{at}");
                            assert!(s.num_splits * s.split_keys >= len, "{at}");
                            assert!((s.num_splits - 1) * s.split_keys < len, "{at}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_tensor_core_body_runs_where_it_exists_fits_and_pays() {
        // Its shared memory: Q rows and two stages of 8 warps x 16 keys of K and V, rows
        // padded by 16 bytes (the kernel's layout).
        assert_eq!(tensor_core_smem_bytes(DType::BF16, 128), 143_616);
        assert_eq!(tensor_core_smem_bytes(DType::F16, 64), 76_032);
        for dtype in FLOATS {
            for b in DECODE_BUCKETS {
                assert_eq!(
                    tensor_core_body(dtype, b),
                    dtype != DType::F32 && (b == 64 || b == 128),
                    "{dtype} {b}"
                );
            }
        }
        let p = problem(8, 1, 32768, 128, DType::BF16);
        assert!(tensor_cores_fit(true, 227 * 1024, &p));
        assert!(!tensor_cores_fit(false, 227 * 1024, &p));
        assert!(!tensor_cores_fit(true, 99 * 1024, &p), "a 99 KiB device");
        assert!(!tensor_cores_fit(
            true,
            227 * 1024,
            &problem(8, 1, 32768, 128, DType::F32)
        ));
        assert!(!tensor_cores_fit(
            true,
            227 * 1024,
            &problem(8, 1, 32768, 256, DType::BF16)
        ));
        if tensor_cores_override().is_some() {
            return;
        }
        // A long cache: the tensor-core body, cut in its 128-key tiles, 16 rows per block.
        let long = plan_launch(132, true, &p, 32768, false, false).unwrap();
        assert!(long.tensor_cores && long.reg);
        assert_eq!(long.row_groups, 1);
        assert_eq!(long.split.split_keys % 128, 0);
        assert_eq!(long.smem, tensor_core_smem_bytes(DType::BF16, 128));
        // Without tensor cores, or with a short cache, the register path.
        let simt = plan_launch(132, false, &p, 32768, false, false).unwrap();
        assert!(!simt.tensor_cores && simt.reg && simt.row_groups == 1);
        let short = problem(1, 1, 4096, 128, DType::BF16);
        assert!(
            !plan_launch(132, true, &short, 4096, false, false)
                .unwrap()
                .tensor_cores
        );
        // A draft of 4 queries (16 rows per KV head): one tensor-core row group, where the
        // register path needs four.
        let draft = problem(1, 4, 4096, 128, DType::BF16);
        let d = plan_launch(132, true, &draft, 4096, false, false).unwrap();
        assert!(d.tensor_cores && d.row_groups == 1);
        assert_eq!(
            plan_launch(132, false, &draft, 4096, false, false)
                .unwrap()
                .row_groups,
            4
        );
        // The fused append runs on it too.
        assert!(
            plan_launch(132, true, &p, 32768, false, true)
                .unwrap()
                .tensor_cores
        );
    }

    #[test]
    fn the_workspace_holds_a_recording_of_either_body() {
        for len in [10, 100, 3000] {
            let p = problem(1, 1, len, 128, DType::BF16);
            let now = plan_launch(132, true, &p, 32768, false, false).unwrap();
            let recorded = plan_launch(132, true, &p, 32768, true, false).unwrap();
            let reg = plan_launch(132, false, &p, 32768, true, false).unwrap();
            for cut in [recorded.split, reg.split] {
                assert!(
                    now.workspace_splits >= cut.num_splits,
                    "{len}: {now:?} {cut:?}"
                );
            }
            // Even a call of one chunk gets the workspace its recording will need.
            let w = now.workspace(&p).unwrap().expect("a workspace");
            assert!(w.elems >= 32 * now.workspace_splits * 129);
        }
    }

    #[test]
    fn split_plan_takes_degenerate_device_and_problem_sizes() {
        // No multiprocessors reported, no heads: still one whole chunk at least.
        for (sms, batch, kv_heads) in [(0, 1, 1), (132, 0, 8), (1, 1, 0)] {
            let s = split_plan(sms, batch, kv_heads, 1, 300, DType::BF16, 128);
            assert!(
                s.num_splits >= 1 && s.num_splits * s.split_keys >= 300,
                "{s:?}"
            );
        }
        let s = split_plan(132, 1, 8, 1, 0, DType::BF16, 128);
        assert_eq!(s.num_splits, 1, "{s:?}");
    }

    #[test]
    fn remembered_splits_are_the_chosen_ones_for_every_argument_set() {
        // More argument sets than the memory keeps, asked twice in turn, in two orders:
        // every answer (first, remembered or recomputed after eviction) is chosen_split's.
        let mut cases = Vec::new();
        for dtype in FLOATS {
            for (b, len) in [(1, 4096), (8, 16384), (32, 1024), (1, 100), (3, 70_000)] {
                for seq_k in [len, len / 2 + 1] {
                    let p = problem(b, 1, seq_k, 128, dtype);
                    cases.push((p, len));
                }
            }
        }
        for pass in 0..2 {
            for (p, len) in cases.iter().chain(cases.iter().rev()) {
                for (sms, tc) in [(132, false), (78, false), (132, true)] {
                    for row_groups in [1, 2] {
                        assert_eq!(
                            remembered_split(sms, tc, p, 128, row_groups, *len),
                            chosen_split(sms, tc, p, 128, row_groups, *len),
                            "pass {pass}: {sms} SMs, {row_groups} row groups, {len} keys, {p:?}"
                        );
                    }
                }
            }
        }
        // A field that chosen_split may read tells two problems apart; seq_k does not.
        let p = problem(8, 1, 4096, 128, DType::BF16);
        let q = AttentionProblem {
            num_kv_heads: 4,
            ..p.clone()
        };
        let a = remembered_split(132, false, &p, 128, 1, 4096);
        assert_eq!(
            remembered_split(132, false, &q, 128, 1, 4096),
            chosen_split(132, false, &q, 128, 1, 4096)
        );
        let grown = AttentionProblem {
            seq_k: 4097,
            ..p.clone()
        };
        assert_eq!(remembered_split(132, false, &grown, 128, 1, 4096), a);
        // The body is part of the key: its tile and resident blocks differ.
        assert_eq!(
            remembered_split(132, true, &p, 128, 1, 4096),
            chosen_split(132, true, &p, 128, 1, 4096)
        );
    }
}
