//! Strided element copies between views: host loops and one device kernel.

use std::sync::Arc;

use crate::device::{gpu::GpuRuntime, launch::LaunchDims};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::CopyParams;
use crate::kernels::catalog;

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
pub(crate) fn gpu_copy(rt: &Arc<GpuRuntime>, src: &DeviceTensor, dst: &DeviceTensor) -> Result<()> {
    let numel = dst.numel();
    if numel == 0 {
        return Ok(());
    }
    let esize = dst.dtype().size_in_bytes();
    let spec = catalog::copy_strided(esize).ok_or_else(|| AttentionError::NotSupported {
        backend: "device copy".into(),
        reason: format!("element size 2 or 4 bytes expected, got {esize}"),
    })?;
    let (s, d) = (src.layout4(), dst.layout4());
    let params = CopyParams {
        src: src.device_ptr(),
        dst: dst.device_ptr(),
        shape: d.shape.map(|x| x as i64),
        src_strides: s.strides.map(|x| x as i64),
        dst_strides: d.strides.map(|x| x as i64),
        numel: numel as i64,
    };
    let blocks = numel.div_ceil(256).min(4096) as u32;
    rt.launch(
        &spec,
        LaunchDims::new((blocks, 1, 1), (256, 1, 1), 0),
        &params,
    )
}
