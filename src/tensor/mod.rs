//! [`DeviceTensor`]: an n-dimensional array on one device, with views that share storage.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::device::cpu::HostBuffer;
use crate::device::gpu::{GpuBuffer, GpuRuntime};
use crate::device::Device;
use crate::dtype::{DType, HostElement};
use crate::error::{AttentionError, Result};

mod copy;

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

fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            AttentionError::shape(
                "tensor",
                "a shape whose element count fits in usize",
                format!("{shape:?}"),
            )
        })
}

impl DeviceTensor {
    fn alloc(shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        if shape.len() > 4 {
            return Err(AttentionError::shape(
                "tensor rank",
                "at most 4",
                shape.len(),
            ));
        }
        let numel = checked_numel(shape)?;
        let bytes = numel.checked_mul(dtype.size_in_bytes()).ok_or_else(|| {
            AttentionError::shape(
                "tensor",
                "a byte size that fits in usize",
                format!("{shape:?}"),
            )
        })?;
        let storage = match device {
            Device::Cpu => Storage::Host(HostBuffer::zeroed(bytes)),
            _ => Storage::Gpu(GpuRuntime::get(device)?.alloc_zeroed(bytes)?),
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

    /// Uploads `data` (row-major, `shape`) to `device`; the dtype follows `T`.
    /// Counts one host-to-device transfer.
    pub fn from_host<T: HostElement>(data: &[T], shape: &[usize], device: Device) -> Result<Self> {
        let numel = checked_numel(shape)?;
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

    /// Uploads f32 `data`, rounding to `dtype` on the host first.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: Device) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_host(data, shape, device),
            DType::F16 => {
                let v: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                Self::from_host(&v, shape, device)
            }
            DType::BF16 => {
                let v: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                Self::from_host(&v, shape, device)
            }
        }
    }

    fn write_bytes(&self, bytes: &[u8]) -> Result<()> {
        debug_assert!(self.is_contiguous() && self.offset == 0);
        match &*self.storage {
            Storage::Host(h) => {
                // SAFETY: the buffer was just allocated with exactly this many bytes.
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
        let mut out = vec![T::from_f32(0.0); self.numel()];
        self.read_into(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Downloads the tensor widened to f32, whatever its dtype.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_host::<f32>(),
            DType::F16 => Ok(self
                .to_host::<half::f16>()?
                .into_iter()
                .map(f32::from)
                .collect()),
            DType::BF16 => Ok(self
                .to_host::<half::bf16>()?
                .into_iter()
                .map(f32::from)
                .collect()),
        }
    }

    fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        match &*self.storage {
            Storage::Host(h) => {
                // SAFETY: the view lies inside the buffer (checked when it was made).
                unsafe {
                    copy::host_gather(h.ptr(), self.layout4(), self.dtype.size_in_bytes(), dst)
                };
            }
            Storage::Gpu(g) => {
                let rt = g.runtime();
                if self.is_contiguous() {
                    rt.copy_dtoh(self.device_ptr(), dst)?;
                } else {
                    let tmp = Self::alloc(&self.shape, self.dtype, self.device)?;
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
        match (&*self.storage, &*src.storage) {
            (Storage::Host(d), Storage::Host(s)) => {
                // SAFETY: both views lie inside their buffers; overlapping copies are done
                // element by element in order, like a device kernel would.
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
        let mut v = self.clone();
        v.offset += start * self.strides[dim];
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
        if shape.len() > 4 || checked_numel(shape)? != self.numel() {
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
        let mut v = self.clone();
        v.shape[dim] = n;
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
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of the elements this view covers.
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

    /// Base pointer of the view for host tensors (element offset applied).
    pub(crate) fn host_ptr(&self) -> Option<*mut u8> {
        match &*self.storage {
            // SAFETY: offset lies inside the buffer by construction.
            Storage::Host(h) => {
                Some(unsafe { h.ptr().add(self.offset * self.dtype.size_in_bytes()) })
            }
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
}
