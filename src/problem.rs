//! One attention call's shapes and strides, derived from the tensors and checked once,
//! shared by every backend and path.

use crate::config::{AttentionConfig, Layout};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::kernels::abi::Strides3;
use crate::tensor::DeviceTensor;

/// Element strides of one `[batch, head, seq, head_dim]` operand (head_dim stride is 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeadStrides {
    /// Batch stride.
    pub batch: usize,
    /// Head stride.
    pub head: usize,
    /// Sequence stride.
    pub seq: usize,
}

impl From<HeadStrides> for Strides3 {
    fn from(s: HeadStrides) -> Self {
        Strides3::new(s.batch, s.head, s.seq)
    }
}

/// Element strides of the additive mask over `[batch, head, query, key]`; broadcast
/// dimensions have stride 0 and the key stride is 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaskStrides {
    /// Batch stride (0 when broadcast).
    pub batch: usize,
    /// Head stride (0 when broadcast).
    pub head: usize,
    /// Query-row stride.
    pub query: usize,
}

impl From<MaskStrides> for Strides3 {
    fn from(s: MaskStrides) -> Self {
        Strides3::new(s.batch, s.head, s.query)
    }
}

/// A validated attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionProblem {
    /// Batch size.
    pub batch: usize,
    /// Query length.
    pub seq_q: usize,
    /// Key/value length.
    pub seq_k: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Bottom-right causal masking.
    pub causal: bool,
    /// Element type of Q, K, V and the output.
    pub dtype: DType,
    /// Device of every operand.
    pub device: Device,
    /// Q strides.
    pub q: HeadStrides,
    /// K strides.
    pub k: HeadStrides,
    /// V strides.
    pub v: HeadStrides,
    /// Mask strides, when a mask is given.
    pub mask: Option<MaskStrides>,
}

/// Reads `[B, S, H, D]` / `[B, H, S, D]` dims and strides of a rank-4 tensor.
fn operand(name: &str, t: &DeviceTensor, layout: Layout) -> Result<([usize; 4], HeadStrides)> {
    if t.rank() != 4 {
        let order = match layout {
            Layout::Bshd => "[batch, seq, heads, head_dim]",
            Layout::Bhsd => "[batch, heads, seq, head_dim]",
        };
        return Err(AttentionError::shape(
            name,
            format!("rank 4 {order}"),
            format!("{:?}", t.shape()),
        ));
    }
    let (sh, st) = (t.shape(), t.strides());
    let (s_ax, h_ax) = match layout {
        Layout::Bshd => (1, 2),
        Layout::Bhsd => (2, 1),
    };
    if sh[3] > 1 && st[3] != 1 {
        return Err(AttentionError::UnsupportedLayout {
            what: name.to_string(),
            reason: format!(
                "head_dim must be contiguous (stride 1), got stride {}",
                st[3]
            ),
        });
    }
    Ok((
        [sh[0], sh[s_ax], sh[h_ax], sh[3]],
        HeadStrides {
            batch: st[0],
            head: st[h_ax],
            seq: st[s_ax],
        },
    ))
}

/// Refuses every operand whose dtype attention does not compute on (the integer dtypes)
/// with [`AttentionError::DTypeMismatch`] naming it; the first check of every attention
/// entry point, so such a tensor never reaches a kernel lookup or a float conversion.
pub(crate) fn refuse_non_float(operands: &[(&str, &DeviceTensor)]) -> Result<()> {
    operands
        .iter()
        .try_for_each(|(what, t)| t.dtype().check_attention(what))
}

/// The additive mask is f32 whatever the dtype of Q, K and V.
fn check_mask_dtype(m: &DeviceTensor) -> Result<()> {
    if m.dtype() != DType::F32 {
        return Err(AttentionError::DTypeMismatch {
            what: "mask".into(),
            expected: "f32 (additive)".into(),
            got: m.dtype().to_string(),
        });
    }
    Ok(())
}

/// Refuses a `q` of `[b, sq, h, d]` whose heads or head_dim differ from `config` or that
/// holds no query.
fn check_query_dims(config: &AttentionConfig, dims: [usize; 4], q: &DeviceTensor) -> Result<()> {
    let [b, sq, h, d] = dims;
    if h != config.num_heads {
        return Err(AttentionError::shape("q heads", config.num_heads, h));
    }
    if d != config.head_dim {
        return Err(AttentionError::shape("q head_dim", config.head_dim, d));
    }
    if b == 0 || sq == 0 {
        return Err(AttentionError::shape(
            "q batch and seq",
            "both > 0",
            format!("{:?}", q.shape()),
        ));
    }
    Ok(())
}

/// What a cached call reads of its KV cache, as plain values: the keys' side of the
/// problem without a K tensor. K and V share `strides` (batch or page, head, position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachedKeys {
    /// Sequences.
    pub batch: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Element type of K and V.
    pub dtype: DType,
    /// Device of the cache.
    pub device: Device,
    /// Tokens of the longest sequence.
    pub max_len: usize,
    /// K and V strides.
    pub strides: HeadStrides,
}

impl AttentionProblem {
    /// Validates `config` and the operands against each other. Q, K and V of an integer
    /// dtype, and a mask of any dtype but f32, are refused first, with
    /// [`AttentionError::DTypeMismatch`].
    pub fn new(
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
    ) -> Result<Self> {
        refuse_non_float(&[("q", q), ("k", k), ("v", v)])?;
        if let Some(m) = mask {
            check_mask_dtype(m)?;
        }
        config.validate()?;
        let layout = config.layout;
        let ([b, sq, h, d], qs) = operand("q", q, layout)?;
        let ([kb, sk, hk, kd], ks) = operand("k", k, layout)?;
        let (vdims, vs) = operand("v", v, layout)?;
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype() != q.dtype() {
                return Err(AttentionError::DTypeMismatch {
                    what: name.into(),
                    expected: q.dtype().to_string(),
                    got: t.dtype().to_string(),
                });
            }
            if t.device() != q.device() {
                return Err(AttentionError::DeviceMismatch {
                    what: name.into(),
                    expected: q.device().to_string(),
                    got: t.device().to_string(),
                });
            }
        }
        check_query_dims(config, [b, sq, h, d], q)?;
        let kv_expect = [b, sk, config.num_kv_heads, config.head_dim];
        if [kb, sk, hk, kd] != kv_expect || sk == 0 {
            return Err(AttentionError::shape(
                "k (as [batch, seq, kv_heads, head_dim])",
                format!(
                    "[{b}, seq_k > 0, {}, {}]",
                    config.num_kv_heads, config.head_dim
                ),
                format!("{:?}", [kb, sk, hk, kd]),
            ));
        }
        if vdims != kv_expect {
            return Err(AttentionError::shape(
                "v (as [batch, seq, kv_heads, head_dim])",
                format!("{kv_expect:?} (same as k)"),
                format!("{vdims:?}"),
            ));
        }
        let mask = match mask {
            None => None,
            Some(m) => Some(Self::mask_strides(m, q.device(), b, h, sq, sk)?),
        };
        Ok(AttentionProblem {
            batch: b,
            seq_q: sq,
            seq_k: sk,
            num_heads: h,
            num_kv_heads: config.num_kv_heads,
            head_dim: d,
            scale: config.effective_scale(),
            causal: config.is_causal,
            dtype: q.dtype(),
            device: q.device(),
            q: qs,
            k: ks,
            v: vs,
            mask,
        })
    }

    /// Validates a cached call: `q` against `config` and against the cache `keys` (batch,
    /// KV heads, head_dim, dtype, device), the cache holding `extra` more tokens per sequence
    /// than now (a fused append). `seq_k` is the longest sequence's length then, and K and V
    /// take the cache's strides. Refusals: an integer `q` (`DTypeMismatch`), an invalid
    /// config (`InvalidConfig`), a `q` that is not rank 4, holds no query or differs from
    /// the config or the cache in shape (`ShapeMismatch`), a head_dim that is not contiguous
    /// (`UnsupportedLayout`), a cache of another dtype (`DTypeMismatch`) or device
    /// (`DeviceMismatch`), an empty cache (`ShapeMismatch`), a length that overflows with
    /// `extra` (`CapacityExceeded`).
    pub(crate) fn cached(
        config: &AttentionConfig,
        q: &DeviceTensor,
        keys: &CachedKeys,
        extra: usize,
    ) -> Result<Self> {
        refuse_non_float(&[("q", q)])?;
        config.validate()?;
        let (dims, qs) = operand("q", q, config.layout)?;
        if dims[0] != keys.batch {
            return Err(AttentionError::shape(
                "q batch (the cache's sequences)",
                keys.batch,
                format!("{:?}", q.shape()),
            ));
        }
        check_query_dims(config, dims, q)?;
        if keys.num_kv_heads != config.num_kv_heads {
            return Err(AttentionError::shape(
                "kv cache kv heads",
                config.num_kv_heads,
                keys.num_kv_heads,
            ));
        }
        if keys.head_dim != config.head_dim {
            return Err(AttentionError::shape(
                "kv cache head_dim",
                config.head_dim,
                keys.head_dim,
            ));
        }
        if keys.dtype != q.dtype() {
            return Err(AttentionError::DTypeMismatch {
                what: "kv cache".into(),
                expected: q.dtype().to_string(),
                got: keys.dtype.to_string(),
            });
        }
        if keys.device != q.device() {
            return Err(AttentionError::DeviceMismatch {
                what: "kv cache".into(),
                expected: q.device().to_string(),
                got: keys.device.to_string(),
            });
        }
        if keys.max_len.saturating_add(extra) == 0 {
            return Err(AttentionError::shape(
                "kv cache",
                "at least one cached token",
                "an empty cache",
            ));
        }
        let seq_k = keys.max_len.checked_add(extra).ok_or_else(|| {
            AttentionError::CapacityExceeded(format!(
                "{} cached tokens + {extra} new ones overflow usize",
                keys.max_len
            ))
        })?;
        Ok(AttentionProblem {
            batch: dims[0],
            seq_q: dims[1],
            seq_k,
            num_heads: dims[2],
            num_kv_heads: keys.num_kv_heads,
            head_dim: dims[3],
            scale: config.effective_scale(),
            causal: config.is_causal,
            dtype: q.dtype(),
            device: q.device(),
            q: qs,
            k: keys.strides,
            v: keys.strides,
            mask: None,
        })
    }

    fn mask_strides(
        m: &DeviceTensor,
        device: Device,
        b: usize,
        h: usize,
        sq: usize,
        sk: usize,
    ) -> Result<MaskStrides> {
        check_mask_dtype(m)?;
        if m.device() != device {
            return Err(AttentionError::DeviceMismatch {
                what: "mask".into(),
                expected: device.to_string(),
                got: m.device().to_string(),
            });
        }
        let (sh, st) = (m.shape(), m.strides());
        let wrong = || {
            AttentionError::shape(
                "mask",
                format!("[{sq}, {sk}], [{b} or 1, {sq}, {sk}] or [{b} or 1, {h} or 1, {sq}, {sk}]"),
                format!("{sh:?}"),
            )
        };
        let r = sh.len();
        if !(2..=4).contains(&r) || sh[r - 2] != sq || sh[r - 1] != sk {
            return Err(wrong());
        }
        if sk > 1 && st[r - 1] != 1 {
            return Err(AttentionError::UnsupportedLayout {
                what: "mask".into(),
                reason: format!(
                    "the key dimension must be contiguous, got stride {}",
                    st[r - 1]
                ),
            });
        }
        let bcast = |i: usize, full: usize| -> Result<usize> {
            match sh[i] {
                1 => Ok(0),
                n if n == full => Ok(st[i]),
                _ => Err(wrong()),
            }
        };
        let (batch, head) = match r {
            2 => (0, 0),
            3 => (bcast(0, b)?, 0),
            _ => (bcast(0, b)?, bcast(1, h)?),
        };
        Ok(MaskStrides {
            batch,
            head,
            query: if sq > 1 { st[r - 2] } else { 0 },
        })
    }

    /// Checks that `out` can receive this problem's result: the shape, dtype and device of
    /// `q`, head_dim contiguous, and no overlap with an input. Returns its strides.
    pub fn output_strides(
        &self,
        layout: Layout,
        out: &DeviceTensor,
        inputs: &[&DeviceTensor],
    ) -> Result<HeadStrides> {
        refuse_non_float(&[("out", out)])?;
        let (dims, st) = operand("out", out, layout)?;
        let want = [self.batch, self.seq_q, self.num_heads, self.head_dim];
        if dims != want {
            return Err(AttentionError::shape(
                "out (as [batch, seq, heads, head_dim])",
                format!("{want:?}"),
                format!("{dims:?}"),
            ));
        }
        if out.dtype() != self.dtype {
            return Err(AttentionError::DTypeMismatch {
                what: "out".into(),
                expected: self.dtype.to_string(),
                got: out.dtype().to_string(),
            });
        }
        if out.device() != self.device {
            return Err(AttentionError::DeviceMismatch {
                what: "out".into(),
                expected: self.device.to_string(),
                got: out.device().to_string(),
            });
        }
        if !out.has_distinct_elements() {
            return Err(AttentionError::UnsupportedLayout {
                what: "out".into(),
                reason: format!(
                    "the output (shape {:?}, strides {:?}) repeats elements (a zero or overlapping stride): two results would land on one element",
                    out.shape(),
                    out.strides()
                ),
            });
        }
        if let Some(i) = inputs.iter().position(|t| out.may_overlap(t)) {
            return Err(AttentionError::UnsupportedLayout {
                what: "out".into(),
                reason: format!(
                    "the output (shape {:?}, strides {:?}, offset {}) overlaps input {i} (shape {:?}, strides {:?}, offset {}); give it its own memory",
                    out.shape(),
                    out.strides(),
                    out.offset(),
                    inputs[i].shape(),
                    inputs[i].strides(),
                    inputs[i].offset()
                ),
            });
        }
        Ok(st)
    }

    /// KV head read by query head `h`. The fields are public, so a hand-built problem with
    /// 0 KV heads (or more KV than query heads) reads as a group size of 1, not a division
    /// by zero.
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.num_heads / self.num_kv_heads.max(1)).max(1)
    }

    /// Offset between a query index and the last key it may see under causal masking
    /// (saturating at the ends of `isize`; validated lengths are far from them, since every
    /// view holds at most `isize::MAX` bytes).
    pub fn causal_offset(&self) -> isize {
        let (k, q) = (self.seq_k as i128, self.seq_q as i128);
        (k - q).clamp(isize::MIN as i128, isize::MAX as i128) as isize
    }

    /// Matrix FLOPs, 4*B*H*Sq*Sk*D (the convention of FlashAttention's benchmarks);
    /// halved when causal and square. Multiplied in f64, so huge (broadcast) shapes give a
    /// large number, never a wrapped one.
    pub fn flops(&self) -> f64 {
        let f = [self.num_heads, self.seq_q, self.seq_k, self.head_dim]
            .iter()
            .fold(4.0 * self.batch as f64, |acc, &x| acc * x as f64);
        if self.causal {
            f / 2.0
        } else {
            f
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 sequences, 4 query heads over 2 KV heads, head_dim 16, BSHD.
    fn config() -> AttentionConfig {
        AttentionConfig::new(4 * 16, 4, 64).with_num_kv_heads(2)
    }

    fn keys() -> CachedKeys {
        CachedKeys {
            batch: 2,
            num_kv_heads: 2,
            head_dim: 16,
            dtype: DType::F32,
            device: Device::Cpu,
            max_len: 9,
            strides: HeadStrides {
                batch: 2 * 32 * 16,
                head: 32 * 16,
                seq: 16,
            },
        }
    }

    fn q(shape: &[usize], dtype: DType) -> DeviceTensor {
        DeviceTensor::zeros(shape, dtype, Device::Cpu).unwrap()
    }

    fn refused(config: &AttentionConfig, q: &DeviceTensor, keys: &CachedKeys) -> AttentionError {
        AttentionProblem::cached(config, q, keys, 0).unwrap_err()
    }

    fn shape_what(e: &AttentionError) -> &str {
        match e {
            AttentionError::ShapeMismatch { what, .. } => what,
            other => panic!("expected ShapeMismatch, got {other:?}"),
        }
    }

    #[test]
    fn a_cached_call_takes_the_cache_geometry() {
        let q3 = q(&[2, 3, 4, 16], DType::F32);
        let p = AttentionProblem::cached(&config(), &q3, &keys(), 0).unwrap();
        assert_eq!(
            (
                p.batch,
                p.seq_q,
                p.seq_k,
                p.num_heads,
                p.num_kv_heads,
                p.head_dim
            ),
            (2, 3, 9, 4, 2, 16)
        );
        assert_eq!((p.k, p.v), (keys().strides, keys().strides));
        assert_eq!(p.q, operand("q", &q3, Layout::Bshd).unwrap().1);
        assert_eq!((p.dtype, p.device, p.mask), (DType::F32, Device::Cpu, None));
        assert_eq!(p.scale, config().effective_scale());
        // A fused append of 3 tokens: the longest sequence then holds 12.
        let grown = AttentionProblem::cached(&config(), &q3, &keys(), 3).unwrap();
        assert_eq!(grown.seq_k, 12);
        // An empty cache is fine once the append gives it a token.
        let empty = CachedKeys {
            max_len: 0,
            ..keys()
        };
        assert_eq!(
            AttentionProblem::cached(&config(), &q3, &empty, 1)
                .unwrap()
                .seq_k,
            1
        );
        // BHSD: heads before positions, causal kept.
        let bhsd = config().with_layout(Layout::Bhsd).with_causal(true);
        let qh = q(&[2, 4, 3, 16], DType::F32);
        let p = AttentionProblem::cached(&bhsd, &qh, &keys(), 0).unwrap();
        assert_eq!((p.seq_q, p.num_heads, p.causal), (3, 4, true));
        assert_eq!(p.q.head, 3 * 16);
    }

    #[test]
    fn every_fault_of_a_cached_call_is_refused_with_its_type() {
        let (c, k) = (config(), keys());
        let good = q(&[2, 1, 4, 16], DType::F32);

        for dtype in [DType::I32, DType::U32, DType::I64] {
            let e = refused(&c, &q(&[2, 1, 4, 16], dtype), &k);
            assert!(
                matches!(&e, AttentionError::DTypeMismatch { what, got, .. } if what == "q" && *got == dtype.to_string()),
                "{e:?}"
            );
        }
        let e = refused(&c.clone().with_num_kv_heads(3), &good, &k);
        assert!(matches!(e, AttentionError::InvalidConfig { .. }), "{e:?}");

        let e = refused(&c, &q(&[2, 4, 16], DType::F32), &k);
        assert!(shape_what(&e).contains('q'), "{e:?}");
        // head_dim with stride 4 (a transposed view).
        let strided = q(&[2, 1, 16, 4], DType::F32)
            .permute(&[0, 1, 3, 2])
            .unwrap();
        let e = refused(&c, &strided, &k);
        assert!(
            matches!(&e, AttentionError::UnsupportedLayout { what, reason } if what == "q" && reason.contains("stride 4")),
            "{e:?}"
        );

        let e = refused(&c, &q(&[3, 1, 4, 16], DType::F32), &k);
        assert!(shape_what(&e).contains("batch"), "{e:?}");
        assert!(e.to_string().contains('3') && e.to_string().contains('2'));
        let e = refused(&c, &q(&[2, 1, 8, 16], DType::F32), &k);
        assert_eq!(shape_what(&e), "q heads");
        let e = refused(&c, &q(&[2, 1, 4, 8], DType::F32), &k);
        assert_eq!(shape_what(&e), "q head_dim");
        let e = refused(&c, &q(&[2, 0, 4, 16], DType::F32), &k);
        assert_eq!(shape_what(&e), "q batch and seq");

        let e = refused(
            &c,
            &good,
            &CachedKeys {
                num_kv_heads: 1,
                ..k
            },
        );
        assert_eq!(shape_what(&e), "kv cache kv heads");
        let e = refused(&c, &good, &CachedKeys { head_dim: 32, ..k });
        assert_eq!(shape_what(&e), "kv cache head_dim");
        assert!(e.to_string().contains("32"), "{e}");
        let e = refused(
            &c,
            &good,
            &CachedKeys {
                dtype: DType::BF16,
                ..k
            },
        );
        assert!(
            matches!(&e, AttentionError::DTypeMismatch { what, expected, got }
                if what == "kv cache" && expected == "f32" && got == "bf16"),
            "{e:?}"
        );
        let e = refused(
            &c,
            &good,
            &CachedKeys {
                device: Device::Cuda(0),
                ..k
            },
        );
        assert!(
            matches!(&e, AttentionError::DeviceMismatch { what, .. } if what == "kv cache"),
            "{e:?}"
        );
        let e = refused(&c, &good, &CachedKeys { max_len: 0, ..k });
        assert!(e.to_string().contains("empty"), "{e}");
        assert_eq!(shape_what(&e), "kv cache");
        let full = CachedKeys {
            max_len: usize::MAX,
            ..k
        };
        let e = AttentionProblem::cached(&c, &good, &full, 1).unwrap_err();
        assert!(
            matches!(&e, AttentionError::CapacityExceeded(m) if m.contains(&usize::MAX.to_string())),
            "{e:?}"
        );
    }
}
