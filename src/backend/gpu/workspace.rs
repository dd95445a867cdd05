//! Device scratch buffers kept by a backend between calls.

use std::sync::{Arc, Mutex};

use crate::device::gpu::GpuRuntime;
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
    /// A buffer of at least `elems` f32 values, allocated (zeroed when first made) on
    /// `rt`'s stream, the one the backend queues on, so allocation, zeroing, use and free
    /// are ordered there.
    ///
    /// Growing while the stream is being captured is refused with
    /// [`AttentionError::GraphCapture`] before anything changes: neither the free of the
    /// old buffer nor the new allocation may enter the recording.
    pub fn get(&self, rt: &Arc<GpuRuntime>, elems: usize) -> Result<DeviceTensor> {
        let mut slot = self.buf.lock().map_err(|_| AttentionError::Runtime {
            op: "device scratch".into(),
            detail: "poisoned lock".into(),
            source: None,
        })?;
        match &*slot {
            Some(t) if t.numel() >= elems => Ok(t.clone()),
            _ => {
                rt.refuse_while_capturing(
                    &format!("growing the workspace to {elems} f32 values (an allocation)"),
                    "reserve the workspace first: run the same call once, or GpuAttentionBackend::reserve_* with it, before capturing",
                )?;
                // Drop the old buffer first so peak memory is the new size only.
                *slot = None;
                let t = DeviceTensor::zeros_in(rt, &[elems], DType::F32)?;
                *slot = Some(t.clone());
                Ok(t)
            }
        }
    }
}
