//! Device scratch buffers kept by a backend between calls.

use std::sync::Mutex;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::tensor::DeviceTensor;

/// One f32 buffer, grown on demand and otherwise reused: work on one stream runs in
/// order, so a later call may reuse what an earlier call's kernels still read.
#[derive(Default)]
pub(crate) struct DeviceScratch {
    buf: Mutex<Option<DeviceTensor>>,
}

impl DeviceScratch {
    /// A buffer of at least `elems` f32 values on `device` (zeroed when first made).
    pub fn get(&self, device: Device, elems: usize) -> Result<DeviceTensor> {
        let mut slot = self.buf.lock().map_err(|_| AttentionError::Runtime {
            op: "device scratch".into(),
            detail: "poisoned lock".into(),
            source: None,
        })?;
        match &*slot {
            Some(t) if t.numel() >= elems => Ok(t.clone()),
            _ => {
                // Drop the old buffer first so peak memory is the new size only.
                *slot = None;
                let t = DeviceTensor::zeros(&[elems], DType::F32, device)?;
                *slot = Some(t.clone());
                Ok(t)
            }
        }
    }
}
