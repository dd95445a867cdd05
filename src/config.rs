//! Attention configuration, tensor layouts and KV-cache layouts.

use crate::error::{AttentionError, Result};

/// Largest softmax scale [`AttentionConfig::validate`] accepts. Models use
/// `1/sqrt(head_dim)` (at most 1) or a small multiple of it; a scale far above that makes
/// `scale * q.k` overflow f32 to infinity for ordinary activations, so the softmax of such
/// scores is NaN or zero instead of a number. 65536 (2^16) leaves ample room for unusual
/// models while keeping f16-range scores finite in f32.
pub const MAX_SCALE: f32 = 65536.0;

/// Memory order of the four attention dimensions of Q, K, V and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Layout {
    /// `[batch, seq, heads, head_dim]` (the host-slice API's order).
    #[default]
    Bshd,
    /// `[batch, heads, seq, head_dim]`.
    Bhsd,
}

/// How a backend wants its KV cache stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvCacheLayout {
    /// `[batch, kv_heads, max_seq, head_dim]`, one contiguous buffer.
    Contiguous,
    /// Paged: fixed-size pages from a pool plus a block table per sequence.
    BlockSparse,
    /// The flash kernels' layout; the same memory order as `Contiguous`.
    FlashAttention,
}

/// Everything about an attention call that is not the data itself.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    /// Model dimension: `num_heads * head_dim`.
    pub dim: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
    /// Longest sequence (query or key) this config is meant for.
    pub max_sequence_length: usize,
    /// Bottom-right aligned causal masking.
    pub is_causal: bool,
    /// Dropout probability; inference only, so it must be 0.
    pub dropout: f32,
    /// Key/value heads (GQA/MQA); equal to `num_heads` for plain multi-head attention.
    pub num_kv_heads: usize,
    /// Batch size the host-slice adapter splits its inputs by.
    pub batch_size: usize,
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Memory order of Q, K, V and the output.
    pub layout: Layout,
}

impl AttentionConfig {
    /// A config for `num_heads` heads of `dim / num_heads` each, plain multi-head, non-causal.
    pub fn new(dim: usize, num_heads: usize, max_sequence_length: usize) -> Self {
        let head_dim = dim.checked_div(num_heads).unwrap_or(0);
        AttentionConfig {
            dim,
            num_heads,
            head_dim,
            max_sequence_length,
            is_causal: false,
            dropout: 0.0,
            num_kv_heads: num_heads,
            batch_size: 1,
            scale: None,
            layout: Layout::Bshd,
        }
    }

    /// Sets causal masking.
    pub fn with_causal(mut self, is_causal: bool) -> Self {
        self.is_causal = is_causal;
        self
    }

    /// Sets the dropout probability (only 0 validates).
    pub fn with_dropout(mut self, dropout: f32) -> Self {
        self.dropout = dropout;
        self
    }

    /// Sets the head dimension explicitly.
    pub fn with_head_dim(mut self, head_dim: usize) -> Self {
        self.head_dim = head_dim;
        self
    }

    /// Sets the number of key/value heads (GQA/MQA).
    pub fn with_num_kv_heads(mut self, num_kv_heads: usize) -> Self {
        self.num_kv_heads = num_kv_heads;
        self
    }

    /// Sets the batch size used by the host-slice adapter.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets the softmax scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Sets the memory layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the maximum sequence length.
    pub fn with_max_sequence_length(mut self, max_sequence_length: usize) -> Self {
        self.max_sequence_length = max_sequence_length;
        self
    }

    /// The softmax scale in effect.
    pub fn effective_scale(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim.max(1) as f32).sqrt())
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads.max(1)
    }

    /// Checks every field; the error names the field, the given and the expected value.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| {
            Err(AttentionError::InvalidConfig { field, reason })
        };
        if self.num_heads == 0 {
            return bad("num_heads", "must be > 0, got 0".into());
        }
        if self.head_dim == 0 {
            return bad("head_dim", "must be > 0, got 0".into());
        }
        if self.dim == 0 {
            return bad("dim", "must be > 0, got 0".into());
        }
        if self.num_kv_heads == 0 {
            return bad("num_kv_heads", "must be > 0, got 0".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be > 0, got 0".into());
        }
        if self.max_sequence_length == 0 {
            return bad("max_sequence_length", "must be > 0, got 0".into());
        }
        match self.num_heads.checked_mul(self.head_dim) {
            None => {
                return bad(
                    "dim",
                    format!(
                        "num_heads * head_dim = {} * {} overflows usize (dim given: {})",
                        self.num_heads, self.head_dim, self.dim
                    ),
                )
            }
            Some(product) if product != self.dim => {
                return bad(
                    "dim",
                    format!(
                        "expected num_heads * head_dim = {} * {} = {product}, got {}",
                        self.num_heads, self.head_dim, self.dim
                    ),
                )
            }
            Some(_) => {}
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_kv_heads",
                format!(
                    "num_heads ({}) must be a multiple of num_kv_heads ({})",
                    self.num_heads, self.num_kv_heads
                ),
            );
        }
        if !(self.dropout == 0.0) {
            return bad(
                "dropout",
                format!("inference only: expected 0, got {}", self.dropout),
            );
        }
        if let Some(s) = self.scale {
            if !s.is_finite() || s <= 0.0 || s > MAX_SCALE {
                return bad(
                    "scale",
                    format!("expected a finite value > 0 and <= {MAX_SCALE} (MAX_SCALE), got {s}"),
                );
            }
        }
        Ok(())
    }
}
