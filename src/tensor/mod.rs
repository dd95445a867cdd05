//! [`DeviceTensor`]: an n-dimensional array on one device, with views that share storage.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::device::cpu::{HostBuffer, Refusal, Span};
use crate::device::gpu::{GpuBuffer, GpuRuntime};
use crate::device::{Device, GpuStream};
use crate::dtype::{DType, HostElement};
use crate::error::{AttentionError, Result};

mod borrow;
mod copy;

pub use borrow::{BorrowScope, MemoryOwner};

pub(crate) use copy::Strided4;

/// Shape or stride vector; attention tensors have rank 4 at most, so it stays inline.
pub type Dims = SmallVec<[usize; 4]>;

pub(crate) enum Storage {
    Host(HostBuffer),
    Gpu(GpuBuffer),
}

impl Storage {
    fn bytes(&self) -> usize {
        match self {
            Storage::Host(h) => h.len(),
            Storage::Gpu(g) => g.len(),
        }
    }
}

/// A tensor resident on a [`Device`]: shape, strides (in elements), dtype and a shared
/// allocation. Cloning a tensor or taking a view ([`DeviceTensor::narrow`]) never copies
/// data; both refer to the same memory.
#[derive(Clone)]
pub struct DeviceTensor {
    storage: Arc<Storage>,
    device: Device,
    dtype: DType,
    shape: Dims,
    strides: Dims,
    offset: usize,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("strides", &self.strides)
            .field("offset", &self.offset)
            .finish()
    }
}

fn contiguous_strides(shape: &[usize]) -> Dims {
    let mut strides: Dims = SmallVec::from_elem(1, shape.len());
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Checks that a tensor or view of `shape` has a byte size, and every contiguous stride, that
/// fit in `isize::MAX` (the most any allocation can hold); returns the element count.
///
/// Zero-sized dimensions count as 1 here so that the strides of the other dimensions stay
/// representable too. Every view is checked when it is made, so `numel()`,
/// `size_in_bytes()` and the stride products of a live tensor never wrap.
fn checked_numel(what: &str, shape: &[usize], dtype: DType) -> Result<usize> {
    let too_big = || {
        AttentionError::shape(
            what,
            format!(
                "a shape of at most {} bytes of {dtype} (isize::MAX)",
                isize::MAX
            ),
            format!("{shape:?}"),
        )
    };
    let hull = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d.max(1)))
        .ok_or_else(too_big)?;
    if hull > isize::MAX as usize {
        return Err(too_big());
    }
    Ok(shape.iter().product())
}

/// A `Vec` of `n` copies of `fill`, or [`AttentionError::OutOfMemory`] when the host
/// cannot hold it.
pub(crate) fn try_host_vec<T: Clone>(n: usize, fill: T, what: &str) -> Result<Vec<T>> {
    let bytes = (n as u64).saturating_mul(std::mem::size_of::<T>() as u64);
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| AttentionError::host_reserve_failed(what, bytes, e))?;
    v.resize(n, fill);
    Ok(v)
}

/// Host accesses held for the duration of one operation (see [`HostBuffer`] for why this
/// makes shared host storage sound). Dropping it ends them.
pub(crate) struct HostAccess {
    held: Vec<(Arc<Storage>, u64)>,
}

impl HostAccess {
    /// Registers reads of `reads` and writes of `writes` (host tensors; GPU tensors are
    /// skipped, their work is ordered by the device stream). Views of one buffer in one
    /// call may overlap each other; an overlap with another thread's access in progress
    /// (a write on either side) is [`AttentionError::StorageBusy`], and nothing is held.
    pub(crate) fn acquire(reads: &[&DeviceTensor], writes: &[&DeviceTensor]) -> Result<Self> {
        let all = reads
            .iter()
            .map(|t| (*t, false))
            .chain(writes.iter().map(|t| (*t, true)));
        let mut groups: Vec<(&DeviceTensor, Vec<Span>)> = Vec::new();
        for (t, write) in all {
            if !matches!(&*t.storage, Storage::Host(_)) || t.numel() == 0 {
                continue;
            }
            let (first, end) = t.span();
            let es = t.dtype.size_in_bytes();
            let span = Span {
                start: first * es,
                end: end * es,
                write,
            };
            match groups.iter_mut().find(|(g, _)| g.shares_storage_with(t)) {
                Some((_, spans)) => spans.push(span),
                None => groups.push((t, vec![span])),
            }
        }
        let mut access = HostAccess { held: Vec::new() };
        for (t, spans) in groups {
            let Storage::Host(h) = &*t.storage else {
                continue;
            };
            match h.try_register(&spans) {
                Ok(id) => access.held.push((t.storage.clone(), id)),
                // `access` drops here, releasing what was registered so far.
                Err(Refusal::Ended) => return Err(t.borrow_ended()),
                Err(Refusal::ReadOnly) => return Err(t.read_only_error()),
                Err(Refusal::Busy(held)) => {
                    return Err(AttentionError::StorageBusy {
                        what: format!("a host tensor of shape {:?}", t.shape),
                        reason: format!(
                            "another thread is {} bytes {}..{} of its buffer, which this call {} (bytes {}..{}); tensors sharing storage must not be written while another thread reads or writes the same elements",
                            if held.write { "writing" } else { "reading" },
                            held.start,
                            held.end,
                            if spans.iter().any(|s| s.write) { "writes" } else { "reads" },
                            spans.iter().map(|s| s.start).min().unwrap_or(0),
                            spans.iter().map(|s| s.end).max().unwrap_or(0),
                        ),
                    });
                }
            }
        }
        Ok(access)
    }
}

impl Drop for HostAccess {
    fn drop(&mut self) {
        for (storage, id) in &self.held {
            if let Storage::Host(h) = &**storage {
                h.release(*id);
            }
        }
    }
}

/// Widens host values to f32 without aborting when the host is short of memory.
fn widen<T: HostElement>(v: Vec<T>) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    out.try_reserve_exact(v.len()).map_err(|e| {
        AttentionError::host_reserve_failed("to_f32_vec", (v.len() as u64).saturating_mul(4), e)
    })?;
    out.extend(v.into_iter().map(T::to_f32));
    Ok(out)
}

/// Narrows f32 values to `T` ([`HostElement::from_f32`]) and uploads them.
fn upload_narrowed<T: HostElement>(
    data: &[f32],
    shape: &[usize],
    device: Device,
) -> Result<DeviceTensor> {
    let mut v = Vec::new();
    v.try_reserve_exact(data.len()).map_err(|e| {
        AttentionError::host_reserve_failed(
            "from_f32",
            (data.len() as u64).saturating_mul(std::mem::size_of::<T>() as u64),
            e,
        )
    })?;
    v.extend(data.iter().map(|&x| T::from_f32(x)));
    DeviceTensor::from_host(&v, shape, device)
}

impl DeviceTensor {
    fn alloc(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        Self::alloc_in(shape, dtype, device, None)
    }

    /// A zeroed tensor on `device`, allocated through `runtime` (its stream) when given,
    /// else through the device's own runtime.
    fn alloc_in(
        shape: &[usize],
        dtype: DType,
        device: Device,
        runtime: Option<&Arc<GpuRuntime>>,
    ) -> Result<Self> {
        if shape.len() > 4 {
            return Err(AttentionError::shape(
                "tensor rank",
                "at most 4",
                shape.len(),
            ));
        }
        // The byte size cannot overflow: checked_numel bounds it by isize::MAX.
        let bytes = checked_numel("tensor", shape, dtype)? * dtype.size_in_bytes();
        let storage = match device {
            Device::Cpu => Storage::Host(HostBuffer::try_zeroed(bytes)?),
            _ => match runtime {
                Some(rt) => Storage::Gpu(rt.alloc_zeroed(bytes)?),
                None => Storage::Gpu(GpuRuntime::get(device)?.alloc_zeroed(bytes)?),
            },
        };
        Ok(DeviceTensor {
            storage: Arc::new(storage),
            device,
            dtype,
            shape: shape.iter().copied().collect(),
            strides: contiguous_strides(shape),
            offset: 0,
        })
    }

    /// A new contiguous tensor filled with zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        Self::alloc(shape, dtype, device)
    }

    /// A new contiguous tensor filled with zeros on `stream`'s device, allocated and zeroed
    /// on `stream` (stream-ordered: queued work on it sees the zeros), freed on it when the
    /// last view drops. Its copies ([`copy_from`](Self::copy_from), downloads) are queued
    /// on `stream` too. Refused with [`AttentionError::GraphCapture`] while the stream is
    /// being captured.
    pub fn zeros_on(shape: &[usize], dtype: DType, stream: &GpuStream) -> Result<Self> {
        Self::alloc_in(shape, dtype, stream.device(), Some(stream.runtime()))
    }

    /// A zeroed tensor allocated through `rt` (workspaces of a backend on a stream).
    pub(crate) fn zeros_in(rt: &Arc<GpuRuntime>, shape: &[usize], dtype: DType) -> Result<Self> {
        Self::alloc_in(shape, dtype, rt.device(), Some(rt))
    }

    /// Uploads `data` (row-major, `shape`) to `device`; the dtype follows `T`.
    /// Counts one host-to-device transfer.
    pub fn from_host<T: HostElement>(data: &[T], shape: &[usize], device: Device) -> Result<Self> {
        let numel = checked_numel("host data shape", shape, T::DTYPE)?;
        if data.len() != numel {
            return Err(AttentionError::shape(
                "host data length",
                format!("{numel} (shape {shape:?})"),
                data.len(),
            ));
        }
        let t = Self::alloc(shape, T::DTYPE, device)?;
        t.write_bytes(bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// [`from_host`](Self::from_host) onto `stream`: allocated, uploaded and later freed
    /// there (the upload is queued on it; `data` may be reused when this returns). Counts
    /// one host-to-device transfer.
    pub fn from_host_on<T: HostElement>(
        data: &[T],
        shape: &[usize],
        stream: &GpuStream,
    ) -> Result<Self> {
        let numel = checked_numel("host data shape", shape, T::DTYPE)?;
        if data.len() != numel {
            return Err(AttentionError::shape(
                "host data length",
                format!("{numel} (shape {shape:?})"),
                data.len(),
            ));
        }
        let t = Self::alloc_in(shape, T::DTYPE, stream.device(), Some(stream.runtime()))?;
        t.write_bytes(bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// Uploads f32 `data`, converted to `dtype` on the host first: rounded to the nearest
    /// f16 / bf16, and for the integer dtypes Rust's `as` conversion (toward zero,
    /// saturating at the type's bounds, NaN to 0).
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_host(data, shape, device),
            DType::F16 => upload_narrowed::<half::f16>(data, shape, device),
            DType::BF16 => upload_narrowed::<half::bf16>(data, shape, device),
            DType::I32 => upload_narrowed::<i32>(data, shape, device),
            DType::U32 => upload_narrowed::<u32>(data, shape, device),
            DType::I64 => upload_narrowed::<i64>(data, shape, device),
        }
    }

    fn write_bytes(&self, bytes: &[u8]) -> Result<()> {
        debug_assert!(self.is_contiguous() && self.offset == 0);
        match &*self.storage {
            Storage::Host(h) => {
                // SAFETY: the buffer was just allocated with exactly this many bytes and is
                // not shared yet, so no other access can be in progress.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), h.ptr(), bytes.len()) };
            }
            Storage::Gpu(g) => g.runtime().copy_htod(g.ptr(), bytes)?,
        }
        self.device.count_h2d(bytes.len());
        Ok(())
    }

    /// Downloads the tensor (any strides) as a row-major `Vec<T>`; `T` must match the dtype.
    /// Counts one device-to-host transfer.
    pub fn to_host<T: HostElement>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(AttentionError::DTypeMismatch {
                what: "to_host element type".into(),
                expected: self.dtype.to_string(),
                got: T::DTYPE.to_string(),
            });
        }
        let mut out = try_host_vec(self.numel(), <T as bytemuck::Zeroable>::zeroed(), "to_host")?;
        self.read_into(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Downloads the tensor converted to f32, whatever its dtype. Integers become the
    /// nearest f32, exact up to 2^24 in magnitude.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_host::<f32>(),
            DType::F16 => widen(self.to_host::<half::f16>()?),
            DType::BF16 => widen(self.to_host::<half::bf16>()?),
            DType::I32 => widen(self.to_host::<i32>()?),
            DType::U32 => widen(self.to_host::<u32>()?),
            DType::I64 => widen(self.to_host::<i64>()?),
        }
    }

    fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        check_usable(&[self], &[])?;
        match &*self.storage {
            Storage::Host(h) => {
                let _access = HostAccess::acquire(&[self], &[])?;
                // SAFETY: the view lies inside the buffer (checked when it was made) and
                // `_access` rules out a concurrent write of it.
                unsafe {
                    copy::host_gather(h.ptr(), self.layout4(), self.dtype.size_in_bytes(), dst)
                };
            }
            Storage::Gpu(g) => {
                let rt = g.runtime();
                if self.is_contiguous() {
                    rt.copy_dtoh(self.device_ptr(), dst)?;
                } else {
                    // On the tensor's own stream, so the copy sees its zeroing.
                    let tmp = Self::alloc_in(&self.shape, self.dtype, self.device, Some(rt))?;
                    copy::gpu_copy(rt, self, &tmp)?;
                    rt.copy_dtoh(tmp.device_ptr(), dst)?;
                }
            }
        }
        self.device.count_d2h(dst.len());
        Ok(())
    }

    /// Copies `src` into this tensor on the device (no host round trip). Both must have the
    /// same shape, dtype and device; either may be a strided view. Queued on the device's
    /// stream (asynchronous on GPUs).
    pub fn copy_from(&mut self, src: &DeviceTensor) -> Result<()> {
        if src.shape != self.shape {
            return Err(AttentionError::shape(
                "copy_from source",
                format!("{:?}", self.shape),
                format!("{:?}", src.shape),
            ));
        }
        if src.dtype != self.dtype {
            return Err(AttentionError::DTypeMismatch {
                what: "copy_from source".into(),
                expected: self.dtype.to_string(),
                got: src.dtype.to_string(),
            });
        }
        if src.device != self.device {
            return Err(AttentionError::DeviceMismatch {
                what: "copy_from source".into(),
                expected: self.device.to_string(),
                got: src.device.to_string(),
            });
        }
        check_usable(&[src], &[self])?;
        if !self.has_distinct_elements() {
            // A stride-0 destination would be written many times per element (a race on
            // a GPU, and a loop over every repeat on the host).
            return Err(AttentionError::UnsupportedLayout {
                what: "copy_from destination".into(),
                reason: format!(
                    "strides {:?} for shape {:?} map several elements to one address",
                    self.strides, self.shape
                ),
            });
        }
        match (&*self.storage, &*src.storage) {
            (Storage::Host(d), Storage::Host(s)) => {
                let _access = HostAccess::acquire(&[src], &[self])?;
                // SAFETY: both views lie inside their buffers and `_access` rules out any
                // other thread's access to them; overlapping copies are done element by
                // element in order, like a device kernel would.
                unsafe {
                    copy::host_copy(
                        s.ptr(),
                        src.layout4(),
                        d.ptr(),
                        self.layout4(),
                        self.dtype.size_in_bytes(),
                    )
                };
                Ok(())
            }
            (Storage::Gpu(g), Storage::Gpu(_)) => copy::gpu_copy(g.runtime(), src, self),
            _ => Err(AttentionError::DeviceMismatch {
                what: "copy_from storage".into(),
                expected: self.device.to_string(),
                got: src.device.to_string(),
            }),
        }
    }

    /// A view of `len` entries of dimension `dim` starting at `start`, sharing storage.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<DeviceTensor> {
        if dim >= self.rank() {
            return Err(AttentionError::shape(
                "narrow dim",
                format!("< rank {}", self.rank()),
                dim,
            ));
        }
        let end = start.saturating_add(len);
        if end > self.shape[dim] {
            return Err(AttentionError::shape(
                format!("narrow range of dim {dim}"),
                format!("start + len <= {}", self.shape[dim]),
                format!("{start} + {len}"),
            ));
        }
        let offset = start
            .checked_mul(self.strides[dim])
            .and_then(|o| o.checked_add(self.offset))
            .ok_or_else(|| {
                AttentionError::shape(
                    format!("narrow start of dim {dim}"),
                    "an element offset that fits in usize",
                    format!("{} + {start} * {}", self.offset, self.strides[dim]),
                )
            })?;
        let mut v = self.clone();
        v.offset = offset;
        v.shape[dim] = len;
        Ok(v)
    }

    /// A view with a new shape of the same element count; the tensor must be contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<DeviceTensor> {
        if !self.is_contiguous() {
            return Err(AttentionError::UnsupportedLayout {
                what: "reshape".into(),
                reason: format!(
                    "needs a contiguous tensor, got strides {:?} for shape {:?}",
                    self.strides, self.shape
                ),
            });
        }
        if shape.len() > 4 || checked_numel("reshape", shape, self.dtype)? != self.numel() {
            return Err(AttentionError::shape(
                "reshape",
                format!("rank <= 4 with {} elements", self.numel()),
                format!("{shape:?}"),
            ));
        }
        let mut v = self.clone();
        v.shape = shape.iter().copied().collect();
        v.strides = contiguous_strides(shape);
        Ok(v)
    }

    /// A view with dimensions reordered: `perm[i]` is the source dimension of dimension `i`.
    pub fn permute(&self, perm: &[usize]) -> Result<DeviceTensor> {
        let mut seen = [false; 4];
        if perm.len() != self.rank()
            || perm
                .iter()
                .any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true))
        {
            return Err(AttentionError::shape(
                "permutation",
                format!("a permutation of 0..{}", self.rank()),
                format!("{perm:?}"),
            ));
        }
        let mut v = self.clone();
        v.shape = perm.iter().map(|&p| self.shape[p]).collect();
        v.strides = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(v)
    }

    /// A view repeating a size-1 dimension `n` times with stride 0 (no copy).
    pub fn broadcast_dim(&self, dim: usize, n: usize) -> Result<DeviceTensor> {
        if dim >= self.rank() || self.shape[dim] != 1 {
            return Err(AttentionError::shape(
                "broadcast_dim",
                format!("a size-1 dimension < rank {}", self.rank()),
                format!("dim {dim} of {:?}", self.shape),
            ));
        }
        let mut shape = self.shape.clone();
        shape[dim] = n;
        checked_numel("broadcast_dim", &shape, self.dtype)?;
        let mut v = self.clone();
        v.shape = shape;
        v.strides[dim] = 0;
        Ok(v)
    }

    /// The device this tensor lives on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Extent of each dimension.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Stride of each dimension, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Offset of the first element within the shared allocation, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements. Never wraps: a view whose byte size would exceed `isize::MAX`
    /// is refused when it is made.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of the elements this view covers (at most `isize::MAX`, checked when the view
    /// was made; a broadcast view counts every repeated element).
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
    /// Row-major contiguous (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1usize;
        for i in (0..self.rank()).rev() {
            if self.shape[i] != 1 && self.strides[i] != expect {
                return false;
            }
            expect *= self.shape[i];
        }
        true
    }
    /// Whether no two indices address the same element (sufficient test: sorted by stride,
    /// each dimension steps past everything the smaller ones reach).
    pub(crate) fn has_distinct_elements(&self) -> bool {
        let mut dims: SmallVec<[(usize, usize); 4]> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&n, _)| n > 1)
            .map(|(&n, &s)| (n, s))
            .collect();
        dims.sort_by_key(|&(_, s)| s);
        let mut reach = 0usize;
        for (n, s) in dims {
            if s <= reach {
                return false;
            }
            reach = reach.saturating_add((n - 1).saturating_mul(s));
        }
        true
    }

    /// Whether two tensors share an allocation (for example a cache and its views).
    pub fn shares_storage_with(&self, other: &DeviceTensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// Whether the element ranges of two views of one allocation may overlap.
    pub(crate) fn may_overlap(&self, other: &DeviceTensor) -> bool {
        if !self.shares_storage_with(other) || self.numel() == 0 || other.numel() == 0 {
            return false;
        }
        let (a0, a1) = self.span();
        let (b0, b1) = other.span();
        a0 < b1 && b0 < a1
    }

    /// Half-open element range `[first, last + 1)` touched by the view.
    fn span(&self) -> (usize, usize) {
        let last: usize = self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n.saturating_sub(1)) * s)
            .sum();
        (self.offset, self.offset + last + 1)
    }

    pub(crate) fn layout4(&self) -> Strided4 {
        Strided4::new(&self.shape, &self.strides, self.offset)
    }

    /// Base pointer of the view for host tensors (element offset applied). Reading or
    /// writing through it needs a [`HostAccess`] covering the view for as long as the
    /// pointer is used.
    pub(crate) fn host_ptr(&self) -> Option<*mut u8> {
        match &*self.storage {
            // Wrapping: an empty view may start past the end of its buffer; it is never
            // dereferenced then.
            Storage::Host(h) => Some(
                h.ptr()
                    .wrapping_add(self.offset * self.dtype.size_in_bytes()),
            ),
            Storage::Gpu(_) => None,
        }
    }

    /// Device address of the view's first element for GPU tensors (0 for host tensors).
    pub(crate) fn device_ptr(&self) -> u64 {
        match &*self.storage {
            Storage::Gpu(g) => g.ptr() + (self.offset * self.dtype.size_in_bytes()) as u64,
            Storage::Host(_) => 0,
        }
    }

    pub(crate) fn gpu_runtime(&self) -> Option<&Arc<GpuRuntime>> {
        match &*self.storage {
            Storage::Gpu(g) => Some(g.runtime()),
            Storage::Host(_) => None,
        }
    }

    #[allow(dead_code)]
    pub(crate) fn storage_bytes(&self) -> usize {
        self.storage.bytes()
    }

    /// Whether the tensor's memory was lent by the caller (a borrowed or wrapped tensor,
    /// and every view of one) rather than allocated by forge-attn. Borrowed memory is never
    /// freed by forge-attn.
    pub fn is_borrowed(&self) -> bool {
        match &*self.storage {
            Storage::Host(h) => h.is_borrowed(),
            Storage::Gpu(g) => g.is_borrowed(),
        }
    }

    /// The stream a GPU tensor's own operations (copies, downloads) are queued on: the
    /// device's own stream, or the one it was made with; `None` on the CPU.
    pub fn stream(&self) -> Option<GpuStream> {
        self.gpu_runtime()
            .map(|rt| GpuStream::from_runtime(rt.clone()))
    }

    fn borrow_ended(&self) -> AttentionError {
        AttentionError::BorrowEnded {
            what: format!("a {} tensor of shape {:?} on {}", self.dtype, self.shape, self.device),
            reason: "its memory was lent by a BorrowScope that has returned; a tensor made in a scope (and its clones and views) is usable only inside it".into(),
        }
    }

    fn read_only_error(&self) -> AttentionError {
        AttentionError::InvalidMemory {
            what: format!(
                "a {} tensor of shape {:?} on {}",
                self.dtype, self.shape, self.device
            ),
            expected: "writable memory (the tensor is written here)".into(),
            got: "memory lent read-only (a shared slice or view)".into(),
        }
    }

    /// The error for using this tensor now (`write`: as an output), if any: a borrow that
    /// has ended, a write to memory lent read-only. Host tensors are also checked when
    /// their access is registered ([`HostAccess`]), under the lock that ends borrows.
    fn usable(&self, write: bool) -> Result<()> {
        let (ended, read_only) = match &*self.storage {
            Storage::Host(_) => return Ok(()),
            Storage::Gpu(g) => (g.lease_ended(), g.is_read_only()),
        };
        if ended {
            return Err(self.borrow_ended());
        }
        if write && read_only {
            return Err(self.read_only_error());
        }
        Ok(())
    }
}

/// Refuses GPU tensors whose borrow has ended and read-only ones among `writes` (host
/// tensors are checked by [`HostAccess::acquire`]). Every GPU operation checks its tensors
/// here before queuing anything.
pub(crate) fn check_usable(reads: &[&DeviceTensor], writes: &[&DeviceTensor]) -> Result<()> {
    for t in reads {
        t.usable(false)?;
    }
    for t in writes {
        t.usable(true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(values: &[f32], shape: &[usize]) -> DeviceTensor {
        DeviceTensor::from_host(values, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn a_write_in_progress_refuses_overlapping_access_from_clones() {
        let a = cpu(&[1.0; 8], &[8]);
        let mut b = a.clone();
        let src = cpu(&[2.0; 8], &[8]);
        let held = HostAccess::acquire(&[], &[&a]).unwrap();
        let err = b.copy_from(&src).unwrap_err();
        assert!(
            matches!(&err, AttentionError::StorageBusy { reason, .. }
                if reason.contains("writing bytes 0..32") && reason.contains("writes (bytes 0..32)")),
            "{err}"
        );
        assert!(matches!(
            a.to_host::<f32>(),
            Err(AttentionError::StorageBusy { .. })
        ));
        // A disjoint range of the same buffer stays usable.
        let mut tail = cpu(&[0.0; 16], &[16]);
        let mut tail_view = tail.narrow(0, 8, 8).unwrap();
        let tail_hold = HostAccess::acquire(&[], &[&tail.narrow(0, 0, 8).unwrap()]).unwrap();
        tail_view.copy_from(&src).unwrap();
        drop(tail_hold);
        assert_eq!(&tail.to_host::<f32>().unwrap()[8..], &[2.0; 8]);
        drop(held);
        b.copy_from(&src).unwrap();
        assert_eq!(a.to_host::<f32>().unwrap(), vec![2.0; 8]);
        tail.copy_from(&cpu(&[3.0; 16], &[16])).unwrap();
    }

    #[test]
    fn readers_share_and_a_refused_acquire_holds_nothing() {
        let a = cpu(&[1.0; 4], &[4]);
        let other = cpu(&[1.0; 4], &[4]);
        let r1 = HostAccess::acquire(&[&a], &[]).unwrap();
        let r2 = HostAccess::acquire(&[&a, &a], &[]).unwrap();
        assert_eq!(a.to_host::<f32>().unwrap(), vec![1.0; 4]);
        // `other` is registered first, then `a` conflicts: `other` must be released again.
        let refused = HostAccess::acquire(&[], &[&other, &a]);
        assert!(matches!(
            refused,
            Err(AttentionError::StorageBusy { ref reason, .. }) if reason.contains("reading")
        ));
        HostAccess::acquire(&[], &[&other]).unwrap();
        drop((r1, r2));
        HostAccess::acquire(&[], &[&a]).unwrap();
    }

    #[test]
    fn one_call_may_read_and_write_the_same_buffer() {
        let mut t = cpu(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], &[6]);
        let src = t.narrow(0, 0, 4).unwrap();
        let mut dst = t.narrow(0, 2, 4).unwrap();
        dst.copy_from(&src).unwrap();
        // Element by element in order, as documented for overlapping views.
        assert_eq!(
            t.to_host::<f32>().unwrap(),
            vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        );
        let whole = t.clone();
        t.copy_from(&whole).unwrap();
    }

    #[test]
    fn distinct_elements() {
        let t = cpu(&[0.0; 6], &[2, 3]);
        assert!(t.has_distinct_elements());
        assert!(t.permute(&[1, 0]).unwrap().has_distinct_elements());
        let one = cpu(&[0.0; 3], &[1, 3]);
        assert!(!one.broadcast_dim(0, 2).unwrap().has_distinct_elements());
        assert!(one.broadcast_dim(0, 1).unwrap().has_distinct_elements());
    }
}
