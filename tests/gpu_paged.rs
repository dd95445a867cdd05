//! Paged attention over caller-owned pools on the GPU, against the f64 reference: page
//! sizes 1, 7, 16 and 256 with pages in random order, both pool layouts, ragged lengths (0
//! and 1 included), 1 .. 16 queries per sequence on the decode kernel and longer query
//! blocks (chunked prefill, queries longer than one tile against caches shorter than one
//! page) on the flash kernels reading K / V through the block table; every option with GQA
//! and the log-sum-exp; packed queries; refusals leave the output untouched.

use forge_attn::reference::{paged_attention_f64, paged_varlen_attention_f64, relative_l2_error};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionOptions, AttentionPath, DType, Device,
    DeviceAttentionBackend, DeviceTensor, FlashKernel, GpuAttentionBackend, Layout, PageLayout,
    PagedKv, VarlenBatch,
};

mod common;
use common::{options_on_host, paged_on_host, paged_pools, per_head, random_tensor, F32_BOUND};

const H: usize = 4;
const HKV: usize = 2;

fn config(d: usize, causal: bool, layout: Layout) -> AttentionConfig {
    AttentionConfig::new(H * d, H, 1 << 16)
        .with_num_kv_heads(HKV)
        .with_causal(causal)
        .with_layout(layout)
        .with_scale(0.5 / (d as f32 / 16.0).sqrt())
}

fn options(dev: Device) -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("plain", AttentionOptions::new()),
        (
            "all",
            AttentionOptions::new()
                .with_window(Some(90), Some(4))
                .with_softcap(2.5)
                .with_alibi_slopes(per_head(&[0.5, 0.25, 0.125, 0.0625], dev))
                .with_sinks(per_head(&[0.3, -1.0, 2.0, 0.0], dev)),
        ),
    ]
}

fn bound(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        F32_BOUND
    } else {
        1e-2
    }
}

fn lse_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse {i}");
        } else {
            let d = (g as f64 - w).abs() / w.abs().max(1.0);
            assert!(d < tol, "{what}: lse {i}: {g} vs {w}");
        }
    }
}

/// One dense-query paged call on the GPU against the reference; returns the path.
#[allow(clippy::too_many_arguments)]
fn check(
    backend: &GpuAttentionBackend,
    cfg: &AttentionConfig,
    name: &str,
    o: &AttentionOptions,
    kv: &PagedKv,
    d: usize,
    sq: usize,
    seed: u64,
) -> AttentionPath {
    let dev = backend.device();
    let b = kv.seq_lens.shape()[0];
    let shape = match cfg.layout {
        Layout::Bhsd => [b, H, sq, d],
        _ => [b, sq, H, d],
    };
    let dtype = kv.dtype();
    let qc = random_tensor(&shape, dtype, Device::Cpu, seed);
    let q = DeviceTensor::from_f32(&qc.to_f32_vec().unwrap(), &shape, dtype, dev).unwrap();
    let mut out = DeviceTensor::zeros(&shape, dtype, dev).unwrap();
    let mut lse = DeviceTensor::zeros(&[b, H, sq], DType::F32, dev).unwrap();
    let what = format!(
        "{name}: {dtype} page {} {:?} sq {sq} causal {}",
        kv.page_size, kv.layout, cfg.is_causal
    );
    let path = backend
        .forward_paged(cfg, o, &q, kv, &mut out, Some(&mut lse))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let host = paged_on_host(kv);
    let (want, want_lse) = paged_attention_f64(cfg, &options_on_host(o), &qc, &host).unwrap();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    assert!(
        err < bound(dtype),
        "{what} ({path:?}): relative error {err:e}"
    );
    let tol = if dtype == DType::F32 { 2e-5 } else { 3e-3 };
    lse_close(&lse.to_f32_vec().unwrap(), &want_lse, tol, &what);
    path
}

const LENS: [usize; 5] = [0, 1, 37, 300, 16];

#[test]
#[ignore = "needs a GPU"]
fn every_page_size_layout_and_query_count_matches_the_reference() {
    let (dev, backend) = common::gpu_backend();
    let d = 64;
    let mut seed = 1;
    for page in [1, 7, 16, 256] {
        for pl in [PageLayout::Nhd, PageLayout::Hnd] {
            for dtype in [DType::F32, DType::BF16] {
                seed += 10;
                let kv = paged_pools(&LENS, page, pl, dtype, HKV, d, dev, seed);
                for (sq, kernel) in [(1, true), (3, true), (16, true), (40, false), (300, false)] {
                    for causal in [true, false] {
                        for (name, o) in options(dev) {
                            let layout = if seed % 2 == 0 {
                                Layout::Bshd
                            } else {
                                Layout::Bhsd
                            };
                            let cfg = config(d, causal, layout);
                            let path =
                                check(&backend, &cfg, name, &o, &kv, d, sq, seed + sq as u64);
                            assert_eq!(
                                path == AttentionPath::Flash(FlashKernel::Decode),
                                kernel,
                                "sq {sq}: {path:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Chunked prefill over a long cached prefix, at the head dims of the wgmma and mma.sync
/// rows: hundreds of new queries against thousands of paged keys.
#[test]
#[ignore = "needs a GPU"]
fn chunked_prefill_over_a_long_prefix_matches_the_reference() {
    let (dev, backend) = common::gpu_backend();
    for (dtype, d) in [(DType::F16, 128), (DType::BF16, 64), (DType::F16, 32)] {
        let kv = paged_pools(&[1500, 700], 16, PageLayout::Nhd, dtype, HKV, d, dev, 77);
        for (name, o) in options(dev) {
            let cfg = config(d, true, Layout::Bshd);
            check(&backend, &cfg, name, &o, &kv, d, 200, 78);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn packed_queries_over_pages_match_the_reference() {
    let (dev, backend) = common::gpu_backend();
    let d = 64;
    let q_lens = [3usize, 0, 37, 1, 200];
    let k_lens = [10usize, 4, 300, 1, 250];
    for page in [7, 16] {
        for dtype in [DType::F32, DType::F16] {
            let kv = paged_pools(&k_lens, page, PageLayout::Hnd, dtype, HKV, d, dev, 5);
            let tq: usize = q_lens.iter().sum();
            let qc = random_tensor(&[tq, H, d], dtype, Device::Cpu, 6);
            let q =
                DeviceTensor::from_f32(&qc.to_f32_vec().unwrap(), &[tq, H, d], dtype, dev).unwrap();
            let cu = VarlenBatch::from_lengths(&q_lens, &q_lens, dev)
                .unwrap()
                .cu_seqlens_q;
            let cu_host = cpu_copy_i32(&cu);
            for causal in [false, true] {
                for (name, o) in options(dev) {
                    let cfg = config(d, causal, Layout::Bshd);
                    let mut out = DeviceTensor::zeros(&[tq, H, d], dtype, dev).unwrap();
                    let mut lse = DeviceTensor::zeros(&[H, tq], DType::F32, dev).unwrap();
                    let what = format!("{name}: {dtype} page {page} causal {causal}");
                    backend
                        .forward_paged_varlen(&cfg, &o, &q, &cu, 200, &kv, &mut out, Some(&mut lse))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let (want, want_lse) = paged_varlen_attention_f64(
                        &cfg,
                        &options_on_host(&o),
                        &qc,
                        &cu_host,
                        &paged_on_host(&kv),
                    )
                    .unwrap();
                    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
                    assert!(err < bound(dtype), "{what}: relative error {err:e}");
                    let tol = if dtype == DType::F32 { 2e-5 } else { 3e-3 };
                    lse_close(&lse.to_f32_vec().unwrap(), &want_lse, tol, &what);
                }
            }
        }
    }
}

fn cpu_copy_i32(t: &DeviceTensor) -> DeviceTensor {
    DeviceTensor::from_host(&t.to_host::<i32>().unwrap(), t.shape(), Device::Cpu).unwrap()
}

/// Refusals name the problem and leave the output untouched: a table entry outside the
/// pool, lengths past what the table holds, pools of another dtype than q.
#[test]
#[ignore = "needs a GPU"]
fn refused_paged_calls_change_nothing() {
    let (dev, backend) = common::gpu_backend();
    let d = 64;
    let pool = random_tensor(&[4, 16, HKV, d], DType::F16, dev, 1);
    let cfg = config(d, true, Layout::Bshd);
    let q = random_tensor(&[2, 20, H, d], DType::F16, dev, 2);
    let sentinel = vec![5.0f32; 2 * 20 * H * d];
    let cases: Vec<(&str, PagedKv)> = vec![
        (
            "table entry outside the pool",
            PagedKv::new(
                pool.clone(),
                pool.clone(),
                DeviceTensor::from_host(&[0i32, 9, 2, 3], &[2, 2], dev).unwrap(),
                DeviceTensor::from_host(&[20i32, 5], &[2], dev).unwrap(),
                16,
                PageLayout::Nhd,
            ),
        ),
        (
            "length past the table",
            PagedKv::new(
                pool.clone(),
                pool.clone(),
                DeviceTensor::from_host(&[0i32, 1, 2, 3], &[2, 2], dev).unwrap(),
                DeviceTensor::from_host(&[20i32, 33], &[2], dev).unwrap(),
                16,
                PageLayout::Nhd,
            ),
        ),
        (
            "pools of another dtype",
            PagedKv::new(
                random_tensor(&[4, 16, HKV, d], DType::BF16, dev, 3),
                random_tensor(&[4, 16, HKV, d], DType::BF16, dev, 4),
                DeviceTensor::from_host(&[0i32, 1, 2, 3], &[2, 2], dev).unwrap(),
                DeviceTensor::from_host(&[20i32, 5], &[2], dev).unwrap(),
                16,
                PageLayout::Nhd,
            ),
        ),
    ];
    for (name, kv) in cases {
        let mut out = DeviceTensor::from_f32(&sentinel, &[2, 20, H, d], DType::F16, dev).unwrap();
        let e = backend
            .forward_paged(&cfg, &AttentionOptions::new(), &q, &kv, &mut out, None)
            .unwrap_err();
        assert!(
            matches!(
                e,
                AttentionError::ShapeMismatch { .. } | AttentionError::DTypeMismatch { .. }
            ),
            "{name}: {e:?}"
        );
        assert_eq!(out.to_f32_vec().unwrap(), sentinel, "{name}");
    }
}
