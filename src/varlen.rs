//! Variable-length (packed ragged) batches: the sequences of a batch laid end to end.
//!
//! A varlen call takes Q packed as `[total_q, H, D]` and K/V as `[total_k, Hkv, D]`;
//! sequence `b` owns query rows `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]` and key rows
//! `cu_seqlens_k[b] .. cu_seqlens_k[b + 1]`. Each sequence is attended on its own, with
//! causal masking aligned bottom-right per sequence: query `i` of a sequence of `Lq`
//! queries and `Lk` keys sees key `j` iff `j <= i + Lk - Lq` (the options' windows and
//! ALiBi distances use the same aligned diagonal). A sequence with queries and no key
//! outputs zeros (log-sum-exp `-inf`, or its head's sink with sinks); one with no query
//! writes nothing. The log-sum-exp output of a varlen call is f32 `[H, total_q]`
//! (natural log), packed like the queries.

use crate::config::AttentionConfig;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::options::{check_per_head, AttentionOptions};
use crate::tensor::DeviceTensor;

/// The sequence boundaries of a packed ragged batch (see the [module docs](self)).
///
/// `cu_seqlens_q` and `cu_seqlens_k` are I32 tensors of `batch + 1` offsets on the call's
/// device: the first is 0, they never decrease, the last is the number of packed rows, and
/// no sequence is longer than `max_seqlen_q` (resp. `max_seqlen_k`). A backend checks them
/// on the host before anything runs (a download for device tensors) and reads them where
/// they are (the GPU kernels on the device).
#[derive(Debug, Clone)]
pub struct VarlenBatch {
    /// I32 `[batch + 1]` query offsets.
    pub cu_seqlens_q: DeviceTensor,
    /// I32 `[batch + 1]` key offsets.
    pub cu_seqlens_k: DeviceTensor,
    /// Most queries of one sequence.
    pub max_seqlen_q: usize,
    /// Most keys of one sequence.
    pub max_seqlen_k: usize,
}

/// The validated boundaries of a [`VarlenBatch`], on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarlenOffsets {
    /// `batch + 1` query offsets.
    pub q: Vec<usize>,
    /// `batch + 1` key offsets.
    pub k: Vec<usize>,
}

impl VarlenOffsets {
    /// Sequences.
    pub fn batch(&self) -> usize {
        self.q.len() - 1
    }

    /// Query rows of sequence `b`.
    pub fn q_range(&self, b: usize) -> std::ops::Range<usize> {
        self.q[b]..self.q[b + 1]
    }

    /// Key rows of sequence `b`.
    pub fn k_range(&self, b: usize) -> std::ops::Range<usize> {
        self.k[b]..self.k[b + 1]
    }

    /// The longest sequence's query and key rows (0 for an empty side).
    pub fn longest(&self) -> (usize, usize) {
        let longest = |o: &[usize]| o.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        (longest(&self.q), longest(&self.k))
    }
}

impl VarlenBatch {
    /// A batch from its offsets and maximum lengths (checked by [`validate`](Self::validate)
    /// when a call uses it).
    pub fn new(
        cu_seqlens_q: DeviceTensor,
        cu_seqlens_k: DeviceTensor,
        max_seqlen_q: usize,
        max_seqlen_k: usize,
    ) -> Self {
        VarlenBatch {
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
        }
    }

    /// A batch on `device` from host sequence lengths (`q_lens[b]` queries and `k_lens[b]`
    /// keys of sequence `b`); the maximum lengths are the largest given. Refuses lengths
    /// whose sums do not fit in i32 with [`AttentionError::InvalidConfig`].
    pub fn from_lengths(q_lens: &[usize], k_lens: &[usize], device: Device) -> Result<Self> {
        if q_lens.len() != k_lens.len() {
            return Err(AttentionError::shape(
                "k_lens",
                format!("{} lengths (one per sequence, as q_lens)", q_lens.len()),
                k_lens.len(),
            ));
        }
        let offsets = |field: &'static str, lens: &[usize]| -> Result<Vec<i32>> {
            let mut acc = 0usize;
            let mut out = vec![0i32];
            for &l in lens {
                acc = acc
                    .checked_add(l)
                    .filter(|&a| a <= i32::MAX as usize)
                    .ok_or_else(|| AttentionError::InvalidConfig {
                        field,
                        reason: format!("the lengths {lens:?} sum past i32::MAX ({})", i32::MAX),
                    })?;
                out.push(acc as i32);
            }
            Ok(out)
        };
        let cq = offsets("q_lens", q_lens)?;
        let ck = offsets("k_lens", k_lens)?;
        let n = [q_lens.len() + 1];
        Ok(VarlenBatch {
            cu_seqlens_q: DeviceTensor::from_host(&cq, &n, device)?,
            cu_seqlens_k: DeviceTensor::from_host(&ck, &n, device)?,
            max_seqlen_q: q_lens.iter().copied().max().unwrap_or(0),
            max_seqlen_k: k_lens.iter().copied().max().unwrap_or(0),
        })
    }

    /// Sequences (one less than the offsets).
    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.numel().saturating_sub(1)
    }

    /// Checks the offsets against a call of `total_q` packed query rows and `total_k` key
    /// rows on `device`, reading them to the host (a download for device tensors), and
    /// returns them. Refusals, each naming the tensor and the values: an offset tensor
    /// that is not I32 (`DTypeMismatch`) or not on `device` (`DeviceMismatch`); not rank 1
    /// with at least 2 entries, or `cu_seqlens_k` of another length than `cu_seqlens_q`
    /// (`ShapeMismatch`); a first offset other than 0, a decreasing offset, a last offset
    /// other than the rows, or a sequence longer than its maximum (`ShapeMismatch`).
    pub fn validate(
        &self,
        total_q: usize,
        total_k: usize,
        device: Device,
    ) -> Result<VarlenOffsets> {
        let q = read_offsets(
            "cu_seqlens_q",
            &self.cu_seqlens_q,
            total_q,
            "max_seqlen_q",
            self.max_seqlen_q,
            device,
        )?;
        let k = read_offsets(
            "cu_seqlens_k",
            &self.cu_seqlens_k,
            total_k,
            "max_seqlen_k",
            self.max_seqlen_k,
            device,
        )?;
        if k.len() != q.len() {
            return Err(AttentionError::shape(
                "cu_seqlens_k",
                format!("[{}] (as cu_seqlens_q: batch + 1 offsets)", q.len()),
                format!("[{}]", k.len()),
            ));
        }
        Ok(VarlenOffsets { q, k })
    }
}

/// Refuses a tensor that is not on `device`.
pub(crate) fn on_device(what: &str, t: &DeviceTensor, device: Device) -> Result<()> {
    if t.device() != device {
        return Err(AttentionError::DeviceMismatch {
            what: what.into(),
            expected: device.to_string(),
            got: t.device().to_string(),
        });
    }
    Ok(())
}

/// The packed query side of a call, checked: q, out (shaped like q, distinct elements,
/// overlapping none of `inputs`), the options and lse.
pub(crate) struct PackedQueries {
    /// (row, head) strides of q.
    pub q: (usize, usize),
    /// (row, head) strides of out.
    pub out: (usize, usize),
    /// (head, row) strides of lse.
    pub lse: Option<(usize, usize)>,
}

/// Checks the packed query side of a call on `device`: the config, q `[total_q, H, D]`,
/// out (shaped like q, distinct elements, overlapping none of `inputs` or the per-head
/// option tensors), the options (f32 `[H]` tensors on `device`) and lse (f32
/// `[H, total_q]`).
pub(crate) fn check_packed_queries(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    inputs: &[&DeviceTensor],
    out: &DeviceTensor,
    lse: Option<&DeviceTensor>,
    device: Device,
) -> Result<PackedQueries> {
    config.validate()?;
    on_device("q", q, device)?;
    q.dtype().check_attention("q")?;
    let (h, d, dtype) = (config.num_heads, config.head_dim, q.dtype());
    let qs = check_packed("q", q, None, h, d, dtype, device)?;
    let total_q = q.shape()[0];
    out.dtype().check_attention("out")?;
    let os = check_packed("out", out, Some(total_q), h, d, dtype, device)?;
    let mut all = inputs.to_vec();
    all.extend(options.alibi_slopes.as_ref());
    all.extend(options.sinks.as_ref());
    if !out.has_distinct_elements() {
        return Err(AttentionError::UnsupportedLayout {
            what: "out".into(),
            reason: format!(
                "the output (shape {:?}, strides {:?}) repeats elements: two results would land on one element",
                out.shape(),
                out.strides()
            ),
        });
    }
    if let Some(i) = all.iter().position(|t| out.may_overlap(t)) {
        return Err(AttentionError::UnsupportedLayout {
            what: "out".into(),
            reason: format!(
                "the output overlaps input {i} (shape {:?}, strides {:?}); give it its own memory",
                all[i].shape(),
                all[i].strides()
            ),
        });
    }
    options.validate()?;
    for (what, t) in [
        ("alibi_slopes", &options.alibi_slopes),
        ("sinks", &options.sinks),
    ] {
        if let Some(t) = t {
            check_per_head(what, t, h, device)?;
        }
    }
    all.push(out);
    let lse = lse
        .map(|l| check_packed_lse(l, h, total_q, device, &all))
        .transpose()?;
    Ok(PackedQueries {
        q: qs,
        out: os,
        lse,
    })
}

/// Checks the packed key side of a varlen call on `device`: k and v `[total_k, Hkv, D]`
/// of `q`'s dtype (the config's KV heads and head_dim) and both offset tensors there.
/// Returns the (row, head) strides of k and v; the offsets' values are checked by
/// [`VarlenBatch::validate`].
pub(crate) fn check_packed_keys(
    config: &AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    batch: &VarlenBatch,
    device: Device,
) -> Result<((usize, usize), (usize, usize))> {
    on_device("k", k, device)?;
    on_device("v", v, device)?;
    let (hkv, d) = (config.num_kv_heads, config.head_dim);
    let ks = check_packed("k", k, None, hkv, d, q.dtype(), device)?;
    let vs = check_packed("v", v, Some(k.shape()[0]), hkv, d, q.dtype(), device)?;
    on_device("cu_seqlens_q", &batch.cu_seqlens_q, device)?;
    on_device("cu_seqlens_k", &batch.cu_seqlens_k, device)?;
    Ok((ks, vs))
}

/// Checks one offset tensor (I32 `[batch + 1]` on `device`, from 0, non-decreasing, up to
/// `total`, no step above `max`) and returns its values.
pub(crate) fn read_offsets(
    what: &str,
    t: &DeviceTensor,
    total: usize,
    max_name: &str,
    max: usize,
    device: Device,
) -> Result<Vec<usize>> {
    check_i32(what, t, device)?;
    if t.rank() != 1 || t.numel() < 2 {
        return Err(AttentionError::shape(
            what,
            "rank 1 [batch + 1] with batch >= 1",
            format!("{:?}", t.shape()),
        ));
    }
    let raw = t.to_host::<i32>()?;
    if raw[0] != 0 {
        return Err(AttentionError::shape(format!("{what}[0]"), 0, raw[0]));
    }
    let mut out = Vec::with_capacity(raw.len());
    out.push(0usize);
    for (i, w) in raw.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(AttentionError::shape(
                what,
                "non-decreasing offsets",
                format!("offset {} = {} after offset {i} = {}", i + 1, w[1], w[0]),
            ));
        }
        // Non-decreasing from 0: never negative.
        let len = (w[1] - w[0]) as usize;
        if len > max {
            return Err(AttentionError::shape(
                format!("length of sequence {i} ({what})"),
                format!("at most {max_name} = {max}"),
                len,
            ));
        }
        out.push(w[1] as usize);
    }
    let last = out[out.len() - 1];
    if last != total {
        return Err(AttentionError::shape(
            format!("{what}[{}] (the last offset)", out.len() - 1),
            format!("{total} (the packed rows)"),
            last,
        ));
    }
    Ok(out)
}

/// An I32 tensor on `device`.
pub(crate) fn check_i32(what: &str, t: &DeviceTensor, device: Device) -> Result<()> {
    if t.dtype() != DType::I32 {
        return Err(AttentionError::DTypeMismatch {
            what: what.into(),
            expected: "i32".into(),
            got: t.dtype().to_string(),
        });
    }
    if t.device() != device {
        return Err(AttentionError::DeviceMismatch {
            what: what.into(),
            expected: device.to_string(),
            got: t.device().to_string(),
        });
    }
    Ok(())
}

/// A packed `[rows, heads, head_dim]` operand: float `dtype`, on `device`, head_dim
/// contiguous. Returns its (row, head) strides.
pub(crate) fn check_packed(
    what: &str,
    t: &DeviceTensor,
    rows: Option<usize>,
    heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
) -> Result<(usize, usize)> {
    let sh = t.shape();
    let rows_ok = rows.is_none_or(|r| sh.first() == Some(&r));
    if t.rank() != 3 || !rows_ok || sh[1] != heads || sh[2] != head_dim {
        let rows = rows.map_or("rows".to_string(), |r| r.to_string());
        return Err(AttentionError::shape(
            what,
            format!("[{rows}, {heads}, {head_dim}] ([rows, heads, head_dim])"),
            format!("{sh:?}"),
        ));
    }
    if t.dtype() != dtype {
        return Err(AttentionError::DTypeMismatch {
            what: what.into(),
            expected: dtype.to_string(),
            got: t.dtype().to_string(),
        });
    }
    if t.device() != device {
        return Err(AttentionError::DeviceMismatch {
            what: what.into(),
            expected: device.to_string(),
            got: t.device().to_string(),
        });
    }
    let st = t.strides();
    if head_dim > 1 && st[2] != 1 {
        return Err(AttentionError::UnsupportedLayout {
            what: what.into(),
            reason: format!(
                "head_dim must be contiguous (stride 1), got stride {}",
                st[2]
            ),
        });
    }
    Ok((st[0], st[1]))
}

/// A packed log-sum-exp output: f32 `[heads, total_q]` on `device`, distinct elements,
/// overlapping none of `others`. Returns its (head, row) strides.
pub(crate) fn check_packed_lse(
    lse: &DeviceTensor,
    heads: usize,
    total_q: usize,
    device: Device,
    others: &[&DeviceTensor],
) -> Result<(usize, usize)> {
    crate::options::check_lse_output(
        lse,
        &[heads, total_q],
        "[heads, total_q], packed",
        device,
        others,
    )?;
    let st = lse.strides();
    Ok((st[0], st[1]))
}
