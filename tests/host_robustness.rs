//! Host-side robustness: size arithmetic that would wrap, host allocations that fail, shared
//! storage written from several threads, and the values every error message must carry.
//! Every refused call is checked to leave its tensors and caches as they were.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use forge_attn::config::MAX_SCALE;
use forge_attn::problem::HeadStrides;
use forge_attn::{
    AttentionConfig, AttentionError, AttentionProblem, BackendImplementation, CpuAttentionBackend,
    DType, Device, DeviceAttentionBackend, DeviceTensor, HostAdapter, KvCache, KvCacheLayout,
    KvCacheSpec, TransferStats,
};

mod common;
use common::{cpu_f32, spec};

fn shape_error(r: forge_attn::Result<DeviceTensor>) -> (String, String, String) {
    match r {
        Err(AttentionError::ShapeMismatch {
            what,
            expected,
            got,
        }) => (what, expected, got),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

// ---- sizes that would wrap -------------------------------------------------------------

#[test]
fn broadcast_views_whose_size_overflows_are_refused() {
    let one = cpu_f32(&[7.0], &[1, 1]);
    let wide = one.broadcast_dim(1, 1 << 32).unwrap();
    assert_eq!(wide.numel(), 1 << 32);
    // [2^32, 2^32] elements wrap usize; [2^31, 2^32] f32 fits in elements, not in bytes.
    for rows in [1usize << 32, 1 << 31] {
        let (what, expected, got) = shape_error(wide.broadcast_dim(0, rows));
        assert_eq!(what, "broadcast_dim");
        assert!(expected.contains(&isize::MAX.to_string()), "{expected}");
        assert_eq!(got, format!("{:?}", [rows, 1 << 32]));
    }
    // The source view is untouched and still usable.
    assert_eq!(wide.shape(), &[1, 1 << 32]);
    assert_eq!(wide.size_in_bytes(), 4 << 32);
    assert_eq!(one.to_host::<f32>().unwrap(), vec![7.0]);
}

#[test]
fn largest_broadcast_views_count_exactly_and_to_host_is_out_of_memory() {
    let one = cpu_f32(&[1.0], &[1, 1]);
    // 2^60 f32 elements: 2^62 bytes, under isize::MAX, far over any host.
    let huge = one
        .broadcast_dim(0, 1 << 30)
        .unwrap()
        .broadcast_dim(1, 1 << 30)
        .unwrap();
    assert_eq!(huge.numel(), 1 << 60);
    assert_eq!(huge.size_in_bytes(), 1 << 62);
    let t = std::time::Instant::now();
    for r in [
        huge.to_host::<f32>().map(|_| ()),
        huge.to_f32_vec().map(|_| ()),
    ] {
        match r {
            Err(AttentionError::OutOfMemory {
                device,
                requested_bytes,
                ..
            }) => {
                assert_eq!(device, "cpu");
                assert_eq!(requested_bytes, 1 << 62);
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
    }
    let half = DeviceTensor::from_f32(&[1.0], &[1, 1], DType::F16, Device::Cpu)
        .unwrap()
        .broadcast_dim(0, 1 << 31)
        .unwrap()
        .broadcast_dim(1, 1 << 30)
        .unwrap();
    assert!(matches!(
        half.to_f32_vec(),
        Err(AttentionError::OutOfMemory { requested_bytes, .. }) if requested_bytes == 1 << 62
    ));
    assert!(t.elapsed().as_secs() < 10, "refusals must be quick");
}

#[test]
fn zero_sized_dimensions_cannot_hide_overflowing_strides() {
    let big = 1usize << 40;
    let (what, _, got) = shape_error(DeviceTensor::zeros(&[0, big, big], DType::F32, Device::Cpu));
    assert_eq!(what, "tensor");
    assert_eq!(got, format!("{:?}", [0, big, big]));
    let empty: [f32; 0] = [];
    shape_error(DeviceTensor::from_host(&empty, &[0, big, big], Device::Cpu));
    let t = DeviceTensor::zeros(&[0, 4], DType::F32, Device::Cpu).unwrap();
    let (what, _, _) = shape_error(t.reshape(&[0, usize::MAX, 2]));
    assert_eq!(what, "reshape");
    assert_eq!(t.shape(), &[0, 4]);
    // Small zero-sized shapes still work.
    assert_eq!(t.reshape(&[4, 0]).unwrap().numel(), 0);
}

#[test]
fn copy_into_a_broadcast_destination_is_refused_and_changes_nothing() {
    let base = cpu_f32(&[1.0, 2.0, 3.0], &[1, 3]);
    let mut dst = base.broadcast_dim(0, 4).unwrap();
    let src = cpu_f32(&[9.0; 12], &[4, 3]);
    match dst.copy_from(&src) {
        Err(AttentionError::UnsupportedLayout { what, reason }) => {
            assert_eq!(what, "copy_from destination");
            assert!(
                reason.contains("[0, 1]") && reason.contains("[4, 3]"),
                "{reason}"
            );
        }
        other => panic!("expected UnsupportedLayout, got {other:?}"),
    }
    assert_eq!(base.to_host::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
    // A broadcast source is fine.
    let mut out = DeviceTensor::zeros(&[4, 3], DType::F32, Device::Cpu).unwrap();
    out.copy_from(&dst).unwrap();
    assert_eq!(out.to_host::<f32>().unwrap(), [1.0, 2.0, 3.0].repeat(4));
}

#[test]
fn config_product_overflow_shows_the_operands() {
    let (h, d) = (1usize << 32, (1usize << 32) + 1);
    let cfg = AttentionConfig::new(1 << 32, h, 16).with_head_dim(d);
    match cfg.validate() {
        Err(AttentionError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "dim");
            // The operands, and no wrapped product shown as a result.
            assert_eq!(
                reason,
                format!(
                    "num_heads * head_dim = {h} * {d} overflows usize (dim given: {})",
                    1usize << 32
                )
            );
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let wrong = AttentionConfig::new(100, 4, 16).with_head_dim(24);
    assert!(matches!(wrong.validate(),
        Err(AttentionError::InvalidConfig { field: "dim", reason }) if reason.contains("4 * 24 = 96, got 100")));
}

#[test]
fn scale_is_bounded() {
    let cfg = AttentionConfig::new(64, 1, 16);
    cfg.clone().with_scale(MAX_SCALE).validate().unwrap();
    cfg.clone()
        .with_scale(f32::MIN_POSITIVE)
        .validate()
        .unwrap();
    for s in [
        f32::MAX,
        MAX_SCALE * 2.0,
        f32::INFINITY,
        f32::NAN,
        0.0,
        -1.0,
    ] {
        match cfg.clone().with_scale(s).validate() {
            Err(AttentionError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "scale");
                assert!(
                    reason.contains("65536") && reason.contains(&format!("got {s}")),
                    "{reason}"
                );
            }
            other => panic!("scale {s}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn transfer_stats_since_saturates() {
    let small = TransferStats {
        host_to_device_calls: 1,
        host_to_device_bytes: 10,
        device_to_host_calls: 2,
        device_to_host_bytes: 20,
    };
    let big = TransferStats {
        host_to_device_calls: 5,
        host_to_device_bytes: 50,
        device_to_host_calls: 1,
        device_to_host_bytes: 30,
    };
    // Swapped or mixed readings: every negative difference reads 0, never a wrapped count.
    assert_eq!(
        small.since(&big),
        TransferStats {
            host_to_device_calls: 0,
            host_to_device_bytes: 0,
            device_to_host_calls: 1,
            device_to_host_bytes: 0,
        }
    );
    let full = TransferStats {
        host_to_device_calls: u64::MAX,
        device_to_host_calls: u64::MAX,
        ..TransferStats::default()
    };
    assert_eq!(full.total_calls(), u64::MAX);
}

#[test]
fn problem_helpers_do_not_wrap() {
    let s = HeadStrides::default();
    let mut p = AttentionProblem {
        batch: usize::MAX,
        seq_q: 1,
        seq_k: usize::MAX,
        num_heads: 1 << 20,
        num_kv_heads: 0,
        head_dim: 1 << 20,
        scale: 1.0,
        causal: false,
        dtype: DType::F32,
        device: Device::Cpu,
        q: s,
        k: s,
        v: s,
        mask: None,
    };
    let f = p.flops();
    assert!(f.is_finite() && f > 1e50, "{f}");
    // 0 KV heads reads as one group of every query head.
    assert_eq!(p.kv_head(5), 0);
    assert_eq!(p.causal_offset(), isize::MAX);
    p.seq_k = 0;
    p.seq_q = usize::MAX;
    assert_eq!(p.causal_offset(), isize::MIN);
    p.num_kv_heads = p.num_heads * 2;
    assert_eq!(p.kv_head(3), 3);
}

#[test]
fn legacy_overflow_message_gives_the_values() {
    let ad = HostAdapter::new(CpuAttentionBackend::new());
    let b = usize::MAX / 2;
    let cfg = AttentionConfig::new(32, 4, 64).with_batch_size(b);
    let q = vec![0.0f32; 64];
    match ad.forward(&cfg, &q, &q, &q, None) {
        Err(AttentionError::InvalidConfig { reason, .. }) => {
            assert!(
                reason.contains(&format!("{b} * 4 * 8 overflows usize")),
                "{reason}"
            );
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

// ---- host allocations that fail ----------------------------------------------------------

fn assert_oom<T: std::fmt::Debug>(r: forge_attn::Result<T>, bytes: u64) {
    match r {
        Err(AttentionError::OutOfMemory {
            device,
            requested_bytes,
            detail,
            ..
        }) => {
            assert_eq!(device, "cpu");
            assert_eq!(requested_bytes, bytes);
            assert!(!detail.is_empty());
        }
        other => panic!("expected OutOfMemory of {bytes} bytes, got {other:?}"),
    }
}

#[test]
fn host_allocations_that_fail_are_out_of_memory() {
    let t = std::time::Instant::now();
    assert_oom(
        DeviceTensor::zeros(&[1 << 48], DType::F32, Device::Cpu),
        1 << 50,
    );
    assert_oom(
        DeviceTensor::zeros(&[1 << 20, 1 << 29], DType::F16, Device::Cpu),
        1 << 50,
    );
    // Nearly the largest byte size a tensor may have: passes the size check, then the
    // padded allocation layout is refused.
    assert_oom(
        DeviceTensor::zeros(&[isize::MAX as usize / 2], DType::F16, Device::Cpu),
        isize::MAX as u64 - 1,
    );
    assert!(t.elapsed().as_secs() < 10, "refusals must be quick");
    // Small allocations still work afterwards.
    assert_eq!(
        DeviceTensor::zeros(&[3], DType::F32, Device::Cpu)
            .unwrap()
            .to_host::<f32>()
            .unwrap(),
        vec![0.0; 3]
    );
}

#[test]
fn kv_caches_too_big_for_memory_are_out_of_memory() {
    // 2^16 x 64 x 2^20 x 512 f16 = 4 PiB each for K and V: past any address space, so
    // the allocation fails even where the host overcommits memory (a 32 TiB cache is
    // refused on a 24 GiB machine but can be mapped on a large host that overcommits).
    let s = spec(1 << 16, 64, 512, 1 << 20, DType::F16);
    for layout in [KvCacheLayout::Contiguous, KvCacheLayout::FlashAttention] {
        assert_oom(KvCache::contiguous(s, layout, Device::Cpu), 1 << 52);
    }
    // A pool of 2^23 pages of 2^13 tokens: the same 4 PiB per tensor.
    assert_oom(KvCache::paged(s, 1 << 13, 1 << 23, Device::Cpu), 1 << 52);
}

#[test]
fn kv_cache_sizes_that_overflow_name_the_factors() {
    let s = spec(1 << 30, 1 << 20, 1 << 20, 1 << 30, DType::F32);
    match KvCache::contiguous(s, KvCacheLayout::Contiguous, Device::Cpu) {
        Err(AttentionError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "kv cache size");
            assert!(
                reason.contains("batch * num_kv_heads * capacity * head_dim")
                    && reason.contains(&format!(
                        "{} x {} x {} x {}",
                        1 << 30,
                        1 << 20,
                        1 << 30,
                        1 << 20
                    )),
                "{reason}"
            );
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    match KvCache::paged(s, 1 << 30, 1 << 30, Device::Cpu) {
        Err(AttentionError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "kv cache size");
            assert!(reason.contains("num_pages * num_kv_heads * page_size * head_dim"));
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn kv_cache_spec_messages_give_the_values() {
    for (s, field) in [
        (spec(0, 1, 8, 4, DType::F32), "batch"),
        (spec(1, 0, 8, 4, DType::F32), "num_kv_heads"),
        (spec(1, 1, 0, 4, DType::F32), "head_dim"),
        (spec(1, 1, 8, 0, DType::F32), "capacity"),
    ] {
        match KvCache::contiguous(s, KvCacheLayout::Contiguous, Device::Cpu) {
            Err(AttentionError::InvalidConfig { field: f, reason }) => {
                assert_eq!(f, field);
                assert_eq!(reason, format!("kv cache {field} must be > 0, got 0"));
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }
    let cap = i32::MAX as usize + 1;
    match KvCache::contiguous(
        spec(1, 1, 1, cap, DType::F32),
        KvCacheLayout::Contiguous,
        Device::Cpu,
    ) {
        Err(AttentionError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "capacity");
            assert!(reason.contains(&cap.to_string()) && reason.contains(&i32::MAX.to_string()));
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    match KvCache::contiguous(
        spec(1, 1, 1, 1, DType::F32),
        KvCacheLayout::BlockSparse,
        Device::Cpu,
    ) {
        Err(AttentionError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "layout");
            assert!(reason.contains("got BlockSparse"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

// ---- KV cache appends of huge views ------------------------------------------------------

fn tokens(b: usize, n: usize, hkv: usize, d: usize, seed: f32) -> DeviceTensor {
    let v: Vec<f32> = (0..b * n * hkv * d).map(|i| seed + i as f32).collect();
    cpu_f32(&v, &[b, n, hkv, d])
}

fn caches(s: KvCacheSpec) -> Vec<KvCache> {
    vec![
        KvCache::contiguous(s, KvCacheLayout::Contiguous, Device::Cpu).unwrap(),
        KvCache::paged(s, 4, s.batch * s.capacity.div_ceil(4), Device::Cpu).unwrap(),
    ]
}

fn dense(c: &KvCache) -> (Vec<f32>, Vec<f32>) {
    let (k, v) = c.to_dense().unwrap();
    (k.to_host().unwrap(), v.to_host().unwrap())
}

#[test]
fn appends_of_huge_broadcast_views_are_refused_and_change_nothing() {
    let (b, hkv, d) = (2, 1, 2);
    // B * n * Hkv * D * 4 bytes must stay within isize::MAX for the view to exist.
    let n = isize::MAX as usize / (b * hkv * d * 4);
    for mut cache in caches(spec(b, hkv, d, 16, DType::F32)) {
        cache
            .append(&tokens(b, 3, hkv, d, 0.0), &tokens(b, 3, hkv, d, 100.0))
            .unwrap();
        let before = dense(&cache);
        let pages = cache.pages_used();
        let huge_k = tokens(b, 1, hkv, d, 1000.0).broadcast_dim(1, n).unwrap();
        let huge_v = tokens(b, 1, hkv, d, 2000.0).broadcast_dim(1, n).unwrap();
        for r in [
            cache.append(&huge_k, &huge_v),
            cache.append_ragged(&huge_k, &huge_v, &[0, n]),
        ] {
            match r {
                Err(AttentionError::CapacityExceeded(msg)) => assert!(
                    msg.contains("holds 3 tokens")
                        && msg.contains(&format!("appending {n}"))
                        && msg.contains("capacity 16"),
                    "{msg}"
                ),
                other => panic!("expected CapacityExceeded, got {other:?}"),
            }
        }
        match cache.append_ragged(&huge_k, &huge_v, &[usize::MAX, 0]) {
            Err(AttentionError::ShapeMismatch { what, got, .. }) => {
                assert_eq!(what, "counts");
                assert!(got.contains(&usize::MAX.to_string()));
            }
            other => panic!("expected ShapeMismatch, got {other:?}"),
        }
        assert_eq!(cache.lengths(), &[3, 3]);
        assert_eq!(cache.pages_used(), pages);
        assert_eq!(dense(&cache), before);
        // A ragged append may take a few rows of a huge view.
        cache.append_ragged(&huge_k, &huge_v, &[1, 1]).unwrap();
        assert_eq!(cache.lengths(), &[4, 4]);
        let (k, _) = dense(&cache);
        assert_eq!(&k[3 * d..4 * d], &[1000.0, 1001.0]);
    }
}

// ---- shared state ------------------------------------------------------------------------

/// Compiles only while `KvCache` is not `Clone` (with a `Clone` impl the call is ambiguous).
#[test]
fn kv_cache_is_not_clone() {
    trait AmbiguousIfClone<A> {
        fn probe() -> bool {
            true
        }
    }
    impl<T: ?Sized> AmbiguousIfClone<()> for T {}
    #[allow(dead_code)]
    struct IsClone;
    impl<T: Clone> AmbiguousIfClone<IsClone> for T {}
    assert!(<KvCache as AmbiguousIfClone<_>>::probe());
}

#[test]
fn try_clone_is_a_deep_copy() {
    let (b, hkv, d) = (2, 2, 4);
    for mut cache in caches(spec(b, hkv, d, 12, DType::F32)) {
        cache
            .append_ragged(
                &tokens(b, 5, hkv, d, 0.0),
                &tokens(b, 5, hkv, d, 50.0),
                &[5, 5],
            )
            .unwrap();
        let before = dense(&cache);
        let mut copy = cache.try_clone().unwrap();
        assert!(!copy.lengths().is_empty());
        assert_eq!(copy.lengths(), cache.lengths());
        assert_eq!(copy.pages_used(), cache.pages_used());
        assert_eq!(dense(&copy), before);
        copy.append(&tokens(b, 2, hkv, d, 500.0), &tokens(b, 2, hkv, d, 600.0))
            .unwrap();
        assert_eq!(cache.lengths(), &[5, 5]);
        assert_eq!(dense(&cache), before);
        // The original appends its own tokens without touching the copy's.
        cache
            .append(&tokens(b, 2, hkv, d, 700.0), &tokens(b, 2, hkv, d, 800.0))
            .unwrap();
        let (ck, _) = dense(&copy);
        let (ok, _) = dense(&cache);
        let row = 5 * hkv * d; // first new token of sequence 0
        assert_eq!(ck[row], 500.0);
        assert_eq!(ok[row], 700.0);
        assert_eq!(copy.lengths(), &[7, 7]);
    }
}

/// Clones of one host tensor written from two threads: every copy runs alone or is refused
/// with StorageBusy, so no reader ever sees a half-written tensor.
#[test]
fn concurrent_writes_to_shared_storage_are_exclusive() {
    const N: usize = 1 << 16;
    let shared = DeviceTensor::zeros(&[N], DType::F32, Device::Cpu).unwrap();
    let sources: Vec<DeviceTensor> = [1.0f32, 2.0]
        .iter()
        .map(|&x| cpu_f32(&vec![x; N], &[N]))
        .collect();
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for src in &sources {
            let mut dst = shared.clone();
            let busy = busy.clone();
            s.spawn(move || {
                for _ in 0..200 {
                    match dst.copy_from(src) {
                        Ok(()) => {}
                        Err(AttentionError::StorageBusy { .. }) => {
                            busy.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
        let reader = shared.clone();
        s.spawn(move || {
            for _ in 0..200 {
                match reader.to_host::<f32>() {
                    Ok(v) => assert!(v.iter().all(|&x| x == v[0]), "torn read"),
                    Err(AttentionError::StorageBusy { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        });
    });
    let v = shared.to_host::<f32>().unwrap();
    // Every copy may have met another one and been refused (a loaded machine): the tensor
    // is then still all zeros, never a mix.
    assert!([0.0, 1.0, 2.0].contains(&v[0]), "{}", v[0]);
    assert!(v.iter().all(|&x| x == v[0]), "torn write");
    // Alone, a copy is never refused.
    shared.clone().copy_from(&sources[1]).unwrap();
    assert!(shared.to_host::<f32>().unwrap().iter().all(|&x| x == 2.0));
}

/// Writes to disjoint views of one buffer (and reads of shared inputs) run in parallel.
#[test]
fn disjoint_outputs_of_one_buffer_run_in_parallel() {
    let (b, s, h, d) = (4, 8, 2, 16);
    let cfg = AttentionConfig::new(h * d, h, s);
    let data: Vec<f32> = (0..b * s * h * d)
        .map(|i| ((i * 37) % 11) as f32 * 0.1)
        .collect();
    let q = cpu_f32(&data, &[b, s, h, d]);
    let backend = CpuAttentionBackend::new();
    // The reference runs the same per-sequence calls one after the other (a whole-batch call
    // may take another tiling and differ in the last bits).
    let whole = DeviceTensor::zeros(&[b, s, h, d], DType::F32, Device::Cpu).unwrap();
    for i in 0..b {
        let qi = q.narrow(0, i, 1).unwrap();
        let mut oi = whole.narrow(0, i, 1).unwrap();
        backend
            .forward_into(&cfg, &qi, &qi, &qi, None, &mut oi)
            .unwrap();
    }
    let out = DeviceTensor::zeros(&[b, s, h, d], DType::F32, Device::Cpu).unwrap();
    std::thread::scope(|sc| {
        for i in 0..b {
            let (q, out, cfg, backend) = (&q, &out, &cfg, &backend);
            sc.spawn(move || {
                let qi = q.narrow(0, i, 1).unwrap();
                let mut oi = out.narrow(0, i, 1).unwrap();
                for _ in 0..20 {
                    backend
                        .forward_into(cfg, &qi, &qi, &qi, None, &mut oi)
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(
        out.to_host::<f32>().unwrap(),
        whole.to_host::<f32>().unwrap()
    );
}
