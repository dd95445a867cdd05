//! Setup shared by the integration tests: the GPU under test, tensors of random values,
//! CPU copies, KV cache specs, and the README's error bounds against the f64 reference.
//! Each test binary uses part of it.
#![allow(dead_code)]

use forge_attn::reference::random_values;
use forge_attn::{AttentionOptions, DType, Device, DeviceTensor, KvCacheSpec, PageLayout, PagedKv};

/// The GPU the ignored tests run on; fails the test where there is none.
pub fn gpu() -> Device {
    let d = Device::best_available();
    assert!(d.is_gpu(), "these tests need a GPU; none was found");
    d
}

/// The GPU under test and a backend on it.
pub fn gpu_backend() -> (Device, forge_attn::GpuAttentionBackend) {
    let dev = gpu();
    (dev, forge_attn::GpuAttentionBackend::new(dev).unwrap())
}

/// A `shape` tensor of `dtype` on `dev` holding `random_values` of `seed`.
pub fn random_tensor(shape: &[usize], dtype: DType, dev: Device, seed: u64) -> DeviceTensor {
    let n = shape.iter().product();
    DeviceTensor::from_f32(&random_values(n, seed), shape, dtype, dev).unwrap()
}

/// An f32 tensor on the CPU holding `values`.
pub fn cpu_f32(values: &[f32], shape: &[usize]) -> DeviceTensor {
    DeviceTensor::from_host(values, shape, Device::Cpu).unwrap()
}

/// `t`'s values in a contiguous CPU tensor of the same shape and dtype.
pub fn cpu_copy(t: &DeviceTensor) -> DeviceTensor {
    DeviceTensor::from_f32(&t.to_f32_vec().unwrap(), t.shape(), t.dtype(), Device::Cpu).unwrap()
}

/// The largest elementwise difference of two tensors of the same size.
pub fn max_abs_diff(a: &DeviceTensor, b: &DeviceTensor) -> f32 {
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// A KV cache spec of `batch` sequences, `hkv` heads of `d`, room for `cap` tokens each.
pub fn spec(batch: usize, hkv: usize, d: usize, cap: usize, dtype: DType) -> KvCacheSpec {
    KvCacheSpec {
        batch,
        num_kv_heads: hkv,
        head_dim: d,
        capacity: cap,
        dtype,
    }
}

/// The README's f32 bound: relative L2 error against the f64 reference.
pub const F32_BOUND: f64 = 1e-5;

/// The README's f16/bf16 ceiling: relative L2 error against the f64 reference.
pub const HALF_CEILING: f64 = 1e-2;

/// A fixed bound per dtype where no naive run is measured: [`F32_BOUND`], else
/// [`HALF_CEILING`].
pub fn dtype_bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => F32_BOUND,
        _ => HALF_CEILING,
    }
}

/// The CPU backend's f16/bf16 bound: twice the error of the naive computation in that
/// dtype (`naive_err`), with a floor of 1e-4 for inputs the naive run gets almost exact.
pub fn cpu_half_bound(naive_err: f64) -> f64 {
    (2.0 * naive_err).max(1e-4)
}

/// The GPU backend's f16/bf16 bound: twice the naive error, between 1e-3 and
/// [`HALF_CEILING`].
pub fn gpu_half_bound(naive_err: f64) -> f64 {
    (2.0f64 * naive_err).clamp(1e-3, HALF_CEILING)
}

/// A backend that hands every required method to `inner` (under `name`, or the inner
/// name) and keeps the trait's defaults for the rest, `forward_cached` among them: a
/// backend with no cached attention of its own, or a second handle on a shared one.
pub struct Forward<B> {
    pub inner: B,
    pub name: Option<&'static str>,
}

impl<B, T> forge_attn::DeviceAttentionBackend for Forward<B>
where
    B: std::ops::Deref<Target = T> + Send + Sync,
    T: forge_attn::DeviceAttentionBackend + ?Sized + 'static,
{
    fn name(&self) -> &str {
        match self.name {
            Some(name) => name,
            None => self.inner.name(),
        }
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn supports(&self, config: &forge_attn::AttentionConfig) -> forge_attn::Support {
        self.inner.supports(config)
    }
    fn required_kv_layout(&self) -> forge_attn::KvCacheLayout {
        self.inner.required_kv_layout()
    }
    fn forward_into(
        &self,
        config: &forge_attn::AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
    ) -> forge_attn::Result<forge_attn::AttentionPath> {
        self.inner.forward_into(config, q, k, v, mask, out)
    }
}

/// Runs `backend.forward_into` into a fresh output shaped like `q` and returns the path it
/// took and the output's relative L2 error against the f64 reference.
pub fn forward_against_reference(
    backend: &dyn forge_attn::DeviceAttentionBackend,
    cfg: &forge_attn::AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
) -> (forge_attn::AttentionPath, f64) {
    let mut out = DeviceTensor::zeros(q.shape(), q.dtype(), q.device()).unwrap();
    let path = backend.forward_into(cfg, q, k, v, mask, &mut out).unwrap();
    let want = forge_attn::reference::attention_f64(cfg, q, k, v, mask).unwrap();
    let got = out.to_f32_vec().unwrap();
    (path, forge_attn::reference::relative_l2_error(&got, &want))
}

/// A permutation of `0..n` from `seed`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let r = random_values(n, seed);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
    idx
}

/// Pools on `dev` holding `lens` tokens per sequence in pages of `page_size`, the pages of
/// all sequences in random order in the pool (plus two unused ones), unused table entries
/// -1; random values from `seed`.
#[allow(clippy::too_many_arguments)]
pub fn paged_pools(
    lens: &[usize],
    page_size: usize,
    layout: PageLayout,
    dtype: DType,
    hkv: usize,
    d: usize,
    dev: Device,
    seed: u64,
) -> PagedKv {
    let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(page_size)).collect();
    let max_pages = pages.iter().copied().max().unwrap_or(0).max(1) + 1;
    let num_pages = pages.iter().sum::<usize>() + 2;
    let order = shuffled(num_pages, seed);
    let mut table = vec![-1i32; lens.len() * max_pages];
    let mut next = 0;
    for (b, &n) in pages.iter().enumerate() {
        for p in 0..n {
            table[b * max_pages + p] = order[next] as i32;
            next += 1;
        }
    }
    let shape = match layout {
        PageLayout::Nhd => [num_pages, page_size, hkv, d],
        PageLayout::Hnd => [num_pages, hkv, page_size, d],
    };
    let l: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    PagedKv::new(
        random_tensor(&shape, dtype, dev, seed + 1),
        random_tensor(&shape, dtype, dev, seed + 2),
        DeviceTensor::from_host(&table, &[lens.len(), max_pages], dev).unwrap(),
        DeviceTensor::from_host(&l, &[lens.len()], dev).unwrap(),
        page_size,
        layout,
    )
}

/// A host copy of a paged view (pools, table and lengths), for the reference.
pub fn paged_on_host(kv: &PagedKv) -> PagedKv {
    PagedKv::new(
        cpu_copy(&kv.k_pages),
        cpu_copy(&kv.v_pages),
        DeviceTensor::from_host(
            &kv.block_table.to_host::<i32>().unwrap(),
            kv.block_table.shape(),
            Device::Cpu,
        )
        .unwrap(),
        DeviceTensor::from_host(
            &kv.seq_lens.to_host::<i32>().unwrap(),
            kv.seq_lens.shape(),
            Device::Cpu,
        )
        .unwrap(),
        kv.page_size,
        kv.layout,
    )
}

/// An f32 per-head tensor (ALiBi slopes, sinks) on `dev`.
pub fn per_head(values: &[f32], dev: Device) -> DeviceTensor {
    DeviceTensor::from_f32(values, &[values.len()], DType::F32, dev).unwrap()
}

/// `o` with its per-head tensors copied to the host, for the reference.
pub fn options_on_host(o: &AttentionOptions) -> AttentionOptions {
    let mut h = o.clone();
    h.alibi_slopes = o.alibi_slopes.as_ref().map(cpu_copy);
    h.sinks = o.sinks.as_ref().map(cpu_copy);
    h
}
