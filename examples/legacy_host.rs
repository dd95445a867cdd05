//! Attention through the original host-slice API: the registry runs the call on the best
//! backend that accepts it (a GPU when one is usable, else the CPU), the adapter uploads,
//! computes and downloads, and the result is checked against a plain f64 attention
//! from `forge_attn::reference`. It prints which backend ran and why the others did not.
//!
//! Run with `cargo run --release --example legacy_host [-- --device cpu|cuda:N|hip:N|auto]
//! [--seed N]` (a bare number is also taken as the seed). Without `--device` (or with
//! `auto`) the GPU backend is registered when a GPU is usable, with the CPU backend as the
//! fallback; `cpu` registers only the CPU backend; a GPU device registers its backend and
//! the CPU fallback, and fails if that GPU cannot be used. Exits non-zero when the
//! relative L2 error exceeds 1e-5.

use std::process::ExitCode;

use forge_attn::legacy::BackendPriority;
use forge_attn::{
    AttentionBackendRegistry, AttentionConfig, CpuAttentionBackend, Device, DeviceTensor,
    GpuAttentionBackend, HostAdapter,
};

const BATCH: usize = 2;
const SEQ: usize = 64;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const TOLERANCE: f64 = 1e-5;

/// SplitMix64, enough for reproducible example inputs.
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

/// The f64 reference (`forge_attn::reference`) over BSHD host slices.
fn attention_f64(
    cfg: &AttentionConfig,
    seq_q: usize,
    seq_k: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> forge_attn::Result<Vec<f64>> {
    let (b, h, hkv, d) = (
        cfg.batch_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let t = |x: &[f32], shape: &[usize]| DeviceTensor::from_host(x, shape, Device::Cpu);
    forge_attn::reference::attention_f64(
        cfg,
        &t(q, &[b, seq_q, h, d])?,
        &t(k, &[b, seq_k, hkv, d])?,
        &t(v, &[b, seq_k, hkv, d])?,
        None,
    )
}

struct Args {
    /// `None`: the best available device.
    device: Option<Device>,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        device: None,
        seed: 0x5EED,
    };
    let seed = |s: &str| {
        s.parse::<u64>()
            .map_err(|e| format!("the seed must be an unsigned integer, got {s:?}: {e}"))
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--device" => {
                a.device = match val()?.as_str() {
                    "auto" => None,
                    name => Some(name.parse().map_err(|e| format!("--device: {e}"))?),
                }
            }
            "--seed" => a.seed = seed(&val()?)?,
            other if !other.starts_with('-') => a.seed = seed(other)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// The registry for `--device`: see the crate-level comment of this example.
// `default()` keeps this right whatever settings the CPU backend carries.
#[allow(clippy::default_constructed_unit_structs)]
fn registry_for(device: Option<Device>) -> Result<AttentionBackendRegistry, String> {
    let Some(device) = device else {
        let (best, no_gpu) = Device::best_available_with_reason();
        match no_gpu {
            Some(why) => println!("device: cpu (no GPU: {why})"),
            None => println!("device: {}", best.describe()),
        }
        return Ok(AttentionBackendRegistry::with_default_backends());
    };
    let mut registry = AttentionBackendRegistry::new();
    if device.is_gpu() {
        // A GPU asked for by name is not replaced by the CPU when it cannot start.
        let gpu = GpuAttentionBackend::new(device).map_err(|e| e.to_string())?;
        registry
            .register_adapter(HostAdapter::new(gpu), BackendPriority::GPU)
            .map_err(|e| e.to_string())?;
    }
    registry
        .register_adapter(
            HostAdapter::new(CpuAttentionBackend::default()),
            BackendPriority::FALLBACK,
        )
        .map_err(|e| e.to_string())?;
    println!("device: {}", device.describe());
    Ok(registry)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("legacy_host: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = args.seed;
    let config = AttentionConfig::new(HEADS * HEAD_DIM, HEADS, SEQ)
        .with_num_kv_heads(KV_HEADS)
        .with_batch_size(BATCH)
        .with_causal(true);
    println!(
        "config: batch {BATCH}, seq {SEQ}, heads {HEADS}, kv_heads {KV_HEADS}, head_dim {HEAD_DIM}, causal; seed {seed}"
    );

    let mut rng = SplitMix(seed);
    let q = rng.values(BATCH * SEQ * HEADS * HEAD_DIM);
    let k = rng.values(BATCH * SEQ * KV_HEADS * HEAD_DIM);
    let v = rng.values(BATCH * SEQ * KV_HEADS * HEAD_DIM);

    let registry = match registry_for(args.device) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("legacy_host: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("registered backends: {:?}", registry.list_backends());
    let (out, dispatch) = match registry.forward_with_report(&config, &q, &k, &v, None) {
        Ok(done) => done,
        Err(e) => {
            eprintln!("legacy_host: {e}");
            return ExitCode::FAILURE;
        }
    };

    match dispatch.path {
        Some(path) => println!("backend: {} (path {path})", dispatch.backend),
        None => println!("backend: {}", dispatch.backend),
    }
    for skipped in &dispatch.skipped {
        println!("skipped {skipped}");
    }
    let checksum: f64 = out.iter().map(|&x| x as f64).sum();
    println!("output: {} values, checksum {checksum:.6}", out.len());

    let want = match attention_f64(&config, SEQ, SEQ, &q, &k, &v) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("reference: {e}");
            return ExitCode::FAILURE;
        }
    };
    if out.len() != want.len() {
        eprintln!("output length {} != expected {}", out.len(), want.len());
        return ExitCode::FAILURE;
    }
    let (num, den) = out
        .iter()
        .zip(&want)
        .fold((0.0f64, 0.0f64), |(n, d), (&g, &w)| {
            (n + (g as f64 - w).powi(2), d + w * w)
        });
    let err = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    println!("relative L2 error vs f64: {err:e} (tolerance {TOLERANCE:e})");
    if err.is_nan() || err > TOLERANCE {
        eprintln!("FAILED: error above tolerance");
        return ExitCode::FAILURE;
    }
    println!("OK");
    ExitCode::SUCCESS
}
