//! Per-call options (window, softcap, ALiBi, sinks), the log-sum-exp output and packed
//! ragged batches on the GPU's flash kernels, against the f64 reference: every option
//! alone and combined, with GQA, causal or not, seq_q above and below seq_k, several key
//! tiles with windows that skip some, an additive mask, on every implementation (wgmma,
//! mma.sync, TF32, SIMT and the split SIMT kernel of unaligned inputs); refusals leave the
//! outputs untouched. CPU-only machines run the decision tests at the end.

use forge_attn::backend::gpu::PlanInput;
use forge_attn::reference::{
    attention_f64_with, attention_naive_in_dtype_with, relative_l2_error, varlen_attention_f64,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionOptions, AttentionPath, DType, Device,
    DeviceAttentionBackend, DeviceTensor, FlashImpl, FlashKernel, GpuAttentionBackend, Layout,
    VarlenBatch,
};

mod common;
use common::{cpu_f32, gpu_half_bound, options_on_host, per_head, random_tensor, F32_BOUND};

const H: usize = 4;
const HKV: usize = 2;

/// TF32's relative L2 bound (as tests/gpu_backend.rs).
const TF32_BOUND: f64 = 2e-3;

fn config(d: usize, causal: bool, layout: Layout) -> AttentionConfig {
    AttentionConfig::new(H * d, H, 1 << 16)
        .with_num_kv_heads(HKV)
        .with_causal(causal)
        .with_layout(layout)
        .with_scale(0.5 / (d as f32 / 16.0).sqrt())
}

/// Each option alone, pairs, and all together; window sizes around the 64- and 128-key
/// tiles so that some tiles are skipped whole and others cut.
fn option_sets(dev: Device) -> Vec<(&'static str, AttentionOptions)> {
    let slopes = || per_head(&[0.5, 0.25, 0.125, 0.0625], dev);
    let sinks = || per_head(&[0.3, -1.0, 2.0, 0.0], dev);
    vec![
        ("lse only", AttentionOptions::new()),
        (
            "window 0/0",
            AttentionOptions::new().with_window(Some(0), Some(0)),
        ),
        (
            "window left 9",
            AttentionOptions::new().with_window(Some(9), None),
        ),
        (
            "window left 200",
            AttentionOptions::new().with_window(Some(200), Some(0)),
        ),
        (
            "window right 70",
            AttentionOptions::new().with_window(None, Some(70)),
        ),
        (
            "window 70/3",
            AttentionOptions::new().with_window(Some(70), Some(3)),
        ),
        (
            "window past every key",
            AttentionOptions::new().with_window(Some(forge_attn::MAX_WINDOW), Some(1 << 40)),
        ),
        ("softcap", AttentionOptions::new().with_softcap(2.0)),
        ("alibi", AttentionOptions::new().with_alibi_slopes(slopes())),
        ("sinks", AttentionOptions::new().with_sinks(sinks())),
        (
            "softcap + sinks",
            AttentionOptions::new()
                .with_softcap(3.0)
                .with_sinks(sinks()),
        ),
        (
            "all",
            AttentionOptions::new()
                .with_window(Some(150), Some(5))
                .with_softcap(2.0)
                .with_alibi_slopes(slopes())
                .with_sinks(sinks()),
        ),
    ]
}

/// A GPU copy of a CPU tensor (same values, same dtype, contiguous).
fn to_gpu(t: &DeviceTensor, dev: Device) -> DeviceTensor {
    DeviceTensor::from_f32(&t.to_f32_vec().unwrap(), t.shape(), t.dtype(), dev).unwrap()
}

/// A GPU tensor of `shape` holding `t`'s values in a buffer whose last dim is padded by 4
/// elements: rows no longer 16-byte aligned for 16-bit types, so the host picks the split
/// SIMT kernel.
fn unaligned_gpu(t: &DeviceTensor, dev: Device) -> DeviceTensor {
    let sh = t.shape().to_vec();
    let d = sh[3];
    let vals = t.to_f32_vec().unwrap();
    let mut padded = Vec::with_capacity(vals.len() / d * (d + 4));
    for row in vals.chunks(d) {
        padded.extend_from_slice(row);
        padded.extend_from_slice(&[7.0; 4]);
    }
    let mut psh = sh.clone();
    psh[3] = d + 4;
    DeviceTensor::from_f32(&padded, &psh, t.dtype(), dev)
        .unwrap()
        .narrow(3, 0, d)
        .unwrap()
}

/// One implementation the dense cases run on.
#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    d: usize,
    tf32: bool,
    unaligned: bool,
    expect: FlashImpl,
}

/// Runs `options` (with an lse output) on the GPU and checks output and lse against the
/// reference on the same values; returns the output's relative error.
#[allow(clippy::too_many_arguments)]
fn check_dense(
    backend: &GpuAttentionBackend,
    case: Case,
    layout: Layout,
    causal: bool,
    (sq, sk): (usize, usize),
    name: &str,
    options: &AttentionOptions,
    mask: Option<&DeviceTensor>,
    seed: u64,
) -> f64 {
    let dev = backend.device();
    let b = 2;
    let cfg = config(case.d, causal, layout);
    let shape = |s: usize, heads: usize| match layout {
        Layout::Bhsd => [b, heads, s, case.d],
        _ => [b, s, heads, case.d],
    };
    let qc = random_tensor(&shape(sq, H), case.dtype, Device::Cpu, seed);
    let kc = random_tensor(&shape(sk, HKV), case.dtype, Device::Cpu, seed + 1);
    let vc = random_tensor(&shape(sk, HKV), case.dtype, Device::Cpu, seed + 2);
    let up = |t: &DeviceTensor| {
        if case.unaligned {
            unaligned_gpu(t, dev)
        } else {
            to_gpu(t, dev)
        }
    };
    let (q, k, v) = (up(&qc), up(&kc), up(&vc));
    let mask_gpu = mask.map(|m| to_gpu(m, dev));
    let mut out = DeviceTensor::zeros(q.shape(), case.dtype, dev).unwrap();
    let mut lse = DeviceTensor::zeros(&[b, H, sq], DType::F32, dev).unwrap();
    let what = format!("{name}: {case:?} {layout:?} causal {causal} {sq}x{sk}");
    let path = backend
        .forward_with(
            &cfg,
            options,
            &q,
            &k,
            &v,
            mask_gpu.as_ref(),
            &mut out,
            Some(&mut lse),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(matches!(path, AttentionPath::Flash(_)), "{what}: {path:?}");
    let input = PlanInput {
        ext: true,
        tf32: case.tf32,
        ..PlanInput::of_call(
            &forge_attn::AttentionProblem::new(&cfg, &q, &k, &v, mask_gpu.as_ref()).unwrap(),
            &q,
            &k,
            &v,
        )
    };
    let plan = backend.plan_with(&input, options, true).unwrap();
    // Up to 16 unmasked queries over aligned K/V run the decode kernel's option variant.
    if sq <= 16 && mask.is_none() && !case.unaligned {
        assert_eq!(path, AttentionPath::Flash(FlashKernel::Decode), "{what}");
    } else {
        assert_eq!(plan.implementation(), Some(case.expect), "{what}: {plan:?}");
    }
    assert_eq!(plan.path, path, "{what}");
    let host = options_on_host(options);
    let (want, want_lse) = attention_f64_with(&cfg, &host, &qc, &kc, &vc, mask).unwrap();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    let bound = match case.dtype {
        DType::F32 if case.tf32 => TF32_BOUND,
        DType::F32 => F32_BOUND,
        _ => {
            let naive = attention_naive_in_dtype_with(&cfg, &host, &qc, &kc, &vc, mask).unwrap();
            gpu_half_bound(relative_l2_error(&naive, &want))
        }
    };
    assert!(err <= bound, "{what}: error {err:e} > {bound:e}");
    let lse_tol = if case.dtype == DType::F32 && !case.tf32 {
        2e-5
    } else {
        3e-3
    };
    let got_lse = lse.to_f32_vec().unwrap();
    for (i, (&g, &w)) in got_lse.iter().zip(&want_lse).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(
                g,
                f32::NEG_INFINITY,
                "{what}: lse {i} of a row without keys"
            );
        } else {
            let d = (g as f64 - w).abs() / w.abs().max(1.0);
            assert!(d < lse_tol, "{what}: lse {i}: {g} vs {w}");
        }
    }
    err
}

/// The implementations of the H200 (and any sm_80+ device): the warp-specialized wgmma kernel for f16/bf16 at head
/// dims with an sm_90 row (mma.sync elsewhere), mma.sync at head_dim 32, TF32, SIMT f32,
/// and the split SIMT kernel for unaligned 16-bit inputs.
fn cases(backend: &GpuAttentionBackend) -> Vec<Case> {
    // Dense calls: the warp-specialized kernel on Hopper.
    let half = if backend.flash_target().has_wgmma {
        FlashImpl::WgmmaWs
    } else {
        FlashImpl::MmaSync
    };
    vec![
        Case {
            dtype: DType::F32,
            d: 64,
            tf32: false,
            unaligned: false,
            expect: FlashImpl::Simt,
        },
        Case {
            dtype: DType::BF16,
            d: 128,
            tf32: false,
            unaligned: false,
            expect: half,
        },
        Case {
            dtype: DType::F16,
            d: 64,
            tf32: false,
            unaligned: false,
            expect: half,
        },
        Case {
            dtype: DType::F16,
            d: 32,
            tf32: false,
            unaligned: false,
            expect: FlashImpl::MmaSync,
        },
        Case {
            dtype: DType::F32,
            d: 64,
            tf32: true,
            unaligned: false,
            expect: FlashImpl::Tf32,
        },
        Case {
            dtype: DType::BF16,
            d: 64,
            tf32: false,
            unaligned: true,
            expect: FlashImpl::SimtSplit,
        },
    ]
}

#[test]
#[ignore = "needs a GPU"]
fn every_option_on_every_implementation_matches_the_reference() {
    let (_, plain) = common::gpu_backend();
    let dev = plain.device();
    let tf32 = GpuAttentionBackend::new(dev).unwrap().with_tf32(true);
    // (160, 400): several key tiles, windows that skip some whole; (1, 200) and (5, 37):
    // the decode kernel's option variant (aligned inputs) or the split SIMT kernel; (37, 5):
    // seq_q above seq_k, rows with no key under a causal cut.
    let shapes = [(160, 400), (1, 200), (37, 5), (5, 37), (150, 170)];
    let mut seed = 100;
    let mut worst = 0.0f64;
    for case in cases(&plain) {
        let backend = if case.tf32 { &tf32 } else { &plain };
        for (name, options) in option_sets(dev) {
            for (i, &shape) in shapes.iter().enumerate() {
                // Both layouts and causal settings across the shapes, not all of each.
                let layout = if (i + seed as usize).is_multiple_of(2) {
                    Layout::Bshd
                } else {
                    Layout::Bhsd
                };
                for causal in [false, true] {
                    seed += 3;
                    let err = check_dense(
                        backend, case, layout, causal, shape, name, &options, None, seed,
                    );
                    worst = worst.max(err);
                }
            }
        }
    }
    println!("options on every implementation: worst relative L2 error {worst:.2e}");
}

#[test]
#[ignore = "needs a GPU"]
fn options_with_an_additive_mask_match_the_reference() {
    let (_, backend) = common::gpu_backend();
    let dev = backend.device();
    let (sq, sk) = (90, 140);
    let m: Vec<f32> = forge_attn::reference::random_values(sq * sk, 4)
        .into_iter()
        .map(|x| if x > 0.6 { f32::NEG_INFINITY } else { x })
        .collect();
    let mask = cpu_f32(&m, &[sq, sk]);
    for case in cases(&backend).into_iter().filter(|c| !c.tf32) {
        for (name, options) in option_sets(dev) {
            check_dense(
                &backend,
                case,
                Layout::Bshd,
                true,
                (sq, sk),
                name,
                &options,
                Some(&mask),
                7,
            );
        }
    }
}

const Q_LENS: [usize; 8] = [0, 1, 5, 70, 130, 1, 3, 600];
const K_LENS: [usize; 8] = [3, 1, 0, 70, 200, 40, 2, 1000];

/// A packed batch on the GPU against the reference; returns the relative error.
fn check_varlen(
    backend: &GpuAttentionBackend,
    dtype: DType,
    d: usize,
    causal: bool,
    name: &str,
    options: &AttentionOptions,
    seed: u64,
) -> f64 {
    let dev = backend.device();
    let (tq, tk) = (Q_LENS.iter().sum::<usize>(), K_LENS.iter().sum::<usize>());
    let qc = random_tensor(&[tq, H, d], dtype, Device::Cpu, seed);
    let kc = random_tensor(&[tk, HKV, d], dtype, Device::Cpu, seed + 1);
    let vc = random_tensor(&[tk, HKV, d], dtype, Device::Cpu, seed + 2);
    let (q, k, v) = (to_gpu(&qc, dev), to_gpu(&kc, dev), to_gpu(&vc, dev));
    let cfg = config(d, causal, Layout::Bshd);
    let batch_cpu = VarlenBatch::from_lengths(&Q_LENS, &K_LENS, Device::Cpu).unwrap();
    let batch = VarlenBatch::from_lengths(&Q_LENS, &K_LENS, dev).unwrap();
    let mut out = DeviceTensor::zeros(&[tq, H, d], dtype, dev).unwrap();
    let mut lse = DeviceTensor::zeros(&[H, tq], DType::F32, dev).unwrap();
    let what = format!("{name}: {dtype} d {d} causal {causal}");
    let path = backend
        .forward_varlen(&cfg, options, &q, &k, &v, &batch, &mut out, Some(&mut lse))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(matches!(path, AttentionPath::Flash(_)), "{what}: {path:?}");
    let (want, want_lse) =
        varlen_attention_f64(&cfg, &options_on_host(options), &qc, &kc, &vc, &batch_cpu).unwrap();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    let bound = if dtype == DType::F32 { F32_BOUND } else { 1e-2 };
    assert!(err <= bound, "{what}: error {err:e} > {bound:e}");
    let tol = if dtype == DType::F32 { 2e-5 } else { 3e-3 };
    for (i, (&g, &w)) in lse.to_f32_vec().unwrap().iter().zip(&want_lse).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse {i}");
        } else {
            assert!(
                (g as f64 - w).abs() / w.abs().max(1.0) < tol,
                "{what}: lse {i}: {g} vs {w}"
            );
        }
    }
    err
}

#[test]
#[ignore = "needs a GPU"]
fn packed_batches_match_the_reference_with_every_option() {
    let (dev, backend) = common::gpu_backend();
    let mut seed = 500;
    for (dtype, d) in [(DType::F32, 64), (DType::BF16, 128), (DType::F16, 64)] {
        for causal in [false, true] {
            for (name, options) in option_sets(dev) {
                seed += 3;
                check_varlen(&backend, dtype, d, causal, name, &options, seed);
            }
        }
    }
}

/// Sequences with queries and no key give zeros and their sink as lse.
#[test]
#[ignore = "needs a GPU"]
fn a_packed_sequence_without_keys_gives_zeros_and_its_sink() {
    let (dev, backend) = common::gpu_backend();
    let d = 64;
    let q = random_tensor(&[5, H, d], DType::BF16, dev, 1);
    let k = random_tensor(&[4, HKV, d], DType::BF16, dev, 2);
    let batch = VarlenBatch::from_lengths(&[2, 3], &[4, 0], dev).unwrap();
    let sinks = [0.3f32, -1.0, 2.0, 0.0];
    let o = AttentionOptions::new().with_sinks(per_head(&sinks, dev));
    let mut out =
        DeviceTensor::from_f32(&vec![9.0; 5 * H * d], &[5, H, d], DType::BF16, dev).unwrap();
    let mut lse = DeviceTensor::zeros(&[H, 5], DType::F32, dev).unwrap();
    backend
        .forward_varlen(
            &config(d, true, Layout::Bshd),
            &o,
            &q,
            &k,
            &k,
            &batch,
            &mut out,
            Some(&mut lse),
        )
        .unwrap();
    let got = out.to_f32_vec().unwrap();
    assert!(got[2 * H * d..].iter().all(|&x| x == 0.0));
    assert!(got[..2 * H * d].iter().all(|&x| x != 9.0));
    let l = lse.to_f32_vec().unwrap();
    for (h, s) in sinks.iter().enumerate() {
        assert_eq!(&l[h * 5 + 2..h * 5 + 5], &[*s; 3]);
    }
}

/// Refused calls (a bad per-head tensor, an lse of the wrong shape, flash switched off)
/// name the problem and leave out and lse untouched.
#[test]
#[ignore = "needs a GPU"]
fn refused_calls_change_nothing() {
    let (dev, backend) = common::gpu_backend();
    let d = 64;
    let cfg = config(d, true, Layout::Bshd);
    let q = random_tensor(&[1, 8, H, d], DType::BF16, dev, 1);
    let k = random_tensor(&[1, 8, HKV, d], DType::BF16, dev, 2);
    let fresh = || {
        (
            DeviceTensor::from_f32(&vec![5.0; 8 * H * d], &[1, 8, H, d], DType::BF16, dev).unwrap(),
            DeviceTensor::from_f32(&[3.0; 8 * H], &[1, H, 8], DType::F32, dev).unwrap(),
        )
    };
    let untouched = |out: &DeviceTensor, lse: &DeviceTensor| {
        assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 5.0));
        assert!(lse.to_f32_vec().unwrap().iter().all(|&x| x == 3.0));
    };
    // Slopes of the wrong length.
    let (mut out, mut lse) = fresh();
    let bad = AttentionOptions::new()
        .with_alibi_slopes(DeviceTensor::zeros(&[H + 1], DType::F32, dev).unwrap());
    let e = backend
        .forward_with(&cfg, &bad, &q, &k, &k, None, &mut out, Some(&mut lse))
        .unwrap_err();
    assert!(matches!(&e, AttentionError::ShapeMismatch { .. }), "{e:?}");
    untouched(&out, &lse);
    // Sinks on the host.
    let bad = AttentionOptions::new().with_sinks(per_head(&[0.0; H], Device::Cpu));
    let e = backend
        .forward_with(&cfg, &bad, &q, &k, &k, None, &mut out, Some(&mut lse))
        .unwrap_err();
    assert!(matches!(&e, AttentionError::DeviceMismatch { .. }), "{e:?}");
    untouched(&out, &lse);
    // An lse of the wrong shape.
    let mut short = DeviceTensor::zeros(&[1, H, 7], DType::F32, dev).unwrap();
    let e = backend
        .forward_with(
            &cfg,
            &AttentionOptions::new().with_softcap(3.0),
            &q,
            &k,
            &k,
            None,
            &mut out,
            Some(&mut short),
        )
        .unwrap_err();
    assert!(matches!(&e, AttentionError::ShapeMismatch { .. }), "{e:?}");
    untouched(&out, &lse);
    // Flash switched off: nothing runs the options.
    let off = GpuAttentionBackend::new(dev).unwrap().with_flash(false);
    let e = off
        .forward_with(
            &cfg,
            &AttentionOptions::new().with_softcap(3.0),
            &q,
            &k,
            &k,
            None,
            &mut out,
            Some(&mut lse),
        )
        .unwrap_err();
    assert!(
        matches!(&e, AttentionError::NotSupported { reason, .. } if reason.contains("switched off")),
        "{e:?}"
    );
    untouched(&out, &lse);
}

/// The decision without a GPU: options take the decode kernel's option variant for up to
/// 16 dense queries, the extended prefill variants otherwise (packed batches always), never
/// the unfused path; AMD runs no extended prefill variant.
#[test]
fn extended_calls_plan_the_extended_variants() {
    use forge_attn::backend::gpu::dispatch::{can_use_flash_attention, FlashTarget};
    let hopper = FlashTarget {
        amd: false,
        has_mma: true,
        has_wgmma: true,
    };
    let input = |dtype: DType, seq_q: usize, ext: bool, packed: bool| PlanInput {
        dtype,
        head_dim: 128,
        causal: true,
        has_mask: false,
        seq_q,
        tf32: false,
        kv_aligned: true,
        qkv_aligned: true,
        ext,
        packed,
        paged: false,
        tma: true,
    };
    let plan = |i: PlanInput| can_use_flash_attention(&i, true, u32::MAX, hopper);
    let plain = plan(input(DType::BF16, 1, false, false)).unwrap();
    assert_eq!(plain.kernel, FlashKernel::Decode);
    assert!(!plain.ext);
    let dense = plan(input(DType::BF16, 16, true, false)).unwrap();
    assert_eq!(dense.kernel, FlashKernel::Decode);
    assert!(dense.ext && dense.spec().is_none());
    for (seq_q, packed) in [(1, true), (16, true), (17, false), (4096, false)] {
        let c = plan(input(DType::BF16, seq_q, true, packed)).unwrap();
        assert_eq!(c.kernel, FlashKernel::Causal, "seq_q {seq_q}");
        // Packed batches too run on the warp-specialized kernel where TMA reads them.
        assert_eq!(
            c.implementation,
            FlashImpl::WgmmaWs,
            "seq_q {seq_q} packed {packed}"
        );
        assert!(c.ext);
        let spec = c.spec().unwrap();
        assert!(spec.name.ends_with("_ext"), "{}", spec.name);
        assert!(spec
            .defines
            .iter()
            .any(|(k, v)| *k == "FA_VARIANT_EXT" && v == "1"));
    }
    let paged = plan(PlanInput {
        paged: true,
        ..input(DType::BF16, 64, true, false)
    })
    .unwrap();
    assert!(paged.ext && paged.paged);
    assert!(paged.spec().unwrap().name.ends_with("_paged"));
    let paged_decode = plan(PlanInput {
        paged: true,
        ..input(DType::BF16, 4, true, false)
    })
    .unwrap();
    assert_eq!(paged_decode.kernel, FlashKernel::Decode);
    assert!(!paged_decode.paged);
    let f32 = plan(input(DType::F32, 64, true, false)).unwrap();
    assert!(f32.ext && f32.implementation == FlashImpl::Simt);
    let off = can_use_flash_attention(
        &input(DType::BF16, 64, true, false),
        false,
        u32::MAX,
        hopper,
    );
    assert!(off.is_err());
    let amd = FlashTarget {
        amd: true,
        has_mma: false,
        has_wgmma: false,
    };
    let e = can_use_flash_attention(&input(DType::BF16, 64, true, false), true, u32::MAX, amd)
        .unwrap_err();
    assert!(e.contains("CUDA only"), "{e}");
    let amd_decode =
        can_use_flash_attention(&input(DType::BF16, 1, true, false), true, u32::MAX, amd).unwrap();
    assert_eq!(amd_decode.kernel, FlashKernel::Decode);
}
