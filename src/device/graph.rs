//! Device graphs: a recorded sequence of device work replayed with one launch.
//!
//! A decode loop queues the same launches every step; each stream launch costs the host a
//! few microseconds and leaves a gap on the device. Recording the step once and replaying
//! the recording removes both (see BENCHMARKS.md, "Decode").

use std::sync::Arc;

use super::gpu::{GpuRuntime, GraphExec};
use super::Device;
use crate::error::{AttentionError, Result};

/// Device work recorded by [`Device::capture_graph`], replayed by [`launch`](Self::launch).
///
/// A replay runs the recorded kernels with the arguments they were recorded with: the same
/// tensors, at the same addresses, with the same shapes. What the kernels read from device
/// memory (tensor contents, a cache's device-side lengths) is read again on every replay.
/// While any graph of a device exists, the device memory of dropped tensors is returned to
/// the driver only when the last graph is dropped, so a replay never touches freed memory.
pub struct DeviceGraph {
    runtime: Arc<GpuRuntime>,
    exec: Option<GraphExec>,
}

impl DeviceGraph {
    /// Queues one replay on the device's stream (asynchronous, like any launch).
    pub fn launch(&self) -> Result<()> {
        match &self.exec {
            Some(e) => self.runtime.launch_graph(e),
            None => Err(AttentionError::Runtime {
                op: "launching a device graph".into(),
                detail: "the graph was released".into(),
            }),
        }
    }

    /// The device the graph runs on.
    pub fn device(&self) -> Device {
        self.runtime.device()
    }
}

impl Drop for DeviceGraph {
    fn drop(&mut self) {
        if let Some(e) = self.exec.take() {
            self.runtime.release_graph(e);
        }
    }
}

impl std::fmt::Debug for DeviceGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGraph")
            .field("device", &self.device())
            .finish()
    }
}

impl Device {
    /// Records the device work that `f` queues on this GPU into a [`DeviceGraph`] instead
    /// of running it; nothing runs until the graph is launched.
    ///
    /// Kernel launches are recorded. Anything a replay could not repeat is refused with
    /// [`AttentionError::GraphCapture`], and `f`'s error is returned: allocating device memory
    /// (run the calls once before recording, so their buffers and workspaces exist), copies
    /// between host and device, synchronizing, and appending to a
    /// [`KvCache`](crate::KvCache), whose host-side lengths would advance once instead of on
    /// every replay. No other thread may use the device while `f` runs: the device has one
    /// stream, so their launches would be recorded too, and the rest refused. The CPU has nothing
    /// to record: [`Device::Cpu`] gives [`AttentionError::NotSupported`].
    ///
    /// A decode step's attention over every layer's cache, recorded once and replayed each
    /// step (the caches grow outside the graph; the recording reads their lengths on the
    /// device and is cut for their capacity):
    ///
    /// ```no_run
    /// # use forge_attn::*;
    /// # fn step(backend: &GpuAttentionBackend, cfg: &AttentionConfig, q: &DeviceTensor,
    /// #         caches: &mut [KvCache], outs: &mut [DeviceTensor],
    /// #         k_new: &DeviceTensor, v_new: &DeviceTensor) -> Result<()> {
    /// let dev = backend.device();
    /// // Run once first: the calls' workspaces are made then, not while recording.
    /// for (c, o) in caches.iter().zip(outs.iter_mut()) {
    ///     backend.forward_cached(cfg, q, c, o)?;
    /// }
    /// let graph = dev.capture_graph(|| {
    ///     for (c, o) in caches.iter().zip(outs.iter_mut()) {
    ///         backend.forward_cached(cfg, q, c, o)?;
    ///     }
    ///     Ok(())
    /// })?;
    /// for _token in 0..64 {
    ///     graph.launch()?;
    ///     for c in caches.iter_mut() {
    ///         c.append(k_new, v_new)?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn capture_graph(&self, mut f: impl FnMut() -> Result<()>) -> Result<DeviceGraph> {
        if !self.is_gpu() {
            return Err(AttentionError::NotSupported {
                backend: self.to_string(),
                reason: "device graphs record GPU work; the CPU backend runs on the host".into(),
            });
        }
        let runtime = GpuRuntime::get(*self)?;
        let exec = runtime.capture(&mut f)?;
        Ok(DeviceGraph {
            runtime,
            exec: Some(exec),
        })
    }

    /// Whether this device's work is being recorded by [`capture_graph`](Self::capture_graph)
    /// right now.
    pub fn is_capturing(&self) -> bool {
        self.is_gpu() && GpuRuntime::get(*self).is_ok_and(|rt| rt.is_capturing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_nothing_to_record() {
        let mut ran = false;
        let err = Device::Cpu
            .capture_graph(|| {
                ran = true;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, AttentionError::NotSupported { .. }), "{err}");
        assert!(!ran, "the closure must not run when nothing is recorded");
        assert!(!Device::Cpu.is_capturing());
    }

    #[test]
    fn capture_errors_name_the_device_the_operation_and_the_remedy() {
        let e = AttentionError::GraphCapture {
            device: "cuda:0".into(),
            op: "allocating device memory".into(),
            reason: "run the calls once before recording them".into(),
        };
        let text = e.to_string();
        for part in ["cuda:0", "allocating device memory", "run the calls once"] {
            assert!(text.contains(part), "{text}");
        }
    }
}
