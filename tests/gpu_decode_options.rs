//! Per-call options on the GPU's split-KV decode kernel (`forward_cached_with`): every
//! option alone and combined (window, softcap, ALiBi, sinks, GQA, the log-sum-exp output)
//! against the f64 reference, for 1, 3 and 16 queries, contiguous, paged (pages of 1, 7,
//! 16 and 256 tokens) and ragged caches, both kernel paths (register and shared memory),
//! split and unsplit caches, rows that keep no key, keys outside the window never read,
//! and refused calls leaving their outputs untouched. All need a GPU.

use forge_attn::reference::{
    attention_f64_with, attention_naive_in_dtype_with, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionOptions, AttentionPath, DType, Device,
    DeviceAttentionBackend, DeviceTensor, FlashKernel, GpuAttentionBackend, KvCache, KvCacheLayout,
};

mod common;
use common::{cpu_f32, gpu_backend, gpu_half_bound, spec, F32_BOUND};

const H: usize = 8;
const HKV: usize = 2;

/// ALiBi slopes and sink logits per query head (host values).
const SLOPES: [f32; H] = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.2];
const SINKS: [f32; H] = [0.3, -1.0, 2.0, 0.0, 1.5, -0.5, 4.0, 0.7];

/// The options of a test, built with their per-head tensors on `dev`.
#[derive(Clone, Copy, Debug)]
struct Opts {
    window: Option<(Option<usize>, Option<usize>)>,
    softcap: Option<f32>,
    alibi: bool,
    sinks: bool,
}

impl Opts {
    const PLAIN: Opts = Opts {
        window: None,
        softcap: None,
        alibi: false,
        sinks: false,
    };

    fn on(&self, dev: Device) -> AttentionOptions {
        let per_head = |v: &[f32]| DeviceTensor::from_host(v, &[H], dev).unwrap();
        let mut o = AttentionOptions::new();
        if let Some((l, r)) = self.window {
            o = o.with_window(l, r);
        }
        if let Some(c) = self.softcap {
            o = o.with_softcap(c);
        }
        if self.alibi {
            o = o.with_alibi_slopes(per_head(&SLOPES));
        }
        if self.sinks {
            o = o.with_sinks(per_head(&SINKS));
        }
        o
    }
}

/// Each option alone, a few windows, and everything combined.
fn option_sets() -> Vec<(&'static str, Opts)> {
    let p = Opts::PLAIN;
    vec![
        ("lse only", p),
        (
            "window 0/0",
            Opts {
                window: Some((Some(0), Some(0))),
                ..p
            },
        ),
        (
            "window left 40",
            Opts {
                window: Some((Some(40), None)),
                ..p
            },
        ),
        (
            "window right 1",
            Opts {
                window: Some((None, Some(1))),
                ..p
            },
        ),
        (
            "window 300/2",
            Opts {
                window: Some((Some(300), Some(2))),
                ..p
            },
        ),
        (
            "window beyond every sequence",
            Opts {
                window: Some((Some(1 << 40), Some(1 << 40))),
                ..p
            },
        ),
        (
            "softcap",
            Opts {
                softcap: Some(2.0),
                ..p
            },
        ),
        ("alibi", Opts { alibi: true, ..p }),
        ("sinks", Opts { sinks: true, ..p }),
        ("all", all()),
    ]
}

/// Window, softcap, ALiBi and sinks together.
fn all() -> Opts {
    Opts {
        window: Some((Some(100), Some(3))),
        softcap: Some(2.0),
        alibi: true,
        sinks: true,
    }
}

/// The caches a test runs on: contiguous (both layouts) and paged with `page_sizes`.
fn caches(
    dev: Device,
    dtype: DType,
    d: usize,
    cap: usize,
    batch: usize,
    page_sizes: &[usize],
) -> Vec<(String, KvCache)> {
    let s = spec(batch, HKV, d, cap, dtype);
    let mut v = vec![
        (
            "contiguous".to_string(),
            KvCache::contiguous(s, KvCacheLayout::Contiguous, dev).unwrap(),
        ),
        (
            "contiguous (flash layout)".to_string(),
            KvCache::contiguous(s, KvCacheLayout::FlashAttention, dev).unwrap(),
        ),
    ];
    for &ps in page_sizes {
        let pages = batch * cap.div_ceil(ps);
        v.push((
            format!("paged {ps}"),
            KvCache::paged(s, ps, pages, dev).unwrap(),
        ));
    }
    v
}

/// A `[b, n, heads, d]` tensor of seeded values on `dev`.
fn tokens(
    b: usize,
    n: usize,
    heads: usize,
    d: usize,
    dtype: DType,
    dev: Device,
    seed: u64,
) -> DeviceTensor {
    let host = random_values(b * n * heads * d, seed);
    DeviceTensor::from_f32(&host, &[b, n, heads, d], dtype, dev).unwrap()
}

/// One decode problem: `lens` keys per sequence, `sq` queries, head dim `d`.
struct Case {
    dtype: DType,
    d: usize,
    sq: usize,
    lens: Vec<usize>,
    causal: bool,
}

/// Runs `opts` on every cache of `page_sizes` for `case` and checks the output and the
/// log-sum-exp of every sequence against the f64 reference over its own length.
fn check_case(
    backend: &GpuAttentionBackend,
    dev: Device,
    case: &Case,
    sets: &[(&str, Opts)],
    page_sizes: &[usize],
) {
    let Case {
        dtype,
        d,
        sq,
        ref lens,
        causal,
    } = *case;
    let b = lens.len();
    let maxl = *lens.iter().max().unwrap();
    let cap = maxl + 8;
    // Scale 0.5 on values in [-1, 1): scores of a few units, so a softcap of 2 matters.
    let config = AttentionConfig::new(H * d, H, cap)
        .with_num_kv_heads(HKV)
        .with_causal(causal)
        .with_scale(0.5);
    let seed = (d * 31 + sq * 7 + maxl) as u64;
    let k = tokens(b, maxl, HKV, d, dtype, dev, seed);
    let v = tokens(b, maxl, HKV, d, dtype, dev, seed + 1);
    let q = tokens(b, sq, H, d, dtype, dev, seed + 2);
    for (cache_name, mut cache) in caches(dev, dtype, d, cap, b, page_sizes) {
        cache.append_ragged(&k, &v, lens).unwrap();
        for (name, opts) in sets {
            let what =
                format!("{dtype} d {d} sq {sq} causal {causal} lens {lens:?} {cache_name} {name}");
            let mut out =
                DeviceTensor::from_f32(&vec![f32::NAN; b * sq * H * d], q.shape(), dtype, dev)
                    .unwrap();
            let mut lse =
                DeviceTensor::from_f32(&vec![f32::NAN; b * H * sq], &[b, H, sq], DType::F32, dev)
                    .unwrap();
            // The reference checks the per-head tensors against q's device: the same ones.
            let call_opts = opts.on(dev);
            let path = backend
                .forward_cached_with(&config, &call_opts, &q, &cache, &mut out, Some(&mut lse))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(path, AttentionPath::Flash(FlashKernel::Decode), "{what}");
            let got = out.to_f32_vec().unwrap();
            let got_lse = lse.to_f32_vec().unwrap();
            let reference = &call_opts;
            let dh = H * d;
            for (bb, &len) in lens.iter().enumerate() {
                let g = &got[bb * sq * dh..(bb + 1) * sq * dh];
                let gl = &got_lse[bb * H * sq..(bb + 1) * H * sq];
                if len == 0 {
                    check_empty_sequence(g, gl, sq, opts.sinks, &what);
                    continue;
                }
                let kb = k.narrow(0, bb, 1).unwrap().narrow(1, 0, len).unwrap();
                let vb = v.narrow(0, bb, 1).unwrap().narrow(1, 0, len).unwrap();
                let qb = q.narrow(0, bb, 1).unwrap();
                let (want, want_lse) =
                    attention_f64_with(&config, reference, &qb, &kb, &vb, None).unwrap();
                let err = relative_l2_error(g, &want);
                let bound = match dtype {
                    DType::F32 => F32_BOUND,
                    _ => {
                        let naive =
                            attention_naive_in_dtype_with(&config, reference, &qb, &kb, &vb, None)
                                .unwrap();
                        gpu_half_bound(relative_l2_error(&naive, &want))
                    }
                };
                assert!(
                    err <= bound,
                    "{what}: sequence {bb} (len {len}): err {err:.3e} > {bound:.1e}"
                );
                check_lse(gl, &want_lse, &format!("{what}: sequence {bb} (len {len})"));
            }
        }
    }
}

/// Log-sum-exps agree to f32 accuracy (the scores are exact products of the stored
/// values in every dtype); `-inf` exactly where the reference has it.
fn check_lse(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if *w == f64::NEG_INFINITY {
            assert_eq!(*g, f32::NEG_INFINITY, "{what}: lse row {i}");
        } else {
            assert!(
                (*g as f64 - w).abs() <= 2e-4 * w.abs().max(1.0),
                "{what}: lse row {i}: {g} vs {w}"
            );
        }
    }
}

/// A sequence holding no key: zeros, and the sink (or `-inf`) as its log-sum-exp.
fn check_empty_sequence(out: &[f32], lse: &[f32], sq: usize, sinks: bool, what: &str) {
    assert!(
        out.iter().all(|&x| x == 0.0),
        "{what}: empty sequence output"
    );
    for hh in 0..H {
        for i in 0..sq {
            let g = lse[hh * sq + i];
            if sinks {
                assert!(
                    (g - SINKS[hh]).abs() < 1e-5,
                    "{what}: lse {g} vs sink {}",
                    SINKS[hh]
                );
            } else {
                assert_eq!(g, f32::NEG_INFINITY, "{what}");
            }
        }
    }
}

/// Every option alone and combined, 1, 3 and 16 queries, every dtype, on the register
/// path (head dim 128), over ragged contiguous and paged caches: a sequence of one key,
/// short ones and a long one (split into several chunks, merged in the kernel).
#[test]
#[ignore = "needs a GPU"]
fn every_option_alone_and_combined_matches_the_reference() {
    let (dev, backend) = gpu_backend();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for sq in [1, 3, 16] {
            for causal in [true, false] {
                let case = Case {
                    dtype,
                    d: 128,
                    sq,
                    lens: vec![1, 37, 2500],
                    causal,
                };
                check_case(&backend, dev, &case, &option_sets(), &[16]);
            }
        }
    }
}

/// The shared-memory path (head dim 96, and 80 in f32) with its separate split merge
/// (`flash_decode_combine_opt_*`), every option, split (long) and unsplit (short) caches.
#[test]
#[ignore = "needs a GPU"]
fn every_option_on_the_shared_memory_path_matches_the_reference() {
    let (dev, backend) = gpu_backend();
    for (dtype, d) in [(DType::F32, 80), (DType::F16, 96), (DType::BF16, 96)] {
        for sq in [1, 3, 16] {
            for lens in [vec![1, 3000], vec![20, 5]] {
                let case = Case {
                    dtype,
                    d,
                    sq,
                    lens,
                    causal: true,
                };
                check_case(&backend, dev, &case, &option_sets(), &[7]);
            }
        }
    }
}

/// Everything combined over pages of 1, 7, 16 and 256 tokens, on both paths.
#[test]
#[ignore = "needs a GPU"]
fn combined_options_on_every_page_size_match_the_reference() {
    let (dev, backend) = gpu_backend();
    for (dtype, d) in [(DType::BF16, 128), (DType::F16, 96), (DType::F32, 64)] {
        for sq in [1, 3, 16] {
            let case = Case {
                dtype,
                d,
                sq,
                lens: vec![700, 1, 300, 1100],
                causal: true,
            };
            check_case(&backend, dev, &case, &[("all", all())], &[1, 7, 16, 256]);
        }
    }
}

/// Rows that keep no key: a window entirely outside a short sequence (16 queries on one
/// key: the first queries' diagonals lie before the sequence), and a sequence holding
/// nothing next to others. Zeros, `-inf` log-sum-exps, or the sink with sinks.
#[test]
#[ignore = "needs a GPU"]
fn rows_that_keep_no_key_give_zeros_and_the_sink() {
    let (dev, backend) = gpu_backend();
    let outside = Opts {
        window: Some((Some(0), Some(0))),
        ..Opts::PLAIN
    };
    let outside_sinks = Opts {
        sinks: true,
        ..outside
    };
    let sets = [
        ("window outside", outside),
        ("window outside, sinks", outside_sinks),
        (
            "sinks",
            Opts {
                sinks: true,
                ..Opts::PLAIN
            },
        ),
        ("all", all()),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for d in [128, 96] {
            for causal in [false, true] {
                for lens in [vec![1], vec![1, 0, 2], vec![0, 50]] {
                    let case = Case {
                        dtype,
                        d,
                        sq: 16,
                        lens,
                        causal,
                    };
                    check_case(&backend, dev, &case, &sets, &[7]);
                }
            }
        }
    }
}

/// Keys outside every query's window are never read: V rows there hold NaN (a read one
/// would turn the output NaN, as the unwindowed call shows), yet the windowed call over a
/// long cache matches the reference over the window's keys alone.
#[test]
#[ignore = "needs a GPU"]
fn keys_outside_the_window_are_never_read() {
    let (dev, backend) = gpu_backend();
    for (dtype, d) in [(DType::BF16, 128), (DType::F16, 96), (DType::F32, 128)] {
        for sq in [1, 4] {
            let (len, left) = (5000usize, 200usize);
            let first = len - sq - left;
            let config = AttentionConfig::new(H * d, H, len)
                .with_num_kv_heads(HKV)
                .with_causal(true)
                .with_scale(0.5);
            let k = tokens(1, len, HKV, d, dtype, dev, 7);
            let mut vh = random_values(len * HKV * d, 8);
            for x in &mut vh[..first * HKV * d] {
                *x = f32::NAN;
            }
            let v = DeviceTensor::from_f32(&vh, &[1, len, HKV, d], dtype, dev).unwrap();
            let q = tokens(1, sq, H, d, dtype, dev, 9);
            for (cache_name, mut cache) in caches(dev, dtype, d, len, 1, &[16]) {
                cache.append(&k, &v).unwrap();
                let what = format!("{dtype} d {d} sq {sq} {cache_name}");
                let mut out = DeviceTensor::zeros(q.shape(), dtype, dev).unwrap();
                backend
                    .forward_cached(&config, &q, &cache, &mut out)
                    .unwrap();
                assert!(
                    out.to_f32_vec().unwrap().iter().any(|x| x.is_nan()),
                    "{what}: the unwindowed call reads the NaN rows"
                );
                let opts = Opts {
                    window: Some((Some(left), Some(0))),
                    ..Opts::PLAIN
                };
                let mut lse = DeviceTensor::zeros(&[1, H, sq], DType::F32, dev).unwrap();
                backend
                    .forward_cached_with(
                        &config,
                        &opts.on(dev),
                        &q,
                        &cache,
                        &mut out,
                        Some(&mut lse),
                    )
                    .unwrap();
                let got = out.to_f32_vec().unwrap();
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "{what}: a key outside the window was read"
                );
                let kw = k.narrow(1, first, len - first).unwrap();
                let vw = v.narrow(1, first, len - first).unwrap();
                // The window's keys alone, with the same window on them.
                let (want, want_lse) =
                    attention_f64_with(&config, &opts.on(dev), &q, &kw, &vw, None).unwrap();
                let bound = if dtype == DType::F32 { F32_BOUND } else { 1e-2 };
                let err = relative_l2_error(&got, &want);
                assert!(err <= bound, "{what}: err {err:.3e}");
                check_lse(&lse.to_f32_vec().unwrap(), &want_lse, &what);
            }
        }
    }
}

/// The log-sum-exp goes through any strides that give every element its own address:
/// here a `[B, Sq, H]` buffer viewed as `[B, H, Sq]`.
#[test]
#[ignore = "needs a GPU"]
fn the_lse_output_takes_any_strides() {
    let (dev, backend) = gpu_backend();
    let (b, sq, d, lens) = (2, 3, 128, vec![900, 40]);
    let config = AttentionConfig::new(H * d, H, 1024)
        .with_num_kv_heads(HKV)
        .with_causal(true);
    let k = tokens(b, 900, HKV, d, DType::F16, dev, 1);
    let v = tokens(b, 900, HKV, d, DType::F16, dev, 2);
    let q = tokens(b, sq, H, d, DType::F16, dev, 3);
    let mut cache = KvCache::paged(spec(b, HKV, d, 1024, DType::F16), 16, 128, dev).unwrap();
    cache.append_ragged(&k, &v, &lens).unwrap();
    let opts = all().on(dev);
    let mut out = DeviceTensor::zeros(q.shape(), DType::F16, dev).unwrap();
    let mut dense = DeviceTensor::zeros(&[b, H, sq], DType::F32, dev).unwrap();
    backend
        .forward_cached_with(&config, &opts, &q, &cache, &mut out, Some(&mut dense))
        .unwrap();
    let storage =
        DeviceTensor::from_f32(&vec![f32::NAN; b * sq * H], &[b, sq, H], DType::F32, dev).unwrap();
    let mut view = storage.permute(&[0, 2, 1]).unwrap();
    let mut out2 = DeviceTensor::zeros(q.shape(), DType::F16, dev).unwrap();
    backend
        .forward_cached_with(&config, &opts, &q, &cache, &mut out2, Some(&mut view))
        .unwrap();
    let (want, got) = (dense.to_f32_vec().unwrap(), storage.to_f32_vec().unwrap());
    for bb in 0..b {
        for hh in 0..H {
            for i in 0..sq {
                assert_eq!(
                    got[(bb * sq + i) * H + hh],
                    want[(bb * H + hh) * sq + i],
                    "({bb}, {hh}, {i})"
                );
            }
        }
    }
    assert_eq!(out.to_f32_vec().unwrap(), out2.to_f32_vec().unwrap());
}

/// Plain options without `lse` run `forward_cached` itself: the same bits.
#[test]
#[ignore = "needs a GPU"]
fn plain_options_run_forward_cached() {
    let (dev, backend) = gpu_backend();
    let (b, sq, d) = (2, 3, 128);
    let config = AttentionConfig::new(H * d, H, 4096)
        .with_num_kv_heads(HKV)
        .with_causal(true);
    let k = tokens(b, 3000, HKV, d, DType::BF16, dev, 1);
    let v = tokens(b, 3000, HKV, d, DType::BF16, dev, 2);
    let q = tokens(b, sq, H, d, DType::BF16, dev, 3);
    let mut cache = KvCache::paged(spec(b, HKV, d, 4096, DType::BF16), 16, 512, dev).unwrap();
    cache.append_ragged(&k, &v, &[3000, 17]).unwrap();
    let mut a = DeviceTensor::zeros(q.shape(), DType::BF16, dev).unwrap();
    let mut c = DeviceTensor::zeros(q.shape(), DType::BF16, dev).unwrap();
    backend.forward_cached(&config, &q, &cache, &mut a).unwrap();
    backend
        .forward_cached_with(&config, &AttentionOptions::new(), &q, &cache, &mut c, None)
        .unwrap();
    assert_eq!(a.to_f32_vec().unwrap(), c.to_f32_vec().unwrap());
    // A window wider than every sequence gives the plain result (to rounding).
    let mut w = DeviceTensor::zeros(q.shape(), DType::BF16, dev).unwrap();
    let wide = AttentionOptions::new().with_window(Some(1 << 20), None);
    backend
        .forward_cached_with(&config, &wide, &q, &cache, &mut w, None)
        .unwrap();
    let (x, y) = (a.to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
    let diff = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-2, "{diff}");
}

/// Every refusal is typed, says what was wrong, and writes neither output.
#[test]
#[ignore = "needs a GPU"]
fn refused_calls_write_nothing() {
    let (dev, backend) = gpu_backend();
    let (b, sq, d) = (2, 3, 64);
    let config = AttentionConfig::new(H * d, H, 64).with_num_kv_heads(HKV);
    let k = tokens(b, 20, HKV, d, DType::F16, dev, 1);
    let mut cache = KvCache::contiguous(
        spec(b, HKV, d, 64, DType::F16),
        KvCacheLayout::Contiguous,
        dev,
    )
    .unwrap();
    cache.append(&k, &k).unwrap();
    let q = tokens(b, sq, H, d, DType::F16, dev, 3);
    let sentinel = |shape: &[usize], dtype| {
        let n = shape.iter().product();
        DeviceTensor::from_f32(&vec![5.0; n], shape, dtype, dev).unwrap()
    };
    let untouched = |t: &DeviceTensor| t.to_f32_vec().unwrap().iter().all(|&x| x == 5.0);
    let on_gpu = |v: &[f32]| DeviceTensor::from_host(v, &[v.len()], dev).unwrap();
    let cases: Vec<(AttentionOptions, Vec<usize>, &str)> = vec![
        (
            AttentionOptions::new().with_softcap(0.0),
            vec![b, H, sq],
            "softcap",
        ),
        (
            AttentionOptions::new().with_window(Some(forge_attn::MAX_WINDOW + 1), None),
            vec![b, H, sq],
            "window_left",
        ),
        (
            AttentionOptions::new().with_alibi_slopes(on_gpu(&[0.5; H - 1])),
            vec![b, H, sq],
            "alibi_slopes",
        ),
        (
            AttentionOptions::new().with_sinks(cpu_f32(&SINKS, &[H])),
            vec![b, H, sq],
            "sinks",
        ),
        (
            AttentionOptions::new().with_softcap(3.0),
            vec![b, sq, H],
            "lse",
        ),
    ];
    for (opts, lse_shape, what) in cases {
        let mut out = sentinel(q.shape(), DType::F16);
        let mut lse = sentinel(&lse_shape, DType::F32);
        let e = backend
            .forward_cached_with(&config, &opts, &q, &cache, &mut out, Some(&mut lse))
            .unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
        assert!(untouched(&out) && untouched(&lse), "{what}: written");
    }
    // More queries than the decode kernel takes.
    let q17 = tokens(b, 17, H, d, DType::F16, dev, 4);
    let mut out = sentinel(q17.shape(), DType::F16);
    let mut lse = sentinel(&[b, H, 17], DType::F32);
    let e = backend
        .forward_cached_with(
            &config,
            &AttentionOptions::new().with_softcap(3.0),
            &q17,
            &cache,
            &mut out,
            Some(&mut lse),
        )
        .unwrap_err();
    assert!(matches!(e, AttentionError::NotSupported { .. }), "{e}");
    assert!(untouched(&out) && untouched(&lse));
    // An lse of the wrong dtype.
    let mut out = sentinel(q.shape(), DType::F16);
    let mut bad = sentinel(&[b, H, sq], DType::F16);
    let e = backend
        .forward_cached_with(
            &config,
            &AttentionOptions::new(),
            &q,
            &cache,
            &mut out,
            Some(&mut bad),
        )
        .unwrap_err();
    assert!(matches!(e, AttentionError::DTypeMismatch { .. }), "{e}");
    assert!(untouched(&out) && untouched(&bad));
}
