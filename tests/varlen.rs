//! Varlen (packed ragged) attention: the CPU backend against the f64 reference on ragged
//! lengths (0 and 1 included) with and without options and the packed log-sum-exp, every
//! validation error leaving the output untouched, and the refusal of backends without it.

use forge_attn::reference::{relative_l2_error, varlen_attention_f64};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionOptions, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, KvCacheLayout, VarlenBatch,
};

mod common;
use common::{cpu_f32, random_tensor, F32_BOUND};

const H: usize = 4;
const HKV: usize = 2;
const D: usize = 16;

fn config(causal: bool) -> AttentionConfig {
    AttentionConfig::new(H * D, H, 8)
        .with_num_kv_heads(HKV)
        .with_causal(causal)
        .with_scale(0.5)
}

struct Packed {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    batch: VarlenBatch,
}

fn packed(q_lens: &[usize], k_lens: &[usize], dtype: DType, seed: u64) -> Packed {
    let (tq, tk) = (q_lens.iter().sum::<usize>(), k_lens.iter().sum::<usize>());
    Packed {
        q: random_tensor(&[tq, H, D], dtype, Device::Cpu, seed),
        k: random_tensor(&[tk, HKV, D], dtype, Device::Cpu, seed + 1),
        v: random_tensor(&[tk, HKV, D], dtype, Device::Cpu, seed + 2),
        batch: VarlenBatch::from_lengths(q_lens, k_lens, Device::Cpu).unwrap(),
    }
}

/// Log-sum-exps agree: both -inf, or within `tol`.
fn lse_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "lse {i}");
        } else {
            assert!((g as f64 - w).abs() < tol, "lse {i}: {g} vs {w}");
        }
    }
}

fn check(
    config: &AttentionConfig,
    options: &AttentionOptions,
    p: &Packed,
    with_lse: bool,
    bound: f64,
) {
    let mut out = DeviceTensor::zeros(p.q.shape(), p.q.dtype(), Device::Cpu).unwrap();
    let tq = p.q.shape()[0];
    let mut lse = DeviceTensor::zeros(&[H, tq], DType::F32, Device::Cpu).unwrap();
    CpuAttentionBackend
        .forward_varlen(
            config,
            options,
            &p.q,
            &p.k,
            &p.v,
            &p.batch,
            &mut out,
            with_lse.then_some(&mut lse),
        )
        .unwrap();
    let (want, want_lse) =
        varlen_attention_f64(config, options, &p.q, &p.k, &p.v, &p.batch).unwrap();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    assert!(err < bound, "relative error {err}");
    if with_lse {
        lse_close(&lse.to_host::<f32>().unwrap(), &want_lse, 1e-4);
    }
}

const Q_LENS: [usize; 7] = [0, 1, 5, 70, 130, 1, 3];
const K_LENS: [usize; 7] = [3, 1, 0, 70, 200, 40, 2];

#[test]
fn ragged_lengths_match_the_reference() {
    for causal in [false, true] {
        let p = packed(&Q_LENS, &K_LENS, DType::F32, 11);
        check(
            &config(causal),
            &AttentionOptions::new(),
            &p,
            true,
            F32_BOUND,
        );
    }
}

#[test]
fn half_precision_matches_the_reference() {
    for dtype in [DType::F16, DType::BF16] {
        let p = packed(&Q_LENS, &K_LENS, dtype, 21);
        check(&config(true), &AttentionOptions::new(), &p, false, 1e-2);
    }
}

#[test]
fn options_combined_with_gqa_and_lse_match_the_reference() {
    let sinks = cpu_f32(&[0.3, -1.0, 2.0, 0.0], &[H]);
    let slopes = cpu_f32(&[0.5, 0.25, 0.125, 0.0625], &[H]);
    let p = packed(&Q_LENS, &K_LENS, DType::F32, 31);
    for causal in [false, true] {
        let o = AttentionOptions::new()
            .with_window(Some(17), Some(3))
            .with_softcap(2.0)
            .with_sinks(sinks.clone());
        check(&config(causal), &o, &p, true, F32_BOUND);
        let o = AttentionOptions::new().with_alibi_slopes(slopes.clone());
        check(&config(causal), &o, &p, true, F32_BOUND);
    }
}

/// A sequence with queries and no key gives zeros, with the sink (or -inf) as lse.
#[test]
fn a_sequence_without_keys_gives_zeros_and_its_sink() {
    let p = packed(&[2, 3], &[4, 0], DType::F32, 41);
    let sinks = cpu_f32(&[0.3, -1.0, 2.0, 0.0], &[H]);
    let o = AttentionOptions::new().with_sinks(sinks);
    let mut out =
        DeviceTensor::from_f32(&[9.0; 5 * H * D], &[5, H, D], DType::F32, Device::Cpu).unwrap();
    let mut lse = DeviceTensor::zeros(&[H, 5], DType::F32, Device::Cpu).unwrap();
    CpuAttentionBackend
        .forward_varlen(
            &config(true),
            &o,
            &p.q,
            &p.k,
            &p.v,
            &p.batch,
            &mut out,
            Some(&mut lse),
        )
        .unwrap();
    let got = out.to_f32_vec().unwrap();
    assert!(got[2 * H * D..].iter().all(|&x| x == 0.0));
    assert!(got[..2 * H * D].iter().all(|&x| x != 9.0));
    let l = lse.to_host::<f32>().unwrap();
    for (h, s) in [0.3f32, -1.0, 2.0, 0.0].iter().enumerate() {
        assert_eq!(&l[h * 5 + 2..h * 5 + 5], &[*s; 3]);
    }
}

/// Each refusal names the problem and leaves `out` and `lse` as they were.
#[test]
fn every_validation_error_leaves_the_output_untouched() {
    let p = packed(&[2, 3], &[4, 5], DType::F32, 51);
    let cfg = config(true);
    let i32s = |v: &[i32]| DeviceTensor::from_host(v, &[v.len()], Device::Cpu).unwrap();
    let good_q = i32s(&[0, 2, 5]);
    let good_k = i32s(&[0, 4, 9]);
    let batch = |cq: DeviceTensor, ck: DeviceTensor, mq, mk| VarlenBatch::new(cq, ck, mq, mk);
    let f32_offsets = cpu_f32(&[0.0, 2.0, 5.0], &[3]);
    let cases: Vec<(VarlenBatch, &str)> = vec![
        (
            batch(f32_offsets, good_k.clone(), 3, 5),
            "dtype mismatch for cu_seqlens_q",
        ),
        (
            batch(i32s(&[1, 2, 5]), good_k.clone(), 3, 5),
            "cu_seqlens_q[0]",
        ),
        (
            batch(i32s(&[0, 3, 2, 5]), i32s(&[0, 4, 4, 9]), 5, 5),
            "non-decreasing",
        ),
        (
            batch(i32s(&[0, 2, 4]), good_k.clone(), 3, 5),
            "the last offset",
        ),
        (
            batch(good_q.clone(), i32s(&[0, 4, 8]), 3, 5),
            "the last offset",
        ),
        (
            batch(good_q.clone(), good_k.clone(), 2, 5),
            "max_seqlen_q = 2",
        ),
        (
            batch(good_q.clone(), good_k.clone(), 3, 4),
            "max_seqlen_k = 4",
        ),
        (batch(good_q.clone(), i32s(&[0, 9]), 3, 9), "cu_seqlens_k"),
        (batch(i32s(&[0]), i32s(&[0]), 3, 9), "batch + 1"),
    ];
    let sentinel = vec![7.0f32; 5 * H * D];
    for (b, want) in cases {
        let mut out =
            DeviceTensor::from_f32(&sentinel, &[5, H, D], DType::F32, Device::Cpu).unwrap();
        let mut lse =
            DeviceTensor::from_f32(&[7.0; H * 5], &[H, 5], DType::F32, Device::Cpu).unwrap();
        let e = CpuAttentionBackend
            .forward_varlen(
                &cfg,
                &AttentionOptions::new(),
                &p.q,
                &p.k,
                &p.v,
                &b,
                &mut out,
                Some(&mut lse),
            )
            .unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert_eq!(out.to_f32_vec().unwrap(), sentinel);
        assert_eq!(lse.to_f32_vec().unwrap(), vec![7.0; H * 5]);
    }
    // Operand errors.
    let t = |shape: &[usize], dtype| DeviceTensor::zeros(shape, dtype, Device::Cpu).unwrap();
    let run = |q: &DeviceTensor,
               k: &DeviceTensor,
               out: &mut DeviceTensor,
               lse: Option<&mut DeviceTensor>,
               o: &AttentionOptions| {
        CpuAttentionBackend.forward_varlen(&cfg, o, q, k, &p.v, &p.batch, out, lse)
    };
    let plain = AttentionOptions::new();
    let mut out = DeviceTensor::from_f32(&sentinel, &[5, H, D], DType::F32, Device::Cpu).unwrap();
    let e = run(&t(&[5, H + 1, D], DType::F32), &p.k, &mut out, None, &plain).unwrap_err();
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "q"),
        "{e}"
    );
    let e = run(&p.q, &t(&[9, HKV, D], DType::F16), &mut out, None, &plain).unwrap_err();
    assert!(
        matches!(&e, AttentionError::DTypeMismatch { what, .. } if what == "k"),
        "{e}"
    );
    let e = run(
        &p.q,
        &t(&[9, HKV + 1, D], DType::F32),
        &mut out,
        None,
        &plain,
    )
    .unwrap_err();
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "k"),
        "{e}"
    );
    let mut bad_lse = t(&[H, 4], DType::F32);
    let e = run(&p.q, &p.k, &mut out, Some(&mut bad_lse), &plain).unwrap_err();
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "lse"),
        "{e}"
    );
    let mut bad_lse = t(&[H, 5], DType::F16);
    let e = run(&p.q, &p.k, &mut out, Some(&mut bad_lse), &plain).unwrap_err();
    assert!(
        matches!(&e, AttentionError::DTypeMismatch { what, .. } if what == "lse"),
        "{e}"
    );
    let o = AttentionOptions::new().with_sinks(cpu_f32(&[0.0; 3], &[3]));
    let e = run(&p.q, &p.k, &mut out, None, &o).unwrap_err();
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "sinks"),
        "{e}"
    );
    let o = AttentionOptions::new().with_softcap(-1.0);
    let e = run(&p.q, &p.k, &mut out, None, &o).unwrap_err();
    assert!(
        matches!(
            &e,
            AttentionError::InvalidConfig {
                field: "softcap",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(out.to_f32_vec().unwrap(), sentinel);
    let mut small = t(&[4, H, D], DType::F32);
    let e = run(&p.q, &p.k, &mut small, None, &plain).unwrap_err();
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "out"),
        "{e}"
    );
    // The output may not be an input.
    let mut alias = p.q.clone();
    let e = run(&p.q, &p.k, &mut alias, None, &plain).unwrap_err();
    assert!(
        matches!(&e, AttentionError::UnsupportedLayout { what, .. } if what == "out"),
        "{e}"
    );
    assert!(VarlenBatch::from_lengths(&[1], &[1, 2], Device::Cpu).is_err());
    assert!(VarlenBatch::from_lengths(&[i32::MAX as usize, 1], &[1, 1], Device::Cpu).is_err());
}

/// A backend with only the required methods refuses varlen and paged calls by name.
struct Minimal;

impl DeviceAttentionBackend for Minimal {
    fn name(&self) -> &str {
        "minimal"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn required_kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout::Contiguous
    }
    fn forward_into(
        &self,
        _: &AttentionConfig,
        _: &DeviceTensor,
        _: &DeviceTensor,
        _: &DeviceTensor,
        _: Option<&DeviceTensor>,
        _: &mut DeviceTensor,
    ) -> forge_attn::Result<forge_attn::AttentionPath> {
        Ok(forge_attn::AttentionPath::Cpu)
    }
}

#[test]
fn the_default_refuses_varlen_calls() {
    let p = packed(&[2, 3], &[4, 5], DType::F32, 61);
    let mut out = DeviceTensor::zeros(&[5, H, D], DType::F32, Device::Cpu).unwrap();
    let e = Minimal
        .forward_varlen(
            &config(true),
            &AttentionOptions::new(),
            &p.q,
            &p.k,
            &p.v,
            &p.batch,
            &mut out,
            None,
        )
        .unwrap_err();
    assert!(
        matches!(&e, AttentionError::NotSupported { backend, reason } if backend == "minimal" && reason.contains("varlen")),
        "{e}"
    );
}

#[test]
fn offsets_give_their_ranges_and_longest_sequences() {
    let batch = VarlenBatch::from_lengths(&Q_LENS, &K_LENS, Device::Cpu).unwrap();
    let (tq, tk) = (Q_LENS.iter().sum(), K_LENS.iter().sum());
    let offs = batch.validate(tq, tk, Device::Cpu).unwrap();
    assert_eq!(offs.batch(), Q_LENS.len());
    assert_eq!(offs.q_range(3), 6..76);
    assert_eq!(offs.k_range(2), 4..4);
    assert_eq!(offs.longest(), (130, 200));
    let empty = VarlenBatch::from_lengths(&[0, 0], &[0, 0], Device::Cpu).unwrap();
    assert_eq!(empty.validate(0, 0, Device::Cpu).unwrap().longest(), (0, 0));
}
