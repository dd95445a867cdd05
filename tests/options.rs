//! Per-call options (`AttentionOptions`, `forward_with`, `merge_states`): the CPU backend
//! against the f64 reference for every option alone and combined, rows that keep no key,
//! merging partial results by their log-sum-exps, every validation error, refused calls
//! leaving their outputs untouched, and the refusals of backends that run no option.

use forge_attn::reference::{
    attention_f64, attention_f64_with, attention_naive_in_dtype_with, relative_l2_error,
};
use forge_attn::{
    merge_states, AttentionConfig, AttentionError, AttentionOptions, AttentionPath,
    CpuAttentionBackend, DType, Device, DeviceAttentionBackend, DeviceTensor, GpuAttentionBackend,
    Layout, MAX_WINDOW,
};

mod common;
use common::{cpu_f32, cpu_half_bound, gpu, random_tensor, Forward, F32_BOUND};

const B: usize = 2;
const H: usize = 4;
const HKV: usize = 2;
const D: usize = 24;

/// Shape of an operand with `s` positions and `heads` heads in `layout`.
fn shape(layout: Layout, s: usize, heads: usize) -> [usize; 4] {
    match layout {
        Layout::Bhsd => [B, heads, s, D],
        _ => [B, s, heads, D],
    }
}

struct Call {
    config: AttentionConfig,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
}

fn call(dtype: DType, layout: Layout, causal: bool, sq: usize, sk: usize, seed: u64) -> Call {
    // Scale 1: scores of a few units, so a softcap of 2 and the slopes below matter.
    let config = AttentionConfig::new(H * D, H, 4096)
        .with_num_kv_heads(HKV)
        .with_causal(causal)
        .with_layout(layout)
        .with_scale(0.5);
    let dev = Device::Cpu;
    Call {
        config,
        q: random_tensor(&shape(layout, sq, H), dtype, dev, seed),
        k: random_tensor(&shape(layout, sk, HKV), dtype, dev, seed + 1),
        v: random_tensor(&shape(layout, sk, HKV), dtype, dev, seed + 2),
    }
}

fn slopes() -> DeviceTensor {
    cpu_f32(&[0.5, 0.25, 0.125, 0.0625], &[H])
}

fn sinks() -> DeviceTensor {
    cpu_f32(&[0.3, -1.0, 2.0, 0.0], &[H])
}

/// Runs `options` on the CPU with an lse output; returns the output's relative error
/// against the reference, the largest lse difference, the output and the lse.
fn run(
    c: &Call,
    options: &AttentionOptions,
    mask: Option<&DeviceTensor>,
) -> (f64, f64, Vec<f32>, Vec<f32>) {
    let sq = c.q.shape()[if c.config.layout == Layout::Bshd {
        1
    } else {
        2
    }];
    let mut out = DeviceTensor::zeros(c.q.shape(), c.q.dtype(), Device::Cpu).unwrap();
    let mut lse = DeviceTensor::zeros(&[B, H, sq], DType::F32, Device::Cpu).unwrap();
    let path = CpuAttentionBackend::new()
        .forward_with(
            &c.config,
            options,
            &c.q,
            &c.k,
            &c.v,
            mask,
            &mut out,
            Some(&mut lse),
        )
        .unwrap();
    assert_eq!(path, AttentionPath::Cpu);
    let (want, want_lse) = attention_f64_with(&c.config, options, &c.q, &c.k, &c.v, mask).unwrap();
    let got = out.to_f32_vec().unwrap();
    let got_lse = lse.to_f32_vec().unwrap();
    let mut lse_diff = 0.0f64;
    for (&g, &w) in got_lse.iter().zip(&want_lse) {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "lse of a row without keys");
        } else {
            lse_diff = lse_diff.max((g as f64 - w).abs() / w.abs().max(1.0));
        }
    }
    (relative_l2_error(&got, &want), lse_diff, got, got_lse)
}

/// The option sets the combined test runs: each option alone, and all together.
fn option_sets() -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("plain", AttentionOptions::new()),
        (
            "window 0",
            AttentionOptions::new().with_window(Some(0), Some(0)),
        ),
        (
            "window left 9",
            AttentionOptions::new().with_window(Some(9), None),
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
            "window beyond the sequence",
            AttentionOptions::new().with_window(Some(100_000), Some(100_000)),
        ),
        ("softcap", AttentionOptions::new().with_softcap(2.0)),
        ("alibi", AttentionOptions::new().with_alibi_slopes(slopes())),
        ("sinks", AttentionOptions::new().with_sinks(sinks())),
        (
            "all",
            AttentionOptions::new()
                .with_window(Some(40), Some(5))
                .with_softcap(2.0)
                .with_alibi_slopes(slopes())
                .with_sinks(sinks()),
        ),
    ]
}

#[test]
fn every_option_alone_and_combined_matches_the_reference() {
    // (150, 170): shared widened tiles; (1, 200): a decode row on the direct path;
    // (37, 5) and (5, 37): seq_q != seq_k both ways, rows above the causal diagonal.
    let shapes = [(150, 170), (1, 200), (37, 5), (5, 37), (70, 130)];
    let mut seed = 10;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for layout in [Layout::Bshd, Layout::Bhsd] {
            for causal in [false, true] {
                for (name, options) in option_sets() {
                    // Every shape in f32, one per combination in f16/bf16 (the slow part is
                    // the reference).
                    let picked: Vec<_> = if dtype == DType::F32 {
                        shapes.to_vec()
                    } else {
                        vec![shapes[seed as usize % shapes.len()]]
                    };
                    for (sq, sk) in picked {
                        seed += 3;
                        let c = call(dtype, layout, causal, sq, sk, seed);
                        let (err, lse_diff, _, _) = run(&c, &options, None);
                        let bound = if dtype == DType::F32 {
                            F32_BOUND
                        } else {
                            let naive = attention_naive_in_dtype_with(
                                &c.config, &options, &c.q, &c.k, &c.v, None,
                            )
                            .unwrap();
                            let (want, _) =
                                attention_f64_with(&c.config, &options, &c.q, &c.k, &c.v, None)
                                    .unwrap();
                            cpu_half_bound(relative_l2_error(&naive, &want))
                        };
                        let what = format!("{name} {dtype:?} {layout:?} causal {causal} {sq}x{sk}");
                        assert!(err <= bound, "{what}: error {err:e} > {bound:e}");
                        assert!(lse_diff < 1e-5, "{what}: lse off by {lse_diff:e}");
                    }
                }
            }
        }
    }
}

#[test]
fn options_with_an_additive_mask_match_the_reference() {
    let c = call(DType::F32, Layout::Bshd, true, 90, 140, 3);
    let m: Vec<f32> = forge_attn::reference::random_values(90 * 140, 4)
        .into_iter()
        .map(|x| if x > 0.6 { f32::NEG_INFINITY } else { x })
        .collect();
    let mask = cpu_f32(&m, &[90, 140]);
    for (name, options) in option_sets() {
        let (err, lse_diff, _, _) = run(&c, &options, Some(&mask));
        assert!(err <= F32_BOUND, "{name}: {err:e}");
        assert!(lse_diff < 1e-5, "{name}: lse {lse_diff:e}");
    }
}

#[test]
fn the_reference_without_options_is_attention_f64() {
    let c = call(DType::F32, Layout::Bshd, true, 7, 9, 1);
    let (with, lse) =
        attention_f64_with(&c.config, &AttentionOptions::new(), &c.q, &c.k, &c.v, None).unwrap();
    assert_eq!(
        with,
        attention_f64(&c.config, &c.q, &c.k, &c.v, None).unwrap()
    );
    assert_eq!(lse.len(), B * H * 7);
}

/// A window beyond every sequence gives plain attention; plain options with an lse give
/// `forward_into`'s output.
#[test]
fn a_window_beyond_the_sequence_is_plain_attention() {
    let c = call(DType::F32, Layout::Bshd, true, 33, 100, 5);
    let mut plain = DeviceTensor::zeros(c.q.shape(), DType::F32, Device::Cpu).unwrap();
    CpuAttentionBackend::new()
        .forward_into(&c.config, &c.q, &c.k, &c.v, None, &mut plain)
        .unwrap();
    let wide = AttentionOptions::new().with_window(Some(1 << 40), Some(MAX_WINDOW));
    let (_, _, got, _) = run(&c, &wide, None);
    assert_eq!(got, plain.to_f32_vec().unwrap());
    let (_, _, got, _) = run(&c, &AttentionOptions::new(), None);
    assert_eq!(got, plain.to_f32_vec().unwrap());
}

/// With seq_q > seq_k and a window of 0 on both sides, the top rows' diagonal lies before
/// the first key: they keep nothing, so they are zeros with lse -inf (the sink's value with
/// sinks), and the rows below keep exactly their diagonal key.
#[test]
fn rows_that_keep_no_key_are_zeros_with_lse_minus_infinity() {
    let (sq, sk) = (12, 4);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        let c = call(DType::F32, layout, false, sq, sk, 7);
        let window = AttentionOptions::new().with_window(Some(0), Some(0));
        for options in [window.clone(), window.with_sinks(sinks())] {
            let (err, _, got, lse) = run(&c, &options, None);
            assert!(err <= F32_BOUND, "{err:e}");
            let sink = options.sinks.as_ref().map(|s| s.to_f32_vec().unwrap());
            for b in 0..B {
                for h in 0..H {
                    for i in 0..sq {
                        let at = match layout {
                            Layout::Bshd => ((b * sq + i) * H + h) * D,
                            _ => ((b * H + h) * sq + i) * D,
                        };
                        let l = lse[(b * H + h) * sq + i];
                        if i < sq - sk {
                            assert!(got[at..at + D].iter().all(|&x| x == 0.0));
                            let want = sink.as_ref().map_or(f32::NEG_INFINITY, |s| s[h]);
                            assert_eq!(l, want, "b {b} h {h} i {i}");
                        } else {
                            assert!(l.is_finite());
                        }
                    }
                }
            }
        }
    }
}

/// K and V outside every row's window hold NaN and inf: keys a window removes never reach
/// the output, on the shared-tile, private-tile and direct paths.
#[test]
fn keys_outside_the_window_never_reach_the_output() {
    for (sq, sk) in [(150, 300), (1, 300), (3, 300)] {
        let c = call(DType::F32, Layout::Bshd, true, sq, sk, 11);
        let (left, right) = (20, 0);
        let mut kv = [c.k.to_f32_vec().unwrap(), c.v.to_f32_vec().unwrap()];
        // Keys before the first row's window: 0 .. (sk - sq) - left.
        let first = (sk - sq).saturating_sub(left);
        for t in kv.iter_mut() {
            for (x, val) in t.iter_mut().enumerate() {
                let j = x / (HKV * D) % sk;
                if j < first {
                    *val = if x % 2 == 0 { f32::NAN } else { f32::INFINITY };
                }
            }
        }
        let sh = shape(Layout::Bshd, sk, HKV);
        let poisoned = Call {
            config: c.config.clone(),
            q: c.q.clone(),
            k: cpu_f32(&kv[0], &sh),
            v: cpu_f32(&kv[1], &sh),
        };
        let options = AttentionOptions::new().with_window(Some(left), Some(right));
        let mut out = DeviceTensor::zeros(c.q.shape(), DType::F32, Device::Cpu).unwrap();
        CpuAttentionBackend::new()
            .forward_with(
                &c.config,
                &options,
                &poisoned.q,
                &poisoned.k,
                &poisoned.v,
                None,
                &mut out,
                None,
            )
            .unwrap();
        let (want, _) = attention_f64_with(&c.config, &options, &c.q, &c.k, &c.v, None).unwrap();
        let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
        assert!(err <= F32_BOUND, "{sq}x{sk}: {err:e}");
    }
}

/// Attention over the first keys (with the sinks) and over the rest, merged by their
/// log-sum-exps, is attention over all keys with the sinks.
#[test]
fn merging_two_halves_of_the_keys_is_attention_over_all() {
    let backend = CpuAttentionBackend::new();
    for (layout, dtype, split) in [
        (Layout::Bshd, DType::F32, 70),
        (Layout::Bhsd, DType::F32, 1),
        (Layout::Bshd, DType::BF16, 100),
    ] {
        let (sq, sk) = (20, 150);
        let c = call(dtype, layout, false, sq, sk, 21);
        let seq_axis = if layout == Layout::Bshd { 1 } else { 2 };
        let half =
            |t: &DeviceTensor, start: usize, len: usize| t.narrow(seq_axis, start, len).unwrap();
        let part = |options: &AttentionOptions, start: usize, len: usize| {
            let mut out = DeviceTensor::zeros(c.q.shape(), dtype, Device::Cpu).unwrap();
            let mut lse = DeviceTensor::zeros(&[B, H, sq], DType::F32, Device::Cpu).unwrap();
            backend
                .forward_with(
                    &c.config,
                    options,
                    &c.q,
                    &half(&c.k, start, len),
                    &half(&c.v, start, len),
                    None,
                    &mut out,
                    Some(&mut lse),
                )
                .unwrap();
            (out, lse)
        };
        let with_sinks = AttentionOptions::new().with_sinks(sinks());
        let (mut out_a, mut lse_a) = part(&with_sinks, 0, split);
        let (out_b, lse_b) = part(&AttentionOptions::new(), split, sk - split);
        merge_states(layout, &mut out_a, &mut lse_a, &out_b, &lse_b).unwrap();
        let (want, want_lse) =
            attention_f64_with(&c.config, &with_sinks, &c.q, &c.k, &c.v, None).unwrap();
        let err = relative_l2_error(&out_a.to_f32_vec().unwrap(), &want);
        let bound = if dtype == DType::F32 { F32_BOUND } else { 1e-2 };
        assert!(err <= bound, "{layout:?} {dtype:?}: {err:e}");
        for (g, w) in lse_a.to_f32_vec().unwrap().iter().zip(&want_lse) {
            assert!(
                (*g as f64 - w).abs() < 1e-5 * w.abs().max(1.0),
                "{g} vs {w}"
            );
        }
    }
}

/// A side that kept no key (lse -inf) leaves the other side as it is; two such sides stay
/// zeros with -inf.
#[test]
fn merging_with_an_empty_side() {
    let layout = Layout::Bshd;
    let mk = |v: f32, shape: &[usize]| cpu_f32(&vec![v; shape.iter().product()], shape);
    let (o_shape, l_shape) = ([1, 2, 1, 3], [1, 1, 2]);
    let mut out_a = mk(0.0, &o_shape);
    let mut lse_a = cpu_f32(&[f32::NEG_INFINITY, f32::NEG_INFINITY], &l_shape);
    let out_b = cpu_f32(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &o_shape);
    let lse_b = cpu_f32(&[0.5, f32::NEG_INFINITY], &l_shape);
    merge_states(layout, &mut out_a, &mut lse_a, &out_b, &lse_b).unwrap();
    assert_eq!(out_a.to_f32_vec().unwrap(), [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
    assert_eq!(lse_a.to_f32_vec().unwrap(), [0.5, f32::NEG_INFINITY]);
}

fn assert_invalid(e: AttentionError, want_field: &str) {
    assert!(
        matches!(&e, AttentionError::InvalidConfig { field, .. } if *field == want_field),
        "{e:?}"
    );
}

#[test]
fn bad_windows_and_softcaps_are_refused_by_validate() {
    assert!(AttentionOptions::new().validate().is_ok());
    let e = AttentionOptions::new()
        .with_window(Some(MAX_WINDOW + 1), None)
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains(&(MAX_WINDOW + 1).to_string()), "{e}");
    assert_invalid(e, "window_left");
    let e = AttentionOptions::new()
        .with_window(Some(3), Some(usize::MAX))
        .validate()
        .unwrap_err();
    assert_invalid(e, "window_right");
    assert!(AttentionOptions::new()
        .with_window(Some(MAX_WINDOW), Some(0))
        .validate()
        .is_ok());
    for cap in [0.0, -1.0, f32::NAN, f32::INFINITY, -0.0] {
        let e = AttentionOptions::new()
            .with_softcap(cap)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains(&cap.to_string()), "{e}");
        assert_invalid(e, "softcap");
    }
}

/// Every refusal of `forward_with`, each leaving `out` and `lse` as they were.
#[test]
fn every_invalid_call_is_refused_and_changes_nothing() {
    let c = call(DType::F32, Layout::Bshd, true, 6, 9, 31);
    let backend = CpuAttentionBackend::new();
    let sentinel_out = vec![7.0f32; B * 6 * H * D];
    let sentinel_lse = vec![9.0f32; B * H * 6];
    let f16 = DeviceTensor::zeros(&[H], DType::F16, Device::Cpu).unwrap();
    let short = cpu_f32(&[0.1; H - 1], &[H - 1]);
    let two_d = cpu_f32(&[0.1; H], &[1, H]);
    let cases: Vec<(&str, AttentionOptions, Option<DeviceTensor>, &str)> = vec![
        (
            "window",
            AttentionOptions::new().with_window(None, Some(MAX_WINDOW + 1)),
            None,
            "InvalidConfig",
        ),
        (
            "softcap",
            AttentionOptions::new().with_softcap(f32::NAN),
            None,
            "InvalidConfig",
        ),
        (
            "softcap 0",
            AttentionOptions::new().with_softcap(0.0),
            None,
            "InvalidConfig",
        ),
        (
            "slopes dtype",
            AttentionOptions::new().with_alibi_slopes(f16.clone()),
            None,
            "DTypeMismatch",
        ),
        (
            "slopes shape",
            AttentionOptions::new().with_alibi_slopes(short.clone()),
            None,
            "ShapeMismatch",
        ),
        (
            "slopes rank",
            AttentionOptions::new().with_alibi_slopes(two_d.clone()),
            None,
            "ShapeMismatch",
        ),
        (
            "sinks dtype",
            AttentionOptions::new().with_sinks(f16),
            None,
            "DTypeMismatch",
        ),
        (
            "sinks shape",
            AttentionOptions::new().with_sinks(short),
            None,
            "ShapeMismatch",
        ),
        (
            "sinks rank",
            AttentionOptions::new().with_sinks(two_d),
            None,
            "ShapeMismatch",
        ),
        (
            "lse shape",
            AttentionOptions::new(),
            Some(DeviceTensor::zeros(&[B, 6, H], DType::F32, Device::Cpu).unwrap()),
            "ShapeMismatch",
        ),
        (
            "lse dtype",
            AttentionOptions::new(),
            Some(DeviceTensor::zeros(&[B, H, 6], DType::F16, Device::Cpu).unwrap()),
            "DTypeMismatch",
        ),
        (
            "lse repeats elements",
            AttentionOptions::new(),
            Some(
                DeviceTensor::zeros(&[B, H, 1], DType::F32, Device::Cpu)
                    .unwrap()
                    .broadcast_dim(2, 6)
                    .unwrap(),
            ),
            "UnsupportedLayout",
        ),
    ];
    for (name, options, bad_lse, kind) in cases {
        let mut out = cpu_f32(&sentinel_out, c.q.shape());
        let mut good_lse = cpu_f32(&sentinel_lse, &[B, H, 6]);
        let mut bad_lse = bad_lse;
        let lse = match bad_lse.as_mut() {
            Some(l) => l,
            None => &mut good_lse,
        };
        let before = lse.to_f32_vec().unwrap();
        let e = backend
            .forward_with(
                &c.config,
                &options,
                &c.q,
                &c.k,
                &c.v,
                None,
                &mut out,
                Some(lse),
            )
            .unwrap_err();
        assert!(format!("{e:?}").starts_with(kind), "{name}: {e:?}");
        assert_eq!(
            out.to_f32_vec().unwrap(),
            sentinel_out,
            "{name}: out changed"
        );
        assert_eq!(lse.to_f32_vec().unwrap(), before, "{name}: lse changed");
    }
    // An lse that overlaps the output.
    let out = DeviceTensor::zeros(&[B * 6 * H * D], DType::F32, Device::Cpu).unwrap();
    let mut lse = out
        .narrow(0, 0, B * H * 6)
        .unwrap()
        .reshape(&[B, H, 6])
        .unwrap();
    let mut out4 = out.reshape(c.q.shape()).unwrap();
    let e = backend
        .forward_with(
            &c.config,
            &AttentionOptions::new(),
            &c.q,
            &c.k,
            &c.v,
            None,
            &mut out4,
            Some(&mut lse),
        )
        .unwrap_err();
    assert!(
        matches!(&e, AttentionError::UnsupportedLayout { what, .. } if what == "lse"),
        "{e:?}"
    );
    assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
}

/// A backend that keeps the trait's defaults runs plain options and refuses the others,
/// naming them; `supports_with` says the same.
#[test]
fn the_default_runs_plain_options_and_refuses_the_others_by_name() {
    let cpu = CpuAttentionBackend::new();
    let plain_only = Forward {
        inner: &cpu,
        name: Some("plain-only"),
    };
    let c = call(DType::F32, Layout::Bshd, false, 5, 7, 41);
    let mut out = DeviceTensor::zeros(c.q.shape(), DType::F32, Device::Cpu).unwrap();
    plain_only
        .forward_with(
            &c.config,
            &AttentionOptions::new(),
            &c.q,
            &c.k,
            &c.v,
            None,
            &mut out,
            None,
        )
        .unwrap();
    let want = attention_f64(&c.config, &c.q, &c.k, &c.v, None).unwrap();
    assert!(relative_l2_error(&out.to_f32_vec().unwrap(), &want) <= F32_BOUND);

    let mut out = cpu_f32(&vec![3.0; B * 5 * H * D], c.q.shape());
    let mut lse = cpu_f32(&[4.0; B * H * 5], &[B, H, 5]);
    for (options, wants_lse, named) in [
        (AttentionOptions::new().with_softcap(3.0), false, "softcap"),
        (
            AttentionOptions::new().with_window(Some(1), None),
            false,
            "window",
        ),
        (
            AttentionOptions::new().with_alibi_slopes(slopes()),
            false,
            "alibi_slopes",
        ),
        (AttentionOptions::new().with_sinks(sinks()), false, "sinks"),
        (AttentionOptions::new(), true, "lse output"),
    ] {
        let e = plain_only
            .forward_with(
                &c.config,
                &options,
                &c.q,
                &c.k,
                &c.v,
                None,
                &mut out,
                wants_lse.then_some(&mut lse),
            )
            .unwrap_err();
        assert!(
            matches!(&e, AttentionError::NotSupported { backend, reason } if backend == "plain-only" && reason.contains(named)),
            "{e:?}"
        );
        assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 3.0));
        assert!(lse.to_f32_vec().unwrap().iter().all(|&x| x == 4.0));
        let support = plain_only.supports_with(&c.config, &options);
        if !wants_lse {
            assert!(
                matches!(&support, forge_attn::Support::No(r) if r.contains(named)),
                "{support:?}"
            );
            assert!(cpu.supports_with(&c.config, &options).is_yes());
        }
    }
    // An invalid option is an invalid option before it is an unsupported one.
    let bad = AttentionOptions::new().with_softcap(-2.0);
    let e = plain_only
        .forward_with(&c.config, &bad, &c.q, &c.k, &c.v, None, &mut out, None)
        .unwrap_err();
    assert_invalid(e, "softcap");
    assert!(!cpu.supports_with(&c.config, &bad).is_yes());
    assert!(plain_only
        .supports_with(&c.config, &AttentionOptions::new())
        .is_yes());
}

/// The cached counterpart's default: plain options run `forward_cached`, others are refused.
#[test]
fn cached_calls_with_options_default_to_plain_or_refusal() {
    let cpu = CpuAttentionBackend::new();
    let plain_only = Forward {
        inner: &cpu,
        name: None,
    };
    let spec = common::spec(B, HKV, D, 16, DType::F32);
    let mut cache =
        forge_attn::KvCache::contiguous(spec, forge_attn::KvCacheLayout::Contiguous, Device::Cpu)
            .unwrap();
    let k = random_tensor(&[B, 5, HKV, D], DType::F32, Device::Cpu, 1);
    let v = random_tensor(&[B, 5, HKV, D], DType::F32, Device::Cpu, 2);
    cache.append(&k, &v).unwrap();
    let config = AttentionConfig::new(H * D, H, 16).with_num_kv_heads(HKV);
    let q = random_tensor(&[B, 1, H, D], DType::F32, Device::Cpu, 3);
    let mut out = DeviceTensor::zeros(q.shape(), DType::F32, Device::Cpu).unwrap();
    plain_only
        .forward_cached_with(
            &config,
            &AttentionOptions::new(),
            &q,
            &cache,
            &mut out,
            None,
        )
        .unwrap();
    let want = attention_f64(&config, &q, &k, &v, None).unwrap();
    assert!(relative_l2_error(&out.to_f32_vec().unwrap(), &want) <= F32_BOUND);
    let e = plain_only
        .forward_cached_with(
            &config,
            &AttentionOptions::new().with_softcap(1.0),
            &q,
            &cache,
            &mut out,
            None,
        )
        .unwrap_err();
    assert!(
        matches!(&e, AttentionError::NotSupported { reason, .. } if reason.contains("softcap")),
        "{e:?}"
    );
    let e = plain_only
        .forward_cached_with(
            &config,
            &AttentionOptions::new().with_softcap(0.0),
            &q,
            &cache,
            &mut out,
            None,
        )
        .unwrap_err();
    assert_invalid(e, "softcap");
}

#[test]
fn merge_states_refuses_mismatched_operands_and_changes_nothing() {
    let layout = Layout::Bshd;
    let o = |shape: &[usize]| cpu_f32(&vec![1.0; shape.iter().product()], shape);
    let l = |shape: &[usize]| cpu_f32(&vec![0.0; shape.iter().product()], shape);
    let (os, ls) = ([1, 3, 2, 4], [1, 2, 3]);
    let cases: Vec<(
        &str,
        DeviceTensor,
        DeviceTensor,
        DeviceTensor,
        DeviceTensor,
        &str,
    )> = vec![
        (
            "out_b shape",
            o(&os),
            l(&ls),
            o(&[1, 3, 2, 5]),
            l(&ls),
            "ShapeMismatch",
        ),
        (
            "out_b dtype",
            o(&os),
            l(&ls),
            DeviceTensor::zeros(&os, DType::F16, Device::Cpu).unwrap(),
            l(&ls),
            "DTypeMismatch",
        ),
        (
            "out rank",
            o(&[3, 2, 4]),
            l(&ls),
            o(&[3, 2, 4]),
            l(&ls),
            "ShapeMismatch",
        ),
        (
            "lse_a shape",
            o(&os),
            l(&[1, 3, 2]),
            o(&os),
            l(&ls),
            "ShapeMismatch",
        ),
        (
            "lse_b shape",
            o(&os),
            l(&ls),
            o(&os),
            l(&[2, 3]),
            "ShapeMismatch",
        ),
        (
            "lse_a dtype",
            o(&os),
            DeviceTensor::zeros(&ls, DType::BF16, Device::Cpu).unwrap(),
            o(&os),
            l(&ls),
            "DTypeMismatch",
        ),
    ];
    for (name, mut oa, mut la, ob, lb, kind) in cases {
        let (before_o, before_l) = (oa.to_f32_vec().unwrap(), la.to_f32_vec().unwrap());
        let e = merge_states(layout, &mut oa, &mut la, &ob, &lb).unwrap_err();
        assert!(format!("{e:?}").starts_with(kind), "{name}: {e:?}");
        if name.starts_with("lse") {
            let which = &name[..5];
            assert!(format!("{e:?}").contains(which), "{name}: {e:?}");
        }
        assert_eq!(oa.to_f32_vec().unwrap(), before_o, "{name}");
        assert_eq!(la.to_f32_vec().unwrap(), before_l, "{name}");
    }
    // out_a aliasing out_b.
    let mut oa = o(&os);
    let ob = oa.clone();
    let (mut la, lb) = (l(&ls), l(&ls));
    let e = merge_states(layout, &mut oa, &mut la, &ob, &lb).unwrap_err();
    assert!(
        matches!(&e, AttentionError::UnsupportedLayout { what, .. } if what == "out_a"),
        "{e:?}"
    );
}

/// Per-head tensors and `lse` on another device than the call's are refused; and
/// `merge_states` on GPU tensors is refused as not supported (no kernel yet).
#[test]
#[ignore = "needs a GPU"]
fn tensors_on_the_wrong_device_are_refused() {
    let dev = gpu();
    let c = call(DType::F32, Layout::Bshd, false, 4, 6, 51);
    let on_gpu = random_tensor(&[H], DType::F32, dev, 1);
    let mut out = DeviceTensor::zeros(c.q.shape(), DType::F32, Device::Cpu).unwrap();
    for options in [
        AttentionOptions::new().with_alibi_slopes(on_gpu.clone()),
        AttentionOptions::new().with_sinks(on_gpu.clone()),
    ] {
        let e = CpuAttentionBackend::new()
            .forward_with(&c.config, &options, &c.q, &c.k, &c.v, None, &mut out, None)
            .unwrap_err();
        assert!(matches!(e, AttentionError::DeviceMismatch { .. }), "{e:?}");
    }
    let mut lse = DeviceTensor::zeros(&[B, H, 4], DType::F32, dev).unwrap();
    let e = CpuAttentionBackend::new()
        .forward_with(
            &c.config,
            &AttentionOptions::new(),
            &c.q,
            &c.k,
            &c.v,
            None,
            &mut out,
            Some(&mut lse),
        )
        .unwrap_err();
    assert!(
        matches!(&e, AttentionError::DeviceMismatch { what, .. } if what == "lse"),
        "{e:?}"
    );
    assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));

    let mut oa = random_tensor(&[1, 2, 2, 8], DType::F32, dev, 2);
    let ob = random_tensor(&[1, 2, 2, 8], DType::F32, dev, 3);
    let mut la = DeviceTensor::zeros(&[1, 2, 2], DType::F32, dev).unwrap();
    let lb = DeviceTensor::zeros(&[1, 2, 2], DType::F32, dev).unwrap();
    let e = merge_states(Layout::Bshd, &mut oa, &mut la, &ob, &lb).unwrap_err();
    assert!(matches!(e, AttentionError::NotSupported { .. }), "{e:?}");
    // The GPU backend runs options on its flash kernels' extended variants.
    let backend = GpuAttentionBackend::new(dev).unwrap();
    let q = random_tensor(c.q.shape(), DType::F32, dev, 4);
    let k = random_tensor(c.k.shape(), DType::F32, dev, 5);
    let mut gout = DeviceTensor::zeros(q.shape(), DType::F32, dev).unwrap();
    let path = backend
        .forward_with(
            &c.config,
            &AttentionOptions::new().with_softcap(4.0),
            &q,
            &k,
            &k,
            None,
            &mut gout,
            None,
        )
        .unwrap();
    assert!(matches!(path, AttentionPath::Flash(_)), "{path:?}");
    let input = forge_attn::backend::gpu::PlanInput::of(
        &forge_attn::AttentionProblem::new(&c.config, &q, &k, &k, None).unwrap(),
    );
    assert!(backend
        .plan_with(&input, &AttentionOptions::new(), false)
        .is_ok());
    let plan = backend
        .plan_with(&input, &AttentionOptions::new().with_softcap(4.0), false)
        .unwrap();
    assert!(plan.flash.is_some_and(|c| c.ext), "{plan:?}");
    let r = GpuAttentionBackend::new(dev)
        .unwrap()
        .with_flash(false)
        .plan_with(&input, &AttentionOptions::new().with_softcap(4.0), false)
        .unwrap_err();
    assert!(r.contains("switched off"), "{r}");
}

/// The CPU backend runs every option over contiguous and paged caches, with the keys split
/// over several ranges (a long cache) or not, as the reference does on the same K/V.
#[test]
fn cached_attention_on_the_cpu_runs_every_option() {
    let backend = CpuAttentionBackend::new();
    for (paged, len, sq, causal) in [
        (false, 700, 1, true),
        (true, 700, 3, true),
        (false, 90, 20, false),
        (true, 1300, 2, false),
    ] {
        let spec = common::spec(B, HKV, D, len + 8, DType::F32);
        let mut cache = if paged {
            forge_attn::KvCache::paged(spec, 16, B * (len + 8).div_ceil(16), Device::Cpu)
        } else {
            forge_attn::KvCache::contiguous(
                spec,
                forge_attn::KvCacheLayout::Contiguous,
                Device::Cpu,
            )
        }
        .unwrap();
        let k = random_tensor(&[B, len, HKV, D], DType::F32, Device::Cpu, 61);
        let v = random_tensor(&[B, len, HKV, D], DType::F32, Device::Cpu, 62);
        cache.append(&k, &v).unwrap();
        let config = AttentionConfig::new(H * D, H, 4096)
            .with_num_kv_heads(HKV)
            .with_causal(causal)
            .with_scale(0.5);
        let q = random_tensor(&[B, sq, H, D], DType::F32, Device::Cpu, 63);
        for (name, options) in option_sets() {
            let mut out = DeviceTensor::zeros(q.shape(), DType::F32, Device::Cpu).unwrap();
            let mut lse = DeviceTensor::zeros(&[B, H, sq], DType::F32, Device::Cpu).unwrap();
            backend
                .forward_cached_with(&config, &options, &q, &cache, &mut out, Some(&mut lse))
                .unwrap();
            let (want, want_lse) = attention_f64_with(&config, &options, &q, &k, &v, None).unwrap();
            let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
            let what = format!("{name} paged {paged} len {len} sq {sq} causal {causal}");
            assert!(err <= F32_BOUND, "{what}: {err:e}");
            for (g, w) in lse.to_f32_vec().unwrap().iter().zip(&want_lse) {
                if *w == f64::NEG_INFINITY {
                    assert_eq!(*g, f32::NEG_INFINITY, "{what}");
                } else {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * w.abs().max(1.0),
                        "{what}: {g} vs {w}"
                    );
                }
            }
        }
        // A refused cached call changes nothing.
        let mut out = cpu_f32(&vec![5.0; B * sq * H * D], q.shape());
        let mut bad = DeviceTensor::zeros(&[B, sq, H], DType::F32, Device::Cpu).unwrap();
        let e = backend
            .forward_cached_with(
                &config,
                &AttentionOptions::new().with_softcap(2.0),
                &q,
                &cache,
                &mut out,
                Some(&mut bad),
            )
            .unwrap_err();
        assert!(
            matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "lse"),
            "{e:?}"
        );
        assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 5.0));
    }
}
