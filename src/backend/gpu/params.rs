//! The flash and traditional kernels' argument block ([`AttnParams`]) filled for one call,
//! and what a call with per-call extensions adds to it ([`ParamsExt`]).

use super::dispatch::MAX_KERNEL_SEQ;
use crate::kernels::abi::{page_shift, AttnParams, Strides3};
use crate::options::AttentionOptions;
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
            // Plain attention; `with_ext` fills these for the extended variants.
            ..AttnParams::default()
        }
    }
}

/// What a call with per-call extensions adds to the argument block (read by the `_ext`
/// flash variants only): options, the log-sum-exp output, packed sequence offsets.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ParamsExt {
    pub alibi: u64,
    pub sinks: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub block_table: u64,
    pub k_lens: u64,
    pub max_pages: i32,
    pub page_size: i32,
    pub lse: u64,
    pub lse_strides: Strides3,
    pub window_left: i32,
    pub window_right: i32,
    pub softcap: f32,
    pub transform: bool,
}

/// A window bound for the kernels: `None` (unbounded) and any bound past the longest
/// sequence the kernels take become [`MAX_KERNEL_SEQ`], which reaches past every key, so
/// the kernels' 32-bit window arithmetic cannot overflow.
pub(crate) fn kernel_window_bound(bound: Option<usize>) -> i32 {
    bound.map_or(MAX_KERNEL_SEQ, |b| b.min(MAX_KERNEL_SEQ)) as i32
}

impl ParamsExt {
    /// The extension block of validated `options`, with the log-sum-exp output (device
    /// address and element strides over batch, head, query row) when there is one.
    pub fn new(options: &AttentionOptions, lse: Option<(u64, Strides3)>) -> Self {
        let (lse, lse_strides) = lse.unwrap_or_default();
        ParamsExt {
            alibi: options.alibi_slopes.as_ref().map_or(0, |t| t.device_ptr()),
            sinks: options.sinks.as_ref().map_or(0, |t| t.device_ptr()),
            cu_q: 0,
            cu_k: 0,
            block_table: 0,
            k_lens: 0,
            max_pages: 0,
            page_size: 0,
            lse,
            lse_strides,
            window_left: kernel_window_bound(options.window_left),
            window_right: kernel_window_bound(options.window_right),
            softcap: options.softcap.unwrap_or(0.0),
            transform: options.softcap.is_some() || options.alibi_slopes.is_some(),
        }
    }

    /// With packed sequences: `cu_q` / `cu_k` are the device addresses of the I32 offsets
    /// (0: that side is not packed).
    pub fn packed(self, cu_q: u64, cu_k: u64) -> Self {
        ParamsExt { cu_q, cu_k, ..self }
    }

    /// With paged K / V: the device addresses of the I32 `[B, max_pages]` block table and
    /// `[B]` lengths, and the page size (the K / V batch strides are then page strides).
    pub fn paged(self, block_table: u64, k_lens: u64, max_pages: usize, page_size: usize) -> Self {
        ParamsExt {
            block_table,
            k_lens,
            max_pages: max_pages as i32,
            page_size: page_size as i32,
            ..self
        }
    }
}

impl AttnParams {
    /// The block with `ext` filled in.
    pub fn with_ext(self, ext: &ParamsExt) -> Self {
        AttnParams {
            alibi: ext.alibi,
            sinks: ext.sinks,
            cu_q: ext.cu_q,
            cu_k: ext.cu_k,
            block_table: ext.block_table,
            k_lens: ext.k_lens,
            max_pages: ext.max_pages,
            page_size: ext.page_size,
            page_shift: page_shift(ext.page_size),
            lse: ext.lse,
            l_strides: ext.lse_strides,
            window_left: ext.window_left,
            window_right: ext.window_right,
            softcap: ext.softcap,
            transform: ext.transform as i32,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::dtype::DType;

    #[test]
    fn window_bounds_stay_within_the_kernel_limit() {
        assert_eq!(kernel_window_bound(None), MAX_KERNEL_SEQ as i32);
        assert_eq!(kernel_window_bound(Some(0)), 0);
        assert_eq!(kernel_window_bound(Some(4095)), 4095);
        assert_eq!(
            kernel_window_bound(Some(crate::options::MAX_WINDOW)),
            MAX_KERNEL_SEQ as i32
        );
        assert_eq!(
            kernel_window_bound(Some(MAX_KERNEL_SEQ + 1)),
            MAX_KERNEL_SEQ as i32
        );
    }

    #[test]
    fn the_extension_block_carries_every_option() {
        let t = DeviceTensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
        let plain = ParamsExt::new(&AttentionOptions::new(), None);
        assert!(!plain.transform);
        assert_eq!((plain.alibi, plain.sinks, plain.lse), (0, 0, 0));
        assert_eq!(plain.softcap, 0.0);
        let o = AttentionOptions::new()
            .with_window(Some(7), Some(0))
            .with_softcap(30.0)
            .with_alibi_slopes(t.clone())
            .with_sinks(t.clone());
        let lse = Strides3::new(64, 16, 1);
        let e = ParamsExt::new(&o, Some((0x1000, lse))).packed(0x2000, 0x3000);
        assert_eq!((e.window_left, e.window_right), (7, 0));
        assert_eq!(e.softcap, 30.0);
        assert!(e.transform);
        assert_eq!((e.alibi, e.sinks), (t.device_ptr(), t.device_ptr()));
        assert_eq!((e.lse, e.lse_strides), (0x1000, lse));
        assert_eq!((e.cu_q, e.cu_k), (0x2000, 0x3000));
        let sinks_only = ParamsExt::new(&AttentionOptions::new().with_sinks(t), None);
        assert!(
            !sinks_only.transform,
            "sinks act at the end of a row, not on scores"
        );
        let p = AttnParams::default().with_ext(&e);
        assert_eq!(p.transform, 1);
        assert_eq!((p.cu_q, p.cu_k, p.lse), (0x2000, 0x3000, 0x1000));
        assert_eq!(p.l_strides, lse);
        assert_eq!(
            (p.block_table, p.k_lens, p.max_pages, p.page_size),
            (0, 0, 0, 0)
        );
        for (size, shift) in [(1, 0), (16, 4), (256, 8), (7, -1), (48, -1)] {
            let e = ParamsExt::new(&AttentionOptions::new(), None).paged(0x10, 0x20, 9, size);
            let p = AttnParams::default().with_ext(&e);
            assert_eq!((p.block_table, p.k_lens), (0x10, 0x20));
            assert_eq!(
                (p.max_pages, p.page_size, p.page_shift),
                (9, size as i32, shift)
            );
        }
    }
}
