//! Strided element copies between views: host loops and one device kernel.

use std::sync::Arc;

use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::CopyParams;
use crate::kernels::KernelId;

use super::DeviceTensor;

/// A view's shape and strides padded to rank 4 with leading size-1 dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Strided4 {
    pub shape: [usize; 4],
    pub strides: [usize; 4],
    pub offset: usize,
}

impl Strided4 {
    pub fn new(shape: &[usize], strides: &[usize], offset: usize) -> Self {
        let pad = 4 - shape.len();
        let mut s = Strided4 {
            shape: [1; 4],
            strides: [0; 4],
            offset,
        };
        s.shape[pad..].copy_from_slice(shape);
        s.strides[pad..].copy_from_slice(strides);
        s
    }

    /// Element offsets (relative to the view base) in row-major order.
    fn for_each_offset(&self, mut f: impl FnMut(usize, usize)) {
        let zero = Strided4 {
            strides: [0; 4],
            ..*self
        };
        self.for_each_offset_pair(&zero, |i, off, _| f(i, off));
    }

    /// Element offsets of this view and of `other` (same shape) in row-major order, with
    /// no allocation (a copy between huge views must not need a host index buffer).
    fn for_each_offset_pair(&self, other: &Strided4, mut f: impl FnMut(usize, usize, usize)) {
        let [n0, n1, n2, n3] = self.shape;
        let [s0, s1, s2, s3] = self.strides;
        let [t0, t1, t2, t3] = other.strides;
        let mut i = 0;
        for a in 0..n0 {
            for b in 0..n1 {
                for c in 0..n2 {
                    for d in 0..n3 {
                        f(
                            i,
                            a * s0 + b * s1 + c * s2 + d * s3,
                            a * t0 + b * t1 + c * t2 + d * t3,
                        );
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Gathers a host view (base pointer already at the view's offset... not applied: `base`
/// is the buffer start) into a row-major byte slice.
///
/// # Safety
/// Every element of the view must lie inside the buffer at `base`.
pub(crate) unsafe fn host_gather(base: *mut u8, src: Strided4, esize: usize, dst: &mut [u8]) {
    let base = base.add(src.offset * esize);
    src.for_each_offset(|i, off| {
        std::ptr::copy_nonoverlapping(
            base.add(off * esize),
            dst.as_mut_ptr().add(i * esize),
            esize,
        )
    });
}

/// Copies element-wise between two host views of equal shape.
///
/// # Safety
/// Both views must lie inside their buffers.
pub(crate) unsafe fn host_copy(
    src_base: *mut u8,
    src: Strided4,
    dst_base: *mut u8,
    dst: Strided4,
    esize: usize,
) {
    let s = src_base.add(src.offset * esize);
    let d = dst_base.add(dst.offset * esize);
    src.for_each_offset_pair(&dst, |_, so, dof| {
        std::ptr::copy(s.add(so * esize), d.add(dof * esize), esize)
    });
}

/// Copies `src` into `dst` (same shape and dtype, both on `rt`'s device) with one launch.
///
/// 8-byte elements (i64) have no copy kernel of their own: when the last dimension of both
/// views is contiguous (every contiguous copy, and views narrowed or permuted in the outer
/// dimensions), each element is copied as two 4-byte halves ([`Strided4::split_elements`]);
/// other 8-byte copies are [`AttentionError::NotSupported`].
pub(crate) fn gpu_copy(rt: &Arc<GpuRuntime>, src: &DeviceTensor, dst: &DeviceTensor) -> Result<()> {
    let numel = dst.numel();
    if numel == 0 {
        return Ok(());
    }
    let (mut s, mut d) = (src.layout4(), dst.layout4());
    let mut esize = dst.dtype().size_in_bytes();
    let mut copies = numel;
    if esize == 8 {
        let halves = s
            .split_elements()
            .zip(d.split_elements())
            .zip(numel.checked_mul(2));
        let Some(((sh, dh), n)) = halves else {
            return Err(AttentionError::NotSupported {
                backend: "device copy".into(),
                reason: format!(
                    "a strided device copy of 8-byte {} elements needs a contiguous last dimension on both sides, got source strides {:?} and destination strides {:?} for shape {:?}; copy through the host or make the last dimension contiguous",
                    dst.dtype(),
                    src.strides(),
                    dst.strides(),
                    dst.shape()
                ),
            });
        };
        (s, d, esize, copies) = (sh, dh, 4, n);
    }
    let kernel = KernelId::copy_strided(esize).ok_or_else(|| AttentionError::NotSupported {
        backend: "device copy".into(),
        reason: format!(
            "element size 2, 4 or 8 bytes expected, got {esize} ({})",
            dst.dtype()
        ),
    })?;
    let params = CopyParams {
        src: src.device_ptr(),
        dst: dst.device_ptr(),
        shape: d.shape.map(|x| x as i64),
        src_strides: s.strides.map(|x| x as i64),
        dst_strides: d.strides.map(|x| x as i64),
        numel: copies as i64,
    };
    let blocks = copies.div_ceil(256).min(4096) as u32;
    rt.launch_kernel(
        kernel,
        LaunchDims::new((blocks, 1, 1), (256, 1, 1), 0),
        &params,
    )
}

impl Strided4 {
    /// The same view with every element split into two halves of half the size: the last
    /// dimension doubles (stride 1), every other stride and the offset double. `None` when
    /// the last dimension is not contiguous (size > 1 and stride != 1), where the halves of
    /// neighbouring elements would not be neighbours, or when a doubled value overflows.
    pub(crate) fn split_elements(&self) -> Option<Strided4> {
        if self.shape[3] > 1 && self.strides[3] != 1 {
            return None;
        }
        let mut out = *self;
        out.shape[3] = self.shape[3].checked_mul(2)?;
        out.strides[3] = 1;
        for i in 0..3 {
            out.strides[i] = self.strides[i].checked_mul(2)?;
        }
        out.offset = self.offset.checked_mul(2)?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copying 8-byte elements as 4-byte halves through the split layouts gives the same
    /// bytes as copying them whole (the host loop stands in for the device kernel, which
    /// reads the same shape and strides).
    #[test]
    fn split_elements_copy_the_same_bytes() {
        // A [3, 4, 5] buffer of distinct u64 values: (shape, strides, offset) views of it.
        let src: Vec<u64> = (0..60u64).map(|i| i * 0x1_0000_0001 + 7).collect();
        let views: [(&[usize], &[usize], usize); 4] = [
            (&[3, 4, 5], &[20, 5, 1], 0),
            (&[2, 4, 3], &[20, 5, 1], 21), // narrowed in every dim
            (&[4, 3, 5], &[5, 20, 1], 0),  // outer dims permuted
            (&[3, 4, 1], &[20, 5, 7], 2),  // size-1 last dim, any stride
        ];
        for (shape, strides, offset) in views {
            let s = Strided4::new(shape, strides, offset);
            let n: usize = shape.iter().product();
            let d = Strided4::new(shape, &contiguous(shape), 0);
            let (mut whole, mut halves) = (vec![0u64; n], vec![0u64; n]);
            let (sh, dh) = (s.split_elements().unwrap(), d.split_elements().unwrap());
            // SAFETY: every view lies inside its buffer.
            unsafe {
                host_copy(
                    src.as_ptr() as *mut u8,
                    s,
                    whole.as_mut_ptr() as *mut u8,
                    d,
                    8,
                );
                host_copy(
                    src.as_ptr() as *mut u8,
                    sh,
                    halves.as_mut_ptr() as *mut u8,
                    dh,
                    4,
                );
            }
            assert_eq!(whole, halves, "{shape:?} {strides:?} {offset}");
            assert_eq!(sh.shape[..3], s.shape[..3]);
            assert_eq!(sh.shape[3], 2 * s.shape[3]);
        }
        // A strided last dimension cannot be split; nor can strides that would overflow.
        assert_eq!(Strided4::new(&[4, 3], &[1, 4], 0).split_elements(), None);
        assert_eq!(
            Strided4::new(&[2, 2], &[usize::MAX / 2 + 1, 1], 0).split_elements(),
            None
        );
    }

    fn contiguous(shape: &[usize]) -> Vec<usize> {
        let mut st = vec![1; shape.len()];
        for i in (0..shape.len() - 1).rev() {
            st[i] = st[i + 1] * shape[i + 1];
        }
        st
    }
}
