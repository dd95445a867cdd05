//! The device-resident attention API: [`DeviceAttentionBackend`] and what it reports.

use crate::config::{AttentionConfig, KvCacheLayout, Layout};
use crate::device::Device;
use crate::error::{AttentionError, Result};
use crate::kv_cache::KvCache;
use crate::options::{self, AttentionOptions};
use crate::paged::PagedKv;
use crate::problem::AttentionProblem;
use crate::tensor::DeviceTensor;
use crate::varlen::VarlenBatch;

mod merge_states;
pub use merge_states::merge_states;
pub mod cpu;
pub mod gpu;

/// Whether a backend can run a config, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// The backend runs this config.
    Yes,
    /// It does not; the reason is meant for people.
    No(String),
}

impl Support {
    /// True for [`Support::Yes`].
    pub fn is_yes(&self) -> bool {
        matches!(self, Support::Yes)
    }
}

/// Which fused kernel family a flash launch used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FlashKernel {
    /// No mask, not causal.
    NonCausal,
    /// Causal (bottom-right), no additive mask.
    Causal,
    /// Additive mask, with or without causal (`flash_attention_masked.hip`).
    Masked,
    /// Split-KV decode for short query blocks against a long cache.
    Decode,
}

/// The code path that computed (or would compute) an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AttentionPath {
    /// The CPU backend's tiled online-softmax loop.
    Cpu,
    /// The unfused device path: scores, softmax, PV in three launches.
    Traditional,
    /// A fused flash kernel.
    Flash(FlashKernel),
}

impl std::fmt::Display for AttentionPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttentionPath::Cpu => write!(f, "cpu"),
            AttentionPath::Traditional => write!(f, "traditional"),
            AttentionPath::Flash(k) => write!(f, "flash-{k:?}"),
        }
    }
}

/// Attention computed from tensors that stay on their device.
///
/// `forward_into` writes into a caller-owned output so a decode loop allocates nothing per
/// step; `forward` allocates the output. Q is `[B, Sq, H, D]` (or `[B, H, Sq, D]` with
/// `Layout::Bhsd`), K and V `[B, Sk, Hkv, D]` (resp. `[B, Hkv, Sk, D]`), the optional
/// additive f32 mask broadcasts from `[Sq, Sk]`, `[B, Sq, Sk]` or `[B, H, Sq, Sk]`.
pub trait DeviceAttentionBackend: Send + Sync {
    /// Backend name, unique within a registry.
    fn name(&self) -> &str;

    /// The device whose tensors this backend computes on.
    fn device(&self) -> Device;

    /// Whether this backend runs `config` (on its device), or why not. The default runs
    /// every config that validates; backends with narrower coverage override it.
    fn supports(&self, config: &AttentionConfig) -> Support {
        match config.validate() {
            Ok(()) => Support::Yes,
            Err(e) => Support::No(e.to_string()),
        }
    }

    /// The KV-cache layout this backend reads.
    fn required_kv_layout(&self) -> KvCacheLayout;

    /// Whether this backend runs `config` with the per-call `options`, or why not. The
    /// default runs no option: plain options give [`supports`](Self::supports), any other
    /// is [`Support::No`] naming the options set.
    fn supports_with(&self, config: &AttentionConfig, options: &AttentionOptions) -> Support {
        if let Err(e) = options.validate() {
            return Support::No(e.to_string());
        }
        match options::unsupported_reason(options, false) {
            Some(reason) => Support::No(reason),
            None => self.supports(config),
        }
    }

    /// Computes attention into `out` (same shape, dtype, device and layout as `q`) and
    /// returns the path taken.
    fn forward_into(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath>;

    /// Attention of `q` (`[B, Sq, H, D]`, or `[B, H, Sq, D]` with `Layout::Bhsd`) against
    /// every token `cache` holds, into `out` (shaped like `q`); returns the path taken.
    /// Each sequence attends over its own length; causal aligns a sequence's queries with
    /// its last keys (query `i` of a sequence holding `L` tokens sees key `j` iff
    /// `j <= i + L - Sq`).
    ///
    /// The default runs [`forward_into`](Self::forward_into) over [`KvCache::views`], so it
    /// takes contiguous caches whose sequences all hold the same number of tokens and refuses
    /// the others (paged, ragged) with [`AttentionError::NotSupported`]. The CPU backend
    /// attends over every cache natively; the GPU backend runs its split-KV decode kernel.
    fn forward_cached(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        if cache.lengths().iter().all(|&l| l == 0) {
            return Err(AttentionError::shape(
                "kv cache",
                "at least one cached token",
                "an empty cache",
            ));
        }
        let (k, v) = cache
            .views()
            .map_err(|e| AttentionError::NotSupported {
                backend: self.name().into(),
                reason: format!(
                    "no cached attention of its own, and dense views of the cache are not possible: {e}"
                ),
            })?;
        // The views are BSHD; a BHSD call takes them with heads before positions.
        let (k, v) = match config.layout {
            Layout::Bshd => (k, v),
            Layout::Bhsd => (k.permute(&[0, 2, 1, 3])?, v.permute(&[0, 2, 1, 3])?),
        };
        self.forward_into(config, q, &k, &v, None, out)
    }

    /// [`forward_into`](Self::forward_into) with per-call `options` (window, softcap,
    /// ALiBi, sinks; see [`crate::options`] for the conventions) and, when `lse` is given,
    /// the natural log-sum-exp of each row's softmax denominator written to it (f32
    /// `[B, H, Sq]`, any strides that do not repeat elements; `-inf` for a row that keeps
    /// no key and has no sink).
    ///
    /// Everything is checked before anything is written: the call as `forward_into` checks
    /// it, then [`AttentionOptions::validate`], the per-head tensors (f32 `[H]` on the
    /// call's device) and `lse`. The default implementation runs no option: with plain
    /// options and no `lse` it is `forward_into`, otherwise
    /// [`AttentionError::NotSupported`] naming what was asked for. The CPU backend runs
    /// every option.
    #[allow(clippy::too_many_arguments)]
    fn forward_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let p = AttentionProblem::new(config, q, k, v, mask)?;
        let mut others = vec![q, k, v];
        others.extend(mask);
        others.push(&*out);
        options.check(&p, lse.as_deref(), &others)?;
        if let Some(e) = options::refusal(self.name(), options, lse.is_some()) {
            return Err(e);
        }
        self.forward_into(config, q, k, v, mask, out)
    }

    /// [`forward_cached`](Self::forward_cached) with per-call `options` and an optional
    /// `lse` output, as [`forward_with`](Self::forward_with) (the aligned diagonal of a
    /// sequence holding `L` tokens is `i + L - Sq`). The default runs no option: with plain
    /// options and no `lse` it is `forward_cached`, otherwise
    /// [`AttentionError::NotSupported`].
    fn forward_cached_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        options.validate()?;
        if let Some(e) = options::refusal(self.name(), options, lse.is_some()) {
            return Err(e);
        }
        self.forward_cached(config, q, cache, out)
    }

    /// Attention over a packed ragged batch (see [`crate::varlen`]): `q` `[total_q, H, D]`,
    /// `k`/`v` `[total_k, Hkv, D]`, sequence `b` owning the rows `batch` gives it, each
    /// sequence on its own with causal aligned bottom-right per sequence; `out` is shaped
    /// like `q`; `lse`, when given, receives f32 `[H, total_q]` (natural log, packed like
    /// the queries). `options` as in [`forward_with`](Self::forward_with);
    /// `config.layout` does not apply (packed operands have one order) and
    /// `config.max_sequence_length` does not bound the lengths (`batch`'s maxima do).
    ///
    /// Everything is checked before anything is written. The default refuses with
    /// [`AttentionError::NotSupported`]; the CPU and GPU backends run it.
    #[allow(clippy::too_many_arguments)]
    fn forward_varlen(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        batch: &VarlenBatch,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let _ = (config, options, q, k, v, batch, out, lse);
        Err(AttentionError::NotSupported {
            backend: self.name().into(),
            reason: "varlen (packed ragged) attention is not implemented on this backend".into(),
        })
    }

    /// Attention of `q` (`[B, Sq, H, D]`, or `[B, H, Sq, D]` with `Layout::Bhsd`) over the
    /// caller's pages `kv` (see [`crate::paged`]), into `out` shaped like `q`: any number
    /// of queries per sequence (decode, speculative verification, chunked prefill), each
    /// sequence over its own length `L` with causal aligned bottom-right (query `i` sees
    /// key `j` iff `j <= i + L - Sq`); a sequence of length 0 gives zeros. `lse`, when
    /// given, receives f32 `[B, H, Sq]`; `options` as in [`forward_with`](Self::forward_with).
    ///
    /// Everything is checked ([`PagedKv::validate`] included) before anything is written.
    /// The default refuses with [`AttentionError::NotSupported`]; the CPU and GPU backends
    /// run it.
    fn forward_paged(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        kv: &PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let _ = (config, options, q, kv, out, lse);
        Err(AttentionError::NotSupported {
            backend: self.name().into(),
            reason: "paged attention over caller-owned pages is not implemented on this backend"
                .into(),
        })
    }

    /// [`forward_paged`](Self::forward_paged) with packed queries, for chunked prefill
    /// mixed with decodes in one call: `q` `[total_q, H, D]`, sequence `b` owning query
    /// rows `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]` (I32 `[B + 1]` offsets as in
    /// [`VarlenBatch`], at most `max_seqlen_q` each) against its `L` paged tokens, causal
    /// aligned bottom-right; `lse` f32 `[H, total_q]`. The default refuses with
    /// [`AttentionError::NotSupported`]; the CPU and GPU backends run it.
    #[allow(clippy::too_many_arguments)]
    fn forward_paged_varlen(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cu_seqlens_q: &DeviceTensor,
        max_seqlen_q: usize,
        kv: &PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let _ = (config, options, q, cu_seqlens_q, max_seqlen_q, kv, out, lse);
        Err(AttentionError::NotSupported {
            backend: self.name().into(),
            reason: "paged attention with packed queries is not implemented on this backend".into(),
        })
    }

    /// Computes attention into a newly allocated output shaped like `q`.
    fn forward(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
    ) -> Result<DeviceTensor> {
        AttentionProblem::new(config, q, k, v, mask)?;
        let mut out = DeviceTensor::zeros(q.shape(), q.dtype(), q.device())?;
        self.forward_into(config, q, k, v, mask, &mut out)?;
        Ok(out)
    }
}
