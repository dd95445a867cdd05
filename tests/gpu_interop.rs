//! Attention on memory and streams that the caller owns (NVIDIA GPUs, through cudarc): memory
//! allocated by cudarc directly and wrapped without a copy, a stream created by the test,
//! two threads on two streams at once, and a graph the test captures on its own stream.
//! Every result is checked against the CPU backend on the same values.
#![cfg(feature = "cuda")]

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, AttentionError, AttentionPath, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, FlashKernel, GpuAttentionBackend, GpuStream, KvCache,
    KvCacheLayout, KvCacheSpec,
};

/// The test's own context and a new stream on it (device 0's primary context, as
/// forge-attn's).
fn test_stream() -> (Arc<CudaContext>, Arc<CudaStream>) {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let stream = ctx.new_stream().expect("a stream");
    (ctx, stream)
}

/// The CPU backend's output for `q`, `k`, `v` (f32 values, shapes `[b, s, h, d]`).
fn cpu_reference(
    config: &AttentionConfig,
    q: (&[f32], [usize; 4]),
    k: (&[f32], [usize; 4]),
    v: (&[f32], [usize; 4]),
    dtype: DType,
) -> Vec<f32> {
    let t = |(data, shape): (&[f32], [usize; 4])| {
        DeviceTensor::from_f32(data, &shape, dtype, Device::Cpu).unwrap()
    };
    let (q, k, v) = (t(q), t(k), t(v));
    let mut out = DeviceTensor::zeros(q.shape(), dtype, Device::Cpu).unwrap();
    CpuAttentionBackend::new()
        .forward_into(config, &q, &k, &v, None, &mut out)
        .unwrap();
    out.to_f32_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 3e-2,
    }
}

/// `data` rounded to bf16, as raw bits (cudarc is built without its `f16` feature here).
fn bf16_bits(data: &[f32]) -> Vec<u16> {
    data.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// A tensor over a cudarc slice through the raw constructor (no owner: the slice outlives
/// the tensor in every test).
///
/// # Safety
/// `slice` outlives the tensor and the work queued on it.
unsafe fn raw_tensor<T>(
    slice: &CudaSlice<T>,
    dtype: DType,
    shape: &[usize],
    stream: &GpuStream,
) -> DeviceTensor {
    let (ptr, _sync) = slice.device_ptr(slice.stream());
    let bytes = slice.len() * std::mem::size_of::<T>();
    unsafe { DeviceTensor::from_raw_device(ptr, bytes, dtype, shape, None, stream, None) }.unwrap()
}

#[test]
#[ignore = "needs a GPU"]
fn cudarc_memory_is_attended_in_place_on_the_test_stream() {
    let (_ctx, stream) = test_stream();
    let gs = GpuStream::from_cudarc(&stream).unwrap();
    assert!(!gs.is_default());
    assert_eq!(gs.device(), Device::Cuda(0));
    let backend = GpuAttentionBackend::on_stream(&gs).unwrap();
    assert!(backend.stream().same_stream(&gs));
    let (b, h, hkv, d) = (2, 8, 2, 128);
    // Prefill (causal, 64 queries) and decode (one query against 1024 keys).
    for (sq, sk) in [(64, 64), (1, 1024)] {
        let config = AttentionConfig::new(h * d, h, sk)
            .with_num_kv_heads(hkv)
            .with_causal(true);
        let qh = random_values(b * sq * h * d, 11);
        let kh = random_values(b * sk * hkv * d, 12);
        let vh = random_values(b * sk * hkv * d, 13);
        let want = cpu_reference(
            &config,
            (&qh, [b, sq, h, d]),
            (&kh, [b, sk, hkv, d]),
            (&vh, [b, sk, hkv, d]),
            DType::F32,
        );
        let q = stream.clone_htod(&qh).unwrap();
        let k = stream.clone_htod(&kh).unwrap();
        let v = stream.clone_htod(&vh).unwrap();
        let mut out = stream.alloc_zeros::<f32>(b * sq * h * d).unwrap();
        let want_path = backend.plan_for_config(&config, DType::F32, sq, false).path;
        if sq == 1 {
            assert_eq!(want_path, AttentionPath::Flash(FlashKernel::Decode));
        }
        let path = DeviceTensor::borrow_scope(|scope| {
            let qt = scope.cuda(&q, &[b, sq, h, d], None).unwrap();
            let kt = scope.cuda(&k, &[b, sk, hkv, d], None).unwrap();
            let vt = scope.cuda(&v, &[b, sk, hkv, d], None).unwrap();
            let mut ot = scope.cuda_mut(&mut out, &[b, sq, h, d], None).unwrap();
            assert!(qt.is_borrowed() && ot.is_borrowed());
            backend
                .forward_into(&config, &qt, &kt, &vt, None, &mut ot)
                .unwrap()
        });
        assert_eq!(path, want_path, "sq {sq} sk {sk}");
        let got = stream.clone_dtoh(&out).unwrap();
        let err = max_diff(&got, &want);
        assert!(err < tolerance(DType::F32), "sq {sq} sk {sk}: {err}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn bf16_through_raw_pointers_on_the_test_stream() {
    let (_ctx, stream) = test_stream();
    // The raw handle, as an engine holding only a CUstream would pass it.
    // SAFETY: the stream outlives everything made with `gs` in this test.
    let gs =
        unsafe { GpuStream::from_raw(Device::Cuda(0), stream.cu_stream() as *mut c_void) }.unwrap();
    let backend = GpuAttentionBackend::on_stream(&gs).unwrap();
    let (b, h, hkv, d) = (1, 4, 4, 64);
    for (sq, sk) in [(32, 32), (1, 300)] {
        let config = AttentionConfig::new(h * d, h, sk).with_num_kv_heads(hkv);
        let qh = random_values(b * sq * h * d, 21);
        let kh = random_values(b * sk * hkv * d, 22);
        let vh = random_values(b * sk * hkv * d, 23);
        let want = cpu_reference(
            &config,
            (&qh, [b, sq, h, d]),
            (&kh, [b, sk, hkv, d]),
            (&vh, [b, sk, hkv, d]),
            DType::BF16,
        );
        let q = stream.clone_htod(&bf16_bits(&qh)).unwrap();
        let k = stream.clone_htod(&bf16_bits(&kh)).unwrap();
        let v = stream.clone_htod(&bf16_bits(&vh)).unwrap();
        let out = stream.alloc_zeros::<u16>(b * sq * h * d).unwrap();
        // SAFETY: the slices outlive the tensors, which drop before the slices.
        let (qt, kt, vt, mut ot) = unsafe {
            (
                raw_tensor(&q, DType::BF16, &[b, sq, h, d], &gs),
                raw_tensor(&k, DType::BF16, &[b, sk, hkv, d], &gs),
                raw_tensor(&v, DType::BF16, &[b, sk, hkv, d], &gs),
                raw_tensor(&out, DType::BF16, &[b, sq, h, d], &gs),
            )
        };
        backend
            .forward_into(&config, &qt, &kt, &vt, None, &mut ot)
            .unwrap();
        // The tensor's own download runs on its stream, after the attention.
        let through_tensor = ot.to_f32_vec().unwrap();
        drop((qt, kt, vt, ot));
        let bits = stream.clone_dtoh(&out).unwrap();
        let got: Vec<f32> = bits
            .iter()
            .map(|&x| half::bf16::from_bits(x).to_f32())
            .collect();
        assert_eq!(got, through_tensor);
        let err = max_diff(&got, &want);
        assert!(err < tolerance(DType::BF16), "sq {sq} sk {sk}: {err}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn a_slice_handed_over_lives_as_long_as_its_tensors() {
    let (_ctx, stream) = test_stream();
    let data: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let slice = stream.clone_htod(&data).unwrap();
    let t = DeviceTensor::from_cuda_slice(slice, &[4, 16], None).unwrap();
    let view = t.narrow(0, 2, 2).unwrap().permute(&[1, 0]).unwrap();
    drop(t);
    // The view still reads the slice (freed by cudarc only when the view drops).
    let got = view.to_host::<f32>().unwrap();
    assert_eq!(got[..2], [32.0, 48.0]);
    assert!(view.stream().is_some_and(|s| !s.is_default()));
}

#[test]
#[ignore = "needs a GPU"]
fn device_pointers_that_cannot_hold_the_tensor_are_refused() {
    let (_ctx, stream) = test_stream();
    let gs = GpuStream::from_cudarc(&stream).unwrap();
    let slice = stream.alloc_zeros::<f32>(256).unwrap();
    let (ptr, _sync) = slice.device_ptr(&stream);
    let invalid = |r: forge_attn::Result<DeviceTensor>| match r {
        Err(AttentionError::InvalidMemory { expected, got, .. }) => (expected, got),
        other => panic!("expected InvalidMemory, got {other:?}"),
    };
    // SAFETY (every call): each is refused before the memory is used.
    unsafe {
        // Misaligned for f32.
        let (e, _) = invalid(DeviceTensor::from_raw_device(
            ptr + 2,
            1000,
            DType::F32,
            &[16],
            None,
            &gs,
            None,
        ));
        assert!(e.contains("aligned to 4"), "{e}");
        // A length claimed past the allocation (4 KiB, claimed 64 MiB): the driver's range
        // of the allocation catches it. Allocated with cuMemAlloc, whose range is the
        // allocation itself.
        let small = cudarc::driver::result::malloc_sync(4096).unwrap();
        let claimed = 64 << 20;
        let (e, g) = invalid(DeviceTensor::from_raw_device(
            small,
            claimed,
            DType::F32,
            &[claimed / 4],
            None,
            &gs,
            None,
        ));
        cudarc::driver::result::free_sync(small).unwrap();
        assert!(e.contains("inside one allocation"), "{e}");
        assert!(g.contains("in an allocation of"), "{g}");
        // Host memory is not device memory.
        let host = [0f32; 16];
        let (e, _) = invalid(DeviceTensor::from_raw_device(
            host.as_ptr() as u64,
            64,
            DType::F32,
            &[16],
            None,
            &gs,
            None,
        ));
        assert!(e.contains("device memory of cuda:0"), "{e}");
        // Memory of another device, where there is one.
        if CudaContext::device_count().unwrap_or(1) > 1 {
            let other = CudaContext::new(1).unwrap().new_stream().unwrap();
            let far = other.alloc_zeros::<f32>(16).unwrap();
            let (far_ptr, _s) = far.device_ptr(&other);
            let (e, g) = invalid(DeviceTensor::from_raw_device(
                far_ptr,
                64,
                DType::F32,
                &[16],
                None,
                &gs,
                None,
            ));
            assert_eq!(e, "memory on cuda:0");
            assert!(g.ends_with("memory on cuda:1"), "{g}");
        }
        // Null.
        let (_, g) = invalid(DeviceTensor::from_raw_device(
            0,
            64,
            DType::F32,
            &[16],
            None,
            &gs,
            None,
        ));
        assert_eq!(g, "null");
        // Shorter than the strides reach.
        let (e, _) = invalid(DeviceTensor::from_raw_device(
            ptr,
            512,
            DType::F32,
            &[2, 16],
            Some(&[200, 1]),
            &gs,
            None,
        ));
        assert!(e.starts_with("at least 864 bytes"), "{e}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn two_threads_on_two_streams_at_once() {
    let ctx = CudaContext::new(0).unwrap();
    let (b, h, hkv, d, sk) = (4, 16, 4, 128, 2048);
    let config = AttentionConfig::new(h * d, h, sk).with_num_kv_heads(hkv);
    std::thread::scope(|ts| {
        for seed in [100u64, 200] {
            let ctx = ctx.clone();
            let config = config.clone();
            ts.spawn(move || {
                let stream = ctx.new_stream().unwrap();
                let gs = GpuStream::from_cudarc(&stream).unwrap();
                let backend = GpuAttentionBackend::on_stream(&gs).unwrap();
                let qh = random_values(b * h * d, seed);
                let kh = random_values(b * sk * hkv * d, seed + 1);
                let vh = random_values(b * sk * hkv * d, seed + 2);
                let want = cpu_reference(
                    &config,
                    (&qh, [b, 1, h, d]),
                    (&kh, [b, sk, hkv, d]),
                    (&vh, [b, sk, hkv, d]),
                    DType::F32,
                );
                let q = stream.clone_htod(&qh).unwrap();
                let k = stream.clone_htod(&kh).unwrap();
                let v = stream.clone_htod(&vh).unwrap();
                let mut out = stream.alloc_zeros::<f32>(b * h * d).unwrap();
                DeviceTensor::borrow_scope(|scope| {
                    let qt = scope.cuda(&q, &[b, 1, h, d], None).unwrap();
                    let kt = scope.cuda(&k, &[b, sk, hkv, d], None).unwrap();
                    let vt = scope.cuda(&v, &[b, sk, hkv, d], None).unwrap();
                    let mut ot = scope.cuda_mut(&mut out, &[b, 1, h, d], None).unwrap();
                    // Many launches queued back to back, interleaved with the other thread's.
                    for _ in 0..50 {
                        backend
                            .forward_into(&config, &qt, &kt, &vt, None, &mut ot)
                            .unwrap();
                    }
                });
                let got = stream.clone_dtoh(&out).unwrap();
                let err = max_diff(&got, &want);
                assert!(err < tolerance(DType::F32), "seed {seed}: {err}");
            });
        }
    });
}

#[test]
#[ignore = "needs a GPU"]
fn a_graph_captured_on_the_test_stream_replays_a_decode_step_on_new_data() {
    let (_ctx, stream) = test_stream();
    let gs = GpuStream::from_cudarc(&stream).unwrap();
    let backend = GpuAttentionBackend::on_stream(&gs).unwrap();
    let (b, h, hkv, d, sk) = (2, 8, 2, 128, 4096);
    let config = AttentionConfig::new(h * d, h, sk).with_num_kv_heads(hkv);
    let n_q = b * h * d;
    let n_kv = b * sk * hkv * d;
    let mut q = stream.alloc_zeros::<f32>(n_q).unwrap();
    let mut k = stream.alloc_zeros::<f32>(n_kv).unwrap();
    let mut v = stream.alloc_zeros::<f32>(n_kv).unwrap();
    let out = stream.alloc_zeros::<f32>(n_q).unwrap();
    // SAFETY: the slices outlive the tensors and the graph's replays (all synchronized
    // before the end of the test).
    let (qt, kt, vt, mut ot) = unsafe {
        (
            raw_tensor(&q, DType::F32, &[b, 1, h, d], &gs),
            raw_tensor(&k, DType::F32, &[b, sk, hkv, d], &gs),
            raw_tensor(&v, DType::F32, &[b, sk, hkv, d], &gs),
            raw_tensor(&out, DType::F32, &[b, 1, h, d], &gs),
        )
    };
    // The workspace and kernels made before capturing, with nothing computed.
    backend
        .reserve(&config, &qt, &kt, &vt, None, &mut ot)
        .unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    assert!(gs.is_capturing());
    let recorded = backend.forward_into(&config, &qt, &kt, &vt, None, &mut ot);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph with the decode step");
    assert_eq!(recorded.unwrap(), AttentionPath::Flash(FlashKernel::Decode));
    assert!(!gs.is_capturing());
    for seed in [1u64, 2, 3] {
        let qh = random_values(n_q, seed * 10);
        let kh = random_values(n_kv, seed * 10 + 1);
        let vh = random_values(n_kv, seed * 10 + 2);
        stream.memcpy_htod(&qh, &mut q).unwrap();
        stream.memcpy_htod(&kh, &mut k).unwrap();
        stream.memcpy_htod(&vh, &mut v).unwrap();
        graph.launch().unwrap();
        let got = stream.clone_dtoh(&out).unwrap();
        let want = cpu_reference(
            &config,
            (&qh, [b, 1, h, d]),
            (&kh, [b, sk, hkv, d]),
            (&vh, [b, sk, hkv, d]),
            DType::F32,
        );
        let err = max_diff(&got, &want);
        assert!(err < tolerance(DType::F32), "replay {seed}: {err}");
    }
    stream.synchronize().unwrap();
    drop(graph);
    drop((qt, kt, vt, ot));
}

#[test]
#[ignore = "needs a GPU"]
fn a_graph_captured_on_the_test_stream_replays_over_a_growing_cache() {
    let (_ctx, stream) = test_stream();
    let gs = GpuStream::from_cudarc(&stream).unwrap();
    let backend = GpuAttentionBackend::on_stream(&gs).unwrap();
    let (b, h, hkv, d, cap, prompt) = (2, 8, 2, 128, 1024, 200);
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: hkv,
        head_dim: d,
        capacity: cap,
        dtype: DType::F32,
    };
    let config = AttentionConfig::new(h * d, h, cap).with_num_kv_heads(hkv);
    let mut cache = KvCache::contiguous_on(spec, KvCacheLayout::Contiguous, &gs).unwrap();
    let mut cpu_cache = KvCache::contiguous(spec, KvCacheLayout::Contiguous, Device::Cpu).unwrap();
    let append = |cache: &mut KvCache, cpu: &mut KvCache, n: usize, seed: u64| {
        let kh = random_values(b * n * hkv * d, seed);
        let vh = random_values(b * n * hkv * d, seed + 1);
        let shape = [b, n, hkv, d];
        cache
            .append(
                &DeviceTensor::from_host_on(&kh, &shape, &gs).unwrap(),
                &DeviceTensor::from_host_on(&vh, &shape, &gs).unwrap(),
            )
            .unwrap();
        cpu.append(
            &DeviceTensor::from_host(&kh, &shape, Device::Cpu).unwrap(),
            &DeviceTensor::from_host(&vh, &shape, Device::Cpu).unwrap(),
        )
        .unwrap();
    };
    append(&mut cache, &mut cpu_cache, prompt, 5);
    let qh = random_values(b * h * d, 6);
    let q = DeviceTensor::from_host_on(&qh, &[b, 1, h, d], &gs).unwrap();
    let q_cpu = DeviceTensor::from_host(&qh, &[b, 1, h, d], Device::Cpu).unwrap();
    let mut out = DeviceTensor::zeros_on(&[b, 1, h, d], DType::F32, &gs).unwrap();
    let one = DeviceTensor::zeros_on(&[b, 1, hkv, d], DType::F32, &gs).unwrap();
    backend
        .reserve_cached(&config, &q, &cache, &mut out)
        .unwrap();
    let lengths = cache.lengths().to_vec();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let recorded = backend.forward_cached(&config, &q, &cache, &mut out);
    // Appending while the stream is captured is refused (the host-side lengths would not
    // follow the replays), without breaking the capture.
    let refused_append = cache.append(&one, &one);
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph with the decode step");
    recorded.unwrap();
    assert!(
        matches!(refused_append, Err(AttentionError::GraphCapture { .. })),
        "{refused_append:?}"
    );
    assert_eq!(cache.lengths(), lengths, "a refused append changes nothing");
    for step in 0..4u64 {
        append(
            &mut cache,
            &mut cpu_cache,
            1 + step as usize * 37,
            50 + step * 2,
        );
        graph.launch().unwrap();
        let got = out.to_host::<f32>().unwrap();
        let mut want = DeviceTensor::zeros(&[b, 1, h, d], DType::F32, Device::Cpu).unwrap();
        CpuAttentionBackend::new()
            .forward_cached(&config, &q_cpu, &cpu_cache, &mut want)
            .unwrap();
        let err = max_diff(&got, &want.to_host::<f32>().unwrap());
        assert!(err < tolerance(DType::F32), "step {step}: {err}");
    }
    stream.synchronize().unwrap();
}

#[test]
#[ignore = "needs a GPU"]
fn a_call_that_would_allocate_during_capture_is_refused_and_the_capture_survives() {
    let (_ctx, stream) = test_stream();
    let gs = GpuStream::from_cudarc(&stream).unwrap();
    // The unfused path always needs a score workspace; a new backend has none yet.
    let backend = GpuAttentionBackend::on_stream(&gs)
        .unwrap()
        .with_flash(false);
    let (b, s, h, d) = (1, 64, 4, 64);
    let config = AttentionConfig::new(h * d, h, s);
    let data = random_values(b * s * h * d, 9);
    let q = stream.clone_htod(&data).unwrap();
    let mut out = stream.alloc_zeros::<f32>(b * s * h * d).unwrap();
    // SAFETY: the slices outlive the tensors.
    let (qt, mut ot) = unsafe {
        (
            raw_tensor(&q, DType::F32, &[b, s, h, d], &gs),
            raw_tensor(&out, DType::F32, &[b, s, h, d], &gs),
        )
    };
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let refused = backend.forward_into(&config, &qt, &qt, &qt, None, &mut ot);
    // Allocating a tensor on the captured stream is refused the same way.
    let alloc = DeviceTensor::zeros_on(&[16], DType::F32, &gs);
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    if let Err(e) = ended {
        panic!("the capture must not be broken: {e:?}");
    }
    match refused {
        Err(AttentionError::GraphCapture { device, op, .. }) => {
            assert_eq!(device, "cuda:0");
            assert!(op.contains("workspace"), "{op}");
        }
        other => panic!("expected GraphCapture, got {other:?}"),
    }
    assert!(
        matches!(alloc, Err(AttentionError::GraphCapture { .. })),
        "{alloc:?}"
    );
    // Outside the capture the same call runs, and then records with no allocation.
    let want = cpu_reference(
        &config,
        (&data, [b, s, h, d]),
        (&data, [b, s, h, d]),
        (&data, [b, s, h, d]),
        DType::F32,
    );
    assert_eq!(
        backend
            .forward_into(&config, &qt, &qt, &qt, None, &mut ot)
            .unwrap(),
        AttentionPath::Traditional
    );
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let recorded = backend.forward_into(&config, &qt, &qt, &qt, None, &mut ot);
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap();
    recorded.unwrap();
    // Cleared first, so the values read back are the replay's.
    stream.memset_zeros(&mut out).unwrap();
    graph.expect("a graph").launch().unwrap();
    let got = stream.clone_dtoh(&out).unwrap();
    let err = max_diff(&got, &want);
    assert!(err < tolerance(DType::F32), "{err}");
    drop((qt, ot));
}
