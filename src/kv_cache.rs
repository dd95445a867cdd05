//! A device-resident KV cache for one attention layer, contiguous or paged.
//!
//! Appends run on the device (one launch per call for the whole batch and every KV head)
//! and advance the per-sequence lengths there, so a decode loop never talks to the host.
//! The host mirrors the lengths and the pages in use only to refuse an append that would
//! overflow, before anything is queued.

use crate::config::{AttentionConfig, KvCacheLayout};
use crate::device::launch::LaunchDims;
use crate::device::{Device, GpuStream};
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{AppendParams, TokenStrides};
use crate::kernels::KernelId;
use crate::paged::{PageLayout, PagedKv};
use crate::problem::{AttentionProblem, CachedKeys, HeadStrides};
use crate::tensor::{check_usable, try_host_vec, DeviceTensor, HostAccess};

/// Where a cache's storage is allocated: on a device's own stream, or on a caller's.
#[derive(Clone, Copy)]
enum Place<'a> {
    Device(Device),
    Stream(&'a GpuStream),
}

impl Place<'_> {
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        match self {
            Place::Device(d) => DeviceTensor::zeros(shape, dtype, *d),
            Place::Stream(s) => DeviceTensor::zeros_on(shape, dtype, s),
        }
    }
}

/// Paging of a [`KvCacheLayout::BlockSparse`] cache.
#[derive(Debug)]
struct Paging {
    page_size: usize,
    num_pages: usize,
    max_pages: usize,
    pages_used: usize,
    /// `[B, max_pages]` i32 page ids, written by the append kernel.
    block_table: DeviceTensor,
    /// One i32: the next free page.
    pool_next: DeviceTensor,
    /// Host-side page allocation (caches on the CPU); `None`: the device counter
    /// `pool_next` hands out pages and none is ever reused.
    alloc: Option<PageAlloc>,
}

/// Reference-counted pages of a host cache: a page shared by forked sequences is freed
/// when its last holder lets go, and copied before an append writes into it.
#[derive(Debug, Clone)]
struct PageAlloc {
    /// Holders of each page.
    refs: Vec<u32>,
    /// Free pages, the next one last.
    free: Vec<usize>,
    /// Pages of each sequence, in order (the block table's used entries).
    rows: Vec<Vec<usize>>,
}

impl PageAlloc {
    fn new(num_pages: usize, batch: usize) -> Self {
        PageAlloc {
            refs: vec![0; num_pages],
            free: (0..num_pages).rev().collect(),
            rows: vec![Vec::new(); batch],
        }
    }

    /// Pages an append of `count` tokens to a sequence holding `len` needs: the new pages,
    /// plus one when it writes into a shared page (copy on write).
    fn needed(&self, b: usize, len: usize, count: usize, ps: usize) -> usize {
        let fresh = (len + count).div_ceil(ps) - len.div_ceil(ps);
        let cow = count > 0
            && !len.is_multiple_of(ps)
            && self.rows[b]
                .get(len / ps)
                .is_some_and(|&p| self.refs[p] > 1);
        fresh + usize::from(cow)
    }

    /// Drops sequence `b`'s pages past the first `keep`.
    fn release(&mut self, b: usize, keep: usize) {
        let keep = keep.min(self.rows[b].len());
        for page in self.rows[b].drain(keep..) {
            self.refs[page] -= 1;
            if self.refs[page] == 0 {
                self.free.push(page);
            }
        }
    }
}

/// One layer's K and V for a batch of sequences, on one device.
///
/// Not `Clone`: a shallow copy would share K/V storage (and on a GPU the device lengths,
/// block table and page counter) while keeping its own host lengths, so appending to one
/// would overwrite the other's tokens. [`KvCache::try_clone`] makes a deep copy.
#[derive(Debug)]
pub struct KvCache {
    layout: KvCacheLayout,
    batch: usize,
    num_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Contiguous: `[B, Hkv, capacity, D]`; paged: `[pages, Hkv, page_size, D]`.
    k: DeviceTensor,
    v: DeviceTensor,
    /// `[B]` i32 lengths on the device.
    seq_lens: DeviceTensor,
    lengths: Vec<usize>,
    paging: Option<Paging>,
}

/// Sizes of a new cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSpec {
    /// Sequences.
    pub batch: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Most tokens one sequence may hold.
    pub capacity: usize,
    /// Element type.
    pub dtype: DType,
}

/// The pool ran dry although `reserve` counted the pages: a broken invariant, reported.
fn pool_empty(num_pages: usize) -> AttentionError {
    AttentionError::CapacityExceeded(format!("page pool of {num_pages} pages exhausted"))
}

fn bad(field: &'static str, reason: String) -> AttentionError {
    AttentionError::InvalidConfig { field, reason }
}

/// Refuses K/V storage of `shape` whose byte size overflows or exceeds `isize::MAX`,
/// naming the factors (`what` lists them in order).
fn check_storage(what: &'static str, shape: [usize; 4], dtype: DType) -> Result<()> {
    let bytes = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .filter(|&b| b <= isize::MAX as usize);
    if bytes.is_none() {
        return Err(bad(
            "kv cache size",
            format!(
                "{what} = {} x {} x {} x {} elements of {} bytes exceeds isize::MAX ({}) bytes",
                shape[0],
                shape[1],
                shape[2],
                shape[3],
                dtype.size_in_bytes(),
                isize::MAX
            ),
        ));
    }
    Ok(())
}

impl KvCache {
    /// A contiguous cache (`Contiguous` or `FlashAttention` layout, the same memory order).
    pub fn contiguous(spec: KvCacheSpec, layout: KvCacheLayout, device: Device) -> Result<Self> {
        Self::contiguous_in(spec, layout, Place::Device(device))
    }

    /// [`KvCache::contiguous`] allocated on `stream`, whose appends (and copies) are queued
    /// there too, so that a backend on the same stream
    /// ([`GpuAttentionBackend::on_stream`](crate::GpuAttentionBackend::on_stream)) sees
    /// them in order.
    pub fn contiguous_on(
        spec: KvCacheSpec,
        layout: KvCacheLayout,
        stream: &GpuStream,
    ) -> Result<Self> {
        Self::contiguous_in(spec, layout, Place::Stream(stream))
    }

    /// [`KvCache::paged`] allocated on `stream` (see [`KvCache::contiguous_on`]).
    pub fn paged_on(
        spec: KvCacheSpec,
        page_size: usize,
        num_pages: usize,
        stream: &GpuStream,
    ) -> Result<Self> {
        Self::paged_in(spec, page_size, num_pages, Place::Stream(stream))
    }

    fn contiguous_in(spec: KvCacheSpec, layout: KvCacheLayout, place: Place<'_>) -> Result<Self> {
        if layout == KvCacheLayout::BlockSparse {
            return Err(bad(
                "layout",
                format!("KvCache::contiguous takes Contiguous or FlashAttention, got {layout:?}; use KvCache::paged for BlockSparse"),
            ));
        }
        Self::check_spec(&spec)?;
        let shape = [spec.batch, spec.num_kv_heads, spec.capacity, spec.head_dim];
        check_storage(
            "batch * num_kv_heads * capacity * head_dim",
            shape,
            spec.dtype,
        )?;
        Self::with_storage(spec, layout, shape, None, place)
    }

    /// An empty cache of `layout` whose K and V storage has `shape`.
    fn with_storage(
        spec: KvCacheSpec,
        layout: KvCacheLayout,
        shape: [usize; 4],
        paging: Option<Paging>,
        place: Place<'_>,
    ) -> Result<Self> {
        Ok(KvCache {
            layout,
            batch: spec.batch,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            capacity: spec.capacity,
            k: place.zeros(&shape, spec.dtype)?,
            v: place.zeros(&shape, spec.dtype)?,
            seq_lens: place.zeros(&[spec.batch], DType::I32)?,
            lengths: vec![0; spec.batch],
            paging,
        })
    }

    /// A paged cache: a pool of `num_pages` pages of `page_size` tokens shared by the
    /// batch, each sequence holding at most `spec.capacity` tokens.
    pub fn paged(
        spec: KvCacheSpec,
        page_size: usize,
        num_pages: usize,
        device: Device,
    ) -> Result<Self> {
        Self::paged_in(spec, page_size, num_pages, Place::Device(device))
    }

    fn paged_in(
        spec: KvCacheSpec,
        page_size: usize,
        num_pages: usize,
        place: Place<'_>,
    ) -> Result<Self> {
        Self::check_spec(&spec)?;
        if page_size == 0 || num_pages == 0 {
            return Err(bad(
                "page_size / num_pages",
                format!("both must be > 0, got {page_size} / {num_pages}"),
            ));
        }
        // Page ids and in-page positions are i32 on the device.
        for (name, v) in [("page_size", page_size), ("num_pages", num_pages)] {
            if v > i32::MAX as usize {
                return Err(bad(name, format!("at most {}, got {v}", i32::MAX)));
            }
        }
        let max_pages = spec.capacity.div_ceil(page_size);
        let shape = [num_pages, spec.num_kv_heads, page_size, spec.head_dim];
        check_storage(
            "num_pages * num_kv_heads * page_size * head_dim",
            shape,
            spec.dtype,
        )?;
        check_storage(
            "batch * max_pages (block table)",
            [spec.batch, max_pages, 1, 1],
            DType::I32,
        )?;
        let paging = Paging {
            page_size,
            num_pages,
            max_pages,
            pages_used: 0,
            block_table: place.zeros(&[spec.batch, max_pages], DType::I32)?,
            pool_next: place.zeros(&[1], DType::I32)?,
            alloc: matches!(place, Place::Device(Device::Cpu))
                .then(|| PageAlloc::new(num_pages, spec.batch)),
        };
        Self::with_storage(spec, KvCacheLayout::BlockSparse, shape, Some(paging), place)
    }

    fn check_spec(s: &KvCacheSpec) -> Result<()> {
        // Attention reads the cache: it holds f32, f16 or bf16 like Q.
        s.dtype.check_attention("KvCacheSpec::dtype")?;
        for (name, v) in [
            ("batch", s.batch),
            ("num_kv_heads", s.num_kv_heads),
            ("head_dim", s.head_dim),
            ("capacity", s.capacity),
        ] {
            if v == 0 {
                return Err(bad(name, format!("kv cache {name} must be > 0, got {v}")));
            }
            // Lengths, positions, heads and the batch index are i32 on the device.
            if v > i32::MAX as usize {
                return Err(bad(
                    name,
                    format!("kv cache {name} must be at most {}, got {v}", i32::MAX),
                ));
            }
        }
        Ok(())
    }

    /// Storage layout.
    pub fn layout(&self) -> KvCacheLayout {
        self.layout
    }
    /// Device of the cache.
    pub fn device(&self) -> Device {
        self.k.device()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }
    /// Sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Most tokens per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Tokens held by each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
    /// Pages handed out so far (paged caches; 0 otherwise).
    pub fn pages_used(&self) -> usize {
        self.paging.as_ref().map_or(0, |p| p.pages_used)
    }
    /// Page size (paged caches).
    pub fn page_size(&self) -> Option<usize> {
        self.paging.as_ref().map(|p| p.page_size)
    }

    /// Appends `n` tokens to every sequence: `k_new`/`v_new` are `[B, n, Hkv, D]` (any
    /// strides, head_dim contiguous) on the cache's device. One launch; no host transfer.
    pub fn append(&mut self, k_new: &DeviceTensor, v_new: &DeviceTensor) -> Result<()> {
        let n = self.check_append(k_new, v_new)?;
        let counts = vec![n; self.batch];
        self.reserve(&counts)?;
        self.launch_append(k_new, v_new, n, None)?;
        self.commit(&counts);
        Ok(())
    }

    /// Appends `counts[b]` tokens to sequence `b` (ragged prefill): `k_new`/`v_new` are
    /// `[B, max(counts), Hkv, D]`, rows past a sequence's count ignored. Uploads the counts
    /// (one small host-to-device transfer).
    pub fn append_ragged(
        &mut self,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        counts: &[usize],
    ) -> Result<()> {
        let n = self.check_append(k_new, v_new)?;
        if counts.len() != self.batch || counts.iter().any(|&c| c > n) {
            // Refused before anything is queued; the cache is unchanged.
            return Err(AttentionError::shape(
                "counts",
                format!("{} values, each <= {n}", self.batch),
                format!("{counts:?}"),
            ));
        }
        self.reserve(counts)?;
        // Each count is at most the capacity (reserve), which fits in i32.
        let c: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        // Uploaded on the stream the append runs on.
        let dev_counts = match self.k.stream() {
            Some(s) => DeviceTensor::from_host_on(&c, &[self.batch], &s)?,
            None => DeviceTensor::from_host(&c, &[self.batch], self.device())?,
        };
        self.launch_append(k_new, v_new, n, Some(&dev_counts))?;
        self.commit(counts);
        Ok(())
    }

    /// Checks `k_new`/`v_new` as [`append`](Self::append) takes them; returns the tokens
    /// per sequence.
    pub(crate) fn check_append(&self, k_new: &DeviceTensor, v_new: &DeviceTensor) -> Result<usize> {
        let n = self.check_new("k_new", k_new)?;
        if self.check_new("v_new", v_new)? != n {
            return Err(AttentionError::shape(
                "v_new",
                format!("{:?}", k_new.shape()),
                format!("{:?}", v_new.shape()),
            ));
        }
        Ok(n)
    }

    fn check_new(&self, what: &str, t: &DeviceTensor) -> Result<usize> {
        check_usable(&[t], &[])?;
        t.dtype().check_attention(what)?;
        let s = t.shape();
        if t.rank() != 4 || s[0] != self.batch || s[2] != self.num_kv_heads || s[3] != self.head_dim
        {
            return Err(AttentionError::shape(
                what,
                format!(
                    "[{}, n, {}, {}]",
                    self.batch, self.num_kv_heads, self.head_dim
                ),
                format!("{s:?}"),
            ));
        }
        if t.dtype() != self.dtype() {
            return Err(AttentionError::DTypeMismatch {
                what: what.into(),
                expected: self.dtype().to_string(),
                got: t.dtype().to_string(),
            });
        }
        if t.device() != self.device() {
            return Err(AttentionError::DeviceMismatch {
                what: what.into(),
                expected: self.device().to_string(),
                got: t.device().to_string(),
            });
        }
        if s[3] > 1 && t.strides()[3] != 1 {
            return Err(AttentionError::UnsupportedLayout {
                what: what.into(),
                reason: format!(
                    "head_dim must be contiguous (stride 1), got stride {}",
                    t.strides()[3]
                ),
            });
        }
        Ok(s[1])
    }

    /// Refuses an append that would overflow a sequence or the page pool, or that a device
    /// graph is recording.
    pub(crate) fn reserve(&self, counts: &[usize]) -> Result<()> {
        // The stream the cache's appends run on: the device's own, or the one it was made on.
        let capturing = match self.k.gpu_runtime() {
            Some(rt) => rt.is_capturing(),
            None => false,
        };
        if capturing {
            return Err(AttentionError::GraphCapture {
                device: self.device().to_string(),
                op: "appending to a KvCache".into(),
                reason: "its host-side lengths would advance once, not on every replay; record attention over the cache and append outside the graph".into(),
            });
        }
        if counts.len() != self.batch {
            return Err(AttentionError::shape(
                "append counts",
                format!("{} values (one per sequence)", self.batch),
                counts.len(),
            ));
        }
        // Checked: `c` may come from a broadcast view of any length, and `len + c` must
        // not wrap past the capacity test.
        let mut new_pages = 0usize;
        for (b, (&len, &c)) in self.lengths.iter().zip(counts).enumerate() {
            let end = len.checked_add(c);
            if end.is_none_or(|e| e > self.capacity) {
                return Err(AttentionError::CapacityExceeded(format!(
                    "sequence {b} holds {len} tokens, appending {c} exceeds its capacity {}",
                    self.capacity
                )));
            }
            if let (Some(p), Some(_)) = (&self.paging, end) {
                // end <= capacity <= i32::MAX: these sums cannot overflow.
                new_pages += match &p.alloc {
                    Some(a) => a.needed(b, len, c, p.page_size),
                    None => (len + c).div_ceil(p.page_size) - len.div_ceil(p.page_size),
                };
            }
        }
        if let Some(p) = &self.paging {
            if p.pages_used.saturating_add(new_pages) > p.num_pages {
                return Err(AttentionError::CapacityExceeded(format!(
                    "page pool exhausted: {} of {} pages in use, the append needs {new_pages} more",
                    p.pages_used, p.num_pages
                )));
            }
        }
        Ok(())
    }

    /// Advances the host mirror of the lengths and pages after an append was queued;
    /// `counts` passed [`reserve`](Self::reserve), so no sum here can exceed the capacity.
    pub(crate) fn commit(&mut self, counts: &[usize]) {
        for (len, &c) in self.lengths.iter_mut().zip(counts) {
            if let Some(p) = &mut self.paging {
                if p.alloc.is_none() {
                    p.pages_used += (*len + c).div_ceil(p.page_size) - len.div_ceil(p.page_size);
                }
            }
            *len += c;
        }
        if let Some(p) = &mut self.paging {
            if let Some(a) = &p.alloc {
                p.pages_used = p.num_pages - a.free.len();
            }
        }
    }

    fn launch_append(
        &mut self,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        n: usize,
        counts: Option<&DeviceTensor>,
    ) -> Result<()> {
        match self.device() {
            Device::Cpu => self.append_on_host(k_new, v_new, n, counts),
            _ => self.append_on_device(k_new, v_new, n, counts),
        }
    }

    /// Cache strides (batch or page, head, position) in elements.
    fn cache_strides(&self) -> HeadStrides {
        let s = self.k.strides();
        HeadStrides {
            batch: s[0],
            head: s[1],
            seq: s[2],
        }
    }

    fn append_on_device(
        &mut self,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        n: usize,
        counts: Option<&DeviceTensor>,
    ) -> Result<()> {
        let rt = self
            .k
            .gpu_runtime()
            .ok_or_else(|| AttentionError::DeviceUnavailable {
                device: self.device().to_string(),
                reason: "cache storage is not on a GPU".into(),
                source: None,
            })?;
        let (ks, vs) = (k_new.strides(), v_new.strides());
        let c = self.cache_strides();
        let params = AppendParams {
            k_new: k_new.device_ptr(),
            v_new: v_new.device_ptr(),
            k_cache: self.k.device_ptr(),
            v_cache: self.v.device_ptr(),
            seq_lens: self.seq_lens.device_ptr(),
            block_table: self
                .paging
                .as_ref()
                .map_or(0, |p| p.block_table.device_ptr()),
            pool_next: self.paging.as_ref().map_or(0, |p| p.pool_next.device_ptr()),
            counts: counts.map_or(0, |c| c.device_ptr()),
            kn_strides: TokenStrides::from_array([ks[0], ks[1], ks[2]].map(|x| x as i64)),
            vn_strides: TokenStrides::from_array([vs[0], vs[1], vs[2]].map(|x| x as i64)),
            c_strides: c.into(),
            batch: self.batch as i32,
            // Read only when `counts` is null (a plain append, where n passed the capacity
            // check); a ragged append's rows past the largest count are never read, so
            // clamping keeps a broadcast view of any length from wrapping.
            n: n.min(self.capacity) as i32,
            num_kv_heads: self.num_kv_heads as i32,
            head_dim: self.head_dim as i32,
            max_pages: self.paging.as_ref().map_or(0, |p| p.max_pages as i32),
            page_size: self.paging.as_ref().map_or(1, |p| p.page_size as i32),
            num_pages: self.paging.as_ref().map_or(0, |p| p.num_pages as i32),
            pad_: 0,
        };
        let es = self.dtype().size_in_bytes();
        let kernel = KernelId::kv_append(es).ok_or_else(|| AttentionError::NotSupported {
            backend: "kv cache append".into(),
            reason: format!("element size 2 or 4 bytes expected, got {es}"),
        })?;
        rt.launch_kernel(
            kernel,
            LaunchDims::new((self.batch as u32, 1, 1), (256, 1, 1), 0),
            &params,
        )
    }

    /// The same append on host memory (CPU device), mirroring the kernel.
    fn append_on_host(
        &mut self,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        n: usize,
        counts: Option<&DeviceTensor>,
    ) -> Result<()> {
        let es = self.dtype().size_in_bytes();
        let mut reads = vec![k_new, v_new];
        reads.extend(counts);
        let mut writes = vec![&self.k, &self.v, &self.seq_lens];
        writes.extend(self.paging.as_ref().map(|p| &p.block_table));
        // The new tokens may be views of this cache (self-aliasing is allowed within one
        // access); other threads are kept off every range read or written below.
        let _access = HostAccess::acquire(&reads, &writes)?;
        let counts: Vec<usize> = match counts {
            Some(c) => {
                let p = c.host_ptr().ok_or_else(|| AttentionError::DeviceMismatch {
                    what: "append counts".into(),
                    expected: Device::Cpu.to_string(),
                    got: c.device().to_string(),
                })? as *const i32;
                // SAFETY: a host tensor of `batch` i32 values written by append_ragged.
                (0..self.batch)
                    .map(|b| unsafe { *p.add(b) } as usize)
                    .collect()
            }
            None => vec![n; self.batch],
        };
        let c = self.cache_strides();
        // Host-allocated pages: each sequence's pages for the new tokens are taken (and a
        // shared page it writes into is replaced by a copy) before any token is written.
        let mut cow: Vec<(usize, usize, usize)> = Vec::new(); // (old page, new page, rows)
        let host_alloc = match &mut self.paging {
            Some(p) => match &mut p.alloc {
                Some(a) => {
                    let ps = p.page_size;
                    for (b, &count) in counts.iter().enumerate() {
                        let len = self.lengths[b];
                        if count > 0 && !len.is_multiple_of(ps) {
                            let last = a.rows[b].get(len / ps).copied();
                            if let Some(last) = last.filter(|&p| a.refs[p] > 1) {
                                // reserve() counted this page.
                                let fresh = a.free.pop().ok_or_else(|| pool_empty(p.num_pages))?;
                                a.refs[last] -= 1;
                                a.refs[fresh] = 1;
                                a.rows[b][len / ps] = fresh;
                                cow.push((last, fresh, len % ps));
                            }
                        }
                        while a.rows[b].len() < (len + count).div_ceil(ps) {
                            let fresh = a.free.pop().ok_or_else(|| pool_empty(p.num_pages))?;
                            a.refs[fresh] = 1;
                            a.rows[b].push(fresh);
                        }
                    }
                    true
                }
                None => false,
            },
            None => false,
        };
        if host_alloc {
            self.write_table_rows()?;
        }
        let pages = self
            .paging
            .as_ref()
            .map(|p| (p.page_size, p.max_pages, p.pages_used));
        let mut next_page = pages.map_or(0, |p| p.2);
        let (kc, vc) = (self.k.host_ptr(), self.v.host_ptr());
        let (kn, vn) = (k_new.host_ptr(), v_new.host_ptr());
        let (Some(kc), Some(vc), Some(kn), Some(vn)) = (kc, vc, kn, vn) else {
            return Err(AttentionError::DeviceMismatch {
                what: "k_new / v_new / cache".into(),
                expected: Device::Cpu.to_string(),
                got: format!(
                    "{} / {} / {}",
                    k_new.device(),
                    v_new.device(),
                    self.device()
                ),
            });
        };
        let table = self
            .paging
            .as_ref()
            .and_then(|p| p.block_table.host_ptr())
            .map(|p| p as *mut i32);
        for &(old, new, rows) in &cow {
            for h in 0..self.num_kv_heads {
                let (src, dst) = (old * c.batch + h * c.head, new * c.batch + h * c.head);
                for r in 0..rows {
                    let (s, d) = ((src + r * c.seq) * es, (dst + r * c.seq) * es);
                    // SAFETY: two distinct pages of the pool, rows below the page size.
                    unsafe {
                        std::ptr::copy_nonoverlapping(kc.add(s), kc.add(d), self.head_dim * es);
                        std::ptr::copy_nonoverlapping(vc.add(s), vc.add(d), self.head_dim * es);
                    }
                }
            }
        }
        for (b, &count) in counts.iter().enumerate() {
            let start = self.lengths[b];
            for t in 0..count {
                let pos = start + t;
                let (slot, within) = match (pages, table) {
                    (Some((ps, maxp, _)), Some(tab)) => {
                        // SAFETY: pos < capacity, so the entry lies in row b of the table.
                        let entry = unsafe { tab.add(b * maxp + pos / ps) };
                        if pos.is_multiple_of(ps) && !host_alloc {
                            unsafe { *entry = next_page as i32 };
                            next_page += 1;
                        }
                        (unsafe { *entry } as usize, pos % ps)
                    }
                    _ => (b, pos),
                };
                for h in 0..self.num_kv_heads {
                    let dst = (slot * c.batch + h * c.head + within * c.seq) * es;
                    let (ks, vs) = (k_new.strides(), v_new.strides());
                    let srck = (b * ks[0] + t * ks[1] + h * ks[2]) * es;
                    let srcv = (b * vs[0] + t * vs[1] + h * vs[2]) * es;
                    // SAFETY: both ranges lie inside their tensors (shapes checked above);
                    // `copy` because a new row may be a view of the cache itself.
                    unsafe {
                        std::ptr::copy(kn.add(srck), kc.add(dst), self.head_dim * es);
                        std::ptr::copy(vn.add(srcv), vc.add(dst), self.head_dim * es);
                    }
                }
            }
            if let Some(p) = self.seq_lens.host_ptr() {
                // SAFETY: b < batch, the tensor holds batch i32 values.
                unsafe { *(p as *mut i32).add(b) = (start + count) as i32 };
            }
        }
        Ok(())
    }

    /// The length every sequence holds, or `UnsupportedLayout` saying that `what` equal,
    /// non-zero lengths.
    fn common_length(&self, what: &str) -> Result<usize> {
        let len = self.lengths[0];
        if self.lengths.iter().any(|&l| l != len) || len == 0 {
            return Err(AttentionError::UnsupportedLayout {
                what: "kv cache".into(),
                reason: format!("{what} equal, non-zero lengths, got {:?}", self.lengths),
            });
        }
        Ok(len)
    }

    /// Contiguous caches whose sequences all hold the same number of tokens: `[B, L, Hkv, D]`
    /// views of K and V (in BSHD order, no copy) for [`crate::DeviceAttentionBackend::forward_into`].
    pub fn views(&self) -> Result<(DeviceTensor, DeviceTensor)> {
        if self.paging.is_some() {
            return Err(AttentionError::UnsupportedLayout {
                what: "kv cache".into(),
                reason: "a paged cache has no dense view; attend over it with forward_cached"
                    .into(),
            });
        }
        let len = self.common_length("dense views need")?;
        let view = |t: &DeviceTensor| t.narrow(2, 0, len)?.permute(&[0, 2, 1, 3]);
        Ok((view(&self.k)?, view(&self.v)?))
    }

    /// Writes the used block-table entries of a host-allocated cache from its allocator
    /// (the caller holds the host access to the table, or no one else can reach it).
    fn write_table_rows(&mut self) -> Result<()> {
        let Some(p) = &self.paging else { return Ok(()) };
        let (Some(a), Some(t)) = (&p.alloc, p.block_table.host_ptr()) else {
            return Ok(());
        };
        let t = t as *mut i32;
        for (b, row) in a.rows.iter().enumerate() {
            for (i, &page) in row.iter().enumerate() {
                // SAFETY: b < batch and i < max_pages (a row holds at most
                // capacity / page_size pages, rounded up); page ids are below num_pages.
                unsafe { *t.add(b * p.max_pages + i) = page as i32 };
            }
        }
        Ok(())
    }

    /// Sets sequence `b`'s length, host mirror and device tensor (one small upload on a GPU).
    fn set_length(&mut self, b: usize, len: usize) -> Result<()> {
        let value = [len as i32];
        let src = match self.seq_lens.stream() {
            Some(s) => DeviceTensor::from_host_on(&value, &[1], &s)?,
            None => DeviceTensor::from_host(&value, &[1], self.device())?,
        };
        self.seq_lens.narrow(0, b, 1)?.copy_from(&src)?;
        self.lengths[b] = len;
        Ok(())
    }

    fn check_seq(&self, what: &str, b: usize) -> Result<()> {
        if b >= self.batch {
            return Err(AttentionError::shape(
                what,
                format!("a sequence index below {}", self.batch),
                b,
            ));
        }
        Ok(())
    }

    /// Keeps the first `len` tokens of sequence `b` (at most its length). On a host
    /// (CPU) paged cache the pages past them go back to the pool (a page another sequence
    /// shares stays with it); a GPU paged cache hands out pages from a device counter that
    /// never reuses one, so its pages past `len` stay taken. Refusals (nothing changes):
    /// `b` out of range or `len` above the length (`ShapeMismatch`).
    pub fn truncate(&mut self, b: usize, len: usize) -> Result<()> {
        self.check_seq("truncate sequence", b)?;
        if len > self.lengths[b] {
            return Err(AttentionError::shape(
                format!("truncate length of sequence {b}"),
                format!("at most its {} tokens", self.lengths[b]),
                len,
            ));
        }
        self.set_length(b, len)?;
        if let Some(p) = &mut self.paging {
            if let Some(a) = &mut p.alloc {
                a.release(b, len.div_ceil(p.page_size));
                p.pages_used = p.num_pages - a.free.len();
            }
        }
        Ok(())
    }

    /// Empties sequence `b`: [`truncate`](Self::truncate) to 0 tokens (on a host paged
    /// cache, its pages are free for any sequence's next append).
    pub fn free(&mut self, b: usize) -> Result<()> {
        self.truncate(b, 0)
    }

    /// Makes sequence `dst` a copy of sequence `src` (`dst`'s own tokens are dropped
    /// first). A host (CPU) paged cache shares `src`'s pages with `dst` (reference
    /// counted, no copy); an append to either that would write into a shared page copies
    /// that page first, so neither sees the other's new tokens. A contiguous cache copies
    /// the tokens into `dst`'s rows (on a GPU, a device copy). Refusals (nothing changes):
    /// an index out of range or `src == dst` (`ShapeMismatch`); a GPU paged cache, whose
    /// pages come from a device counter that cannot share them (`NotSupported`).
    pub fn fork(&mut self, src: usize, dst: usize) -> Result<()> {
        self.check_seq("fork source", src)?;
        self.check_seq("fork destination", dst)?;
        if src == dst {
            return Err(AttentionError::shape(
                "fork destination",
                format!("a sequence other than the source {src}"),
                dst,
            ));
        }
        if self.paging.as_ref().is_some_and(|p| p.alloc.is_none()) {
            return Err(AttentionError::NotSupported {
                backend: "kv cache".into(),
                reason: format!(
                    "fork on a paged cache on {}: its pages come from a device counter that cannot share or reuse them",
                    self.device()
                ),
            });
        }
        let len = self.lengths[src];
        match &mut self.paging {
            Some(p) => {
                let Some(a) = &mut p.alloc else {
                    return Ok(());
                };
                a.release(dst, 0);
                let shared = a.rows[src].clone();
                for &page in &shared {
                    a.refs[page] += 1;
                }
                a.rows[dst] = shared;
                p.pages_used = p.num_pages - a.free.len();
                self.write_table_rows()?;
            }
            None => {
                // [B, Hkv, capacity, D]: the first `len` positions of the source slot.
                for t in [&self.k, &self.v] {
                    let from = t.narrow(0, src, 1)?.narrow(2, 0, len)?;
                    let mut to = t.narrow(0, dst, 1)?.narrow(2, 0, len)?;
                    to.copy_from(&from)?;
                }
            }
        }
        self.set_length(dst, len)
    }

    /// The cache as a [`PagedKv`] over its own storage (no copy of K or V), for
    /// [`DeviceAttentionBackend::forward_paged`](crate::DeviceAttentionBackend::forward_paged):
    /// a paged cache gives its pool ([`PageLayout::Hnd`]), block table and lengths; a
    /// contiguous one gives each sequence as one page of `capacity` tokens (a new
    /// `[B, 1]` block table `0..B`, uploaded to the cache's device). The view shares the
    /// lengths tensor: an append to the cache shows in it, but its page count and table
    /// are those of the moment it was made.
    pub fn paged_view(&self) -> Result<PagedKv> {
        let (block_table, page_size) = match &self.paging {
            Some(p) => (p.block_table.clone(), p.page_size),
            None => {
                // batch <= i32::MAX (check_spec).
                let ids: Vec<i32> = (0..self.batch as i32).collect();
                let t = match self.k.stream() {
                    Some(s) => DeviceTensor::from_host_on(&ids, &[self.batch, 1], &s)?,
                    None => DeviceTensor::from_host(&ids, &[self.batch, 1], self.device())?,
                };
                (t, self.capacity)
            }
        };
        Ok(PagedKv {
            k_pages: self.k.clone(),
            v_pages: self.v.clone(),
            block_table,
            seq_lens: self.seq_lens.clone(),
            page_size,
            layout: PageLayout::Hnd,
        })
    }

    /// Downloads the cache as dense host tensors `[B, L, Hkv, D]` (BSHD) on
    /// [`Device::Cpu`], whatever the layout; every sequence must hold the same number of
    /// tokens L. Meant for checking and debugging: it copies everything to the host.
    pub fn to_dense(&self) -> Result<(DeviceTensor, DeviceTensor)> {
        let len = self.common_length("a dense copy needs")?;
        let (hkv, d) = (self.num_kv_heads, self.head_dim);
        let k = self.k.to_f32_vec()?;
        let v = self.v.to_f32_vec()?;
        let table: Option<Vec<i32>> = match &self.paging {
            Some(p) => Some(p.block_table.to_host::<i32>()?),
            None => None,
        };
        let s = self.k.shape().to_vec(); // [slots, Hkv, positions, D]
                                         // len <= capacity, so this is at most the cache's own (allocated) size.
        let n = self.batch * len * hkv * d;
        let mut kd = try_host_vec(n, 0f32, "KvCache::to_dense")?;
        let mut vd = try_host_vec(n, 0f32, "KvCache::to_dense")?;
        for b in 0..self.batch {
            for pos in 0..len {
                let (slot, within) = match (&table, &self.paging) {
                    (Some(t), Some(p)) => {
                        let entry = t[b * p.max_pages + pos / p.page_size];
                        // A page id outside the pool would index past K/V: report it.
                        let slot = usize::try_from(entry)
                            .ok()
                            .filter(|&s| s < p.num_pages)
                            .ok_or_else(|| AttentionError::Runtime {
                                op: "KvCache::to_dense".into(),
                                detail: format!(
                                    "block table entry of sequence {b}, position {pos} is page {entry}, outside the pool of {} pages",
                                    p.num_pages
                                ), source: None,
                            })?;
                        (slot, pos % p.page_size)
                    }
                    _ => (b, pos),
                };
                for h in 0..hkv {
                    let src = ((slot * s[1] + h) * s[2] + within) * d;
                    let dst = ((b * len + pos) * hkv + h) * d;
                    kd[dst..dst + d].copy_from_slice(&k[src..src + d]);
                    vd[dst..dst + d].copy_from_slice(&v[src..src + d]);
                }
            }
        }
        let shape = [self.batch, len, hkv, d];
        Ok((
            DeviceTensor::from_f32(&kd, &shape, self.dtype(), Device::Cpu)?,
            DeviceTensor::from_f32(&vd, &shape, self.dtype(), Device::Cpu)?,
        ))
    }

    /// A deep copy in new storage on the same device: K, V, the lengths (host and device)
    /// and, for a paged cache, the block table and page counter. Appending to the copy
    /// leaves this cache as it is. Fails with [`AttentionError::OutOfMemory`] when the
    /// device cannot hold a second cache.
    pub fn try_clone(&self) -> Result<KvCache> {
        let copy = |t: &DeviceTensor| -> Result<DeviceTensor> {
            // On the stream the cache was made on, where its copies are queued.
            let mut c = match t.stream() {
                Some(s) => DeviceTensor::zeros_on(t.shape(), t.dtype(), &s)?,
                None => DeviceTensor::zeros(t.shape(), t.dtype(), t.device())?,
            };
            c.copy_from(t)?;
            Ok(c)
        };
        let paging = match &self.paging {
            Some(p) => Some(Paging {
                page_size: p.page_size,
                num_pages: p.num_pages,
                max_pages: p.max_pages,
                pages_used: p.pages_used,
                block_table: copy(&p.block_table)?,
                pool_next: copy(&p.pool_next)?,
                alloc: p.alloc.clone(),
            }),
            None => None,
        };
        Ok(KvCache {
            layout: self.layout,
            batch: self.batch,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            seq_lens: copy(&self.seq_lens)?,
            lengths: self.lengths.clone(),
            paging,
        })
    }

    /// Validates attention of `q` into `out` over this cache once it holds `extra` more
    /// tokens per sequence ([`AttentionProblem::cached`], then `out` against the problem and
    /// every input); returns the problem and `out`'s strides. Nothing is read or written.
    pub(crate) fn problem(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        out: &DeviceTensor,
        extra: usize,
    ) -> Result<(AttentionProblem, HeadStrides)> {
        let keys = CachedKeys {
            batch: self.batch,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype(),
            device: self.device(),
            max_len: self.lengths.iter().copied().max().unwrap_or(0),
            strides: self.cache_strides(),
        };
        let p = AttentionProblem::cached(config, q, &keys, extra)?;
        let out_strides = p.output_strides(config.layout, out, &[q, &self.k, &self.v])?;
        Ok((p, out_strides))
    }

    pub(crate) fn raw_parts(&self) -> CacheParts<'_> {
        CacheParts {
            k: &self.k,
            v: &self.v,
            strides: self.cache_strides(),
            seq_lens: &self.seq_lens,
            block_table: self.paging.as_ref().map(|p| &p.block_table),
            max_pages: self.paging.as_ref().map_or(0, |p| p.max_pages),
            page_size: self.paging.as_ref().map_or(1, |p| p.page_size),
            pool_next: self.paging.as_ref().map(|p| &p.pool_next),
            num_pages: self.paging.as_ref().map_or(0, |p| p.num_pages),
        }
    }
}

/// What a decode kernel needs to read a cache.
pub(crate) struct CacheParts<'a> {
    pub k: &'a DeviceTensor,
    pub v: &'a DeviceTensor,
    pub strides: HeadStrides,
    pub seq_lens: &'a DeviceTensor,
    pub block_table: Option<&'a DeviceTensor>,
    pub max_pages: usize,
    pub page_size: usize,
    pub pool_next: Option<&'a DeviceTensor>,
    /// Pages in the pool (0: contiguous).
    pub num_pages: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(layout: Option<usize>) -> KvCache {
        let spec = KvCacheSpec {
            batch: 2,
            num_kv_heads: 1,
            head_dim: 4,
            capacity: 16,
            dtype: DType::F32,
        };
        match layout {
            None => KvCache::contiguous(spec, KvCacheLayout::Contiguous, Device::Cpu).unwrap(),
            Some(page) => KvCache::paged(spec, page, 8, Device::Cpu).unwrap(),
        }
    }

    /// Counts no public view can reach (every view holds at most isize::MAX bytes) still
    /// cannot wrap `len + n` past the capacity test.
    #[test]
    fn reserve_refuses_counts_that_would_wrap() {
        for layout in [None, Some(4)] {
            let mut c = cache(layout);
            c.commit(&[3, 5]);
            let pages = c.pages_used();
            for counts in [[usize::MAX, 0], [0, usize::MAX - 4], [1, usize::MAX]] {
                let err = c.reserve(&counts).unwrap_err();
                let AttentionError::CapacityExceeded(msg) = &err else {
                    panic!("{err:?}");
                };
                let b = counts.iter().position(|&n| n > 1).unwrap();
                assert!(
                    msg.contains(&format!("holds {} tokens", [3, 5][b]))
                        && msg.contains(&counts[b].to_string())
                        && msg.contains("capacity 16"),
                    "{msg}"
                );
            }
            assert!(matches!(
                c.reserve(&[1]),
                Err(AttentionError::ShapeMismatch { .. })
            ));
            assert_eq!(c.lengths(), &[3, 5]);
            assert_eq!(c.pages_used(), pages);
            c.reserve(&[13, 11]).unwrap();
        }
    }

    /// The device-side lengths, block table and page counter are I32 tensors holding the
    /// host mirror's values.
    #[test]
    fn lengths_and_block_table_are_i32_tensors() {
        let mut c = cache(Some(4));
        let k = DeviceTensor::from_f32(&[1.0; 2 * 6 * 4], &[2, 6, 1, 4], DType::F32, Device::Cpu)
            .unwrap();
        c.append_ragged(&k, &k, &[6, 3]).unwrap();
        let parts = c.raw_parts();
        assert_eq!(parts.seq_lens.dtype(), DType::I32);
        assert_eq!(parts.seq_lens.to_host::<i32>().unwrap(), vec![6, 3]);
        let table = parts.block_table.unwrap();
        assert_eq!(table.dtype(), DType::I32);
        // Sequence 0 took pages 0 and 1, sequence 1 page 2 (max_pages = 16 / 4).
        assert_eq!(&table.to_host::<i32>().unwrap()[..5], &[0, 1, 0, 0, 2]);
        assert_eq!(parts.pool_next.unwrap().dtype(), DType::I32);
        let copy = c.try_clone().unwrap();
        assert_eq!(copy.raw_parts().seq_lens.dtype(), DType::I32);
        assert!(c.to_dense().unwrap_err().to_string().contains("[6, 3]"));
        let contiguous = cache(None);
        assert_eq!(contiguous.raw_parts().seq_lens.dtype(), DType::I32);
    }

    /// `problem` takes the longest sequence (plus the new tokens) and the cache's strides,
    /// and refuses an output that does not fit the call or overlaps the cache or q.
    #[test]
    fn a_cached_call_is_checked_against_the_cache_and_its_output() {
        for layout in [None, Some(4)] {
            let mut c = cache(layout);
            c.commit(&[3, 5]);
            let config = AttentionConfig::new(2 * 4, 2, 16).with_num_kv_heads(1);
            let t =
                |shape: &[usize], dtype| DeviceTensor::zeros(shape, dtype, Device::Cpu).unwrap();
            let q = t(&[2, 1, 2, 4], DType::F32);
            let out = t(&[2, 1, 2, 4], DType::F32);
            let (p, os) = c.problem(&config, &q, &out, 0).unwrap();
            assert_eq!(
                (p.seq_k, p.k, p.v),
                (5, c.cache_strides(), c.cache_strides())
            );
            assert_eq!(
                os,
                HeadStrides {
                    batch: 8,
                    head: 4,
                    seq: 8
                }
            );
            assert_eq!(c.problem(&config, &q, &out, 2).unwrap().0.seq_k, 7);

            let e = c
                .problem(&config, &q, &t(&[2, 2, 2, 4], DType::F32), 0)
                .unwrap_err();
            assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e:?}");
            let e = c
                .problem(&config, &q, &t(&[2, 1, 2, 4], DType::F16), 0)
                .unwrap_err();
            assert!(
                matches!(&e, AttentionError::DTypeMismatch { what, .. } if what == "out"),
                "{e:?}"
            );
            let e = c.problem(&config, &q, &q, 0).unwrap_err();
            assert!(
                matches!(e, AttentionError::UnsupportedLayout { .. }),
                "{e:?}"
            );
            // An output inside the cache's own K storage.
            let in_cache = c.k.narrow(0, 0, 2).unwrap().narrow(2, 0, 2).unwrap();
            let e = c.problem(&config, &q, &in_cache, 0).unwrap_err();
            assert!(
                matches!(&e, AttentionError::UnsupportedLayout { reason, .. } if reason.contains("overlaps input 1")),
                "{e:?}"
            );
            // The q checks come from `AttentionProblem::cached`.
            let e = c
                .problem(&config, &t(&[3, 1, 2, 4], DType::F32), &out, 0)
                .unwrap_err();
            assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e:?}");
            assert_eq!(c.lengths(), &[3, 5]);
        }
    }

    #[test]
    fn device_lengths_stay_in_i32() {
        let spec = |batch, num_kv_heads, head_dim| KvCacheSpec {
            batch,
            num_kv_heads,
            head_dim,
            capacity: 1,
            dtype: DType::F16,
        };
        let big = i32::MAX as usize + 1;
        for (s, field) in [
            (spec(big, 1, 1), "batch"),
            (spec(1, big, 1), "num_kv_heads"),
            (spec(1, 1, big), "head_dim"),
        ] {
            let err = KvCache::paged(s, 1, 1, Device::Cpu).unwrap_err();
            assert!(
                matches!(&err, AttentionError::InvalidConfig { field: f, reason }
                    if *f == field && reason.contains(&big.to_string())),
                "{err:?}"
            );
        }
        for (page, pages, field) in [(big, 1, "page_size"), (1, big, "num_pages")] {
            let err = KvCache::paged(spec(1, 1, 1), page, pages, Device::Cpu).unwrap_err();
            assert!(
                matches!(&err, AttentionError::InvalidConfig { field: f, reason }
                    if *f == field && reason.contains(&big.to_string())),
                "{err:?}"
            );
        }
    }
}
