//! Raw bindings of the HIP runtime: the entry points `hip.rs` uses, unchecked, each
//! declared with a plain integer status (`hip.rs` is the checked layer over them).
//!
//! The bindings of `hip-runtime-sys` return a Rust enum; a status code the bindings do
//! not list (newer ROCm releases add some) would be undefined behaviour there, so the
//! status is read as an integer and named with `hipGetErrorName`. Types come from the
//! bindings; the library is the one `hip-runtime-sys` links (`libamdhip64`).

use std::ffi::{c_char, c_int, c_uint, c_void};

use hip_runtime_sys::{
    hipDeviceAttribute_t, hipDeviceProp_t, hipEvent_t, hipFunction_t, hipMemcpyKind, hipModule_t,
    hipStream_t,
};

pub const SUCCESS: c_int = 0;
pub const ERROR_OUT_OF_MEMORY: c_int = 2;
pub const STREAM_NON_BLOCKING: c_uint = 1;
/// `HIP_LAUNCH_PARAM_BUFFER_POINTER` (hip_runtime_api.h).
pub const LAUNCH_PARAM_BUFFER_POINTER: *mut c_void = std::ptr::without_provenance_mut(0x01);
/// `HIP_LAUNCH_PARAM_BUFFER_SIZE`.
pub const LAUNCH_PARAM_BUFFER_SIZE: *mut c_void = std::ptr::without_provenance_mut(0x02);
/// `HIP_LAUNCH_PARAM_END`.
pub const LAUNCH_PARAM_END: *mut c_void = std::ptr::without_provenance_mut(0x03);

#[link(name = "amdhip64")]
extern "C" {
    pub fn hipGetDeviceCount(count: *mut c_int) -> c_int;
    pub fn hipSetDevice(device: c_int) -> c_int;
    pub fn hipGetDevice(device: *mut c_int) -> c_int;
    pub fn hipGetDeviceProperties(prop: *mut hipDeviceProp_t, device: c_int) -> c_int;
    pub fn hipDeviceGetAttribute(
        value: *mut c_int,
        attr: hipDeviceAttribute_t,
        device: c_int,
    ) -> c_int;
    pub fn hipGetErrorName(status: c_int) -> *const c_char;
    pub fn hipStreamCreateWithFlags(stream: *mut hipStream_t, flags: c_uint) -> c_int;
    pub fn hipStreamSynchronize(stream: hipStream_t) -> c_int;
    pub fn hipMalloc(ptr: *mut *mut c_void, bytes: usize) -> c_int;
    pub fn hipFree(ptr: *mut c_void) -> c_int;
    pub fn hipMemsetAsync(
        dst: *mut c_void,
        value: c_int,
        bytes: usize,
        stream: hipStream_t,
    ) -> c_int;
    pub fn hipMemcpyAsync(
        dst: *mut c_void,
        src: *const c_void,
        bytes: usize,
        kind: hipMemcpyKind,
        stream: hipStream_t,
    ) -> c_int;
    pub fn hipModuleLoad(module: *mut hipModule_t, path: *const c_char) -> c_int;
    pub fn hipModuleGetFunction(
        function: *mut hipFunction_t,
        module: hipModule_t,
        name: *const c_char,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn hipModuleLaunchKernel(
        f: hipFunction_t,
        grid_x: c_uint,
        grid_y: c_uint,
        grid_z: c_uint,
        block_x: c_uint,
        block_y: c_uint,
        block_z: c_uint,
        shared_bytes: c_uint,
        stream: hipStream_t,
        kernel_params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> c_int;
    pub fn hipEventCreate(event: *mut hipEvent_t) -> c_int;
    pub fn hipEventRecord(event: hipEvent_t, stream: hipStream_t) -> c_int;
    pub fn hipEventSynchronize(event: hipEvent_t) -> c_int;
    pub fn hipEventElapsedTime(ms: *mut f32, start: hipEvent_t, stop: hipEvent_t) -> c_int;
    pub fn hipEventDestroy(event: hipEvent_t) -> c_int;
    pub fn hipStreamBeginCapture(stream: hipStream_t, mode: c_int) -> c_int;
    pub fn hipStreamEndCapture(stream: hipStream_t, graph: *mut *mut c_void) -> c_int;
    pub fn hipGraphInstantiateWithFlags(
        exec: *mut *mut c_void,
        graph: *mut c_void,
        flags: u64,
    ) -> c_int;
    pub fn hipGraphLaunch(exec: *mut c_void, stream: hipStream_t) -> c_int;
    pub fn hipGraphExecDestroy(exec: *mut c_void) -> c_int;
    pub fn hipGraphDestroy(graph: *mut c_void) -> c_int;
    pub fn hipStreamIsCapturing(stream: hipStream_t, status: *mut c_int) -> c_int;
    pub fn hipPointerGetAttribute(data: *mut c_void, attribute: c_int, ptr: *mut c_void) -> c_int;
}

/// `HIP_POINTER_ATTRIBUTE_DEVICE_ORDINAL` (an int).
pub const POINTER_ATTRIBUTE_DEVICE_ORDINAL: c_int = 9;
/// `HIP_POINTER_ATTRIBUTE_RANGE_START_ADDR` (a device pointer).
pub const POINTER_ATTRIBUTE_RANGE_START_ADDR: c_int = 11;
/// `HIP_POINTER_ATTRIBUTE_RANGE_SIZE` (a size_t).
pub const POINTER_ATTRIBUTE_RANGE_SIZE: c_int = 12;

/// `hipStreamCaptureModeRelaxed` (hip_runtime_api.h).
pub const STREAM_CAPTURE_MODE_RELAXED: c_int = 2;
