//! The host side of queuing a decode call (ignored without a GPU): once the kernels are
//! loaded and the workspaces made, `forward_cached` allocates nothing on the host, and
//! `decode_split` reports the cut the call launches, a recording's included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use forge_attn::reference::random_values;
use forge_attn::{
    AttentionConfig, DType, Device, DeviceTensor, GpuAttentionBackend, KvCache, KvCacheLayout,
    KvCacheSpec,
};

/// The system allocator, counting this thread's allocations.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: allocations during thread teardown find the counter gone.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Host allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

/// The device while no other test of this binary uses it (a recording takes in what any
/// thread queues on the device's stream).
fn gpu() -> (Device, std::sync::MutexGuard<'static, ()>) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Device::best_available();
    assert!(d.is_gpu(), "needs a GPU");
    (d, guard)
}

const H: usize = 8;
const HKV: usize = 2;

/// A `batch`-sequence cache of `len` tokens each (contiguous or pages of 16) with room for
/// `capacity`, its query and output.
fn decode_call(
    dev: Device,
    dtype: DType,
    d: usize,
    batch: usize,
    len: usize,
    capacity: usize,
    paged: bool,
) -> (AttentionConfig, DeviceTensor, KvCache, DeviceTensor) {
    let spec = KvCacheSpec {
        batch,
        num_kv_heads: HKV,
        head_dim: d,
        capacity,
        dtype,
    };
    let mut cache = if paged {
        KvCache::paged(spec, 16, batch * capacity.div_ceil(16), dev).unwrap()
    } else {
        KvCache::contiguous(spec, KvCacheLayout::FlashAttention, dev).unwrap()
    };
    let n = batch * len * HKV * d;
    let rows = |seed| {
        DeviceTensor::from_f32(&random_values(n, seed), &[batch, len, HKV, d], dtype, dev).unwrap()
    };
    cache.append(&rows(1), &rows(2)).unwrap();
    let q = DeviceTensor::from_f32(
        &random_values(batch * H * d, 3),
        &[batch, 1, H, d],
        dtype,
        dev,
    )
    .unwrap();
    let out = DeviceTensor::zeros(&[batch, 1, H, d], dtype, dev).unwrap();
    let config = AttentionConfig::new(H * d, H, capacity).with_num_kv_heads(HKV);
    (config, q, cache, out)
}

/// After a first call (kernel loads, workspaces, the name table), further calls of the
/// same shapes allocate nothing on the host: the register path (bf16, D = 128, splits
/// merged in the kernel) and the shared-memory path with its separate merge launch (f32,
/// D = 160), contiguous and paged, one and several splits.
#[test]
#[ignore = "needs a GPU"]
fn a_warm_decode_call_allocates_nothing_on_the_host() {
    let (dev, _one) = gpu();
    let backend = GpuAttentionBackend::new(dev).unwrap();
    for (dtype, d) in [(DType::BF16, 128), (DType::F32, 160)] {
        for paged in [false, true] {
            for len in [64, 4000] {
                let (config, q, cache, mut out) = decode_call(dev, dtype, d, 2, len, 4096, paged);
                backend
                    .forward_cached(&config, &q, &cache, &mut out)
                    .unwrap();
                let splits = backend
                    .decode_split(&config, &q, &cache, &out)
                    .unwrap()
                    .num_splits;
                let n = allocations(|| {
                    for _ in 0..8 {
                        backend
                            .forward_cached(&config, &q, &cache, &mut out)
                            .unwrap();
                    }
                });
                assert_eq!(
                    n, 0,
                    "{dtype} D={d} paged={paged} L={len} ({splits} splits): {n} host allocations in 8 warm calls"
                );
                dev.synchronize().unwrap();
            }
        }
    }
}

/// `decode_split` reports the cut `forward_cached` launches: the cache's length outside a
/// recording, its capacity inside one (a replay may see the cache grown to it).
#[test]
#[ignore = "needs a GPU"]
fn decode_split_reports_the_recorded_cut_while_capturing() {
    let (dev, _one) = gpu();
    let backend = GpuAttentionBackend::new(dev).unwrap();
    let (config, q, cache, mut out) = decode_call(dev, DType::BF16, 128, 1, 100, 32768, false);
    backend
        .forward_cached(&config, &q, &cache, &mut out)
        .unwrap();
    let direct = backend.decode_split(&config, &q, &cache, &out).unwrap();
    assert!(direct.num_splits * direct.split_keys >= 100);
    let mut recorded = None;
    let graph = dev
        .capture_graph(|| {
            recorded = Some(backend.decode_split(&config, &q, &cache, &out)?);
            backend.forward_cached(&config, &q, &cache, &mut out)?;
            Ok(())
        })
        .unwrap();
    let recorded = recorded.unwrap();
    // Cut for 32768 keys: more chunks than 100 keys get, covering the whole capacity.
    assert!(
        recorded.num_splits * recorded.split_keys >= 32768,
        "{recorded:?}"
    );
    assert!(
        recorded.num_splits > direct.num_splits,
        "{recorded:?} vs {direct:?}"
    );
    // Outside the recording again: the length's cut.
    assert_eq!(
        backend.decode_split(&config, &q, &cache, &out).unwrap(),
        direct
    );
    graph.launch().unwrap();
    dev.synchronize().unwrap();
}
