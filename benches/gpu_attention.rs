//! Prefill benchmark of every GPU path on FlashAttention's benchmark shapes:
//! batch * seq = 16384, heads = 2048 / head_dim, layout [B, H, S, D].
//! FLOPs = 4 * B * S * S * H * D, halved when causal.
//!
//! `cargo bench --bench gpu_attention -- [--dtypes f32,bf16] [--dims 64,128] [--seqs 512,1024]
//!  [--paths flash,traditional] [--csv FILE]`
//! Paths: `flash` and `traditional` on the GPU, `tf32` (flash with f32 inputs in TF32 on
//! the tensor cores; f32 only), `cpu` (the CPU backend on this machine's
//! cores, up to `--max-cpu-seq`). Prints one line per measurement and writes a CSV for
//! scripts/bench_torch_sdpa.py.

use std::io::Write;

mod common;

use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, CpuAttentionBackend, DType, Device, DeviceAttentionBackend, DeviceTensor,
    GpuAttentionBackend, Layout,
};

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() {
    let mut dtypes = vec![DType::F32, DType::F16, DType::BF16];
    let mut dims = vec![64usize, 128, 256];
    let mut seqs = vec![512usize, 1024, 2048, 4096, 8192, 16384];
    let mut paths = vec!["flash".to_string(), "traditional".to_string()];
    let mut csv_path = None;
    let mut max_traditional_seq = 8192usize;
    let mut max_cpu_seq = 2048usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_default();
        match a.as_str() {
            "--dtypes" => dtypes = common::dtypes(&v()),
            "--dims" => dims = common::numbers(&v()),
            "--seqs" => seqs = common::numbers(&v()),
            "--paths" => paths = common::list(&v(), |x| Some(x.to_string())),
            "--csv" => csv_path = Some(v()),
            "--max-traditional-seq" => max_traditional_seq = v().parse().unwrap_or(8192),
            "--max-cpu-seq" => max_cpu_seq = v().parse().unwrap_or(2048),
            _ => {} // `--bench` and other harness flags
        }
    }
    let device = Device::best_available();
    if !device.is_gpu() {
        eprintln!("gpu_attention: no GPU available, nothing to measure");
        return;
    }
    let tf32_backend = match GpuAttentionBackend::new(device) {
        Ok(b) => b.with_tf32(true),
        Err(e) => {
            eprintln!("gpu_attention: {e}");
            std::process::exit(1);
        }
    };
    let backend = match GpuAttentionBackend::new(device) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gpu_attention: {e}");
            std::process::exit(1);
        }
    };
    println!("device: {}", device.describe());
    let mut csv = csv_path.map(|p| {
        let mut f = std::fs::File::create(&p).expect("create csv");
        writeln!(
            f,
            "path,dtype,head_dim,seq,causal,batch,heads,ms,tflops,config"
        )
        .expect("write csv");
        f
    });
    for &dtype in &dtypes {
        for &d in &dims {
            for &s in &seqs {
                for causal in [false, true] {
                    for path in &paths {
                        if (path == "traditional" && s > max_traditional_seq)
                            || (path == "cpu" && s > max_cpu_seq)
                        {
                            continue;
                        }
                        if path == "tf32" && dtype != DType::F32 {
                            continue;
                        }
                        let b = if path == "tf32" {
                            &tf32_backend
                        } else {
                            &backend
                        };
                        match measure(b, path, dtype, d, s, causal) {
                            Ok((ms, tflops, cfgdesc)) => {
                                let (b, h) = (16384 / s, 2048 / d);
                                println!(
                                    "{path:12} {dtype:5} D={d:3} S={s:5} causal={} B={b:2} H={h:2}: {ms:9.3} ms {tflops:7.1} TFLOP/s  [{cfgdesc}]",
                                    causal as u8
                                );
                                if let Some(f) = csv.as_mut() {
                                    writeln!(f, "{path},{dtype},{d},{s},{},{b},{h},{ms:.4},{tflops:.2},{cfgdesc}", causal as u8)
                                        .expect("write csv");
                                }
                            }
                            Err(e) => println!(
                                "{path:12} {dtype:5} D={d:3} S={s:5} causal={}: error {e}",
                                causal as u8
                            ),
                        }
                    }
                }
            }
        }
    }
}

fn measure(
    backend: &GpuAttentionBackend,
    path: &str,
    dtype: DType,
    d: usize,
    s: usize,
    causal: bool,
) -> forge_attn::Result<(f64, f64, String)> {
    // The CPU path runs the CPU backend on this machine's cores, on host copies.
    let dev = if path == "cpu" {
        Device::Cpu
    } else {
        backend.device()
    };
    let (b, h) = (16384 / s, 2048 / d);
    let shape = [b, h, s, d];
    let n = b * h * s * d;
    let q = DeviceTensor::from_f32(&random_values(n, 1), &shape, dtype, dev)?;
    let k = DeviceTensor::from_f32(&random_values(n, 2), &shape, dtype, dev)?;
    let v = DeviceTensor::from_f32(&random_values(n, 3), &shape, dtype, dev)?;
    let mut out = DeviceTensor::zeros(&shape, dtype, dev)?;
    let cfg = AttentionConfig::new(h * d, h, s)
        .with_causal(causal)
        .with_layout(Layout::Bhsd);
    let plan = backend.plan_for_config(&cfg, dtype, s, false);
    let cfgdesc = match (path, plan.flash) {
        ("flash" | "tf32", Some(c)) => match c.tile {
            Some(t) => format!(
                "{:?} {} BM={} BN={} threads={} smem={}",
                c.kernel, c.implementation, t.block_m, t.block_n, t.threads, t.smem_bytes
            ),
            None => format!("{:?}", c.kernel),
        },
        ("flash" | "tf32", None) => {
            return Err(forge_attn::AttentionError::NotSupported {
                backend: "flash".into(),
                reason: plan.fallback_reason.unwrap_or_default(),
            })
        }
        ("cpu", _) => format!("{} threads", rayon_threads()),
        _ => "3 launches".to_string(),
    };
    let run = |out: &mut DeviceTensor| -> forge_attn::Result<()> {
        if path == "traditional" {
            backend.forward_traditional(&cfg, &q, &k, &v, None, out)?;
        } else if path == "cpu" {
            CpuAttentionBackend.forward_into(&cfg, &q, &k, &v, None, out)?;
        } else {
            backend.forward_into(&cfg, &q, &k, &v, None, out)?;
        }
        Ok(())
    };
    run(&mut out)?;
    dev.synchronize()?;
    let flops = 4.0 * (b * s * s * h * d) as f64 * if causal { 0.5 } else { 1.0 };
    // Enough repetitions for ~0.3 s, at least 5; each timed with device events.
    let once = dev.elapsed_ms(|| run(&mut out))?;
    let reps = if path == "cpu" {
        2
    } else {
        ((300.0 / once) as usize).clamp(5, 50)
    };
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        times.push(dev.elapsed_ms(|| run(&mut out))?);
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    Ok((ms, flops / (ms * 1e-3) / 1e12, cfgdesc))
}
