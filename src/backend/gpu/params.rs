//! Host mirrors of the kernel argument blocks in kernels/attention_params.h.

use crate::problem::{AttentionProblem, HeadStrides};
use crate::tensor::DeviceTensor;

/// Mirrors `AttnParams` field for field (pointers as u64, strides in elements).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub mask: u64,
    pub out: u64,
    pub lse: u64,
    pub workspace: u64,
    pub q_sb: i64,
    pub q_sh: i64,
    pub q_ss: i64,
    pub k_sb: i64,
    pub k_sh: i64,
    pub k_ss: i64,
    pub v_sb: i64,
    pub v_sh: i64,
    pub v_ss: i64,
    pub o_sb: i64,
    pub o_sh: i64,
    pub o_ss: i64,
    pub m_sb: i64,
    pub m_sh: i64,
    pub m_sq: i64,
    pub batch: i32,
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub seq_q: i32,
    pub seq_k: i32,
    pub head_dim: i32,
    pub scale: f32,
    pub causal: i32,
}

fn strides3(s: HeadStrides) -> (i64, i64, i64) {
    (s.batch as i64, s.head as i64, s.seq as i64)
}

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
        let (q_sb, q_sh, q_ss) = strides3(p.q);
        let (k_sb, k_sh, k_ss) = strides3(p.k);
        let (v_sb, v_sh, v_ss) = strides3(p.v);
        let (o_sb, o_sh, o_ss) = strides3(out_strides);
        let m = p.mask.unwrap_or_default();
        AttnParams {
            q: q.device_ptr(),
            k: k.device_ptr(),
            v: v.device_ptr(),
            mask: mask.map_or(0, |m| m.device_ptr()),
            out: out.device_ptr(),
            lse: 0,
            workspace: 0,
            q_sb,
            q_sh,
            q_ss,
            k_sb,
            k_sh,
            k_ss,
            v_sb,
            v_sh,
            v_ss,
            o_sb,
            o_sh,
            o_ss,
            m_sb: m.batch as i64,
            m_sh: m.head as i64,
            m_sq: m.query as i64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_struct() {
        // 7 pointers, 15 strides, 6 ints, a float and an int: 7*8 + 15*8 + 8*4 bytes.
        assert_eq!(std::mem::size_of::<AttnParams>(), 7 * 8 + 15 * 8 + 8 * 4);
        assert_eq!(std::mem::align_of::<AttnParams>(), 8);
    }
}
