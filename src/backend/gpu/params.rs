//! The flash and traditional kernels' argument block ([`AttnParams`]) filled for one call.

use crate::kernels::abi::AttnParams;
use crate::problem::{AttentionProblem, HeadStrides};
use crate::tensor::DeviceTensor;

impl AttnParams {
    /// Fills the block for one call; the caller has validated every operand.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &AttentionProblem,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &DeviceTensor,
        out_strides: HeadStrides,
    ) -> Self {
        AttnParams {
            q: q.device_ptr(),
            k: k.device_ptr(),
            v: v.device_ptr(),
            mask: mask.map_or(0, |m| m.device_ptr()),
            out: out.device_ptr(),
            lse: 0,
            workspace: 0,
            q_strides: p.q.into(),
            k_strides: p.k.into(),
            v_strides: p.v.into(),
            o_strides: out_strides.into(),
            m_strides: p.mask.unwrap_or_default().into(),
            batch: p.batch as i32,
            num_heads: p.num_heads as i32,
            num_kv_heads: p.num_kv_heads as i32,
            seq_q: p.seq_q as i32,
            seq_k: p.seq_k as i32,
            head_dim: p.head_dim as i32,
            scale: p.scale,
            causal: p.causal as i32,
        }
    }
}
