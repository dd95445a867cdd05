//! Decode loops on the device move nothing between host and device. The transfer counters
//! are per device and process-wide, so this binary runs its loops one at a time.

use std::sync::Mutex;

use forge_attn::reference::{attention_f64, random_values, relative_l2_error};
use forge_attn::{
    AttentionConfig, CpuAttentionBackend, DType, Device, DeviceAttentionBackend, DeviceTensor,
    GpuAttentionBackend, KvCache, KvCacheLayout,
};

mod common;
use common::{gpu_backend, spec};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `steps` decode steps (append + attention, output fed back) and returns the last
/// query, the last output and the number of host transfers inside the loop.
fn decode_loop(
    backend: &dyn DeviceAttentionBackend,
    gpu: Option<&GpuAttentionBackend>,
    cache: &mut KvCache,
    cfg: &AttentionConfig,
    x0: DeviceTensor,
    steps: usize,
) -> (DeviceTensor, DeviceTensor, u64) {
    let dev = backend.device();
    let (h, hkv) = (cfg.num_heads, cfg.num_kv_heads);
    let mut x = x0;
    let mut out = DeviceTensor::zeros(x.shape(), x.dtype(), dev).unwrap();
    let before = dev.transfer_stats();
    for _ in 0..steps {
        cache
            .append(
                &x.narrow(2, 0, hkv).unwrap(),
                &x.narrow(2, h - hkv, hkv).unwrap(),
            )
            .unwrap();
        match gpu {
            Some(g) => g.forward_cached(cfg, &x, cache, &mut out).unwrap(),
            None => {
                let (k, v) = cache.views().unwrap();
                backend
                    .forward_into(cfg, &x, &k, &v, None, &mut out)
                    .unwrap()
            }
        };
        std::mem::swap(&mut x, &mut out);
    }
    dev.synchronize().unwrap();
    let moved = dev.transfer_stats().since(&before).total_calls();
    // After the last swap `x` holds the last result and `out` the query that produced it.
    (out, x, moved)
}

fn check_last_step(
    cfg: &AttentionConfig,
    cache: &KvCache,
    q: &DeviceTensor,
    got: &DeviceTensor,
    tol: f64,
) {
    let (k, v) = cache.to_dense().unwrap();
    let qh = DeviceTensor::from_f32(&q.to_f32_vec().unwrap(), q.shape(), q.dtype(), Device::Cpu)
        .unwrap();
    let want = attention_f64(cfg, &qh, &k, &v, None).unwrap();
    let err = relative_l2_error(&got.to_f32_vec().unwrap(), &want);
    assert!(err < tol, "last decode step error {err:.3e}");
}

#[test]
fn cpu_decode_loop_has_no_transfers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, h, hkv, d) = (2, 8, 2, 32);
    let cfg = AttentionConfig::new(h * d, h, 64)
        .with_num_kv_heads(hkv)
        .with_causal(true);
    let mut cache = KvCache::contiguous(
        spec(b, hkv, d, 64, DType::F32),
        KvCacheLayout::Contiguous,
        Device::Cpu,
    )
    .unwrap();
    let x0 = DeviceTensor::from_f32(
        &random_values(b * h * d, 1),
        &[b, 1, h, d],
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let (q, got, moved) = decode_loop(&CpuAttentionBackend, None, &mut cache, &cfg, x0, 40);
    assert_eq!(moved, 0);
    check_last_step(&cfg, &cache, &q, &got, 1e-5);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_decode_loops_have_no_transfers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (dev, backend) = gpu_backend();
    let (b, h, hkv, d) = (4, 16, 4, 64);
    for (dtype, paged, tol) in [
        (DType::F32, false, 1e-5),
        (DType::BF16, true, 1e-2),
        (DType::F16, false, 1e-2),
    ] {
        let cfg = AttentionConfig::new(h * d, h, 300)
            .with_num_kv_heads(hkv)
            .with_causal(true);
        let s = spec(b, hkv, d, 300, dtype);
        let mut cache = if paged {
            KvCache::paged(s, 16, b * 19, dev).unwrap()
        } else {
            KvCache::contiguous(s, KvCacheLayout::FlashAttention, dev).unwrap()
        };
        let prompt = DeviceTensor::from_f32(
            &random_values(b * 200 * hkv * d, 3),
            &[b, 200, hkv, d],
            dtype,
            dev,
        )
        .unwrap();
        cache.append(&prompt, &prompt).unwrap();
        let x0 = DeviceTensor::from_f32(&random_values(b * h * d, 4), &[b, 1, h, d], dtype, dev)
            .unwrap();
        let (q, got, moved) = decode_loop(&backend, Some(&backend), &mut cache, &cfg, x0, 50);
        assert_eq!(moved, 0, "{dtype} paged={paged}");
        assert_eq!(cache.lengths(), &[250; 4]);
        check_last_step(&cfg, &cache, &q, &got, tol);
    }
}
