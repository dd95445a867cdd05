//! The contract between the crate and a vendor's GPU runtime.
//!
//! [`GpuDriver`] is what a runtime (CUDA in `cuda.rs`, HIP in `hip.rs`) provides for one
//! device with one stream: memory, copies, kernels, synchronization, events and graphs,
//! and the properties the backend plans with. Everything vendor-independent (the runtime
//! table, buffer ownership, graph bookkeeping, refusals while recording) is built on top of
//! it once, in `gpu.rs` and `graph.rs`.

// Built with neither `cuda` nor `rocm`, nothing implements the contract.
#![cfg_attr(not(any(feature = "cuda", feature = "rocm")), allow(dead_code))]

use std::ffi::c_void;

use super::launch::LaunchDims;
use super::tensor_map::TensorMapDesc;
use crate::error::Result;
use crate::kernels::abi::TensorMap;
use crate::kernels::{KernelId, KernelSpec};

/// A vendor stream handle (`CUstream`, `hipStream_t`) as an untyped pointer.
pub(crate) type RawStream = *mut c_void;

/// What the driver knows of a device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PointerInfo {
    /// Ordinal of the device the memory is on; `None` for host memory the driver knows
    /// (pinned, registered, or system memory it can map).
    pub ordinal: Option<usize>,
    /// Start and size in bytes of the allocation holding the address, where the driver
    /// reports it.
    pub range: Option<(u64, usize)>,
}

/// One device's runtime: a context (or selected device) and one stream that all work is
/// queued on, in order. Device addresses are plain `u64`s.
///
/// Every operation that touches the device first makes it current on the calling thread
/// ([`bind`](Self::bind), which asks before it sets), so a driver may be used from any
/// thread.
pub(crate) trait GpuDriver: Send + Sync {
    /// A kernel entry point, ready to launch.
    type Function: Copy;
    /// An instantiated graph of recorded work.
    type Graph: Send + Sync;

    /// Device name with its architecture, for [`Device::describe`](super::Device::describe).
    fn name(&self) -> String;
    /// Number of multiprocessors (CUs on AMD).
    fn multiprocessor_count(&self) -> u32;
    /// Largest dynamic shared memory a block may use (opted into where the vendor needs it).
    fn max_shared_bytes_per_block(&self) -> u32;
    /// Whether the device runs the `mma.sync` tensor-core kernels.
    fn has_mma(&self) -> bool;
    /// Whether the device runs the warpgroup MMA (wgmma) kernels.
    fn has_wgmma(&self) -> bool;
    /// The tensor map of `desc` (checked by [`TensorMapDesc::check`] first), encoded by the
    /// driver: host work only, nothing is queued. Refused where the device has no TMA.
    fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<TensorMap>;

    /// Makes the device current on the calling thread, where it is not already (the
    /// common case: asking is cheaper than setting).
    fn bind(&self) -> Result<()>;

    /// Allocates `bytes` (at least one byte) and zeroes them on the stream before any
    /// later work; [`AttentionError::OutOfMemory`](crate::AttentionError::OutOfMemory)
    /// when the device has no room.
    fn alloc_zeroed(&self, bytes: usize) -> Result<u64>;
    /// Frees an allocation of [`alloc_zeroed`](Self::alloc_zeroed) after the work queued so
    /// far that may use it.
    fn free(&self, ptr: u64) -> Result<()>;
    /// Queues a host-to-device copy; `src` may be reused when this returns.
    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies device memory to the host; the bytes are in `dst` when this returns.
    fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Waits for all work queued on the stream.
    fn synchronize(&self) -> Result<()>;

    /// The entry point of `spec`, its module loaded on first use, able to run with
    /// `shared_bytes` of dynamic shared memory (refused with
    /// [`AttentionError::NotSupported`](crate::AttentionError::NotSupported) past the
    /// device's limit).
    fn function(&self, spec: &KernelSpec, shared_bytes: u32) -> Result<Self::Function>;
    /// [`function`](Self::function) of the catalog kernel `id`, from a fixed table once
    /// loaded (no spec, no hash, no lock).
    fn function_of(&self, id: KernelId, shared_bytes: u32) -> Result<Self::Function>;
    /// Queues `func` with its one by-value argument block `params` (copied before this
    /// returns); `name` names the kernel in errors.
    fn launch_function(
        &self,
        func: Self::Function,
        name: &str,
        dims: LaunchDims,
        params: &[u8],
    ) -> Result<()>;
    /// Queues `spec` on the stream: [`bind`](Self::bind), [`function`](Self::function),
    /// [`launch_function`](Self::launch_function).
    fn launch(&self, spec: &KernelSpec, dims: LaunchDims, params: &[u8]) -> Result<()> {
        self.bind()?;
        let func = self.function(spec, dims.shared_bytes)?;
        self.launch_function(func, &spec.name, dims, params)
    }
    /// [`launch`](Self::launch) of the catalog kernel `id` through
    /// [`function_of`](Self::function_of).
    fn launch_id(&self, id: KernelId, dims: LaunchDims, params: &[u8]) -> Result<()> {
        self.bind()?;
        let func = self.function_of(id, dims.shared_bytes)?;
        self.launch_function(func, id.name(), dims, params)
    }

    /// Runs `f` between two events recorded on the stream and returns the device
    /// milliseconds between them.
    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32>;

    /// Starts recording the stream's work instead of running it (relaxed mode: module
    /// loads and attribute changes while recording are allowed).
    fn begin_capture(&self) -> Result<()>;
    /// Stops recording and instantiates what was recorded.
    fn end_capture(&self) -> Result<Self::Graph>;
    /// Queues one replay of `g` on the stream.
    fn launch_graph(&self, g: &Self::Graph) -> Result<()>;
    /// Destroys `g`; replays already queued still run.
    fn destroy_graph(&self, g: &Self::Graph);

    /// A driver of the same device (and context) that queues everything on `stream`, a
    /// stream of the caller's that is never destroyed here, sharing this driver's loaded
    /// kernels.
    fn on_stream(&self, stream: RawStream) -> Result<Self>
    where
        Self: Sized;
    /// The stream handle work is queued on.
    fn raw_stream(&self) -> RawStream;
    /// Whether the stream is being captured into a graph, by anyone (the driver's answer,
    /// not the crate's own bookkeeping).
    fn stream_capturing(&self) -> Result<bool>;
    /// The device and allocation of `ptr`; an error when the driver does not know it as
    /// device memory.
    fn pointer_info(&self, ptr: u64) -> Result<PointerInfo>;
}
