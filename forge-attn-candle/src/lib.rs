//! forge-attn attention on candle [`Tensor`]s, named and shaped like candle-flash-attn's
//! functions: the same call sites work with either crate.
//!
//! - **Zero copy.** Q, K and V are read where candle keeps them, with the strides and
//!   offsets of their layouts (a `narrow`ed view of a preallocated KV cache, a transposed
//!   `[B, H, S, D]` tensor); the output is one new candle tensor, written once.
//! - **candle's stream.** On CUDA the kernels are queued on the stream of the tensors'
//!   `CudaDevice`, ordered with candle's own work and captured with it into a CUDA graph;
//!   nothing synchronizes. The kernels are forge-attn's own, compiled at run time (no
//!   nvcc-built attention kernels).
//! - **CPU and CUDA**, f32, f16 and bf16 (f32 too, which candle-flash-attn refuses).
//!
//! Shapes follow candle-flash-attn: `q` is `[batch, seq_q, heads, head_dim]`, `k` and `v`
//! `[batch, seq_k, kv_heads, head_dim]` with `heads` a multiple of `kv_heads` (GQA/MQA).
//! Causal masking is bottom-right aligned: query `i` sees key `j` iff
//! `j <= i + seq_k - seq_q`.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let q = Tensor::randn(0f32, 1.0, (1, 4, 8, 64), &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1.0, (1, 16, 2, 64), &Device::Cpu)?;
//! let v = Tensor::randn(0f32, 1.0, (1, 16, 2, 64), &Device::Cpu)?;
//! let out = forge_attn_candle::flash_attn(&q, &k, &v, 0.125, true)?;
//! assert_eq!(out.dims(), &[1, 4, 8, 64]);
//! assert_eq!(out.dtype(), DType::F32);
//! # Ok(())
//! # }
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout as CandleLayout, Result, Shape, Tensor};
use forge_attn::{
    AttentionConfig, AttentionOptions, CpuAttentionBackend, DeviceAttentionBackend, DeviceTensor,
    HostElement, Layout,
};

#[cfg(feature = "cuda")]
mod cuda;

/// Attention of `q` over `k`/`v` (shapes in the crate docs), `softmax_scale` applied to
/// the scores, causal (bottom-right) when `causal`. Returns a new tensor shaped like `q`.
///
/// Errors: tensors on different devices or of different dtypes, a dtype other than f32,
/// f16 or bf16, shapes that do not match, and whatever forge-attn refuses (its
/// [`forge_attn::AttentionError`], wrapped).
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttn {
            softmax_scale,
            causal,
            varlen: None,
            opts: Opts::default(),
        },
    )
}

/// [`flash_attn`] with a sliding window: query `i` (bottom-right aligned,
/// `a = i + seq_k - seq_q`) keeps key `j` iff `a - left <= j <= a + right`; `None` is
/// unbounded on that side. `window_size_right = Some(0)` is causal attention limited to
/// `window_size_left` keys back, as in candle-flash-attn.
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    flash_attn_alibi_windowed_softcap(
        q,
        k,
        v,
        None,
        softmax_scale,
        window_size_left,
        window_size_right,
        None,
    )
}

/// [`flash_attn`] with ALiBi: `alibi_slopes` is an f32 `[heads]` tensor on q's device,
/// and key `j` of query `i` gets the bias `-slope[h] * |a - j|` (`a` as in
/// [`flash_attn_windowed`]).
pub fn flash_attn_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let right = if causal { Some(0) } else { None };
    flash_attn_alibi_windowed_softcap(
        q,
        k,
        v,
        Some(alibi_slopes),
        softmax_scale,
        None,
        right,
        None,
    )
}

/// [`flash_attn_alibi`] with a sliding window (as in [`flash_attn_windowed`]).
pub fn flash_attn_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    flash_attn_alibi_windowed_softcap(
        q,
        k,
        v,
        Some(alibi_slopes),
        softmax_scale,
        window_size_left,
        window_size_right,
        None,
    )
}

/// Every option at once: optional ALiBi slopes, a window (as in [`flash_attn_windowed`])
/// and an optional logits softcap (`cap * tanh(s / cap)` on the scaled score, before the
/// ALiBi bias and the window). A backend that cannot run an option refuses the call and
/// names it (forge-attn's GPU kernels do not take these options yet).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: Option<f32>,
) -> Result<Tensor> {
    if let Some(s) = alibi_slopes {
        let h = q.dims().get(2).copied().unwrap_or(0);
        if s.dims() != [h] || s.dtype() != candle_core::DType::F32 {
            candle_core::bail!(
                "alibi_slopes: expected an f32 tensor of shape [{h}] (one slope per head), got {:?} {:?}",
                s.dtype(),
                s.dims()
            );
        }
        if !s.device().same_device(q.device()) {
            candle_core::bail!("alibi_slopes: expected a tensor on q's device");
        }
    }
    q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttn {
            softmax_scale,
            causal: false,
            varlen: None,
            opts: Opts {
                window: (window_size_left, window_size_right),
                softcap,
                alibi: alibi_slopes.map(|s| s.contiguous()).transpose()?,
            },
        },
    )
}

/// Attention over packed ragged sequences: `q` is `[total_q, heads, head_dim]`, `k`/`v`
/// `[total_k, kv_heads, head_dim]`; sequence `i` takes query rows
/// `seqlens_q[i]..seqlens_q[i + 1]` and key rows `seqlens_k[i]..seqlens_k[i + 1]`
/// (`seqlens_*` are u32 tensors of `batch + 1` cumulative offsets starting at 0, as
/// candle-flash-attn takes them). `max_seqlen_q` / `max_seqlen_k` bound the lengths.
/// Returns a tensor shaped like `q`.
///
/// The offsets are read to the host (on CUDA that waits for the stream) and each sequence
/// runs as its own call over views of the packed tensors, all writing one output.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let cu_q = offsets(seqlens_q, "seqlens_q")?;
    let cu_k = offsets(seqlens_k, "seqlens_k")?;
    let varlen = Varlen::new(cu_q, cu_k, max_seqlen_q, max_seqlen_k)?;
    q.apply_op3_no_bwd(
        k,
        v,
        &FlashAttn {
            softmax_scale,
            causal,
            varlen: Some(varlen),
            opts: Opts::default(),
        },
    )
}

fn offsets(t: &Tensor, what: &str) -> Result<Vec<usize>> {
    if t.rank() != 1 || t.dtype() != candle_core::DType::U32 {
        candle_core::bail!(
            "{what}: expected a rank-1 u32 tensor of batch + 1 offsets, got {:?} {:?}",
            t.dtype(),
            t.dims()
        );
    }
    Ok(t.to_vec1::<u32>()?
        .into_iter()
        .map(|x| x as usize)
        .collect())
}

/// The sequence offsets of a packed ragged batch.
#[derive(Debug, Clone)]
struct Varlen {
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
}

impl Varlen {
    fn new(cu_q: Vec<usize>, cu_k: Vec<usize>, max_q: usize, max_k: usize) -> Result<Self> {
        if cu_q.len() != cu_k.len() || cu_q.len() < 2 {
            candle_core::bail!(
                "seqlens_q / seqlens_k: expected the same number (batch + 1 >= 2) of offsets, got {} and {}",
                cu_q.len(),
                cu_k.len()
            );
        }
        for (what, cu, max) in [("seqlens_q", &cu_q, max_q), ("seqlens_k", &cu_k, max_k)] {
            if cu[0] != 0 {
                candle_core::bail!("{what}: expected offsets starting at 0, got {}", cu[0]);
            }
            for (i, w) in cu.windows(2).enumerate() {
                if w[1] < w[0] {
                    candle_core::bail!(
                        "{what}: expected non-decreasing offsets, got {} then {} at sequence {i}",
                        w[0],
                        w[1]
                    );
                }
                if w[1] - w[0] > max {
                    candle_core::bail!(
                        "{what}: sequence {i} holds {} rows, more than the maximum {max} given",
                        w[1] - w[0]
                    );
                }
            }
        }
        Ok(Varlen { cu_q, cu_k })
    }
}

/// The custom op behind every function of the crate.
struct FlashAttn {
    softmax_scale: f32,
    causal: bool,
    varlen: Option<Varlen>,
    opts: Opts,
}

/// The per-call options of an op, as candle tensors.
#[derive(Default)]
struct Opts {
    window: (Option<usize>, Option<usize>),
    softcap: Option<f32>,
    /// Contiguous f32 `[heads]` on the op's device.
    alibi: Option<Tensor>,
}

impl Opts {
    /// forge-attn's options, with the ALiBi slopes already wrapped as `slopes`.
    fn forge(&self, slopes: Option<DeviceTensor>) -> AttentionOptions {
        let mut o = AttentionOptions::new().with_window(self.window.0, self.window.1);
        if let Some(c) = self.softcap {
            o = o.with_softcap(c);
        }
        if let Some(s) = slopes {
            o = o.with_alibi_slopes(s);
        }
        o
    }
}

/// One forge-attn call of an op: the config, and which rows of the packed tensors it reads
/// (the whole tensors for a padded batch).
struct Call {
    config: AttentionConfig,
    /// `(q start, q rows, k start, k rows)` along the packed dimension; `None` for the
    /// padded `[B, S, H, D]` form.
    rows: Option<(usize, usize, usize, usize)>,
}

/// Geometry of one op, checked against the layouts.
struct Plan {
    calls: Vec<Call>,
    /// Shape of q and of the output.
    out_shape: Vec<usize>,
}

impl FlashAttn {
    fn plan(&self, lq: &CandleLayout, lk: &CandleLayout, lv: &CandleLayout) -> Result<Plan> {
        let (q, k, v) = (lq.dims(), lk.dims(), lv.dims());
        let rank = if self.varlen.is_some() { 3 } else { 4 };
        for (what, d) in [("q", q), ("k", k), ("v", v)] {
            if d.len() != rank {
                candle_core::bail!(
                    "{what}: expected rank {rank} ({}), got {d:?}",
                    if rank == 4 {
                        "[batch, seq, heads, head_dim]"
                    } else {
                        "[total, heads, head_dim]"
                    }
                );
            }
        }
        if k != v {
            candle_core::bail!("v: expected the shape of k {k:?}, got {v:?}");
        }
        let (h, d, hkv) = (q[rank - 2], q[rank - 1], k[rank - 2]);
        if k[rank - 1] != d {
            candle_core::bail!("k: expected head_dim {d} (q's), got {}", k[rank - 1]);
        }
        if hkv == 0 || h % hkv != 0 {
            candle_core::bail!("k: expected kv_heads dividing q's {h} heads, got {hkv}");
        }
        let dim = h
            .checked_mul(d)
            .ok_or_else(|| candle_core::Error::Msg(format!("heads {h} x head_dim {d} overflow")))?;
        let config = |batch: usize, sq: usize, sk: usize| {
            AttentionConfig::new(dim, h, sq.max(sk).max(1))
                .with_num_kv_heads(hkv)
                .with_batch_size(batch.max(1))
                .with_scale(self.softmax_scale)
                .with_causal(self.causal)
                .with_layout(Layout::Bshd)
        };
        let calls = match &self.varlen {
            None => {
                if k[0] != q[0] {
                    candle_core::bail!("k: expected batch {} (q's), got {}", q[0], k[0]);
                }
                vec![Call {
                    config: config(q[0], q[1], k[1]),
                    rows: None,
                }]
            }
            Some(vl) => {
                let (tq, tk) = (vl.cu_q[vl.cu_q.len() - 1], vl.cu_k[vl.cu_k.len() - 1]);
                if tq != q[0] || tk != k[0] {
                    candle_core::bail!(
                        "q / k: expected {tq} / {tk} packed rows (the last offsets), got {} / {}",
                        q[0],
                        k[0]
                    );
                }
                (0..vl.cu_q.len() - 1)
                    .filter(|&i| vl.cu_q[i + 1] > vl.cu_q[i])
                    .map(|i| {
                        let (q0, q1, k0, k1) =
                            (vl.cu_q[i], vl.cu_q[i + 1], vl.cu_k[i], vl.cu_k[i + 1]);
                        Call {
                            config: config(1, q1 - q0, k1 - k0),
                            rows: Some((q0, q1 - q0, k0, k1 - k0)),
                        }
                    })
                    .collect()
            }
        };
        Ok(Plan {
            calls,
            out_shape: q.to_vec(),
        })
    }
}

/// Shape and strides of a layout as forge-attn's `[batch, seq, heads, head_dim]`: a packed
/// `[total, heads, head_dim]` tensor is one sequence of `total` rows.
fn bshd(l: &CandleLayout) -> (Vec<usize>, Vec<usize>) {
    let (d, s) = (l.dims(), l.stride());
    if d.len() == 3 {
        (vec![1, d[0], d[1], d[2]], vec![0, s[0], s[1], s[2]])
    } else {
        (d.to_vec(), s.to_vec())
    }
}

/// The storage from a layout's first element, with its forge-attn shape and strides.
fn from_offset<'a, T>(data: &'a [T], l: &CandleLayout) -> (&'a [T], Vec<usize>, Vec<usize>) {
    let (shape, strides) = bshd(l);
    (data.get(l.start_offset()..).unwrap_or(&[]), shape, strides)
}

/// The rows `start..start + n` of the sequence dimension; the tensor itself for the
/// padded form.
fn rows_view(t: &DeviceTensor, rows: Option<(usize, usize)>) -> forge_attn::Result<DeviceTensor> {
    match rows {
        None => Ok(t.clone()),
        Some((start, n)) => t.narrow(1, start, n),
    }
}

/// Runs every call of `plan` with `backend` over the packed tensors.
fn run_calls(
    backend: &dyn DeviceAttentionBackend,
    plan: &Plan,
    options: &AttentionOptions,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    out: &mut DeviceTensor,
) -> forge_attn::Result<()> {
    for call in &plan.calls {
        let (qr, kr) = match call.rows {
            None => (None, None),
            Some((q0, nq, k0, nk)) => (Some((q0, nq)), Some((k0, nk))),
        };
        let (qv, kv, vv) = (rows_view(q, qr)?, rows_view(k, kr)?, rows_view(v, kr)?);
        let mut ov = rows_view(out, qr)?;
        backend.forward_with(&call.config, options, &qv, &kv, &vv, None, &mut ov, None)?;
    }
    Ok(())
}

impl FlashAttn {
    fn cpu<T: HostElement>(
        &self,
        (q, lq): (&[T], &CandleLayout),
        (k, lk): (&[T], &CandleLayout),
        (v, lv): (&[T], &CandleLayout),
    ) -> Result<(Vec<T>, Shape)> {
        let plan = self.plan(lq, lk, lv)?;
        let n: usize = plan.out_shape.iter().product();
        let mut out = vec![T::zeroed(); n];
        // The slopes are a handful of floats: read them (a copy of [heads] f32).
        let slopes = self
            .opts
            .alibi
            .as_ref()
            .map(|t| t.to_vec1::<f32>())
            .transpose()?;
        if n > 0 {
            DeviceTensor::borrow_scope(|s| -> forge_attn::Result<()> {
                let (qd, qs, qst) = from_offset(q, lq);
                let qt = s.host(qd, &qs, Some(&qst))?;
                let (kd, ks, kst) = from_offset(k, lk);
                let kt = s.host(kd, &ks, Some(&kst))?;
                let (vd, vs, vst) = from_offset(v, lv);
                let vt = s.host(vd, &vs, Some(&vst))?;
                let mut ot = s.host_mut(&mut out, &qs, None)?;
                let slopes = match &slopes {
                    Some(v) => Some(s.host(v.as_slice(), &[v.len()], None)?),
                    None => None,
                };
                let options = self.opts.forge(slopes);
                run_calls(
                    &CpuAttentionBackend,
                    &plan,
                    &options,
                    &qt,
                    &kt,
                    &vt,
                    &mut ot,
                )
            })
            .map_err(candle_core::Error::wrap)?;
        }
        Ok((out, Shape::from(plan.out_shape)))
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "forge-attn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CandleLayout,
        s2: &CpuStorage,
        l2: &CandleLayout,
        s3: &CpuStorage,
        l3: &CandleLayout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => self
                .cpu((q, l1), (k, l2), (v, l3))
                .map(|(o, s)| (CpuStorage::F32(o), s)),
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => self
                .cpu((q, l1), (k, l2), (v, l3))
                .map(|(o, s)| (CpuStorage::F16(o), s)),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => self
                .cpu((q, l1), (k, l2), (v, l3))
                .map(|(o, s)| (CpuStorage::BF16(o), s)),
            _ => candle_core::bail!(
                "q / k / v: expected one dtype of f32, f16 or bf16, got {:?} / {:?} / {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CandleLayout,
        s2: &candle_core::CudaStorage,
        l2: &CandleLayout,
        s3: &candle_core::CudaStorage,
        l3: &CandleLayout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let plan = self.plan(l1, l2, l3)?;
        cuda::forward(&plan, &self.opts, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varlen_offsets_are_checked() {
        assert!(Varlen::new(vec![0, 2], vec![0, 3], 2, 3).is_ok());
        for (q, k, mq, mk) in [
            (vec![0], vec![0], 1, 1),
            (vec![0, 2], vec![0, 3, 4], 2, 3),
            (vec![1, 2], vec![0, 3], 2, 3),
            (vec![0, 2, 1], vec![0, 3, 4], 2, 3),
            (vec![0, 5], vec![0, 3], 4, 3),
        ] {
            assert!(
                Varlen::new(q.clone(), k.clone(), mq, mk).is_err(),
                "{q:?} {k:?}"
            );
        }
    }
}
