//! Throughput of the CPU backend on prefill-sized problems.
//!
//! f32, batch 1, 16 heads, head_dim 128, BSHD, seq 512/2048/4096, causal and not. FLOPs
//! follow FlashAttention's convention, 4*B*S*S*H*D, halved when causal; criterion's
//! throughput is reported in elements/s where one element is one FLOP, and each shape's
//! GFLOP/s is printed as well. Then a prefill with a padding mask and a GQA decode step
//! over a 16k cache, printed as the best time of a few calls.
//!
//! With `CPU_VS_TORCH` set (a substring of the shape names, or empty for all), only the
//! shapes that `scripts/bench_torch_cpu.py` times for torch run instead, each printed as
//! the median of a few calls: prefill with B*S = 16384 and H = 2048/D (f32 at D = 64 and
//! 128, S = 512 to 4096, causal and not; bf16 the same), and GQA decode steps (B = 8,
//! 32/8 heads, D = 128, f32 and bf16 caches of 4096 and 16384 tokens), each next to a
//! streaming read of the same bytes in the same run and the decode's fraction of it
//! (`fraction NAME F`). The lines have the torch script's form (`ours NAME MS RATE`
//! against `torch NAME MS RATE`); the script's `--ours FILE` joins the two into one table. On another machine the bench runs as a plain binary:
//! `cargo bench --bench cpu_backend --no-run` prints its path, and
//! `RAYON_NUM_THREADS=N CPU_VS_TORCH= path/to/cpu_backend-HASH` runs it.

use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, AttentionProblem, CpuAttentionBackend, DType, Device, DeviceAttentionBackend,
    DeviceTensor, KvCache, KvCacheLayout, KvCacheSpec,
};

const BATCH: usize = 1;
const HEADS: usize = 16;
const HEAD_DIM: usize = 128;
/// Tokens (B*S) of every prefill shape compared with torch.
const PREFILL_TOKENS: usize = 16384;
/// Sequence lengths of the prefill shapes compared with torch.
const PREFILL_SEQS: [usize; 4] = [512, 1024, 2048, 4096];

fn bench_cpu(c: &mut Criterion) {
    if let Ok(filter) = std::env::var("CPU_VS_TORCH") {
        against_torch(&filter);
        return;
    }
    let backend = CpuAttentionBackend::new();
    let mut group = c.benchmark_group("cpu_backend");
    // One iteration at seq 4096 takes seconds on a small machine: flat sampling with few
    // samples keeps the whole run to minutes.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    for seq in [512usize, 2048, 4096] {
        for causal in [false, true] {
            let config = AttentionConfig::new(HEADS * HEAD_DIM, HEADS, seq).with_causal(causal);
            let shape = [BATCH, seq, HEADS, HEAD_DIM];
            let n = shape.iter().product();
            let make = |seed| {
                DeviceTensor::from_f32(&random_values(n, seed), &shape, DType::F32, Device::Cpu)
            };
            let (Ok(q), Ok(k), Ok(v), Ok(mut out)) = (
                make(1),
                make(2),
                make(3),
                DeviceTensor::zeros(&shape, DType::F32, Device::Cpu),
            ) else {
                eprintln!("skipping seq {seq}: could not allocate the tensors");
                continue;
            };
            let flops = match AttentionProblem::new(&config, &q, &k, &v, None) {
                Ok(p) => p.flops(),
                Err(e) => {
                    eprintln!("skipping seq {seq}: {e}");
                    continue;
                }
            };

            // A short timing of our own, so GFLOP/s is printed directly.
            let reps = if seq >= 4096 { 2 } else { 5 };
            let _ = backend.forward_into(&config, &q, &k, &v, None, &mut out);
            let start = Instant::now();
            for _ in 0..reps {
                let _ = backend.forward_into(&config, &q, &k, &v, None, &mut out);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            let id = format!("seq{seq}{}", if causal { "_causal" } else { "" });
            println!(
                "cpu_backend/{id}: {:.2} ms, {:.1} GFLOP/s",
                secs * 1e3,
                flops / secs / 1e9
            );

            group.throughput(Throughput::Elements(flops as u64));
            group.bench_function(BenchmarkId::new("f32_bshd_h16_d128", &id), |bench| {
                bench.iter(|| backend.forward_into(&config, &q, &k, &v, None, &mut out))
            });
        }
    }

    // Two more shapes that take other paths: a padding mask (the last quarter of the keys
    // at -inf, whole tiles skipped) and a GQA decode step over a long cache.
    let seq = 2048;
    let config = AttentionConfig::new(HEADS * HEAD_DIM, HEADS, seq);
    let shape = [BATCH, seq, HEADS, HEAD_DIM];
    let n = shape.iter().product();
    let pad: Vec<f32> = random_values(seq * seq, 4)
        .into_iter()
        .enumerate()
        .map(|(x, m)| {
            if x % seq >= seq * 3 / 4 {
                f32::NEG_INFINITY
            } else {
                m
            }
        })
        .collect();
    let make =
        |seed| DeviceTensor::from_f32(&random_values(n, seed), &shape, DType::F32, Device::Cpu);
    if let (Ok(q), Ok(k), Ok(v), Ok(mask), Ok(mut out)) = (
        make(1),
        make(2),
        make(3),
        DeviceTensor::from_host(&pad, &[seq, seq], Device::Cpu),
        DeviceTensor::zeros(&shape, DType::F32, Device::Cpu),
    ) {
        // Nominal FLOPs (the skipped quarter included).
        let flops = 4.0 * (seq * seq * HEADS * HEAD_DIM) as f64;
        time_and_bench(&mut group, "seq2048_padding_mask", 3, flops, || {
            backend.forward_into(&config, &q, &k, &v, Some(&mask), &mut out)
        });
    }
    let (b, h, hk, sk) = (4, 32, 8, 16_384);
    let config = AttentionConfig::new(h * HEAD_DIM, h, sk).with_num_kv_heads(hk);
    let qs = [b, 1, h, HEAD_DIM];
    let ks = [b, sk, hk, HEAD_DIM];
    let t = |sh: &[usize], seed| {
        DeviceTensor::from_f32(
            &random_values(sh.iter().product(), seed),
            sh,
            DType::F32,
            Device::Cpu,
        )
    };
    if let (Ok(q), Ok(k), Ok(v), Ok(mut out)) = (
        t(&qs, 1),
        t(&ks, 2),
        t(&ks, 3),
        DeviceTensor::zeros(&qs, DType::F32, Device::Cpu),
    ) {
        let flops = 4.0 * (b * h * sk * HEAD_DIM) as f64;
        time_and_bench(&mut group, "decode_b4_h32_kv8_len16384", 20, flops, || {
            backend.forward_into(&config, &q, &k, &v, None, &mut out)
        });
    }
    group.finish();
}

/// Prints the best of `reps` calls (ms and GFLOP/s), then hands `f` to criterion under `id`.
fn time_and_bench<R>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    reps: usize,
    flops: f64,
    mut f: impl FnMut() -> R,
) {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "cpu_backend/{id}: {:.3} ms, {:.1} GFLOP/s",
        best * 1e3,
        flops / best / 1e9
    );
    group.throughput(Throughput::Elements(flops as u64));
    group.bench_function(BenchmarkId::new("f32_d128", id), |bench| bench.iter(&mut f));
}

/// Median seconds of `reps` calls of `f` after one warm-up call.
fn median_secs<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The shapes of `scripts/bench_torch_cpu.py` whose names contain `filter`, one line each:
/// `ours NAME MEDIAN_MS GFLOP/s` (GB/s for the decode step and the streaming read).
fn against_torch(filter: &str) {
    let backend = CpuAttentionBackend::new();
    let threads = rayon::current_num_threads();
    println!("threads {threads}");
    let mut prefill = Vec::new();
    for d in [64usize, 128] {
        for s in PREFILL_SEQS {
            for causal in [false, true] {
                prefill.push((DType::F32, d, s, causal));
            }
        }
    }
    for d in [64usize, 128] {
        for s in PREFILL_SEQS {
            for causal in [false, true] {
                prefill.push((DType::BF16, d, s, causal));
            }
        }
    }
    for (dtype, d, s, causal) in prefill {
        let name = format!(
            "prefill_{}_d{d}_s{s}{}",
            if dtype == DType::F32 { "f32" } else { "bf16" },
            if causal { "_causal" } else { "" }
        );
        if !name.contains(filter) {
            continue;
        }
        let (b, h) = (PREFILL_TOKENS / s, 2048 / d);
        let shape = [b, s, h, d];
        let n = shape.iter().product();
        let t = |seed| DeviceTensor::from_f32(&random_values(n, seed), &shape, dtype, Device::Cpu);
        let (Ok(q), Ok(k), Ok(v), Ok(mut out)) = (
            t(1),
            t(2),
            t(3),
            DeviceTensor::zeros(&shape, dtype, Device::Cpu),
        ) else {
            eprintln!("{name}: could not allocate");
            continue;
        };
        let config = AttentionConfig::new(h * d, h, s).with_causal(causal);
        let flops = 4.0 * (b * s * s * h * d) as f64 / if causal { 2.0 } else { 1.0 };
        let reps = if s >= 2048 { 3 } else { 5 };
        let secs = median_secs(reps, || {
            backend.forward_into(&config, &q, &k, &v, None, &mut out)
        });
        println!("ours {name} {:.2} {:.1}", secs * 1e3, flops / secs / 1e9);
    }

    for dtype in [DType::F32, DType::BF16] {
        for len in DECODE_LENS {
            decode_against_stream(&backend, filter, dtype, len);
        }
    }
}

/// The decode step's shape compared with torch: batch, query heads, kv heads, head_dim.
const DECODE_SHAPE: (usize, usize, usize, usize) = (8, 32, 8, 128);
/// Cached keys of the decode steps compared with torch.
const DECODE_LENS: [usize; 2] = [4096, 16384];

/// One decode step (one query per sequence) over a contiguous cache of `len` tokens of
/// `dtype`, then a streaming read of the same bytes (the host K and V the cache was filled
/// from) on the same threads: `ours NAME MS GB/s` for both, then the decode's fraction of
/// the streaming read's bandwidth.
fn decode_against_stream(backend: &CpuAttentionBackend, filter: &str, dtype: DType, len: usize) {
    let (b, h, hk, d) = DECODE_SHAPE;
    let kind = if dtype == DType::F32 { "f32" } else { "bf16" };
    let name = format!("decode_{kind}_b{b}_h{h}_kv{hk}_d{d}_l{len}");
    if !name.contains(filter) {
        return;
    }
    let n = b * len * hk * d;
    let (kf, vf) = (random_values(n, 2), random_values(n, 3));
    let secs = match dtype {
        DType::F32 => decode_and_stream(backend, &name, len, kf, vf, |x| x),
        _ => {
            let narrow = |x: Vec<f32>| x.into_iter().map(half::bf16::from_f32).collect();
            let widen = |x: half::bf16| f32::from_bits((x.to_bits() as u32) << 16);
            decode_and_stream(backend, &name, len, narrow(kf), narrow(vf), widen)
        }
    };
    let Some((decode, stream)) = secs else {
        return;
    };
    let bytes = 2.0 * (n * dtype.size_in_bytes()) as f64;
    println!(
        "ours {name} {:.3} {:.1}",
        decode * 1e3,
        bytes / decode / 1e9
    );
    println!(
        "ours stream_read_{name} {:.3} {:.1}",
        stream * 1e3,
        bytes / stream / 1e9
    );
    println!("fraction {name} {:.2}", stream / decode);
}

/// Median seconds of the decode step over a cache filled with `kh` and `vh` (`[B, L, Hkv,
/// D]`), then of the streaming read of `kh` and `vh`; `None` when the cache cannot be had.
fn decode_and_stream<T: forge_attn::HostElement>(
    backend: &CpuAttentionBackend,
    name: &str,
    len: usize,
    kh: Vec<T>,
    vh: Vec<T>,
    widen: impl Fn(T) -> f32 + Sync,
) -> Option<(f64, f64)> {
    let (b, h, hk, d) = DECODE_SHAPE;
    let dtype = T::DTYPE;
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: hk,
        head_dim: d,
        capacity: len,
        dtype,
    };
    let kv_shape = [b, len, hk, d];
    let built = (|| {
        let mut cache = KvCache::contiguous(spec, KvCacheLayout::FlashAttention, Device::Cpu)?;
        cache.append(
            &DeviceTensor::from_host(&kh, &kv_shape, Device::Cpu)?,
            &DeviceTensor::from_host(&vh, &kv_shape, Device::Cpu)?,
        )?;
        let q = DeviceTensor::from_f32(
            &random_values(b * h * d, 1),
            &[b, 1, h, d],
            dtype,
            Device::Cpu,
        )?;
        let out = DeviceTensor::zeros(&[b, 1, h, d], dtype, Device::Cpu)?;
        forge_attn::Result::Ok((cache, q, out))
    })();
    let (cache, q, mut out) = match built {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{name}: could not build the cache: {e}");
            return None;
        }
    };
    let config = AttentionConfig::new(h * d, h, len).with_num_kv_heads(hk);
    let decode = median_secs(10, || backend.forward_cached(&config, &q, &cache, &mut out));
    drop(cache);
    // Every element is loaded, widened and summed into 16 independent lanes per chunk of
    // 64k elements, the chunks spread over rayon's pool (the threads the decode ran on);
    // the sum is kept (black_box), so no read can be left out.
    let stream = median_secs(10, || {
        use rayon::prelude::*;
        let sum = |x: &[T]| {
            x.par_chunks(1 << 16)
                .map(|c| {
                    let mut lanes = [0.0f32; 16];
                    for w in c.chunks_exact(16) {
                        for i in 0..16 {
                            lanes[i] += widen(w[i]);
                        }
                    }
                    lanes.iter().sum::<f32>()
                })
                .sum::<f32>()
        };
        std::hint::black_box(sum(std::hint::black_box(&kh)) + sum(std::hint::black_box(&vh)))
    });
    Some((decode, stream))
}

criterion_group!(benches, bench_cpu);
criterion_main!(benches);
