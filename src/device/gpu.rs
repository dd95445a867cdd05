//! The vendor-neutral face of a GPU runtime: allocation, copies, kernel launch.
//!
//! Every GPU operation in the crate goes through [`GpuRuntime`], which forwards to the
//! [`GpuDriver`] of the device's vendor (CUDA or HIP) and adds what is the same for every
//! vendor: the runtime table, buffer ownership, refusals while a graph is recorded (the
//! recording's bookkeeping is in `graph.rs`) and the synchronize after launches that
//! `FORGE_ATTN_SYNC_LAUNCH` asks for.

// Built with neither `cuda` nor `rocm`, the runtime enum is empty and every path below
// ends at an uninhabited match; that is the intended "no GPU support" build.
#![cfg_attr(
    not(any(feature = "cuda", feature = "rocm")),
    allow(unreachable_code, unused_variables, unused_mut, unused_imports)
)]

use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(not(all(feature = "cuda", feature = "rocm")))]
use super::built_without;
use super::driver::{GpuDriver, PointerInfo, RawStream};
use super::graph::GraphUse;
use super::launch::LaunchDims;
use super::tensor_map::TensorMapDesc;
use super::{gpu_unavailable, Device, Lease};
use crate::error::{AttentionError, Result};
use crate::kernels::abi::TensorMap;
use crate::kernels::{KernelId, KernelSpec};

/// The vendor runtime behind a device. An enum rather than a trait object so that a launch
/// costs one branch and no indirect call, and each vendor's graph type stays its own.
pub(crate) enum Driver {
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaRuntime),
    #[cfg(feature = "rocm")]
    Hip(super::hip::HipRuntime),
}

/// `on_driver!(self.driver, d => expr)`: `expr` with `d` bound to the [`GpuDriver`] of
/// whichever vendor `self.driver` holds.
macro_rules! on_driver {
    ($driver:expr, $d:ident => $body:expr) => {
        match $driver {
            #[cfg(feature = "cuda")]
            Driver::Cuda(ref $d) => $body,
            #[cfg(feature = "rocm")]
            Driver::Hip(ref $d) => $body,
        }
    };
}

/// An instantiated graph of the vendor runtime.
pub(crate) enum GraphExec {
    #[cfg(feature = "cuda")]
    Cuda(<super::cuda::CudaRuntime as GpuDriver>::Graph),
    #[cfg(feature = "rocm")]
    Hip(<super::hip::HipRuntime as GpuDriver>::Graph),
}

impl Driver {
    /// Starts recording the stream's work instead of running it.
    pub(super) fn begin_capture(&self) -> Result<()> {
        on_driver!(*self, d => d.begin_capture())
    }

    /// Stops recording and instantiates what was recorded.
    pub(super) fn end_capture(&self) -> Result<GraphExec> {
        match *self {
            #[cfg(feature = "cuda")]
            Driver::Cuda(ref c) => c.end_capture().map(GraphExec::Cuda),
            #[cfg(feature = "rocm")]
            Driver::Hip(ref h) => h.end_capture().map(GraphExec::Hip),
        }
    }

    /// Queues one replay of `exec`; `None` when `exec` is another vendor's graph.
    pub(super) fn launch_graph(&self, exec: &GraphExec) -> Option<Result<()>> {
        match (self, exec) {
            #[cfg(feature = "cuda")]
            (Driver::Cuda(c), GraphExec::Cuda(g)) => Some(c.launch_graph(g)),
            #[cfg(feature = "rocm")]
            (Driver::Hip(h), GraphExec::Hip(g)) => Some(h.launch_graph(g)),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Destroys `exec` (nothing for another vendor's graph).
    pub(super) fn destroy_graph(&self, exec: &GraphExec) {
        match (self, exec) {
            #[cfg(feature = "cuda")]
            (Driver::Cuda(c), GraphExec::Cuda(g)) => c.destroy_graph(g),
            #[cfg(feature = "rocm")]
            (Driver::Hip(h), GraphExec::Hip(g)) => h.destroy_graph(g),
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
}

/// A device's runtime: one context and one stream. The device's own (private) stream is
/// created on first use ([`GpuRuntime::get`]); a caller's stream gets a runtime of its
/// own ([`GpuRuntime::for_stream`]) that shares the device's context and loaded kernels.
pub(crate) struct GpuRuntime {
    pub(super) device: Device,
    pub(super) driver: Driver,
    pub(super) graphs: Mutex<GraphUse>,
    /// Set for a caller's stream.
    external: Option<ExternalStream>,
}

/// What a runtime on a caller's stream keeps besides the driver.
struct ExternalStream {
    /// Frees asked for while the stream was being captured: queued then, they would be
    /// recorded into the caller's graph. Freed at the next free outside a capture, or when
    /// the runtime drops.
    pending: Mutex<Vec<u64>>,
    /// Whatever keeps the stream alive (a cudarc stream), dropped with the runtime.
    _keep: Option<Arc<dyn Any + Send + Sync>>,
}

/// Who frees a [`GpuBuffer`]'s memory.
enum Ownership {
    /// Allocated by the runtime; freed (stream-ordered) when the buffer drops.
    Owned,
    /// Lent by the caller: never freed here. `owner` (if any) drops with the buffer;
    /// `lease` (if any) ends when the lender's guard drops.
    Borrowed {
        _owner: Option<Arc<dyn Any + Send + Sync>>,
        lease: Option<Arc<Lease>>,
        read_only: bool,
    },
}

/// Device memory behind tensors: an allocation of the runtime, freed (stream-ordered) when
/// the last tensor using it drops, or memory lent by the caller, which is never freed here.
pub(crate) struct GpuBuffer {
    ptr: u64,
    bytes: usize,
    runtime: Arc<GpuRuntime>,
    ownership: Ownership,
}

impl GpuBuffer {
    /// `bytes` bytes at `ptr` lent by the caller; never freed here.
    ///
    /// # Safety
    /// `ptr` spans `bytes` bytes of device memory of `runtime`'s device that stay valid
    /// while `owner` is alive, or until `lease` ends when one is given (and, for work
    /// queued before then, until that work has run).
    pub(crate) unsafe fn borrowed(
        ptr: u64,
        bytes: usize,
        runtime: Arc<GpuRuntime>,
        read_only: bool,
        owner: Option<Arc<dyn Any + Send + Sync>>,
        lease: Option<Arc<Lease>>,
    ) -> Self {
        GpuBuffer {
            ptr,
            bytes,
            runtime,
            ownership: Ownership::Borrowed {
                _owner: owner,
                lease,
                read_only,
            },
        }
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn runtime(&self) -> &Arc<GpuRuntime> {
        &self.runtime
    }
    /// Whether the memory was lent by the caller.
    pub fn is_borrowed(&self) -> bool {
        matches!(self.ownership, Ownership::Borrowed { .. })
    }
    /// Whether the memory was lent read-only.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self.ownership,
            Ownership::Borrowed {
                read_only: true,
                ..
            }
        )
    }
    /// Whether the memory was lent for a lifetime that has ended.
    pub fn lease_ended(&self) -> bool {
        match &self.ownership {
            Ownership::Borrowed { lease: Some(l), .. } => l.has_ended(),
            _ => false,
        }
    }
    /// Ends the lease of borrowed memory (nothing for owned memory).
    pub fn end_lease(&self) {
        if let Ownership::Borrowed { lease: Some(l), .. } = &self.ownership {
            l.end();
        }
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if matches!(self.ownership, Ownership::Owned) {
            // A failed free cannot be reported from drop; the runtime logs nothing and
            // moves on.
            let _ = self.runtime.free(self.ptr);
        }
    }
}

impl Drop for GpuRuntime {
    fn drop(&mut self) {
        let Some(ext) = &self.external else { return };
        let pending = std::mem::take(&mut *ext.pending.lock().unwrap_or_else(|e| e.into_inner()));
        // Still capturing: queued frees would be recorded, so the memory is left behind.
        if pending.is_empty() || self.driver_capturing() {
            return;
        }
        for ptr in pending {
            let _ = self.free_now(ptr);
        }
    }
}

thread_local! {
    /// Set while [`GpuRuntime::dry_run`] runs on this thread.
    static DRY_RUN: Cell<bool> = const { Cell::new(false) };
}

type RuntimeMap = Mutex<HashMap<Device, Arc<GpuRuntime>>>;

fn runtimes() -> &'static RuntimeMap {
    static MAP: OnceLock<RuntimeMap> = OnceLock::new();
    MAP.get_or_init(|| Mutex::new(HashMap::new()))
}

impl GpuRuntime {
    /// The runtime of `device`, created on first use.
    pub fn get(device: Device) -> Result<Arc<GpuRuntime>> {
        let mut map = runtimes()
            .lock()
            .map_err(|_| gpu_unavailable(device, "runtime table poisoned".into()))?;
        if let Some(rt) = map.get(&device) {
            return Ok(rt.clone());
        }
        let driver: Driver = match device {
            Device::Cpu => {
                return Err(gpu_unavailable(device, "the CPU has no GPU runtime".into()))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Driver::Cuda(super::cuda::CudaRuntime::new(n)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(built_without(device, "cuda")),
            #[cfg(feature = "rocm")]
            Device::Hip(n) => Driver::Hip(super::hip::HipRuntime::new(n)?),
            #[cfg(not(feature = "rocm"))]
            Device::Hip(_) => return Err(built_without(device, "rocm")),
        };
        let rt = Arc::new(GpuRuntime {
            device,
            driver,
            graphs: Mutex::new(GraphUse::default()),
            external: None,
        });
        map.insert(device, rt.clone());
        Ok(rt)
    }

    /// A runtime of `device` queuing everything on the caller's `stream` (never destroyed
    /// here); `keep` is held as long as the runtime, for what keeps the stream alive.
    ///
    /// # Safety
    /// `stream` is a live stream of `device` (for CUDA, of its primary context; the
    /// null handle names the legacy default stream) and stays live as long as the
    /// runtime, and every buffer allocated through it, exists.
    pub unsafe fn for_stream(
        device: Device,
        stream: RawStream,
        keep: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<Arc<GpuRuntime>> {
        let base = Self::get(device)?;
        let driver = match base.driver {
            #[cfg(feature = "cuda")]
            Driver::Cuda(ref c) => Driver::Cuda(c.on_stream(stream)?),
            #[cfg(feature = "rocm")]
            Driver::Hip(ref h) => Driver::Hip(h.on_stream(stream)?),
        };
        Ok(Arc::new(GpuRuntime {
            device,
            driver,
            graphs: Mutex::new(GraphUse::default()),
            external: Some(ExternalStream {
                pending: Mutex::new(Vec::new()),
                _keep: keep,
            }),
        }))
    }

    /// Whether this runtime queues on a caller's stream rather than the device's own.
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// The stream handle work is queued on.
    pub fn raw_stream(&self) -> RawStream {
        on_driver!(self.driver, d => d.raw_stream())
    }

    /// Whether the driver reports the stream as captured (a failed query counts as
    /// captured: refusing is the safe answer).
    pub(super) fn driver_capturing(&self) -> bool {
        let capturing: Result<bool> = on_driver!(self.driver, d => d.stream_capturing());
        capturing.unwrap_or(true)
    }

    /// The device and allocation of `ptr` as the driver knows it.
    pub fn pointer_info(&self, ptr: u64) -> Result<PointerInfo> {
        on_driver!(self.driver, d => d.pointer_info(ptr))
    }

    /// Runs `f` with this thread's kernel launches loaded but not queued: the calls in `f`
    /// make their workspaces and load their kernels, and compute nothing.
    pub fn dry_run<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                DRY_RUN.with(|d| d.set(self.0));
            }
        }
        let _reset = Reset(DRY_RUN.with(|d| d.replace(true)));
        f()
    }

    /// Allocates `bytes` (at least one byte) and zeroes them on the stream.
    pub fn alloc_zeroed(self: &Arc<Self>, bytes: usize) -> Result<GpuBuffer> {
        self.refuse_while_capturing(
            "allocating device memory",
            "run the calls once before recording them, so that their buffers and workspaces exist",
        )?;
        let ptr = on_driver!(self.driver, d => d.alloc_zeroed(bytes)?);
        Ok(GpuBuffer {
            ptr,
            bytes,
            runtime: self.clone(),
            ownership: Ownership::Owned,
        })
    }

    fn free(&self, ptr: u64) -> Result<()> {
        if self.defer_free(ptr) {
            return Ok(());
        }
        if let Some(ext) = &self.external {
            let mut pending = ext.pending.lock().unwrap_or_else(|e| e.into_inner());
            if self.driver_capturing() {
                pending.push(ptr);
                return Ok(());
            }
            for p in std::mem::take(&mut *pending) {
                let _ = self.free_now(p);
            }
        }
        self.free_now(ptr)
    }

    /// Frees `ptr` whatever graphs exist (see [`GraphUse`]).
    pub(super) fn free_now(&self, ptr: u64) -> Result<()> {
        on_driver!(self.driver, d => d.free(ptr))
    }

    /// Queues a host-to-device copy; `src` may be reused when this returns.
    pub fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.refuse_while_capturing(
            "a host-to-device copy",
            "a replay would read host memory the caller no longer owns",
        )?;
        on_driver!(self.driver, d => d.copy_htod(dst, src))
    }

    /// Copies device memory to the host, waiting for the stream first.
    pub fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.refuse_while_capturing(
            "a device-to-host copy",
            "recorded work has not run, so there is nothing to read yet",
        )?;
        on_driver!(self.driver, d => d.copy_dtoh(src, dst))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing(
            "synchronizing the device",
            "recorded work does not run until the graph is launched",
        )?;
        on_driver!(self.driver, d => d.synchronize())
    }

    /// Device name.
    pub fn name(&self) -> String {
        on_driver!(self.driver, d => d.name())
    }

    /// Number of multiprocessors (CUs on AMD).
    pub fn multiprocessor_count(&self) -> u32 {
        on_driver!(self.driver, d => d.multiprocessor_count())
    }

    /// Whether the device runs the `mma.sync` tensor-core kernels (CUDA sm_80 and newer).
    pub fn has_mma(&self) -> bool {
        on_driver!(self.driver, d => d.has_mma())
    }

    /// Whether the device runs Hopper's warpgroup MMA (wgmma) kernels: CUDA sm_90 exactly
    /// (they are built for the architecture-specific target compute_90a).
    pub fn has_wgmma(&self) -> bool {
        on_driver!(self.driver, d => d.has_wgmma())
    }

    /// The TMA tensor map of `desc` ([`GpuDriver::encode_tensor_map`]).
    pub(crate) fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<TensorMap> {
        on_driver!(self.driver, d => d.encode_tensor_map(desc))
    }

    /// Largest dynamic shared memory a block may opt into.
    pub fn max_shared_bytes_per_block(&self) -> u32 {
        on_driver!(self.driver, d => d.max_shared_bytes_per_block())
    }

    /// Launches `spec` with one by-value argument block `params`, checking the launch.
    pub fn launch<P: bytemuck::Pod>(
        &self,
        spec: &KernelSpec,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        self.launch_with(
            || spec.name.as_str(),
            |d| on_driver!(*d, d => { d.bind()?; d.function(spec, dims.shared_bytes).map(|_| ()) }),
            |d| on_driver!(*d, d => d.launch(spec, dims, bytemuck::bytes_of(params))),
        )
    }

    /// [`launch`](Self::launch) of the catalog kernel `id`: its function comes from the
    /// driver's fixed table, and nothing is allocated or formatted unless the launch fails.
    pub fn launch_kernel<P: bytemuck::Pod>(
        &self,
        id: KernelId,
        dims: LaunchDims,
        params: &P,
    ) -> Result<()> {
        self.launch_with(
            || id.name(),
            |d| on_driver!(*d, d => { d.bind()?; d.function_of(id, dims.shared_bytes).map(|_| ()) }),
            |d| on_driver!(*d, d => d.launch_id(id, dims, bytemuck::bytes_of(params))),
        )
    }

    /// A launch: `queue` it, or under [`dry_run`](Self::dry_run) only `load` it (and opt it
    /// into its shared memory) so that a later recording of the same call needs neither;
    /// synchronized after when `FORGE_ATTN_SYNC_LAUNCH` asks, the error naming the kernel.
    #[inline]
    fn launch_with<'n>(
        &self,
        name: impl FnOnce() -> &'n str,
        load: impl FnOnce(&Driver) -> Result<()>,
        queue: impl FnOnce(&Driver) -> Result<()>,
    ) -> Result<()> {
        if DRY_RUN.with(|d| d.get()) {
            return load(&self.driver);
        }
        queue(&self.driver)?;
        // A recorded launch runs later, at the graph's launch.
        if sync_after_launch() && !self.is_capturing() {
            self.synchronize().map_err(|e| AttentionError::Runtime {
                op: format!("kernel {}", name()),
                detail: e.to_string(),
                source: Some(crate::error::ErrorSource::new(e)),
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
        on_driver!(self.driver, d => d.time_ms(f))
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
