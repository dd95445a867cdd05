//! KvCache on the CPU device (every layout), and on a GPU (ignored without one): appends,
//! ragged lengths, paging, overflow errors, and decode attention against the f64 reference.

use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionPath, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, FlashKernel, KvCache, KvCacheLayout, KvCacheSpec,
};

mod common;
use common::{
    forward_against_reference, gpu, gpu_backend, gpu_half_bound, max_abs_diff, spec, F32_BOUND,
};

fn tokens(
    b: usize,
    n: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
    dev: Device,
    seed: u64,
) -> (DeviceTensor, Vec<f32>) {
    let host = random_values(b * n * hkv * d, seed);
    (
        DeviceTensor::from_f32(&host, &[b, n, hkv, d], dtype, dev).unwrap(),
        host,
    )
}

fn caches(dev: Device, s: KvCacheSpec) -> Vec<KvCache> {
    vec![
        KvCache::contiguous(s, KvCacheLayout::Contiguous, dev).unwrap(),
        KvCache::contiguous(s, KvCacheLayout::FlashAttention, dev).unwrap(),
        KvCache::paged(s, 8, s.batch * s.capacity.div_ceil(8), dev).unwrap(),
    ]
}

/// Appends twice and checks the dense contents against the concatenated host data.
fn append_round_trip(dev: Device) {
    let (b, hkv, d) = (3, 2, 16);
    for mut cache in caches(dev, spec(b, hkv, d, 40, DType::F32)) {
        let (k1, hk1) = tokens(b, 13, hkv, d, DType::F32, dev, 1);
        let (v1, hv1) = tokens(b, 13, hkv, d, DType::F32, dev, 2);
        cache.append(&k1, &v1).unwrap();
        let (k2, hk2) = tokens(b, 1, hkv, d, DType::F32, dev, 3);
        let (v2, hv2) = tokens(b, 1, hkv, d, DType::F32, dev, 4);
        cache.append(&k2, &v2).unwrap();
        assert_eq!(cache.lengths(), &[14, 14, 14]);
        let (kd, vd) = cache.to_dense().unwrap();
        let (kd, vd) = (kd.to_host::<f32>().unwrap(), vd.to_host::<f32>().unwrap());
        for bb in 0..b {
            for pos in 0..14 {
                for x in 0..hkv * d {
                    let got = kd[(bb * 14 + pos) * hkv * d + x];
                    let want = if pos < 13 {
                        hk1[(bb * 13 + pos) * hkv * d + x]
                    } else {
                        hk2[bb * hkv * d + x]
                    };
                    assert_eq!(got, want, "{:?} k b{bb} pos{pos}", cache.layout());
                    let gotv = vd[(bb * 14 + pos) * hkv * d + x];
                    let wantv = if pos < 13 {
                        hv1[(bb * 13 + pos) * hkv * d + x]
                    } else {
                        hv2[bb * hkv * d + x]
                    };
                    assert_eq!(gotv, wantv);
                }
            }
        }
        if cache.layout() == KvCacheLayout::BlockSparse {
            assert_eq!(cache.pages_used(), 3 * 2);
        }
    }
}

#[test]
fn append_round_trip_on_cpu() {
    append_round_trip(Device::Cpu);
}

#[test]
fn overflow_and_exhaustion_are_errors() {
    let s = spec(2, 1, 8, 10, DType::F32);
    let (k, _) = tokens(2, 11, 1, 8, DType::F32, Device::Cpu, 1);
    let mut c = KvCache::contiguous(s, KvCacheLayout::Contiguous, Device::Cpu).unwrap();
    assert!(matches!(
        c.append(&k, &k),
        Err(AttentionError::CapacityExceeded(_))
    ));
    assert_eq!(c.lengths(), &[0, 0], "a refused append changes nothing");
    // A pool of 2 pages of 4 tokens cannot hold 2 sequences of 5 tokens.
    let mut p = KvCache::paged(s, 4, 2, Device::Cpu).unwrap();
    let (k5, _) = tokens(2, 5, 1, 8, DType::F32, Device::Cpu, 2);
    match p.append(&k5, &k5) {
        Err(AttentionError::CapacityExceeded(msg)) => assert!(msg.contains("pool"), "{msg}"),
        other => panic!("expected pool exhaustion, got {other:?}"),
    }
    let (bad, _) = tokens(2, 1, 2, 8, DType::F32, Device::Cpu, 3);
    assert!(matches!(
        c.append(&bad, &bad),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    let (bf, _) = tokens(2, 1, 1, 8, DType::BF16, Device::Cpu, 3);
    assert!(matches!(
        c.append(&bf, &bf),
        Err(AttentionError::DTypeMismatch { .. })
    ));
    assert!(KvCache::paged(s, 0, 1, Device::Cpu).is_err());
    assert!(KvCache::contiguous(
        spec(0, 1, 8, 1, DType::F32),
        KvCacheLayout::Contiguous,
        Device::Cpu
    )
    .is_err());
    assert!(KvCache::contiguous(s, KvCacheLayout::BlockSparse, Device::Cpu).is_err());
}

#[test]
fn ragged_append_and_views() {
    let s = spec(3, 2, 8, 20, DType::F32);
    for mut c in caches(Device::Cpu, s) {
        let (k, _) = tokens(3, 6, 2, 8, DType::F32, Device::Cpu, 5);
        c.append_ragged(&k, &k, &[6, 2, 0]).unwrap();
        assert_eq!(c.lengths(), &[6, 2, 0]);
        assert!(c.views().is_err(), "unequal lengths have no dense view");
        assert!(c.to_dense().is_err());
        assert!(c.append_ragged(&k, &k, &[7, 0, 0]).is_err());
        assert!(c.append_ragged(&k, &k, &[1, 1]).is_err());
    }
    let mut c = KvCache::contiguous(s, KvCacheLayout::Contiguous, Device::Cpu).unwrap();
    let (k, _) = tokens(3, 4, 2, 8, DType::F32, Device::Cpu, 6);
    c.append(&k, &k).unwrap();
    let (kv, _) = c.views().unwrap();
    assert_eq!(kv.shape(), &[3, 4, 2, 8]);
    assert_eq!(kv.to_host::<f32>().unwrap(), k.to_host::<f32>().unwrap());
    assert_eq!(c.batch(), 3);
    assert_eq!(c.num_kv_heads(), 2);
    assert_eq!(c.head_dim(), 8);
    assert_eq!(c.capacity(), 20);
    assert_eq!(c.dtype(), DType::F32);
    assert_eq!(c.device(), Device::Cpu);
    assert_eq!(c.page_size(), None);
    assert_eq!(
        KvCache::paged(s, 4, 20, Device::Cpu).unwrap().page_size(),
        Some(4)
    );
}

#[test]
fn cpu_decode_through_views_matches_reference() {
    let (b, h, hkv, d) = (2, 8, 2, 32);
    let cfg = AttentionConfig::new(h * d, h, 64)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    let mut c = KvCache::contiguous(
        spec(b, hkv, d, 64, DType::F32),
        KvCacheLayout::Contiguous,
        Device::Cpu,
    )
    .unwrap();
    let (k, _) = tokens(b, 37, hkv, d, DType::F32, Device::Cpu, 7);
    let (v, _) = tokens(b, 37, hkv, d, DType::F32, Device::Cpu, 8);
    c.append(&k, &v).unwrap();
    let (q, _) = tokens(b, 1, h, d, DType::F32, Device::Cpu, 9);
    let (kv, vv) = c.views().unwrap();
    let out = CpuAttentionBackend
        .forward(&cfg, &q, &kv, &vv, None)
        .unwrap();
    let want = attention_f64(&cfg, &q, &k, &v, None).unwrap();
    assert!(relative_l2_error(&out.to_host::<f32>().unwrap(), &want) < 1e-5);
}

// ---------------------------------------------------------------- GPU

#[test]
#[ignore = "needs a GPU"]
fn append_round_trip_on_gpu() {
    append_round_trip(gpu());
}

/// Decode against every cache layout with ragged lengths, GQA and MQA, each dtype.
#[test]
#[ignore = "needs a GPU"]
fn gpu_decode_matches_reference() {
    let (dev, backend) = gpu_backend();
    let cases = [
        // (b, sq, h, hkv, d, lengths, causal)
        (3, 1, 32, 8, 128, vec![1, 700, 3000], true),
        (2, 1, 8, 1, 64, vec![4097, 33], false),
        (1, 4, 16, 4, 128, vec![1500], true),
        (2, 16, 4, 4, 96, vec![300, 20], true),
        (1, 1, 4, 2, 256, vec![999], false),
        (4, 2, 6, 3, 80, vec![5, 64, 65, 129], true),
        // Query rows (group x Sq) beyond one block: several row groups per KV head.
        (1, 8, 16, 2, 64, vec![777], true),
        (2, 3, 12, 2, 32, vec![50, 2000], false),
        // head_dim below its bucket (112 in 128): the register path's idle lanes.
        (2, 1, 8, 2, 112, vec![333, 1200], true),
    ];
    let small = std::env::var_os("FORGE_ATTN_SANITIZE").is_some();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (i, (b, sq, h, hkv, d, lens, causal)) in cases.iter().cloned().enumerate() {
            if small && lens.iter().sum::<usize>() > 1500 {
                continue;
            }
            let cap = *lens.iter().max().unwrap() + 8;
            let cfg = AttentionConfig::new(h * d, h, cap)
                .with_num_kv_heads(hkv)
                .with_causal(causal);
            let s = spec(b, hkv, d, cap, dtype);
            for mut cache in caches(dev, s) {
                let maxl = *lens.iter().max().unwrap();
                let seed = 100 * i as u64;
                let (k, _) = tokens(b, maxl, hkv, d, dtype, dev, seed);
                let (v, _) = tokens(b, maxl, hkv, d, dtype, dev, seed + 1);
                cache.append_ragged(&k, &v, &lens).unwrap();
                let (q, _) = tokens(b, sq, h, d, dtype, dev, seed + 2);
                let mut out = DeviceTensor::from_f32(
                    &vec![f32::NAN; b * sq * h * d],
                    &[b, sq, h, d],
                    dtype,
                    dev,
                )
                .unwrap();
                let path = backend.forward_cached(&cfg, &q, &cache, &mut out).unwrap();
                assert_eq!(path, AttentionPath::Flash(FlashKernel::Decode));
                let got = out.to_f32_vec().unwrap();
                assert!(got.iter().all(|x| x.is_finite()), "unwritten output");
                // Reference per sequence over its own length.
                let dh = d * h;
                for (bb, &len) in lens.iter().enumerate() {
                    let kb = k.narrow(0, bb, 1).unwrap().narrow(1, 0, len).unwrap();
                    let vb = v.narrow(0, bb, 1).unwrap().narrow(1, 0, len).unwrap();
                    let qb = q.narrow(0, bb, 1).unwrap();
                    let want = attention_f64(&cfg, &qb, &kb, &vb, None).unwrap();
                    let g = &got[bb * sq * dh..(bb + 1) * sq * dh];
                    let err = relative_l2_error(g, &want);
                    let bound = match dtype {
                        DType::F32 => F32_BOUND,
                        _ => {
                            let naive =
                                attention_naive_in_dtype(&cfg, &qb, &kb, &vb, None).unwrap();
                            gpu_half_bound(relative_l2_error(&naive, &want))
                        }
                    };
                    assert!(
                        err <= bound,
                        "{dtype} case {i} {:?} seq {bb} len {len}: err {err:.3e} > {bound:.1e}",
                        cache.layout()
                    );
                }
            }
        }
    }
}

/// The plain forward path picks the decode kernel for short query blocks.
#[test]
#[ignore = "needs a GPU"]
fn forward_into_uses_decode_for_short_queries() {
    let (dev, backend) = gpu_backend();
    let (b, h, hkv, d, l) = (2, 8, 2, 128, 5000);
    let cfg = AttentionConfig::new(h * d, h, l)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    let (q, _) = tokens(b, 3, h, d, DType::BF16, dev, 1);
    let (k, _) = tokens(b, l, hkv, d, DType::BF16, dev, 2);
    let (v, _) = tokens(b, l, hkv, d, DType::BF16, dev, 3);
    let (path, err) = forward_against_reference(&backend, &cfg, &q, &k, &v, None);
    assert_eq!(path, AttentionPath::Flash(FlashKernel::Decode));
    assert!(err < 1e-2, "{err}");
}

/// A fused step (`forward_cached_append`: one launch where the register path runs) gives
/// what `append` then `forward_cached` gives, step after step, for every layout (pages
/// filled and started mid-step), ragged lengths, GQA and MQA, several new tokens per step,
/// and a head_dim that takes the two-launch route; the caches end up identical.
#[test]
#[ignore = "needs a GPU"]
fn fused_append_step_matches_append_then_attention() {
    let (dev, backend) = gpu_backend();
    let cases = [
        // (b, new tokens per step, h, hkv, d, prompt lengths)
        (3, 1, 8, 2, 128, vec![1, 30, 300]),
        (2, 3, 4, 4, 64, vec![7, 100]),
        (1, 1, 4, 1, 256, vec![500]),
        // head_dim 80 runs the shared-memory body: append and attention, two launches.
        (2, 2, 4, 2, 80, vec![9, 40]),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (i, (b, n, h, hkv, d, lens)) in cases.iter().cloned().enumerate() {
            let steps = 5;
            let maxl = *lens.iter().max().unwrap();
            let cap = maxl + steps * n + 8;
            let cfg = AttentionConfig::new(h * d, h, cap)
                .with_num_kv_heads(hkv)
                .with_causal(true);
            let s = spec(b, hkv, d, cap, dtype);
            for (mut fused, mut split) in caches(dev, s).into_iter().zip(caches(dev, s)) {
                let seed = 1000 * i as u64;
                let (k, _) = tokens(b, maxl, hkv, d, dtype, dev, seed);
                let (v, _) = tokens(b, maxl, hkv, d, dtype, dev, seed + 1);
                fused.append_ragged(&k, &v, &lens).unwrap();
                split.append_ragged(&k, &v, &lens).unwrap();
                for step in 0..steps as u64 {
                    let (kn, _) = tokens(b, n, hkv, d, dtype, dev, seed + 10 + step);
                    let (vn, _) = tokens(b, n, hkv, d, dtype, dev, seed + 20 + step);
                    let (q, _) = tokens(b, n, h, d, dtype, dev, seed + 30 + step);
                    let mut out_f = DeviceTensor::zeros(&[b, n, h, d], dtype, dev).unwrap();
                    let mut out_s = DeviceTensor::zeros(&[b, n, h, d], dtype, dev).unwrap();
                    let path = backend
                        .forward_cached_append(&cfg, &q, &kn, &vn, &mut fused, &mut out_f)
                        .unwrap();
                    assert_eq!(path, AttentionPath::Flash(FlashKernel::Decode));
                    split.append(&kn, &vn).unwrap();
                    backend
                        .forward_cached(&cfg, &q, &split, &mut out_s)
                        .unwrap();
                    assert_eq!(fused.lengths(), split.lengths());
                    assert_eq!(fused.pages_used(), split.pages_used());
                    let diff = max_abs_diff(&out_f, &out_s);
                    assert!(
                        diff <= 1e-6,
                        "{dtype} case {i} {:?} step {step}: fused and split steps differ by {diff:e}",
                        fused.layout()
                    );
                }
                // Same cache contents and device-side lengths: a plain call agrees.
                let (q, _) = tokens(b, 1, h, d, dtype, dev, seed + 99);
                let mut out_f = DeviceTensor::zeros(&[b, 1, h, d], dtype, dev).unwrap();
                let mut out_s = DeviceTensor::zeros(&[b, 1, h, d], dtype, dev).unwrap();
                backend
                    .forward_cached(&cfg, &q, &fused, &mut out_f)
                    .unwrap();
                backend
                    .forward_cached(&cfg, &q, &split, &mut out_s)
                    .unwrap();
                let diff = max_abs_diff(&out_f, &out_s);
                assert!(
                    diff <= 1e-6,
                    "{dtype} case {i} {:?}: caches differ after the steps ({diff:e})",
                    fused.layout()
                );
            }
        }
    }
}

/// A fused step that cannot run changes nothing: a full cache, a bad query, bad new rows.
#[test]
#[ignore = "needs a GPU"]
fn fused_append_step_errors_leave_the_cache_alone() {
    let (dev, backend) = gpu_backend();
    let (b, h, hkv, d) = (2, 4, 2, 64);
    let cfg = AttentionConfig::new(h * d, h, 8)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    for mut cache in caches(dev, spec(b, hkv, d, 8, DType::F32)) {
        let (k, _) = tokens(b, 8, hkv, d, DType::F32, dev, 1);
        let (v, _) = tokens(b, 8, hkv, d, DType::F32, dev, 2);
        cache.append_ragged(&k, &v, &[8, 5]).unwrap();
        let (kn, _) = tokens(b, 1, hkv, d, DType::F32, dev, 3);
        let (vn, _) = tokens(b, 1, hkv, d, DType::F32, dev, 4);
        let (q, _) = tokens(b, 1, h, d, DType::F32, dev, 5);
        let mut out = DeviceTensor::zeros(&[b, 1, h, d], DType::F32, dev).unwrap();
        let full = backend.forward_cached_append(&cfg, &q, &kn, &vn, &mut cache, &mut out);
        assert!(
            matches!(full, Err(AttentionError::CapacityExceeded(_))),
            "{full:?}"
        );
        let (bad_q, _) = tokens(b, 1, h + 1, d, DType::F32, dev, 6);
        let mut cache2 = cache.try_clone().unwrap();
        assert!(backend
            .forward_cached_append(&cfg, &bad_q, &kn, &vn, &mut cache2, &mut out)
            .is_err());
        let (bad_k, _) = tokens(b, 1, hkv + 1, d, DType::F32, dev, 7);
        assert!(matches!(
            backend.forward_cached_append(&cfg, &q, &bad_k, &vn, &mut cache2, &mut out),
            Err(AttentionError::ShapeMismatch { .. })
        ));
        assert_eq!(cache.lengths(), &[8, 5]);
        assert_eq!(cache2.lengths(), &[8, 5]);
    }
}
