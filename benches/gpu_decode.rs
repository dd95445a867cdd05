//! Decode benchmark: one query token per sequence against a KV cache, GQA 32 query / 8 KV
//! heads, D = 128. Bandwidth = bytes of K and V read / time; several caches are rotated so
//! that L2 does not hold them. Also times whole decode steps (append + attention, synced)
//! in a Rust loop, the latency a serving loop sees.
//!
//! `cargo bench --bench gpu_decode -- [--dtypes bf16,f32] [--batches 1,8,32]
//!  [--lens 1024,4096,16384,32768] [--csv FILE]`

use std::io::Write;
use std::time::Instant;

mod common;

use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, DType, Device, DeviceAttentionBackend, DeviceTensor, GpuAttentionBackend,
    KvCache, KvCacheLayout, KvCacheSpec, Result,
};

const H: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn main() {
    let mut dtypes = vec![DType::BF16, DType::F32];
    let mut batches = vec![1usize, 8, 32];
    let mut lens = vec![1024usize, 4096, 16384, 32768];
    let mut csv_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_default();
        match a.as_str() {
            "--dtypes" => dtypes = common::dtypes(&v()),
            "--batches" => batches = common::numbers(&v()),
            "--lens" => lens = common::numbers(&v()),
            "--csv" => csv_path = Some(v()),
            _ => {}
        }
    }
    let dev = Device::best_available();
    if !dev.is_gpu() {
        eprintln!("gpu_decode: no GPU available, nothing to measure");
        return;
    }
    let backend = match GpuAttentionBackend::new(dev) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gpu_decode: {e}");
            std::process::exit(1);
        }
    };
    println!("device: {}", dev.describe());
    let mut csv = csv_path.map(|p| {
        let mut f = std::fs::File::create(p).expect("create csv");
        writeln!(f, "kind,dtype,batch,kv_len,us,tbps,splits").expect("csv");
        f
    });
    for &dtype in &dtypes {
        for &b in &batches {
            for &l in &lens {
                match attention_only(&backend, dtype, b, l) {
                    Ok(t) => {
                        let (us, tbps, splits) = (t.us, t.tbps, t.splits);
                        let (gus, gtbps) = (t.graph_us, t.graph_tbps);
                        println!(
                            "decode {dtype:5} B={b:2} L={l:5}: {us:8.1} us {tbps:5.2} TB/s (splits {splits}); \
                             replayed from a device graph {gus:8.1} us {gtbps:5.2} TB/s"
                        );
                        if let Some(f) = csv.as_mut() {
                            writeln!(f, "attention,{dtype},{b},{l},{us:.2},{tbps:.3},{splits}")
                                .expect("csv");
                            writeln!(
                                f,
                                "attention_graph,{dtype},{b},{l},{gus:.2},{gtbps:.3},{splits}"
                            )
                            .expect("csv");
                        }
                    }
                    Err(e) => println!("decode {dtype:5} B={b:2} L={l:5}: error {e}"),
                }
            }
        }
    }
    for &dtype in &dtypes {
        match step_loop(&backend, dtype, 1, 4096) {
            Ok(t) => {
                println!(
                    "rust loop {dtype:5} B=1 L=4096: per step (append + attention) {:.1} us queued back to back, \
                     {:.1} us when the host waits for every step (median); as one call \
                     (forward_cached_append) {:.1} us queued, {:.1} us host-synchronized; attention \
                     alone on the loop's cache (warm in L2) {:.1} us, replayed from a device graph {:.1} us",
                    t.queued, t.synced, t.fused_queued, t.fused_synced, t.attention_warm,
                    t.attention_warm_graph
                );
                if let Some(f) = csv.as_mut() {
                    for (kind, us) in [
                        ("loop_queued", t.queued),
                        ("loop_synced", t.synced),
                        ("loop_fused_queued", t.fused_queued),
                        ("loop_fused_synced", t.fused_synced),
                        ("loop_attention_warm", t.attention_warm),
                        ("loop_attention_warm_graph", t.attention_warm_graph),
                    ] {
                        writeln!(f, "{kind},{dtype},1,4096,{us:.2},,").expect("csv");
                    }
                }
            }
            Err(e) => println!("rust loop {dtype}: error {e}"),
        }
    }
}

fn cache_with(
    dtype: DType,
    b: usize,
    l: usize,
    extra: usize,
    dev: Device,
    seed: u64,
) -> Result<KvCache> {
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: HKV,
        head_dim: D,
        capacity: l + extra,
        dtype,
    };
    let mut c = KvCache::contiguous(spec, KvCacheLayout::FlashAttention, dev)?;
    let n = b * l * HKV * D;
    let k = DeviceTensor::from_f32(&random_values(n, seed), &[b, l, HKV, D], dtype, dev)?;
    let v = DeviceTensor::from_f32(&random_values(n, seed + 1), &[b, l, HKV, D], dtype, dev)?;
    c.append(&k, &v)?;
    Ok(c)
}

/// Per-call times of [`attention_only`].
struct AttentionTimes {
    us: f64,
    tbps: f64,
    splits: usize,
    graph_us: f64,
    graph_tbps: f64,
}

/// The decode call over rotated caches, queued back to back on the stream, then the same
/// calls (one rotation) recorded once with `Device::capture_graph` and replayed.
fn attention_only(
    backend: &GpuAttentionBackend,
    dtype: DType,
    b: usize,
    l: usize,
) -> Result<AttentionTimes> {
    let dev = backend.device();
    let kv_bytes = 2 * b * l * HKV * D * dtype.size_in_bytes();
    // Enough distinct caches to exceed L2 several times over.
    let copies = (256usize << 20).div_ceil(kv_bytes).clamp(1, 16);
    let caches: Vec<KvCache> = (0..copies)
        .map(|i| cache_with(dtype, b, l, 0, dev, 10 * i as u64))
        .collect::<Result<_>>()?;
    let cfg = AttentionConfig::new(H * D, H, l)
        .with_num_kv_heads(HKV)
        .with_causal(true);
    let q = DeviceTensor::from_f32(&random_values(b * H * D, 99), &[b, 1, H, D], dtype, dev)?;
    let mut out = DeviceTensor::zeros(&[b, 1, H, D], dtype, dev)?;
    for c in &caches {
        backend.forward_cached(&cfg, &q, c, &mut out)?;
    }
    dev.synchronize()?;
    let reps = 20 * copies;
    let mut samples = Vec::new();
    let mut host = Vec::new();
    for _ in 0..7 {
        let ms = dev.elapsed_ms(|| {
            let t = Instant::now();
            for i in 0..reps {
                backend.forward_cached(&cfg, &q, &caches[i % copies], &mut out)?;
            }
            host.push(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
            Ok(())
        })?;
        samples.push(ms * 1e3 / reps as f64);
    }
    samples.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    let us = samples[samples.len() / 2];
    // When the host needs as long to queue a call as the device to run it, the device time
    // above is the host's rate, not the kernel's.
    println!(
        "  host queues one call in {:.1} us (median)",
        host[host.len() / 2]
    );
    // The cut these calls launched (FORGE_ATTN_DECODE_SPLITS included): decode_split plans
    // with the launch's own function.
    let splits = backend.decode_split(&cfg, &q, &caches[0], &out)?.num_splits;
    let graph = dev.capture_graph(|| {
        for c in &caches {
            backend.forward_cached(&cfg, &q, c, &mut out)?;
        }
        Ok(())
    })?;
    graph.launch()?;
    dev.synchronize()?;
    let mut graph_samples = Vec::new();
    for _ in 0..7 {
        let ms = dev.elapsed_ms(|| {
            for _ in 0..20 {
                graph.launch()?;
            }
            Ok(())
        })?;
        graph_samples.push(ms * 1e3 / (20 * copies) as f64);
    }
    graph_samples.sort_by(f64::total_cmp);
    let graph_us = graph_samples[graph_samples.len() / 2];
    let tbps = |us: f64| kv_bytes as f64 / (us * 1e-6) / 1e12;
    Ok(AttentionTimes {
        us,
        tbps: tbps(us),
        splits,
        graph_us,
        graph_tbps: tbps(graph_us),
    })
}

/// A decode loop's step (append the token's K/V, attend over the cache), timed two ways:
/// the host waiting for each step (wall clock, median), and steps queued back to back as a
/// GPU-resident loop runs them (device time over the whole loop / steps); then the
/// attention call alone, queued, on the same cache; then the step as one
/// `forward_cached_append` call, both ways. The cache grows from L - 800 to L tokens.
fn step_loop(backend: &GpuAttentionBackend, dtype: DType, b: usize, l: usize) -> Result<StepTimes> {
    let dev = backend.device();
    let steps = 200;
    // Four passes of `steps` appends end at length l.
    let mut cache = cache_with(dtype, b, l - 4 * steps, 4 * steps, dev, 7)?;
    let cfg = AttentionConfig::new(H * D, H, l)
        .with_num_kv_heads(HKV)
        .with_causal(true);
    let mut x = DeviceTensor::from_f32(&random_values(b * H * D, 5), &[b, 1, H, D], dtype, dev)?;
    let mut out = DeviceTensor::zeros(&[b, 1, H, D], dtype, dev)?;
    dev.synchronize()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        cache.append(&x.narrow(2, 0, HKV)?, &x.narrow(2, HKV, HKV)?)?;
        backend.forward_cached(&cfg, &x, &cache, &mut out)?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        std::mem::swap(&mut x, &mut out);
    }
    times.sort_by(f64::total_cmp);
    let synced = times[times.len() / 2];
    let ms = dev.elapsed_ms(|| {
        for _ in 0..steps {
            cache.append(&x.narrow(2, 0, HKV)?, &x.narrow(2, HKV, HKV)?)?;
            backend.forward_cached(&cfg, &x, &cache, &mut out)?;
            std::mem::swap(&mut x, &mut out);
        }
        Ok(())
    })?;
    // The attention call alone, queued back to back on this one cache: one layer's cache of
    // this size fits in L2, so this is the warm-cache latency (the table above rotates
    // caches through DRAM).
    let attn_ms = dev.elapsed_ms(|| {
        for _ in 0..steps {
            backend.forward_cached(&cfg, &x, &cache, &mut out)?;
        }
        Ok(())
    })?;
    // The same step as one call, `forward_cached_append` (one launch here), both ways.
    let mut fused_times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        let (k_new, v_new) = (x.narrow(2, 0, HKV)?, x.narrow(2, HKV, HKV)?);
        backend.forward_cached_append(&cfg, &x, &k_new, &v_new, &mut cache, &mut out)?;
        dev.synchronize()?;
        fused_times.push(t.elapsed().as_secs_f64() * 1e6);
        std::mem::swap(&mut x, &mut out);
    }
    fused_times.sort_by(f64::total_cmp);
    let fused_ms = dev.elapsed_ms(|| {
        for _ in 0..steps {
            let (k_new, v_new) = (x.narrow(2, 0, HKV)?, x.narrow(2, HKV, HKV)?);
            backend.forward_cached_append(&cfg, &x, &k_new, &v_new, &mut cache, &mut out)?;
            std::mem::swap(&mut x, &mut out);
        }
        Ok(())
    })?;
    // The attention call recorded once as a device graph and replayed, on the same cache.
    let graph = dev.capture_graph(|| {
        backend
            .forward_cached(&cfg, &x, &cache, &mut out)
            .map(|_| ())
    })?;
    graph.launch()?;
    let attn_graph_ms = dev.elapsed_ms(|| {
        for _ in 0..steps {
            graph.launch()?;
        }
        Ok(())
    })?;
    drop(graph);
    Ok(StepTimes {
        synced,
        queued: ms * 1e3 / steps as f64,
        attention_warm: attn_ms * 1e3 / steps as f64,
        attention_warm_graph: attn_graph_ms * 1e3 / steps as f64,
        fused_synced: fused_times[fused_times.len() / 2],
        fused_queued: fused_ms * 1e3 / steps as f64,
    })
}

/// Per-step times of [`step_loop`], microseconds.
struct StepTimes {
    synced: f64,
    queued: f64,
    attention_warm: f64,
    attention_warm_graph: f64,
    fused_synced: f64,
    fused_queued: f64,
}
