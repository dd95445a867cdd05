//! The vendor-neutral face of a GPU runtime: allocation, copies, kernel launch.
//!
//! Every GPU operation in the crate goes through [`GpuRuntime`], which forwards to the
//! CUDA or HIP implementation of the device.

// Built with neither `cuda` nor `rocm`, the runtime enum is empty and every path below
// ends at an uninhabited match; that is the intended "no GPU support" build.
#![cfg_attr(
    not(any(feature = "cuda", feature = "rocm")),
    allow(unreachable_code, unused_variables, unused_mut)
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::Device;
use crate::error::{AttentionError, Result};
use crate::kernels::KernelSpec;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchDims {
    pub fn new(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> Self {
        LaunchDims {
            grid,
            block,
            shared_bytes,
        }
    }
}

/// The vendor runtime behind a device.
pub(crate) enum Vendor {
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaRuntime),
    #[cfg(feature = "rocm")]
    Hip(super::hip::HipRuntime),
}

/// A device's runtime: one context and one stream, created on first use.
pub(crate) struct GpuRuntime {
    device: Device,
    vendor: Vendor,
    graphs: Mutex<GraphUse>,
}

/// What device graphs hold on to: while a graph is being recorded or one exists, frees are
/// deferred (a graph replays with the addresses it recorded, so no buffer it may use can be
/// handed back), and the stream refuses work a graph cannot record.
#[derive(Default)]
struct GraphUse {
    capturing: bool,
    holders: usize,
    deferred: Vec<u64>,
    /// Graphs dropped while another was being recorded, destroyed when that one ends.
    dropped: Vec<GraphExec>,
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

/// An instantiated graph of the vendor runtime.
pub(crate) enum GraphExec {
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaGraph),
    #[cfg(feature = "rocm")]
    Hip(super::hip::HipGraph),
}

/// A device allocation, freed (stream-ordered) when the last tensor using it drops.
pub(crate) struct GpuBuffer {
    ptr: u64,
    bytes: usize,
    runtime: Arc<GpuRuntime>,
}

impl GpuBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn runtime(&self) -> &Arc<GpuRuntime> {
        &self.runtime
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        // A failed free cannot be reported from drop; the runtime logs nothing and moves on.
        let _ = self.runtime.free(self.ptr);
    }
}

type RuntimeMap = Mutex<HashMap<Device, Arc<GpuRuntime>>>;

fn runtimes() -> &'static RuntimeMap {
    static MAP: OnceLock<RuntimeMap> = OnceLock::new();
    MAP.get_or_init(|| Mutex::new(HashMap::new()))
}

fn unavailable(device: Device, reason: &str) -> AttentionError {
    AttentionError::DeviceUnavailable {
        device: device.to_string(),
        reason: reason.to_string(),
    }
}

impl GpuRuntime {
    /// The runtime of `device`, created on first use.
    pub fn get(device: Device) -> Result<Arc<GpuRuntime>> {
        let mut map = runtimes()
            .lock()
            .map_err(|_| unavailable(device, "runtime table poisoned"))?;
        if let Some(rt) = map.get(&device) {
            return Ok(rt.clone());
        }
        let vendor: Vendor = match device {
            Device::Cpu => return Err(unavailable(device, "the CPU has no GPU runtime")),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Vendor::Cuda(super::cuda::CudaRuntime::new(n)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(unavailable(device, "built without the `cuda` feature")),
            #[cfg(feature = "rocm")]
            Device::Hip(n) => Vendor::Hip(super::hip::HipRuntime::new(n)?),
            #[cfg(not(feature = "rocm"))]
            Device::Hip(_) => return Err(unavailable(device, "built without the `rocm` feature")),
        };
        let rt = Arc::new(GpuRuntime {
            device,
            vendor,
            graphs: Mutex::new(GraphUse::default()),
        });
        map.insert(device, rt.clone());
        Ok(rt)
    }

    /// Allocates `bytes` (at least one byte) and zeroes them on the stream.
    pub fn alloc_zeroed(self: &Arc<Self>, bytes: usize) -> Result<GpuBuffer> {
        self.refuse_while_capturing(
            "allocating device memory",
            "run the calls once before recording them, so that their buffers and workspaces exist",
        )?;
        let ptr = match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.alloc_zeroed(bytes)?,
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.alloc_zeroed(bytes)?,
        };
        Ok(GpuBuffer {
            ptr,
            bytes,
            runtime: self.clone(),
        })
    }

    fn free(&self, ptr: u64) -> Result<()> {
        if let Ok(mut g) = self.graphs.lock() {
            if g.holders > 0 {
                g.deferred.push(ptr);
                return Ok(());
            }
        }
        self.free_now(ptr)
    }

    fn free_now(&self, ptr: u64) -> Result<()> {
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.free(ptr),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.free(ptr),
        }
    }

    /// Queues a host-to-device copy; `src` may be reused when this returns.
    pub fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.refuse_while_capturing(
            "a host-to-device copy",
            "a replay would read host memory the caller no longer owns",
        )?;
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.copy_htod(dst, src),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.copy_htod(dst, src),
        }
    }

    /// Copies device memory to the host, waiting for the stream first.
    pub fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.refuse_while_capturing(
            "a device-to-host copy",
            "recorded work has not run, so there is nothing to read yet",
        )?;
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.copy_dtoh(src, dst),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.copy_dtoh(src, dst),
        }
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing(
            "synchronizing the device",
            "recorded work does not run until the graph is launched",
        )?;
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.synchronize(),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.synchronize(),
        }
    }

    /// Device name.
    pub fn name(&self) -> String {
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.name(),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.name(),
        }
    }

    /// Number of multiprocessors (CUs on AMD).
    pub fn multiprocessor_count(&self) -> u32 {
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.multiprocessor_count(),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.multiprocessor_count(),
        }
    }

    /// Whether the device runs the `mma.sync` tensor-core kernels (CUDA sm_80 and newer).
    pub fn has_mma(&self) -> bool {
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.compute_capability().0 >= 8,
            #[cfg(feature = "rocm")]
            Vendor::Hip(_) => false,
        }
    }

    /// Whether the device runs Hopper's warpgroup MMA (wgmma) kernels: CUDA sm_90 exactly
    /// (they are built for the architecture-specific target compute_90a).
    pub fn has_wgmma(&self) -> bool {
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.compute_capability() == (9, 0),
            #[cfg(feature = "rocm")]
            Vendor::Hip(_) => false,
        }
    }

    /// Largest dynamic shared memory a block may opt into.
    pub fn max_shared_bytes_per_block(&self) -> u32 {
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.max_shared_bytes_per_block(),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.max_shared_bytes_per_block(),
        }
    }

    /// Launches `spec` with one by-value argument block `params`, checking the launch.
    pub fn launch<P: bytemuck::Pod>(
        &self,
        spec: &KernelSpec,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        let bytes = bytemuck::bytes_of(params);
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.launch(spec, dims, bytes),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.launch(spec, dims, bytes),
        }?;
        // A recorded launch runs later, at the graph's launch.
        if sync_after_launch() && !self.is_capturing() {
            self.synchronize().map_err(|e| AttentionError::Runtime {
                op: format!("kernel {}", spec.name),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Device-side event timer: runs `f`, returns the elapsed device milliseconds.
    pub fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        self.refuse_while_capturing(
            "timing with device events",
            "time the graph's launches instead",
        )?;
        match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.time_ms(f),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.time_ms(f),
        }
    }

    fn graph_use(&self) -> Result<std::sync::MutexGuard<'_, GraphUse>> {
        self.graphs.lock().map_err(|_| AttentionError::Runtime {
            op: "device graph table".into(),
            detail: "poisoned lock".into(),
        })
    }

    /// Whether this device's stream is being recorded into a graph.
    pub fn is_capturing(&self) -> bool {
        self.graphs.lock().map(|g| g.capturing).unwrap_or(false)
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

    /// Records the work `f` queues on the stream and instantiates it. On success the
    /// runtime counts one more graph holding its buffers (see [`GraphUse`]) until
    /// [`release_graph`](Self::release_graph).
    pub fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<GraphExec> {
        {
            let mut g = self.graph_use()?;
            if g.capturing {
                return Err(AttentionError::GraphCapture {
                    device: self.device.to_string(),
                    op: "recording a device graph".into(),
                    reason: "another recording on this device is in progress".into(),
                });
            }
            g.capturing = true;
            g.holders += 1;
        }
        let begun = match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.begin_capture(),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.begin_capture(),
        };
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
        let ended = match self.vendor {
            #[cfg(feature = "cuda")]
            Vendor::Cuda(ref c) => c.end_capture().map(GraphExec::Cuda),
            #[cfg(feature = "rocm")]
            Vendor::Hip(ref h) => h.end_capture().map(GraphExec::Hip),
        };
        let dropped = match self.graph_use() {
            Ok(mut g) => {
                g.capturing = false;
                std::mem::take(&mut g.dropped)
            }
            Err(_) => Vec::new(),
        };
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
        match (&self.vendor, exec) {
            #[cfg(feature = "cuda")]
            (Vendor::Cuda(c), GraphExec::Cuda(g)) => c.launch_graph(g),
            #[cfg(feature = "rocm")]
            (Vendor::Hip(h), GraphExec::Hip(g)) => h.launch_graph(g),
            #[allow(unreachable_patterns)]
            _ => Err(AttentionError::DeviceMismatch {
                what: "device graph".into(),
                expected: self.device.to_string(),
                got: "a graph of another vendor".into(),
            }),
        }
    }

    /// Destroys `exec` and drops its hold on the runtime's buffers; the last holder
    /// frees what was deferred (stream-ordered, after the replays already queued).
    pub fn release_graph(&self, exec: GraphExec) {
        if let Ok(mut g) = self.graphs.lock() {
            if g.capturing {
                g.dropped.push(exec);
                return;
            }
        }
        match (&self.vendor, &exec) {
            #[cfg(feature = "cuda")]
            (Vendor::Cuda(c), GraphExec::Cuda(g)) => c.destroy_graph(g),
            #[cfg(feature = "rocm")]
            (Vendor::Hip(h), GraphExec::Hip(g)) => h.destroy_graph(g),
            #[allow(unreachable_patterns)]
            _ => {}
        }
        self.release_holder();
    }

    fn release_holder(&self) {
        let deferred = match self.graphs.lock() {
            Ok(mut g) => {
                g.holders = g.holders.saturating_sub(1);
                if g.holders == 0 {
                    std::mem::take(&mut g.deferred)
                } else {
                    Vec::new()
                }
            }
            Err(_) => Vec::new(),
        };
        for ptr in deferred {
            let _ = self.free_now(ptr);
        }
    }

    /// The device this runtime drives.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// `FORGE_ATTN_SYNC_LAUNCH=1` synchronizes after every launch so a faulting kernel is
/// reported by name (debugging aid; off by default because it stalls the pipeline).
fn sync_after_launch() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FORGE_ATTN_SYNC_LAUNCH").is_ok_and(|v| v == "1"))
}
