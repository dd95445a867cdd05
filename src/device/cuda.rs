//! CUDA runtime through the driver API (cudarc, loaded at run time).
//!
//! One primary context and one non-blocking stream per device; memory is allocated
//! stream-ordered so that allocation and free never synchronize the host.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::driver::{GpuDriver, PointerInfo, RawStream};
use super::kernel_table::KernelTable;
use super::launch::LaunchDims;
use super::tensor_map::{self, TensorMapDesc};
use crate::dtype::DType;
use crate::error::{AttentionError, ErrorSource, Result};
use crate::kernels::abi::TensorMap;
use crate::kernels::{self, KernelId, KernelSpec};

fn runtime_err(op: &str, e: DriverError) -> AttentionError {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    AttentionError::Runtime {
        op: op.to_string(),
        detail: format!("{name} ({:?})", e.0),
        source: Some(ErrorSource::new(e)),
    }
}

/// Whether the CUDA driver library can be loaded and initialised; probed once.
fn driver_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| crate::cuda_probe::driver_present() && result::init().is_ok())
}

/// Number of CUDA devices; 0 when no driver is installed.
pub(crate) fn device_count() -> usize {
    if !driver_ready() {
        return 0;
    }
    result::device::get_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

struct Function {
    func: sys::CUfunction,
    dynamic_smem_limit: u32,
}

// SAFETY: a function handle is context-wide, usable from any thread with the context
// current (every entry point binds it first); the table is behind a mutex.
unsafe impl Send for Function {}

pub(crate) struct CudaRuntime {
    ordinal: usize,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    name: String,
    sm_count: u32,
    cc: (i32, i32),
    max_smem_optin: u32,
    /// Shared by every stream of the device: modules belong to the context.
    functions: Arc<Mutex<HashMap<KernelSpec, Function>>>,
    /// The catalog's fixed kernels by id, filled from `functions`; shared the same way.
    table: Arc<KernelTable>,
}

// SAFETY: the context and stream handles are usable from any thread once the context is
// made current, which every entry point does first. Function handles are context-wide and
// may be launched on any stream of the context.
unsafe impl Send for CudaRuntime {}
unsafe impl Sync for CudaRuntime {}

impl CudaRuntime {
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = format!("cuda:{ordinal}");
        let unavailable = |reason: String| AttentionError::DeviceUnavailable {
            device: device.clone(),
            reason,
            source: None,
        };
        if !driver_ready() {
            return Err(unavailable(
                "the CUDA driver library (libcuda) was not found or did not initialise".into(),
            ));
        }
        let count = device_count();
        if ordinal >= count {
            return Err(unavailable(format!(
                "ordinal {ordinal} out of range: {count} CUDA device(s) present"
            )));
        }
        let dev = result::device::get(ordinal as i32).map_err(|e| runtime_err("cuDeviceGet", e))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(|e| runtime_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: ctx was just retained.
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| runtime_err("cuCtxSetCurrent", e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| runtime_err("cuStreamCreate", e))?;
        let attr = |a| unsafe { result::device::get_attribute(dev, a) };
        use sys::CUdevice_attribute_enum as A;
        let get = |a| attr(a).map_err(|e| runtime_err("cuDeviceGetAttribute", e));
        let sm_count = get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let cc = (
            get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let max_smem_optin = get(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown NVIDIA GPU".into());
        Ok(CudaRuntime {
            ordinal,
            ctx,
            stream,
            name,
            sm_count,
            cc,
            max_smem_optin,
            functions: Arc::new(Mutex::new(HashMap::new())),
            table: Arc::default(),
        })
    }
}

impl GpuDriver for CudaRuntime {
    type Function = sys::CUfunction;
    type Graph = CudaGraph;

    fn name(&self) -> String {
        format!("{}, sm_{}{}", self.name, self.cc.0, self.cc.1)
    }

    fn multiprocessor_count(&self) -> u32 {
        self.sm_count
    }

    fn max_shared_bytes_per_block(&self) -> u32 {
        self.max_smem_optin
    }

    /// sm_80 and newer.
    fn has_mma(&self) -> bool {
        self.cc.0 >= 8
    }

    /// sm_90 exactly: the kernels are built for the architecture-specific target
    /// compute_90a.
    fn has_wgmma(&self) -> bool {
        self.cc == (9, 0)
    }

    fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<TensorMap> {
        desc.check()
            .map_err(|reason| AttentionError::NotSupported {
                backend: "cuda".into(),
                reason: format!("no TMA tensor map for this operand: {reason}"),
            })?;
        if self.cc.0 < 9 {
            return Err(AttentionError::NotSupported {
                backend: "cuda".into(),
                reason: format!(
                    "TMA needs sm_90 or newer, this device is sm_{}{}",
                    self.cc.0, self.cc.1
                ),
            });
        }
        let dtype = match desc.dtype {
            DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        };
        let boxes = [tensor_map::BOX_COLS, desc.box_rows, 1, 1];
        let unit = [1u32; 4];
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        // SAFETY: the arrays hold rank (4) extents, rank - 1 strides and rank box and
        // element strides; the map is written, never read, by the driver; nothing is
        // dereferenced at the global address here (it is recorded into the map).
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                4,
                desc.ptr as *mut c_void,
                desc.dims.as_ptr(),
                desc.strides.as_ptr(),
                boxes.as_ptr(),
                unit.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
        .result()
        .map_err(|e| runtime_err("cuTensorMapEncodeTiled", e))?;
        Ok(TensorMap(map.opaque))
    }

    fn bind(&self) -> Result<()> {
        // Asked rather than remembered: other code on the thread (the caller's own CUDA
        // work) may have made another context current since.
        let current = result::ctx::get_current().map_err(|e| runtime_err("cuCtxGetCurrent", e))?;
        if current == Some(self.ctx) {
            return Ok(());
        }
        // SAFETY: the context lives as long as the runtime (primary contexts are never released).
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| runtime_err("cuCtxSetCurrent", e))
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: stream-ordered allocation on our own stream; zeroed before any use.
        let ptr = unsafe { result::malloc_async(self.stream, bytes.max(1)) }.map_err(|e| {
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                AttentionError::OutOfMemory {
                    device: format!("cuda:{}", self.ordinal),
                    requested_bytes: bytes as u64,
                    detail: "cuMemAllocAsync returned CUDA_ERROR_OUT_OF_MEMORY".into(),
                    source: Some(ErrorSource::new(e)),
                }
            } else {
                runtime_err("cuMemAllocAsync", e)
            }
        })?;
        // SAFETY: ptr spans `bytes` bytes on this stream.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream) }
            .map_err(|e| runtime_err("cuMemsetD8Async", e))?;
        Ok(ptr)
    }

    fn free(&self, ptr: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: ptr came from alloc_zeroed and is freed once, after the queued work using it.
        unsafe { result::free_async(ptr, self.stream) }
            .map_err(|e| runtime_err("cuMemFreeAsync", e))
    }

    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // Pageable source: the driver stages it before returning, so `src` may be reused.
        unsafe { result::memcpy_htod_async(dst, src, self.stream) }
            .map_err(|e| runtime_err("cuMemcpyHtoDAsync", e))
    }

    fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: src spans dst.len() bytes; the stream is synchronised before dst is read.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream) }
            .map_err(|e| runtime_err("cuMemcpyDtoHAsync", e))?;
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our own stream.
        unsafe { result::stream::synchronize(self.stream) }
            .map_err(|e| runtime_err("cuStreamSynchronize (an earlier kernel failed)", e))
    }

    fn function(&self, spec: &KernelSpec, shared_bytes: u32) -> Result<sys::CUfunction> {
        let mut fns = self.functions.lock().map_err(|_| AttentionError::Runtime {
            op: "kernel table".into(),
            detail: "poisoned lock".into(),
            source: None,
        })?;
        if !fns.contains_key(spec) {
            let ptx = kernels::compile_ptx(spec, self.cc)?;
            let image = CString::new(ptx.as_bytes()).map_err(|_| AttentionError::KernelBuild {
                kernel: spec.name.clone(),
                log: "PTX contains a NUL byte".into(),
                source: None,
            })?;
            let load_err = |op: &str, e: DriverError| AttentionError::KernelBuild {
                kernel: spec.name.clone(),
                log: format!("{op}: {}", runtime_err(op, e)),
                source: Some(ErrorSource::new(e)),
            };
            // SAFETY: a NUL-terminated PTX image.
            let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| load_err("cuModuleLoadData", e))?;
            let cname =
                CString::new(spec.name.as_str()).map_err(|_| AttentionError::KernelBuild {
                    kernel: spec.name.clone(),
                    log: "kernel name contains a NUL byte".into(),
                    source: None,
                })?;
            // SAFETY: module was just loaded and is never unloaded.
            let func = unsafe { result::module::get_function(module, cname) }
                .map_err(|e| load_err("cuModuleGetFunction", e))?;
            fns.insert(
                spec.clone(),
                Function {
                    func,
                    dynamic_smem_limit: 48 * 1024,
                },
            );
        }
        let f = fns.get_mut(spec).expect("inserted above");
        if shared_bytes > f.dynamic_smem_limit {
            if shared_bytes > self.max_smem_optin {
                return Err(AttentionError::NotSupported {
                    backend: "cuda".into(),
                    reason: format!(
                        "kernel {} needs {shared_bytes} bytes of shared memory, the device allows {}",
                        spec.name, self.max_smem_optin
                    ),
                });
            }
            // SAFETY: valid function handle.
            unsafe {
                result::function::set_function_attribute(
                    f.func,
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| runtime_err("cuFuncSetAttribute", e))?;
            f.dynamic_smem_limit = shared_bytes;
        }
        Ok(f.func)
    }

    fn function_of(&self, id: KernelId, shared_bytes: u32) -> Result<sys::CUfunction> {
        self.table
            .get_or_load(id, shared_bytes, || self.function(&id.spec(), shared_bytes))
    }

    fn launch_function(
        &self,
        func: sys::CUfunction,
        name: &str,
        dims: LaunchDims,
        params: &[u8],
    ) -> Result<()> {
        // The kernel's one by-value argument, read (never written) by cuLaunchKernel, which
        // copies it before returning.
        let mut args = [params.as_ptr() as *mut c_void];
        // SAFETY: the argument block matches the kernel's parameter struct (mirrored repr(C)).
        unsafe {
            result::launch_kernel(
                func,
                dims.grid,
                dims.block,
                dims.shared_bytes,
                self.stream,
                &mut args,
            )
        }
        .map_err(|e| runtime_err(&format!("cuLaunchKernel({name})"), e))?;
        Ok(())
    }

    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(|e| runtime_err("cuEventCreate", e))?;
        let stop = result::event::create(flags).map_err(|e| runtime_err("cuEventCreate", e))?;
        let run = (|| {
            // SAFETY: events created above, recorded on our stream.
            unsafe { result::event::record(start, self.stream) }
                .map_err(|e| runtime_err("cuEventRecord", e))?;
            f()?;
            unsafe { result::event::record(stop, self.stream) }
                .map_err(|e| runtime_err("cuEventRecord", e))?;
            unsafe { result::event::synchronize(stop) }
                .map_err(|e| runtime_err("cuEventSynchronize", e))?;
            unsafe { result::event::elapsed(start, stop) }
                .map_err(|e| runtime_err("cuEventElapsedTime", e))
        })();
        // SAFETY: both events are idle after the synchronize (or were never recorded).
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(stop);
        }
        run
    }

    /// Relaxed mode: module loads and attribute changes made while recording (first use of
    /// a kernel) are allowed.
    fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our own stream, not already capturing (the caller tracks that).
        unsafe {
            result::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .map_err(|e| runtime_err("cuStreamBeginCapture", e))
    }

    fn end_capture(&self) -> Result<CudaGraph> {
        self.bind()?;
        // SAFETY: our own stream, capturing since begin_capture.
        let graph = unsafe { result::stream::end_capture(self.stream) }
            .map_err(|e| runtime_err("cuStreamEndCapture", e))?;
        // SAFETY: a graph just recorded; destroyed once instantiated (the instance is
        // independent of it).
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(|e| runtime_err("cuGraphInstantiateWithFlags", e));
        // SAFETY: not used after this point.
        let _ = unsafe { result::graph::destroy(graph) };
        Ok(CudaGraph { exec: exec? })
    }

    fn launch_graph(&self, g: &CudaGraph) -> Result<()> {
        self.bind()?;
        // SAFETY: an instantiated graph of this context, launched on its stream.
        unsafe { result::graph::launch(g.exec, self.stream) }
            .map_err(|e| runtime_err("cuGraphLaunch", e))
    }

    fn destroy_graph(&self, g: &CudaGraph) {
        if self.bind().is_ok() {
            // SAFETY: destroyed once, by the owner's drop.
            let _ = unsafe { result::graph::exec_destroy(g.exec) };
        }
    }

    /// Refuses a stream of another context (a non-primary context, another device): its
    /// launches would fail or address another device's memory.
    fn on_stream(&self, stream: RawStream) -> Result<Self> {
        self.bind()?;
        let stream = stream as sys::CUstream;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller vouches that `stream` is a live stream handle (or one of the
        // special handles: null is the context's legacy default stream).
        unsafe { sys::cuStreamGetCtx(stream, &mut ctx) }
            .result()
            .map_err(|e| runtime_err("cuStreamGetCtx", e))?;
        if ctx != self.ctx {
            return Err(AttentionError::DeviceMismatch {
                what: "stream".into(),
                expected: format!(
                    "a stream of the primary context of cuda:{} ({:?})",
                    self.ordinal, self.ctx
                ),
                got: format!("a stream of context {ctx:?}"),
            });
        }
        Ok(CudaRuntime {
            ordinal: self.ordinal,
            ctx: self.ctx,
            stream,
            name: self.name.clone(),
            sm_count: self.sm_count,
            cc: self.cc,
            max_smem_optin: self.max_smem_optin,
            functions: self.functions.clone(),
            table: self.table.clone(),
        })
    }

    fn raw_stream(&self) -> RawStream {
        self.stream.cast()
    }

    /// Active and invalidated captures both count: work queued now would not run.
    fn stream_capturing(&self) -> Result<bool> {
        Ok(self.capture_status()? != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    fn pointer_info(&self, ptr: u64) -> Result<PointerInfo> {
        use sys::CUpointer_attribute as P;
        self.bind()?;
        // One cuPointerGetAttributes call: unlike cuPointerGetAttribute it answers for
        // memory the driver does not know (host memory) with default values instead of
        // an error, so asking about a host pointer is not a failed driver call.
        let mut ordinal: i32 = -1;
        let mut memory_type: u32 = 0;
        let mut start: u64 = 0;
        let mut size: usize = 0;
        let mut attrs = [
            P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            P::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        ];
        let mut data: [*mut c_void; 4] = [
            (&mut ordinal as *mut i32).cast(),
            (&mut memory_type as *mut u32).cast(),
            (&mut start as *mut u64).cast(),
            (&mut size as *mut usize).cast(),
        ];
        // SAFETY: each data slot points at the type the driver writes for its attribute
        // (int, CUmemorytype, CUdeviceptr, size_t).
        unsafe {
            sys::cuPointerGetAttributes(
                attrs.len() as u32,
                attrs.as_mut_ptr(),
                data.as_mut_ptr(),
                ptr,
            )
        }
        .result()
        .map_err(|e| runtime_err("cuPointerGetAttributes", e))?;
        // CUmemorytype: 2 is device memory; 1 is host memory and 0 memory the driver does
        // not know (a device ordinal may still be reported for either).
        let on_device = memory_type == 2 && ordinal >= 0;
        Ok(PointerInfo {
            ordinal: on_device.then_some(ordinal as usize),
            range: (on_device && start != 0 && size != 0).then_some((start, size)),
        })
    }
}

impl CudaRuntime {
    /// The stream's capture status (`cuStreamIsCapturing`).
    fn capture_status(&self) -> Result<sys::CUstreamCaptureStatus> {
        self.bind()?;
        // SAFETY: a stream of this context (checked in `on_stream`, or our own).
        unsafe { result::stream::is_capturing(self.stream) }
            .map_err(|e| runtime_err("cuStreamIsCapturing", e))
    }
}

/// An instantiated CUDA graph (the recording itself is destroyed once instantiated).
pub(crate) struct CudaGraph {
    exec: sys::CUgraphExec,
}

// SAFETY: an executable graph handle may be launched and destroyed from any thread with the
// context current, which every entry point above makes it first.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}
