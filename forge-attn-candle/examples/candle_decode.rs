//! A decode loop written with candle tensors: candle owns Q/K/V, the KV cache (one
//! preallocated `[B, capacity, Hkv, D]` tensor per K and V, written in place with
//! `slice_set`) and every output; attention goes through `forge_attn_candle::flash_attn`
//! over `narrow`ed views of the cache, with no copy. Every step is checked against
//! candle's own attention (matmul + softmax in candle, f32) on the same tensors.
//!
//! Then the same attention calls run through forge-attn on its own tensors (same shapes,
//! same device), so the per-call times of the two can be compared in one run.
//!
//! Run: `cargo run --release --example candle_decode [-- --cuda --steps 64 --batch 8
//! --prompt 4096 --dtype bf16]` (`--cuda` needs `--features cuda`).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};
use forge_attn::{AttentionConfig, DeviceAttentionBackend, DeviceTensor, Layout};

struct Args {
    cuda: bool,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    prompt: usize,
    steps: usize,
    dtype: DType,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        cuda: false,
        batch: 4,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        prompt: 512,
        steps: 16,
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--cuda" {
            a.cuda = true;
            continue;
        }
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            val.parse::<usize>()
                .map_err(|e| format!("{flag} {val}: {e}"))
        };
        match flag.as_str() {
            "--batch" => a.batch = num()?,
            "--heads" => a.heads = num()?,
            "--kv-heads" => a.kv_heads = num()?,
            "--head-dim" => a.head_dim = num()?,
            "--prompt" => a.prompt = num()?,
            "--steps" => a.steps = num()?,
            "--dtype" => {
                a.dtype = match val.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    _ => return Err(format!("--dtype {val}: f32, f16 or bf16")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// candle's own attention in f32 (GQA by repeating KV heads, causal bottom-right).
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let (_, sq, h, _) = q.dims4()?;
    let (_, sk, hkv, _) = k.dims4()?;
    let g = h / hkv;
    let f = |t: &Tensor| t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous();
    let rep = |t: Tensor| -> Result<Tensor> {
        let (b, hk, s, d) = t.dims4()?;
        t.unsqueeze(2)?
            .broadcast_as((b, hk, g, s, d))?
            .reshape((b, hk * g, s, d))
    };
    let (q, k, v) = (f(q)?, rep(f(k)?)?, rep(f(v)?)?);
    let mut s = (q.matmul(&k.t()?)? * scale as f64)?;
    if sq > 1 {
        let mask: Vec<f32> = (0..sq)
            .flat_map(|i| {
                (0..sk).map(move |j| {
                    if j + sq <= i + sk {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        s = s.broadcast_add(&Tensor::from_vec(mask, (sq, sk), q.device())?)?;
    }
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .matmul(&v)?
        .transpose(1, 2)
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((num / den.max(1e-30)).sqrt())
}

fn forge_dtype(d: DType) -> forge_attn::DType {
    match d {
        DType::F16 => forge_attn::DType::F16,
        DType::BF16 => forge_attn::DType::BF16,
        _ => forge_attn::DType::F32,
    }
}

fn main() -> Result<()> {
    let a = parse_args().map_err(candle_core::Error::Msg)?;
    let dev = if a.cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let (b, h, hkv, d) = (a.batch, a.heads, a.kv_heads, a.head_dim);
    let cap = a.prompt + a.steps;
    let scale = 1.0 / (d as f32).sqrt();
    let sync = || dev.synchronize();
    println!(
        "candle decode: {} B={b} H={h}/{hkv} D={d} prompt {} + {} steps, {:?}",
        if a.cuda { "cuda:0" } else { "cpu" },
        a.prompt,
        a.steps,
        a.dtype
    );

    // The cache: candle tensors, written in place.
    let kc = Tensor::zeros((b, cap, hkv, d), a.dtype, &dev)?;
    let vc = Tensor::zeros((b, cap, hkv, d), a.dtype, &dev)?;
    kc.slice_set(
        &Tensor::randn(0f32, 1.0, (b, a.prompt, hkv, d), &dev)?.to_dtype(a.dtype)?,
        1,
        0,
    )?;
    vc.slice_set(
        &Tensor::randn(0f32, 1.0, (b, a.prompt, hkv, d), &dev)?.to_dtype(a.dtype)?,
        1,
        0,
    )?;

    let forge_device = if a.cuda {
        forge_attn::Device::Cuda(0)
    } else {
        forge_attn::Device::Cpu
    };
    let transfers_before = forge_device.transfer_stats();
    let (mut worst, mut attn_s, mut queue_s) = (0f32, Vec::new(), Vec::new());
    for step in 0..a.steps {
        let pos = a.prompt + step;
        let new = || -> Result<Tensor> {
            Tensor::randn(0f32, 1.0, (b, 1, hkv, d), &dev)?.to_dtype(a.dtype)
        };
        kc.slice_set(&new()?, 1, pos)?;
        vc.slice_set(&new()?, 1, pos)?;
        let q = Tensor::randn(0f32, 1.0, (b, 1, h, d), &dev)?.to_dtype(a.dtype)?;
        let (k, v) = (kc.narrow(1, 0, pos + 1)?, vc.narrow(1, 0, pos + 1)?);
        sync()?;
        let t = Instant::now();
        let out = forge_attn_candle::flash_attn(&q, &k, &v, scale, true)?;
        queue_s.push(t.elapsed().as_secs_f64());
        sync()?;
        attn_s.push(t.elapsed().as_secs_f64());
        // The check reads one scalar back per step, outside the timed call.
        worst = worst.max(rel_err(&out, &candle_attention(&q, &k, &v, scale)?)?);
    }
    let transfers = forge_device.transfer_stats().since(&transfers_before);

    // The same calls on forge-attn's own tensors.
    let cfg = AttentionConfig::new(h * d, h, cap)
        .with_num_kv_heads(hkv)
        .with_batch_size(b)
        .with_scale(scale)
        .with_causal(true)
        .with_layout(Layout::Bshd);
    let fe = |e: forge_attn::AttentionError| candle_core::Error::wrap(e);
    let dt = forge_dtype(a.dtype);
    let backend: Box<dyn DeviceAttentionBackend> = if a.cuda {
        Box::new(forge_attn::GpuAttentionBackend::new(forge_device).map_err(fe)?)
    } else {
        Box::new(forge_attn::CpuAttentionBackend)
    };
    let fk = DeviceTensor::zeros(&[b, cap, hkv, d], dt, forge_device).map_err(fe)?;
    let fv = DeviceTensor::zeros(&[b, cap, hkv, d], dt, forge_device).map_err(fe)?;
    let fq = DeviceTensor::zeros(&[b, 1, h, d], dt, forge_device).map_err(fe)?;
    let mut fo = DeviceTensor::zeros(&[b, 1, h, d], dt, forge_device).map_err(fe)?;
    let (mut own_s, mut own_queue_s) = (Vec::new(), Vec::new());
    for step in 0..a.steps {
        let len = a.prompt + step + 1;
        let (k, v) = (
            fk.narrow(1, 0, len).map_err(fe)?,
            fv.narrow(1, 0, len).map_err(fe)?,
        );
        forge_device.synchronize().map_err(fe)?;
        let t = Instant::now();
        backend
            .forward_into(&cfg, &fq, &k, &v, None, &mut fo)
            .map_err(fe)?;
        own_queue_s.push(t.elapsed().as_secs_f64());
        forge_device.synchronize().map_err(fe)?;
        own_s.push(t.elapsed().as_secs_f64());
    }

    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e6
    };
    let (ca, own) = (median(&mut attn_s), median(&mut own_s));
    let (cq, oq) = (median(&mut queue_s), median(&mut own_queue_s));
    println!("worst relative error against candle's attention: {worst:.2e}");
    println!(
        "attention per step (median, synchronized): candle tensors {ca:.1} us, forge-attn tensors {own:.1} us, ratio {:.3}",
        ca / own
    );
    println!(
        "host time to queue one call (median): candle tensors {cq:.1} us, forge-attn tensors {oq:.1} us"
    );
    println!(
        "forge-attn host transfers in the loop: {} calls, {} bytes",
        transfers.total_calls(),
        transfers.host_to_device_bytes + transfers.device_to_host_bytes
    );
    let bound = if a.dtype == DType::F32 { 1e-5 } else { 1e-2 };
    if worst > bound || transfers.total_calls() != 0 {
        candle_core::bail!(
            "check failed: error {worst:.2e} (bound {bound:.0e}), transfers {}",
            transfers.total_calls()
        );
    }
    Ok(())
}
