//! `DeviceAttentionBackend::forward_cached`: the CPU backend over contiguous, paged and
//! ragged caches against the f64 reference on each sequence's own K/V; its refusals; the
//! trait's default on a backend without cached attention of its own; and (ignored without
//! one) the GPU backend through the trait against the CPU.

use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionPath, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, GpuAttentionBackend, KvCache, KvCacheLayout, KvCacheSpec,
    Layout,
};

mod common;
use common::{cpu_half_bound, dtype_bound, gpu, Forward, F32_BOUND, HALF_CEILING};

/// How a cache stores its tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    Contiguous,
    Paged(usize),
}

#[derive(Debug, Clone)]
struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Tokens of each sequence (the batch is its length).
    lens: Vec<usize>,
    seq_q: usize,
    causal: bool,
    dtype: DType,
    layout: Layout,
    storage: Storage,
    seed: u64,
}

impl Case {
    fn batch(&self) -> usize {
        self.lens.len()
    }

    fn config(&self) -> AttentionConfig {
        let max = self.lens.iter().copied().max().unwrap_or(1).max(1);
        AttentionConfig::new(self.heads * self.head_dim, self.heads, max)
            .with_num_kv_heads(self.kv_heads)
            .with_causal(self.causal)
            .with_layout(self.layout)
    }

    fn q_shape(&self, batch: usize) -> [usize; 4] {
        let (s, h, d) = (self.seq_q, self.heads, self.head_dim);
        match self.layout {
            Layout::Bshd => [batch, s, h, d],
            Layout::Bhsd => [batch, h, s, d],
            other => unimplemented!("layout {other:?}"),
        }
    }
}

/// A cache holding `case.lens` tokens per sequence, appended in two ragged steps (so a
/// paged cache's pages interleave between sequences), and each sequence's K and V as the
/// f32 values the cache holds (`[L, Hkv, D]` row-major).
struct Filled {
    cache: KvCache,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn fill(case: &Case, dev: Device) -> Filled {
    fill_with(case, dev, |_, _, _, _| None)
}

/// As [`fill`], with `poison(b, j, is_v, x)` replacing element `x` of token `j` of sequence
/// `b` in the cache (not in the returned clean copies) where it gives a value.
fn fill_with(
    case: &Case,
    dev: Device,
    poison: impl Fn(usize, usize, bool, usize) -> Option<f32>,
) -> Filled {
    let (b, hkv, d) = (case.batch(), case.kv_heads, case.head_dim);
    let capacity = case.lens.iter().copied().max().unwrap_or(0).max(1) + 3;
    let spec = KvCacheSpec {
        batch: b,
        num_kv_heads: hkv,
        head_dim: d,
        capacity,
        dtype: case.dtype,
    };
    let mut cache = match case.storage {
        Storage::Contiguous => KvCache::contiguous(spec, KvCacheLayout::Contiguous, dev).unwrap(),
        Storage::Paged(ps) => KvCache::paged(spec, ps, b * capacity.div_ceil(ps), dev).unwrap(),
    };
    let row = hkv * d;
    let round = |x: &[f32]| {
        DeviceTensor::from_f32(x, &[x.len()], case.dtype, Device::Cpu)
            .unwrap()
            .to_f32_vec()
            .unwrap()
    };
    let (mut ks, mut vs) = (vec![Vec::new(); b], vec![Vec::new(); b]);
    let first: Vec<usize> = case.lens.iter().map(|&l| (l / 2 + l % 3).min(l)).collect();
    let second: Vec<usize> = first.iter().zip(&case.lens).map(|(&c, &l)| l - c).collect();
    for (step, counts) in [first, second].into_iter().enumerate() {
        let n = counts.iter().copied().max().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let seed = case.seed * 100 + step as u64 * 10;
        let mut kh = round(&random_values(b * n * row, seed + 1));
        let mut vh = round(&random_values(b * n * row, seed + 2));
        let (kclean, vclean) = (kh.clone(), vh.clone());
        for bb in 0..b {
            for t in 0..counts[bb] {
                let j = ks[bb].len() / row + t;
                for x in 0..row {
                    let at = (bb * n + t) * row + x;
                    if let Some(p) = poison(bb, j, false, x) {
                        kh[at] = p;
                    }
                    if let Some(p) = poison(bb, j, true, x) {
                        vh[at] = p;
                    }
                }
            }
        }
        let t = |x: &[f32]| DeviceTensor::from_f32(x, &[b, n, hkv, d], case.dtype, dev).unwrap();
        cache.append_ragged(&t(&kh), &t(&vh), &counts).unwrap();
        for bb in 0..b {
            let rows = (bb * n * row)..((bb * n + counts[bb]) * row);
            ks[bb].extend_from_slice(&kclean[rows.clone()]);
            vs[bb].extend_from_slice(&vclean[rows]);
        }
    }
    assert_eq!(cache.lengths(), &case.lens[..]);
    Filled {
        cache,
        k: ks,
        v: vs,
    }
}

fn q_tensor(case: &Case, dev: Device) -> DeviceTensor {
    let shape = case.q_shape(case.batch());
    let n = shape.iter().product();
    DeviceTensor::from_f32(
        &random_values(n, case.seed * 7 + 5),
        &shape,
        case.dtype,
        dev,
    )
    .unwrap()
}

/// The f64 reference and the naive in-dtype computation, sequence by sequence over each
/// one's own K/V, concatenated in the output's order.
fn reference(case: &Case, q: &DeviceTensor, f: &Filled) -> (Vec<f64>, Vec<f32>) {
    let (hkv, d) = (case.kv_heads, case.head_dim);
    let per_seq: usize = case.q_shape(1).iter().product();
    let mut config = case.config();
    config.batch_size = 1;
    let (mut want, mut naive) = (Vec::new(), Vec::new());
    for (b, &len) in case.lens.iter().enumerate() {
        if len == 0 {
            // No key: the rows are zeros by contract.
            want.extend(std::iter::repeat_n(0.0, per_seq));
            naive.extend(std::iter::repeat_n(0.0, per_seq));
            continue;
        }
        let kv = |x: &[f32]| {
            let t = DeviceTensor::from_f32(x, &[1, len, hkv, d], case.dtype, Device::Cpu).unwrap();
            match case.layout {
                Layout::Bshd => t,
                Layout::Bhsd => t.permute(&[0, 2, 1, 3]).unwrap(),
                other => unimplemented!("layout {other:?}"),
            }
        };
        let (k, v) = (kv(&f.k[b]), kv(&f.v[b]));
        let qb = q.narrow(0, b, 1).unwrap();
        want.extend(attention_f64(&config, &qb, &k, &v, None).unwrap());
        if case.dtype != DType::F32 {
            naive.extend(attention_naive_in_dtype(&config, &qb, &k, &v, None).unwrap());
        }
    }
    (want, naive)
}

/// Runs `case` through the CPU backend's `forward_cached` and checks it against the
/// reference; returns the error.
fn check(case: &Case) -> f64 {
    let f = fill(case, Device::Cpu);
    let q = q_tensor(case, Device::Cpu);
    let shape = case.q_shape(case.batch());
    let nan = vec![f32::NAN; shape.iter().product()];
    let mut out = DeviceTensor::from_f32(&nan, &shape, case.dtype, Device::Cpu).unwrap();
    let backend: Box<dyn DeviceAttentionBackend> = Box::new(CpuAttentionBackend::new());
    let path = backend
        .forward_cached(&case.config(), &q, &f.cache, &mut out)
        .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    assert_eq!(path, AttentionPath::Cpu);
    let got = out.to_f32_vec().unwrap();
    let unwritten = got.iter().filter(|x| x.is_nan()).count();
    assert_eq!(unwritten, 0, "{case:?}: {unwritten} outputs not written");
    let (want, naive) = reference(case, &q, &f);
    let err = relative_l2_error(&got, &want);
    match case.dtype {
        DType::F32 => assert!(err < F32_BOUND, "{case:?}: relative L2 error {err:e}"),
        _ => {
            let naive_err = relative_l2_error(&naive, &want);
            let bound = cpu_half_bound(naive_err);
            assert!(
                err <= bound && err < HALF_CEILING,
                "{case:?}: relative L2 error {err:e}, naive {naive_err:e}"
            );
        }
    }
    err
}

const STORAGES: [Storage; 4] = [
    Storage::Contiguous,
    Storage::Paged(1),
    Storage::Paged(3),
    Storage::Paged(16),
];

/// (heads, kv heads): group sizes 1, 2, 4, 8 and MQA.
const HEADS: [(usize, usize); 5] = [(3, 3), (4, 2), (8, 2), (16, 2), (5, 1)];

#[test]
fn every_storage_length_query_count_and_group_agrees_with_the_reference() {
    let lens: [&[usize]; 3] = [&[37, 37], &[1, 70, 0, 23], &[5]];
    let mut seed = 1;
    for storage in STORAGES {
        for lens in lens {
            for seq_q in [1, 7, 40] {
                for (heads, kv_heads) in HEADS {
                    for causal in [false, true] {
                        seed += 1;
                        check(&Case {
                            heads,
                            kv_heads,
                            head_dim: 40,
                            lens: lens.to_vec(),
                            seq_q,
                            causal,
                            dtype: [DType::F32, DType::F16, DType::BF16][seed as usize % 3],
                            layout: [Layout::Bshd, Layout::Bhsd][seed as usize / 3 % 2],
                            storage,
                            seed,
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn every_dtype_and_layout() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for layout in [Layout::Bshd, Layout::Bhsd] {
            for storage in [Storage::Contiguous, Storage::Paged(3)] {
                for (seq_q, causal) in [(1, true), (7, true), (7, false), (40, true)] {
                    check(&Case {
                        heads: 8,
                        kv_heads: 2,
                        head_dim: 64,
                        lens: vec![90, 13, 64],
                        seq_q,
                        causal,
                        dtype,
                        layout,
                        storage,
                        seed: 3,
                    });
                }
            }
        }
    }
}

/// A pool of many threads makes the backend cut each task's keys into ranges, merged
/// afterwards: the same results, ragged and paged, with sequences whose last ranges (or all
/// of them) hold no key.
#[test]
fn key_ranges_merged_agree_with_the_reference() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(48)
        .build()
        .unwrap();
    pool.install(|| {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (storage, layout) in [
                (Storage::Contiguous, Layout::Bshd),
                (Storage::Paged(3), Layout::Bhsd),
                (Storage::Paged(16), Layout::Bshd),
            ] {
                for (seq_q, causal) in [(1, false), (5, true), (40, true)] {
                    check(&Case {
                        heads: 8,
                        kv_heads: 2,
                        head_dim: 32,
                        lens: vec![2100, 0, 700, 1500],
                        seq_q,
                        causal,
                        dtype,
                        layout,
                        storage,
                        seed: 11,
                    });
                }
            }
        }
    });
}

/// f32 at 20k keys stays within the contract's 1e-5, with the keys of one sequence split
/// into ranges (one sequence, two kv heads: too few tasks for the threads otherwise).
#[test]
fn long_cache_f32_within_contract() {
    for storage in [Storage::Contiguous, Storage::Paged(16)] {
        for (seq_q, causal) in [(1, false), (3, true)] {
            let err = check(&Case {
                heads: 8,
                kv_heads: 2,
                head_dim: 64,
                lens: vec![20_000],
                seq_q,
                causal,
                dtype: DType::F32,
                layout: Layout::Bshd,
                storage,
                seed: 17,
            });
            assert!(err < F32_BOUND, "{storage:?} {seq_q}: {err:e}");
        }
    }
}

/// NaN and inf at the last cached key reach only the query that sees it (causal): every
/// other row is the clean result, with and without key ranges.
#[test]
fn poison_at_a_causally_removed_key_reaches_only_the_row_that_keeps_it() {
    for threads in [1, 48] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let case = Case {
                heads: 4,
                kv_heads: 1,
                head_dim: 16,
                lens: vec![1200],
                seq_q: 4,
                causal: true,
                dtype: DType::F32,
                layout: Layout::Bshd,
                storage: Storage::Paged(7),
                seed: 23,
            };
            let last = case.lens[0] - 1;
            let f = fill_with(&case, Device::Cpu, |_, j, is_v, x| {
                (j == last).then_some(if is_v {
                    f32::NAN
                } else {
                    [f32::INFINITY, 1.0][x % 2]
                })
            });
            let q = q_tensor(&case, Device::Cpu);
            let mut out = DeviceTensor::zeros(&case.q_shape(1), case.dtype, Device::Cpu).unwrap();
            CpuAttentionBackend::new()
                .forward_cached(&case.config(), &q, &f.cache, &mut out)
                .unwrap();
            let got = out.to_f32_vec().unwrap();
            let (want, _) = reference(&case, &q, &f);
            let row = case.heads * case.head_dim;
            let (clean, last_row) = got.split_at(3 * row);
            let err = relative_l2_error(clean, &want[..3 * row]);
            assert!(err < F32_BOUND, "{threads} threads: {err:e}");
            assert!(last_row.iter().all(|x| x.is_nan()), "{threads} threads");
        });
    }
}

/// A small cache and its call operands for the refusal tests.
fn small() -> (Case, Filled, DeviceTensor) {
    let case = Case {
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        lens: vec![9, 4],
        seq_q: 2,
        causal: true,
        dtype: DType::F32,
        layout: Layout::Bshd,
        storage: Storage::Paged(4),
        seed: 5,
    };
    let f = fill(&case, Device::Cpu);
    let q = q_tensor(&case, Device::Cpu);
    (case, f, q)
}

/// Runs a call that must fail and checks that `out` (filled with 7) is unchanged.
fn refused(
    backend: &dyn DeviceAttentionBackend,
    config: &AttentionConfig,
    q: &DeviceTensor,
    cache: &KvCache,
    out: &mut DeviceTensor,
) -> AttentionError {
    let before = out.to_f32_vec().unwrap();
    let err = backend.forward_cached(config, q, cache, out).unwrap_err();
    assert_eq!(out.to_f32_vec().unwrap(), before, "{err}: out changed");
    err
}

fn sevens(shape: &[usize], dtype: DType) -> DeviceTensor {
    let n = shape.iter().product();
    DeviceTensor::from_f32(&vec![7.0; n], shape, dtype, Device::Cpu).unwrap()
}

#[test]
fn refusals_are_typed_and_change_nothing() {
    let cpu = CpuAttentionBackend::new();
    let (case, f, q) = small();
    let config = case.config();
    let shape = case.q_shape(2);
    let mut out = sevens(&shape, DType::F32);

    // Shapes: q batch, q heads, kv heads and head_dim against the cache, out's shape.
    let q3 = DeviceTensor::zeros(&[3, 2, 4, 16], DType::F32, Device::Cpu).unwrap();
    let e = refused(&cpu, &config, &q3, &f.cache, &mut out);
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { .. }) && e.to_string().contains('3'),
        "{e}"
    );
    let q_heads = DeviceTensor::zeros(&[2, 2, 8, 16], DType::F32, Device::Cpu).unwrap();
    let e = refused(&cpu, &config, &q_heads, &f.cache, &mut out);
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    let e = refused(
        &cpu,
        &config.clone().with_num_kv_heads(4),
        &q,
        &f.cache,
        &mut out,
    );
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    let e = refused(
        &cpu,
        &config.clone().with_num_kv_heads(1),
        &q,
        &f.cache,
        &mut out,
    );
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    let other_dim = AttentionConfig::new(4 * 8, 4, 16).with_num_kv_heads(2);
    let q8 = DeviceTensor::zeros(&[2, 2, 4, 8], DType::F32, Device::Cpu).unwrap();
    let mut out8 = sevens(&[2, 2, 4, 8], DType::F32);
    let e = refused(&cpu, &other_dim, &q8, &f.cache, &mut out8);
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    let mut short = sevens(&[2, 1, 4, 16], DType::F32);
    let e = refused(&cpu, &config, &q, &f.cache, &mut short);
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    // A rank-3 q.
    let flat = q.reshape(&[2, 2, 64]).unwrap();
    let e = refused(&cpu, &config, &flat, &f.cache, &mut out);
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");

    // Dtypes: q against the cache, out against q.
    let q16 = DeviceTensor::zeros(&shape, DType::F16, Device::Cpu).unwrap();
    let mut out16 = sevens(&shape, DType::F16);
    let e = refused(&cpu, &config, &q16, &f.cache, &mut out16);
    assert!(matches!(e, AttentionError::DTypeMismatch { .. }), "{e}");
    let e = refused(&cpu, &config, &q, &f.cache, &mut out16);
    assert!(matches!(e, AttentionError::DTypeMismatch { .. }), "{e}");

    // An invalid config.
    let e = refused(
        &cpu,
        &config.clone().with_num_kv_heads(3),
        &q,
        &f.cache,
        &mut out,
    );
    assert!(matches!(e, AttentionError::InvalidConfig { .. }), "{e}");

    // An output that overlaps q, and one that repeats elements.
    let q_before = q.to_f32_vec().unwrap();
    let mut alias = q.narrow(0, 0, 2).unwrap();
    let e = refused(&cpu, &config, &q, &f.cache, &mut alias);
    assert!(matches!(e, AttentionError::UnsupportedLayout { .. }), "{e}");
    assert_eq!(q.to_f32_vec().unwrap(), q_before);
    let mut repeated = sevens(&[2, 2, 1, 16], DType::F32)
        .broadcast_dim(2, 4)
        .unwrap();
    let e = refused(&cpu, &config, &q, &f.cache, &mut repeated);
    assert!(matches!(e, AttentionError::UnsupportedLayout { .. }), "{e}");

    // An empty cache, contiguous and paged.
    for storage in [Storage::Contiguous, Storage::Paged(4)] {
        let empty = Case {
            lens: vec![0, 0],
            storage,
            ..case.clone()
        };
        let fe = fill(&empty, Device::Cpu);
        let e = refused(&cpu, &config, &q, &fe.cache, &mut out);
        assert!(
            matches!(&e, AttentionError::ShapeMismatch { .. }) && e.to_string().contains("empty"),
            "{e}"
        );
    }

    // The cache itself is untouched by every refusal: a valid call still agrees.
    assert_eq!(f.cache.lengths(), &[9, 4]);
    check(&case);
}

#[test]
fn trait_default_takes_dense_views_and_refuses_the_rest() {
    // A backend with no cached attention of its own: only `forward_into` (the CPU's).
    let dense = Forward {
        inner: Box::new(CpuAttentionBackend::new()),
        name: Some("dense-only"),
    };
    for layout in [Layout::Bshd, Layout::Bhsd] {
        for causal in [false, true] {
            let case = Case {
                heads: 8,
                kv_heads: 2,
                head_dim: 32,
                lens: vec![50, 50],
                seq_q: 3,
                causal,
                dtype: DType::F32,
                layout,
                storage: Storage::Contiguous,
                seed: 31,
            };
            let f = fill(&case, Device::Cpu);
            let q = q_tensor(&case, Device::Cpu);
            let mut out = sevens(&case.q_shape(2), DType::F32);
            let path = dense
                .forward_cached(&case.config(), &q, &f.cache, &mut out)
                .unwrap();
            assert_eq!(path, AttentionPath::Cpu);
            let (want, _) = reference(&case, &q, &f);
            let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
            assert!(err < F32_BOUND, "{layout:?} {causal}: {err:e}");
        }
    }
    // Paged, and ragged contiguous: no dense view, NotSupported naming the backend and why.
    for (storage, lens) in [
        (Storage::Paged(4), vec![9, 9]),
        (Storage::Contiguous, vec![9, 4]),
    ] {
        let case = Case {
            lens,
            storage,
            ..small().0
        };
        let f = fill(&case, Device::Cpu);
        let q = q_tensor(&case, Device::Cpu);
        let mut out = sevens(&case.q_shape(2), DType::F32);
        let e = refused(&dense, &case.config(), &q, &f.cache, &mut out);
        let AttentionError::NotSupported { backend, reason } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(backend, "dense-only");
        assert!(
            reason.contains(if storage == Storage::Contiguous {
                "equal"
            } else {
                "paged"
            }),
            "{reason}"
        );
        // The CPU backend itself attends over the same cache.
        check(&case);
    }
}

/// The GPU backend through the trait over a paged, ragged cache agrees with the CPU
/// backend over the same tokens; the CPU backend refuses the GPU's tensors.
#[test]
#[ignore = "needs a GPU"]
fn gpu_through_the_trait_agrees_with_the_cpu_on_a_paged_ragged_cache() {
    let dev = gpu();
    assert!(dev.is_gpu(), "no GPU");
    let gpu_backend: Box<dyn DeviceAttentionBackend> =
        Box::new(GpuAttentionBackend::new(dev).unwrap());
    let cpu: Box<dyn DeviceAttentionBackend> = Box::new(CpuAttentionBackend::new());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for seq_q in [1, 4] {
            let case = Case {
                heads: 8,
                kv_heads: 2,
                head_dim: 128,
                lens: vec![300, 17, 0, 1030],
                seq_q,
                causal: true,
                dtype,
                layout: Layout::Bshd,
                storage: Storage::Paged(16),
                seed: 41,
            };
            let (fg, fc) = (fill(&case, dev), fill(&case, Device::Cpu));
            let (qg, qc) = (q_tensor(&case, dev), q_tensor(&case, Device::Cpu));
            let shape = case.q_shape(case.batch());
            let mut og = DeviceTensor::zeros(&shape, dtype, dev).unwrap();
            let mut oc = DeviceTensor::zeros(&shape, dtype, Device::Cpu).unwrap();
            gpu_backend
                .forward_cached(&case.config(), &qg, &fg.cache, &mut og)
                .unwrap();
            cpu.forward_cached(&case.config(), &qc, &fc.cache, &mut oc)
                .unwrap();
            let want: Vec<f64> = oc.to_f32_vec().unwrap().iter().map(|&x| x as f64).collect();
            let err = relative_l2_error(&og.to_f32_vec().unwrap(), &want);
            let tol = dtype_bound(dtype);
            assert!(err < tol, "{dtype} sq {seq_q}: {err:e}");
            // The CPU backend refuses a cache and query on the GPU, changing nothing.
            let mut ocpu = sevens(&shape, dtype);
            let e = refused(cpu.as_ref(), &case.config(), &qc, &fg.cache, &mut ocpu);
            assert!(matches!(e, AttentionError::DeviceMismatch { .. }), "{e}");
            let e = cpu
                .forward_cached(&case.config(), &qg, &fg.cache, &mut og)
                .unwrap_err();
            assert!(matches!(e, AttentionError::DeviceMismatch { .. }), "{e}");
        }
    }
}
