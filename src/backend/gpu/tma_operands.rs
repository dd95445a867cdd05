//! Q, K and V as the warp-specialized prefill kernel ([`FlashImpl::WgmmaWs`]) reads them:
//! through TMA tensor maps. One description serves both the dispatch question (can TMA
//! address this call?) and the launch (the maps it encodes), so the two cannot disagree.
//!
//! [`FlashImpl::WgmmaWs`]: crate::kernels::FlashImpl::WgmmaWs

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::device::tensor_map::TensorMapDesc;
use crate::dtype::DType;
use crate::kernels::abi::{AttnParams, Strides3};
use crate::problem::AttentionProblem;
use crate::tensor::DeviceTensor;

/// Smallest page the kernel reads in boxes: 8 rows of 128 bytes keep every box on the
/// 1024-byte grid of the 128-byte swizzle.
const MIN_TMA_PAGE: usize = 8;

/// How the rows of one operand lie for its tensor map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TmaRows {
    /// Each batch entry's own rows: the call's (or a grid slice's) sequence length.
    PerBatch,
    /// A packed ragged batch: one map entry of `total` rows through every sequence; each
    /// block starts at its sequence's first row.
    Packed { total: usize },
    /// A K / V pool of `num_pages` pages of `page_size` rows, read in boxes of one page (or
    /// of BLOCK_N rows of one).
    Paged { num_pages: usize, page_size: usize },
}

/// The row layouts of a call's Q and of its K / V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TmaLayout {
    pub q: TmaRows,
    pub kv: TmaRows,
}

impl TmaLayout {
    /// `[B, S, H, D]`-like operands, each batch entry with its own rows.
    pub const DENSE: TmaLayout = TmaLayout {
        q: TmaRows::PerBatch,
        kv: TmaRows::PerBatch,
    };
}

/// The three operands of one launch (or of a call, for the dispatch question).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TmaOperands {
    dtype: DType,
    head_dim: usize,
    ptrs: [u64; 3],
    strides: [Strides3; 3],
    /// Rows of Q and of K / V per batch entry ([`TmaRows::PerBatch`]).
    seq: [usize; 2],
    heads: [usize; 2],
    batch: usize,
    layout: TmaLayout,
}

impl TmaOperands {
    /// The operands of an argument block (a whole call's or a grid slice's).
    pub fn of_params(params: &AttnParams, dtype: DType, layout: TmaLayout) -> Self {
        let n = |x: i32| usize::try_from(x).unwrap_or(0);
        TmaOperands {
            dtype,
            head_dim: n(params.head_dim),
            ptrs: [params.q, params.k, params.v],
            strides: [params.q_strides, params.k_strides, params.v_strides],
            seq: [n(params.seq_q), n(params.seq_k)],
            heads: [n(params.num_heads), n(params.num_kv_heads)],
            batch: n(params.batch),
            layout,
        }
    }

    /// The operands of a validated problem over these Q, K and V tensors.
    pub fn of_problem(
        p: &AttentionProblem,
        [q, k, v]: [&DeviceTensor; 3],
        layout: TmaLayout,
    ) -> Self {
        TmaOperands {
            dtype: p.dtype,
            head_dim: p.head_dim,
            ptrs: [q.device_ptr(), k.device_ptr(), v.device_ptr()],
            strides: [p.q.into(), p.k.into(), p.v.into()],
            seq: [p.seq_q, p.seq_k],
            heads: [p.num_heads, p.num_kv_heads],
            batch: p.batch,
            layout,
        }
    }

    /// The maps' views for a tile of `block_m` query and `block_n` key rows.
    pub fn views(&self, block_m: u32, block_n: u32) -> [TensorMapDesc; 3] {
        let view = |i: usize| {
            let (rows, seq, heads, boxed) = if i == 0 {
                (self.layout.q, self.seq[0], self.heads[0], block_m)
            } else {
                (self.layout.kv, self.seq[1], self.heads[1], block_n)
            };
            let (rows, batch, box_rows) = match rows {
                TmaRows::PerBatch => (seq, self.batch, boxed),
                TmaRows::Packed { total } => (total, 1, boxed),
                TmaRows::Paged {
                    num_pages,
                    page_size,
                } => (
                    page_size,
                    num_pages,
                    u32::try_from(page_size).map_or(boxed, |p| p.min(boxed)),
                ),
            };
            let s = self.strides[i];
            TensorMapDesc::operand(
                self.ptrs[i],
                self.dtype,
                self.head_dim,
                rows,
                heads,
                batch,
                [s.s, s.h, s.b],
                box_rows,
            )
        };
        [view(0), view(1), view(2)]
    }

    /// Whether the kernel can read these operands with a tile of `block_m` x `block_n`: TMA
    /// addresses every view ([`TensorMapDesc::check`]) and pages, if any, are a power of two
    /// of at least 8 rows that divides BLOCK_N or is divided by it; the reason otherwise.
    pub fn check(&self, block_m: u32, block_n: u32) -> Result<(), String> {
        if let TmaRows::Paged { page_size, .. } = self.layout.kv {
            let bn = block_n as usize;
            if !page_size.is_power_of_two()
                || page_size < MIN_TMA_PAGE
                || !(bn.is_multiple_of(page_size) || page_size.is_multiple_of(bn))
            {
                return Err(format!(
                    "pages of {page_size} rows: TMA boxes take powers of two >= {MIN_TMA_PAGE} that divide BLOCK_N = {bn} or are divided by it"
                ));
            }
        }
        for (name, view) in ["q", "k", "v"].iter().zip(self.views(block_m, block_n)) {
            view.check().map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(batch: i32, seq: i32, heads: i32, d: i32) -> AttnParams {
        let row = i64::from(heads * d);
        let st = Strides3 {
            b: i64::from(seq) * row,
            h: i64::from(d),
            s: row,
        };
        AttnParams {
            q: 0x1000,
            k: 0x10_0000,
            v: 0x20_0000,
            q_strides: st,
            k_strides: st,
            v_strides: st,
            batch,
            num_heads: heads,
            num_kv_heads: heads,
            seq_q: seq,
            seq_k: seq,
            head_dim: d,
            ..bytemuck::Zeroable::zeroed()
        }
    }

    #[test]
    fn dense_views_have_one_entry_per_batch_and_tile_boxes() {
        let ops = TmaOperands::of_params(&params(3, 200, 4, 128), DType::BF16, TmaLayout::DENSE);
        let [q, k, v] = ops.views(128, 64);
        assert_eq!(q.dims, [128, 200, 4, 3]);
        assert_eq!((q.box_rows, k.box_rows, v.box_rows), (128, 64, 64));
        assert_eq!(ops.check(128, 64), Ok(()));
    }

    #[test]
    fn packed_views_are_one_entry_through_every_row() {
        // cu_seqlens describe the sequences; the map spans all 700 rows with a zero batch
        // stride (never stepped over: extent 1).
        let mut p = params(5, 300, 2, 64);
        p.q_strides.b = 0;
        p.k_strides.b = 0;
        p.v_strides.b = 0;
        let layout = TmaLayout {
            q: TmaRows::Packed { total: 700 },
            kv: TmaRows::Packed { total: 650 },
        };
        let ops = TmaOperands::of_params(&p, DType::F16, layout);
        let [q, k, _] = ops.views(192, 128);
        assert_eq!(q.dims, [64, 700, 2, 1]);
        assert_eq!(k.dims, [64, 650, 2, 1]);
        assert_eq!(ops.check(192, 128), Ok(()));
    }

    #[test]
    fn paged_views_box_one_page_or_one_tile() {
        let mut p = params(2, 64, 8, 128);
        p.k_strides = Strides3 {
            b: 16 * 8 * 128,
            h: 128,
            s: 8 * 128,
        };
        p.v_strides = p.k_strides;
        let paged = |page_size| {
            let layout = TmaLayout {
                q: TmaRows::PerBatch,
                kv: TmaRows::Paged {
                    num_pages: 40,
                    page_size,
                },
            };
            TmaOperands::of_params(&p, DType::BF16, layout)
        };
        let [_, k, _] = paged(16).views(128, 128);
        assert_eq!((k.dims, k.box_rows), ([128, 16, 8, 40], 16));
        assert_eq!(paged(16).check(128, 128), Ok(()));
        let [_, k, _] = paged(256).views(128, 128);
        assert_eq!(k.box_rows, 128);
        assert_eq!(paged(256).check(128, 128), Ok(()));
        // Not a power of two, too small, or neither dividing BLOCK_N nor divided by it.
        for bad in [24, 4, 1] {
            assert!(
                paged(bad).check(128, 128).unwrap_err().contains("pages of"),
                "{bad}"
            );
        }
        assert!(paged(64).check(128, 96).is_err());
        assert_eq!(paged(32).check(128, 96), Ok(()));
    }

    #[test]
    fn refusals_name_the_operand() {
        let mut p = params(2, 64, 4, 64);
        p.v = 0x2008;
        let ops = TmaOperands::of_params(&p, DType::BF16, TmaLayout::DENSE);
        let e = ops.check(128, 128).unwrap_err();
        assert!(e.starts_with("v: ") && e.contains("16-byte aligned"), "{e}");
    }
}
