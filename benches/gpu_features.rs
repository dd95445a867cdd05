//! Cost of the per-call extensions on the GPU, each against plain attention in the same
//! run: options (softcap, ALiBi, sinks, the log-sum-exp output) at S = 8192; a
//! sliding window of 4096 against full causal attention at S = 32768; a packed batch of
//! mixed lengths (64 .. 8192, 16384 tokens) against the same sequences run one dense call
//! each (no padding anywhere); paged K / V (pages of 16, 64 and 256) under the dense S = 8192 queries against
//! the dense call; decode (B = 8, GQA 32/8, L = 16384) with each option against
//! the plain cached call, and a paged cache (page 16) against a contiguous one. bf16 and
//! f16, layout [B, H, S, D] for the dense calls.
//!
//! `cargo bench --bench gpu_features -- [--dtypes bf16,f16] [--reps N] [--decode-only]
//! [--head-dims 64,128]` (the dense, paged and varlen sections at each head dimension, with
//! 2048 / D heads, rounded down, as in `gpu_attention`; 128 by default)

mod common;

use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, AttentionOptions, DType, Device, DeviceAttentionBackend, DeviceTensor,
    GpuAttentionBackend, KvCache, KvCacheLayout, KvCacheSpec, Layout, PageLayout, PagedKv,
    VarlenBatch,
};

/// Head dimension of the decode section.
const D: usize = 128;

fn main() {
    let mut dtypes = vec![DType::BF16];
    let mut reps = 20usize;
    let mut decode_only = false;
    let mut head_dims = vec![128usize];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_default();
        match a.as_str() {
            "--dtypes" => dtypes = common::dtypes(&v()),
            "--reps" => reps = v().parse().unwrap_or(20),
            "--decode-only" => decode_only = true,
            "--head-dims" => {
                head_dims = common::numbers(&v())
                    .into_iter()
                    .filter(|d| (1..=2048).contains(d))
                    .collect()
            }
            _ => {}
        }
    }
    let device = Device::best_available();
    if !device.is_gpu() {
        eprintln!("gpu_features: no GPU available, nothing to measure");
        return;
    }
    let backend = match GpuAttentionBackend::new(device) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gpu_features: {e}");
            std::process::exit(1);
        }
    };
    println!("device: {}", device.describe());
    for &dtype in &dtypes {
        if !decode_only {
            for &hd in &head_dims {
                if let Err(e) = run_all(&backend, dtype, reps, hd) {
                    println!("{dtype} D={hd}: error {e}");
                }
            }
        }
        if let Err(e) = run_decode(&backend, dtype, reps) {
            println!("{dtype} decode: error {e}");
        }
    }
}

/// Median of `reps` device-timed runs of `f`, after one warm-up, in ms.
fn time(
    dev: Device,
    reps: usize,
    mut f: impl FnMut() -> forge_attn::Result<()>,
) -> forge_attn::Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        t.push(dev.elapsed_ms(&mut f)?);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn tensor(
    shape: &[usize],
    dtype: DType,
    dev: Device,
    seed: u64,
) -> forge_attn::Result<DeviceTensor> {
    let n = shape.iter().product();
    DeviceTensor::from_f32(&random_values(n, seed), shape, dtype, dev)
}

fn per_head(
    n: usize,
    values: impl Fn(usize) -> f32,
    dev: Device,
) -> forge_attn::Result<DeviceTensor> {
    let v: Vec<f32> = (0..n).map(values).collect();
    DeviceTensor::from_f32(&v, &[n], DType::F32, dev)
}

fn run_all(
    backend: &GpuAttentionBackend,
    dtype: DType,
    reps: usize,
    hd: usize,
) -> forge_attn::Result<()> {
    let dev = backend.device();
    // About 2048 columns per token whatever the head dimension (as `gpu_attention`).
    let nh = 2048 / hd;
    let tflops = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;

    // Options at S = 8192, B = 2.
    let (b, s) = (2, 8192);
    let dense_flops =
        |causal: bool| 4.0 * (b * s * s * nh * hd) as f64 * if causal { 0.5 } else { 1.0 };
    let shape = [b, nh, s, hd];
    let q = tensor(&shape, dtype, dev, 1)?;
    let k = tensor(&shape, dtype, dev, 2)?;
    let v = tensor(&shape, dtype, dev, 3)?;
    let mut out = DeviceTensor::zeros(&shape, dtype, dev)?;
    let mut lse = DeviceTensor::zeros(&[b, nh, s], DType::F32, dev)?;
    let slopes = per_head(nh, |h| 2f32.powf(-8.0 * (h + 1) as f32 / nh as f32), dev)?;
    let mut dense_tflops = [0.0f64; 2];
    let sinks = per_head(nh, |h| h as f32 * 0.1, dev)?;
    for causal in [false, true] {
        let cfg = AttentionConfig::new(nh * hd, nh, s)
            .with_causal(causal)
            .with_layout(Layout::Bhsd);
        let flops = dense_flops(causal);
        let plain = time(dev, reps, || {
            backend
                .forward_into(&cfg, &q, &k, &v, None, &mut out)
                .map(|_| ())
        })?;
        dense_tflops[causal as usize] = tflops(flops, plain);
        println!(
            "{dtype:5} D={hd} S={s} B={b} causal={}: plain {plain:8.3} ms {:6.1} TFLOP/s",
            causal as u8,
            tflops(flops, plain)
        );
        let sets = option_sets(&slopes, &sinks);
        for (name, o, with_lse) in sets {
            let ms = time(dev, reps, || {
                let l = if with_lse { Some(&mut lse) } else { None };
                backend
                    .forward_with(&cfg, &o, &q, &k, &v, None, &mut out, l)
                    .map(|_| ())
            })?;
            println!(
                "{dtype:5} D={hd} S={s} B={b} causal={}: {name:10} {ms:8.3} ms {:6.1} TFLOP/s  {:+.1}% vs plain",
                causal as u8,
                tflops(flops, ms),
                (ms / plain - 1.0) * 100.0
            );
        }
    }

    // The same call on [B, S, H, D] operands (rows of one head H * D apart), the layout
    // of the `Nhd` pools below.
    {
        let shape = [b, s, nh, hd];
        let (q, k, v) = (
            tensor(&shape, dtype, dev, 1)?,
            tensor(&shape, dtype, dev, 2)?,
            tensor(&shape, dtype, dev, 3)?,
        );
        let mut out = DeviceTensor::zeros(&shape, dtype, dev)?;
        for causal in [false, true] {
            let cfg = AttentionConfig::new(nh * hd, nh, s).with_causal(causal);
            let flops = dense_flops(causal);
            let ms = time(dev, reps, || {
                backend
                    .forward_into(&cfg, &q, &k, &v, None, &mut out)
                    .map(|_| ())
            })?;
            println!(
                "{dtype:5} D={hd} S={s} B={b} causal={}: plain [B, S, H, D] {ms:8.3} ms {:6.1} TFLOP/s ({:.3} of [B, H, S, D])",
                causal as u8,
                tflops(flops, ms),
                tflops(flops, ms) / dense_tflops[causal as usize]
            );
        }
    }

    // Paged K / V (pages in scattered order, both pool layouts) under the same queries,
    // against the dense figure.
    for (page, layout) in [
        (16, PageLayout::Nhd),
        (16, PageLayout::Hnd),
        (64, PageLayout::Nhd),
        (256, PageLayout::Nhd),
        (256, PageLayout::Hnd),
    ] {
        let pages = b * s / page;
        let pool = match layout {
            PageLayout::Nhd => [pages, page, nh, hd],
            PageLayout::Hnd => [pages, nh, page, hd],
        };
        let kp = tensor(&pool, dtype, dev, 21)?;
        let vp = tensor(&pool, dtype, dev, 22)?;
        // An odd stride is a permutation of a power-of-two pool.
        let order: Vec<i32> = (0..pages).map(|i| ((i * 7919) % pages) as i32).collect();
        let table = DeviceTensor::from_host(&order, &[b, s / page], dev)?;
        let seq_lens = DeviceTensor::from_host(&vec![s as i32; b], &[b], dev)?;
        let kv = PagedKv::new(kp, vp, table, seq_lens, page, layout);
        for causal in [false, true] {
            let cfg = AttentionConfig::new(nh * hd, nh, s)
                .with_causal(causal)
                .with_layout(Layout::Bhsd);
            let flops = dense_flops(causal);
            let ms = time(dev, reps, || {
                backend
                    .forward_paged(&cfg, &AttentionOptions::new(), &q, &kv, &mut out, None)
                    .map(|_| ())
            })?;
            println!(
                "{dtype:5} D={hd} S={s} B={b} causal={}: paged K/V (page {page} {layout:?}) {ms:8.3} ms {:6.1} TFLOP/s ({:.3} of dense)",
                causal as u8,
                tflops(flops, ms),
                tflops(flops, ms) / dense_tflops[causal as usize]
            );
        }
    }

    // Sliding window 4096 at S = 32768, causal, B = 1.
    let s = 32768;
    let shape = [1, nh, s, hd];
    let q = tensor(&shape, dtype, dev, 4)?;
    let k = tensor(&shape, dtype, dev, 5)?;
    let v = tensor(&shape, dtype, dev, 6)?;
    let mut out = DeviceTensor::zeros(&shape, dtype, dev)?;
    let cfg = AttentionConfig::new(nh * hd, nh, s)
        .with_causal(true)
        .with_layout(Layout::Bhsd);
    let full = time(dev, reps.min(10), || {
        backend
            .forward_into(&cfg, &q, &k, &v, None, &mut out)
            .map(|_| ())
    })?;
    let w = AttentionOptions::new().with_window(Some(4095), Some(0));
    let win = time(dev, reps.min(10), || {
        backend
            .forward_with(&cfg, &w, &q, &k, &v, None, &mut out, None)
            .map(|_| ())
    })?;
    println!(
        "{dtype:5} D={hd} S={s} causal=1: full {full:8.3} ms, window 4096 {win:8.3} ms: {:.3} of full (bar 1/6 = 0.167)",
        win / full
    );

    // A packed batch of mixed lengths against one dense call per sequence.
    let lens = [8192usize, 4096, 2048, 1024, 512, 256, 128, 64, 64];
    let total: usize = lens.iter().sum();
    let q = tensor(&[total, nh, hd], dtype, dev, 7)?;
    let k = tensor(&[total, nh, hd], dtype, dev, 8)?;
    let v = tensor(&[total, nh, hd], dtype, dev, 9)?;
    let mut out = DeviceTensor::zeros(&[total, nh, hd], dtype, dev)?;
    let batch = VarlenBatch::from_lengths(&lens, &lens, dev)?;
    for causal in [false, true] {
        let cfg = AttentionConfig::new(nh * hd, nh, 8192).with_causal(causal);
        let flops: f64 = lens
            .iter()
            .map(|&l| 4.0 * (l * l * nh * hd) as f64 * if causal { 0.5 } else { 1.0 })
            .sum();
        let packed = time(dev, reps, || {
            backend
                .forward_varlen(
                    &cfg,
                    &AttentionOptions::new(),
                    &q,
                    &k,
                    &v,
                    &batch,
                    &mut out,
                    None,
                )
                .map(|_| ())
        })?;
        // The same sequences as dense [1, S, H, D] views of the packed tensors.
        let mut starts = Vec::new();
        let mut at = 0;
        for &l in &lens {
            starts.push(at);
            at += l;
        }
        let views = |t: &DeviceTensor, i: usize| -> forge_attn::Result<DeviceTensor> {
            t.narrow(0, starts[i], lens[i])?
                .reshape(&[1, lens[i], nh, hd])
        };
        let mut dense_ms = 0.0;
        for i in 0..lens.len() {
            let (qi, ki, vi) = (views(&q, i)?, views(&k, i)?, views(&v, i)?);
            let mut oi = DeviceTensor::zeros(qi.shape(), dtype, dev)?;
            dense_ms += time(dev, reps, || {
                backend
                    .forward_into(&cfg, &qi, &ki, &vi, None, &mut oi)
                    .map(|_| ())
            })?;
        }
        println!(
            "{dtype:5} D={hd} varlen {lens:?} causal={}: packed {packed:8.3} ms {:6.1} TFLOP/s ({:.3} of dense B=2 S=8192); one dense call per sequence {dense_ms:8.3} ms {:6.1} TFLOP/s ({:.3}x of that time)",
            causal as u8,
            tflops(flops, packed),
            tflops(flops, packed) / dense_tflops[causal as usize],
            tflops(flops, dense_ms),
            dense_ms / packed
        );
    }
    Ok(())
}

/// Decode at B = 8, GQA 32/8, D = 128, L = 16384: each option against the plain cached call
/// (both on the decode kernel), and a paged cache (page 16) against the contiguous one.
fn run_decode(backend: &GpuAttentionBackend, dtype: DType, reps: usize) -> forge_attn::Result<()> {
    let dev = backend.device();
    let (b, hq, hkv, l) = (8usize, 32usize, 8usize, 16384usize);
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: hkv,
        head_dim: D,
        capacity: l,
        dtype,
    };
    let k = tensor(&[b, l, hkv, D], dtype, dev, 11)?;
    let v = tensor(&[b, l, hkv, D], dtype, dev, 12)?;
    let mut contiguous = KvCache::contiguous(spec, KvCacheLayout::FlashAttention, dev)?;
    contiguous.append(&k, &v)?;
    let mut paged = KvCache::paged(spec, 16, b * l / 16, dev)?;
    paged.append(&k, &v)?;
    drop((k, v));
    let cfg = AttentionConfig::new(hq * D, hq, l)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    let q = tensor(&[b, 1, hq, D], dtype, dev, 13)?;
    let mut out = DeviceTensor::zeros(&[b, 1, hq, D], dtype, dev)?;
    let mut lse = DeviceTensor::zeros(&[b, hq, 1], DType::F32, dev)?;
    let bytes = (2 * b * l * hkv * D * dtype.size_in_bytes()) as f64;
    let plain = time(dev, reps, || {
        backend
            .forward_cached(&cfg, &q, &contiguous, &mut out)
            .map(|_| ())
    })?;
    let tbs = |ms: f64| bytes / (ms * 1e-3) / 1e12;
    println!(
        "{dtype:5} decode B={b} L={l} H={hq}/{hkv}: plain {:8.1} us {:5.2} TB/s",
        plain * 1e3,
        tbs(plain)
    );
    let slopes = DeviceTensor::from_f32(
        &(0..hq)
            .map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / hq as f32))
            .collect::<Vec<_>>(),
        &[hq],
        DType::F32,
        dev,
    )?;
    let sinks = DeviceTensor::from_f32(
        &(0..hq).map(|h| h as f32 * 0.1).collect::<Vec<_>>(),
        &[hq],
        DType::F32,
        dev,
    )?;
    let sets = option_sets(&slopes, &sinks);
    for (name, o, with_lse) in sets {
        let ms = time(dev, reps, || {
            let lo = if with_lse { Some(&mut lse) } else { None };
            backend
                .forward_cached_with(&cfg, &o, &q, &contiguous, &mut out, lo)
                .map(|_| ())
        })?;
        println!(
            "{dtype:5} decode B={b} L={l}: {name:10} {:8.1} us {:5.2} TB/s  {:+.1}% vs plain",
            ms * 1e3,
            tbs(ms),
            (ms / plain - 1.0) * 100.0
        );
    }
    let pg = time(dev, reps, || {
        backend
            .forward_cached(&cfg, &q, &paged, &mut out)
            .map(|_| ())
    })?;
    println!(
        "{dtype:5} decode B={b} L={l}: paged (page 16) {:8.1} us {:5.2} TB/s  {:+.1}% vs contiguous",
        pg * 1e3,
        tbs(pg),
        (pg / plain - 1.0) * 100.0
    );
    Ok(())
}

/// The options each section measures against its plain call: (name, options, with an lse
/// output); `slopes` and `sinks` are the f32 `[H]` tensors.
fn option_sets(
    slopes: &DeviceTensor,
    sinks: &DeviceTensor,
) -> Vec<(&'static str, AttentionOptions, bool)> {
    vec![
        ("lse", AttentionOptions::new(), true),
        (
            "softcap 30",
            AttentionOptions::new().with_softcap(30.0),
            false,
        ),
        (
            "alibi",
            AttentionOptions::new().with_alibi_slopes(slopes.clone()),
            false,
        ),
        (
            "sinks",
            AttentionOptions::new().with_sinks(sinks.clone()),
            false,
        ),
        (
            "all + lse",
            AttentionOptions::new()
                .with_softcap(30.0)
                .with_alibi_slopes(slopes.clone())
                .with_sinks(sinks.clone()),
            true,
        ),
    ]
}
