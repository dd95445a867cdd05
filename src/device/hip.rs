//! HIP runtime (AMD ROCm): the checked layer over the raw bindings of `hip_sys.rs`.
//!
//! One non-blocking stream per device. Kernels come from the HSACO code objects that
//! build.rs compiled with hipcc: one module per kernel file, loaded on first use with
//! `hipModuleLoad`, entry points looked up with `hipModuleGetFunction`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, OnceLock};

use hip_runtime_sys::{
    hipDeviceAttribute_t, hipDeviceProp_t, hipEvent_t, hipFunction_t, hipMemcpyKind, hipModule_t,
    hipStream_t,
};

use super::driver::{GpuDriver, PointerInfo, RawStream};
use super::hip_sys as ffi;
use super::kernel_table::KernelTable;
use super::launch::LaunchDims;
use super::tensor_map::TensorMapDesc;
use crate::error::{AttentionError, ErrorSource, Result};
use crate::kernels::abi::TensorMap;
use crate::kernels::{self, KernelFile, KernelId, KernelSpec};

/// The name of a HIP status code (`hipErrorNoDevice`, ...).
fn status_name(status: c_int) -> String {
    // SAFETY: hipGetErrorName returns a static string (or null) for any code.
    let p = unsafe { ffi::hipGetErrorName(status) };
    if p.is_null() {
        return format!("hip error {status}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    let name = unsafe { CStr::from_ptr(p) }.to_string_lossy();
    format!("{name} ({status})")
}

/// The status code (`hipError_t`) of a failed HIP call, kept as the source of the error
/// reporting it; displays as the status name and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HipError(pub c_int);

impl std::fmt::Display for HipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&status_name(self.0))
    }
}

impl std::error::Error for HipError {}

/// `status` as an error source.
fn hip_source(status: c_int) -> Option<ErrorSource> {
    Some(ErrorSource::new(HipError(status)))
}

fn check(op: &str, status: c_int) -> Result<()> {
    if status == ffi::SUCCESS {
        Ok(())
    } else {
        Err(AttentionError::Runtime {
            op: op.to_string(),
            detail: status_name(status),
            source: hip_source(status),
        })
    }
}

/// Number of HIP devices; 0 when there is none or the runtime fails in any way.
pub(crate) fn device_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let mut n: c_int = 0;
        // SAFETY: valid out-pointer. Without a GPU this returns hipErrorNoDevice.
        let status = unsafe { ffi::hipGetDeviceCount(&mut n) };
        if status == ffi::SUCCESS {
            n.max(0) as usize
        } else {
            0
        }
    })
}

/// `hipDeviceProp_t` with room to spare: a runtime whose struct outgrew the bindings'
/// writes into the padding instead of past the end.
#[repr(C)]
struct PaddedProps {
    props: hipDeviceProp_t,
    _spare: [u8; 4096],
}

fn c_text(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

pub(crate) struct HipRuntime {
    ordinal: usize,
    stream: hipStream_t,
    name: String,
    arch: String,
    cu_count: u32,
    max_smem: u32,
    /// Shared by every stream of the device: modules and their functions are device-wide.
    modules: Arc<Mutex<HashMap<KernelFile, hipModule_t>>>,
    functions: Arc<Mutex<HashMap<KernelSpec, hipFunction_t>>>,
    /// The catalog's fixed kernels by id, filled from `functions`; shared the same way.
    table: Arc<KernelTable>,
}

// SAFETY: HIP handles are process-wide; every entry point selects the device first.
unsafe impl Send for HipRuntime {}
unsafe impl Sync for HipRuntime {}

impl HipRuntime {
    pub fn new(ordinal: usize) -> Result<Self> {
        let device = format!("hip:{ordinal}");
        let count = device_count();
        if ordinal >= count {
            let reason = if count == 0 {
                "no AMD GPU found (hipGetDeviceCount reported none or failed)".to_string()
            } else {
                format!("ordinal {ordinal} out of range: {count} HIP device(s) present")
            };
            return Err(AttentionError::DeviceUnavailable {
                device,
                reason,
                source: None,
            });
        }
        let dev = ordinal as c_int;
        // SAFETY: ordinal < device count.
        check("hipSetDevice", unsafe { ffi::hipSetDevice(dev) })?;
        let mut props = MaybeUninit::<PaddedProps>::zeroed();
        // SAFETY: a zeroed, writable struct larger than any hipDeviceProp_t revision.
        check("hipGetDeviceProperties", unsafe {
            ffi::hipGetDeviceProperties(props.as_mut_ptr().cast(), dev)
        })?;
        // SAFETY: zero-initialised plain data, filled in by the runtime.
        let props = unsafe { props.assume_init() }.props;
        let attr = |a: hipDeviceAttribute_t| -> Result<u32> {
            let mut v: c_int = 0;
            // SAFETY: valid out-pointer and device.
            check("hipDeviceGetAttribute", unsafe {
                ffi::hipDeviceGetAttribute(&mut v, a, dev)
            })?;
            Ok(v.max(0) as u32)
        };
        let cu_count = attr(hipDeviceAttribute_t::hipDeviceAttributeMultiprocessorCount)?;
        let per_block = attr(hipDeviceAttribute_t::hipDeviceAttributeMaxSharedMemoryPerBlock)?;
        let optin =
            attr(hipDeviceAttribute_t::hipDeviceAttributeSharedMemPerBlockOptin).unwrap_or(0);
        let mut stream: hipStream_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the device is current.
        check("hipStreamCreateWithFlags", unsafe {
            ffi::hipStreamCreateWithFlags(&mut stream, ffi::STREAM_NON_BLOCKING)
        })?;
        let name = c_text(&props.name);
        Ok(HipRuntime {
            ordinal,
            stream,
            name: if name.is_empty() {
                "unknown AMD GPU".into()
            } else {
                name
            },
            arch: c_text(&props.gcnArchName),
            cu_count,
            max_smem: per_block.max(optin),
            // The handles are process-wide and the runtime is Send + Sync (above).
            #[allow(clippy::arc_with_non_send_sync)]
            modules: Arc::new(Mutex::new(HashMap::new())),
            #[allow(clippy::arc_with_non_send_sync)]
            functions: Arc::new(Mutex::new(HashMap::new())),
            table: Arc::default(),
        })
    }

    /// One `hipPointerGetAttribute` query of `ptr`.
    fn pointer_attribute<T: Default>(&self, ptr: u64, attr: c_int) -> Result<T> {
        let mut value = T::default();
        // SAFETY: `value` is the type the runtime writes for `attr` (int, pointer, size_t
        // as the callers pick).
        check("hipPointerGetAttribute", unsafe {
            ffi::hipPointerGetAttribute(
                (&mut value as *mut T).cast::<c_void>(),
                attr,
                ptr as *mut c_void,
            )
        })?;
        Ok(value)
    }

    fn lock_err() -> AttentionError {
        AttentionError::Runtime {
            op: "kernel table".into(),
            detail: "poisoned lock".into(),
            source: None,
        }
    }

    fn module(&self, file: KernelFile) -> Result<hipModule_t> {
        let mut modules = self.modules.lock().map_err(|_| Self::lock_err())?;
        if let Some(&m) = modules.get(&file) {
            return Ok(m);
        }
        let path = kernels::hsaco_path(file)?;
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| {
            AttentionError::KernelBuild {
                kernel: file.file_name().into(),
                log: format!("path {} contains a NUL byte", path.display()),
                source: None,
            }
        })?;
        let mut module: hipModule_t = std::ptr::null_mut();
        // SAFETY: NUL-terminated path, valid out-pointer; modules are never unloaded.
        let status = unsafe { ffi::hipModuleLoad(&mut module, cpath.as_ptr()) };
        if status != ffi::SUCCESS {
            return Err(AttentionError::KernelBuild {
                kernel: file.file_name().into(),
                log: format!(
                    "hipModuleLoad({}) failed: {}; the code object was built for [{}], \
                     this device is {} (set FORGE_ATTN_HIP_ARCHS and rebuild)",
                    path.display(),
                    status_name(status),
                    kernels::hip_archs_built().unwrap_or("?"),
                    self.arch
                ),
                source: hip_source(status),
            });
        }
        modules.insert(file, module);
        Ok(module)
    }
}

impl GpuDriver for HipRuntime {
    type Function = hipFunction_t;
    type Graph = HipGraph;

    fn name(&self) -> String {
        if self.arch.is_empty() {
            self.name.clone()
        } else {
            format!("{}, {}", self.name, self.arch)
        }
    }

    fn multiprocessor_count(&self) -> u32 {
        self.cu_count
    }

    fn max_shared_bytes_per_block(&self) -> u32 {
        self.max_smem
    }

    /// The tensor-core kernels are CUDA only.
    fn has_mma(&self) -> bool {
        false
    }

    fn has_wgmma(&self) -> bool {
        false
    }

    fn encode_tensor_map(&self, _desc: &TensorMapDesc) -> Result<TensorMap> {
        Err(AttentionError::NotSupported {
            backend: "hip".into(),
            reason: "TMA tensor maps are a CUDA sm_90 feature".into(),
        })
    }

    fn bind(&self) -> Result<()> {
        // Asked rather than remembered: other code on the thread may have selected
        // another device since.
        let mut current: c_int = -1;
        // SAFETY: valid out-pointer.
        check("hipGetDevice", unsafe { ffi::hipGetDevice(&mut current) })?;
        if current == self.ordinal as c_int {
            return Ok(());
        }
        // SAFETY: the ordinal was validated in `new`.
        check("hipSetDevice", unsafe {
            ffi::hipSetDevice(self.ordinal as c_int)
        })
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let status = unsafe { ffi::hipMalloc(&mut ptr, bytes.max(1)) };
        if status == ffi::ERROR_OUT_OF_MEMORY {
            return Err(AttentionError::OutOfMemory {
                device: format!("hip:{}", self.ordinal),
                requested_bytes: bytes as u64,
                detail: format!("hipMalloc returned {}", status_name(status)),
                source: hip_source(status),
            });
        }
        check("hipMalloc", status)?;
        // SAFETY: ptr spans max(bytes, 1) bytes; zeroed on our stream before any use.
        let zeroed = check("hipMemsetAsync", unsafe {
            ffi::hipMemsetAsync(ptr, 0, bytes, self.stream)
        });
        if let Err(e) = zeroed {
            // SAFETY: allocated above, not used by any queued work.
            let _ = unsafe { ffi::hipFree(ptr) };
            return Err(e);
        }
        Ok(ptr as u64)
    }

    fn free(&self, ptr: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: ptr came from alloc_zeroed and is freed once. hipFree waits for the
        // device, so queued work that uses the buffer finishes first.
        check("hipFree", unsafe { ffi::hipFree(ptr as *mut c_void) })
    }

    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst spans src.len() bytes.
        check("hipMemcpyAsync(host to device)", unsafe {
            ffi::hipMemcpyAsync(
                dst as *mut c_void,
                src.as_ptr().cast(),
                src.len(),
                hipMemcpyKind::hipMemcpyHostToDevice,
                self.stream,
            )
        })?;
        // `src` is pageable memory that the caller may reuse or free as soon as this
        // returns; HIP does not promise to have staged it by then, so wait for the copy.
        self.synchronize()
    }

    fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: src spans dst.len() bytes; the stream is synchronised before dst is read.
        check("hipMemcpyAsync(device to host)", unsafe {
            ffi::hipMemcpyAsync(
                dst.as_mut_ptr().cast(),
                src as *const c_void,
                dst.len(),
                hipMemcpyKind::hipMemcpyDeviceToHost,
                self.stream,
            )
        })?;
        self.synchronize()
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our own stream.
        check("hipStreamSynchronize (an earlier kernel failed)", unsafe {
            ffi::hipStreamSynchronize(self.stream)
        })
    }

    /// HIP needs no opt-in for large shared memory; past the device's limit is refused
    /// before the module is loaded.
    fn function(&self, spec: &KernelSpec, shared_bytes: u32) -> Result<hipFunction_t> {
        if shared_bytes > self.max_smem {
            return Err(AttentionError::NotSupported {
                backend: "hip".into(),
                reason: format!(
                    "kernel {} needs {} bytes of shared memory, the device allows {}",
                    spec.name, shared_bytes, self.max_smem
                ),
            });
        }
        if let Some(&f) = self
            .functions
            .lock()
            .map_err(|_| Self::lock_err())?
            .get(spec)
        {
            return Ok(f);
        }
        let module = self.module(spec.file)?;
        let cname = CString::new(spec.name.as_str()).map_err(|_| AttentionError::KernelBuild {
            kernel: spec.name.clone(),
            log: "kernel name contains a NUL byte".into(),
            source: None,
        })?;
        let mut func: hipFunction_t = std::ptr::null_mut();
        // SAFETY: loaded module, NUL-terminated name, valid out-pointer.
        let status = unsafe { ffi::hipModuleGetFunction(&mut func, module, cname.as_ptr()) };
        if status != ffi::SUCCESS {
            return Err(AttentionError::KernelBuild {
                kernel: spec.name.clone(),
                log: format!(
                    "hipModuleGetFunction: {} (no such entry point in {})",
                    status_name(status),
                    spec.file
                ),
                source: hip_source(status),
            });
        }
        self.functions
            .lock()
            .map_err(|_| Self::lock_err())?
            .insert(spec.clone(), func);
        Ok(func)
    }

    fn function_of(&self, id: KernelId, shared_bytes: u32) -> Result<hipFunction_t> {
        self.table
            .get_or_load(id, shared_bytes, || self.function(&id.spec(), shared_bytes))
    }

    fn launch_function(
        &self,
        func: hipFunction_t,
        name: &str,
        dims: LaunchDims,
        params: &[u8],
    ) -> Result<()> {
        // The one by-value argument as a kernel-argument buffer (8-byte aligned copy), on
        // the stack for every argument block of the crate.
        const ON_STACK: usize = 128;
        let words = params.len().div_ceil(8).max(1);
        let mut stack = [0u64; ON_STACK];
        let mut heap = Vec::new();
        let arg: &mut [u64] = if words <= ON_STACK {
            &mut stack[..words]
        } else {
            heap.resize(words, 0u64);
            &mut heap
        };
        // SAFETY: `arg` holds at least params.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(params.as_ptr(), arg.as_mut_ptr().cast(), params.len())
        };
        let mut size: usize = params.len();
        let mut extra = [
            ffi::LAUNCH_PARAM_BUFFER_POINTER,
            arg.as_mut_ptr().cast::<c_void>(),
            ffi::LAUNCH_PARAM_BUFFER_SIZE,
            (&mut size as *mut usize).cast::<c_void>(),
            ffi::LAUNCH_PARAM_END,
        ];
        let (g, b) = (dims.grid, dims.block);
        // SAFETY: the argument buffer matches the kernel's parameter struct (mirrored
        // repr(C)); HIP copies it before returning.
        let status = unsafe {
            ffi::hipModuleLaunchKernel(
                func,
                g.0,
                g.1,
                g.2,
                b.0,
                b.1,
                b.2,
                dims.shared_bytes,
                self.stream,
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        };
        if status != ffi::SUCCESS {
            return check(&format!("hipModuleLaunchKernel({name})"), status);
        }
        Ok(())
    }

    fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f32> {
        self.bind()?;
        let mut start: hipEvent_t = std::ptr::null_mut();
        let mut stop: hipEvent_t = std::ptr::null_mut();
        // SAFETY: valid out-pointers.
        check("hipEventCreate", unsafe { ffi::hipEventCreate(&mut start) })?;
        // SAFETY: valid out-pointer.
        if let Err(e) = check("hipEventCreate", unsafe { ffi::hipEventCreate(&mut stop) }) {
            // SAFETY: created above, never recorded.
            let _ = unsafe { ffi::hipEventDestroy(start) };
            return Err(e);
        }
        let run = (|| {
            // SAFETY: events created above, recorded on our stream.
            check("hipEventRecord", unsafe {
                ffi::hipEventRecord(start, self.stream)
            })?;
            f()?;
            check("hipEventRecord", unsafe {
                ffi::hipEventRecord(stop, self.stream)
            })?;
            check("hipEventSynchronize", unsafe {
                ffi::hipEventSynchronize(stop)
            })?;
            let mut ms = 0f32;
            check("hipEventElapsedTime", unsafe {
                ffi::hipEventElapsedTime(&mut ms, start, stop)
            })?;
            Ok(ms)
        })();
        // SAFETY: both events are idle after the synchronize (or were never recorded).
        unsafe {
            let _ = ffi::hipEventDestroy(start);
            let _ = ffi::hipEventDestroy(stop);
        }
        run
    }

    fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our own stream, not already capturing (the caller tracks that).
        check("hipStreamBeginCapture", unsafe {
            ffi::hipStreamBeginCapture(self.stream, ffi::STREAM_CAPTURE_MODE_RELAXED)
        })
    }

    fn end_capture(&self) -> Result<HipGraph> {
        self.bind()?;
        let mut graph: *mut c_void = std::ptr::null_mut();
        // SAFETY: our own stream, capturing since begin_capture; valid out-pointer.
        check("hipStreamEndCapture", unsafe {
            ffi::hipStreamEndCapture(self.stream, &mut graph)
        })?;
        let mut exec: *mut c_void = std::ptr::null_mut();
        // SAFETY: a graph just recorded; valid out-pointer.
        let made = check("hipGraphInstantiateWithFlags", unsafe {
            ffi::hipGraphInstantiateWithFlags(&mut exec, graph, 0)
        });
        // SAFETY: the instance is independent of the recording, which is not used again.
        let _ = unsafe { ffi::hipGraphDestroy(graph) };
        made.map(|_| HipGraph { exec })
    }

    fn launch_graph(&self, g: &HipGraph) -> Result<()> {
        self.bind()?;
        // SAFETY: an instantiated graph of this device, launched on its stream.
        check("hipGraphLaunch", unsafe {
            ffi::hipGraphLaunch(g.exec, self.stream)
        })
    }

    /// Waits for the replays queued so far first.
    fn destroy_graph(&self, g: &HipGraph) {
        if self.synchronize().is_ok() {
            // SAFETY: destroyed once, by the owner's drop, with no replay in flight.
            let _ = unsafe { ffi::hipGraphExecDestroy(g.exec) };
        }
    }

    /// HIP streams carry no context to check; the caller names the stream's device.
    fn on_stream(&self, stream: RawStream) -> Result<Self> {
        Ok(HipRuntime {
            ordinal: self.ordinal,
            stream: stream as hipStream_t,
            name: self.name.clone(),
            arch: self.arch.clone(),
            cu_count: self.cu_count,
            max_smem: self.max_smem,
            modules: self.modules.clone(),
            functions: self.functions.clone(),
            table: self.table.clone(),
        })
    }

    fn raw_stream(&self) -> RawStream {
        self.stream.cast()
    }

    fn stream_capturing(&self) -> Result<bool> {
        Ok(self.capture_status()? != 0)
    }

    fn pointer_info(&self, ptr: u64) -> Result<PointerInfo> {
        self.bind()?;
        let ordinal: c_int = self.pointer_attribute(ptr, ffi::POINTER_ATTRIBUTE_DEVICE_ORDINAL)?;
        let start: usize = self
            .pointer_attribute(ptr, ffi::POINTER_ATTRIBUTE_RANGE_START_ADDR)
            .unwrap_or(0);
        let size: usize = self
            .pointer_attribute(ptr, ffi::POINTER_ATTRIBUTE_RANGE_SIZE)
            .unwrap_or(0);
        Ok(PointerInfo {
            ordinal: (ordinal >= 0).then_some(ordinal as usize),
            range: (start != 0 && size != 0).then_some((start as u64, size)),
        })
    }
}

impl HipRuntime {
    /// The stream's capture status (`hipStreamIsCapturing`: 0 none, 1 active, 2
    /// invalidated).
    fn capture_status(&self) -> Result<c_int> {
        self.bind()?;
        let mut status: c_int = 0;
        // SAFETY: valid out-pointer; a stream handle the caller vouched for, or our own.
        check("hipStreamIsCapturing", unsafe {
            ffi::hipStreamIsCapturing(self.stream, &mut status)
        })?;
        Ok(status)
    }
}

/// An instantiated HIP graph (`hipGraphExec_t`; the recording is destroyed once instantiated).
pub(crate) struct HipGraph {
    exec: *mut c_void,
}

// SAFETY: an executable graph handle may be launched and destroyed from any thread once the
// device is current, which every entry point above makes it first.
unsafe impl Send for HipGraph {}
unsafe impl Sync for HipGraph {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_device_is_an_error_not_a_panic() {
        let n = device_count();
        if n > 0 {
            eprintln!("{n} HIP device(s) present; skipping the no-device check");
            return;
        }
        match HipRuntime::new(0) {
            Err(AttentionError::DeviceUnavailable { device, reason, .. }) => {
                assert_eq!(device, "hip:0");
                assert!(reason.contains("no AMD GPU"), "{reason}");
            }
            Err(e) => panic!("expected DeviceUnavailable, got {e}"),
            Ok(_) => panic!("a runtime without a device"),
        }
    }

    #[test]
    fn status_names_come_from_the_runtime() {
        assert!(
            status_name(100).contains("hipErrorNoDevice"),
            "{}",
            status_name(100)
        );
        // A code no header knows must not crash.
        let _ = status_name(123_456);
    }

    #[test]
    fn hsaco_paths_exist_when_built() {
        for file in KernelFile::ALL {
            match kernels::hsaco_path(file) {
                Ok(p) => assert!(p.is_file()),
                Err(AttentionError::KernelBuild { log, .. }) => {
                    assert!(
                        log.contains("not built") || log.contains("not found"),
                        "{log}"
                    )
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
}
