//! [`GpuStream`]: the stream a backend (or a tensor made from borrowed memory) queues its
//! work on, the device's own or one the caller names.

// Built with neither `cuda` nor `rocm`, no stream can be made (see gpu.rs).
#![cfg_attr(
    not(any(feature = "cuda", feature = "rocm")),
    allow(unreachable_code, unused_variables)
)]

use std::ffi::c_void;
use std::sync::Arc;

use super::gpu::GpuRuntime;
use super::{gpu_unavailable, Device};
#[cfg(feature = "cuda")]
use crate::error::AttentionError;
use crate::error::Result;

/// A stream of a GPU device. Everything queued through it (kernels, copies, workspace
/// allocations and frees) is ordered on that stream only, and nothing synchronizes it
/// unless asked to ([`synchronize`](Self::synchronize), a download to the host).
///
/// [`GpuStream::default_for`] is the device's own stream, which
/// [`GpuAttentionBackend::new`](crate::GpuAttentionBackend::new) and
/// [`DeviceTensor::zeros`](crate::DeviceTensor::zeros) use; [`GpuStream::from_raw`] and
/// (feature `cuda`) [`GpuStream::from_cudarc`] name a stream of the caller's, so that
/// forge-attn's work is ordered with the caller's own and can be recorded in the caller's
/// graph. A caller's stream never becomes the default of anything else: only the backends
/// and tensors made with it use it.
///
/// Cloning is cheap (one shared handle). Streams of one device share its loaded kernels,
/// and backends on different streams may run on different threads at once.
#[derive(Clone)]
pub struct GpuStream {
    runtime: Arc<GpuRuntime>,
}

impl std::fmt::Debug for GpuStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStream")
            .field("device", &self.device())
            .field("raw", &self.raw())
            .field("is_default", &self.is_default())
            .finish()
    }
}

impl GpuStream {
    /// The device's own stream (created on first use), the one every call uses unless it
    /// names another.
    pub fn default_for(device: Device) -> Result<Self> {
        if !device.is_gpu() {
            return Err(gpu_unavailable(
                device,
                "streams belong to GPUs; the CPU has none".into(),
            ));
        }
        Ok(GpuStream {
            runtime: GpuRuntime::get(device)?,
        })
    }

    /// Wraps the caller's stream handle: a `CUstream` for [`Device::Cuda`], a
    /// `hipStream_t` for [`Device::Hip`], cast to a pointer. The null handle names the
    /// legacy default stream (CUDA) or the null stream (HIP).
    ///
    /// On CUDA the stream must belong to the device's primary context (the one cudarc's
    /// `CudaContext::new` and the CUDA runtime API use); a stream of another context is
    /// [`AttentionError::DeviceMismatch`]. HIP streams carry no device that can be asked,
    /// so on HIP the device is taken as given.
    ///
    /// # Safety
    /// `stream` is a live stream of `device` and stays live as long as this value, its
    /// clones, and every backend and tensor made with them exist (forge-attn never
    /// destroys it).
    pub unsafe fn from_raw(device: Device, stream: *mut c_void) -> Result<Self> {
        if !device.is_gpu() {
            return Err(gpu_unavailable(
                device,
                "streams belong to GPUs; the CPU has none".into(),
            ));
        }
        // SAFETY: forwarded from the caller.
        let runtime = unsafe { GpuRuntime::for_stream(device, stream, None)? };
        Ok(GpuStream { runtime })
    }

    /// The device-side stream of a cudarc `CudaStream`, kept alive as long as this value
    /// (and whatever was made with it) exists. The stream's context must be the device's
    /// primary context (`CudaContext::new`); any other is
    /// [`AttentionError::DeviceMismatch`].
    ///
    /// cudarc's own event tracking (multi-stream mode) does not see the work forge-attn
    /// queues: order it with cudarc's work on other streams yourself, or queue both on
    /// this one.
    #[cfg(feature = "cuda")]
    pub fn from_cudarc(stream: &Arc<cudarc::driver::CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let device = Device::Cuda(ctx.ordinal());
        if !ctx.is_primary() {
            return Err(AttentionError::DeviceMismatch {
                what: "cudarc stream".into(),
                expected: format!("a stream of the primary context of {device}"),
                got: "a stream of a non-primary context".into(),
            });
        }
        let keep: Arc<dyn std::any::Any + Send + Sync> = stream.clone();
        // SAFETY: the stream belongs to the primary context of its device (checked above
        // and again by the driver) and `keep` holds it alive as long as the runtime.
        let runtime =
            unsafe { GpuRuntime::for_stream(device, stream.cu_stream().cast(), Some(keep))? };
        Ok(GpuStream { runtime })
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> Device {
        self.runtime.device()
    }

    /// Whether this is the device's own stream ([`GpuStream::default_for`]).
    pub fn is_default(&self) -> bool {
        !self.runtime.is_external()
    }

    /// The vendor handle (`CUstream` / `hipStream_t`) as a pointer.
    pub fn raw(&self) -> *mut c_void {
        self.runtime.raw_stream()
    }

    /// Waits until the work queued on this stream has finished. Refused with
    /// [`AttentionError::GraphCapture`] while the stream is being captured.
    pub fn synchronize(&self) -> Result<()> {
        self.runtime.synchronize()
    }

    /// Whether the stream is being captured into a graph right now: for a caller's
    /// stream, as the driver reports it (a capture the caller began counts, and so does a
    /// failed query); for the device's own stream, by [`Device::capture_graph`]. While it
    /// is, calls that would allocate, copy to or from the host or synchronize are refused
    /// with [`AttentionError::GraphCapture`].
    pub fn is_capturing(&self) -> bool {
        self.runtime.is_capturing()
    }

    /// Whether two values name the same stream of the same device.
    pub fn same_stream(&self, other: &GpuStream) -> bool {
        self.device() == other.device() && self.raw() == other.raw()
    }

    pub(crate) fn runtime(&self) -> &Arc<GpuRuntime> {
        &self.runtime
    }

    pub(crate) fn from_runtime(runtime: Arc<GpuRuntime>) -> Self {
        GpuStream { runtime }
    }
}
