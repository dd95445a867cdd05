//! Device graphs: a recorded sequence of device work replayed with one launch.
//!
//! A decode loop queues the same launches every step; each stream launch costs the host a
//! few microseconds and leaves a gap on the device. Recording the step once and replaying
//! the recording removes both (see BENCHMARKS.md, "Decode").
//!
//! The runtime's side of recording is here too: which device is recording, the frees held
//! back while a graph may replay, and graphs dropped during a recording.

// Built with neither `cuda` nor `rocm`, no graph can exist (see gpu.rs).
#![cfg_attr(
    not(any(feature = "cuda", feature = "rocm")),
    allow(unreachable_code, unused_variables)
)]

use std::sync::{Arc, MutexGuard};

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
                source: None,
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

/// What device graphs hold on to: while a graph is being recorded or one exists, frees are
/// deferred (a graph replays with the addresses it recorded, so no buffer it may use can be
/// handed back), and the stream refuses work a graph cannot record.
#[derive(Default)]
pub(crate) struct GraphUse {
    capturing: bool,
    holders: usize,
    deferred: Vec<u64>,
    /// Graphs dropped while another was being recorded, destroyed when that one ends.
    dropped: Vec<GraphExec>,
}

impl GraphUse {
    /// Starts a recording, which holds buffers like a graph; false when one is in progress.
    fn begin(&mut self) -> bool {
        if self.capturing {
            return false;
        }
        self.capturing = true;
        self.holders += 1;
        true
    }

    /// Keeps `ptr` for the last holder's release while any graph may use it; whether kept.
    fn defer_free(&mut self, ptr: u64) -> bool {
        if self.holders > 0 {
            self.deferred.push(ptr);
        }
        self.holders > 0
    }

    /// Ends the recording; the graphs dropped during it, to destroy now.
    fn end(&mut self) -> Vec<GraphExec> {
        self.capturing = false;
        std::mem::take(&mut self.dropped)
    }

    /// Keeps `exec` for the end of the recording in progress, else hands it back.
    fn defer_drop(&mut self, exec: GraphExec) -> Option<GraphExec> {
        if self.capturing {
            self.dropped.push(exec);
            return None;
        }
        Some(exec)
    }

    /// One holder fewer; the frees it was the last to hold back.
    fn release_holder(&mut self) -> Vec<u64> {
        self.holders = self.holders.saturating_sub(1);
        if self.holders == 0 {
            std::mem::take(&mut self.deferred)
        } else {
            Vec::new()
        }
    }
}

/// Ends the recording of [`GpuRuntime::capture`] once: through [`end`](Self::end), or on
/// drop when the closure panicked (the graph is then discarded with its hold on buffers).
struct EndCapture<'a> {
    rt: &'a GpuRuntime,
    done: bool,
}

impl EndCapture<'_> {
    fn end(&mut self) -> Result<GraphExec> {
        self.done = true;
        self.rt.end_capture()
    }
}

impl Drop for EndCapture<'_> {
    fn drop(&mut self) {
        if !self.done {
            match self.rt.end_capture() {
                Ok(exec) => self.rt.release_graph(exec),
                Err(_) => self.rt.release_holder(),
            }
        }
    }
}

impl GpuRuntime {
    fn graph_use(&self) -> Result<MutexGuard<'_, GraphUse>> {
        self.graphs.lock().map_err(|_| AttentionError::Runtime {
            op: "device graph table".into(),
            detail: "poisoned lock".into(),
            source: None,
        })
    }

    /// Whether this runtime's stream is being recorded into a graph: by
    /// [`Device::capture_graph`], or, for a caller's stream, by anyone (asked of the
    /// driver).
    pub fn is_capturing(&self) -> bool {
        self.graphs.lock().map(|g| g.capturing).unwrap_or(false)
            || (self.is_external() && self.driver_capturing())
    }

    /// The error for `op` while recording, else Ok.
    pub fn refuse_while_capturing(&self, op: &str, reason: &str) -> Result<()> {
        if self.is_capturing() {
            return Err(AttentionError::GraphCapture {
                device: self.device.to_string(),
                op: op.to_string(),
                reason: reason.to_string(),
            });
        }
        Ok(())
    }

    /// Keeps `ptr` to be freed by the last graph's release while any graph holds buffers;
    /// whether it was kept.
    pub(super) fn defer_free(&self, ptr: u64) -> bool {
        self.graphs.lock().is_ok_and(|mut g| g.defer_free(ptr))
    }

    /// Records the work `f` queues on the stream and instantiates it. On success the
    /// runtime counts one more graph holding its buffers (see [`GraphUse`]) until
    /// [`release_graph`](Self::release_graph).
    pub fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<GraphExec> {
        if !self.graph_use()?.begin() {
            return Err(AttentionError::GraphCapture {
                device: self.device.to_string(),
                op: "recording a device graph".into(),
                reason: "another recording on this device is in progress".into(),
            });
        }
        let begun = self.driver.begin_capture();
        // End the recording whatever happens, a panic in `f` included, so the stream runs
        // work again.
        let mut ending = EndCapture {
            rt: self,
            done: false,
        };
        let ran = begun.and_then(|_| f());
        let ended = ending.end();
        match (ran, ended) {
            (Ok(()), Ok(exec)) => Ok(exec),
            (Err(e), Ok(exec)) => {
                self.release_graph(exec);
                Err(e)
            }
            (Err(e), Err(_)) | (Ok(()), Err(e)) => {
                self.release_holder();
                Err(e)
            }
        }
    }

    /// Ends a recording: the vendor's end-of-capture, then the runtime's state.
    fn end_capture(&self) -> Result<GraphExec> {
        let ended = self.driver.end_capture();
        let dropped = self.graph_use().map(|mut g| g.end()).unwrap_or_default();
        for exec in dropped {
            self.release_graph(exec);
        }
        ended
    }

    /// Queues one replay of `exec`.
    pub fn launch_graph(&self, exec: &GraphExec) -> Result<()> {
        self.refuse_while_capturing(
            "launching a device graph",
            "graphs are launched outside of recordings",
        )?;
        self.driver.launch_graph(exec).unwrap_or_else(|| {
            Err(AttentionError::DeviceMismatch {
                what: "device graph".into(),
                expected: self.device.to_string(),
                got: "a graph of another vendor".into(),
            })
        })
    }

    /// Destroys `exec` and drops its hold on the runtime's buffers; the last holder
    /// frees what was deferred (stream-ordered, after the replays already queued).
    pub fn release_graph(&self, exec: GraphExec) {
        let exec = match self.graphs.lock() {
            Ok(mut g) => g.defer_drop(exec),
            // Poisoned: nothing can be deferred any more, so destroy it now.
            Err(_) => Some(exec),
        };
        if let Some(exec) = exec {
            self.driver.destroy_graph(&exec);
            self.release_holder();
        }
    }

    fn release_holder(&self) {
        let deferred = self
            .graphs
            .lock()
            .map(|mut g| g.release_holder())
            .unwrap_or_default();
        for ptr in deferred {
            let _ = self.free_now(ptr);
        }
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
    fn frees_wait_for_the_last_holder() {
        let mut g = GraphUse::default();
        assert!(!g.defer_free(1), "no graph: freed at once");
        assert!(g.begin());
        assert!(!g.begin(), "a second recording while one is in progress");
        assert!(g.defer_free(2));
        assert!(g.end().is_empty());
        assert!(!g.capturing);
        // The recorded graph still holds buffers; a second recording adds a holder.
        assert!(g.defer_free(3));
        assert!(g.begin());
        assert!(g.end().is_empty());
        assert_eq!(g.release_holder(), Vec::<u64>::new(), "one graph left");
        assert!(g.defer_free(4));
        assert_eq!(g.release_holder(), vec![2, 3, 4]);
        assert!(!g.defer_free(5), "no graph left: freed at once");
        // A release too many cannot wrap the count.
        assert!(g.release_holder().is_empty());
        assert_eq!(g.holders, 0);
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
