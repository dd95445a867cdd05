//! A GPU-resident decode loop: the prompt's K/V are uploaded once and prefilled with one
//! causal attention call; then every step appends the new token's K/V to the cache, runs
//! attention of that token against the whole cache (`forward_cached`, on any backend; on a
//! GPU both in one `forward_cached_append` call, one launch), and feeds the output into the
//! next step.
//! Nothing crosses to the host inside the loop; the transfer counters prove it.
//!
//! Run: `cargo run --release --example decode_step [-- --device cuda:0 --steps 64 ...]`

use std::sync::Arc;
use std::time::Instant;

use forge_attn::reference::{attention_f64, random_values, relative_l2_error};
use forge_attn::{
    AttentionConfig, AttentionPath, CpuAttentionBackend, DType, Device, DeviceAttentionBackend,
    DeviceTensor, GpuAttentionBackend, KvCache, KvCacheLayout, KvCacheSpec, Result,
};

struct Args {
    device: Device,
    /// Why no GPU was chosen, when the device was picked automatically and is the CPU.
    no_gpu: Option<String>,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    prompt: usize,
    steps: usize,
    dtype: DType,
    paged: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let (device, no_gpu) = Device::best_available_with_reason();
    let mut a = Args {
        device,
        no_gpu,
        batch: 8,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        prompt: 1024,
        steps: 64,
        dtype: DType::F32,
        paged: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--device" => match val()?.as_str() {
                "auto" => (a.device, a.no_gpu) = Device::best_available_with_reason(),
                name => {
                    a.device = name.parse().map_err(|e| format!("--device: {e}"))?;
                    a.no_gpu = None;
                }
            },
            "--batch" => a.batch = num(val()?)?,
            "--heads" => a.heads = num(val()?)?,
            "--kv-heads" => a.kv_heads = num(val()?)?,
            "--head-dim" => a.head_dim = num(val()?)?,
            "--prompt" => a.prompt = num(val()?)?,
            "--steps" => a.steps = num(val()?)?,
            "--dtype" => {
                a.dtype = match val()?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => {
                        return Err(format!("--dtype: expected f32, f16 or bf16, got {other}"))
                    }
                }
            }
            "--paged" => a.paged = true,
            "--bench" => {} // passed by `cargo bench`-style runners; nothing to do
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.steps == 0 || a.prompt == 0 {
        return Err("--steps and --prompt must be > 0".into());
    }
    Ok(a)
}

/// One decode step: append the new token's K/V and attend over the cache. On a GPU one
/// call (the split-KV kernel appends and attends in one launch where it can); elsewhere an
/// append and the backend's attention over the cache.
fn decode_step(
    backend: &Backend,
    config: &AttentionConfig,
    x: &DeviceTensor,
    (k_new, v_new): (&DeviceTensor, &DeviceTensor),
    cache: &mut KvCache,
    out: &mut DeviceTensor,
) -> Result<AttentionPath> {
    if let Some(gpu) = &backend.fused {
        return gpu.forward_cached_append(config, x, k_new, v_new, cache, out);
    }
    cache.append(k_new, v_new)?;
    backend.attention.forward_cached(config, x, cache, out)
}

/// The cache's K and V as dense `[B, L, Hkv, D]` tensors (a download: for checking only).
fn cache_contents(cache: &KvCache) -> Result<(DeviceTensor, DeviceTensor)> {
    let (k, v) = cache.to_dense()?;
    Ok((k, v))
}

/// The backend of the device, and on a GPU the same backend once more for its fused
/// append-and-attend step (a GPU-only call).
struct Backend {
    attention: Arc<dyn DeviceAttentionBackend>,
    fused: Option<Arc<GpuAttentionBackend>>,
}

impl Backend {
    fn new(device: Device) -> Result<Self> {
        if device == Device::Cpu {
            return Ok(Backend {
                attention: Arc::new(CpuAttentionBackend::new()),
                fused: None,
            });
        }
        let gpu = Arc::new(GpuAttentionBackend::new(device)?);
        Ok(Backend {
            attention: gpu.clone(),
            fused: Some(gpu),
        })
    }

    fn as_dyn(&self) -> &dyn DeviceAttentionBackend {
        self.attention.as_ref()
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("decode_step: {e}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(err) if err <= tolerance(args.dtype) => {}
        Ok(err) => {
            eprintln!(
                "decode_step: error {err:.3e} above tolerance {:.1e}",
                tolerance(args.dtype)
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("decode_step: {e}");
            std::process::exit(1);
        }
    }
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// The device with its model, and when it was picked automatically and is the CPU, why
/// no GPU was taken: `cpu (2 threads; no GPU: ...)`.
fn describe_device(a: &Args) -> String {
    let described = a.device.describe();
    match &a.no_gpu {
        None => described,
        Some(why) => match described.strip_suffix(')') {
            Some(open) => format!("{open}; no GPU: {why})"),
            None => format!("{described} (no GPU: {why})"),
        },
    }
}

fn run(a: &Args) -> Result<f64> {
    let (b, h, hkv, d) = (a.batch, a.heads, a.kv_heads, a.head_dim);
    let capacity = a.prompt + a.steps;
    let backend = Backend::new(a.device)?;
    let config = AttentionConfig::new(h * d, h, capacity)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    config.validate()?;
    println!(
        "decode_step: device {} | backend {} | {} | B={b} H={h} Hkv={hkv} D={d} prompt={} steps={}",
        describe_device(a),
        backend.as_dyn().name(),
        a.dtype,
        a.prompt,
        a.steps
    );

    // Everything is uploaded here, before the loop: the prompt and its K/V.
    let dev = a.device;
    let prompt_q = DeviceTensor::from_f32(
        &random_values(b * a.prompt * h * d, 1),
        &[b, a.prompt, h, d],
        a.dtype,
        dev,
    )?;
    let prompt_k = DeviceTensor::from_f32(
        &random_values(b * a.prompt * hkv * d, 2),
        &[b, a.prompt, hkv, d],
        a.dtype,
        dev,
    )?;
    let prompt_v = DeviceTensor::from_f32(
        &random_values(b * a.prompt * hkv * d, 3),
        &[b, a.prompt, hkv, d],
        a.dtype,
        dev,
    )?;
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: hkv,
        head_dim: d,
        capacity,
        dtype: a.dtype,
    };
    let mut cache = if a.paged {
        KvCache::paged(spec, 16, b * capacity.div_ceil(16), dev)?
    } else {
        KvCache::contiguous(spec, KvCacheLayout::FlashAttention, dev)?
    };
    cache.append(&prompt_k, &prompt_v)?;

    // Prefill: causal attention over the prompt; its last token's output starts decoding.
    let t0 = Instant::now();
    let mut prefill_out = DeviceTensor::zeros(&[b, a.prompt, h, d], a.dtype, dev)?;
    let prefill_path = backend.as_dyn().forward_into(
        &config,
        &prompt_q,
        &prompt_k,
        &prompt_v,
        None,
        &mut prefill_out,
    )?;
    let mut x = DeviceTensor::zeros(&[b, 1, h, d], a.dtype, dev)?;
    x.copy_from(&prefill_out.narrow(1, a.prompt - 1, 1)?)?;
    dev.synchronize()?;
    println!(
        "prefill: {} tokens x {b} sequences in {:.3} ms, path {prefill_path}, cache {:?}",
        a.prompt,
        t0.elapsed().as_secs_f64() * 1e3,
        cache.layout()
    );
    drop(prefill_out);

    let mut out = DeviceTensor::zeros(&[b, 1, h, d], a.dtype, dev)?;
    let before = dev.transfer_stats();
    let mut step_ms = Vec::with_capacity(a.steps);
    let mut path = prefill_path;
    let loop_start = Instant::now();
    for step in 0..a.steps {
        let t = Instant::now();
        // The new token's K and V are derived from the previous output on the device.
        let new_kv = (&x.narrow(2, 0, hkv)?, &x.narrow(2, h - hkv, hkv)?);
        path = decode_step(&backend, &config, &x, new_kv, &mut cache, &mut out)?;
        dev.synchronize()?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if step + 1 < a.steps {
            std::mem::swap(&mut x, &mut out);
        }
    }
    let total = loop_start.elapsed().as_secs_f64();
    let inside = dev.transfer_stats().since(&before);

    step_ms.sort_by(f64::total_cmp);
    let median = step_ms[step_ms.len() / 2];
    let cache_len = a.prompt + a.steps;
    let kv_bytes = 2.0 * (b * cache_len * hkv * d * a.dtype.size_in_bytes()) as f64;
    println!(
        "decode: {} steps, path {path}, per-step median {:.3} ms (min {:.3}, max {:.3}), {:.1} tokens/s ({} sequences), ~{:.1} GB/s K/V read at the last step",
        a.steps,
        median,
        step_ms[0],
        step_ms[step_ms.len() - 1],
        (a.steps * b) as f64 / total,
        b,
        kv_bytes / (median * 1e-3) / 1e9
    );
    println!(
        "host transfers inside the loop: {} calls, {} bytes",
        inside.total_calls(),
        inside.host_to_device_bytes + inside.device_to_host_bytes
    );

    // Check the last step against an f64 reference over the cache as the device holds it.
    let (k_all, v_all) = cache_contents(&cache)?;
    let x_host = DeviceTensor::from_f32(&x.to_f32_vec()?, x.shape(), a.dtype, Device::Cpu)?;
    let want = attention_f64(&config, &x_host, &k_all, &v_all, None)?;
    let got = out.to_f32_vec()?;
    let err = relative_l2_error(&got, &want);
    println!(
        "final step vs f64 reference: relative L2 error {err:.3e} (tolerance {:.0e})",
        tolerance(a.dtype)
    );
    if inside.total_calls() != 0 {
        return Err(forge_attn::AttentionError::Runtime {
            op: "decode loop".into(),
            detail: format!(
                "{} host transfers inside the loop, expected 0",
                inside.total_calls()
            ),
            source: None,
        });
    }
    Ok(err)
}
