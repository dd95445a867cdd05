//! Plain reference attention for tests, examples and benches (feature `reference`, off by
//! default).
//!
//! [`attention_f64`] is the numerical ground truth: a direct triple loop in f64 with the
//! crate's contract (additive broadcast mask, bottom-right causal, zeros for rows that see
//! no key). [`attention_naive_in_dtype`] is the same loop with every intermediate rounded to
//! the input dtype; its error against the f64 result sets the tolerance for f16/bf16
//! backends. [`relative_l2_error`] compares results and [`random_values`] makes seeded test
//! data without extra crates.

use crate::config::{AttentionConfig, Layout};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::options::AttentionOptions;
use crate::problem::AttentionProblem;
use crate::tensor::DeviceTensor;

/// Host copies of one call's operands, in logical (row-major) order.
struct Operands {
    p: AttentionProblem,
    layout: Layout,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<(Vec<f32>, [usize; 3])>,
    window: (Option<usize>, Option<usize>),
    softcap: Option<f32>,
    alibi: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
}

impl Operands {
    fn read(
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
    ) -> Result<Self> {
        let p = AttentionProblem::new(config, q, k, v, mask)?;
        options.check(&p, None, &[])?;
        let per_head = |t: &Option<DeviceTensor>| t.as_ref().map(|t| t.to_f32_vec()).transpose();
        let mask = match mask {
            None => None,
            Some(m) => {
                // Row-major strides of the logical mask padded to [batch, head, query];
                // size-1 (broadcast) dimensions get stride 0.
                let sh = m.shape();
                let r = sh.len();
                let (sq, sk) = (sh[r - 2], sh[r - 1]);
                let (mb, mh) = match r {
                    2 => (0, 0),
                    3 => (if sh[0] == 1 { 0 } else { sq * sk }, 0),
                    _ => (
                        if sh[0] == 1 { 0 } else { sh[1] * sq * sk },
                        if sh[1] == 1 { 0 } else { sq * sk },
                    ),
                };
                Some((m.to_f32_vec()?, [mb, mh, sk]))
            }
        };
        Ok(Operands {
            layout: config.layout,
            q: q.to_f32_vec()?,
            k: k.to_f32_vec()?,
            v: v.to_f32_vec()?,
            mask,
            window: (options.window_left, options.window_right),
            softcap: options.softcap,
            alibi: per_head(&options.alibi_slopes)?,
            sinks: per_head(&options.sinks)?,
            p,
        })
    }

    /// Row-major offset of `(batch, head, seq, 0)` in an operand with `heads` heads and
    /// `seq` positions.
    fn at(&self, b: usize, h: usize, s: usize, heads: usize, seq: usize) -> usize {
        let d = self.p.head_dim;
        match self.layout {
            Layout::Bshd => ((b * seq + s) * heads + h) * d,
            Layout::Bhsd => ((b * heads + h) * seq + s) * d,
        }
    }

    /// Runs the reference loop; `round` is applied to every intermediate value. Returns
    /// the output and the log-sum-exp of each row (`[batch, heads, seq_q]`).
    ///
    /// Removed keys (causal cut, outside the window, mask exactly `-inf`) are skipped,
    /// never multiplied, so whatever K and V hold there cannot reach the output. A NaN
    /// score at a kept key (or a NaN sink) makes the whole row NaN; a row with no kept key
    /// is zeros, with log-sum-exp `-inf` (the sink's value when there are sinks).
    fn compute(&self, round: impl Fn(f64) -> f64) -> (Vec<f64>, Vec<f64>) {
        let p = &self.p;
        let (sq, sk, h, hk, d) = (p.seq_q, p.seq_k, p.num_heads, p.num_kv_heads, p.head_dim);
        let scale = round(p.scale as f64);
        let mut out = vec![0.0f64; p.batch * sq * h * d];
        let mut lse = vec![f64::NEG_INFINITY; p.batch * h * sq];
        // Score of each key, None when the key is removed.
        let mut scores = vec![None::<f64>; sk];
        for b in 0..p.batch {
            for hh in 0..h {
                let kvh = p.kv_head(hh);
                let sink = self.sinks.as_ref().map(|s| s[hh] as f64);
                for i in 0..sq {
                    let qo = self.at(b, hh, i, h, sq);
                    // Query i's key on the bottom-right aligned diagonal.
                    let a = i as i128 + sk as i128 - sq as i128;
                    let kept = |j: usize| {
                        let j = j as i128;
                        let causal_ok = !p.causal || j <= a;
                        let left_ok = self.window.0.is_none_or(|l| j >= a - l as i128);
                        let right_ok = self.window.1.is_none_or(|r| j <= a + r as i128);
                        causal_ok && left_ok && right_ok
                    };
                    let mut max = f64::NEG_INFINITY;
                    let mut nan = sink.is_some_and(f64::is_nan);
                    for (j, s) in scores.iter_mut().enumerate() {
                        let mask = self
                            .mask
                            .as_ref()
                            .map(|(m, [mb, mh, mq])| m[b * mb + hh * mh + i * mq + j]);
                        if !kept(j) || mask == Some(f32::NEG_INFINITY) {
                            *s = None;
                            continue;
                        }
                        let ko = self.at(b, kvh, j, hk, sk);
                        let dot: f64 = (0..d)
                            .map(|x| self.q[qo + x] as f64 * self.k[ko + x] as f64)
                            .sum();
                        let mut v = round(round(dot) * scale);
                        if let Some(cap) = self.softcap {
                            let cap = cap as f64;
                            v = round(cap * (v / cap).tanh());
                        }
                        if let Some(slopes) = &self.alibi {
                            let dist = (a - j as i128).unsigned_abs() as f64;
                            v = round(v - slopes[hh] as f64 * dist);
                        }
                        if let Some(a) = mask {
                            v = round(v + a as f64);
                        }
                        nan |= v.is_nan();
                        *s = Some(v);
                        max = max.max(v);
                    }
                    let oo = self.at(b, hh, i, h, sq);
                    let lo = (b * h + hh) * sq + i;
                    if nan {
                        out[oo..oo + d].fill(f64::NAN);
                        lse[lo] = f64::NAN;
                        continue;
                    }
                    if let Some(sink) = sink {
                        max = max.max(sink);
                    }
                    if max == f64::NEG_INFINITY {
                        // No visible key and no sink: zeros and -inf (already there).
                        continue;
                    }
                    let mut sum = sink.map_or(0.0, |sink| (sink - max).exp());
                    for s in scores.iter_mut().flatten() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    lse[lo] = max + sum.ln();
                    for s in scores.iter_mut().flatten() {
                        *s = round(*s / sum);
                    }
                    for x in 0..d {
                        let acc: f64 = scores
                            .iter()
                            .enumerate()
                            .filter_map(|(j, pj)| {
                                pj.map(|pj| pj * self.v[self.at(b, kvh, j, hk, sk) + x] as f64)
                            })
                            .sum();
                        out[oo + x] = round(acc);
                    }
                }
            }
        }
        (out, lse)
    }
}

/// Attention in f64 on the host, the ground truth for every backend.
///
/// Reads the tensors (any device, any strides) with [`DeviceTensor::to_f32_vec`] after
/// validating them like a backend would ([`AttentionProblem::new`]). The result is
/// row-major in `q`'s logical shape: `[batch, seq_q, heads, head_dim]` for
/// [`Layout::Bshd`], `[batch, heads, seq_q, head_dim]` for [`Layout::Bhsd`]. Rows that see no
/// key (all masked) are zeros.
///
/// The semantics are the crate's: a key removed for a row (causal cut, or mask value
/// exactly `-inf`) contributes nothing whatever K and V hold there; a NaN score at a kept
/// key (NaN mask value, NaN/inf in Q or K) makes the row NaN.
///
/// Scores are `scale * (q . k) + mask` computed in f64. This differs from an f32 computation
/// (torch's, and every backend's) only for huge finite mask values: `scale * s + m` rounds
/// to a multiple of the unit of `m`, which f32 makes coarse enough to blur or erase the
/// score differences from about `|m| > 1e3` (e.g. at `-1e12` on every key an f32 backend
/// gives the uniform average of the V rows, this function nearly the plain softmax), and
/// f64 only from about `|m| > 1e22`. At `-f32::MAX` (the padding value of many model codes)
/// both round every ordinary score to `-f32::MAX` and agree: a row whose every kept key has
/// it is the uniform average of those keys' V rows.
pub fn attention_f64(
    config: &AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
) -> Result<Vec<f64>> {
    let plain = AttentionOptions::default();
    Ok(Operands::read(config, &plain, q, k, v, mask)?
        .compute(|x| x)
        .0)
}

/// [`attention_f64`] with per-call options (window, softcap, ALiBi, sinks; the conventions
/// are [`crate::options`]'s), returning the output and each row's natural log-sum-exp
/// (`[batch, heads, seq_q]` row-major: `-inf` for a row that keeps no key and has no
/// sink, NaN for a NaN row). The order for each kept key is: scaled score, softcap, ALiBi
/// bias, mask; then the softmax with the sink in its denominator, all in f64.
pub fn attention_f64_with(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    Ok(Operands::read(config, options, q, k, v, mask)?.compute(|x| x))
}

/// The same computation done naively in `q`'s dtype: each score, the scale, each
/// probability and each output is rounded to that dtype (dot products and sums are exact,
/// as a matrix unit with wide accumulators would give). Its error against
/// [`attention_f64`] is the yardstick for f16/bf16 backends: theirs must be within twice
/// this one's (and under 1e-2). For f32 inputs it is a plain f32-rounded computation.
pub fn attention_naive_in_dtype(
    config: &AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
) -> Result<Vec<f32>> {
    attention_naive_in_dtype_with(config, &AttentionOptions::default(), q, k, v, mask)
}

/// [`attention_naive_in_dtype`] with per-call options, as [`attention_f64_with`] applies
/// them (each intermediate rounded to `q`'s dtype); the output only.
pub fn attention_naive_in_dtype_with(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
) -> Result<Vec<f32>> {
    let ops = Operands::read(config, options, q, k, v, mask)?;
    let round = |x: f64| -> f64 {
        match ops.p.dtype {
            DType::F32 => x as f32 as f64,
            DType::F16 => half::f16::from_f64(x).to_f64(),
            DType::BF16 => half::bf16::from_f64(x).to_f64(),
            // Operands::read refused integer operands already.
            DType::I32 | DType::U32 | DType::I64 => x,
        }
    };
    Ok(ops.compute(round).0.into_iter().map(|x| x as f32).collect())
}

/// `||got - want|| / ||want||` (L2 norms). When `want` is all zeros it is the absolute norm
/// `||got||`. A NaN in `got`, or a length mismatch, gives infinity.
pub fn relative_l2_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w) * (g as f64 - w);
        norm += w * w;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// `n` values uniform in [-1, 1) from a seeded generator (splitmix64): reproducible test
/// and example data with no extra dependency. The same seed always gives the same values.
pub fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // The top 24 bits are exactly representable in f32.
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// The options with their per-head tensors copied to the host (as f32), so that the
/// per-sequence host tensors of the reference can take them.
fn host_options(options: &AttentionOptions) -> Result<AttentionOptions> {
    let host = |t: &Option<DeviceTensor>| -> Result<Option<DeviceTensor>> {
        t.as_ref()
            .map(|t| DeviceTensor::from_f32(&t.to_f32_vec()?, t.shape(), DType::F32, Device::Cpu))
            .transpose()
    };
    let mut o = options.clone();
    o.alibi_slopes = host(&options.alibi_slopes)?;
    o.sinks = host(&options.sinks)?;
    Ok(o)
}

/// One sequence of `nq` queries (`q`: `[nq, H, D]` row-major) against `nk` keys (`k`, `v`:
/// `[nk, Hkv, D]` row-major) by [`attention_f64_with`]; a sequence with no key gives zeros
/// with log-sum-exp `-inf` (the head's sink with sinks). Returns `[nq, H, D]` and
/// `[H, nq]`.
fn one_sequence(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    nq: usize,
    nk: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (h, hkv, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    if nk == 0 {
        let sinks = options.sinks.as_ref().map(|s| s.to_f32_vec()).transpose()?;
        let lse = (0..h * nq)
            .map(|i| {
                sinks
                    .as_ref()
                    .map_or(f64::NEG_INFINITY, |s| s[i / nq] as f64)
            })
            .collect();
        return Ok((vec![0.0; nq * h * d], lse));
    }
    let cfg = config
        .clone()
        .with_layout(Layout::Bshd)
        .with_max_sequence_length(nq.max(nk));
    let t = |x: &[f32], shape: &[usize]| DeviceTensor::from_f32(x, shape, DType::F32, Device::Cpu);
    let qt = t(q, &[1, nq, h, d])?;
    let kt = t(k, &[1, nk, hkv, d])?;
    let vt = t(v, &[1, nk, hkv, d])?;
    attention_f64_with(&cfg, options, &qt, &kt, &vt, None)
}

/// Varlen attention in f64 (see [`crate::varlen`]): each sequence of the packed `q`
/// (`[total_q, H, D]`), `k` and `v` (`[total_k, Hkv, D]`) gathered into dense host
/// tensors and run by [`attention_f64_with`]. Returns the output `[total_q, H, D]` and
/// the log-sum-exp `[H, total_q]`, row-major.
pub fn varlen_attention_f64(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    batch: &crate::varlen::VarlenBatch,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (h, hkv, d) = (config.num_heads, config.num_kv_heads, config.head_dim);
    let (total_q, total_k) = (q.shape()[0], k.shape()[0]);
    let offs = batch.validate(total_q, total_k, q.device())?;
    let options = host_options(options)?;
    let (qh, kh, vh) = (q.to_f32_vec()?, k.to_f32_vec()?, v.to_f32_vec()?);
    let mut out = vec![0.0; total_q * h * d];
    let mut lse = vec![f64::NEG_INFINITY; h * total_q];
    for b in 0..offs.batch() {
        let (qr, kr) = (offs.q_range(b), offs.k_range(b));
        if qr.is_empty() {
            continue;
        }
        let (o, l) = one_sequence(
            config,
            &options,
            &qh[qr.start * h * d..qr.end * h * d],
            &kh[kr.start * hkv * d..kr.end * hkv * d],
            &vh[kr.start * hkv * d..kr.end * hkv * d],
            qr.len(),
            kr.len(),
        )?;
        out[qr.start * h * d..qr.end * h * d].copy_from_slice(&o);
        for hh in 0..h {
            let dst = &mut lse[hh * total_q + qr.start..hh * total_q + qr.end];
            dst.copy_from_slice(&l[hh * qr.len()..(hh + 1) * qr.len()]);
        }
    }
    Ok((out, lse))
}

/// The held tokens of sequence `b` of `kv`, gathered through its block table: K and V as
/// `[len, Hkv, D]` row-major.
fn gather_sequence(
    kv: &crate::paged::PagedKv,
    g: &crate::paged::PagedGeometry,
    k: &[f32],
    v: &[f32],
    b: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (hkv, d, ps) = (g.num_kv_heads, g.head_dim, kv.page_size);
    let len = g.lens[b];
    let (mut kd, mut vd) = (vec![0.0; len * hkv * d], vec![0.0; len * hkv * d]);
    for j in 0..len {
        let (page, pos) = g.locate(b, j, ps);
        for hh in 0..hkv {
            // Row-major offsets in the pool's logical shape.
            let src = match kv.layout {
                crate::paged::PageLayout::Nhd => ((page * ps + pos) * hkv + hh) * d,
                crate::paged::PageLayout::Hnd => ((page * hkv + hh) * ps + pos) * d,
            };
            let dst = (j * hkv + hh) * d;
            kd[dst..dst + d].copy_from_slice(&k[src..src + d]);
            vd[dst..dst + d].copy_from_slice(&v[src..src + d]);
        }
    }
    (kd, vd)
}

/// Paged attention in f64 (see [`crate::paged`]): `q` `[B, Sq, H, D]` (or `[B, H, Sq, D]`
/// with `Layout::Bhsd`), each sequence's held tokens gathered through the block table and
/// run by [`attention_f64_with`] (bottom-right causal at the sequence's own length; a
/// sequence holding none gives zeros). Returns the output in `q`'s logical shape and the
/// log-sum-exp `[B, H, Sq]`, row-major.
pub fn paged_attention_f64(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    kv: &crate::paged::PagedKv,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let g = kv.validate()?;
    let (h, d) = (config.num_heads, config.head_dim);
    let sh = q.shape();
    let (bq, sq) = match config.layout {
        Layout::Bshd => (sh[0], sh[1]),
        Layout::Bhsd => (sh[0], sh[2]),
    };
    if bq != g.batch || q.rank() != 4 {
        return Err(crate::error::AttentionError::shape(
            "q batch (the block table's sequences)",
            g.batch,
            format!("{sh:?}"),
        ));
    }
    let options = host_options(options)?;
    let (qh, kh, vh) = (
        q.to_f32_vec()?,
        kv.k_pages.to_f32_vec()?,
        kv.v_pages.to_f32_vec()?,
    );
    // Offset of (b, i, head) in q's logical order.
    let at = |b: usize, i: usize, hh: usize| match config.layout {
        Layout::Bshd => ((b * sq + i) * h + hh) * d,
        Layout::Bhsd => ((b * h + hh) * sq + i) * d,
    };
    let mut out = vec![0.0; bq * sq * h * d];
    let mut lse = vec![f64::NEG_INFINITY; bq * h * sq];
    for b in 0..bq {
        let mut qb = vec![0.0; sq * h * d];
        for i in 0..sq {
            for hh in 0..h {
                let dst = (i * h + hh) * d;
                qb[dst..dst + d].copy_from_slice(&qh[at(b, i, hh)..at(b, i, hh) + d]);
            }
        }
        let (kd, vd) = gather_sequence(kv, &g, &kh, &vh, b);
        let (o, l) = one_sequence(config, &options, &qb, &kd, &vd, sq, g.lens[b])?;
        for i in 0..sq {
            for hh in 0..h {
                let src = (i * h + hh) * d;
                out[at(b, i, hh)..at(b, i, hh) + d].copy_from_slice(&o[src..src + d]);
            }
        }
        lse[b * h * sq..(b + 1) * h * sq].copy_from_slice(&l);
    }
    Ok((out, lse))
}

/// [`paged_attention_f64`] with packed queries (`q` `[total_q, H, D]`, sequence `b`
/// owning rows `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`). Returns the output
/// `[total_q, H, D]` and the log-sum-exp `[H, total_q]`, row-major.
pub fn paged_varlen_attention_f64(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    cu_seqlens_q: &DeviceTensor,
    kv: &crate::paged::PagedKv,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let g = kv.validate()?;
    let (h, d) = (config.num_heads, config.head_dim);
    let total_q = q.shape()[0];
    let offs = crate::varlen::read_offsets(
        "cu_seqlens_q",
        cu_seqlens_q,
        total_q,
        "total_q",
        total_q,
        q.device(),
    )?;
    if offs.len() != g.batch + 1 {
        return Err(crate::error::AttentionError::shape(
            "cu_seqlens_q",
            format!("[{}]", g.batch + 1),
            format!("[{}]", offs.len()),
        ));
    }
    let options = host_options(options)?;
    let (qh, kh, vh) = (
        q.to_f32_vec()?,
        kv.k_pages.to_f32_vec()?,
        kv.v_pages.to_f32_vec()?,
    );
    let mut out = vec![0.0; total_q * h * d];
    let mut lse = vec![f64::NEG_INFINITY; h * total_q];
    for b in 0..g.batch {
        let (s, e) = (offs[b], offs[b + 1]);
        if s == e {
            continue;
        }
        let (kd, vd) = gather_sequence(kv, &g, &kh, &vh, b);
        let (o, l) = one_sequence(
            config,
            &options,
            &qh[s * h * d..e * h * d],
            &kd,
            &vd,
            e - s,
            g.lens[b],
        )?;
        out[s * h * d..e * h * d].copy_from_slice(&o);
        for hh in 0..h {
            lse[hh * total_q + s..hh * total_q + e]
                .copy_from_slice(&l[hh * (e - s)..(hh + 1) * (e - s)]);
        }
    }
    Ok((out, lse))
}
