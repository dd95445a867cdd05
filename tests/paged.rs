//! Paged attention over caller-owned pools: the CPU backend against the f64 reference for
//! page sizes 1, 7, 16 and 256 with pages in random order, both pool layouts, ragged
//! lengths (0 and 1 included), any number of queries (decode, drafts, chunked prefill,
//! queries longer than one tile against caches shorter than one page), options with GQA
//! and the log-sum-exp, packed queries, a KvCache's own view, and every validation error
//! leaving the output untouched.

use forge_attn::reference::{
    paged_attention_f64, paged_varlen_attention_f64, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionOptions, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, KvCache, Layout, PageLayout, PagedKv, VarlenBatch,
};

mod common;
use common::{cpu_f32, random_tensor, spec, F32_BOUND};

const H: usize = 4;
const HKV: usize = 2;
const D: usize = 16;

fn config(causal: bool, layout: Layout) -> AttentionConfig {
    AttentionConfig::new(H * D, H, 8)
        .with_num_kv_heads(HKV)
        .with_causal(causal)
        .with_layout(layout)
        .with_scale(0.5)
}

/// Pools holding `lens` tokens per sequence (common::paged_pools) on the host.
fn pools(lens: &[usize], page_size: usize, layout: PageLayout, dtype: DType, seed: u64) -> PagedKv {
    common::paged_pools(lens, page_size, layout, dtype, HKV, D, Device::Cpu, seed)
}

fn q_shape(layout: Layout, b: usize, sq: usize) -> [usize; 4] {
    match layout {
        Layout::Bhsd => [b, H, sq, D],
        _ => [b, sq, H, D],
    }
}

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
    cfg: &AttentionConfig,
    o: &AttentionOptions,
    kv: &PagedKv,
    sq: usize,
    seed: u64,
    bound: f64,
) {
    let b = kv.seq_lens.shape()[0];
    let shape = q_shape(cfg.layout, b, sq);
    let q = random_tensor(&shape, kv.dtype(), Device::Cpu, seed);
    let mut out = DeviceTensor::zeros(&shape, kv.dtype(), Device::Cpu).unwrap();
    let mut lse = DeviceTensor::zeros(&[b, H, sq], DType::F32, Device::Cpu).unwrap();
    CpuAttentionBackend
        .forward_paged(cfg, o, &q, kv, &mut out, Some(&mut lse))
        .unwrap();
    let (want, want_lse) = paged_attention_f64(cfg, o, &q, kv).unwrap();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    assert!(
        err < bound,
        "page {} sq {sq}: relative error {err}",
        kv.page_size
    );
    lse_close(&lse.to_host::<f32>().unwrap(), &want_lse, 1e-4);
}

const LENS: [usize; 5] = [0, 1, 37, 300, 16];

#[test]
fn every_page_size_and_layout_matches_the_reference() {
    for page in [1, 7, 16, 256] {
        for pl in [PageLayout::Nhd, PageLayout::Hnd] {
            let kv = pools(&LENS, page, pl, DType::F32, page as u64);
            for sq in [1, 4, 20] {
                for (causal, layout) in [(true, Layout::Bshd), (false, Layout::Bhsd)] {
                    let cfg = config(causal, layout);
                    check(&cfg, &AttentionOptions::new(), &kv, sq, 3, F32_BOUND);
                }
            }
        }
    }
}

#[test]
fn half_precision_pools_match_the_reference() {
    for dtype in [DType::F16, DType::BF16] {
        let kv = pools(&LENS, 16, PageLayout::Nhd, dtype, 5);
        check(
            &config(true, Layout::Bshd),
            &AttentionOptions::new(),
            &kv,
            3,
            7,
            1e-2,
        );
    }
}

/// Hundreds of new queries against a long paged prefix, and queries longer than one key
/// tile against caches shorter than one page.
#[test]
fn chunked_prefill_and_short_caches_match_the_reference() {
    let kv = pools(&[1200, 700], 16, PageLayout::Nhd, DType::F32, 9);
    check(
        &config(true, Layout::Bshd),
        &AttentionOptions::new(),
        &kv,
        300,
        10,
        F32_BOUND,
    );
    let kv = pools(&[100, 90, 0], 256, PageLayout::Hnd, DType::F32, 11);
    check(
        &config(true, Layout::Bshd),
        &AttentionOptions::new(),
        &kv,
        90,
        12,
        F32_BOUND,
    );
}

#[test]
fn options_with_gqa_and_lse_match_the_reference() {
    let sinks = cpu_f32(&[0.3, -1.0, 2.0, 0.0], &[H]);
    let slopes = cpu_f32(&[0.5, 0.25, 0.125, 0.0625], &[H]);
    for page in [7, 16] {
        let kv = pools(&LENS, page, PageLayout::Nhd, DType::F32, 13);
        for causal in [true, false] {
            let cfg = config(causal, Layout::Bshd);
            let o = AttentionOptions::new()
                .with_window(Some(20), Some(2))
                .with_softcap(2.0)
                .with_sinks(sinks.clone());
            check(&cfg, &o, &kv, 40, 14, F32_BOUND);
            let o = AttentionOptions::new().with_alibi_slopes(slopes.clone());
            check(&cfg, &o, &kv, 5, 15, F32_BOUND);
        }
    }
}

/// Packed queries of different lengths per sequence (chunked prefill mixed with decodes).
#[test]
fn packed_queries_match_the_reference() {
    let sinks = cpu_f32(&[0.3, -1.0, 2.0, 0.0], &[H]);
    let lens = [0, 1, 37, 300, 16];
    let q_lens = [2, 1, 0, 120, 1];
    let kv = pools(&lens, 7, PageLayout::Nhd, DType::F32, 17);
    let cu = VarlenBatch::from_lengths(&q_lens, &lens, Device::Cpu)
        .unwrap()
        .cu_seqlens_q;
    let tq: usize = q_lens.iter().sum();
    let q = random_tensor(&[tq, H, D], DType::F32, Device::Cpu, 18);
    for o in [
        AttentionOptions::new(),
        AttentionOptions::new()
            .with_window(Some(30), None)
            .with_softcap(3.0)
            .with_sinks(sinks),
    ] {
        let cfg = config(true, Layout::Bshd);
        let mut out = DeviceTensor::zeros(&[tq, H, D], DType::F32, Device::Cpu).unwrap();
        let mut lse = DeviceTensor::zeros(&[H, tq], DType::F32, Device::Cpu).unwrap();
        CpuAttentionBackend
            .forward_paged_varlen(&cfg, &o, &q, &cu, 120, &kv, &mut out, Some(&mut lse))
            .unwrap();
        let (want, want_lse) = paged_varlen_attention_f64(&cfg, &o, &q, &cu, &kv).unwrap();
        let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
        assert!(err < F32_BOUND, "{err}");
        lse_close(&lse.to_host::<f32>().unwrap(), &want_lse, 1e-4);
    }
    // Too many queries for max_seqlen_q, and offsets for another batch.
    let mut out =
        DeviceTensor::from_f32(&vec![5.0; tq * H * D], &[tq, H, D], DType::F32, Device::Cpu)
            .unwrap();
    let cfg = config(true, Layout::Bshd);
    let e = CpuAttentionBackend
        .forward_paged_varlen(
            &cfg,
            &AttentionOptions::new(),
            &q,
            &cu,
            100,
            &kv,
            &mut out,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("max_seqlen_q = 100"), "{e}");
    let cu2 = VarlenBatch::from_lengths(&[62, 62], &[1, 1], Device::Cpu)
        .unwrap()
        .cu_seqlens_q;
    let e = CpuAttentionBackend
        .forward_paged_varlen(
            &cfg,
            &AttentionOptions::new(),
            &q,
            &cu2,
            100,
            &kv,
            &mut out,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("block table"), "{e}");
    assert!(out.to_f32_vec().unwrap().iter().all(|&x| x == 5.0));
}

/// A KvCache's paged view attends like forward_cached over the cache, paged or not.
#[test]
fn a_kv_cache_view_attends_like_forward_cached() {
    for page in [None, Some(4)] {
        let s = spec(2, HKV, D, 40, DType::F32);
        let mut cache = match page {
            Some(p) => KvCache::paged(s, p, 32, Device::Cpu).unwrap(),
            None => {
                KvCache::contiguous(s, forge_attn::KvCacheLayout::Contiguous, Device::Cpu).unwrap()
            }
        };
        let k = random_tensor(&[2, 13, HKV, D], DType::F32, Device::Cpu, 21);
        let v = random_tensor(&[2, 13, HKV, D], DType::F32, Device::Cpu, 22);
        cache.append_ragged(&k, &v, &[13, 6]).unwrap();
        let cfg = config(true, Layout::Bshd);
        let q = random_tensor(&[2, 3, H, D], DType::F32, Device::Cpu, 23);
        let mut a = DeviceTensor::zeros(&[2, 3, H, D], DType::F32, Device::Cpu).unwrap();
        let mut b = DeviceTensor::zeros(&[2, 3, H, D], DType::F32, Device::Cpu).unwrap();
        CpuAttentionBackend
            .forward_cached(&cfg, &q, &cache, &mut a)
            .unwrap();
        let view = cache.paged_view().unwrap();
        assert_eq!(view.layout, PageLayout::Hnd);
        CpuAttentionBackend
            .forward_paged(&cfg, &AttentionOptions::new(), &q, &view, &mut b, None)
            .unwrap();
        assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    }
}

/// Each refusal names the operand and the values, and writes nothing.
#[test]
fn every_validation_error_leaves_the_output_untouched() {
    let good = pools(&[5, 9], 4, PageLayout::Nhd, DType::F32, 31);
    let cfg = config(true, Layout::Bshd);
    let q = random_tensor(&[2, 2, H, D], DType::F32, Device::Cpu, 32);
    let i32t = |v: &[i32], shape: &[usize]| DeviceTensor::from_host(v, shape, Device::Cpu).unwrap();
    let table = good.block_table.to_host::<i32>().unwrap();
    let mp = good.block_table.shape()[1];
    let np = good.k_pages.shape()[0];
    let with = |f: &dyn Fn(&mut PagedKv)| {
        let mut kv = good.clone();
        f(&mut kv);
        kv
    };
    let mut out_of_pool = table.clone();
    out_of_pool[mp + 2] = np as i32;
    let mut negative = table.clone();
    negative[1] = -1;
    let cases: Vec<(PagedKv, &str)> = vec![
        (with(&|kv| kv.page_size = 0), "page_size"),
        (with(&|kv| kv.page_size = 5), "page_size = 5"),
        (with(&|kv| kv.layout = PageLayout::Hnd), "page_size = 4"),
        (
            with(&|kv| kv.v_pages = kv.v_pages.narrow(0, 0, 1).unwrap()),
            "v_pages",
        ),
        (
            with(&|kv| {
                kv.k_pages = kv
                    .k_pages
                    .narrow(0, 0, 1)
                    .unwrap()
                    .reshape(&[4, HKV, D])
                    .unwrap()
            }),
            "rank 4",
        ),
        (
            with(&|kv| kv.v_pages = random_tensor(kv.k_pages.shape(), DType::F16, Device::Cpu, 1)),
            "dtype mismatch for v_pages",
        ),
        (
            with(&|kv| kv.block_table = cpu_f32(&[0.0; 6], &[2, 3])),
            "dtype mismatch for block_table",
        ),
        (with(&|kv| kv.seq_lens = i32t(&[5, 9, 1], &[3])), "seq_lens"),
        (
            with(&|kv| kv.block_table = i32t(&table, &[2 * mp])),
            "rank 2",
        ),
        (
            with(&|kv| kv.seq_lens = i32t(&[-1, 9], &[2])),
            "seq_lens[0]",
        ),
        (
            with(&|kv| kv.seq_lens = i32t(&[5, (mp * 4 + 1) as i32], &[2])),
            "seq_lens[1]",
        ),
        (
            with(&|kv| kv.block_table = i32t(&out_of_pool, &[2, mp])),
            "block_table[1, 2]",
        ),
        (
            with(&|kv| kv.block_table = i32t(&negative, &[2, mp])),
            "block_table[0, 1]",
        ),
    ];
    let sentinel = vec![3.0f32; 2 * 2 * H * D];
    for (kv, want) in cases {
        let mut out =
            DeviceTensor::from_f32(&sentinel, &[2, 2, H, D], DType::F32, Device::Cpu).unwrap();
        let mut lse =
            DeviceTensor::from_f32(&[3.0; 2 * H * 2], &[2, H, 2], DType::F32, Device::Cpu).unwrap();
        let e = CpuAttentionBackend
            .forward_paged(
                &cfg,
                &AttentionOptions::new(),
                &q,
                &kv,
                &mut out,
                Some(&mut lse),
            )
            .unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert_eq!(out.to_f32_vec().unwrap(), sentinel);
        assert_eq!(lse.to_f32_vec().unwrap(), vec![3.0; 2 * H * 2]);
    }
    // The call's side: heads, head_dim, batch, dtype, out and lse.
    let mut out =
        DeviceTensor::from_f32(&sentinel, &[2, 2, H, D], DType::F32, Device::Cpu).unwrap();
    let run = |cfg: &AttentionConfig,
               q: &DeviceTensor,
               out: &mut DeviceTensor,
               lse: Option<&mut DeviceTensor>| {
        CpuAttentionBackend.forward_paged(cfg, &AttentionOptions::new(), q, &good, out, lse)
    };
    let e = run(&cfg.clone().with_num_kv_heads(1), &q, &mut out, None).unwrap_err();
    assert!(e.to_string().contains("kv heads"), "{e}");
    let q3 = random_tensor(&[3, 2, H, D], DType::F32, Device::Cpu, 1);
    let e = run(&cfg, &q3, &mut out, None).unwrap_err();
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    let qh = random_tensor(&[2, 2, H, D], DType::F16, Device::Cpu, 1);
    let e = run(&cfg, &qh, &mut out, None).unwrap_err();
    assert!(matches!(e, AttentionError::DTypeMismatch { .. }), "{e}");
    let mut lse = DeviceTensor::zeros(&[2, H, 3], DType::F32, Device::Cpu).unwrap();
    let e = run(&cfg, &q, &mut out, Some(&mut lse)).unwrap_err();
    assert!(
        matches!(&e, AttentionError::ShapeMismatch { what, .. } if what == "lse"),
        "{e}"
    );
    let mut in_pool = good.k_pages.narrow(0, 0, 1).unwrap();
    let e = run(&cfg, &q, &mut in_pool, None).unwrap_err();
    assert!(
        matches!(
            e,
            AttentionError::ShapeMismatch { .. } | AttentionError::UnsupportedLayout { .. }
        ),
        "{e}"
    );
    assert_eq!(out.to_f32_vec().unwrap(), sentinel);
}

/// Attention of fixed queries over sequence `b` of `cache` (all sequences computed).
fn attend_cache(cache: &KvCache, b: usize) -> Vec<f32> {
    let cfg = config(true, Layout::Bshd);
    let n = cache.batch();
    // The same queries for every sequence, so that sequences holding the same tokens
    // give the same rows.
    let one = random_values(2 * H * D, 77);
    let q = DeviceTensor::from_f32(&one.repeat(n), &[n, 2, H, D], DType::F32, Device::Cpu).unwrap();
    let mut out = DeviceTensor::zeros(&[n, 2, H, D], DType::F32, Device::Cpu).unwrap();
    let view = cache.paged_view().unwrap();
    CpuAttentionBackend
        .forward_paged(&cfg, &AttentionOptions::new(), &q, &view, &mut out, None)
        .unwrap();
    out.narrow(0, b, 1).unwrap().to_f32_vec().unwrap()
}

fn tokens(n: usize, seed: u64) -> (DeviceTensor, DeviceTensor) {
    (
        random_tensor(&[2, n, HKV, D], DType::F32, Device::Cpu, seed),
        random_tensor(&[2, n, HKV, D], DType::F32, Device::Cpu, seed + 1),
    )
}

#[test]
fn fork_shares_pages_and_copies_on_write() {
    for layout in [Some(4), None] {
        let s = spec(2, HKV, D, 40, DType::F32);
        let mut cache = match layout {
            Some(p) => KvCache::paged(s, p, 12, Device::Cpu).unwrap(),
            None => {
                KvCache::contiguous(s, forge_attn::KvCacheLayout::Contiguous, Device::Cpu).unwrap()
            }
        };
        let (k, v) = tokens(10, 81);
        cache.append_ragged(&k, &v, &[10, 0]).unwrap();
        let used = cache.pages_used();
        let before = attend_cache(&cache, 0);
        cache.fork(0, 1).unwrap();
        assert_eq!(cache.lengths(), &[10, 10]);
        // Shared, not copied.
        assert_eq!(cache.pages_used(), used);
        assert_eq!(attend_cache(&cache, 1), before);
        // The fork writes into the shared half-full page: it is copied first.
        let (k2, v2) = tokens(5, 83);
        cache.append_ragged(&k2, &v2, &[0, 5]).unwrap();
        assert_eq!(attend_cache(&cache, 0), before);
        assert_ne!(attend_cache(&cache, 1), before);
        if layout.is_some() {
            // One copied page plus one new page for tokens 12..15.
            assert_eq!(cache.pages_used(), used + 2);
        }
        // The source appending leaves the fork alone too.
        let fork_out = attend_cache(&cache, 1);
        cache.append_ragged(&k2, &v2, &[3, 0]).unwrap();
        assert_eq!(attend_cache(&cache, 1), fork_out);
        assert_eq!(cache.lengths(), &[13, 15]);
        let e = cache.fork(1, 1).unwrap_err();
        assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
        let e = cache.fork(0, 2).unwrap_err();
        assert!(e.to_string().contains("below 2"), "{e}");
    }
}

#[test]
fn free_and_truncate_return_pages_for_reuse() {
    let s = spec(2, HKV, D, 40, DType::F32);
    let mut cache = KvCache::paged(s, 4, 10, Device::Cpu).unwrap();
    let (k, v) = tokens(20, 91);
    cache.append_ragged(&k, &v, &[20, 20]).unwrap();
    assert_eq!(cache.pages_used(), 10);
    // The pool is full; freeing sequence 0 makes room for sequence 1 to grow.
    assert!(matches!(
        cache.append_ragged(&k, &v, &[0, 1]),
        Err(AttentionError::CapacityExceeded(_))
    ));
    cache.free(0).unwrap();
    assert_eq!((cache.lengths(), cache.pages_used()), (&[0, 20][..], 5));
    cache.append_ragged(&k, &v, &[0, 20]).unwrap();
    assert_eq!((cache.lengths(), cache.pages_used()), (&[0, 40][..], 10));
    // Truncating keeps the first tokens: attention equals a cache built with them alone.
    cache.truncate(1, 13).unwrap();
    assert_eq!((cache.lengths()[1], cache.pages_used()), (13, 4));
    let mut fresh = KvCache::paged(s, 4, 10, Device::Cpu).unwrap();
    fresh.append_ragged(&k, &v, &[0, 13]).unwrap();
    assert_eq!(attend_cache(&cache, 1), attend_cache(&fresh, 1));
    let e = cache.truncate(1, 14).unwrap_err();
    assert!(e.to_string().contains("at most its 13 tokens"), "{e}");
    assert!(cache.truncate(2, 0).is_err());
    assert_eq!(cache.lengths(), &[0, 13]);
    // Contiguous caches truncate and free too.
    let mut c = KvCache::contiguous(s, forge_attn::KvCacheLayout::Contiguous, Device::Cpu).unwrap();
    c.append_ragged(&k, &v, &[20, 7]).unwrap();
    c.truncate(0, 13).unwrap();
    c.free(1).unwrap();
    assert_eq!(c.lengths(), &[13, 0]);
    let mut fresh2 =
        KvCache::contiguous(s, forge_attn::KvCacheLayout::Contiguous, Device::Cpu).unwrap();
    fresh2.append_ragged(&k, &v, &[13, 0]).unwrap();
    assert_eq!(attend_cache(&c, 0), attend_cache(&fresh2, 0));
}
