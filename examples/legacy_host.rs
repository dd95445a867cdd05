//! Attention through the original host-slice API: the registry picks the best backend
//! (a GPU when one is usable, else the CPU), the adapter uploads, computes and downloads,
//! and the result is checked against a plain f64 attention computed here.
//!
//! Run with `cargo run --release --example legacy_host [seed]`. Exits non-zero when the
//! relative L2 error exceeds 1e-5.

use std::process::ExitCode;

use forge_attn::{AttentionBackendRegistry, AttentionConfig};

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

/// Causal (bottom-right) GQA attention in f64 over BSHD slices.
fn attention_f64(
    cfg: &AttentionConfig,
    seq_q: usize,
    seq_k: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f64> {
    let (b, h, hkv, d) = (
        cfg.batch_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let group = h / hkv;
    let scale = cfg.effective_scale() as f64;
    let offset = seq_k as isize - seq_q as isize;
    let mut out = vec![0.0f64; b * seq_q * h * d];
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / group;
            for i in 0..seq_q {
                let last = if cfg.is_causal {
                    i as isize + offset
                } else {
                    seq_k as isize - 1
                };
                if last < 0 {
                    continue; // no visible key: the row stays zero
                }
                let visible = (last as usize + 1).min(seq_k);
                let qrow = &q[((bi * seq_q + i) * h + hi) * d..][..d];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let krow = &k[((bi * seq_k + j) * hkv + kh) * d..][..d];
                        qrow.iter()
                            .zip(krow)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let orow = &mut out[((bi * seq_q + i) * h + hi) * d..][..d];
                for (j, w) in weights.iter().enumerate() {
                    let vrow = &v[((bi * seq_k + j) * hkv + kh) * d..][..d];
                    for (o, &x) in orow.iter_mut().zip(vrow) {
                        *o += w * x as f64;
                    }
                }
                orow.iter_mut().for_each(|o| *o /= sum);
            }
        }
    }
    out
}

fn main() -> ExitCode {
    let seed = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => 0x5EED,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            eprintln!("seed must be an unsigned integer: {e}");
            return ExitCode::from(2);
        }
    };
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

    let registry = AttentionBackendRegistry::with_default_backends();
    println!("registered backends: {:?}", registry.list_backends());
    let backend = match registry.select_backend(&config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("no backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = match backend.forward(&config, &q, &k, &v, None) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("{} failed: {e}", backend.name());
            return ExitCode::FAILURE;
        }
    };

    println!("backend: {}", backend.name());
    if let Some(path) = registry.last_path(backend.name()) {
        println!("path: {path}");
    }
    let checksum: f64 = out.iter().map(|&x| x as f64).sum();
    println!("output: {} values, checksum {checksum:.6}", out.len());

    let want = attention_f64(&config, SEQ, SEQ, &q, &k, &v);
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
