//! Tensors over memory that forge-attn did not allocate: the caller's device or host
//! memory, wrapped with no copy, never freed here.
//!
//! Three ways to lend memory:
//! - hand over an owner ([`DeviceTensor::from_host_shared`], cudarc's `CudaSlice` with
//!   `DeviceTensor::from_cuda_slice`, or any `Arc` with the `unsafe` raw constructors): the
//!   owner is dropped when the last tensor (clone, view) using the memory drops;
//! - lend it for a scope ([`DeviceTensor::borrow_scope`]): slices and cudarc views are
//!   borrowed for the scope's lifetime, and when the scope returns every tensor made in it
//!   refuses further use ([`AttentionError::BorrowEnded`]), whatever clones escaped;
//! - raw pointers without an owner (`unsafe`): the caller keeps the memory valid as long as
//!   any tensor made from it exists.

use std::any::Any;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use super::{checked_numel, DeviceTensor, Dims, Storage};
use crate::device::cpu::HostBuffer;
use crate::device::gpu::GpuBuffer;
use crate::device::{Device, GpuStream, Lease};
use crate::dtype::{DType, HostElement};
use crate::error::{AttentionError, Result};

/// What keeps lent memory alive: dropped when the last tensor using the memory drops.
pub type MemoryOwner = Arc<dyn Any + Send + Sync>;

/// Shape and strides of lent memory, checked.
struct Checked {
    shape: Dims,
    strides: Dims,
    /// Bytes from the first element to one past the last one the strides reach (0 for an
    /// empty tensor).
    extent_bytes: usize,
}

fn invalid(what: &str, expected: impl Into<String>, got: impl Into<String>) -> AttentionError {
    AttentionError::InvalidMemory {
        what: what.to_string(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// Checks lent memory at `addr` of `len_bytes` bytes against `shape` and `strides` (in
/// elements; `None`: row-major contiguous) of `dtype`, before anything is made from it.
///
/// Beyond the extent fitting in `len_bytes`, every `shape[d] * strides[d]` (size-0 and
/// size-1 dimensions counted as 1) must sum to at most `isize::MAX` bytes, so that every
/// view (`narrow` offsets included) stays addressable, as for allocated tensors.
fn check_layout(
    what: &str,
    addr: u64,
    len_bytes: usize,
    dtype: DType,
    shape: &[usize],
    strides: Option<&[usize]>,
) -> Result<Checked> {
    if shape.len() > 4 {
        return Err(AttentionError::shape(
            format!("{what} rank"),
            "at most 4",
            shape.len(),
        ));
    }
    let strides: Dims = match strides {
        Some(s) if s.len() != shape.len() => {
            return Err(AttentionError::shape(
                format!("{what} strides"),
                format!("{} strides (one per dimension of {shape:?})", shape.len()),
                format!("{s:?}"),
            ))
        }
        Some(s) => s.iter().copied().collect(),
        None => super::contiguous_strides(shape),
    };
    if addr == 0 {
        return Err(invalid(what, "a non-null pointer", "null"));
    }
    let es = dtype.size_in_bytes();
    if !addr.is_multiple_of(es as u64) {
        return Err(invalid(
            what,
            format!("an address aligned to {es} bytes for {dtype}"),
            format!("{addr:#x}"),
        ));
    }
    let numel = checked_numel(what, shape, dtype)?;
    let too_far = || {
        AttentionError::shape(
            format!("{what} strides"),
            format!("strides whose reach (sum of extent * stride * {es} bytes) fits in isize::MAX"),
            format!("strides {strides:?} for shape {shape:?}"),
        )
    };
    let reach = shape
        .iter()
        .zip(&strides)
        .try_fold(0usize, |acc, (&n, &s)| {
            n.max(1)
                .checked_mul(s)
                .and_then(|x| x.checked_mul(es))
                .and_then(|x| acc.checked_add(x))
        })
        .ok_or_else(too_far)?;
    if reach > isize::MAX as usize {
        return Err(too_far());
    }
    // Bounded by `reach`, so no step can wrap.
    let extent_bytes = if numel == 0 {
        0
    } else {
        let last: usize = shape.iter().zip(&strides).map(|(&n, &s)| (n - 1) * s).sum();
        (last + 1) * es
    };
    if extent_bytes > len_bytes {
        return Err(invalid(
            what,
            format!(
                "at least {extent_bytes} bytes (shape {shape:?}, strides {strides:?}, {dtype})"
            ),
            format!("{len_bytes} bytes"),
        ));
    }
    if addr.checked_add(len_bytes as u64).is_none() {
        return Err(invalid(
            what,
            "an address range that does not wrap around",
            format!("{len_bytes} bytes at {addr:#x}"),
        ));
    }
    Ok(Checked {
        shape: shape.iter().copied().collect(),
        strides,
        extent_bytes,
    })
}

/// Checks that the driver knows `[addr, addr + extent)` as memory of `stream`'s device.
fn check_device_memory(what: &str, addr: u64, extent: usize, stream: &GpuStream) -> Result<()> {
    if extent == 0 {
        return Ok(());
    }
    let device = stream.device();
    let info = stream.runtime().pointer_info(addr).map_err(|e| {
        invalid(
            what,
            format!("device memory of {device}"),
            format!("{addr:#x}, which the driver does not know as device memory ({e})"),
        )
    })?;
    let Some(ordinal) = info.ordinal else {
        return Err(invalid(
            what,
            format!("device memory of {device}"),
            format!("{addr:#x}, host memory"),
        ));
    };
    let on = match device {
        Device::Hip(_) => Device::Hip(ordinal),
        _ => Device::Cuda(ordinal),
    };
    if on != device {
        return Err(invalid(
            what,
            format!("memory on {device}"),
            format!("{addr:#x}, memory on {on}"),
        ));
    }
    if let Some((start, size)) = info.range {
        let end = start.saturating_add(size as u64);
        if addr.saturating_add(extent as u64) > end {
            return Err(invalid(
                what,
                format!("{extent} bytes inside one allocation"),
                format!(
                    "{addr:#x}, in an allocation of {size} bytes at {start:#x} that ends {} bytes after it",
                    end.saturating_sub(addr)
                ),
            ));
        }
    }
    Ok(())
}

impl DeviceTensor {
    fn from_checked(storage: Storage, device: Device, dtype: DType, c: Checked) -> Self {
        DeviceTensor {
            storage: Arc::new(storage),
            device,
            dtype,
            shape: c.shape,
            strides: c.strides,
            offset: 0,
        }
    }

    /// A host tensor over `len_bytes` bytes at `ptr` that forge-attn only reads (writes
    /// into it, as an output or a copy destination, are [`AttentionError::InvalidMemory`]).
    /// `strides` are in elements (`None`: row-major contiguous); `owner` (if any) is dropped
    /// when the last tensor using the memory drops. Never freed by forge-attn.
    ///
    /// Refused before anything is made: a null `ptr`, one not aligned to the dtype's size
    /// ([`AttentionError::InvalidMemory`]), rank above 4, `strides` of another rank, a
    /// reach past `isize::MAX` bytes ([`AttentionError::ShapeMismatch`]), `len_bytes` short
    /// of the bytes the shape and strides reach ([`AttentionError::InvalidMemory`]).
    ///
    /// # Safety
    /// `ptr` is valid for reads of `len_bytes` bytes, and nothing writes them, for as long
    /// as any tensor made from it (clones, views) exists, or, with an `owner`, as long as
    /// the owner is alive.
    pub unsafe fn from_raw_host(
        ptr: *const c_void,
        len_bytes: usize,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
        owner: Option<MemoryOwner>,
    ) -> Result<Self> {
        // SAFETY: forwarded from the caller.
        unsafe {
            Self::raw_host(
                ptr as *mut c_void,
                len_bytes,
                dtype,
                shape,
                strides,
                true,
                owner,
                None,
            )
        }
    }

    /// Like [`from_raw_host`](Self::from_raw_host), for memory forge-attn may also write
    /// (an output).
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `len_bytes` bytes, and nothing else reads or
    /// writes them, for as long as any tensor made from it exists (or the `owner` is alive).
    pub unsafe fn from_raw_host_mut(
        ptr: *mut c_void,
        len_bytes: usize,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
        owner: Option<MemoryOwner>,
    ) -> Result<Self> {
        // SAFETY: forwarded from the caller.
        unsafe { Self::raw_host(ptr, len_bytes, dtype, shape, strides, false, owner, None) }
    }

    /// # Safety
    /// As [`from_raw_host_mut`](Self::from_raw_host_mut) (reads only when `read_only`), or
    /// until `lease` ends when one is given.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_host(
        ptr: *mut c_void,
        len_bytes: usize,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
        read_only: bool,
        owner: Option<MemoryOwner>,
        lease: Option<Arc<Lease>>,
    ) -> Result<Self> {
        let c = check_layout("host memory", ptr as u64, len_bytes, dtype, shape, strides)?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| invalid("host memory", "a non-null pointer", "null"))?;
        // SAFETY: forwarded from the caller; the layout lies inside `len_bytes`.
        let buf = unsafe { HostBuffer::borrowed(ptr, len_bytes, read_only, owner, lease) };
        Ok(Self::from_checked(
            Storage::Host(buf),
            Device::Cpu,
            dtype,
            c,
        ))
    }

    /// A host tensor reading `owner`'s elements in place (zero copy), keeping `owner` alive
    /// until the last tensor using it drops; the dtype follows `T`. Read-only: writes into
    /// it are [`AttentionError::InvalidMemory`]. Errors as
    /// [`from_raw_host`](Self::from_raw_host), the slice's length as `len_bytes`.
    pub fn from_host_shared<T, O>(
        owner: Arc<O>,
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<Self>
    where
        T: HostElement,
        O: AsRef<[T]> + Send + Sync + 'static,
    {
        let data: &[T] = (*owner).as_ref();
        let (ptr, len) = (data.as_ptr(), std::mem::size_of_val(data));
        // An empty slice's pointer is dangling but aligned and non-null, as required.
        let keep: MemoryOwner = owner;
        // SAFETY: `data` stays valid while `keep` is alive (the buffer holds it), and it
        // is only read through shared access, as `AsRef` lends it.
        unsafe { Self::from_raw_host(ptr.cast(), len, T::DTYPE, shape, strides, Some(keep)) }
    }

    /// A GPU tensor over `len_bytes` bytes of device memory at `ptr` on `stream`'s device,
    /// with `strides` in elements (`None`: row-major contiguous). Its own operations
    /// (copies, downloads) are queued on `stream`; attention runs wherever the backend's
    /// stream is. `owner` (if any) is dropped when the last tensor using the memory drops;
    /// the memory is never freed by forge-attn.
    ///
    /// Refused before anything is made, besides the layout errors of
    /// [`from_raw_host`](Self::from_raw_host): an address the driver does not know as
    /// device memory, memory of another device (`cuPointerGetAttribute` /
    /// `hipPointerGetAttribute`), or an allocation that ends before the extent
    /// ([`AttentionError::InvalidMemory`]).
    ///
    /// # Safety
    /// The memory is valid for reads and writes as long as any tensor made from it exists
    /// (or the `owner` is alive), and, for work queued on it before then, until that work
    /// has run: free it stream-ordered after that work (on the same stream, or after an
    /// event), as cudarc does for memory used on its own stream.
    pub unsafe fn from_raw_device(
        ptr: u64,
        len_bytes: usize,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
        stream: &GpuStream,
        owner: Option<MemoryOwner>,
    ) -> Result<Self> {
        // SAFETY: forwarded from the caller.
        unsafe {
            Self::raw_device(
                ptr, len_bytes, dtype, shape, strides, stream, false, owner, None, true,
            )
        }
    }

    /// [`from_raw_device`](Self::from_raw_device) without asking the driver about `ptr`:
    /// the layout is checked against `len_bytes` (null, alignment, extent, sizes) but not
    /// whether the memory is device memory of `stream`'s device or where its allocation
    /// ends. For callers that know both, such as an engine wrapping its own allocator's
    /// buffers on every call: the driver's answer for memory from a stream-ordered pool
    /// can take tens of microseconds, more than the attention call it guards.
    ///
    /// # Safety
    /// As [`from_raw_device`](Self::from_raw_device); besides, the `len_bytes` bytes at
    /// `ptr` are device memory of `stream`'s device, inside one allocation.
    pub unsafe fn from_raw_device_unchecked(
        ptr: u64,
        len_bytes: usize,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
        stream: &GpuStream,
        owner: Option<MemoryOwner>,
    ) -> Result<Self> {
        // SAFETY: forwarded from the caller, who vouches for what is not checked.
        unsafe {
            Self::raw_device(
                ptr, len_bytes, dtype, shape, strides, stream, false, owner, None, false,
            )
        }
    }

    /// # Safety
    /// As [`from_raw_device`](Self::from_raw_device), or until `lease` ends; without
    /// `ask_driver`, as [`from_raw_device_unchecked`](Self::from_raw_device_unchecked).
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_device(
        ptr: u64,
        len_bytes: usize,
        dtype: DType,
        shape: &[usize],
        strides: Option<&[usize]>,
        stream: &GpuStream,
        read_only: bool,
        owner: Option<MemoryOwner>,
        lease: Option<Arc<Lease>>,
        ask_driver: bool,
    ) -> Result<Self> {
        let what = "device memory";
        let c = check_layout(what, ptr, len_bytes, dtype, shape, strides)?;
        if ask_driver {
            check_device_memory(what, ptr, c.extent_bytes, stream)?;
        }
        let rt = stream.runtime().clone();
        // SAFETY: forwarded from the caller; checked to lie on the stream's device.
        let buf = unsafe { GpuBuffer::borrowed(ptr, len_bytes, rt, read_only, owner, lease) };
        Ok(Self::from_checked(
            Storage::Gpu(buf),
            stream.device(),
            dtype,
            c,
        ))
    }

    /// Lends memory to forge-attn for the duration of `f`: the [`BorrowScope`] makes
    /// tensors over slices (and, with feature `cuda`, cudarc slices and views) borrowed
    /// for `'env`, with no copy. When `f` returns (or panics) every tensor made in the
    /// scope, and every clone and view of one, refuses further use with
    /// [`AttentionError::BorrowEnded`]; host accesses in progress on other threads are
    /// waited for first, so the memory is the caller's again when this returns.
    ///
    /// GPU work queued in the scope may still be running when it returns (nothing is
    /// synchronized): the lender frees its memory stream-ordered after it, as cudarc does
    /// for memory used on its own stream.
    ///
    /// ```
    /// use forge_attn::{AttentionConfig, CpuAttentionBackend, DeviceAttentionBackend, DeviceTensor};
    /// # fn main() -> forge_attn::Result<()> {
    /// let (b, s, h, d) = (1, 4, 2, 8);
    /// let q = vec![0.5f32; b * s * h * d];
    /// let mut out = vec![0f32; b * s * h * d];
    /// let config = AttentionConfig::new(h * d, h, s);
    /// DeviceTensor::borrow_scope(|scope| {
    ///     let qt = scope.host(&q, &[b, s, h, d], None)?;
    ///     let mut ot = scope.host_mut(&mut out, &[b, s, h, d], None)?;
    ///     CpuAttentionBackend::new().forward_into(&config, &qt, &qt, &qt, None, &mut ot)?;
    ///     Ok::<_, forge_attn::AttentionError>(())
    /// })?;
    /// assert!((out[0] - 0.5).abs() < 1e-6); // written in place
    /// # Ok(())
    /// # }
    /// ```
    pub fn borrow_scope<'env, R>(f: impl FnOnce(&BorrowScope<'env>) -> R) -> R {
        let scope = BorrowScope {
            lease: Arc::new(Lease::default()),
            lent: Mutex::new(Vec::new()),
            _env: PhantomData,
        };
        // Ends the borrows however `f` leaves, a panic included.
        struct End<'s, 'env>(&'s BorrowScope<'env>);
        impl Drop for End<'_, '_> {
            fn drop(&mut self) {
                self.0.end();
            }
        }
        let end = End(&scope);
        let r = f(end.0);
        drop(end);
        r
    }
}

/// Memory lent to forge-attn for `'env`, made into tensors by this scope's methods; see
/// [`DeviceTensor::borrow_scope`]. The tensors are ordinary [`DeviceTensor`]s (views,
/// `narrow`, `permute`, every backend), usable until the scope returns.
pub struct BorrowScope<'env> {
    lease: Arc<Lease>,
    /// The storages lent in this scope, whose accesses in progress the end waits for.
    lent: Mutex<Vec<Arc<Storage>>>,
    /// Invariant in `'env`, as `std::thread::Scope`: the borrows last the whole call.
    _env: PhantomData<&'env mut &'env ()>,
}

impl std::fmt::Debug for BorrowScope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BorrowScope")
            .field("lent", &self.lent.lock().map(|l| l.len()).unwrap_or(0))
            .finish()
    }
}

impl<'env> BorrowScope<'env> {
    fn keep(&self, t: DeviceTensor) -> DeviceTensor {
        self.lent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t.storage.clone());
        t
    }

    fn end(&self) {
        let lent = std::mem::take(&mut *self.lent.lock().unwrap_or_else(|e| e.into_inner()));
        self.lease.end();
        for s in &lent {
            match &**s {
                Storage::Host(h) => h.end_lease(),
                Storage::Gpu(g) => g.end_lease(),
            }
        }
    }

    /// A read-only host tensor over `data` (zero copy; the dtype follows `T`); `strides`
    /// in elements, `None` for row-major contiguous. Writes into it are
    /// [`AttentionError::InvalidMemory`]. Layout errors as
    /// [`DeviceTensor::from_raw_host`], `data`'s length as the bound.
    pub fn host<T: HostElement>(
        &self,
        data: &'env [T],
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<DeviceTensor> {
        // SAFETY: `data` is borrowed shared for 'env, which outlives the scope; every
        // access ends before the scope returns (the lease).
        let t = unsafe {
            DeviceTensor::raw_host(
                data.as_ptr() as *mut c_void,
                std::mem::size_of_val(data),
                T::DTYPE,
                shape,
                strides,
                true,
                None,
                Some(self.lease.clone()),
            )?
        };
        Ok(self.keep(t))
    }

    /// A host tensor over `data` that forge-attn may read and write (an output), zero copy.
    pub fn host_mut<T: HostElement>(
        &self,
        data: &'env mut [T],
        shape: &[usize],
        strides: Option<&[usize]>,
    ) -> Result<DeviceTensor> {
        // SAFETY: `data` is borrowed exclusively for 'env, which outlives the scope; every
        // access ends before the scope returns (the lease).
        let t = unsafe {
            DeviceTensor::raw_host(
                data.as_mut_ptr().cast(),
                std::mem::size_of_val(data),
                T::DTYPE,
                shape,
                strides,
                false,
                None,
                Some(self.lease.clone()),
            )?
        };
        Ok(self.keep(t))
    }
}

#[cfg(feature = "cuda")]
mod cuda_interop {
    use cudarc::driver::{
        CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice,
    };

    use super::*;

    /// The device address of a cudarc slice or view, read as cudarc asks (the slice's
    /// stream waits for its pending writes when cudarc tracks events).
    fn read_ptr<T, S: DevicePtr<T>>(s: &S) -> u64 {
        let (ptr, _sync) = s.device_ptr(s.stream());
        ptr
    }

    fn write_ptr<T, S: DevicePtrMut<T>>(s: &mut S) -> u64 {
        let stream: Arc<CudaStream> = s.stream().clone();
        let (ptr, _sync) = s.device_ptr_mut(&stream);
        ptr
    }

    fn bytes<T>(len: usize) -> usize {
        len.saturating_mul(std::mem::size_of::<T>())
    }

    impl DeviceTensor {
        /// A GPU tensor over a cudarc `CudaSlice`, which it takes over: the slice is
        /// dropped (and its memory freed by cudarc, on its stream) when the last tensor
        /// using it drops. Zero copy; the dtype follows `T`; `strides` in elements (`None`:
        /// row-major contiguous). The tensor's own operations are queued on the slice's
        /// stream. Errors as [`DeviceTensor::from_raw_device`], the slice's length as the
        /// bound.
        pub fn from_cuda_slice<T: HostElement>(
            mut slice: CudaSlice<T>,
            shape: &[usize],
            strides: Option<&[usize]>,
        ) -> Result<Self> {
            let stream = GpuStream::from_cudarc(slice.stream())?;
            let ptr = write_ptr(&mut slice);
            let len = bytes::<T>(slice.len());
            let owner: MemoryOwner = Arc::new(slice);
            // SAFETY: the memory lives as long as `owner`, which the buffer holds; cudarc
            // frees it on its stream, after the work queued there.
            unsafe {
                Self::from_raw_device_unchecked(
                    ptr,
                    len,
                    T::DTYPE,
                    shape,
                    strides,
                    &stream,
                    Some(owner),
                )
            }
        }
    }

    impl<'env> BorrowScope<'env> {
        fn device<T: HostElement>(
            &self,
            ptr: u64,
            len: usize,
            stream: &Arc<CudaStream>,
            read_only: bool,
            shape: &[usize],
            strides: Option<&[usize]>,
        ) -> Result<DeviceTensor> {
            let stream = GpuStream::from_cudarc(stream)?;
            // SAFETY: the memory is borrowed (shared when `read_only`) for 'env, which
            // outlives the scope, whose end refuses every later use.
            let t = unsafe {
                DeviceTensor::raw_device(
                    ptr,
                    bytes::<T>(len),
                    T::DTYPE,
                    shape,
                    strides,
                    &stream,
                    read_only,
                    None,
                    Some(self.lease.clone()),
                    // A cudarc slice is device memory of its stream's device, `len`
                    // elements long: nothing to ask the driver.
                    false,
                )?
            };
            Ok(self.keep(t))
        }

        /// A read-only GPU tensor over a cudarc slice borrowed for the scope (zero copy;
        /// dtype from `T`; its own operations on the slice's stream). Errors as
        /// [`DeviceTensor::from_raw_device`].
        pub fn cuda<T: HostElement>(
            &self,
            slice: &'env CudaSlice<T>,
            shape: &[usize],
            strides: Option<&[usize]>,
        ) -> Result<DeviceTensor> {
            self.device::<T>(
                read_ptr(slice),
                slice.len(),
                slice.stream(),
                true,
                shape,
                strides,
            )
        }

        /// A GPU tensor over a cudarc slice borrowed mutably for the scope, that
        /// forge-attn may write (an output).
        pub fn cuda_mut<T: HostElement>(
            &self,
            slice: &'env mut CudaSlice<T>,
            shape: &[usize],
            strides: Option<&[usize]>,
        ) -> Result<DeviceTensor> {
            let ptr = write_ptr(slice);
            self.device::<T>(ptr, slice.len(), slice.stream(), false, shape, strides)
        }

        /// A read-only GPU tensor over a cudarc view (of a slice borrowed for the scope).
        pub fn cuda_view<T: HostElement>(
            &self,
            view: &CudaView<'env, T>,
            shape: &[usize],
            strides: Option<&[usize]>,
        ) -> Result<DeviceTensor> {
            self.device::<T>(
                read_ptr(view),
                view.len(),
                view.stream(),
                true,
                shape,
                strides,
            )
        }

        /// A GPU tensor over a mutable cudarc view (of a slice borrowed mutably for the
        /// scope), that forge-attn may write.
        pub fn cuda_view_mut<T: HostElement>(
            &self,
            mut view: CudaViewMut<'env, T>,
            shape: &[usize],
            strides: Option<&[usize]>,
        ) -> Result<DeviceTensor> {
            let ptr = write_ptr(&mut view);
            let stream = view.stream().clone();
            self.device::<T>(ptr, view.len(), &stream, false, shape, strides)
        }
    }
}
