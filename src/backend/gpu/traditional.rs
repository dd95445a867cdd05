//! The unfused device path: scores, softmax and PV in three launches, whatever the batch
//! and head count, through an f32 workspace of `[B, H, Sq, Sk]`.

use std::sync::Arc;

use super::grid::{MAX_GRID_X, MAX_GRID_YZ};
use super::workspace::DeviceScratch;
use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::AttnParams;
use crate::kernels::catalog::TraditionalKernel;
use crate::kernels::KernelId;
use crate::problem::AttentionProblem;

/// Queues the three launches.
pub(crate) fn forward_traditional(
    rt: &Arc<GpuRuntime>,
    ws: &DeviceScratch,
    p: &AttentionProblem,
    params: &AttnParams,
) -> Result<()> {
    let elems = p
        .batch
        .checked_mul(p.num_heads)
        .and_then(|x| x.checked_mul(p.seq_q))
        .and_then(|x| x.checked_mul(p.seq_k))
        .ok_or_else(|| AttentionError::NotSupported {
            backend: "gpu (traditional)".into(),
            reason: format!(
                "the score workspace of B*H*Sq*Sk = {} * {} * {} * {} f32 overflows usize",
                p.batch, p.num_heads, p.seq_q, p.seq_k
            ),
        })?;
    // Float dtypes only reach here (the problem refuses the others); checked before the
    // workspace grows all the same.
    let kernel = |k: TraditionalKernel| {
        KernelId::traditional(k, p.dtype).ok_or_else(|| AttentionError::NotSupported {
            backend: "gpu (traditional)".into(),
            reason: format!("no unfused kernel for {}", p.dtype),
        })
    };
    kernel(TraditionalKernel::Scores)?;
    let scores = ws.get(rt, elems)?;
    let mut params = *params;
    params.workspace = scores.device_ptr();
    // Every kernel strides over what the clamped grid leaves (64-bit row and (b, h) indices).
    let rows = (p.batch * p.num_heads * p.seq_q).min(MAX_GRID_X) as u32;
    let bh = (p.batch * p.num_heads).min(MAX_GRID_YZ) as u32;
    let tiles = |n: usize| n.div_ceil(64) as u32;
    let q_tiles = p.seq_q.div_ceil(64).min(MAX_GRID_YZ) as u32;
    rt.launch_kernel(
        kernel(TraditionalKernel::Scores)?,
        LaunchDims::new((tiles(p.seq_k), q_tiles, bh), (256, 1, 1), 0),
        &params,
    )?;
    rt.launch_kernel(
        kernel(TraditionalKernel::Softmax)?,
        LaunchDims::new((rows, 1, 1), (256, 1, 1), 0),
        &params,
    )?;
    rt.launch_kernel(
        kernel(TraditionalKernel::Pv)?,
        LaunchDims::new((tiles(p.head_dim), q_tiles, bh), (256, 1, 1), 0),
        &params,
    )
}
