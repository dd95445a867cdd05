//! The unfused device path: scores, softmax and PV in three launches, whatever the batch
//! and head count, through an f32 workspace of `[B, H, Sq, Sk]`.

use std::sync::Arc;

use super::params::AttnParams;
use super::workspace::DeviceScratch;
use crate::device::gpu::{GpuRuntime, LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels;
use crate::problem::AttentionProblem;

/// Bytes of workspace the traditional path needs for `p`.
pub fn workspace_bytes(p: &AttentionProblem) -> u64 {
    (p.batch * p.num_heads) as u64 * p.seq_q as u64 * p.seq_k as u64 * 4
}

/// Queues the three launches.
pub(crate) fn forward_traditional(
    rt: &Arc<GpuRuntime>,
    ws: &DeviceScratch,
    p: &AttentionProblem,
    params: &AttnParams,
) -> Result<()> {
    let elems = (p.batch * p.num_heads)
        .checked_mul(p.seq_q)
        .and_then(|x| x.checked_mul(p.seq_k))
        .ok_or_else(|| {
            AttentionError::shape(
                "traditional workspace",
                "B*H*Sq*Sk that fits in usize",
                format!("{p:?}"),
            )
        })?;
    let rows = (p.batch * p.num_heads * p.seq_q) as u64;
    if rows > i32::MAX as u64 {
        return Err(AttentionError::NotSupported {
            backend: "gpu (traditional)".into(),
            reason: format!("B*H*Sq = {rows} rows exceed the grid limit {}", i32::MAX),
        });
    }
    let scores = ws.get(p.device, elems)?;
    let mut params = *params;
    params.workspace = scores.device_ptr();
    let bh = (p.batch * p.num_heads) as u32;
    let tiles = |n: usize| n.div_ceil(64) as u32;
    rt.launch(
        &kernels::traditional_spec("attn_scores", p.dtype),
        LaunchDims::new((tiles(p.seq_k), tiles(p.seq_q), bh), (256, 1, 1), 0),
        &params,
    )?;
    rt.launch(
        &kernels::traditional_spec("attn_softmax_rows", p.dtype),
        LaunchDims::new((rows as u32, 1, 1), (256, 1, 1), 0),
        &params,
    )?;
    rt.launch(
        &kernels::traditional_spec("attn_pv", p.dtype),
        LaunchDims::new((tiles(p.head_dim), tiles(p.seq_q), bh), (256, 1, 1), 0),
        &params,
    )
}
