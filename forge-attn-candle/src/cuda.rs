//! The CUDA path: candle's device memory wrapped in place, the kernels queued on the
//! stream of candle's `CudaDevice`.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{Layout as CandleLayout, Result, Shape};
use forge_attn::{DeviceTensor, GpuAttentionBackend, GpuStream, HostElement};

use super::{bshd, run_calls, Opts, Plan};

/// Backends by the `CUstream` handle they queue on.
type Backends = Mutex<Vec<(usize, Arc<GpuAttentionBackend>)>>;

/// One backend per candle stream, made on first use: its kernels and workspaces are then
/// reused by every call (a decode loop allocates nothing after its first step).
fn backend_for(stream: &Arc<CudaStream>) -> Result<Arc<GpuAttentionBackend>> {
    static BACKENDS: OnceLock<Backends> = OnceLock::new();
    let key = stream.cu_stream() as usize;
    let mut list = BACKENDS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, b)) = list.iter().find(|(k, _)| *k == key) {
        return Ok(b.clone());
    }
    // The stream is kept alive by the backend, so its handle cannot be reused by another.
    let s = GpuStream::from_cudarc(stream).map_err(candle_core::Error::wrap)?;
    let b = Arc::new(GpuAttentionBackend::on_stream(&s).map_err(candle_core::Error::wrap)?);
    list.push((key, b.clone()));
    Ok(b)
}

/// Runs `plan` over candle's CUDA storages and returns the output's storage.
pub(crate) fn forward(
    plan: &Plan,
    opts: &Opts,
    q: (&CudaStorage, &CandleLayout),
    k: (&CudaStorage, &CandleLayout),
    v: (&CudaStorage, &CandleLayout),
) -> Result<(CudaStorage, Shape)> {
    use candle_core::DType;
    match (q.0.dtype(), k.0.dtype(), v.0.dtype()) {
        (DType::F32, DType::F32, DType::F32) => typed::<f32>(plan, opts, q, k, v),
        (DType::F16, DType::F16, DType::F16) => typed::<half::f16>(plan, opts, q, k, v),
        (DType::BF16, DType::BF16, DType::BF16) => typed::<half::bf16>(plan, opts, q, k, v),
        (a, b, c) => candle_core::bail!(
            "q / k / v: expected one dtype of f32, f16 or bf16, got {a:?} / {b:?} / {c:?}"
        ),
    }
}

fn typed<T: CudaDType + HostElement + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    plan: &Plan,
    opts: &Opts,
    (sq, lq): (&CudaStorage, &CandleLayout),
    (sk, lk): (&CudaStorage, &CandleLayout),
    (sv, lv): (&CudaStorage, &CandleLayout),
) -> Result<(CudaStorage, Shape)> {
    let dev = sq.device.clone();
    let stream = dev.cuda_stream();
    let n: usize = plan.out_shape.iter().product();
    // Every element of the output is written (rows that see no key get zeros).
    // SAFETY: plain stream-ordered allocation; read only after forge-attn wrote it.
    let mut out = unsafe { stream.alloc::<T>(n.max(1)) }.map_err(candle_core::Error::wrap)?;
    if n > 0 {
        let backend = backend_for(&stream)?;
        let fstream = backend.stream();
        let es = std::mem::size_of::<T>();
        let wrap = |ptr: u64, len: usize, l: &CandleLayout| -> Result<DeviceTensor> {
            let (shape, strides) = bshd(l);
            let off = l.start_offset();
            let bytes = len.saturating_sub(off) * es;
            // SAFETY: a candle CUDA storage is a cudarc slice of `len` elements on this
            // device (so the driver need not be asked, which costs tens of microseconds
            // for pool memory); it outlives this call, and everything forge-attn queues
            // on it goes on candle's stream, ahead of whatever candle queues next (a free
            // included).
            unsafe {
                DeviceTensor::from_raw_device_unchecked(
                    ptr + (off * es) as u64,
                    bytes,
                    T::DTYPE,
                    &shape,
                    Some(&strides),
                    &fstream,
                    None,
                )
            }
            .map_err(candle_core::Error::wrap)
        };
        let (qs, ks, vs) = (
            sq.as_cuda_slice::<T>()?,
            sk.as_cuda_slice::<T>()?,
            sv.as_cuda_slice::<T>()?,
        );
        let (qp, _qg) = qs.device_ptr(&stream);
        let (kp, _kg) = ks.device_ptr(&stream);
        let (vp, _vg) = vs.device_ptr(&stream);
        let qt = wrap(qp, qs.len(), lq)?;
        let kt = wrap(kp, ks.len(), lk)?;
        let vt = wrap(vp, vs.len(), lv)?;
        let out_layout = CandleLayout::contiguous(lq.shape());
        let (op, _og) = out.device_ptr_mut(&stream);
        let mut ot = wrap(op, n, &out_layout)?;
        // The slopes: candle's contiguous f32 [heads] tensor, wrapped in place too.
        let slopes_storage = opts.alibi.as_ref().map(|t| t.storage_and_layout());
        let mut _slopes_guard = None;
        let slopes = match &slopes_storage {
            None => None,
            Some((st, layout)) => match &**st {
                candle_core::Storage::Cuda(cs) => {
                    let sl = cs.as_cuda_slice::<f32>()?;
                    let (ptr, g) = sl.device_ptr(&stream);
                    _slopes_guard = Some(g);
                    let off = layout.start_offset();
                    let heads = layout.dims().iter().product::<usize>();
                    // SAFETY: as for q/k/v above.
                    Some(
                        unsafe {
                            DeviceTensor::from_raw_device_unchecked(
                                ptr + (off * 4) as u64,
                                heads * 4,
                                forge_attn::DType::F32,
                                &[heads],
                                None,
                                &fstream,
                                None,
                            )
                        }
                        .map_err(candle_core::Error::wrap)?,
                    )
                }
                _ => candle_core::bail!("alibi_slopes: expected a tensor on q's CUDA device"),
            },
        };
        let options = opts.forge(slopes);
        run_calls(backend.as_ref(), plan, &options, &qt, &kt, &vt, &mut ot)
            .map_err(candle_core::Error::wrap)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from(plan.out_shape.clone()),
    ))
}
