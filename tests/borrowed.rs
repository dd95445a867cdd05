//! Tensors over memory forge-attn did not allocate, on the CPU: every constructor against
//! owned tensors on the CPU backend, every refusal that needs no GPU, and the memory's
//! owner outliving every view and nothing longer.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, AttentionError, CpuAttentionBackend, DType, Device, DeviceAttentionBackend,
    DeviceTensor, GpuStream, KvCache, KvCacheLayout,
};

use common::{cpu_f32, spec};

/// Data that records when it is dropped.
struct Watched {
    data: Vec<f32>,
    dropped: Arc<AtomicBool>,
}

impl AsRef<[f32]> for Watched {
    fn as_ref(&self) -> &[f32] {
        &self.data
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

fn watched(data: Vec<f32>) -> (Arc<Watched>, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    (
        Arc::new(Watched {
            data,
            dropped: dropped.clone(),
        }),
        dropped,
    )
}

const B: usize = 2;
const S: usize = 5;
const H: usize = 4;
const HKV: usize = 2;
const D: usize = 16;

fn config() -> AttentionConfig {
    AttentionConfig::new(H * D, H, S)
        .with_num_kv_heads(HKV)
        .with_causal(true)
}

/// The CPU backend's output over owned copies of `q`, `k`, `v` (row-major `[B,S,H,D]`).
fn owned_output(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let q = cpu_f32(q, &[B, S, H, D]);
    let k = cpu_f32(k, &[B, S, HKV, D]);
    let v = cpu_f32(v, &[B, S, HKV, D]);
    let mut out = DeviceTensor::zeros(&[B, S, H, D], DType::F32, Device::Cpu).unwrap();
    CpuAttentionBackend::new()
        .forward_into(&config(), &q, &k, &v, None, &mut out)
        .unwrap();
    out.to_host().unwrap()
}

fn qkv() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        random_values(B * S * H * D, 1),
        random_values(B * S * HKV * D, 2),
        random_values(B * S * HKV * D, 3),
    )
}

#[test]
fn scoped_slices_are_attended_in_place_like_owned_tensors() {
    let (q, k, v) = qkv();
    let want = owned_output(&q, &k, &v);
    let mut out = vec![f32::NAN; B * S * H * D];
    DeviceTensor::borrow_scope(|scope| {
        let qt = scope.host(&q, &[B, S, H, D], None).unwrap();
        let kt = scope.host(&k, &[B, S, HKV, D], None).unwrap();
        let vt = scope.host(&v, &[B, S, HKV, D], None).unwrap();
        let mut ot = scope.host_mut(&mut out, &[B, S, H, D], None).unwrap();
        assert!(qt.is_borrowed() && ot.is_borrowed());
        assert_eq!(qt.device(), Device::Cpu);
        CpuAttentionBackend::new()
            .forward_into(&config(), &qt, &kt, &vt, None, &mut ot)
            .unwrap();
    });
    // Written into the caller's memory, the same values as over owned tensors.
    assert_eq!(out, want);
}

#[test]
fn borrowed_strides_read_another_memory_order() {
    // K stored as [B, HKV, S, D], lent as the [B, S, HKV, D] the call takes.
    let (q, k, v) = qkv();
    let want = owned_output(&q, &k, &v);
    let mut k_bhsd = vec![0f32; k.len()];
    for b in 0..B {
        for s in 0..S {
            for h in 0..HKV {
                for d in 0..D {
                    k_bhsd[((b * HKV + h) * S + s) * D + d] = k[((b * S + s) * HKV + h) * D + d];
                }
            }
        }
    }
    let strides = [HKV * S * D, D, S * D, 1];
    let mut out = vec![0f32; want.len()];
    DeviceTensor::borrow_scope(|scope| {
        let qt = scope.host(&q, &[B, S, H, D], None).unwrap();
        let kt = scope
            .host(&k_bhsd, &[B, S, HKV, D], Some(&strides))
            .unwrap();
        assert_eq!(kt.strides(), &strides);
        assert_eq!(
            kt.to_host::<f32>().unwrap(),
            k,
            "the strided view reads K in order"
        );
        let vt = scope.host(&v, &[B, S, HKV, D], None).unwrap();
        let mut ot = scope.host_mut(&mut out, &[B, S, H, D], None).unwrap();
        CpuAttentionBackend::new()
            .forward_into(&config(), &qt, &kt, &vt, None, &mut ot)
            .unwrap();
    });
    assert_eq!(out, want);
}

#[test]
fn views_of_borrowed_tensors_share_the_memory() {
    let data: Vec<f32> = (0..24).map(|i| i as f32).collect();
    DeviceTensor::borrow_scope(|scope| {
        let t = scope.host(&data, &[2, 3, 4], None).unwrap();
        let n = t.narrow(1, 1, 2).unwrap();
        assert_eq!(
            n.to_host::<f32>().unwrap(),
            vec![4., 5., 6., 7., 8., 9., 10., 11., 16., 17., 18., 19., 20., 21., 22., 23.]
        );
        let p = t.permute(&[2, 0, 1]).unwrap();
        assert_eq!(p.shape(), &[4, 2, 3]);
        assert_eq!(p.to_host::<f32>().unwrap()[..3], [0., 4., 8.]);
        assert!(n.shares_storage_with(&t) && p.is_borrowed());
        // A copy out of a borrowed tensor into an owned one.
        let mut owned = DeviceTensor::zeros(&[2, 2, 4], DType::F32, Device::Cpu).unwrap();
        owned.copy_from(&n).unwrap();
        assert!(!owned.is_borrowed());
        assert_eq!(owned.to_host::<f32>().unwrap(), n.to_host::<f32>().unwrap());
    });
}

#[test]
fn every_dtype_is_borrowed_with_its_own_type() {
    let f16: Vec<half::f16> = [1.0f32, -2.0]
        .iter()
        .map(|&x| half::f16::from_f32(x))
        .collect();
    let bf16: Vec<half::bf16> = [3.0f32].iter().map(|&x| half::bf16::from_f32(x)).collect();
    let (i32s, u32s, i64s) = (vec![-7i32, 8], vec![9u32], vec![-(1i64 << 40)]);
    DeviceTensor::borrow_scope(|scope| {
        let t = scope.host(&f16, &[2], None).unwrap();
        assert_eq!(
            (t.dtype(), t.to_f32_vec().unwrap()),
            (DType::F16, vec![1.0, -2.0])
        );
        let t = scope.host(&bf16, &[1], None).unwrap();
        assert_eq!(
            (t.dtype(), t.to_f32_vec().unwrap()),
            (DType::BF16, vec![3.0])
        );
        let t = scope.host(&i32s, &[2], None).unwrap();
        assert_eq!(
            (t.dtype(), t.to_host::<i32>().unwrap()),
            (DType::I32, i32s.clone())
        );
        let t = scope.host(&u32s, &[1], None).unwrap();
        assert_eq!(
            (t.dtype(), t.to_host::<u32>().unwrap()),
            (DType::U32, u32s.clone())
        );
        let t = scope.host(&i64s, &[1], None).unwrap();
        assert_eq!(
            (t.dtype(), t.to_host::<i64>().unwrap()),
            (DType::I64, i64s.clone())
        );
    });
}

#[test]
fn a_shared_owner_drops_only_after_the_last_view() {
    let (q, k, v) = qkv();
    let want = owned_output(&q, &k, &v);
    let (owner, dropped) = watched(q.clone());
    let qt = DeviceTensor::from_host_shared(owner, &[B, S, H, D], None).unwrap();
    let view = qt.narrow(0, 1, 1).unwrap();
    let permuted = qt.permute(&[0, 2, 1, 3]).unwrap();
    let kt = cpu_f32(&k, &[B, S, HKV, D]);
    let vt = cpu_f32(&v, &[B, S, HKV, D]);
    let mut out = DeviceTensor::zeros(&[B, S, H, D], DType::F32, Device::Cpu).unwrap();
    CpuAttentionBackend::new()
        .forward_into(&config(), &qt, &kt, &vt, None, &mut out)
        .unwrap();
    assert_eq!(out.to_host::<f32>().unwrap(), want);
    drop(qt);
    assert!(
        !dropped.load(Ordering::SeqCst),
        "views still use the memory"
    );
    assert_eq!(view.to_host::<f32>().unwrap(), q[S * H * D..]);
    drop(view);
    assert!(!dropped.load(Ordering::SeqCst));
    drop(permuted);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the owner drops with the last view"
    );
}

#[test]
fn raw_host_pointers_with_an_owner_are_read_and_written_in_place() {
    let (q, k, v) = qkv();
    let want = owned_output(&q, &k, &v);
    let (owner, dropped) = watched(vec![0f32; B * S * H * D]);
    let ptr = owner.data.as_ptr() as *mut std::ffi::c_void;
    let bytes = owner.data.len() * 4;
    let keep: forge_attn::MemoryOwner = owner.clone();
    // SAFETY: `owner` keeps the Vec alive; nothing else touches it until the tensor drops.
    let mut out = unsafe {
        DeviceTensor::from_raw_host_mut(ptr, bytes, DType::F32, &[B, S, H, D], None, Some(keep))
    }
    .unwrap();
    // SAFETY: `q` outlives `qt`, which is dropped before the end of the test.
    let qt = unsafe {
        DeviceTensor::from_raw_host(
            q.as_ptr().cast(),
            q.len() * 4,
            DType::F32,
            &[B, S, H, D],
            None,
            None,
        )
    }
    .unwrap();
    let kt = cpu_f32(&k, &[B, S, HKV, D]);
    let vt = cpu_f32(&v, &[B, S, HKV, D]);
    CpuAttentionBackend::new()
        .forward_into(&config(), &qt, &kt, &vt, None, &mut out)
        .unwrap();
    drop((qt, out));
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the test still holds the owner"
    );
    assert_eq!(owner.data, want, "written through the pointer");
    drop(owner);
    assert!(dropped.load(Ordering::SeqCst));
}

#[test]
fn a_null_pointer_is_refused() {
    // SAFETY: refused before the pointer is used.
    let err = unsafe {
        DeviceTensor::from_raw_host(std::ptr::null(), 64, DType::F32, &[4, 4], None, None)
    }
    .unwrap_err();
    assert_eq!(
        err,
        AttentionError::InvalidMemory {
            what: "host memory".into(),
            expected: "a non-null pointer".into(),
            got: "null".into(),
        }
    );
}

#[test]
fn a_pointer_misaligned_for_the_dtype_is_refused() {
    let data = [0f32; 8];
    let odd = (data.as_ptr() as *const u8).wrapping_add(2) as *const std::ffi::c_void;
    for (dtype, ok) in [(DType::F32, false), (DType::I64, false), (DType::F16, true)] {
        // SAFETY: 24 bytes from `odd` lie inside `data`, alive for the whole test.
        let r = unsafe { DeviceTensor::from_raw_host(odd, 24, dtype, &[2], None, None) };
        match (r, ok) {
            (Ok(t), true) => assert_eq!(t.to_host::<half::f16>().unwrap().len(), 2),
            (Err(AttentionError::InvalidMemory { expected, got, .. }), false) => {
                let es = dtype.size_in_bytes();
                assert!(
                    expected.contains(&format!("aligned to {es} bytes")),
                    "{expected}"
                );
                assert_eq!(got, format!("{:#x}", odd as usize));
            }
            (r, _) => panic!("{dtype}: {r:?}"),
        }
    }
}

#[test]
fn sizes_and_strides_that_overflow_are_refused() {
    let data = [0f32; 4];
    let p = data.as_ptr().cast();
    // SAFETY (every call): refused before the pointer is used.
    let shape_overflow =
        unsafe { DeviceTensor::from_raw_host(p, 16, DType::F32, &[usize::MAX / 2, 4], None, None) };
    assert!(
        matches!(shape_overflow, Err(AttentionError::ShapeMismatch { .. })),
        "{shape_overflow:?}"
    );
    let stride_overflow = unsafe {
        DeviceTensor::from_raw_host(p, 16, DType::F32, &[2, 2], Some(&[usize::MAX / 2, 1]), None)
    };
    match stride_overflow {
        Err(AttentionError::ShapeMismatch { what, got, .. }) => {
            assert!(what.contains("strides"), "{what}");
            assert!(got.contains(&format!("{}", usize::MAX / 2)), "{got}");
        }
        other => panic!("{other:?}"),
    }
    // Past isize::MAX bytes without wrapping usize.
    let past_isize = unsafe {
        DeviceTensor::from_raw_host(
            p,
            16,
            DType::F32,
            &[2, 1],
            Some(&[isize::MAX as usize / 4, 1]),
            None,
        )
    };
    assert!(
        matches!(past_isize, Err(AttentionError::ShapeMismatch { .. })),
        "{past_isize:?}"
    );
    let rank5 =
        unsafe { DeviceTensor::from_raw_host(p, 16, DType::F32, &[1, 1, 1, 1, 4], None, None) };
    assert!(
        matches!(rank5, Err(AttentionError::ShapeMismatch { .. })),
        "{rank5:?}"
    );
    let wrong_rank =
        unsafe { DeviceTensor::from_raw_host(p, 16, DType::F32, &[2, 2], Some(&[2]), None) };
    match wrong_rank {
        Err(AttentionError::ShapeMismatch { expected, got, .. }) => {
            assert!(expected.contains("2 strides"), "{expected}");
            assert_eq!(got, "[2]");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn memory_shorter_than_the_strided_extent_is_refused() {
    let data = vec![0f32; 10];
    DeviceTensor::borrow_scope(|scope| {
        match scope.host(&data, &[4, 4], None) {
            Err(AttentionError::InvalidMemory { expected, got, .. }) => {
                assert!(expected.starts_with("at least 64 bytes"), "{expected}");
                assert_eq!(got, "40 bytes");
            }
            other => panic!("{other:?}"),
        }
        // Strides reach further than the element count: [2, 2] with row stride 9 needs
        // (1 * 9 + 1 * 1 + 1) = 11 elements.
        match scope.host(&data, &[2, 2], Some(&[9, 1])) {
            Err(AttentionError::InvalidMemory { expected, got, .. }) => {
                assert!(expected.starts_with("at least 44 bytes"), "{expected}");
                assert_eq!(got, "40 bytes");
            }
            other => panic!("{other:?}"),
        }
        // Exactly enough, and a broadcast (stride 0) view of fewer elements, are fine.
        scope.host(&data, &[2, 2], Some(&[8, 1])).unwrap();
        let b = scope.host(&data[..3], &[4, 3], Some(&[0, 1])).unwrap();
        assert_eq!(b.to_host::<f32>().unwrap().len(), 12);
        // An empty tensor needs no bytes.
        assert_eq!(scope.host(&data[..0], &[0, 4], None).unwrap().numel(), 0);
    });
}

#[test]
fn read_only_memory_is_never_written() {
    let (q, k, v) = qkv();
    let sentinel = vec![7f32; B * S * H * D];
    DeviceTensor::borrow_scope(|scope| {
        let qt = scope.host(&q, &[B, S, H, D], None).unwrap();
        let kt = scope.host(&k, &[B, S, HKV, D], None).unwrap();
        let vt = scope.host(&v, &[B, S, HKV, D], None).unwrap();
        let mut ro = scope.host(&sentinel, &[B, S, H, D], None).unwrap();
        let err = CpuAttentionBackend::new()
            .forward_into(&config(), &qt, &kt, &vt, None, &mut ro)
            .unwrap_err();
        assert!(
            matches!(&err, AttentionError::InvalidMemory { got, .. } if got.contains("read-only")),
            "{err}"
        );
        let err = ro.copy_from(&qt).unwrap_err();
        assert!(matches!(err, AttentionError::InvalidMemory { .. }), "{err}");
    });
    let (owner, _) = watched(vec![7f32; B * S * H * D]);
    let mut shared = DeviceTensor::from_host_shared(owner, &[B, S, H, D], None).unwrap();
    let src = cpu_f32(&q, &[B, S, H, D]);
    assert!(matches!(
        shared.copy_from(&src),
        Err(AttentionError::InvalidMemory { .. })
    ));
    assert_eq!(sentinel, vec![7f32; B * S * H * D]);
    assert_eq!(shared.to_host::<f32>().unwrap(), sentinel);
}

#[test]
fn tensors_escaping_their_scope_refuse_to_be_used() {
    let (q, k, v) = qkv();
    let mut out = vec![0f32; B * S * H * D];
    let (escaped_q, mut escaped_out) = DeviceTensor::borrow_scope(|scope| {
        let qt = scope.host(&q, &[B, S, H, D], None).unwrap();
        let ot = scope.host_mut(&mut out, &[B, S, H, D], None).unwrap();
        (qt.narrow(1, 0, S).unwrap(), ot.clone())
    });
    let ended = |e: &AttentionError| matches!(e, AttentionError::BorrowEnded { .. });
    let e = escaped_q.to_host::<f32>().unwrap_err();
    assert!(ended(&e), "{e}");
    let kt = cpu_f32(&k, &[B, S, HKV, D]);
    let vt = cpu_f32(&v, &[B, S, HKV, D]);
    let e = CpuAttentionBackend::new()
        .forward_into(&config(), &escaped_q, &kt, &vt, None, &mut escaped_out)
        .unwrap_err();
    assert!(ended(&e), "{e}");
    let e = escaped_out
        .copy_from(&cpu_f32(&q, &[B, S, H, D]))
        .unwrap_err();
    assert!(ended(&e), "{e}");
    drop((escaped_q, escaped_out));
    assert_eq!(
        out,
        vec![0f32; B * S * H * D],
        "nothing was written after the scope"
    );
}

#[test]
fn a_panicking_scope_still_ends_its_borrows() {
    let data = vec![1f32; 4];
    let escaped = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        DeviceTensor::borrow_scope(|scope| {
            *escaped.lock().unwrap() = Some(scope.host(&data, &[4], None).unwrap());
            panic!("inside the scope");
        })
    }));
    assert!(r.is_err());
    let t = escaped.lock().unwrap().take().unwrap();
    assert!(matches!(
        t.to_host::<f32>(),
        Err(AttentionError::BorrowEnded { .. })
    ));
}

#[test]
fn the_kv_cache_appends_borrowed_tokens() {
    let (q, k, v) = qkv();
    let (b, s, h, hkv, d) = (B, S, H, HKV, D);
    let run = |k_new: &DeviceTensor, v_new: &DeviceTensor, q: &DeviceTensor| -> Vec<f32> {
        let mut cache = KvCache::contiguous(
            spec(b, hkv, d, 8, DType::F32),
            KvCacheLayout::Contiguous,
            Device::Cpu,
        )
        .unwrap();
        cache.append(k_new, v_new).unwrap();
        let mut out = DeviceTensor::zeros(&[b, 1, h, d], DType::F32, Device::Cpu).unwrap();
        let config = AttentionConfig::new(h * d, h, 8).with_num_kv_heads(hkv);
        CpuAttentionBackend::new()
            .forward_cached(&config, q, &cache, &mut out)
            .unwrap();
        out.to_host().unwrap()
    };
    let q1 = &q[..b * h * d];
    let owned = run(
        &cpu_f32(&k, &[b, s, hkv, d]),
        &cpu_f32(&v, &[b, s, hkv, d]),
        &cpu_f32(q1, &[b, 1, h, d]),
    );
    let borrowed = DeviceTensor::borrow_scope(|scope| {
        run(
            &scope.host(&k, &[b, s, hkv, d], None).unwrap(),
            &scope.host(&v, &[b, s, hkv, d], None).unwrap(),
            &scope.host(q1, &[b, 1, h, d], None).unwrap(),
        )
    });
    assert_eq!(owned, borrowed);
}

#[test]
fn borrowed_host_tensors_are_used_from_several_threads() {
    let (q, k, v) = qkv();
    let want = owned_output(&q, &k, &v);
    let mut outs = vec![vec![0f32; want.len()]; 3];
    DeviceTensor::borrow_scope(|scope| {
        let qt = scope.host(&q, &[B, S, H, D], None).unwrap();
        let kt = scope.host(&k, &[B, S, HKV, D], None).unwrap();
        let vt = scope.host(&v, &[B, S, HKV, D], None).unwrap();
        let mut ots: Vec<DeviceTensor> = outs
            .iter_mut()
            .map(|o| scope.host_mut(o, &[B, S, H, D], None).unwrap())
            .collect();
        std::thread::scope(|ts| {
            for ot in ots.iter_mut() {
                let (qt, kt, vt) = (&qt, &kt, &vt);
                ts.spawn(move || {
                    CpuAttentionBackend::new()
                        .forward_into(&config(), qt, kt, vt, None, ot)
                        .unwrap();
                });
            }
        });
    });
    for o in &outs {
        assert_eq!(o, &want);
    }
}

#[test]
fn streams_belong_to_gpus() {
    assert!(matches!(
        GpuStream::default_for(Device::Cpu),
        Err(AttentionError::DeviceUnavailable { .. })
    ));
    // SAFETY: refused before the handle is used.
    let raw = unsafe { GpuStream::from_raw(Device::Cpu, std::ptr::null_mut()) };
    assert!(matches!(raw, Err(AttentionError::DeviceUnavailable { .. })));
    if !Device::best_available().is_gpu() {
        // Without a usable GPU a named stream cannot be made either.
        let raw = unsafe { GpuStream::from_raw(Device::Cuda(0), std::ptr::null_mut()) };
        assert!(raw.is_err());
    }
    // Owned tensors are not borrowed and have no stream on the CPU.
    let t = cpu_f32(&[1.0], &[1]);
    assert!(!t.is_borrowed());
    assert!(t.stream().is_none());
}
