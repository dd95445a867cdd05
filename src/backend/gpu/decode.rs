//! Split-KV decode (kernels/flash_decode.hip): a few queries per sequence against a long
//! cache, the cache cut into chunks that separate blocks stream, merged by log-sum-exp.
//! This file holds the cache view, the workspace and the launch; the plan (path, tile,
//! shared memory, split, workspace size) is in [`super::decode_plan`].

use std::sync::Arc;

use super::decode_plan::{plan_launch, DecodeLaunch, THREADS};
use super::grid::{for_each_slice, offset_ptr, HeadAxis, MAX_GRID_X};
use super::workspace::DeviceScratch;
use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{DecodeParams, TokenStrides};
use crate::kernels::catalog;
use crate::problem::{AttentionProblem, HeadStrides};
use crate::tensor::DeviceTensor;

/// The f32 scratch of the split results and the split counters (zero between launches:
/// the kernel resets each one it uses), reused between calls.
#[derive(Default)]
pub(crate) struct DecodeWorkspace {
    buf: DeviceScratch,
    counters: DeviceScratch,
    arrivals: DeviceScratch,
}

impl DecodeWorkspace {
    fn get(&self, rt: &Arc<GpuRuntime>, elems: usize) -> Result<DeviceTensor> {
        self.buf.get(rt, elems)
    }

    fn get_counters(&self, rt: &Arc<GpuRuntime>, elems: usize) -> Result<DeviceTensor> {
        self.counters.get(rt, elems)
    }

    fn get_arrivals(&self, rt: &Arc<GpuRuntime>, elems: usize) -> Result<DeviceTensor> {
        self.arrivals.get(rt, elems)
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

/// The decode argument block of one call, filled after planning; the split workspace and
/// the append's arrival counters are set by [`forward_decode`] once they are allocated.
fn decode_params(
    p: &AttentionProblem,
    q: &DeviceTensor,
    out: &DeviceTensor,
    out_strides: HeadStrides,
    cache: &CacheView,
    launch: &DecodeLaunch,
) -> DecodeParams {
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
        num_splits: launch.split.num_splits as i32,
        split_keys: launch.split.split_keys as i32,
        scale: p.scale,
        causal: p.causal as i32,
        num_pages: cache.num_pages as i32,
        ..Default::default()
    };
    if let Some(a) = &cache.append {
        params.k_new = a.k;
        params.v_new = a.v;
        params.pool_next = a.pool_next;
        params.kn_strides = TokenStrides::from_array(a.k_strides);
        params.vn_strides = TokenStrides::from_array(a.v_strides);
        params.n_new = a.n as i32;
    }
    params
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
    let launch = plan_launch(
        rt.multiprocessor_count() as usize,
        p,
        cache.capacity,
        rt.is_capturing(),
        cache.append.is_some(),
    )?;
    let workspace = launch.workspace(p)?;
    let DecodeLaunch {
        bucket,
        reg,
        row_groups,
        split,
        smem,
        ..
    } = launch;
    let mut params = decode_params(p, q, out, out_strides, cache, &launch);
    // The scratch tensors stay alive until every launch is queued.
    let arrivals = match cache.append {
        Some(_) => Some(ws.get_arrivals(rt, p.batch)?),
        None => None,
    };
    if let Some(t) = &arrivals {
        params.arrivals = t.device_ptr();
    }
    let mut scratch = None;
    if let Some(w) = workspace {
        let buf = ws.get(rt, w.elems)?;
        params.partial_o = buf.device_ptr();
        params.partial_lse = buf.device_ptr() + (w.lse_offset * 4) as u64;
        // The register path merges the splits itself (the last block of each row group).
        let counters = if reg {
            let c = ws.get_counters(rt, w.counters)?;
            params.counters = c.device_ptr();
            Some(c)
        } else {
            None
        };
        scratch = Some((buf, counters));
    }
    let _scratch = scratch;
    let main = catalog::decode(p.dtype, bucket);
    let combine = catalog::decode_combine(p.dtype, bucket);
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
