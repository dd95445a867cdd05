//! Varlen and paged calls on the host: each sequence is a one-sequence problem over views
//! of the packed operands (no copy of Q, K or V), run by the dense or the cached tiled
//! task; everything is checked before the first sequence runs.

use super::cached::{attend, Keys};
use super::{execute, Isa, Paging, Tuning};
use crate::backend::AttentionPath;
use crate::config::AttentionConfig;
use crate::device::Device;
use crate::error::Result;
use crate::options::{AttentionOptions, LseStrides};
use crate::paged::{PagedGeometry, PagedKv};
use crate::problem::{AttentionProblem, CachedKeys, HeadStrides};
use crate::tensor::DeviceTensor;
use crate::varlen::{
    check_packed_keys, check_packed_queries, on_device, PackedQueries, VarlenBatch,
};

/// Refuses a tensor that is not on the host.
fn on_host(what: &str, t: &DeviceTensor) -> Result<()> {
    on_device(what, t, Device::Cpu)
}

/// The one-sequence problem of `nq` packed queries against `nk` keys (at least one key
/// slot: a sequence holding none runs with its length 0).
fn sequence_problem(
    config: &AttentionConfig,
    pq: &PackedQueries,
    q: &DeviceTensor,
    nq: usize,
    nk: usize,
    k: HeadStrides,
    v: HeadStrides,
) -> (AttentionProblem, HeadStrides) {
    let p = AttentionProblem {
        batch: 1,
        seq_q: nq,
        seq_k: nk.max(1),
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        scale: config.effective_scale(),
        causal: config.is_causal,
        dtype: q.dtype(),
        device: Device::Cpu,
        q: HeadStrides {
            batch: 0,
            head: pq.q.1,
            seq: pq.q.0,
        },
        k,
        v,
        mask: None,
    };
    let os = HeadStrides {
        batch: 0,
        head: pq.out.1,
        seq: pq.out.0,
    };
    (p, os)
}

/// Rows `start .. start + n` of `out` and of `lse` (whose rows are its second dimension).
fn row_views(
    out: &DeviceTensor,
    lse: Option<&DeviceTensor>,
    lse_strides: Option<(usize, usize)>,
    start: usize,
    n: usize,
) -> Result<(DeviceTensor, Option<(DeviceTensor, LseStrides)>)> {
    let o = out.narrow(0, start, n)?;
    let l = match (lse, lse_strides) {
        (Some(l), Some((head, query))) => Some((
            l.narrow(1, start, n)?,
            LseStrides {
                batch: 0,
                head,
                query,
            },
        )),
        _ => None,
    };
    Ok((o, l))
}

/// `forward_varlen` of the CPU backend.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_varlen(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    batch: &VarlenBatch,
    out: &mut DeviceTensor,
    lse: Option<&mut DeviceTensor>,
    tuning: Tuning,
) -> Result<AttentionPath> {
    let pq = check_packed_queries(
        config,
        options,
        q,
        &[q, k, v],
        out,
        lse.as_deref(),
        Device::Cpu,
    )?;
    let (ks, vs) = check_packed_keys(config, q, k, v, batch, Device::Cpu)?;
    let offs = batch.validate(q.shape()[0], k.shape()[0], Device::Cpu)?;
    let strides = |(seq, head): (usize, usize)| HeadStrides {
        batch: 0,
        head,
        seq,
    };
    let lse = lse.map(|l| &*l);
    for b in 0..offs.batch() {
        let (qr, kr) = (offs.q_range(b), offs.k_range(b));
        if qr.is_empty() {
            continue;
        }
        let (p, os) =
            sequence_problem(config, &pq, q, qr.len(), kr.len(), strides(ks), strides(vs));
        let qv = q.narrow(0, qr.start, qr.len())?;
        let kv = k.narrow(0, kr.start, kr.len())?;
        let vv = v.narrow(0, kr.start, kr.len())?;
        let (mut ov, mut lv) = row_views(out, lse, pq.lse, qr.start, qr.len())?;
        let lse_b = lv.as_mut().map(|(l, st)| (l, *st));
        if kr.is_empty() {
            // No key: the cached task gives zeros (and the sink or -inf) for a length 0.
            let keys = Keys {
                k: &kv,
                v: &vv,
                lens: &[0],
                paging: None,
            };
            attend(
                &p,
                os,
                options,
                &qv,
                keys,
                &mut ov,
                lse_b,
                tuning.isa,
                usize::MAX,
            )?;
        } else {
            execute(
                &p,
                os,
                options,
                [&qv, &kv, &vv],
                None,
                &mut ov,
                lse_b,
                tuning,
            )?;
        }
    }
    Ok(AttentionPath::Cpu)
}

/// Checks `kv` against the call: on the host, the config's KV heads and head_dim, q's
/// dtype.
fn check_pages(config: &AttentionConfig, q: &DeviceTensor, kv: &PagedKv) -> Result<PagedGeometry> {
    kv.check_for_call(config, q, Device::Cpu)
}

/// `forward_paged` of the CPU backend.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_paged(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    kv: &PagedKv,
    out: &mut DeviceTensor,
    lse: Option<&mut DeviceTensor>,
    isa: Isa,
    min_split_keys: usize,
) -> Result<AttentionPath> {
    on_host("q", q)?;
    let g = check_pages(config, q, kv)?;
    let keys = CachedKeys {
        batch: g.batch,
        num_kv_heads: g.num_kv_heads,
        head_dim: g.head_dim,
        dtype: kv.dtype(),
        device: Device::Cpu,
        // Sequences of length 0 read no key; one key slot keeps the problem valid.
        max_len: g.lens.iter().copied().max().unwrap_or(0).max(1),
        strides: kv.strides_of(&kv.k_pages),
    };
    let mut p = AttentionProblem::cached(config, q, &keys, 0)?;
    p.v = kv.strides_of(&kv.v_pages);
    let mut inputs = vec![q, &kv.k_pages, &kv.v_pages];
    inputs.extend(options.alibi_slopes.as_ref());
    inputs.extend(options.sinks.as_ref());
    let os = p.output_strides(config.layout, out, &inputs)?;
    let mut others = inputs.clone();
    others.push(&*out);
    let lse_strides = options.check(&p, lse.as_deref(), &others)?;
    let paging = Paging {
        page_size: kv.page_size,
        max_pages: g.max_pages,
    };
    let keys = Keys {
        k: &kv.k_pages,
        v: &kv.v_pages,
        lens: &g.lens,
        paging: Some((paging, &g.table)),
    };
    attend(
        &p,
        os,
        options,
        q,
        keys,
        out,
        lse.zip(lse_strides),
        isa,
        min_split_keys,
    )?;
    Ok(AttentionPath::Cpu)
}

/// `forward_paged_varlen` of the CPU backend.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_paged_varlen(
    config: &AttentionConfig,
    options: &AttentionOptions,
    q: &DeviceTensor,
    cu_seqlens_q: &DeviceTensor,
    max_seqlen_q: usize,
    kv: &PagedKv,
    out: &mut DeviceTensor,
    lse: Option<&mut DeviceTensor>,
    isa: Isa,
    min_split_keys: usize,
) -> Result<AttentionPath> {
    let pq = check_packed_queries(
        config,
        options,
        q,
        &[q, &kv.k_pages, &kv.v_pages],
        out,
        lse.as_deref(),
        Device::Cpu,
    )?;
    on_host("cu_seqlens_q", cu_seqlens_q)?;
    let g = check_pages(config, q, kv)?;
    let offs = g.query_offsets(cu_seqlens_q, q.shape()[0], max_seqlen_q, Device::Cpu)?;
    let (ks, vs) = (kv.strides_of(&kv.k_pages), kv.strides_of(&kv.v_pages));
    let lse = lse.map(|l| &*l);
    let mp = g.max_pages;
    for b in 0..g.batch {
        let (start, nq) = (offs[b], offs[b + 1] - offs[b]);
        if nq == 0 {
            continue;
        }
        let len = g.lens[b];
        let (p, os) = sequence_problem(config, &pq, q, nq, len, ks, vs);
        let qv = q.narrow(0, start, nq)?;
        let (mut ov, mut lv) = row_views(out, lse, pq.lse, start, nq)?;
        let paging = Paging {
            page_size: kv.page_size,
            max_pages: mp,
        };
        let keys = Keys {
            k: &kv.k_pages,
            v: &kv.v_pages,
            lens: std::slice::from_ref(&g.lens[b]),
            paging: Some((paging, &g.table[b * mp..(b + 1) * mp])),
        };
        let lse_b = lv.as_mut().map(|(l, st)| (l, *st));
        attend(
            &p,
            os,
            options,
            &qv,
            keys,
            &mut ov,
            lse_b,
            isa,
            min_split_keys,
        )?;
    }
    Ok(AttentionPath::Cpu)
}
