//! Launch of the fused flash kernels (kernels/flash_attention*.hip).

use std::sync::Arc;

use super::dispatch::FlashChoice;
use super::params::AttnParams;
use crate::device::gpu::{GpuRuntime, LaunchDims};
use crate::error::Result;
use crate::kernels;
use crate::problem::AttentionProblem;

/// Queues one flash launch: grid (ceil(Sq / BLOCK_M), H, B).
pub(crate) fn forward_flash(
    rt: &Arc<GpuRuntime>,
    p: &AttentionProblem,
    params: &AttnParams,
    choice: &FlashChoice,
) -> Result<()> {
    let tile = choice
        .tile
        .ok_or_else(|| crate::error::AttentionError::NotSupported {
            backend: "gpu (flash)".into(),
            reason: format!("{:?} has no prefill tile", choice.kernel),
        })?;
    let spec = kernels::flash_spec(choice.file(), tile);
    let grid = (
        p.seq_q.div_ceil(tile.block_m as usize) as u32,
        p.num_heads as u32,
        p.batch as u32,
    );
    rt.launch(
        &spec,
        LaunchDims::new(grid, (tile.threads, 1, 1), tile.smem_bytes),
        params,
    )
}
