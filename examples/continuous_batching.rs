//! Serving steps of a continuously batched engine, each one attention call over a paged
//! `KvCache` with packed (varlen) queries (`forward_paged_varlen`), mixing:
//! - a new request whose prompt is prefilled in chunks (hundreds of queries per step,
//!   causal against everything it has cached so far),
//! - a prefix-cache hit: a request forked from another (`KvCache::fork`, the prompt's
//!   pages shared, copied on write) that prefills only its own suffix,
//! - ongoing decodes of different lengths (one query each),
//!
//! all with one set of per-call options (a sliding window and a logits softcap). Every step
//! is checked against the f64 reference and prints its tokens, time and tokens/s.
//!
//! Run: `cargo run --release --example continuous_batching [-- --device cpu --steps 4
//! --heads 8 --kv-heads 2 --head-dim 64 --prompt 1536 --chunk 512]`. A backend that does not
//! run paged varlen attention (the GPU backend, for now) says why, and the example runs on
//! the CPU instead.

use std::time::Instant;

use forge_attn::reference::{paged_varlen_attention_f64, random_values, relative_l2_error};
use forge_attn::{
    AttentionConfig, AttentionOptions, CpuAttentionBackend, DType, Device, DeviceAttentionBackend,
    DeviceTensor, GpuAttentionBackend, KvCache, KvCacheSpec, Result,
};

struct Args {
    device: Device,
    steps: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Prompt length of the new request, prefilled `chunk` tokens per step.
    prompt: usize,
    chunk: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        device: Device::Cpu,
        steps: 4,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        prompt: 1536,
        chunk: 512,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            val.parse::<usize>()
                .map_err(|e| format!("{flag} {val}: {e}"))
        };
        match flag.as_str() {
            "--device" => a.device = val.parse().map_err(|e| format!("--device: {e}"))?,
            "--steps" => a.steps = num()?,
            "--heads" => a.heads = num()?,
            "--kv-heads" => a.kv_heads = num()?,
            "--head-dim" => a.head_dim = num()?,
            "--prompt" => a.prompt = num()?,
            "--chunk" => a.chunk = num()?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.steps == 0 || a.chunk == 0 || a.prompt == 0 || a.kv_heads == 0 {
        return Err("--steps, --chunk, --prompt and --kv-heads must be > 0".into());
    }
    Ok(a)
}

/// `[B, n, Hkv, D]` random new K or V rows.
fn rows(
    b: usize,
    n: usize,
    hkv: usize,
    d: usize,
    seed: u64,
    device: Device,
) -> Result<DeviceTensor> {
    DeviceTensor::from_f32(
        &random_values(b * n * hkv * d, seed),
        &[b, n, hkv, d],
        DType::F32,
        device,
    )
}

fn main() -> Result<()> {
    let a = parse_args().map_err(|e| forge_attn::AttentionError::InvalidConfig {
        field: "arguments",
        reason: e,
    })?;
    let (h, hkv, d) = (a.heads, a.kv_heads, a.head_dim);
    let backend: Box<dyn DeviceAttentionBackend> = match a.device {
        Device::Cpu => Box::new(CpuAttentionBackend),
        dev => Box::new(GpuAttentionBackend::new(dev)?),
    };
    // Sequences: 0 the new request (chunked prompt), 1 the prefix-cache hit, 2 and 3
    // ongoing decodes. 2's history is the shared prompt that 1 forks.
    let (history2, history3, suffix1) = (1024usize, 300usize, 96usize);
    let capacity = (a.prompt + a.steps)
        .max(history2 + suffix1 + a.steps)
        .max(history3 + a.steps);
    let spec = KvCacheSpec {
        batch: 4,
        num_kv_heads: hkv,
        head_dim: d,
        capacity,
        dtype: DType::F32,
    };
    let page = 16;
    let pages = 4 * capacity.div_ceil(page) + 8;
    let mut device = a.device;
    let mut cache = KvCache::paged(spec, page, pages, device)?;
    // Probe the backend once on the empty layout; fall back to the CPU with the reason.
    let probe_q = DeviceTensor::zeros(&[1, h, d], DType::F32, device)?;
    let probe_cu = DeviceTensor::from_host(&[0i32, 1, 1, 1, 1], &[5], device)?;
    let mut probe_out = probe_q.clone();
    let probe_cfg = AttentionConfig::new(h * d, h, capacity)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    let backend = match backend.forward_paged_varlen(
        &probe_cfg,
        &AttentionOptions::new(),
        &probe_q,
        &probe_cu,
        1,
        &cache.paged_view()?,
        &mut probe_out,
        None,
    ) {
        Err(forge_attn::AttentionError::NotSupported { backend, reason }) => {
            println!("{backend} does not run this call ({reason}); running on the CPU");
            device = Device::Cpu;
            cache = KvCache::paged(spec, page, pages, device)?;
            Box::new(CpuAttentionBackend) as Box<dyn DeviceAttentionBackend>
        }
        _ => backend,
    };

    // History: sequence 2's prompt and sequence 3's context, then 1 forks 2.
    let n = history2.max(history3);
    cache.append_ragged(
        &rows(4, n, hkv, d, 1, device)?,
        &rows(4, n, hkv, d, 2, device)?,
        &[0, 0, history2, history3],
    )?;
    cache.fork(2, 1)?;
    let options = AttentionOptions::new()
        .with_window(Some(1023), Some(0))
        .with_softcap(30.0);
    println!(
        "continuous batching on {device}: H={h}/{hkv} D={d}, paged cache (page {page}), window 1024 + softcap 30"
    );

    let mut prefilled = 0usize;
    let mut worst = 0f64;
    for step in 0..a.steps {
        // This step's queries per sequence: the next prompt chunk (then one token per
        // step once the prompt is in), the hit's suffix on the first step, one token for
        // every decode.
        let q0 = if prefilled < a.prompt {
            a.chunk.min(a.prompt - prefilled)
        } else {
            1
        };
        let q1 = if step == 0 { suffix1 } else { 1 };
        let counts = [q0, q1, 1, 1];
        let m = *counts.iter().max().unwrap_or(&1);
        let seed = 10 + 3 * step as u64;
        cache.append_ragged(
            &rows(4, m, hkv, d, seed, device)?,
            &rows(4, m, hkv, d, seed + 1, device)?,
            &counts,
        )?;
        prefilled += q0.min(a.prompt.saturating_sub(prefilled));
        let total: usize = counts.iter().sum();
        let mut cu = vec![0i32];
        for &c in &counts {
            cu.push(cu[cu.len() - 1] + c as i32);
        }
        let q = DeviceTensor::from_f32(
            &random_values(total * h * d, seed + 2),
            &[total, h, d],
            DType::F32,
            device,
        )?;
        let cu_q = DeviceTensor::from_host(&cu, &[5], device)?;
        let mut out = DeviceTensor::zeros(&[total, h, d], DType::F32, device)?;
        let mut lse = DeviceTensor::zeros(&[h, total], DType::F32, device)?;
        let config = AttentionConfig::new(h * d, h, capacity)
            .with_num_kv_heads(hkv)
            .with_causal(true);
        let kv = cache.paged_view()?;
        let t = Instant::now();
        backend.forward_paged_varlen(
            &config,
            &options,
            &q,
            &cu_q,
            m,
            &kv,
            &mut out,
            Some(&mut lse),
        )?;
        device.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        let (want, _) = paged_varlen_attention_f64(&config, &options, &q, &cu_q, &kv)?;
        let err = relative_l2_error(&out.to_f32_vec()?, &want);
        worst = worst.max(err);
        println!(
            "step {step}: {total} tokens (prompt chunk {q0}, prefix hit {q1}, decodes 1 + 1; cached {:?}) in {:.2} ms, {:.0} tokens/s, error {err:.1e}",
            cache.lengths(),
            secs * 1e3,
            total as f64 / secs
        );
    }
    if worst > 1e-5 {
        return Err(forge_attn::AttentionError::InvalidConfig {
            field: "result",
            reason: format!("relative error {worst:.2e} against the f64 reference exceeds 1e-5"),
        });
    }
    println!("worst relative error against the f64 reference: {worst:.1e}");
    Ok(())
}
