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

/// A device's runtime: one context and one stream, created on first use.
pub(crate) enum GpuRuntime {
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaRuntime),
    #[cfg(feature = "rocm")]
    Hip(super::hip::HipRuntime),
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
        let rt: GpuRuntime = match device {
            Device::Cpu => return Err(unavailable(device, "the CPU has no GPU runtime")),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => GpuRuntime::Cuda(super::cuda::CudaRuntime::new(n)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(unavailable(device, "built without the `cuda` feature")),
            #[cfg(feature = "rocm")]
            Device::Hip(n) => GpuRuntime::Hip(super::hip::HipRuntime::new(n)?),
            #[cfg(not(feature = "rocm"))]
            Device::Hip(_) => return Err(unavailable(device, "built without the `rocm` feature")),
        };
        let rt = Arc::new(rt);
        map.insert(device, rt.clone());
        Ok(rt)
    }

    /// Allocates `bytes` (at least one byte) and zeroes them on the stream.
    pub fn alloc_zeroed(self: &Arc<Self>, bytes: usize) -> Result<GpuBuffer> {
        let ptr = match **self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.alloc_zeroed(bytes)?,
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.alloc_zeroed(bytes)?,
        };
        Ok(GpuBuffer {
            ptr,
            bytes,
            runtime: self.clone(),
        })
    }

    fn free(&self, ptr: u64) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.free(ptr),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.free(ptr),
        }
    }

    /// Queues a host-to-device copy; `src` may be reused when this returns.
    pub fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.copy_htod(dst, src),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.copy_htod(dst, src),
        }
    }

    /// Copies device memory to the host, waiting for the stream first.
    pub fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.copy_dtoh(src, dst),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.copy_dtoh(src, dst),
        }
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.synchronize(),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.synchronize(),
        }
    }

    /// Device name.
    pub fn name(&self) -> String {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.name(),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.name(),
        }
    }

    /// Number of multiprocessors (CUs on AMD).
    pub fn multiprocessor_count(&self) -> u32 {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.multiprocessor_count(),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.multiprocessor_count(),
        }
    }

    /// Whether the device runs the `mma.sync` tensor-core kernels (CUDA sm_80 and newer).
    pub fn has_mma(&self) -> bool {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.compute_capability().0 >= 8,
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(_) => false,
        }
    }

    /// Whether the device runs Hopper's warpgroup MMA (wgmma) kernels: CUDA sm_90 exactly
    /// (they are built for the architecture-specific target compute_90a).
    pub fn has_wgmma(&self) -> bool {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.compute_capability() == (9, 0),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(_) => false,
        }
    }

    /// Largest dynamic shared memory a block may opt into.
    pub fn max_shared_bytes_per_block(&self) -> u32 {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.max_shared_bytes_per_block(),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.max_shared_bytes_per_block(),
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
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.launch(spec, dims, bytes),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.launch(spec, dims, bytes),
        }
    }

    /// Device-side event timer: runs `f`, returns the elapsed device milliseconds.
    pub fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        match *self {
            #[cfg(feature = "cuda")]
            GpuRuntime::Cuda(ref c) => c.time_ms(f),
            #[cfg(feature = "rocm")]
            GpuRuntime::Hip(ref h) => h.time_ms(f),
        }
    }
}
