//! Integer dtypes: storage, views and copies on every device; refused by every attention
//! entry point.

use forge_attn::reference::{attention_f64, attention_naive_in_dtype};
use forge_attn::{
    AttentionConfig, AttentionError, CpuAttentionBackend, DType, Device, DeviceAttentionBackend,
    DeviceTensor, GpuAttentionBackend, HostElement, KvCache, KvCacheLayout, KvCacheSpec,
};

/// Distinct values of `T` that round-trip exactly, with the extremes of the type.
fn values<T: HostElement>(n: usize, extremes: [T; 2]) -> Vec<T> {
    let mut v: Vec<T> = (0..n).map(|i| T::from_f32(i as f32 * 3.0 + 1.0)).collect();
    v[0] = extremes[0];
    v[n - 1] = extremes[1];
    v
}

/// from_host / to_host / zeros / narrow / permute / copy_from of one integer type on `dev`.
fn storage_round_trip<T: HostElement + PartialEq + std::fmt::Debug>(dev: Device, extremes: [T; 2]) {
    let data = values::<T>(24, extremes);
    let t = DeviceTensor::from_host(&data, &[2, 3, 4], dev).unwrap();
    assert_eq!(t.dtype(), T::DTYPE);
    assert_eq!(t.size_in_bytes(), 24 * T::DTYPE.size_in_bytes());
    assert_eq!(t.to_host::<T>().unwrap(), data);

    let z = DeviceTensor::zeros(&[5], T::DTYPE, dev).unwrap();
    assert_eq!(z.to_host::<T>().unwrap(), vec![T::from_f32(0.0); 5]);

    // A view narrowed in the middle dimension, read back.
    let n = t.narrow(1, 1, 2).unwrap();
    let want_n: Vec<T> = (0..2)
        .flat_map(|a| (1..3).flat_map(move |b| (0..4).map(move |c| (a, b, c))))
        .map(|(a, b, c)| data[a * 12 + b * 4 + c])
        .collect();
    assert_eq!(n.to_host::<T>().unwrap(), want_n);

    // Outer dimensions permuted (last one contiguous) and all dimensions permuted.
    for perm in [[1, 0, 2], [2, 1, 0]] {
        let p = t.permute(&perm).unwrap();
        let sh = p.shape().to_vec();
        let mut want = Vec::new();
        for i in 0..sh[0] {
            for j in 0..sh[1] {
                for k in 0..sh[2] {
                    let mut idx = [0; 3];
                    idx[perm[0]] = i;
                    idx[perm[1]] = j;
                    idx[perm[2]] = k;
                    want.push(data[idx[0] * 12 + idx[1] * 4 + idx[2]]);
                }
            }
        }
        let got = p.to_host::<T>();
        if dev == Device::Cpu || perm == [1, 0, 2] || T::DTYPE.size_in_bytes() == 4 {
            assert_eq!(got.unwrap(), want, "{perm:?}");
            // copy_from a permuted view into a contiguous tensor, and back into a view.
            let mut dst = DeviceTensor::zeros(&sh, T::DTYPE, dev).unwrap();
            dst.copy_from(&p).unwrap();
            assert_eq!(dst.to_host::<T>().unwrap(), want);
        } else {
            // 8-byte elements with a strided last dimension have no device copy.
            assert!(
                matches!(&got, Err(AttentionError::NotSupported { reason, .. }) if reason.contains("8-byte i64")),
                "{got:?}"
            );
        }
    }
    let whole = DeviceTensor::zeros(&[2, 3, 4], T::DTYPE, dev).unwrap();
    let mut view = whole.narrow(1, 1, 2).unwrap();
    view.copy_from(&n).unwrap();
    let back = whole.to_host::<T>().unwrap();
    for (i, (&g, &w)) in back.iter().zip(&data).enumerate() {
        let inside = (i / 4) % 3 != 0;
        assert_eq!(g, if inside { w } else { T::from_f32(0.0) }, "element {i}");
    }

    // Wrong element type and dtype mismatches are typed errors.
    assert!(matches!(
        t.to_host::<f32>(),
        Err(AttentionError::DTypeMismatch { .. })
    ));
    let mut f = DeviceTensor::zeros(&[2, 3, 4], DType::F32, dev).unwrap();
    assert!(matches!(
        f.copy_from(&t),
        Err(AttentionError::DTypeMismatch { .. })
    ));
}

#[test]
fn integer_storage_on_the_cpu() {
    storage_round_trip::<i32>(Device::Cpu, [i32::MIN, i32::MAX]);
    storage_round_trip::<u32>(Device::Cpu, [u32::MAX, 0]);
    storage_round_trip::<i64>(Device::Cpu, [i64::MIN, i64::MAX]);
}

#[test]
#[ignore = "needs a GPU"]
fn integer_storage_on_the_gpu() {
    let dev = Device::best_available();
    assert_ne!(dev, Device::Cpu, "no GPU");
    storage_round_trip::<i32>(dev, [i32::MIN, i32::MAX]);
    storage_round_trip::<u32>(dev, [u32::MAX, 0]);
    storage_round_trip::<i64>(dev, [i64::MIN, i64::MAX]);
}

#[test]
fn f32_conversions_of_integer_tensors() {
    let vals = [-2.7, 0.0, 3.9, 1e20, f32::NAN, -1e20];
    let cases: [(DType, [f32; 6]); 3] = [
        (
            DType::I32,
            [-2.0, 0.0, 3.0, i32::MAX as f32, 0.0, i32::MIN as f32],
        ),
        (DType::U32, [0.0, 0.0, 3.0, u32::MAX as f32, 0.0, 0.0]),
        (
            DType::I64,
            [-2.0, 0.0, 3.0, i64::MAX as f32, 0.0, i64::MIN as f32],
        ),
    ];
    for (dtype, want) in cases {
        let t = DeviceTensor::from_f32(&vals, &[6], dtype, Device::Cpu).unwrap();
        assert_eq!(t.dtype(), dtype);
        assert_eq!(t.to_f32_vec().unwrap(), want, "{dtype}");
    }
    let t = DeviceTensor::from_host(&[1i64 << 40, -7], &[2], Device::Cpu).unwrap();
    assert_eq!(t.to_host::<i64>().unwrap(), vec![1i64 << 40, -7]);
    assert_eq!(t.to_f32_vec().unwrap(), vec![2f32.powi(40), -7.0]);
}

/// Float operands of a small valid call: q, k, v, an f32 mask and the output.
fn operands(dev: Device) -> (AttentionConfig, [DeviceTensor; 5]) {
    let (b, s, h, d) = (1, 4, 2, 8);
    let config = AttentionConfig::new(h * d, h, s);
    let t = |shape: &[usize]| {
        let n = shape.iter().product();
        DeviceTensor::from_f32(&vec![0.25; n], shape, DType::F32, dev).unwrap()
    };
    let shape = [b, s, h, d];
    let ops = [t(&shape), t(&shape), t(&shape), t(&[s, s]), t(&shape)];
    (config, ops)
}

/// The same tensor in an integer dtype.
fn as_integer(t: &DeviceTensor, dtype: DType) -> DeviceTensor {
    DeviceTensor::from_f32(&t.to_f32_vec().unwrap(), t.shape(), dtype, t.device()).unwrap()
}

fn assert_refused(r: forge_attn::Result<impl std::fmt::Debug>, what: &str, dtype: DType) {
    let expected = if what == "mask" {
        "f32 (additive)"
    } else {
        "f32, f16 or bf16"
    };
    match r {
        Err(AttentionError::DTypeMismatch {
            what: w,
            expected: e,
            got,
        }) => {
            assert_eq!(w, what);
            assert_eq!(e, expected);
            assert_eq!(got, dtype.to_string());
        }
        other => panic!("{what} as {dtype}: expected DTypeMismatch, got {other:?}"),
    }
}

/// Every input position of `backend.forward_into` / `forward` as every integer dtype.
fn refuses_integer_operands(backend: &dyn DeviceAttentionBackend) {
    let (config, ops) = operands(backend.device());
    for dtype in [DType::I32, DType::U32, DType::I64] {
        for (pos, what) in ["q", "k", "v", "mask", "out"].iter().enumerate() {
            let mut o = ops.clone();
            o[pos] = as_integer(&ops[pos], dtype);
            let [q, k, v, m, mut out] = o;
            let before = out.to_f32_vec().unwrap();
            assert_refused(
                backend.forward_into(&config, &q, &k, &v, Some(&m), &mut out),
                what,
                dtype,
            );
            assert_eq!(out.to_f32_vec().unwrap(), before, "output written");
            if *what != "out" {
                assert_refused(backend.forward(&config, &q, &k, &v, Some(&m)), what, dtype);
                assert_refused(attention_f64(&config, &q, &k, &v, Some(&m)), what, dtype);
                assert_refused(
                    attention_naive_in_dtype(&config, &q, &k, &v, Some(&m)),
                    what,
                    dtype,
                );
            }
        }
    }
}

#[test]
fn cpu_backend_refuses_integer_operands() {
    refuses_integer_operands(&CpuAttentionBackend::new());
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_backend_refuses_integer_operands() {
    let dev = Device::best_available();
    assert_ne!(dev, Device::Cpu, "no GPU");
    let gpu = GpuAttentionBackend::new(dev).unwrap();
    refuses_integer_operands(&gpu);
    let (config, ops) = operands(dev);
    let [q, k, v, m, mut out] = ops;
    for dtype in [DType::I32, DType::U32, DType::I64] {
        let mut bad_out = as_integer(&out, dtype);
        assert_refused(
            gpu.forward_traditional(&config, &as_integer(&q, dtype), &k, &v, Some(&m), &mut out),
            "q",
            dtype,
        );
        assert_refused(
            gpu.forward_traditional(&config, &q, &k, &v, Some(&m), &mut bad_out),
            "out",
            dtype,
        );
        // Cached calls: integer q, out and new tokens, refused before anything is appended.
        let spec = KvCacheSpec {
            batch: 1,
            num_kv_heads: 2,
            head_dim: 8,
            capacity: 16,
            dtype: DType::F32,
        };
        let mut cache = KvCache::contiguous(spec, KvCacheLayout::FlashAttention, dev).unwrap();
        cache.append(&k, &v).unwrap();
        let q1 = q.narrow(1, 0, 1).unwrap();
        let (k1, v1) = (k.narrow(1, 0, 1).unwrap(), v.narrow(1, 0, 1).unwrap());
        let mut out1 = DeviceTensor::zeros(q1.shape(), DType::F32, dev).unwrap();
        assert_refused(
            gpu.forward_cached(&config, &as_integer(&q1, dtype), &cache, &mut out1),
            "q",
            dtype,
        );
        let mut bad_out1 = as_integer(&out1, dtype);
        assert_refused(
            gpu.forward_cached(&config, &q1, &cache, &mut bad_out1),
            "out",
            dtype,
        );
        assert_refused(
            gpu.forward_cached_append(
                &config,
                &q1,
                &as_integer(&k1, dtype),
                &v1,
                &mut cache,
                &mut out1,
            ),
            "k_new",
            dtype,
        );
        assert_eq!(cache.lengths(), &[4]);
    }
}

#[test]
fn kv_cache_refuses_integer_dtypes() {
    for dtype in [DType::I32, DType::U32, DType::I64] {
        let spec = KvCacheSpec {
            batch: 1,
            num_kv_heads: 1,
            head_dim: 8,
            capacity: 8,
            dtype,
        };
        assert_refused(
            KvCache::contiguous(spec, KvCacheLayout::Contiguous, Device::Cpu),
            "KvCacheSpec::dtype",
            dtype,
        );
        assert_refused(
            KvCache::paged(spec, 4, 2, Device::Cpu),
            "KvCacheSpec::dtype",
            dtype,
        );
        // New tokens of an integer dtype are refused by a float cache.
        let mut cache = KvCache::contiguous(
            KvCacheSpec {
                dtype: DType::F32,
                ..spec
            },
            KvCacheLayout::Contiguous,
            Device::Cpu,
        )
        .unwrap();
        let k = DeviceTensor::zeros(&[1, 2, 1, 8], dtype, Device::Cpu).unwrap();
        let v = DeviceTensor::zeros(&[1, 2, 1, 8], DType::F32, Device::Cpu).unwrap();
        assert_refused(cache.append(&k, &v), "k_new", dtype);
        assert_refused(cache.append(&v, &k), "v_new", dtype);
        assert_eq!(cache.lengths(), &[0]);
    }
}

#[test]
fn allocator_errors_keep_their_source() {
    use std::error::Error;
    // 2^60 i32 elements (a stride-0 view of one) cannot be downloaded: the failed
    // reservation's error is the source, and the message is unchanged by it.
    let one = DeviceTensor::zeros(&[1], DType::I32, Device::Cpu).unwrap();
    let huge = one.broadcast_dim(0, 1 << 60).unwrap();
    let err = huge.to_host::<i32>().unwrap_err();
    let AttentionError::OutOfMemory {
        requested_bytes,
        detail,
        source: Some(source),
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(*requested_bytes, 1 << 62);
    let reserve = source
        .get()
        .downcast_ref::<std::collections::TryReserveError>()
        .expect("the allocator's error");
    assert_eq!(detail, &format!("to_host: {reserve}"));
    assert_eq!(
        err.to_string(),
        format!(
            "out of memory on cpu: requested {} bytes ({detail})",
            1u64 << 62
        )
    );
    assert_eq!(
        err.source().map(|s| s.to_string()),
        Some(reserve.to_string())
    );
    // The source takes no part in comparisons.
    let without = AttentionError::OutOfMemory {
        device: "cpu".into(),
        requested_bytes: *requested_bytes,
        detail: detail.clone(),
        source: None,
    };
    assert_eq!(err, without);
    assert!(without.source().is_none());
}
