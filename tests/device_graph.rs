//! Device graphs: recording decode attention once and replaying it (ignored without a GPU),
//! and what recording refuses.

use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, AttentionError, DType, Device, DeviceTensor, GpuAttentionBackend, KvCache,
    KvCacheLayout, KvCacheSpec,
};

mod common;
use common::max_abs_diff;

const H: usize = 8;
const HKV: usize = 2;
const D: usize = 128;

/// The device while no other test of this binary uses it: a recording takes in whatever
/// is queued on the device's stream, from any thread, and refuses other threads' work.
fn gpu() -> (Device, std::sync::MutexGuard<'static, ()>) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Device::best_available();
    assert!(d.is_gpu(), "needs a GPU");
    (d, guard)
}

fn tokens(b: usize, n: usize, dtype: DType, dev: Device, seed: u64) -> DeviceTensor {
    DeviceTensor::from_f32(
        &random_values(b * n * HKV * D, seed),
        &[b, n, HKV, D],
        dtype,
        dev,
    )
    .unwrap()
}

fn query(b: usize, dtype: DType, dev: Device, seed: u64) -> DeviceTensor {
    DeviceTensor::from_f32(&random_values(b * H * D, seed), &[b, 1, H, D], dtype, dev).unwrap()
}

fn config(len: usize) -> AttentionConfig {
    AttentionConfig::new(H * D, H, len)
        .with_num_kv_heads(HKV)
        .with_causal(true)
}

/// A cache of `len` tokens per sequence (ragged: sequence b holds len - 7 b) with room
/// for `extra` more.
fn cache(b: usize, len: usize, extra: usize, dtype: DType, dev: Device, paged: bool) -> KvCache {
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: HKV,
        head_dim: D,
        capacity: len + extra,
        dtype,
    };
    let mut c = if paged {
        KvCache::paged(spec, 16, b * (len + extra).div_ceil(16), dev).unwrap()
    } else {
        KvCache::contiguous(spec, KvCacheLayout::FlashAttention, dev).unwrap()
    };
    let counts: Vec<usize> = (0..b).map(|i| len - 7 * i).collect();
    c.append_ragged(
        &tokens(b, len, dtype, dev, 1),
        &tokens(b, len, dtype, dev, 2),
        &counts,
    )
    .unwrap();
    c
}

/// Recorded decode calls replay to what direct calls give: over several caches in one
/// graph, with new query contents written between replays, and after the caches grew
/// outside the graph (the recording reads the lengths from the device and is cut for the
/// caches' capacity), for a contiguous and a paged cache and each dtype.
#[test]
#[ignore = "needs a GPU"]
fn replays_match_direct_calls_as_the_cache_grows() {
    let (dev, _one) = gpu();
    let backend = GpuAttentionBackend::new(dev).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        for paged in [false, true] {
            let b = 2;
            let mut caches: Vec<KvCache> = (0..3)
                .map(|_| cache(b, 700, 600, dtype, dev, paged))
                .collect();
            let q = query(b, dtype, dev, 3);
            let mut outs: Vec<DeviceTensor> = (0..3)
                .map(|_| DeviceTensor::zeros(&[b, 1, H, D], dtype, dev).unwrap())
                .collect();
            let mut direct = DeviceTensor::zeros(&[b, 1, H, D], dtype, dev).unwrap();
            // One direct call first: the workspaces exist before recording.
            backend
                .forward_cached(&config(700), &q, &caches[0], &mut direct)
                .unwrap();
            let graph = dev
                .capture_graph(|| {
                    for (c, o) in caches.iter().zip(outs.iter_mut()) {
                        backend.forward_cached(&config(700), &q, c, o)?;
                    }
                    Ok(())
                })
                .unwrap();
            assert!(!dev.is_capturing());
            // Nothing ran while recording.
            assert_eq!(outs[0].to_f32_vec().unwrap(), vec![0.0; b * H * D]);
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            for step in 0..3u64 {
                // New contents in the recorded query's memory (a clone shares it).
                let q_new = query(b, dtype, dev, 10 + step);
                q.clone().copy_from(&q_new).unwrap();
                graph.launch().unwrap();
                for (c, o) in caches.iter().zip(&outs) {
                    let len = c.lengths()[0];
                    backend
                        .forward_cached(&config(len), &q_new, c, &mut direct)
                        .unwrap();
                    let e = max_abs_diff(o, &direct);
                    assert!(
                        e <= tol,
                        "{dtype} paged={paged} step {step} len {len}: replay differs by {e}"
                    );
                }
                // Grow every cache outside the graph; the next replay sees the new keys.
                for (i, c) in caches.iter_mut().enumerate() {
                    let n = 37 + 100 * step as usize;
                    c.append(
                        &tokens(b, n, dtype, dev, 20 + i as u64),
                        &tokens(b, n, dtype, dev, 30 + i as u64),
                    )
                    .unwrap();
                }
            }
        }
    }
}

/// Tensors dropped while a graph exists keep their memory until the graph is dropped, so a
/// replay after the drop still reads valid memory (sanitize runs check the accesses).
#[test]
#[ignore = "needs a GPU"]
fn tensors_dropped_while_a_graph_exists_stay_valid_for_it() {
    let (dev, _one) = gpu();
    let backend = GpuAttentionBackend::new(dev).unwrap();
    let c = cache(1, 300, 0, DType::F32, dev, false);
    let q = query(1, DType::F32, dev, 5);
    let mut out = DeviceTensor::zeros(&[1, 1, H, D], DType::F32, dev).unwrap();
    backend
        .forward_cached(&config(300), &q, &c, &mut out)
        .unwrap();
    let expected = out.to_f32_vec().unwrap();
    let mut out2 = DeviceTensor::zeros(&[1, 1, H, D], DType::F32, dev).unwrap();
    let graph = {
        let q_graph = query(1, DType::F32, dev, 5);
        let g = dev
            .capture_graph(|| {
                backend
                    .forward_cached(&config(300), &q_graph, &c, &mut out2)
                    .map(|_| ())
            })
            .unwrap();
        drop(q_graph);
        g
    };
    // New allocations must not reuse the dropped query's memory while the graph lives.
    let _noise: Vec<DeviceTensor> = (0..4)
        .map(|_| DeviceTensor::from_f32(&vec![9.0; H * D], &[1, 1, H, D], DType::F32, dev))
        .collect::<Result<_, _>>()
        .unwrap();
    graph.launch().unwrap();
    assert_eq!(out2.to_f32_vec().unwrap(), expected);
    drop(graph);
    dev.synchronize().unwrap();
}

/// What a recording refuses, each with a GraphCapture error and without breaking the
/// device: allocating, reading back to the host, synchronizing, timing with events,
/// appending to a cache (also as a fused step), a nested recording and launching a graph;
/// the closure's own error, and a panic in it.
#[test]
#[ignore = "needs a GPU"]
fn recording_refuses_what_a_replay_cannot_repeat() {
    let (dev, _one) = gpu();
    let backend = GpuAttentionBackend::new(dev).unwrap();
    let mut c = cache(1, 64, 8, DType::F32, dev, false);
    let q = query(1, DType::F32, dev, 7);
    let mut out = DeviceTensor::zeros(&[1, 1, H, D], DType::F32, dev).unwrap();
    backend
        .forward_cached(&config(64), &q, &c, &mut out)
        .unwrap();
    let inner = dev.capture_graph(|| Ok(())).unwrap();
    let k = tokens(1, 1, DType::F32, dev, 8);
    let v = tokens(1, 1, DType::F32, dev, 9);
    let refused = |what: &str, e: AttentionError| match e {
        AttentionError::GraphCapture { device, op, .. } => {
            assert_eq!(device, dev.to_string(), "{what}");
            op
        }
        e => panic!("{what}: expected GraphCapture, got {e}"),
    };
    let ops = [
        "alloc", "dtoh", "sync", "time", "append", "fused", "nested", "launch",
    ];
    for what in ops {
        let err = dev
            .capture_graph(|| match what {
                "alloc" => DeviceTensor::zeros(&[4], DType::F32, dev).map(|_| ()),
                "dtoh" => out.to_f32_vec().map(|_| ()),
                "sync" => dev.synchronize(),
                "time" => dev.elapsed_ms(|| Ok(())).map(|_| ()),
                "append" => c.append(&k, &v),
                "fused" => backend
                    .forward_cached_append(&config(65), &q, &k, &v, &mut c, &mut out)
                    .map(|_| ()),
                "nested" => dev.capture_graph(|| Ok(())).map(|_| ()),
                _ => inner.launch(),
            })
            .unwrap_err();
        let op = refused(what, err);
        assert!(!op.is_empty(), "{what}");
        // The device is usable again, and the cache unchanged.
        assert!(!dev.is_capturing(), "{what}");
        assert_eq!(c.lengths(), &[64], "{what}");
        backend
            .forward_cached(&config(64), &q, &c, &mut out)
            .unwrap();
        dev.synchronize().unwrap();
    }
    let mine = dev
        .capture_graph(|| {
            Err(AttentionError::InvalidConfig {
                field: "test",
                reason: "the closure's own error".into(),
            })
        })
        .unwrap_err();
    assert!(
        matches!(mine, AttentionError::InvalidConfig { field: "test", .. }),
        "{mine}"
    );
    // A panic inside the closure ends the recording too.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dev.capture_graph(|| -> forge_attn::Result<()> {
            backend.forward_cached(&config(64), &q, &c, &mut out)?;
            panic!("inside a recording")
        })
    }));
    assert!(panicked.is_err());
    assert!(!dev.is_capturing());
    backend
        .forward_cached(&config(64), &q, &c, &mut out)
        .unwrap();
    dev.synchronize().unwrap();
    // Appending outside a recording still works.
    c.append(&k, &v).unwrap();
    assert_eq!(c.lengths(), &[65]);
}
