//! The GPU backend on inputs that used to fault, be refused or give wrong results: views at
//! odd element offsets on every path and dtype, batches and head counts past the grid's
//! y / z limit, refused cached appends, exhausted page pools, and garbage (NaN) in keys
//! that must never be read. Each call is followed by a synchronize, so a fault shows here
//! and not in a later test. Run on a GPU machine with `--include-ignored`.

use forge_attn::reference::{attention_f64, random_values, relative_l2_error};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionPath, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, FlashKernel, GpuAttentionBackend, KvCache, KvCacheLayout,
    KvCacheSpec,
};

mod common;
use common::{cpu_copy, dtype_bound, forward_against_reference, gpu, gpu_backend, random_tensor};

/// `shape` with its last dim widened by one and the first element skipped: a view of
/// `shape` whose rows start at odd element offsets (head_dim contiguous, strides odd).
fn odd_view(shape: &[usize], seed: u64, dtype: DType, dev: Device) -> DeviceTensor {
    let mut wide = shape.to_vec();
    *wide.last_mut().unwrap() += 1;
    let n: usize = wide.iter().product();
    let t = DeviceTensor::from_f32(&random_values(n, seed), &wide, dtype, dev).unwrap();
    t.narrow(wide.len() - 1, 1, shape[shape.len() - 1]).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Route {
    Auto,
    Masked,
    Traditional,
}

/// Runs one call on the GPU over odd-offset views and checks it against the f64 reference.
#[allow(clippy::too_many_arguments)]
fn misaligned_case(
    backend: &GpuAttentionBackend,
    dtype: DType,
    sq: usize,
    sk: usize,
    causal: bool,
    route: Route,
    seed: u64,
) -> AttentionPath {
    let dev = backend.device();
    let (b, h, hkv, d) = (2, 4, 2, 64);
    let cfg = AttentionConfig::new(h * d, h, sq.max(sk))
        .with_num_kv_heads(hkv)
        .with_causal(causal);
    let q = odd_view(&[b, sq, h, d], seed, dtype, dev);
    let k = odd_view(&[b, sk, hkv, d], seed + 1, dtype, dev);
    let v = odd_view(&[b, sk, hkv, d], seed + 2, dtype, dev);
    let mask = matches!(route, Route::Masked).then(|| {
        let m: Vec<f32> = (0..sq * sk)
            .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        DeviceTensor::from_host(&m, &[sq, sk], dev).unwrap()
    });
    // The output is an odd-offset view too.
    let mut out_storage = odd_view(&[b, sq, h, d], seed + 9, dtype, dev);
    let path = match route {
        Route::Traditional => {
            backend.forward_traditional(&cfg, &q, &k, &v, mask.as_ref(), &mut out_storage)
        }
        _ => backend.forward_into(&cfg, &q, &k, &v, mask.as_ref(), &mut out_storage),
    }
    .unwrap_or_else(|e| panic!("{dtype} sq={sq} {route:?}: {e}"));
    dev.synchronize()
        .unwrap_or_else(|e| panic!("{dtype} sq={sq} {route:?} faulted: {e}"));
    let got = out_storage.to_f32_vec().unwrap();
    let want = attention_f64(&cfg, &q, &k, &v, mask.as_ref()).unwrap();
    let err = relative_l2_error(&got, &want);
    assert!(
        err <= dtype_bound(dtype),
        "{dtype} sq={sq} sk={sk} causal={causal} {route:?} ({path}): error {err:.2e}"
    );
    path
}

#[test]
#[ignore = "needs a GPU"]
fn odd_offset_views_run_on_every_path_and_dtype() {
    let backend = GpuAttentionBackend::new(gpu()).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (sq, sk, causal) in [(1, 300, false), (16, 300, true), (4, 77, false)] {
            // Short unmasked query blocks over unaligned K/V leave the decode kernel
            // (16-byte vector loads) for the prefill kernels.
            let path = misaligned_case(&backend, dtype, sq, sk, causal, Route::Auto, 11);
            assert_ne!(path, AttentionPath::Flash(FlashKernel::Decode), "{dtype}");
            misaligned_case(&backend, dtype, sq, sk, causal, Route::Masked, 12);
            misaligned_case(&backend, dtype, sq, sk, causal, Route::Traditional, 13);
        }
        for (sq, sk, causal) in [(128, 200, false), (100, 300, true)] {
            misaligned_case(&backend, dtype, sq, sk, causal, Route::Auto, 14);
            misaligned_case(&backend, dtype, sq, sk, causal, Route::Masked, 15);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn cached_attention_takes_odd_offset_queries_outputs_and_new_rows() {
    let (dev, backend) = gpu_backend();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for layout in [KvCacheLayout::Contiguous, KvCacheLayout::BlockSparse] {
            let (b, h, hkv, d, cap) = (2, 8, 2, 128, 96);
            let spec = KvCacheSpec {
                batch: b,
                num_kv_heads: hkv,
                head_dim: d,
                capacity: cap,
                dtype,
            };
            let mut cache = match layout {
                KvCacheLayout::BlockSparse => KvCache::paged(spec, 16, b * cap / 16, dev).unwrap(),
                _ => KvCache::contiguous(spec, layout, dev).unwrap(),
            };
            let kp = odd_view(&[b, 40, hkv, d], 21, dtype, dev);
            let vp = odd_view(&[b, 40, hkv, d], 22, dtype, dev);
            cache.append(&kp, &vp).unwrap();
            let cfg = AttentionConfig::new(h * d, h, cap).with_num_kv_heads(hkv);
            let q = odd_view(&[b, 1, h, d], 23, dtype, dev);
            let kn = odd_view(&[b, 1, hkv, d], 24, dtype, dev);
            let vn = odd_view(&[b, 1, hkv, d], 25, dtype, dev);
            let mut out = odd_view(&[b, 1, h, d], 26, dtype, dev);
            backend
                .forward_cached_append(&cfg, &q, &kn, &vn, &mut cache, &mut out)
                .unwrap_or_else(|e| panic!("{dtype} {layout:?}: {e}"));
            dev.synchronize()
                .unwrap_or_else(|e| panic!("{dtype} {layout:?} faulted: {e}"));
            assert_eq!(cache.lengths(), &[41, 41]);
            let (kd, vd) = cache.to_dense().unwrap();
            let cfg_dense = cfg.clone();
            let want = attention_f64(&cfg_dense, &cpu_copy(&q), &kd, &vd, None).unwrap();
            let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
            assert!(
                err <= dtype_bound(dtype),
                "{dtype} {layout:?}: error {err:.2e}"
            );
            let mut out2 = odd_view(&[b, 1, h, d], 27, dtype, dev);
            backend.forward_cached(&cfg, &q, &cache, &mut out2).unwrap();
            dev.synchronize().unwrap();
            let err = relative_l2_error(&out2.to_f32_vec().unwrap(), &want);
            assert!(
                err <= dtype_bound(dtype),
                "{dtype} {layout:?} cached: error {err:.2e}"
            );
        }
    }
}

/// One call with many sequences or heads on the GPU, checked against the CPU backend.
fn large_grid_case(b: usize, sq: usize, sk: usize, h: usize, hkv: usize, d: usize, dtype: DType) {
    let (dev, backend) = gpu_backend();
    let cfg = AttentionConfig::new(h * d, h, sq.max(sk))
        .with_num_kv_heads(hkv)
        .with_causal(true);
    let up = |shape: &[usize], seed| random_tensor(shape, dtype, dev, seed);
    let q = up(&[b, sq, h, d], 31);
    let k = up(&[b, sk, hkv, d], 32);
    let v = up(&[b, sk, hkv, d], 33);
    let mut out = DeviceTensor::zeros(&[b, sq, h, d], dtype, dev).unwrap();
    let path = backend
        .forward_into(&cfg, &q, &k, &v, None, &mut out)
        .unwrap_or_else(|e| panic!("B={b} H={h} Sq={sq}: {e}"));
    dev.synchronize()
        .unwrap_or_else(|e| panic!("B={b} H={h} Sq={sq} faulted: {e}"));
    #[allow(clippy::default_constructed_unit_structs)]
    let cpu = CpuAttentionBackend::default();
    let (qc, kc, vc) = (cpu_copy(&q), cpu_copy(&k), cpu_copy(&v));
    let want = cpu.forward(&cfg, &qc, &kc, &vc, None).unwrap();
    let want: Vec<f64> = want
        .to_f32_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    assert!(
        err <= dtype_bound(dtype).max(1e-4),
        "B={b} H={h} Hkv={hkv} Sq={sq} ({path}): error {err:.2e}"
    );
}

#[test]
#[ignore = "needs a GPU"]
fn serving_batches_run_on_the_flash_and_decode_kernels() {
    // 2048 sequences x 32 heads: prefill and decode.
    large_grid_case(2048, 8, 8, 32, 8, 64, DType::BF16);
    large_grid_case(2048, 1, 64, 32, 8, 128, DType::BF16);
    // 4096 x 64 heads decode.
    large_grid_case(4096, 1, 32, 64, 8, 128, DType::F16);
}

#[test]
#[ignore = "needs a GPU"]
fn batches_and_heads_past_the_grid_limit_run_in_slices() {
    // More sequences than grid z holds.
    large_grid_case(70_000, 2, 2, 1, 1, 8, DType::F32);
    large_grid_case(70_000, 1, 3, 2, 1, 16, DType::BF16);
    // More query heads than grid y holds, one KV head (a group past the limit).
    large_grid_case(1, 2, 2, 70_000, 1, 8, DType::F32);
    large_grid_case(1, 1, 5, 70_000, 1, 8, DType::F16);
    // More KV heads than grid y holds (decode puts KV heads on y).
    large_grid_case(1, 1, 4, 70_000, 70_000, 8, DType::BF16);
}

#[test]
#[ignore = "needs a GPU"]
fn a_refused_cached_append_leaves_the_cache_as_it_was() {
    let (dev, backend) = gpu_backend();
    // head_dim 264: the decode kernel's largest bucket is 256.
    let (b, h, d) = (2, 2, 264);
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: h,
        head_dim: d,
        capacity: 8,
        dtype: DType::F16,
    };
    let mut cache = KvCache::contiguous(spec, KvCacheLayout::Contiguous, dev).unwrap();
    let t = |seed| {
        DeviceTensor::from_f32(
            &random_values(b * 2 * h * d, seed),
            &[b, 2, h, d],
            DType::F16,
            dev,
        )
        .unwrap()
    };
    cache.append(&t(1), &t(2)).unwrap();
    let before = cache.to_dense().unwrap();
    let before = (
        before.0.to_f32_vec().unwrap(),
        before.1.to_f32_vec().unwrap(),
    );
    let cfg = AttentionConfig::new(h * d, h, 8);
    let q = DeviceTensor::zeros(&[b, 1, h, d], DType::F16, dev).unwrap();
    let mut out = DeviceTensor::zeros(&[b, 1, h, d], DType::F16, dev).unwrap();
    let kn = DeviceTensor::zeros(&[b, 1, h, d], DType::F16, dev).unwrap();
    let err = backend
        .forward_cached_append(&cfg, &q, &kn, &kn, &mut cache, &mut out)
        .unwrap_err();
    assert!(matches!(err, AttentionError::NotSupported { .. }), "{err}");
    assert!(err.to_string().contains("264"), "{err}");
    assert_eq!(cache.lengths(), &[2, 2]);
    let after = cache.to_dense().unwrap();
    assert_eq!(after.0.to_f32_vec().unwrap(), before.0);
    assert_eq!(after.1.to_f32_vec().unwrap(), before.1);
    dev.synchronize().unwrap();
}

#[test]
#[ignore = "needs a GPU"]
fn an_exhausted_page_pool_is_refused_before_anything_is_queued() {
    let (dev, backend) = gpu_backend();
    let (b, h, d) = (2, 2, 64);
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: h,
        head_dim: d,
        capacity: 64,
        dtype: DType::BF16,
    };
    // Three pages of 16 for two sequences: the second page of the second sequence is
    // one too many.
    let mut cache = KvCache::paged(spec, 16, 3, dev).unwrap();
    let t = |n, seed| {
        DeviceTensor::from_f32(
            &random_values(b * n * h * d, seed),
            &[b, n, h, d],
            DType::BF16,
            dev,
        )
        .unwrap()
    };
    cache.append(&t(16, 1), &t(16, 2)).unwrap();
    let cfg = AttentionConfig::new(h * d, h, 64);
    let q = t(1, 3).narrow(2, 0, h).unwrap();
    let mut out = DeviceTensor::zeros(&[b, 1, h, d], DType::BF16, dev).unwrap();
    let err = backend
        .forward_cached_append(&cfg, &q, &t(1, 4), &t(1, 5), &mut cache, &mut out)
        .unwrap_err();
    assert!(matches!(err, AttentionError::CapacityExceeded(_)), "{err}");
    assert_eq!(cache.lengths(), &[16, 16]);
    assert_eq!(cache.pages_used(), 2);
    dev.synchronize().unwrap();
    // The cache still works.
    backend.forward_cached(&cfg, &q, &cache, &mut out).unwrap();
    dev.synchronize().unwrap();
}

#[test]
#[ignore = "needs a GPU"]
fn garbage_in_keys_that_are_never_read_does_not_reach_the_output() {
    let (dev, backend) = gpu_backend();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (b, h, d) = (2, 4, 128);
        // Decode over a view of the first 1000 keys of storage whose keys past them are NaN.
        let (len, stored) = (1000, 1536);
        let poisoned = |seed| {
            let mut host = random_values(b * stored * h * d, seed);
            for (i, x) in host.iter_mut().enumerate() {
                if (i / (h * d)) % stored >= len {
                    *x = f32::NAN;
                }
            }
            DeviceTensor::from_f32(&host, &[b, stored, h, d], dtype, dev).unwrap()
        };
        let (ks, vs) = (poisoned(41), poisoned(42));
        let (k, v) = (ks.narrow(1, 0, len).unwrap(), vs.narrow(1, 0, len).unwrap());
        let cfg = AttentionConfig::new(h * d, h, len);
        let q = DeviceTensor::from_f32(&random_values(b * h * d, 43), &[b, 1, h, d], dtype, dev)
            .unwrap();
        let (path, err) = forward_against_reference(&backend, &cfg, &q, &k, &v, None);
        assert_eq!(path, AttentionPath::Flash(FlashKernel::Decode));
        assert!(err <= dtype_bound(dtype), "{dtype} decode: error {err:.2e}");

        // Causal prefill: keys in tiles wholly past the causal limit of the first query
        // rows' blocks are NaN in K and V; those rows must stay exact.
        let s = 1024;
        let cfg = AttentionConfig::new(h * d, h, s).with_causal(true);
        let nan_from = 768;
        let tail_nan = |seed| {
            let mut host = random_values(b * s * h * d, seed);
            for (i, x) in host.iter_mut().enumerate() {
                if (i / (h * d)) % s >= nan_from {
                    *x = f32::NAN;
                }
            }
            DeviceTensor::from_f32(&host, &[b, s, h, d], dtype, dev).unwrap()
        };
        let q =
            DeviceTensor::from_f32(&random_values(b * s * h * d, 44), &[b, s, h, d], dtype, dev)
                .unwrap();
        let (k, v) = (tail_nan(45), tail_nan(46));
        let mut out = DeviceTensor::zeros(&[b, s, h, d], dtype, dev).unwrap();
        backend
            .forward_into(&cfg, &q, &k, &v, None, &mut out)
            .unwrap();
        let rows = 256;
        let first = |t: &DeviceTensor| t.narrow(1, 0, rows).unwrap();
        let got = first(&out).to_f32_vec().unwrap();
        // Rows < 256 see keys <= 255 only: the reference over the clean first keys.
        let cfg_rows = AttentionConfig::new(h * d, h, rows).with_causal(true);
        let want = attention_f64(&cfg_rows, &first(&q), &first(&k), &first(&v), None).unwrap();
        let err = relative_l2_error(&got, &want);
        assert!(
            err <= dtype_bound(dtype),
            "{dtype} causal prefill: error {err:.2e}"
        );

        // -inf mask over keys whose K is NaN: removed like the causal cut removes them.
        let sk = 300;
        let mut kh = random_values(b * sk * h * d, 47);
        for (i, x) in kh.iter_mut().enumerate() {
            if (i / (h * d)) % sk >= 200 {
                *x = f32::NAN;
            }
        }
        let k = DeviceTensor::from_f32(&kh, &[b, sk, h, d], dtype, dev).unwrap();
        let v = DeviceTensor::from_f32(
            &random_values(b * sk * h * d, 48),
            &[b, sk, h, d],
            dtype,
            dev,
        )
        .unwrap();
        let sq = 64;
        let m: Vec<f32> = (0..sq * sk)
            .map(|i| {
                if i % sk >= 200 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = DeviceTensor::from_host(&m, &[sq, sk], dev).unwrap();
        let q = DeviceTensor::from_f32(
            &random_values(b * sq * h * d, 49),
            &[b, sq, h, d],
            dtype,
            dev,
        )
        .unwrap();
        let cfg = AttentionConfig::new(h * d, h, sk);
        let clean = |t: &DeviceTensor| t.narrow(1, 0, 200).unwrap();
        let want = attention_f64(&cfg, &q, &clean(&k), &clean(&v), None).unwrap();
        for traditional in [false, true] {
            let mut out = DeviceTensor::zeros(&[b, sq, h, d], dtype, dev).unwrap();
            if traditional {
                backend.forward_traditional(&cfg, &q, &k, &v, Some(&mask), &mut out)
            } else {
                backend.forward_into(&cfg, &q, &k, &v, Some(&mask), &mut out)
            }
            .unwrap();
            let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
            assert!(
                err <= dtype_bound(dtype),
                "{dtype} masked NaN keys (traditional={traditional}): error {err:.2e}"
            );
        }
        dev.synchronize().unwrap();
    }
}

#[test]
#[ignore = "needs a GPU"]
fn huge_negative_finite_masks_give_the_plain_average() {
    // -f32::MAX on every key: in f32 every score becomes -f32::MAX (torch's result), so
    // each row is the plain average of the V rows; no path may turn it into zeros or NaN.
    let (dev, backend) = gpu_backend();
    let (b, h, d, sq, sk) = (1, 2, 64, 32, 48);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let up = |shape: &[usize], seed| random_tensor(shape, dtype, dev, seed);
        let (q, k, v) = (
            up(&[b, sq, h, d], 51),
            up(&[b, sk, h, d], 52),
            up(&[b, sk, h, d], 53),
        );
        let mask = DeviceTensor::from_host(&vec![-f32::MAX; sq * sk], &[sq, sk], dev).unwrap();
        let cfg = AttentionConfig::new(h * d, h, sk);
        let vh = v.to_f32_vec().unwrap();
        let mut want = vec![0.0f64; b * sq * h * d];
        for i in 0..sq {
            for hh in 0..h {
                for x in 0..d {
                    let mean: f64 = (0..sk)
                        .map(|j| vh[(j * h + hh) * d + x] as f64)
                        .sum::<f64>()
                        / sk as f64;
                    want[(i * h + hh) * d + x] = mean;
                }
            }
        }
        for traditional in [false, true] {
            let mut out = DeviceTensor::zeros(&[b, sq, h, d], dtype, dev).unwrap();
            if traditional {
                backend.forward_traditional(&cfg, &q, &k, &v, Some(&mask), &mut out)
            } else {
                backend.forward_into(&cfg, &q, &k, &v, Some(&mask), &mut out)
            }
            .unwrap();
            let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
            assert!(
                err <= dtype_bound(dtype),
                "{dtype} traditional={traditional}: error {err:.2e}"
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn the_gpu_backend_supports_what_it_runs() {
    let backend = GpuAttentionBackend::new(gpu()).unwrap();
    let cfg = AttentionConfig::new(32 * 128, 32, 4096)
        .with_num_kv_heads(8)
        .with_batch_size(2048);
    assert!(backend.supports(&cfg).is_yes());
    let too_long = cfg.clone().with_max_sequence_length(i32::MAX as usize);
    assert!(!backend.supports(&too_long).is_yes());
}
