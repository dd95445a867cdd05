//! The CPU backend's numerical contract at its edges: removed keys (a `-inf` mask, the
//! causal cut, keys past a view's length, whole removed tiles) whose K/V hold NaN or inf
//! never reach the output; huge finite negative masks behave as in f32 torch; accuracy
//! holds at 100,000 keys; very large head dims run. Results are compared with the f64
//! reference wherever it applies.

use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, CpuAttentionBackend, DType, Device, DeviceAttentionBackend, DeviceTensor,
    Layout,
};

mod common;
use common::{cpu_half_bound, F32_BOUND, HALF_CEILING};

/// Logical `[batch, seq, heads, head_dim]` dims in `layout`'s order.
fn dims(layout: Layout, b: usize, s: usize, h: usize, d: usize) -> [usize; 4] {
    match layout {
        Layout::Bshd => [b, s, h, d],
        Layout::Bhsd => [b, h, s, d],
        l => unimplemented!("layout {l:?}"),
    }
}

/// Row-major offset of `(batch, seq, head)` in an operand of `layout`.
fn at(layout: Layout, sh: [usize; 4], b: usize, s: usize, h: usize) -> usize {
    match layout {
        Layout::Bshd => ((b * sh[1] + s) * sh[2] + h) * sh[3],
        Layout::Bhsd => ((b * sh[1] + h) * sh[2] + s) * sh[3],
        l => unimplemented!("layout {l:?}"),
    }
}

fn tensor(values: &[f32], shape: &[usize], dtype: DType) -> DeviceTensor {
    DeviceTensor::from_f32(values, shape, dtype, Device::Cpu).unwrap()
}

fn mask_tensor(values: &[f32], shape: &[usize]) -> DeviceTensor {
    DeviceTensor::from_host(values, shape, Device::Cpu).unwrap()
}

fn cpu(
    config: &AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
) -> Vec<f32> {
    CpuAttentionBackend::new()
        .forward(config, q, k, v, mask)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

/// The poisons a removed key's K or V may hold.
const POISONS: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// How the mask that removes the poisoned keys is broadcast.
#[derive(Debug, Clone, Copy)]
enum MaskForm {
    /// `[Sq, Sk]`
    Rank2,
    /// `[B, 1, Sq, Sk]`
    HeadBroadcast,
    /// `[B, H, Sq, Sk]`, the poisoned keys differing per batch and kv head.
    Full,
}

/// NaN/inf written into K or V at keys a `-inf` mask removes for every row that reads them
/// (including two whole key tiles, one in the middle) gives what the f64 reference gives
/// on the same inputs with those keys clean, in every layout, mask form, GQA ratio, dtype
/// and both CPU paths (tiles widened per task for one query, shared for many).
#[test]
fn poison_at_minus_inf_masked_keys_never_reaches_the_output() {
    let (b, sk, d) = (2, 300, 24);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        for form in [MaskForm::Rank2, MaskForm::HeadBroadcast, MaskForm::Full] {
            for (h, hk) in [(4, 2), (3, 3), (4, 1)] {
                for sq in [1, 7, 130] {
                    for (p, &poison) in POISONS.iter().enumerate() {
                        for dtype in [DType::F32, DType::BF16] {
                            masked_poison_case(layout, form, b, sq, sk, h, hk, d, poison, dtype, p);
                        }
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn masked_poison_case(
    layout: Layout,
    form: MaskForm,
    b: usize,
    sq: usize,
    sk: usize,
    h: usize,
    hk: usize,
    d: usize,
    poison: f32,
    dtype: DType,
    seed: usize,
) {
    let seed = seed as u64 * 10;
    let g = h / hk;
    // Removed for every row of batch `bb`, kv head `kvh`: keys 64..128 and 192..256 (whole
    // tiles), every 7th key, and for the full form a few depending on (bb, kvh).
    let removed = |bb: usize, kvh: usize, j: usize| {
        (64..128).contains(&j)
            || (192..256).contains(&j)
            || j % 7 == 3
            || matches!(form, MaskForm::Full) && j % 11 == (bb * hk + kvh) % 11
    };
    let random_mask = random_values(b * h * sq * sk, seed + 4);
    let (mshape, mvals): (Vec<usize>, Vec<f32>) = match form {
        MaskForm::Rank2 | MaskForm::HeadBroadcast => {
            let mb = if matches!(form, MaskForm::Rank2) {
                1
            } else {
                b
            };
            let vals = (0..mb * sq * sk)
                .map(|x| {
                    let (bb, j) = (x / (sq * sk), x % sk);
                    // Both forms remove the same keys in every kv head.
                    if (0..hk).any(|kvh| removed(bb, kvh, j)) {
                        f32::NEG_INFINITY
                    } else {
                        random_mask[x]
                    }
                })
                .collect();
            let shape = if mb == 1 {
                vec![sq, sk]
            } else {
                vec![b, 1, sq, sk]
            };
            (shape, vals)
        }
        MaskForm::Full => {
            let vals = (0..b * h * sq * sk)
                .map(|x| {
                    let (bb, hh, j) = (x / (h * sq * sk), x / (sq * sk) % h, x % sk);
                    if removed(bb, hh / g, j) {
                        f32::NEG_INFINITY
                    } else {
                        random_mask[x]
                    }
                })
                .collect();
            (vec![b, h, sq, sk], vals)
        }
    };
    let is_removed = |bb: usize, kvh: usize, j: usize| match form {
        MaskForm::Full => removed(bb, kvh, j),
        _ => (0..hk).any(|kh| removed(bb, kh, j)),
    };
    let kshape = dims(layout, b, sk, hk, d);
    let clean_k = random_values(b * sk * hk * d, seed + 1);
    let clean_v = random_values(b * sk * hk * d, seed + 2);
    let (mut pk, mut pv) = (clean_k.clone(), clean_v.clone());
    for bb in 0..b {
        for kvh in 0..hk {
            for j in (0..sk).filter(|&j| is_removed(bb, kvh, j)) {
                let o = at(layout, kshape, bb, j, kvh);
                // K poisoned at even keys, V at odd ones, both every 5th.
                if j % 2 == 0 || j % 5 == 0 {
                    pk[o..o + d].fill(poison);
                }
                if j % 2 == 1 || j % 5 == 0 {
                    pv[o + d / 2] = poison;
                }
            }
        }
    }
    let config = AttentionConfig::new(h * d, h, 512)
        .with_num_kv_heads(hk)
        .with_layout(layout);
    let q = tensor(
        &random_values(b * sq * h * d, seed),
        &dims(layout, b, sq, h, d),
        dtype,
    );
    let mask = mask_tensor(&mvals, &mshape);
    let got = cpu(
        &config,
        &q,
        &tensor(&pk, &kshape, dtype),
        &tensor(&pv, &kshape, dtype),
        Some(&mask),
    );
    let (ck, cv) = (
        tensor(&clean_k, &kshape, dtype),
        tensor(&clean_v, &kshape, dtype),
    );
    let want = attention_f64(&config, &q, &ck, &cv, Some(&mask)).unwrap();
    // The reference skips removed keys too: poisoned inputs give it the same result.
    let want_poisoned = attention_f64(
        &config,
        &q,
        &tensor(&pk, &kshape, dtype),
        &tensor(&pv, &kshape, dtype),
        Some(&mask),
    )
    .unwrap();
    let what = format!("{layout:?} {form:?} h {h}/{hk} sq {sq} poison {poison} {dtype}");
    assert_eq!(want, want_poisoned, "{what}: reference");
    let err = relative_l2_error(&got, &want);
    let bound = match dtype {
        DType::F32 => F32_BOUND,
        _ => {
            let naive = attention_naive_in_dtype(&config, &q, &ck, &cv, Some(&mask)).unwrap();
            cpu_half_bound(relative_l2_error(&naive, &want))
        }
    };
    assert!(
        err <= bound,
        "{what}: relative L2 error {err:e} (bound {bound:e})"
    );
}

/// NaN/inf in the K or V of keys past the causal cut of some rows reaches exactly the rows
/// that keep them: the others equal the clean reference, the keeping rows are not finite.
/// Rows that see no key at all (more queries than keys) are zeros.
#[test]
fn poison_past_the_causal_cut_reaches_only_the_rows_that_keep_it() {
    let (b, h, hk, d) = (1, 4, 2, 20);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        for (sq, sk) in [(70, 200), (130, 130), (150, 100), (3, 140)] {
            for &poison in &POISONS {
                for in_v in [false, true] {
                    let kshape = dims(layout, b, sk, hk, d);
                    let qshape = dims(layout, b, sq, h, d);
                    let clean_k = random_values(b * sk * hk * d, 1);
                    let clean_v = random_values(b * sk * hk * d, 2);
                    // The last 3 keys of kv head 1: seen by the last 3 queries only.
                    let (mut pk, mut pv) = (clean_k.clone(), clean_v.clone());
                    for j in sk - 3..sk {
                        let o = at(layout, kshape, 0, j, 1);
                        if in_v {
                            pv[o + 1] = poison;
                        } else {
                            pk[o..o + d].fill(poison);
                        }
                    }
                    let config = AttentionConfig::new(h * d, h, 512)
                        .with_num_kv_heads(hk)
                        .with_layout(layout)
                        .with_causal(true);
                    let q = tensor(&random_values(b * sq * h * d, 3), &qshape, DType::F32);
                    let got = cpu(
                        &config,
                        &q,
                        &tensor(&pk, &kshape, DType::F32),
                        &tensor(&pv, &kshape, DType::F32),
                        None,
                    );
                    let want = attention_f64(
                        &config,
                        &q,
                        &tensor(&clean_k, &kshape, DType::F32),
                        &tensor(&clean_v, &kshape, DType::F32),
                        None,
                    )
                    .unwrap();
                    let what = format!("{layout:?} {sq}x{sk} poison {poison} in_v {in_v}");
                    for hh in 0..h {
                        for i in 0..sq {
                            let o = at(layout, qshape, 0, i, hh);
                            let (row, want_row) = (&got[o..o + d], &want[o..o + d]);
                            // Query i sees one of keys sk-3.. iff sk - 3 <= i + sk - sq.
                            let sees_poison = hh / (h / hk) == 1 && i + 3 >= sq;
                            if sees_poison {
                                assert!(
                                    row.iter().any(|x| !x.is_finite()),
                                    "{what}: head {hh} row {i} should be poisoned"
                                );
                            } else {
                                let err = relative_l2_error(row, want_row);
                                assert!(err < F32_BOUND, "{what}: head {hh} row {i}: {err:e}");
                                if i + sk < sq {
                                    assert!(row.iter().all(|&x| x == 0.0), "{what}: row {i}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Keys past a narrowed view's length (its storage holds NaN there, in K, V and the mask)
/// are not part of the problem: the result is the reference's on the view.
#[test]
fn poison_past_the_view_length_is_never_read() {
    let (b, h, hk, d, full) = (2, 4, 2, 16, 260);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        for (sq, sk) in [(1, 150), (9, 200), (100, 64)] {
            for causal in [false, true] {
                let kshape = dims(layout, b, full, hk, d);
                let seq_axis = match layout {
                    Layout::Bshd => 1,
                    Layout::Bhsd => 2,
                    l => unimplemented!("layout {l:?}"),
                };
                let (mut kv, mut vv) = (
                    random_values(b * full * hk * d, 1),
                    random_values(b * full * hk * d, 2),
                );
                for bb in 0..b {
                    for kvh in 0..hk {
                        for j in sk..full {
                            let o = at(layout, kshape, bb, j, kvh);
                            kv[o..o + d].fill(f32::NAN);
                            vv[o..o + d].fill(f32::INFINITY);
                        }
                    }
                }
                let k = tensor(&kv, &kshape, DType::F32)
                    .narrow(seq_axis, 0, sk)
                    .unwrap();
                let v = tensor(&vv, &kshape, DType::F32)
                    .narrow(seq_axis, 0, sk)
                    .unwrap();
                let mvals: Vec<f32> = random_values(sq * full, 3)
                    .into_iter()
                    .enumerate()
                    .map(|(x, m)| if x % full >= sk { f32::NAN } else { m })
                    .collect();
                let mask = mask_tensor(&mvals, &[sq, full]).narrow(1, 0, sk).unwrap();
                let config = AttentionConfig::new(h * d, h, 512)
                    .with_num_kv_heads(hk)
                    .with_layout(layout)
                    .with_causal(causal);
                let q = tensor(
                    &random_values(b * sq * h * d, 4),
                    &dims(layout, b, sq, h, d),
                    DType::F32,
                );
                let got = cpu(&config, &q, &k, &v, Some(&mask));
                let want = attention_f64(&config, &q, &k, &v, Some(&mask)).unwrap();
                let err = relative_l2_error(&got, &want);
                assert!(
                    err < F32_BOUND,
                    "{layout:?} {sq}x{sk} causal {causal}: {err:e}"
                );
            }
        }
    }
}

/// In f32, `scale * s + m` is `m` for every ordinary score when `m` is `-f32::MAX` or
/// `-1e12`, so a row whose every key has such a mask is the uniform average of its visible
/// V rows (torch's result). The f64 reference agrees at `-f32::MAX` (f64 rounds the scores
/// away there too) and keeps the softmax at `-1e12`, as its docs say.
#[test]
fn huge_negative_mask_everywhere_gives_the_uniform_average() {
    let (b, h, hk, d) = (2, 4, 2, 24);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        for (sq, sk) in [(1, 200), (5, 70), (130, 150)] {
            for causal in [false, true] {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    for huge in [-f32::MAX, -1e12] {
                        let kshape = dims(layout, b, sk, hk, d);
                        let qshape = dims(layout, b, sq, h, d);
                        let config = AttentionConfig::new(h * d, h, 512)
                            .with_num_kv_heads(hk)
                            .with_layout(layout)
                            .with_causal(causal);
                        let q = tensor(&random_values(b * sq * h * d, 1), &qshape, dtype);
                        let k = tensor(&random_values(b * sk * hk * d, 2), &kshape, dtype);
                        let v = tensor(&random_values(b * sk * hk * d, 3), &kshape, dtype);
                        let mask = mask_tensor(&vec![huge; sq * sk], &[sq, sk]);
                        let got = cpu(&config, &q, &k, &v, Some(&mask));
                        // Uniform average over each row's visible keys, from the values as
                        // stored in the dtype.
                        let vv = v.to_f32_vec().unwrap();
                        let mut want = vec![0.0f64; got.len()];
                        for bb in 0..b {
                            for hh in 0..h {
                                for i in 0..sq {
                                    let visible = if causal { i + 1 + sk - sq } else { sk };
                                    let o = at(layout, qshape, bb, i, hh);
                                    for j in 0..visible {
                                        let vo = at(layout, kshape, bb, j, hh / (h / hk));
                                        for x in 0..d {
                                            want[o + x] += vv[vo + x] as f64 / visible as f64;
                                        }
                                    }
                                }
                            }
                        }
                        let what = format!("{layout:?} {sq}x{sk} causal {causal} {dtype} {huge}");
                        let err = relative_l2_error(&got, &want);
                        let bound = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
                        assert!(err < bound, "{what}: {err:e}");
                        if dtype == DType::F32 {
                            let reference: Vec<f32> =
                                attention_f64(&config, &q, &k, &v, Some(&mask))
                                    .unwrap()
                                    .iter()
                                    .map(|&x| x as f32)
                                    .collect();
                            let softmax = attention_f64(&config, &q, &k, &v, None).unwrap();
                            if huge == -f32::MAX {
                                let err = relative_l2_error(&reference, &want);
                                assert!(err < 1e-6, "{what}: reference {err:e}");
                            } else {
                                let err = relative_l2_error(&reference, &softmax);
                                assert!(err < 1e-3, "{what}: reference {err:e}");
                                let gap = relative_l2_error(&reference, &want);
                                assert!(gap > 1e-2, "{what}: reference {gap:e} from uniform");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A mask of `0` and `-f32::MAX` keeps the keys with `0`: the softmax over those, as with
/// `-inf` in place of `-f32::MAX`, including rows whose first key tiles are all
/// `-f32::MAX` (the running max then jumps from `-f32::MAX` to a real score) and rows
/// whose only kept keys come first.
#[test]
fn zero_and_minus_f32_max_give_the_softmax_over_kept_keys() {
    let (b, h, hk, d, sq, sk) = (1, 2, 1, 32, 6, 260);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        for causal in [false, true] {
            let keep = |i: usize, j: usize| match i {
                0 => j >= 200,
                1 => j < 3,
                2 => j == 255,
                _ => (i * 31 + j * 17) % 5 < 2,
            };
            let huge: Vec<f32> = (0..sq * sk)
                .map(|x| if keep(x / sk, x % sk) { 0.0 } else { -f32::MAX })
                .collect();
            let inf: Vec<f32> = huge
                .iter()
                .map(|&m| if m == 0.0 { 0.0 } else { f32::NEG_INFINITY })
                .collect();
            let config = AttentionConfig::new(h * d, h, 512)
                .with_num_kv_heads(hk)
                .with_layout(layout)
                .with_causal(causal);
            let q = tensor(
                &random_values(b * sq * h * d, 1),
                &dims(layout, b, sq, h, d),
                DType::F32,
            );
            let kshape = dims(layout, b, sk, hk, d);
            let k = tensor(&random_values(b * sk * hk * d, 2), &kshape, DType::F32);
            let v = tensor(&random_values(b * sk * hk * d, 3), &kshape, DType::F32);
            let got = cpu(&config, &q, &k, &v, Some(&mask_tensor(&huge, &[sq, sk])));
            let want =
                attention_f64(&config, &q, &k, &v, Some(&mask_tensor(&inf, &[sq, sk]))).unwrap();
            let err = relative_l2_error(&got, &want);
            assert!(err < F32_BOUND, "{layout:?} causal {causal}: {err:e}");
            // The f64 reference agrees here: the -f32::MAX keys weigh exp(-3.4e38) = 0.
            let reference =
                attention_f64(&config, &q, &k, &v, Some(&mask_tensor(&huge, &[sq, sk]))).unwrap();
            let gap = reference
                .iter()
                .zip(&want)
                .fold(0.0f64, |g, (a, b)| g.max((a - b).abs()));
            assert!(
                gap < 1e-12,
                "{layout:?} causal {causal}: reference gap {gap:e}"
            );
        }
    }
}

/// A NaN mask value at a kept key makes that row NaN and no other (also when it is the
/// row's only non-`-inf` key); at a key the causal cut removes it changes nothing.
#[test]
fn nan_in_the_mask_poisons_only_its_row() {
    let (h, d, sq, sk) = (2, 16, 4, 100);
    for causal in [false, true] {
        let mut m = random_values(sq * sk, 5);
        // Row 1: NaN at a key every row sees.
        m[sk + 10] = f32::NAN;
        // Row 2: NaN at its only non -inf key.
        for j in 0..sk {
            m[2 * sk + j] = if j == 70 { f32::NAN } else { f32::NEG_INFINITY };
        }
        // Row 0: NaN at the last key, which the causal cut removes for it.
        m[sk - 1] = f32::NAN;
        let mask = mask_tensor(&m, &[sq, sk]);
        let config = AttentionConfig::new(h * d, h, 512).with_causal(causal);
        let q = tensor(&random_values(sq * h * d, 1), &[1, sq, h, d], DType::F32);
        let k = tensor(&random_values(sk * h * d, 2), &[1, sk, h, d], DType::F32);
        let v = tensor(&random_values(sk * h * d, 3), &[1, sk, h, d], DType::F32);
        let got = cpu(&config, &q, &k, &v, Some(&mask));
        let want = attention_f64(&config, &q, &k, &v, Some(&mask)).unwrap();
        for i in 0..sq {
            let (row, want_row) = (
                &got[i * h * d..(i + 1) * h * d],
                &want[i * h * d..(i + 1) * h * d],
            );
            let poisoned = i == 1 || i == 2 || (i == 0 && !causal);
            assert_eq!(
                row.iter().all(|x| x.is_nan()),
                poisoned,
                "causal {causal} row {i}: {row:?}"
            );
            assert_eq!(
                want_row.iter().all(|x| x.is_nan()),
                poisoned,
                "reference row {i}"
            );
            if !poisoned {
                assert!(relative_l2_error(row, want_row) < F32_BOUND, "row {i}");
            }
        }
    }
}

/// The data of a long-sequence accuracy case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Long {
    /// Random K and V.
    Random,
    /// Every key the same row (a stride-0 view), random V: every weight is equal.
    IdenticalKeys,
    /// Every key and every value the same row: the output is that row, and a plain running
    /// sum of 100,000 equal terms drifts the most.
    IdenticalKeysAndValues,
    /// Every key the same row, V in [0, 1): the sum grows with every key.
    IdenticalKeysPositiveValues,
}

const LONG: [Long; 4] = [
    Long::Random,
    Long::IdenticalKeys,
    Long::IdenticalKeysAndValues,
    Long::IdenticalKeysPositiveValues,
];

/// Relative L2 error of the CPU backend against the reference over `sk` keys, and that of
/// the naive in-dtype computation (0 for f32).
fn long_error(sk: usize, sq: usize, data: Long, dtype: DType) -> (f64, f64) {
    let (h, hk, d) = (2, 1, 64);
    let config = AttentionConfig::new(h * d, h, sk).with_num_kv_heads(hk);
    let q = tensor(&random_values(sq * h * d, 1), &[1, sq, h, d], dtype);
    let one_row = |seed| {
        tensor(&random_values(hk * d, seed), &[1, 1, hk, d], dtype)
            .broadcast_dim(1, sk)
            .unwrap()
    };
    let k = match data {
        Long::Random => tensor(&random_values(sk * hk * d, 2), &[1, sk, hk, d], dtype),
        _ => one_row(2),
    };
    let v = match data {
        Long::IdenticalKeysAndValues => one_row(3),
        Long::IdenticalKeysPositiveValues => {
            let values: Vec<f32> = random_values(sk * hk * d, 3)
                .into_iter()
                .map(|x| 0.5 * x + 0.5)
                .collect();
            tensor(&values, &[1, sk, hk, d], dtype)
        }
        _ => tensor(&random_values(sk * hk * d, 3), &[1, sk, hk, d], dtype),
    };
    let got = cpu(&config, &q, &k, &v, None);
    let want = attention_f64(&config, &q, &k, &v, None).unwrap();
    let naive = if dtype == DType::F32 {
        0.0
    } else {
        let naive = attention_naive_in_dtype(&config, &q, &k, &v, None).unwrap();
        relative_l2_error(&naive, &want)
    };
    (relative_l2_error(&got, &want), naive)
}

/// f32 within 1e-5 of the reference at 100,000 keys, for data that stresses the running
/// sums, on both CPU paths (one query: tiles widened per task; four: shared tiles).
#[test]
fn f32_accuracy_at_100k_keys() {
    for sq in [1, 4] {
        for data in LONG {
            let (err, _) = long_error(100_000, sq, data, DType::F32);
            assert!(err < F32_BOUND, "sq {sq} {data:?}: {err:e}");
        }
    }
}

/// f16/bf16 at 100,000 keys within the dtype contract (twice the naive in-dtype
/// computation's error, under 1e-2).
#[test]
fn half_accuracy_at_100k_keys() {
    for dtype in [DType::F16, DType::BF16] {
        for data in LONG {
            let (err, naive) = long_error(100_000, 1, data, dtype);
            let bound = cpu_half_bound(naive);
            assert!(
                err <= bound && err < HALF_CEILING,
                "{dtype} {data:?}: {err:e} (naive {naive:e})"
            );
        }
    }
}

/// Head dims far past the usual tile sizes run (narrower key tiles, fewer rows per task)
/// and agree with the reference, with GQA, a mask and causal cut.
#[test]
fn very_large_head_dims_run() {
    for (d, sq, sk, h, hk) in [
        (65_536, 3, 40, 4, 2),
        (1 << 20, 2, 20, 2, 1),
        (8_200, 70, 90, 8, 1),
        // A group too large for one task's rows at this head_dim: split over tasks.
        (65_536, 2, 20, 16, 1),
    ] {
        for layout in [Layout::Bshd, Layout::Bhsd] {
            let config = AttentionConfig::new(h * d, h, 512)
                .with_num_kv_heads(hk)
                .with_layout(layout)
                .with_causal(true);
            let q = tensor(
                &random_values(sq * h * d, 1),
                &dims(layout, 1, sq, h, d),
                DType::F32,
            );
            let kshape = dims(layout, 1, sk, hk, d);
            let k = tensor(&random_values(sk * hk * d, 2), &kshape, DType::F32);
            let v = tensor(&random_values(sk * hk * d, 3), &kshape, DType::F32);
            let m: Vec<f32> = random_values(sq * sk, 4)
                .into_iter()
                .map(|x| if x > 0.6 { f32::NEG_INFINITY } else { x })
                .collect();
            let mask = mask_tensor(&m, &[sq, sk]);
            let got = cpu(&config, &q, &k, &v, Some(&mask));
            let want = attention_f64(&config, &q, &k, &v, Some(&mask)).unwrap();
            let err = relative_l2_error(&got, &want);
            assert!(err < F32_BOUND, "d {d} {layout:?}: {err:e}");
        }
    }
}
