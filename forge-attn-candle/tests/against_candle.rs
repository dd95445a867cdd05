//! forge-attn through candle tensors against candle's own attention (matmul + softmax in
//! candle, in f32) on the same tensors: contiguous, strided and narrowed inputs, GQA,
//! causal with seq_q != seq_k, every dtype, the packed ragged form, and the refusals.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use forge_attn_candle::{
    flash_attn, flash_attn_alibi, flash_attn_alibi_windowed_softcap, flash_attn_varlen,
    flash_attn_windowed,
};

/// Attention written with candle's own ops, in f32: `q [B, Sq, H, D]`, `k/v [B, Sk, Hkv, D]`.
fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let right = if causal { Some(0) } else { None };
    candle_attention_with(q, k, v, scale, (None, right), None, None)
}

/// The same with a window (bottom-right aligned), ALiBi slopes and a softcap, in the
/// order forge-attn documents: softcap, then the ALiBi bias, then the window.
fn candle_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    window: (Option<usize>, Option<usize>),
    alibi: Option<&[f32]>,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (_, sq, h, _) = q.dims4()?;
    let (_, sk, hkv, _) = k.dims4()?;
    let group = h / hkv;
    let f = |t: &Tensor| t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (f(q)?, f(k)?, f(v)?);
    // GQA: every KV head serves `group` consecutive query heads.
    let repeat = |t: Tensor| -> Result<Tensor> {
        let (b, hk, s, d) = t.dims4()?;
        t.unsqueeze(2)?
            .broadcast_as((b, hk, group, s, d))?
            .reshape((b, hk * group, s, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = (q.matmul(&k.t()?)? * scale as f64)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap as f64)?.tanh()? * cap as f64)?;
    }
    // Bias and window per (head, query, key), the aligned query index a = i + sk - sq.
    let mut bias = vec![0f32; h * sq * sk];
    for hh in 0..h {
        for i in 0..sq {
            let a = (i + sk) as i64 - sq as i64;
            for j in 0..sk {
                let j64 = j as i64;
                let keep = window.0.is_none_or(|l| j64 >= a - l as i64)
                    && window.1.is_none_or(|r| j64 <= a + r as i64);
                bias[(hh * sq + i) * sk + j] = if !keep {
                    f32::NEG_INFINITY
                } else {
                    alibi.map_or(0.0, |s| -s[hh] * (a - j64).abs() as f32)
                };
            }
        }
    }
    scores = scores.broadcast_add(&Tensor::from_vec(bias, (h, sq, sk), q.device())?)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((num / den.max(1e-30)).sqrt())
}

fn bound(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

fn randn(shape: (usize, usize, usize, usize), dt: DType) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_dtype(dt)
}

#[test]
fn matches_candle_on_contiguous_inputs() -> Result<()> {
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for &(b, sq, sk, h, hkv, d, causal) in &[
            (1, 1, 37, 4, 4, 64, false),
            (2, 5, 5, 8, 2, 32, true),
            (1, 7, 19, 6, 3, 128, true),
            (3, 16, 16, 2, 1, 80, false),
        ] {
            let q = randn((b, sq, h, d), dt)?;
            let k = randn((b, sk, hkv, d), dt)?;
            let v = randn((b, sk, hkv, d), dt)?;
            let scale = 1.0 / (d as f32).sqrt();
            let got = flash_attn(&q, &k, &v, scale, causal)?;
            assert_eq!(got.dims(), q.dims());
            assert_eq!(got.dtype(), dt);
            let want = candle_attention(&q, &k, &v, scale, causal)?;
            let e = rel_err(&got, &want)?;
            assert!(
                e < bound(dt),
                "{dt:?} {b} {sq} {sk} {h} {hkv} {d} {causal}: {e}"
            );
        }
    }
    Ok(())
}

#[test]
fn reads_strided_and_narrowed_views_in_place() -> Result<()> {
    let (b, h, hkv, d, cap) = (2, 8, 2, 64, 50);
    // q stored [B, H, S, D] and seen as [B, S, H, D]; k/v a preallocated cache of which
    // the first 23 positions are in use, seen through narrow.
    let q = randn((b, h, 3, d), DType::F32)?.transpose(1, 2)?;
    assert!(!q.is_contiguous());
    let kc = randn((b, cap, hkv, d), DType::F32)?;
    let vc = randn((b, cap, hkv, d), DType::F32)?;
    let k = kc.narrow(1, 0, 23)?;
    let v = vc.narrow(1, 0, 23)?;
    // A view starting past the storage's first element, too.
    let k2 = kc.narrow(1, 4, 19)?;
    let v2 = vc.narrow(1, 4, 19)?;
    for (k, v) in [(&k, &v), (&k2, &v2)] {
        let got = flash_attn(&q, k, v, 0.125, true)?;
        let want = candle_attention(&q, k, v, 0.125, true)?;
        assert!(rel_err(&got, &want)? < 1e-5);
    }
    Ok(())
}

#[test]
fn packed_ragged_sequences_match_one_call_per_sequence() -> Result<()> {
    let (h, hkv, d) = (4, 2, 64);
    let lens_q = [3usize, 0, 1, 6];
    let lens_k = [5usize, 2, 9, 6];
    let cu = |l: &[usize]| {
        let mut c = vec![0u32];
        for &x in l {
            c.push(c[c.len() - 1] + x as u32);
        }
        c
    };
    let (cq, ck) = (cu(&lens_q), cu(&lens_k));
    let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
    let q = Tensor::randn(0f32, 1.0, (tq, h, d), &Device::Cpu)?;
    let k = Tensor::randn(0f32, 1.0, (tk, hkv, d), &Device::Cpu)?;
    let v = Tensor::randn(0f32, 1.0, (tk, hkv, d), &Device::Cpu)?;
    let sq = Tensor::new(cq.as_slice(), &Device::Cpu)?;
    let sk = Tensor::new(ck.as_slice(), &Device::Cpu)?;
    let got = flash_attn_varlen(&q, &k, &v, &sq, &sk, 6, 9, 0.125, true)?;
    assert_eq!(got.dims(), q.dims());
    for i in 0..lens_q.len() {
        if lens_q[i] == 0 {
            continue;
        }
        let (q0, k0) = (cq[i] as usize, ck[i] as usize);
        let qi = q.i(q0..q0 + lens_q[i])?.unsqueeze(0)?;
        let ki = k.i(k0..k0 + lens_k[i])?.unsqueeze(0)?;
        let vi = v.i(k0..k0 + lens_k[i])?.unsqueeze(0)?;
        let want = candle_attention(&qi, &ki, &vi, 0.125, true)?.squeeze(0)?;
        let e = rel_err(&got.i(q0..q0 + lens_q[i])?, &want)?;
        assert!(e < 1e-5, "sequence {i}: {e}");
    }
    Ok(())
}

#[test]
fn refusals_say_what_was_expected() -> Result<()> {
    let q = randn((1, 2, 4, 64), DType::F32)?;
    let k = randn((1, 3, 2, 64), DType::F32)?;
    let cases: Vec<(Tensor, Tensor, Tensor, &str)> = vec![
        (
            q.clone(),
            k.clone(),
            randn((1, 3, 2, 32), DType::F32)?,
            "shape of k",
        ),
        (
            q.clone(),
            randn((1, 3, 3, 64), DType::F32)?,
            randn((1, 3, 3, 64), DType::F32)?,
            "dividing",
        ),
        (
            q.clone(),
            randn((1, 3, 2, 32), DType::F32)?,
            randn((1, 3, 2, 32), DType::F32)?,
            "head_dim",
        ),
        (
            q.clone(),
            randn((2, 3, 2, 64), DType::F32)?,
            randn((2, 3, 2, 64), DType::F32)?,
            "batch",
        ),
        (q.i(0)?, k.i(0)?, k.i(0)?, "rank 4"),
        (
            q.to_dtype(DType::F64)?,
            k.to_dtype(DType::F64)?,
            k.to_dtype(DType::F64)?,
            "f32, f16 or bf16",
        ),
    ];
    for (q, k, v, want) in cases {
        let e = flash_attn(&q, &k, &v, 0.125, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
    // candle itself refuses mixed dtypes before the op runs; forge-attn's own refusals
    // (here a softmax scale that is not finite) come back wrapped.
    let e = flash_attn(&q, &k, &k, f32::NAN, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale"), "{e}");
    let bad = Tensor::new(&[0u32, 3, 2], &Device::Cpu)?;
    let ok = Tensor::new(&[0u32, 2], &Device::Cpu)?;
    let e = flash_attn_varlen(&q.i(0)?, &k.i(0)?, &k.i(0)?, &ok, &bad, 2, 3, 0.1, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same number"), "{e}");
    Ok(())
}

#[test]
fn windows_alibi_and_softcap_match_candle() -> Result<()> {
    let (b, sq, sk, h, hkv, d) = (2, 9, 40, 4, 2, 64);
    let q = randn((b, sq, h, d), DType::F32)?;
    let k = randn((b, sk, hkv, d), DType::F32)?;
    let v = randn((b, sk, hkv, d), DType::F32)?;
    let slopes = [0.5f32, 0.25, 0.125, 0.0625];
    let st = Tensor::new(&slopes, &Device::Cpu)?;
    let check = |got: Tensor, want: Tensor, what: &str| -> Result<()> {
        let e = rel_err(&got, &want)?;
        assert!(e < 1e-5, "{what}: {e}");
        Ok(())
    };
    for w in [
        (Some(5), Some(0)),
        (Some(3), Some(2)),
        (None, Some(0)),
        (Some(0), Some(0)),
    ] {
        check(
            flash_attn_windowed(&q, &k, &v, 0.125, w.0, w.1)?,
            candle_attention_with(&q, &k, &v, 0.125, w, None, None)?,
            &format!("window {w:?}"),
        )?;
    }
    for causal in [false, true] {
        let right = if causal { Some(0) } else { None };
        check(
            flash_attn_alibi(&q, &k, &v, &st, 0.125, causal)?,
            candle_attention_with(&q, &k, &v, 0.125, (None, right), Some(&slopes), None)?,
            &format!("alibi causal={causal}"),
        )?;
    }
    check(
        flash_attn_alibi_windowed_softcap(&q, &k, &v, Some(&st), 0.3, Some(7), Some(0), Some(5.0))?,
        candle_attention_with(
            &q,
            &k,
            &v,
            0.3,
            (Some(7), Some(0)),
            Some(&slopes),
            Some(5.0),
        )?,
        "alibi + window + softcap",
    )?;
    // Slopes of the wrong shape or dtype are refused before anything runs.
    for bad in [
        Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?,
        st.to_dtype(DType::F16)?,
    ] {
        let e = flash_attn_alibi(&q, &k, &v, &bad, 0.125, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("alibi_slopes"), "{e}");
    }
    let e = flash_attn_alibi_windowed_softcap(&q, &k, &v, None, 0.1, None, None, Some(-1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("softcap"), "{e}");
    Ok(())
}
