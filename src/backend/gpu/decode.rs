//! Split-KV decode (kernels/flash_decode.hip): a few queries per sequence against a long
//! cache, the cache cut into chunks that separate blocks stream, merged by log-sum-exp.
//! This file holds the cache view, the workspace and the launch; the plan (path, tile,
//! shared memory, split, workspace size) is in [`super::decode_plan`].

use std::sync::Arc;

use super::decode_plan::{
    plan_launch_over, tensor_cores_fit, window_span, DecodeLaunch, MAX_DECODE_QUERIES, THREADS,
};
use super::dispatch::MAX_KERNEL_SEQ;
use super::grid::{for_each_slice, offset_ptr, HeadAxis, MAX_GRID_X};
use super::workspace::DeviceScratch;
use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{page_shift, DecodeParams, Strides3, TokenStrides};
use crate::kernels::KernelId;
use crate::kv_cache::KvCache;
use crate::options::{AttentionOptions, LseStrides};
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

impl CacheView {
    /// The view of a [`KvCache`] (contiguous or paged, per-sequence lengths), appending
    /// nothing.
    pub(crate) fn of_cache(cache: &KvCache) -> CacheView {
        let parts = cache.raw_parts();
        CacheView {
            k: parts.k.device_ptr(),
            v: parts.v.device_ptr(),
            k_strides: parts.strides,
            v_strides: parts.strides,
            seq_lens: parts.seq_lens.device_ptr(),
            block_table: parts.block_table.map_or(0, |t| t.device_ptr()),
            max_pages: parts.max_pages,
            page_size: parts.page_size,
            append: None,
            capacity: cache.capacity(),
            num_pages: parts.num_pages,
        }
    }

    /// The view of dense K/V of `p` (every sequence holds `p.seq_k` keys).
    pub(crate) fn dense(p: &AttentionProblem, k: &DeviceTensor, v: &DeviceTensor) -> CacheView {
        CacheView {
            k: k.device_ptr(),
            v: v.device_ptr(),
            k_strides: p.k,
            v_strides: p.v,
            seq_lens: 0,
            block_table: 0,
            max_pages: 0,
            page_size: 1,
            append: None,
            // Dense K/V: every replay has the same keys.
            capacity: p.seq_k,
            num_pages: 0,
        }
    }
}

/// The per-call options of a decode launch in the kernel's terms, built once per call by
/// [`DecodeOptions::new`] from checked [`AttentionOptions`] and the log-sum-exp output.
/// [`DecodeOptions::is_plain`] ones run the plain kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct DecodeOptions {
    /// Clamped window bounds (left, right) ([`kernel_window`]), or `None`.
    pub window: Option<(i32, i32)>,
    /// Softcap `cap` (finite, > 0), or `None`.
    pub softcap: Option<f32>,
    /// Device address of the f32 `[H]` ALiBi slopes, or `None`.
    pub alibi: Option<u64>,
    /// Device address of the f32 `[H]` sink logits, or `None`.
    pub sinks: Option<u64>,
    /// Device address and strides of the f32 `[B, H, Sq]` log-sum-exp output, or `None`.
    pub lse: Option<(u64, LseStrides)>,
}

/// The kernel's window bounds for `left` / `right` (`None`: unbounded): `left` clamped to
/// [`MAX_KERNEL_SEQ`] and `right` to [`MAX_DECODE_QUERIES`], which keep exactly the keys
/// the bounds keep (a sequence holds at most `MAX_KERNEL_SEQ` keys, and every query's
/// diagonal is at least `len - Sq`, so a right bound of `Sq - 1` or more keeps every key up
/// to the last) while `a_i - left` and `a_i + right` stay in the kernel's 32-bit range.
pub(crate) fn kernel_window(left: Option<usize>, right: Option<usize>) -> (i32, i32) {
    let l = left.unwrap_or(MAX_KERNEL_SEQ).min(MAX_KERNEL_SEQ);
    let r = right.unwrap_or(MAX_DECODE_QUERIES).min(MAX_DECODE_QUERIES);
    // Both fit: MAX_KERNEL_SEQ < i32::MAX.
    (l as i32, r as i32)
}

impl DecodeOptions {
    /// From options that [`AttentionOptions::check`] accepted and the checked `lse` output
    /// with its strides.
    pub(crate) fn new(
        options: &AttentionOptions,
        lse: Option<(&DeviceTensor, LseStrides)>,
    ) -> DecodeOptions {
        DecodeOptions {
            window: options
                .has_window()
                .then(|| kernel_window(options.window_left, options.window_right)),
            softcap: options.softcap,
            alibi: options.alibi_slopes.as_ref().map(|t| t.device_ptr()),
            sinks: options.sinks.as_ref().map(|t| t.device_ptr()),
            lse: lse.map(|(t, s)| (t.device_ptr(), s)),
        }
    }

    /// No option and no log-sum-exp: the plain kernel runs.
    pub(crate) fn is_plain(&self) -> bool {
        *self == DecodeOptions::default()
    }

    /// Keys per sequence the splits must cover ([`window_span`] of the left bound).
    pub(crate) fn span(&self, seq_q: usize) -> Option<usize> {
        let left = self.window.map(|(l, _)| l as usize);
        window_span(seq_q, left.filter(|&l| l < MAX_KERNEL_SEQ))
    }

    /// Writes the options into the argument block of the option kernel.
    pub(crate) fn apply(&self, params: &mut DecodeParams) {
        let (left, right) = self.window.unwrap_or_else(|| kernel_window(None, None));
        params.window_left = left;
        params.window_right = right;
        if let Some(cap) = self.softcap {
            // The kernel's scores are in log2 units: cap * tanh(s / cap) there is
            // C * tanh(x / C) with C = cap * log2(e).
            let c = cap * std::f32::consts::LOG2_E;
            params.softcap = c;
            params.softcap_inv = 1.0 / c;
        }
        params.alibi = self.alibi.unwrap_or(0);
        params.sinks = self.sinks.unwrap_or(0);
        if let Some((ptr, s)) = self.lse {
            params.lse = ptr;
            params.lse_strides = Strides3::new(s.batch, s.head, s.query);
        }
    }
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
        page_shift: page_shift(cache.page_size.max(1) as i32),
        num_splits: launch.split.num_splits as i32,
        split_keys: launch.split.split_keys as i32,
        scale: p.scale,
        causal: p.causal as i32,
        num_pages: cache.num_pages as i32,
        tensor_cores: launch.tensor_cores as i32,
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
    let plain = DecodeOptions::default();
    forward_decode_with(rt, ws, p, q, out, out_strides, cache, &plain)
}

/// The decode kernel on dense K/V of `p` (`[B, Sk, Hkv, D]` through `p`'s strides) with
/// per-call `options`: the entry a dense call with options and few queries takes. The
/// caller has checked the call and the options as `forward_with` does.
// Not called yet: `forward_with` on dense K/V keeps refusing options until it routes here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_dense_with(
    rt: &Arc<GpuRuntime>,
    ws: &DecodeWorkspace,
    p: &AttentionProblem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &DeviceTensor,
    out_strides: HeadStrides,
    options: &DecodeOptions,
) -> Result<()> {
    let cache = CacheView::dense(p, k, v);
    forward_decode_with(rt, ws, p, q, out, out_strides, &cache, options)
}

/// The plan of the launch [`forward_decode_with`] queues for these arguments on `rt` now
/// (a recording is cut for the cache's capacity): the one place it is computed, so what
/// reports a call's split reports the launched one.
pub(crate) fn plan_decode(
    rt: &GpuRuntime,
    p: &AttentionProblem,
    cache: &CacheView,
    options: &DecodeOptions,
) -> Result<DecodeLaunch> {
    if !options.is_plain() && cache.append.is_some() {
        return Err(AttentionError::NotSupported {
            backend: "gpu (decode)".into(),
            reason: "per-call options with a fused append".into(),
        });
    }
    plan_launch_over(
        rt.multiprocessor_count() as usize,
        tensor_cores_fit(rt.has_mma(), rt.max_shared_bytes_per_block(), p),
        p,
        cache.capacity,
        rt.is_capturing(),
        cache.append.is_some(),
        options.span(p.seq_q),
    )
}

/// [`forward_decode`] with per-call options: plain ones launch the plain kernel exactly as
/// `forward_decode` does, others the option variant (`flash_decode_opt_*`) with its splits
/// laid over the window's keys. Options do not combine with a fused append.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_decode_with(
    rt: &Arc<GpuRuntime>,
    ws: &DecodeWorkspace,
    p: &AttentionProblem,
    q: &DeviceTensor,
    out: &DeviceTensor,
    out_strides: HeadStrides,
    cache: &CacheView,
    options: &DecodeOptions,
) -> Result<()> {
    let with_options = !options.is_plain();
    let launch = plan_decode(rt, p, cache, options)?;
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
    if with_options {
        options.apply(&mut params);
    }
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
    // Ids, not specs: the launches below find their functions in the driver's fixed table.
    let kernel_ids = KernelId::decode(p.dtype, bucket, with_options).zip(KernelId::decode_combine(
        p.dtype,
        bucket,
        with_options,
    ));
    let Some((main, combine)) = kernel_ids else {
        return Err(AttentionError::NotSupported {
            backend: "gpu (decode)".into(),
            reason: format!("no decode kernel for {} head_dim bucket {bucket}", p.dtype),
        });
    };
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
            // The per-head options and the log-sum-exp of the slice's first head.
            sp.alibi = offset_ptr(sp.alibi, sl.head0, 4);
            sp.sinks = offset_ptr(sp.sinks, sl.head0, 4);
            sp.lse = offset_ptr(sp.lse, sp.lse_strides.at(b, sl.head0), 4);
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
        rt.launch_kernel(main, LaunchDims::new(grid, (THREADS, 1, 1), smem), &sp)?;
        if split.num_splits > 1 && !reg {
            let slice_rows = (sl.batch * sl.heads * p.seq_q).min(MAX_GRID_X);
            rt.launch_kernel(
                combine,
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
    use crate::device::Device;
    use crate::dtype::DType;

    #[test]
    fn kernel_window_bounds_clamp_to_what_keeps_the_same_keys() {
        let max = MAX_KERNEL_SEQ as i32;
        let q = MAX_DECODE_QUERIES as i32;
        assert_eq!(kernel_window(None, None), (max, q));
        assert_eq!(kernel_window(Some(0), Some(0)), (0, 0));
        assert_eq!(kernel_window(Some(4095), Some(3)), (4095, 3));
        assert_eq!(kernel_window(Some(usize::MAX), Some(usize::MAX)), (max, q));
        assert_eq!(
            kernel_window(Some(crate::options::MAX_WINDOW), Some(17)),
            (max, q)
        );
        // The kernel's sums stay in i32 for any sequence it takes: a_i is in
        // [-(Sq - 1), MAX_KERNEL_SEQ - 1].
        let (l, r) = kernel_window(Some(usize::MAX), Some(usize::MAX));
        assert!((1 - q).checked_sub(l).is_some());
        assert!((max - 1).checked_add(r).is_some());
    }

    fn per_head(values: &[f32]) -> DeviceTensor {
        DeviceTensor::from_host(values, &[values.len()], Device::Cpu).unwrap()
    }

    #[test]
    fn plain_options_and_no_lse_run_the_plain_kernel() {
        let plain = DecodeOptions::new(&AttentionOptions::new(), None);
        assert!(plain.is_plain());
        assert_eq!(plain.span(4), None);
        let lse = DeviceTensor::zeros(&[1, 2, 3], DType::F32, Device::Cpu).unwrap();
        let s = LseStrides {
            batch: 6,
            head: 3,
            query: 1,
        };
        let with_lse = DecodeOptions::new(&AttentionOptions::new(), Some((&lse, s)));
        assert!(!with_lse.is_plain());
        assert_eq!(with_lse.lse, Some((lse.device_ptr(), s)));
        for o in [
            AttentionOptions::new().with_window(None, Some(0)),
            AttentionOptions::new().with_softcap(30.0),
            AttentionOptions::new().with_alibi_slopes(per_head(&[0.5, 0.25])),
            AttentionOptions::new().with_sinks(per_head(&[1.0, 2.0])),
        ] {
            assert!(!DecodeOptions::new(&o, None).is_plain(), "{o:?}");
        }
    }

    #[test]
    fn options_fill_the_argument_block_in_the_kernel_s_terms() {
        let slopes = per_head(&[0.5, 0.25]);
        let sinks = per_head(&[1.0, 2.0]);
        let lse = DeviceTensor::zeros(&[1, 2, 3], DType::F32, Device::Cpu).unwrap();
        let s = LseStrides {
            batch: 6,
            head: 1,
            query: 2,
        };
        let o = AttentionOptions::new()
            .with_window(Some(100), None)
            .with_softcap(2.0)
            .with_alibi_slopes(slopes.clone())
            .with_sinks(sinks.clone());
        let d = DecodeOptions::new(&o, Some((&lse, s)));
        assert_eq!(d.window, Some((100, MAX_DECODE_QUERIES as i32)));
        // The splits cover left + Sq keys.
        assert_eq!(d.span(3), Some(103));
        let mut params = DecodeParams::default();
        d.apply(&mut params);
        assert_eq!((params.window_left, params.window_right), (100, 16));
        let c = 2.0 * std::f32::consts::LOG2_E;
        assert_eq!(params.softcap, c);
        assert!((params.softcap_inv * c - 1.0).abs() < 1e-6);
        assert_eq!(d.alibi, Some(slopes.device_ptr()));
        assert_eq!(d.sinks, Some(sinks.device_ptr()));
        assert_eq!(params.alibi, slopes.device_ptr());
        assert_eq!(params.sinks, sinks.device_ptr());
        assert_eq!(params.lse, lse.device_ptr());
        assert_eq!(params.lse_strides, Strides3::new(6, 1, 2));
        // No window: unbounded both sides, the whole cache is cut; no softcap: zeros.
        let mut params = DecodeParams::default();
        let d = DecodeOptions::new(&AttentionOptions::new().with_sinks(sinks), None);
        assert_eq!(d.span(1), None);
        d.apply(&mut params);
        assert_eq!(
            (params.window_left, params.window_right),
            kernel_window(None, None)
        );
        assert_eq!(
            (params.softcap, params.softcap_inv, params.lse),
            (0.0, 0.0, 0)
        );
        // A right-only window reads every key; an unbounded-left clamped value too.
        let right = DecodeOptions::new(&AttentionOptions::new().with_window(None, Some(2)), None);
        assert_eq!(right.window, Some((MAX_KERNEL_SEQ as i32, 2)));
        assert_eq!(right.span(5), None);
        let huge = AttentionOptions::new().with_window(Some(usize::MAX / 4), Some(0));
        assert_eq!(DecodeOptions::new(&huge, None).span(5), None);
    }
}
