//! Launch of the fused flash kernels (kernels/flash_attention_<mode>.hip) on the
//! implementation [`FlashChoice`] names.

use std::sync::Arc;

use super::dispatch::FlashChoice;
use super::grid::{for_each_slice, offset_ptr, HeadAxis, Slice};
use super::tma_operands::{TmaLayout, TmaOperands};
use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{AttnParams, WsParams};
use crate::kernels::{FlashImpl, FlashTile};
use crate::problem::AttentionProblem;

/// Queues the flash launches: grid (ceil(Sq / BLOCK_M), H, B), one launch per slice of the
/// batch and heads that fits the grid's y / z limits (one launch for any usual call).
/// `layout` is how the rows of Q and K / V lie (dense, packed or paged), for the
/// warp-specialized kernel's tensor maps.
pub(crate) fn forward_flash(
    rt: &Arc<GpuRuntime>,
    p: &AttentionProblem,
    params: &AttnParams,
    choice: &FlashChoice,
    layout: TmaLayout,
) -> Result<()> {
    let (Some(tile), Some(spec)) = (choice.tile, choice.spec()) else {
        return Err(AttentionError::NotSupported {
            backend: "gpu (flash)".into(),
            reason: format!("{:?} has no prefill tile", choice.kernel),
        });
    };
    let tiles = p.seq_q.div_ceil(tile.block_m as usize) as u32;
    for_each_slice(p.batch, p.num_heads, p.num_kv_heads, HeadAxis::Query, |s| {
        let sliced = slice_params(params, p, &s);
        let grid = (tiles, s.heads as u32, s.batch as u32);
        let dims = LaunchDims::new(grid, (tile.threads, 1, 1), tile.smem_bytes);
        if choice.implementation == FlashImpl::WgmmaWs {
            rt.launch(&spec, dims, &ws_params(rt, p, &sliced, tile, layout)?)
        } else {
            rt.launch(&spec, dims, &sliced)
        }
    })
}

/// The warp-specialized kernel's argument: tensor maps of the slice's Q, K and V (boxes of
/// BLOCK_M query rows and BLOCK_N key rows, or one page), ahead of its argument block.
fn ws_params(
    rt: &GpuRuntime,
    p: &AttentionProblem,
    params: &AttnParams,
    tile: &FlashTile,
    layout: TmaLayout,
) -> Result<WsParams> {
    let [q, k, v] =
        TmaOperands::of_params(params, p.dtype, layout).views(tile.block_m, tile.block_n);
    Ok(WsParams {
        tq: rt.encode_tensor_map(&q)?,
        tk: rt.encode_tensor_map(&k)?,
        tv: rt.encode_tensor_map(&v)?,
        p: *params,
        pad_: bytemuck::Zeroable::zeroed(),
    })
}

/// `params` narrowed to one slice: base pointers advanced to its first sequence and heads,
/// sizes cut to it (strides stay: they are the whole tensors').
pub(crate) fn slice_params(params: &AttnParams, p: &AttentionProblem, s: &Slice) -> AttnParams {
    if s.is_whole(p.batch, p.num_heads) {
        return *params;
    }
    let es = p.dtype.size_in_bytes();
    let b = s.batch0;
    AttnParams {
        q: offset_ptr(params.q, params.q_strides.at(b, s.head0), es),
        out: offset_ptr(params.out, params.o_strides.at(b, s.head0), es),
        mask: offset_ptr(params.mask, params.m_strides.at(b, s.head0), 4),
        lse: offset_ptr(params.lse, params.l_strides.at(b, s.head0), 4),
        alibi: offset_ptr(params.alibi, s.head0, 4),
        sinks: offset_ptr(params.sinks, s.head0, 4),
        // A packed batch's offsets: the slice's sequences are its entries b .. b + batch.
        cu_q: offset_ptr(params.cu_q, b, 4),
        cu_k: offset_ptr(params.cu_k, b, 4),
        // Paged K / V: the slice's rows of the block table and its lengths; the pools are
        // addressed by page, not by batch entry.
        block_table: offset_ptr(params.block_table, b * params.max_pages.max(0) as usize, 4),
        k_lens: offset_ptr(params.k_lens, b, 4),
        k: if params.block_table != 0 {
            offset_ptr(params.k, params.k_strides.at(0, s.kv_head0), es)
        } else {
            offset_ptr(params.k, params.k_strides.at(b, s.kv_head0), es)
        },
        v: if params.block_table != 0 {
            offset_ptr(params.v, params.v_strides.at(0, s.kv_head0), es)
        } else {
            offset_ptr(params.v, params.v_strides.at(b, s.kv_head0), es)
        },
        batch: s.batch as i32,
        num_heads: s.heads as i32,
        num_kv_heads: s.kv_heads as i32,
        ..*params
    }
}
