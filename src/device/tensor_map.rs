//! TMA tensor maps of the attention operands: which tensors Hopper's copy engine can
//! address, and the description the driver encodes into a [`TensorMap`].
//!
//! An operand is viewed as a 4-D tiled tensor `[head_dim, rows, heads, batch]` of 16-bit
//! elements (innermost first), read in boxes of 64 columns (one 128-byte swizzle atom) by
//! `box_rows` rows. What TMA needs of it: a 16-byte aligned base, byte strides that are
//! non-zero multiples of 16 below 2^40 and extents below 2^32. A dimension of extent 1 is
//! never stepped over, so its stride is replaced by a valid one.

#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::dtype::DType;

/// Columns of one box: a 128-byte swizzle atom of 16-bit elements.
pub(crate) const BOX_COLS: u32 = 64;

/// Largest byte stride a tensor map takes (exclusive).
const MAX_STRIDE: u64 = 1 << 40;

/// Largest extent of a tensor-map dimension.
const MAX_EXTENT: u64 = u32::MAX as u64;

/// A tiled 4-D view of one operand, ready to be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TensorMapDesc {
    /// Device address of element (0, 0, 0, 0).
    pub ptr: u64,
    /// Element type (f16 or bf16).
    pub dtype: DType,
    /// Extents, innermost first: head_dim, rows, heads, batch (each at least 1).
    pub dims: [u64; 4],
    /// Byte strides of dims 1, 2 and 3 (dim 0 is contiguous).
    pub strides: [u64; 3],
    /// Rows of one box (dim 1); the box is [`BOX_COLS`] x `box_rows` x 1 x 1.
    pub box_rows: u32,
}

impl TensorMapDesc {
    /// The view of an operand at `ptr` with `head_dim` contiguous elements per row and
    /// element strides `row`, `head` and `batch` (as signed launch strides). Extents of 0
    /// become 1 (a map of an empty operand is still encoded; the kernel reads none of it),
    /// and the stride of an extent-1 dimension becomes the one a packed layout would have.
    #[allow(clippy::too_many_arguments)]
    pub fn operand(
        ptr: u64,
        dtype: DType,
        head_dim: usize,
        rows: usize,
        heads: usize,
        batch: usize,
        [row, head, batch_stride]: [i64; 3],
        box_rows: u32,
    ) -> Self {
        let es = dtype.size_in_bytes() as u64;
        let dims = [head_dim, rows, heads, batch].map(|d| (d as u64).max(1));
        let given = [row, head, batch_stride];
        let mut strides = [0u64; 3];
        // The packed stride of dim i + 1: the previous dim's stride times its extent.
        let mut packed = (dims[0] * es).next_multiple_of(16);
        for i in 0..3 {
            strides[i] = if dims[i + 1] == 1 {
                packed
            } else {
                u64::try_from(given[i]).map_or(0, |s| s.saturating_mul(es))
            };
            packed = strides[i].saturating_mul(dims[i + 1]).max(16);
        }
        TensorMapDesc {
            ptr,
            dtype,
            dims,
            strides,
            box_rows,
        }
    }

    /// Whether TMA can address this view; the reason when it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            return Err(format!("TMA copies here are 16-bit, not {}", self.dtype));
        }
        if !self.ptr.is_multiple_of(16) {
            return Err(format!(
                "base address {:#x} is not 16-byte aligned",
                self.ptr
            ));
        }
        if let Some(d) = self.dims.iter().find(|&&d| d == 0 || d > MAX_EXTENT) {
            return Err(format!("extent {d} is outside 1 ..= {MAX_EXTENT}"));
        }
        if let Some(s) = self
            .strides
            .iter()
            .find(|&&s| s == 0 || !s.is_multiple_of(16) || s >= MAX_STRIDE)
        {
            return Err(format!(
                "byte stride {s} is not a non-zero multiple of 16 below 2^40"
            ));
        }
        if self.box_rows == 0 || self.box_rows > 256 {
            return Err(format!("box of {} rows (1 ..= 256)", self.box_rows));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bshd(ptr: u64, b: usize, s: usize, h: usize, d: usize) -> TensorMapDesc {
        let (b_, s_, h_) = ((s * h * d) as i64, (h * d) as i64, d as i64);
        TensorMapDesc::operand(ptr, DType::BF16, d, s, h, b, [s_, h_, b_], 128)
    }

    #[test]
    fn packed_operands_are_addressable() {
        let t = bshd(0x1000, 2, 300, 8, 128);
        assert_eq!(t.dims, [128, 300, 8, 2]);
        assert_eq!(t.strides, [8 * 128 * 2, 128 * 2, 300 * 8 * 128 * 2]);
        assert_eq!(t.check(), Ok(()));
    }

    #[test]
    fn unit_extents_get_a_valid_stride_and_empty_extents_become_one() {
        // One head, one sequence: their strides are never stepped over (here 0 and 3).
        let t = TensorMapDesc::operand(0x1000, DType::F16, 64, 0, 1, 1, [64, 0, 3], 64);
        assert_eq!(t.dims, [64, 1, 1, 1]);
        assert!(t.strides.iter().all(|s| s % 16 == 0 && *s > 0), "{t:?}");
        assert_eq!(t.check(), Ok(()));
    }

    #[test]
    fn refusals_name_what_tma_cannot_do() {
        let ok = bshd(0x1000, 2, 64, 4, 64);
        let misaligned = TensorMapDesc { ptr: 0x1008, ..ok };
        assert!(misaligned.check().unwrap_err().contains("16-byte aligned"));
        // A broadcast over heads (stride 0) or a row stride of 4 elements (8 bytes).
        let broadcast =
            TensorMapDesc::operand(0x1000, DType::BF16, 64, 64, 4, 2, [256, 0, 64 * 256], 64);
        assert!(broadcast.check().unwrap_err().contains("stride 0"));
        let narrow =
            TensorMapDesc::operand(0x1000, DType::BF16, 64, 64, 4, 2, [4, 64, 64 * 256], 64);
        assert!(narrow.check().unwrap_err().contains("stride 8"));
        let f32 = TensorMapDesc {
            dtype: DType::F32,
            ..ok
        };
        assert!(f32.check().unwrap_err().contains("16-bit"));
        let tall = TensorMapDesc {
            box_rows: 512,
            ..ok
        };
        assert!(tall.check().unwrap_err().contains("512 rows"));
        let huge = TensorMapDesc {
            strides: [1 << 40, 128, 128],
            ..ok
        };
        assert!(huge.check().is_err());
        // A negative stride (a flipped view) cannot be addressed either.
        let flipped =
            TensorMapDesc::operand(0x1000, DType::BF16, 64, 64, 4, 2, [-256, 64, 64 * 256], 64);
        assert!(flipped.check().is_err());
    }
}
