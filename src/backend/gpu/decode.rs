//! Split-KV decode (kernels/flash_decode.hip): a few queries per sequence against a long
//! cache, the cache cut into chunks that separate blocks stream, merged by log-sum-exp.

use std::sync::Arc;

use super::grid::{for_each_slice, offset_ptr, HeadAxis, MAX_GRID_X};
use super::workspace::DeviceScratch;
use crate::device::Device;
use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{DecodeParams, TokenStrides};
use crate::kernels::catalog::{self, DECODE_BUCKETS};
use crate::problem::{AttentionProblem, HeadStrides};
use crate::tensor::DeviceTensor;

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
const THREADS: u32 = 256;
/// Fewest keys worth giving a block of their own...
const MIN_SPLIT_KEYS: usize = 128;
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
fn reg_lanes(dtype: DType, bucket: usize) -> Option<usize> {
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

/// Key granularity of a split: a whole number of tiles of whichever path runs.
fn split_granularity(dtype: DType, bucket: usize) -> usize {
    let smem = tile_keys(dtype, bucket);
    match reg_lanes(dtype, bucket) {
        // Both are powers of two, so the larger is a multiple of the smaller.
        Some(vpr) => smem.max(REG_PER * THREADS as usize / vpr),
        None => smem,
    }
}

/// Query rows per block for this dtype and head-dim bucket.
fn block_rows(dtype: DType, bucket: usize) -> usize {
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

/// Blocks per multiprocessor a split plan aims for. The register path's budget allows two
/// resident blocks (`DEC_REG_BLOCKS`), but one longer block per multiprocessor measured as
/// fast or faster on the H100 (bf16, 8 KV heads, D = 128; 16 vs 32 chunks at B = 1:
/// L = 4096 14.5 vs 15.2 us, L = 32768 54.9 vs 55.0 us; 2 vs 4 chunks at B = 8, L = 16384:
/// 186 vs 188 us): each chunk pays a fixed cost (query load, group merge, its share of the
/// split merge) that fewer chunks pay less often.
const BLOCKS_PER_SM: usize = 1;

/// Chooses the split so the grid fills whole waves of [`BLOCKS_PER_SM`] blocks per
/// multiprocessor (a last, partly filled wave costs about as much as a full one), with at
/// least one wave's worth of blocks where the cache is long enough, never giving a block
/// fewer than 128 keys (64 in short caches); among equally good cuts, the one with the
/// fewest splits.
pub(crate) fn split_plan(
    multiprocessors: usize,
    batch: usize,
    kv_heads: usize,
    row_groups: usize,
    max_len: usize,
    dtype: DType,
    bucket: usize,
) -> SplitPlan {
    let base = (batch * kv_heads * row_groups).max(1);
    let slots = BLOCKS_PER_SM * multiprocessors.max(1);
    let by_occupancy = slots.div_ceil(base);
    let by_length = max_len
        .div_ceil(MIN_SPLIT_KEYS)
        .max(
            max_len
                .div_ceil(MIN_SHORT_SPLIT_KEYS)
                .min(SHORT_CACHE_SPLITS),
        )
        .max(1);
    let tile = split_granularity(dtype, bucket);
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
fn cut_into(want: usize, max_len: usize, tile: usize) -> SplitPlan {
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

/// The f32 scratch of the split results and the split counters (zero between launches:
/// the kernel resets each one it uses), reused between calls.
#[derive(Default)]
pub(crate) struct DecodeWorkspace {
    buf: DeviceScratch,
    counters: DeviceScratch,
    arrivals: DeviceScratch,
}

impl DecodeWorkspace {
    fn get(&self, device: Device, elems: usize) -> Result<DeviceTensor> {
        self.buf.get(device, elems)
    }

    fn get_counters(&self, device: Device, elems: usize) -> Result<DeviceTensor> {
        self.counters.get(device, elems)
    }

    fn get_arrivals(&self, device: Device, elems: usize) -> Result<DeviceTensor> {
        self.arrivals.get(device, elems)
    }
}

/// Where the keys of each sequence live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheView {
    /// K base address (a contiguous cache, or the page pool).
    pub k: u64,
    /// V base address.
    pub v: u64,
    /// K strides: batch (or page), head, position.
    pub k_strides: HeadStrides,
    /// V strides.
    pub v_strides: HeadStrides,
    /// Device array of per-sequence lengths (i32), or 0: every sequence has `p.seq_k` keys.
    pub seq_lens: u64,
    /// Device block table (i32, `[B, max_pages]`), or 0 for a contiguous cache.
    pub block_table: u64,
    /// Row length of the block table.
    pub max_pages: usize,
    /// Keys per page.
    pub page_size: usize,
    /// Tokens the kernel appends to every sequence in the same launch, or `None`.
    pub append: Option<NewTokens>,
    /// The most keys a sequence of the cache can hold.
    pub capacity: usize,
    /// Pages in the pool of a paged cache (0 for a contiguous one).
    pub num_pages: usize,
}

/// New tokens a decode launch appends to the cache it reads (register path only): read from
/// here for this launch's attention, written into the cache by one block per sequence, and
/// the device-side lengths advanced by `n`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewTokens {
    /// `[B, n, Hkv, D]` K rows.
    pub k: u64,
    /// V rows, same shape.
    pub v: u64,
    /// K strides in elements: batch, token, head.
    pub k_strides: [i64; 3],
    /// V strides.
    pub v_strides: [i64; 3],
    /// Tokens per sequence.
    pub n: usize,
    /// The page pool's next-free counter (paged caches), or 0.
    pub pool_next: u64,
}

/// The split a launch over `len` keys uses: `FORGE_ATTN_DECODE_SPLITS` when set, else
/// [`split_plan`].
fn chosen_split(
    multiprocessors: usize,
    p: &AttentionProblem,
    bucket: usize,
    row_groups: usize,
    len: usize,
) -> SplitPlan {
    match splits_override() {
        Some(n) => cut_into(n, len, split_granularity(p.dtype, bucket)),
        None => split_plan(
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

/// The split a decode launch of `p` (its `seq_k` keys) would use on a device with
/// `multiprocessors` SMs, or `None` when the decode kernel does not take `p.head_dim`.
pub(crate) fn split_for(multiprocessors: usize, p: &AttentionProblem) -> Option<SplitPlan> {
    let bucket = decode_bucket(p.head_dim)?;
    let group = p.num_heads / p.num_kv_heads.max(1);
    let row_groups = (group * p.seq_q).div_ceil(block_rows(p.dtype, bucket));
    Some(chosen_split(
        multiprocessors,
        p,
        bucket,
        row_groups,
        p.seq_k,
    ))
}

/// Queues the decode kernel (and the merge when the cache is split).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_decode(
    rt: &Arc<GpuRuntime>,
    ws: &DecodeWorkspace,
    p: &AttentionProblem,
    q: &DeviceTensor,
    out: &DeviceTensor,
    out_strides: HeadStrides,
    cache: &CacheView,
) -> Result<()> {
    let bucket = decode_bucket(p.head_dim).ok_or_else(|| AttentionError::NotSupported {
        backend: "gpu (decode)".into(),
        reason: format!("head_dim {} exceeds 256", p.head_dim),
    })?;
    let group = p.num_heads / p.num_kv_heads;
    let reg = reg_lanes(p.dtype, bucket).is_some();
    let row_groups = (group * p.seq_q).div_ceil(block_rows(p.dtype, bucket));
    let sms = rt.multiprocessor_count() as usize;
    let plan = |len: usize| chosen_split(sms, p, bucket, row_groups, len);
    // A recorded call is replayed while the cache grows (the kernel reads the lengths from
    // the device): it is cut for the longest cache it may see. The workspace always fits
    // that cut too, so recording never needs more than the calls before it had.
    // Grid x holds splits x row groups.
    if row_groups > MAX_GRID_X {
        return Err(AttentionError::NotSupported {
            backend: "gpu (decode)".into(),
            reason: format!(
                "{} query rows per KV head need {row_groups} row groups, grid x allows {MAX_GRID_X}",
                group * p.seq_q
            ),
        });
    }
    let max_splits = MAX_GRID_X / row_groups;
    let capped = |s: SplitPlan, len: usize| {
        if s.num_splits <= max_splits {
            s
        } else {
            cut_into(max_splits, len, split_granularity(p.dtype, bucket))
        }
    };
    let full_len = cache.capacity.max(p.seq_k);
    let full = capped(plan(full_len), full_len);
    let split = if rt.is_capturing() {
        full
    } else {
        capped(plan(p.seq_k), p.seq_k)
    };
    let workspace_splits = split.num_splits.max(full.num_splits);
    let mut params = DecodeParams {
        q: q.device_ptr(),
        k: cache.k,
        v: cache.v,
        out: out.device_ptr(),
        seq_lens: cache.seq_lens,
        block_table: cache.block_table,
        q_strides: p.q.into(),
        o_strides: out_strides.into(),
        k_strides: cache.k_strides.into(),
        v_strides: cache.v_strides.into(),
        batch: p.batch as i32,
        num_heads: p.num_heads as i32,
        num_kv_heads: p.num_kv_heads as i32,
        seq_q: p.seq_q as i32,
        seq_k: p.seq_k as i32,
        head_dim: p.head_dim as i32,
        max_pages: cache.max_pages as i32,
        page_size: cache.page_size.max(1) as i32,
        num_splits: split.num_splits as i32,
        split_keys: split.split_keys as i32,
        scale: p.scale,
        causal: p.causal as i32,
        num_pages: cache.num_pages as i32,
        ..Default::default()
    };
    let mut arrivals = None;
    if let Some(a) = &cache.append {
        if !reg {
            return Err(AttentionError::NotSupported {
                backend: "gpu (decode)".into(),
                reason: format!(
                    "a fused append needs the register path, {} head_dim {} takes the other",
                    p.dtype, p.head_dim
                ),
            });
        }
        let t = ws.get_arrivals(p.device, p.batch)?;
        params.k_new = a.k;
        params.v_new = a.v;
        params.pool_next = a.pool_next;
        params.arrivals = t.device_ptr();
        params.kn_strides = TokenStrides::from_array(a.k_strides);
        params.vn_strides = TokenStrides::from_array(a.v_strides);
        params.n_new = a.n as i32;
        arrivals = Some(t);
    }
    let _arrivals = arrivals;
    let _keep_alive;
    if split.num_splits > 1 {
        let too_big = || {
            AttentionError::NotSupported {
            backend: "gpu (decode)".into(),
            reason: format!(
                "split workspace of {} x {} x {} rows x {workspace_splits} splits x (head_dim {} + 1) overflows",
                p.batch, p.num_heads, p.seq_q, p.head_dim
            ),
        }
        };
        let rows = p
            .batch
            .checked_mul(p.num_heads)
            .and_then(|x| x.checked_mul(p.seq_q))
            .ok_or_else(too_big)?;
        let elems = rows
            .checked_mul(workspace_splits)
            .and_then(|x| x.checked_mul(p.head_dim + 1))
            .ok_or_else(too_big)?;
        let buf = ws.get(p.device, elems)?;
        params.partial_o = buf.device_ptr();
        // The partial rows of this cut, then their log-sum-exps (within `elems`).
        params.partial_lse = buf.device_ptr() + (rows * split.num_splits * p.head_dim * 4) as u64;
        // The register path merges the splits itself (the last block of each row group).
        let counters = if reg {
            let c = ws.get_counters(p.device, p.batch * p.num_kv_heads * row_groups)?;
            params.counters = c.device_ptr();
            Some(c)
        } else {
            None
        };
        _keep_alive = (buf, counters);
    }
    let main = catalog::decode(p.dtype, bucket);
    let combine = catalog::decode_combine(p.dtype, bucket);
    let smem = decode_smem_bytes(p.dtype, bucket);
    let es = p.dtype.size_in_bytes();
    let paged = cache.block_table != 0;
    for_each_slice(p.batch, p.num_heads, p.num_kv_heads, HeadAxis::Kv, |sl| {
        let mut sp = params;
        if !sl.is_whole(p.batch, p.num_heads) {
            if cache.append.is_some() && sl.kv_heads != p.num_kv_heads {
                // Every block of a sequence must be in one launch for the fused append.
                return Err(AttentionError::NotSupported {
                    backend: "gpu (decode)".into(),
                    reason: format!(
                        "a fused append over {} KV heads (more than one launch holds)",
                        p.num_kv_heads
                    ),
                });
            }
            let b = sl.batch0;
            sp.q = offset_ptr(sp.q, sp.q_strides.at(b, sl.head0), es);
            sp.out = offset_ptr(sp.out, sp.o_strides.at(b, sl.head0), es);
            // A paged pool is indexed by page, not by sequence.
            let kb = if paged { 0 } else { b };
            sp.k = offset_ptr(sp.k, sp.k_strides.at(kb, sl.kv_head0), es);
            sp.v = offset_ptr(sp.v, sp.v_strides.at(kb, sl.kv_head0), es);
            sp.k_new = offset_ptr(sp.k_new, sp.kn_strides.at(b, sl.kv_head0), es);
            sp.v_new = offset_ptr(sp.v_new, sp.vn_strides.at(b, sl.kv_head0), es);
            sp.seq_lens = offset_ptr(sp.seq_lens, sl.batch0, 4);
            sp.arrivals = offset_ptr(sp.arrivals, sl.batch0, 4);
            sp.block_table = offset_ptr(sp.block_table, sl.batch0 * cache.max_pages, 4);
            sp.batch = sl.batch as i32;
            sp.num_heads = sl.heads as i32;
            sp.num_kv_heads = sl.kv_heads as i32;
        }
        // Splits and row groups share grid x (splits outer), the same on both paths.
        let grid = (
            (split.num_splits * row_groups) as u32,
            sl.kv_heads as u32,
            sl.batch as u32,
        );
        rt.launch(&main, LaunchDims::new(grid, (THREADS, 1, 1), smem), &sp)?;
        if split.num_splits > 1 && !reg {
            let slice_rows = (sl.batch * sl.heads * p.seq_q).min(MAX_GRID_X);
            rt.launch(
                &combine,
                LaunchDims::new((slice_rows as u32, 1, 1), (128, 1, 1), 0),
                &sp,
            )?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let slots = BLOCKS_PER_SM * 132;
        for (b, len, dtype) in [
            (8, 16384, DType::BF16),
            (32, 16384, DType::BF16),
            (8, 16384, DType::F32),
            (32, 16384, DType::F32),
            (1, 32768, DType::BF16),
        ] {
            let s = split_plan(132, b, 8, 1, len, dtype, 128);
            let blocks = b * 8 * s.num_splits;
            let waves = blocks.div_ceil(slots);
            assert!(blocks * 10 >= waves * slots * 9, "{b} {len} {dtype}: {s:?}");
        }
        // 32 x 8 heads already fill two waves of 132 blocks.
        assert_eq!(
            split_plan(132, 32, 8, 1, 16384, DType::BF16, 128).num_splits,
            1
        );
    }

    #[test]
    fn shared_memory_fits_the_default_limit_up_to_head_dim_128() {
        // Tiles hold 16 KiB of K whatever the dtype, so no opt-in is needed up to 128.
        assert!(decode_smem_bytes(DType::F32, 128) <= 48 * 1024);
        assert!(decode_smem_bytes(DType::BF16, 128) <= 48 * 1024);
        assert!(decode_smem_bytes(DType::F32, 256) <= 227 * 1024);
    }
}
