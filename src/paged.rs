//! Paged K/V in pools the caller owns, read through a block table.
//!
//! [`PagedKv`] describes one layer's keys and values as pages of `page_size` tokens in a
//! K pool and a V pool, a block table naming the pages of each sequence in order, and each
//! sequence's length. Token `j` of sequence `b` lies at position `j % page_size` of page
//! `block_table[b, j / page_size]`. Nothing is copied: attention reads the pools where
//! they are. A [`KvCache`](crate::KvCache) that is paged gives such a view of itself
//! ([`KvCache::paged_view`](crate::KvCache::paged_view)).

use crate::config::AttentionConfig;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::problem::HeadStrides;
use crate::tensor::DeviceTensor;
use crate::varlen::check_i32;

/// The order of a page pool's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PageLayout {
    /// `[num_pages, page_size, Hkv, D]` (FlashAttention's and vLLM's order).
    #[default]
    Nhd,
    /// `[num_pages, Hkv, page_size, D]` (the order of [`KvCache::paged`](crate::KvCache::paged)).
    Hnd,
}

/// Paged K/V over the caller's pools (see the [module docs](self)).
///
/// - `k_pages`, `v_pages`: the pools, `[num_pages, page_size, Hkv, D]` ([`PageLayout::Nhd`])
///   or `[num_pages, Hkv, page_size, D]` ([`PageLayout::Hnd`]), any strides with head_dim
///   contiguous, one float dtype;
/// - `block_table`: I32 `[B, max_pages]` page ids; only the entries of the pages a sequence
///   uses (`ceil(len / page_size)`) are read, the rest may hold anything;
/// - `seq_lens`: I32 `[B]` tokens of each sequence, `0 <= len <= max_pages * page_size`;
/// - `page_size`: tokens per page, at least 1 (it must match the pools' shape).
///
/// All on one device, the call's.
#[derive(Debug, Clone)]
pub struct PagedKv {
    /// The K pool.
    pub k_pages: DeviceTensor,
    /// The V pool (the same shape as `k_pages`).
    pub v_pages: DeviceTensor,
    /// I32 `[B, max_pages]` page ids.
    pub block_table: DeviceTensor,
    /// I32 `[B]` sequence lengths.
    pub seq_lens: DeviceTensor,
    /// Tokens per page.
    pub page_size: usize,
    /// Dimension order of the pools.
    pub layout: PageLayout,
}

/// The validated geometry of a [`PagedKv`], with its block table and lengths on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedGeometry {
    /// Sequences.
    pub batch: usize,
    /// Pages in the pool.
    pub num_pages: usize,
    /// Entries of a block-table row.
    pub max_pages: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens of each sequence.
    pub lens: Vec<usize>,
    /// The block table, row-major `[batch, max_pages]`.
    pub table: Vec<i32>,
}

impl PagedGeometry {
    /// Reads and checks the packed query offsets of a paged call over this geometry
    /// (`cu_seqlens_q`: I32 `[batch + 1]` on `device`, as [`VarlenBatch`](crate::VarlenBatch)
    /// checks them against `total_q` rows and `max_seqlen_q`, one entry more than the block
    /// table has sequences).
    pub(crate) fn query_offsets(
        &self,
        cu_seqlens_q: &DeviceTensor,
        total_q: usize,
        max_seqlen_q: usize,
        device: Device,
    ) -> Result<Vec<usize>> {
        let offs = crate::varlen::read_offsets(
            "cu_seqlens_q",
            cu_seqlens_q,
            total_q,
            "max_seqlen_q",
            max_seqlen_q,
            device,
        )?;
        if offs.len() != self.batch + 1 {
            return Err(AttentionError::shape(
                "cu_seqlens_q",
                format!(
                    "[{}] (one more than the block table's sequences)",
                    self.batch + 1
                ),
                format!("[{}]", offs.len()),
            ));
        }
        Ok(offs)
    }

    /// Page id and position within it of token `j` of sequence `b` (`j < lens[b]`).
    pub fn locate(&self, b: usize, j: usize, page_size: usize) -> (usize, usize) {
        let id = self.table[b * self.max_pages + j / page_size];
        // validate() checked every entry a held token uses.
        (id as usize, j % page_size)
    }
}

impl PagedKv {
    /// A view over the caller's pools, checked by [`validate`](Self::validate) when a call
    /// uses it.
    pub fn new(
        k_pages: DeviceTensor,
        v_pages: DeviceTensor,
        block_table: DeviceTensor,
        seq_lens: DeviceTensor,
        page_size: usize,
        layout: PageLayout,
    ) -> Self {
        PagedKv {
            k_pages,
            v_pages,
            block_table,
            seq_lens,
            page_size,
            layout,
        }
    }

    /// Device of the pools.
    pub fn device(&self) -> Device {
        self.k_pages.device()
    }

    /// Element type of the pools.
    pub fn dtype(&self) -> DType {
        self.k_pages.dtype()
    }

    /// (page, head, position) element strides of a pool.
    pub(crate) fn strides_of(&self, t: &DeviceTensor) -> HeadStrides {
        let s = t.strides();
        match self.layout {
            PageLayout::Nhd => HeadStrides {
                batch: s[0],
                head: s[2],
                seq: s[1],
            },
            PageLayout::Hnd => HeadStrides {
                batch: s[0],
                head: s[1],
                seq: s[2],
            },
        }
    }

    /// [`validate`](Self::validate) for a call on `device`: every tensor there, the
    /// config's KV heads and head_dim, `q`'s dtype.
    pub(crate) fn check_for_call(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        device: Device,
    ) -> Result<PagedGeometry> {
        let kv = self;
        for (what, t) in [
            ("k_pages", &kv.k_pages),
            ("v_pages", &kv.v_pages),
            ("block_table", &kv.block_table),
            ("seq_lens", &kv.seq_lens),
        ] {
            crate::varlen::on_device(what, t, device)?;
        }
        let g = kv.validate()?;
        if g.num_kv_heads != config.num_kv_heads {
            return Err(AttentionError::shape(
                "k_pages kv heads",
                config.num_kv_heads,
                g.num_kv_heads,
            ));
        }
        if g.head_dim != config.head_dim {
            return Err(AttentionError::shape(
                "k_pages head_dim",
                config.head_dim,
                g.head_dim,
            ));
        }
        if kv.dtype() != q.dtype() {
            return Err(AttentionError::DTypeMismatch {
                what: "k_pages".into(),
                expected: q.dtype().to_string(),
                got: kv.dtype().to_string(),
            });
        }
        Ok(g)
    }

    /// Checks the view and reads its block table and lengths to the host (downloads for
    /// device tensors). Refusals, each naming the operand with the expected and given
    /// values: pools that are not rank 4, differ from each other, or whose page dimension
    /// is not `page_size` (`ShapeMismatch`); a page size of 0 (`InvalidConfig`); an integer
    /// pool dtype or pools of two dtypes (`DTypeMismatch`); a head_dim that is not
    /// contiguous (`UnsupportedLayout`); a block table that is not I32 `[B, max_pages]` or
    /// lengths that are not I32 `[B]` (`DTypeMismatch` / `ShapeMismatch`); operands on
    /// different devices (`DeviceMismatch`); a length below 0 or above
    /// `max_pages * page_size` (`ShapeMismatch`); a block-table entry a sequence uses that
    /// is outside `0..num_pages` (`ShapeMismatch`).
    pub fn validate(&self) -> Result<PagedGeometry> {
        if self.page_size == 0 {
            return Err(AttentionError::InvalidConfig {
                field: "page_size",
                reason: "must be at least 1, got 0".into(),
            });
        }
        let k = &self.k_pages;
        let order = match self.layout {
            PageLayout::Nhd => "[num_pages, page_size, kv_heads, head_dim]",
            PageLayout::Hnd => "[num_pages, kv_heads, page_size, head_dim]",
        };
        if k.rank() != 4 {
            return Err(AttentionError::shape(
                "k_pages",
                format!("rank 4 {order}"),
                format!("{:?}", k.shape()),
            ));
        }
        let sh = k.shape();
        let (num_pages, page, hkv, d) = match self.layout {
            PageLayout::Nhd => (sh[0], sh[1], sh[2], sh[3]),
            PageLayout::Hnd => (sh[0], sh[2], sh[1], sh[3]),
        };
        if page != self.page_size {
            return Err(AttentionError::shape(
                format!("k_pages page dimension ({order})"),
                format!("page_size = {}", self.page_size),
                page,
            ));
        }
        if self.v_pages.shape() != sh {
            return Err(AttentionError::shape(
                "v_pages",
                format!("{sh:?} (as k_pages)"),
                format!("{:?}", self.v_pages.shape()),
            ));
        }
        k.dtype().check_attention("k_pages")?;
        if self.v_pages.dtype() != k.dtype() {
            return Err(AttentionError::DTypeMismatch {
                what: "v_pages".into(),
                expected: k.dtype().to_string(),
                got: self.v_pages.dtype().to_string(),
            });
        }
        let device = k.device();
        if self.v_pages.device() != device {
            return Err(AttentionError::DeviceMismatch {
                what: "v_pages".into(),
                expected: device.to_string(),
                got: self.v_pages.device().to_string(),
            });
        }
        for (what, t) in [("k_pages", k), ("v_pages", &self.v_pages)] {
            if d > 1 && t.strides()[3] != 1 {
                return Err(AttentionError::UnsupportedLayout {
                    what: what.into(),
                    reason: format!(
                        "head_dim must be contiguous (stride 1), got stride {}",
                        t.strides()[3]
                    ),
                });
            }
        }
        check_i32("block_table", &self.block_table, device)?;
        check_i32("seq_lens", &self.seq_lens, device)?;
        if self.block_table.rank() != 2 {
            return Err(AttentionError::shape(
                "block_table",
                "rank 2 [batch, max_pages]",
                format!("{:?}", self.block_table.shape()),
            ));
        }
        let (batch, max_pages) = (self.block_table.shape()[0], self.block_table.shape()[1]);
        if self.seq_lens.shape() != [batch] {
            return Err(AttentionError::shape(
                "seq_lens",
                format!("[{batch}] (one per block-table row)"),
                format!("{:?}", self.seq_lens.shape()),
            ));
        }
        let most = max_pages.saturating_mul(self.page_size);
        let raw_lens = self.seq_lens.to_host::<i32>()?;
        let table = self.block_table.to_host::<i32>()?;
        let mut lens = Vec::with_capacity(batch);
        for (b, &l) in raw_lens.iter().enumerate() {
            let len = usize::try_from(l)
                .ok()
                .filter(|&l| l <= most)
                .ok_or_else(|| {
                    AttentionError::shape(
                        format!("seq_lens[{b}]"),
                        format!(
                            "0 ..= max_pages * page_size = {max_pages} * {} = {most}",
                            self.page_size
                        ),
                        l,
                    )
                })?;
            for p in 0..len.div_ceil(self.page_size) {
                let id = table[b * max_pages + p];
                if usize::try_from(id).map_or(true, |id| id >= num_pages) {
                    return Err(AttentionError::shape(
                        format!("block_table[{b}, {p}] (a page sequence {b} uses)"),
                        format!("a page id in 0..{num_pages}"),
                        id,
                    ));
                }
            }
            lens.push(len);
        }
        Ok(PagedGeometry {
            batch,
            num_pages,
            max_pages,
            num_kv_heads: hkv,
            head_dim: d,
            lens,
            table,
        })
    }
}
