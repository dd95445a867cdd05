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
