//! Per-call attention options: sliding window, logits softcap, ALiBi, attention sinks, and
//! the log-sum-exp output with [`merge_states`](crate::merge_states) to combine partial
//! results by it.
//!
//! One [`AttentionOptions`] goes with a call
//! ([`DeviceAttentionBackend::forward_with`](crate::DeviceAttentionBackend::forward_with));
//! the default is plain attention. Conventions, for query `i` of `seq_q` and key `j` of
//! `seq_k`, with the bottom-right aligned query index `a_i = i + seq_k - seq_q` (the key
//! on query `i`'s causal diagonal):
//!
//! 1. the score is `s = scale * (q_i . k_j)`;
//! 2. softcap: `s = cap * tanh(s / cap)`;
//! 3. ALiBi: `s = s - slope[h] * |a_i - j|` (the same bias causal or not, as FlashAttention
//!    documents it);
//! 4. the additive mask is added (`-inf` removes the key);
//! 5. keys outside the window or past the causal cut are removed: key `j` is kept iff
//!    `a_i - left <= j <= a_i + right` (a bound of `None` is unbounded on that side) and,
//!    when causal, `j <= a_i`;
//! 6. with `m = max(max_j s_j, sink[h])`, the denominator is
//!    `L = sum_j exp(s_j - m) + exp(sink[h] - m)` (no sink term without sinks) and
//!    `out_i = sum_j exp(s_j - m) v_j / L`, `lse_i = m + ln(L)` (natural log).
//!
//! A row that keeps no key outputs zeros; its log-sum-exp is `-inf` without sinks and
//! `sink[h]` with them (the denominator holds the sink alone). A NaN anywhere in a row's
//! kept scores (or a NaN sink) makes its output and log-sum-exp NaN.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::problem::AttentionProblem;
use crate::tensor::DeviceTensor;

/// Largest window bound [`AttentionOptions::validate`] accepts, `2^62 - 1`: `a_i - left`
/// and `a_i + right` then fit in 64-bit signed arithmetic for any sequence. An unbounded
/// side is `None`, not a huge number.
pub const MAX_WINDOW: usize = (i64::MAX / 2) as usize;

/// Options of one attention call beyond the [`AttentionConfig`](crate::AttentionConfig)
/// (see the [module docs](self) for the exact conventions). Built with the `with_*`
/// methods from [`AttentionOptions::new`] (or `default()`), which is plain attention.
///
/// The same struct is meant for every kind of call (dense, cached and, later, packed
/// ragged or paged batches): a backend that cannot run an option refuses the call with
/// [`AttentionError::NotSupported`] naming it.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AttentionOptions {
    /// Keys kept to the left of the aligned diagonal (`a_i - left <= j`); `None`: all.
    pub window_left: Option<usize>,
    /// Keys kept to the right of the aligned diagonal (`j <= a_i + right`); `None`: all.
    pub window_right: Option<usize>,
    /// Logits softcap `cap` (`s -> cap * tanh(s / cap)` on the scaled score); finite, > 0.
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per query head: f32 `[num_heads]` on the call's device.
    pub alibi_slopes: Option<DeviceTensor>,
    /// Attention-sink logits, one per query head: f32 `[num_heads]` on the call's device.
    pub sinks: Option<DeviceTensor>,
}

impl AttentionOptions {
    /// Plain attention: no window, no softcap, no ALiBi, no sinks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the sliding window `(left, right)` in keys around the aligned diagonal (see the
    /// [module docs](self)); `None` leaves that side unbounded. Mistral-style causal
    /// sliding window `W` is `with_window(Some(W - 1), Some(0))` (or `Some(W - 1), None`
    /// with causal on).
    pub fn with_window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window_left = left;
        self.window_right = right;
        self
    }

    /// Sets the logits softcap.
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Sets the ALiBi slopes (f32 `[num_heads]`).
    pub fn with_alibi_slopes(mut self, slopes: DeviceTensor) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// Sets the attention-sink logits (f32 `[num_heads]`).
    pub fn with_sinks(mut self, sinks: DeviceTensor) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// Whether a window bound is set on either side.
    pub fn has_window(&self) -> bool {
        self.window_left.is_some() || self.window_right.is_some()
    }

    /// Whether no option is set (plain attention).
    pub fn is_default(&self) -> bool {
        self.requested().is_empty()
    }

    /// Names of the options that are set, in a fixed order: `"window"`, `"softcap"`,
    /// `"alibi_slopes"`, `"sinks"`.
    pub fn requested(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.has_window() {
            names.push("window");
        }
        if self.softcap.is_some() {
            names.push("softcap");
        }
        if self.alibi_slopes.is_some() {
            names.push("alibi_slopes");
        }
        if self.sinks.is_some() {
            names.push("sinks");
        }
        names
    }

    /// Checks the options that need no call: window bounds at most [`MAX_WINDOW`] and a
    /// softcap that is finite and > 0. Refusals are [`AttentionError::InvalidConfig`]
    /// naming the field with the given and the expected value.
    pub fn validate(&self) -> Result<()> {
        for (field, bound) in [
            ("window_left", self.window_left),
            ("window_right", self.window_right),
        ] {
            if let Some(w) = bound {
                if w > MAX_WINDOW {
                    return Err(AttentionError::InvalidConfig {
                        field,
                        reason: format!(
                            "expected at most {MAX_WINDOW} (MAX_WINDOW; None for unbounded), got {w}"
                        ),
                    });
                }
            }
        }
        if let Some(cap) = self.softcap {
            if !cap.is_finite() || cap <= 0.0 {
                return Err(AttentionError::InvalidConfig {
                    field: "softcap",
                    reason: format!("expected a finite value > 0, got {cap}"),
                });
            }
        }
        Ok(())
    }

    /// Checks the options against a validated call: [`validate`](Self::validate), then the
    /// per-head tensors (f32, `[num_heads]`, on the call's device) and `lse` (see
    /// [`check_lse`]). Returns the strides of `lse`.
    pub(crate) fn check(
        &self,
        p: &AttentionProblem,
        lse: Option<&DeviceTensor>,
        others: &[&DeviceTensor],
    ) -> Result<Option<LseStrides>> {
        self.validate()?;
        for (what, t) in [("alibi_slopes", &self.alibi_slopes), ("sinks", &self.sinks)] {
            if let Some(t) = t {
                check_per_head(what, t, p.num_heads, p.device)?;
            }
        }
        lse.map(|l| check_lse(l, p.batch, p.num_heads, p.seq_q, p.device, others))
            .transpose()
    }
}

/// Element strides of a log-sum-exp tensor over `[batch, head, query]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LseStrides {
    pub batch: usize,
    pub head: usize,
    pub query: usize,
}

/// An f32 `[heads]` tensor on `device`.
pub(crate) fn check_per_head(
    what: &str,
    t: &DeviceTensor,
    heads: usize,
    device: Device,
) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(AttentionError::DTypeMismatch {
            what: what.into(),
            expected: "f32".into(),
            got: t.dtype().to_string(),
        });
    }
    if t.shape() != [heads] {
        return Err(AttentionError::shape(
            what,
            format!("[{heads}] (one per query head)"),
            format!("{:?}", t.shape()),
        ));
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

/// A log-sum-exp tensor that can be written: f32 `[batch, heads, seq_q]` on `device`, any
/// strides that give every element its own address, overlapping none of `others`.
pub(crate) fn check_lse(
    lse: &DeviceTensor,
    batch: usize,
    heads: usize,
    seq_q: usize,
    device: Device,
    others: &[&DeviceTensor],
) -> Result<LseStrides> {
    check_lse_output(
        lse,
        &[batch, heads, seq_q],
        "[batch, heads, seq_q]",
        device,
        others,
    )?;
    let st = lse.strides();
    Ok(LseStrides {
        batch: st[0],
        head: st[1],
        query: st[2],
    })
}

/// Any log-sum-exp output (dense or packed): f32 of shape `shape` (named `dims` in
/// messages) on `device`, distinct elements, overlapping none of `others`.
pub(crate) fn check_lse_output(
    lse: &DeviceTensor,
    shape: &[usize],
    dims: &str,
    device: Device,
    others: &[&DeviceTensor],
) -> Result<()> {
    if lse.dtype() != DType::F32 {
        return Err(AttentionError::DTypeMismatch {
            what: "lse".into(),
            expected: "f32".into(),
            got: lse.dtype().to_string(),
        });
    }
    if lse.shape() != shape {
        return Err(AttentionError::shape(
            "lse",
            format!("{shape:?} ({dims})"),
            format!("{:?}", lse.shape()),
        ));
    }
    if lse.device() != device {
        return Err(AttentionError::DeviceMismatch {
            what: "lse".into(),
            expected: device.to_string(),
            got: lse.device().to_string(),
        });
    }
    if !lse.has_distinct_elements() {
        return Err(AttentionError::UnsupportedLayout {
            what: "lse".into(),
            reason: format!(
                "strides {:?} for shape {:?} map several elements to one address",
                lse.strides(),
                lse.shape()
            ),
        });
    }
    if let Some(i) = others.iter().position(|t| lse.may_overlap(t)) {
        return Err(AttentionError::UnsupportedLayout {
            what: "lse".into(),
            reason: format!(
                "overlaps operand {i} (shape {:?}, strides {:?}); give it its own memory",
                others[i].shape(),
                others[i].strides()
            ),
        });
    }
    Ok(())
}

/// The refusal of a backend that runs none of the requested options (or no `lse`): a
/// [`AttentionError::NotSupported`] naming them, or `None` when nothing is requested.
pub(crate) fn refusal(
    backend: &str,
    options: &AttentionOptions,
    wants_lse: bool,
) -> Option<AttentionError> {
    unsupported_reason(options, wants_lse).map(|reason| AttentionError::NotSupported {
        backend: backend.into(),
        reason,
    })
}

/// Why a path that runs no per-call option cannot take `options` (and an `lse` output
/// when `wants_lse`), or `None` when nothing is requested.
pub(crate) fn unsupported_reason(options: &AttentionOptions, wants_lse: bool) -> Option<String> {
    let mut names = options.requested();
    if wants_lse {
        names.push("lse output");
    }
    (!names.is_empty()).then(|| {
        format!(
            "per-call options are not implemented on this path; requested: {}",
            names.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_names_every_option_in_order() {
        let t = DeviceTensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        assert!(AttentionOptions::new().is_default());
        let o = AttentionOptions::new()
            .with_sinks(t.clone())
            .with_softcap(30.0)
            .with_window(None, Some(0))
            .with_alibi_slopes(t);
        assert_eq!(
            o.requested(),
            ["window", "softcap", "alibi_slopes", "sinks"]
        );
        assert!(!o.is_default());
        assert!(AttentionOptions::new()
            .with_window(Some(3), None)
            .has_window());
    }

    #[test]
    fn the_reason_names_the_options_and_the_lse() {
        let o = AttentionOptions::new().with_softcap(5.0);
        assert_eq!(unsupported_reason(&AttentionOptions::new(), false), None);
        let r = unsupported_reason(&o, true).unwrap();
        assert!(r.contains("softcap, lse output"), "{r}");
        let e = refusal("gpu", &o, false).unwrap();
        assert!(
            matches!(&e, AttentionError::NotSupported { backend, reason } if backend == "gpu" && reason.contains("softcap")),
            "{e}"
        );
    }
}
