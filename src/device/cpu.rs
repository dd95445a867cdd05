//! Host memory behind tensors on [`crate::Device::Cpu`].

use std::cell::UnsafeCell;

/// A zero-initialised, 16-byte aligned host allocation shared by a tensor and its views.
///
/// Views alias one buffer the way GPU tensors alias one allocation, so access goes through
/// raw pointers; writers take `&mut DeviceTensor`, and the backends reject outputs that
/// overlap their inputs.
pub(crate) struct HostBuffer {
    data: UnsafeCell<Vec<u128>>,
    bytes: usize,
}

// SAFETY: the buffer is plain bytes; aliasing writes are ruled out at the tensor API (see above).
unsafe impl Sync for HostBuffer {}
unsafe impl Send for HostBuffer {}

impl HostBuffer {
    pub(crate) fn zeroed(bytes: usize) -> Self {
        HostBuffer {
            data: UnsafeCell::new(vec![0u128; bytes.div_ceil(16)]),
            bytes,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: only the pointer is taken; the Vec is never resized.
        unsafe { (*self.data.get()).as_mut_ptr() as *mut u8 }
    }
}
