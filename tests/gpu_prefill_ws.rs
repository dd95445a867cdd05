//! Hopper's warp-specialized prefill kernel (TMA producer, ping-pong math warpgroups):
//! which calls take it, and its numerical contract against the f64 reference on shapes
//! that exercise partial tiles, GQA, causal alignment, padded head dims and the additive
//! mask. On devices without wgmma the same calls run on their usual kernel and are checked
//! all the same.

use forge_attn::backend::gpu::dispatch::PlanInput;
use forge_attn::problem::AttentionProblem;
use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{AttentionConfig, DType, DeviceAttentionBackend, DeviceTensor, FlashImpl, Layout};

mod common;
use common::{gpu_backend, gpu_half_bound, random_tensor};

/// Runs `cfg` on q, k, v (and mask) and checks the output; returns the implementation.
fn check(
    backend: &forge_attn::GpuAttentionBackend,
    cfg: &AttentionConfig,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    mask: Option<&DeviceTensor>,
    what: &str,
) -> FlashImpl {
    let p = AttentionProblem::new(cfg, q, k, v, mask).unwrap();
    let plan = backend.plan(&PlanInput::of_call(&p, q, k, v));
    let imp = plan
        .implementation()
        .unwrap_or_else(|| panic!("{what}: no flash plan: {plan:?}"));
    let n: usize = q.shape().iter().product();
    let mut out =
        DeviceTensor::from_f32(&vec![f32::NAN; n], q.shape(), q.dtype(), q.device()).unwrap();
    backend.forward_into(cfg, q, k, v, mask, &mut out).unwrap();
    let want = attention_f64(cfg, q, k, v, mask).unwrap();
    let naive = attention_naive_in_dtype(cfg, q, k, v, mask).unwrap();
    let bound = gpu_half_bound(relative_l2_error(&naive, &want));
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    assert!(
        err <= bound,
        "{what} on {imp}: relative L2 error {err:.3e} > {bound:.1e}"
    );
    imp
}

#[test]
#[ignore = "needs a GPU"]
fn warp_specialized_prefill_matches_the_reference() {
    let (dev, backend) = gpu_backend();
    let hopper = backend.flash_target().has_wgmma;
    // (batch, heads, kv heads, seq_q, seq_k, head_dim, causal, masked)
    let cases = [
        (1, 3, 3, 129, 77, 128, false, false),
        (2, 4, 1, 300, 500, 128, true, false),
        (1, 2, 2, 300, 200, 128, true, false),
        (1, 2, 2, 64, 200, 72, false, false),
        (1, 2, 2, 64, 200, 120, false, false),
        (1, 2, 2, 150, 260, 128, true, true),
        (1, 2, 1, 1100, 1300, 128, true, false),
        (1, 2, 2, 333, 333, 64, true, false),
        (2, 2, 2, 333, 900, 64, false, true),
        (2, 4, 2, 300, 333, 256, true, false),
        (1, 2, 2, 130, 130, 200, true, false),
        (1, 4, 2, 257, 385, 192, true, false),
        (1, 2, 2, 200, 100, 160, false, false),
        (1, 8, 8, 40, 5, 128, false, false),
        (3, 2, 1, 17, 4000, 64, true, false),
    ];
    for dtype in [DType::F16, DType::BF16] {
        for (i, &(b, h, hkv, sq, sk, d, causal, masked)) in cases.iter().enumerate() {
            let cfg = AttentionConfig::new(h * d, h, sq.max(sk))
                .with_head_dim(d)
                .with_num_kv_heads(hkv)
                .with_batch_size(b)
                .with_causal(causal);
            let seed = 100 * i as u64;
            let q = random_tensor(&[b, sq, h, d], dtype, dev, seed);
            let k = random_tensor(&[b, sk, hkv, d], dtype, dev, seed + 1);
            let v = random_tensor(&[b, sk, hkv, d], dtype, dev, seed + 2);
            let mask = masked.then(|| {
                let mut m = random_values(b * h * sq * sk, seed + 3);
                for (j, x) in m.iter_mut().enumerate() {
                    if j % 7 == 3 || (j / sk) % 5 == 2 {
                        *x = f32::NEG_INFINITY;
                    }
                }
                DeviceTensor::from_host(&m, &[b, h, sq, sk], dev).unwrap()
            });
            let what = format!("{dtype} case {i} {:?}", cases[i]);
            let imp = check(&backend, &cfg, &q, &k, &v, mask.as_ref(), &what);
            // A bucket without a warp-specialized row (32) stays on mma.sync.
            if hopper && forge_attn::kernels::flash_tile_ws(dtype, d).is_some() {
                assert_eq!(imp, FlashImpl::WgmmaWs, "{what}");
            } else if hopper {
                assert_eq!(imp, FlashImpl::MmaSync, "{what}");
            }
        }
    }
}

/// Heads-first layout (`[B, H, S, D]`), and Q / K / V views whose batch and head strides
/// are far from packed: TMA addresses them through the same maps.
#[test]
#[ignore = "needs a GPU"]
fn heads_first_and_strided_views_take_the_warp_specialized_kernel() {
    let (dev, backend) = gpu_backend();
    let hopper = backend.flash_target().has_wgmma;
    let (b, h, s, d) = (2, 4, 300, 128);
    let cfg = AttentionConfig::new(h * d, h, s)
        .with_batch_size(b)
        .with_causal(true)
        .with_layout(Layout::Bhsd);
    let t = |seed| random_tensor(&[b, h, s, d], DType::BF16, dev, seed);
    let imp = check(&backend, &cfg, &t(1), &t(2), &t(3), None, "bhsd");
    if hopper {
        assert_eq!(imp, FlashImpl::WgmmaWs);
    }
    // Every second head of a wider tensor: head stride 2 * D.
    let wide = |seed| {
        random_tensor(&[b, s, 2 * h, d], DType::F16, dev, seed)
            .narrow(2, 0, h)
            .unwrap()
    };
    let cfg = AttentionConfig::new(h * d, h, s).with_batch_size(b);
    let imp = check(
        &backend,
        &cfg,
        &wide(4),
        &wide(5),
        &wide(6),
        None,
        "strided heads",
    );
    if hopper {
        assert_eq!(imp, FlashImpl::WgmmaWs);
    }
}

/// K and V broadcast over the batch (stride 0): TMA cannot address them, so the call runs
/// on the wgmma kernel of the same tile row, and says so.
#[test]
#[ignore = "needs a GPU"]
fn operands_tma_cannot_address_run_on_the_wgmma_kernel() {
    let (dev, backend) = gpu_backend();
    let hopper = backend.flash_target().has_wgmma;
    let (b, h, s, d) = (3, 2, 200, 64);
    let cfg = AttentionConfig::new(h * d, h, s)
        .with_batch_size(b)
        .with_causal(true);
    let q = random_tensor(&[b, s, h, d], DType::BF16, dev, 7);
    let kv = |seed| {
        random_tensor(&[1, s, h, d], DType::BF16, dev, seed)
            .broadcast_dim(0, b)
            .unwrap()
    };
    let (k, v) = (kv(8), kv(9));
    let p = AttentionProblem::new(&cfg, &q, &k, &v, None).unwrap();
    let input = PlanInput::of_call(&p, &q, &k, &v);
    assert!(!input.tma, "a zero batch stride is not addressable by TMA");
    let imp = check(&backend, &cfg, &q, &k, &v, None, "broadcast K / V");
    if hopper {
        assert_eq!(imp, FlashImpl::Wgmma);
    }
}

/// `t`'s values in a tensor of the same shape and dtype on `dev`.
fn up(t: &DeviceTensor, dev: forge_attn::Device) -> DeviceTensor {
    DeviceTensor::from_f32(&t.to_f32_vec().unwrap(), t.shape(), t.dtype(), dev).unwrap()
}

/// The rows of `out` (`[total, H, d]`, packed) and `want` whose reference is finite: the
/// sequences that are not poisoned.
fn finite_rows_error(out: &[f32], want: &[f64]) -> f64 {
    let (got, want): (Vec<f32>, Vec<f64>) = out
        .iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(&g, &w)| (g, w))
        .unzip();
    assert!(!want.is_empty());
    assert!(
        got.iter().all(|g| g.is_finite()),
        "a finite row got NaN or inf"
    );
    relative_l2_error(&got, &want)
}

/// Packed ragged batches on the warp-specialized kernel: one tensor map through every
/// sequence's rows. A tile that reaches past its sequence reads the next one's rows; here
/// the next one's K and V are NaN, and the sequence before it stays finite and exact (its
/// V rows past the end are zeroed, its K rows there masked).
#[test]
#[ignore = "needs a GPU"]
fn packed_batches_keep_each_sequence_to_its_own_rows() {
    use forge_attn::reference::varlen_attention_f64;
    use forge_attn::{AttentionOptions, Device, VarlenBatch};
    let (dev, backend) = gpu_backend();
    let (h, hkv) = (4, 2);
    // Sequence 1 is poisoned; 0 and 2 end inside a tile; 3 is long and ends the tensor.
    let q_lens = [130usize, 64, 77, 700, 1];
    let k_lens = [201usize, 100, 129, 1500, 3];
    let poisoned = 1;
    for (dtype, d) in [(DType::BF16, 128), (DType::F16, 64), (DType::BF16, 256)] {
        for causal in [false, true] {
            let (tq, tk) = (q_lens.iter().sum::<usize>(), k_lens.iter().sum::<usize>());
            let host = |shape: &[usize], seed| random_values(shape.iter().product(), seed);
            let qv = host(&[tq, h, d], 1);
            let (mut kv_, mut vv) = (host(&[tk, hkv, d], 2), host(&[tk, hkv, d], 3));
            let k0: usize = k_lens[..poisoned].iter().sum();
            let span = k0 * hkv * d..(k0 + k_lens[poisoned]) * hkv * d;
            kv_[span.clone()].fill(f32::NAN);
            vv[span].fill(f32::NAN);
            let on = |v: &[f32], shape: &[usize], dev| {
                DeviceTensor::from_f32(v, shape, dtype, dev).unwrap()
            };
            let cfg = AttentionConfig::new(h * d, h, 1 << 16)
                .with_head_dim(d)
                .with_num_kv_heads(hkv)
                .with_causal(causal);
            let batch = VarlenBatch::from_lengths(&q_lens, &k_lens, dev).unwrap();
            let mut out = DeviceTensor::zeros(&[tq, h, d], dtype, dev).unwrap();
            let o = AttentionOptions::new();
            backend
                .forward_varlen(
                    &cfg,
                    &o,
                    &on(&qv, &[tq, h, d], dev),
                    &on(&kv_, &[tk, hkv, d], dev),
                    &on(&vv, &[tk, hkv, d], dev),
                    &batch,
                    &mut out,
                    None,
                )
                .unwrap();
            let cpu = Device::Cpu;
            let (want, _) = varlen_attention_f64(
                &cfg,
                &o,
                &on(&qv, &[tq, h, d], cpu),
                &on(&kv_, &[tk, hkv, d], cpu),
                &on(&vv, &[tk, hkv, d], cpu),
                &VarlenBatch::from_lengths(&q_lens, &k_lens, cpu).unwrap(),
            )
            .unwrap();
            let err = finite_rows_error(&out.to_f32_vec().unwrap(), &want);
            assert!(
                err < 1e-2,
                "{dtype} d {d} causal {causal}: relative error {err:e}"
            );
        }
    }
}

/// Paged K / V on the warp-specialized kernel at the page sizes it boxes (8 .. 256 rows,
/// one page or one tile per box) and at one it does not (24: the wgmma kernel reads it):
/// every slot no sequence owns (the rest of a last page, unused pages) holds NaN, and
/// the output stays exact. Dense and packed queries, chunked-prefill lengths.
#[test]
#[ignore = "needs a GPU"]
fn paged_kv_reads_only_the_pages_a_sequence_owns() {
    use forge_attn::reference::{paged_attention_f64, paged_varlen_attention_f64};
    use forge_attn::{AttentionOptions, Device, PageLayout, PagedKv, VarlenBatch};
    let (dev, backend) = gpu_backend();
    let (h, hkv) = (4, 2);
    let lens = [300usize, 1, 129, 600];
    for (dtype, d) in [(DType::BF16, 128), (DType::F16, 64)] {
        for page in [8usize, 16, 24, 64, 128, 256] {
            // Both pool layouts across the page sizes.
            for layout in [PageLayout::Nhd, PageLayout::Hnd]
                .into_iter()
                .filter(|l| (page / 8) % 2 == 0 || *l == PageLayout::Nhd)
            {
                let kv = common::paged_pools(&lens, page, layout, dtype, hkv, d, dev, page as u64);
                let host = common::paged_on_host(&kv);
                // NaN in every slot no sequence owns.
                let table = host.block_table.to_host::<i32>().unwrap();
                let mp = table.len() / lens.len();
                let np = host.k_pages.shape()[0];
                let mut owned = vec![vec![false; page]; np];
                for (b, &len) in lens.iter().enumerate() {
                    for j in 0..len {
                        owned[table[b * mp + j / page] as usize][j % page] = true;
                    }
                }
                let poison = |t: &DeviceTensor| {
                    let mut x = t.to_f32_vec().unwrap();
                    for (i, v) in x.iter_mut().enumerate() {
                        let (pg, rest) = (i / (page * hkv * d), i % (page * hkv * d));
                        let slot = match layout {
                            PageLayout::Nhd => rest / (hkv * d),
                            PageLayout::Hnd => rest % (page * d) / d,
                        };
                        if !owned[pg][slot] {
                            *v = f32::NAN;
                        }
                    }
                    x
                };
                let (kp, vp) = (poison(&host.k_pages), poison(&host.v_pages));
                let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
                let shape = host.k_pages.shape().to_vec();
                let pools = |dev| {
                    PagedKv::new(
                        DeviceTensor::from_f32(&kp, &shape, dtype, dev).unwrap(),
                        DeviceTensor::from_f32(&vp, &shape, dtype, dev).unwrap(),
                        DeviceTensor::from_host(&table, host.block_table.shape(), dev).unwrap(),
                        DeviceTensor::from_host(&lens_i32, &[lens.len()], dev).unwrap(),
                        page,
                        layout,
                    )
                };
                let (gkv, ckv) = (pools(dev), pools(Device::Cpu));
                let o = AttentionOptions::new();
                for causal in [false, true] {
                    let cfg = AttentionConfig::new(h * d, h, 1 << 16)
                        .with_head_dim(d)
                        .with_num_kv_heads(hkv)
                        .with_causal(causal);
                    let what = format!("{dtype} d {d} page {page} {layout:?} causal {causal}");
                    // Dense queries: 130 new rows per sequence against its cache.
                    let sq = 130;
                    let qc = random_tensor(&[lens.len(), sq, h, d], dtype, Device::Cpu, 9);
                    let mut out = DeviceTensor::zeros(qc.shape(), dtype, dev).unwrap();
                    backend
                        .forward_paged(&cfg, &o, &up(&qc, dev), &gkv, &mut out, None)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let (want, _) = paged_attention_f64(&cfg, &o, &qc, &ckv).unwrap();
                    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
                    assert!(err < 1e-2, "{what}: relative error {err:e}");
                    // Packed queries of ragged lengths.
                    let q_lens = [150usize, 1, 0, 200];
                    let tq: usize = q_lens.iter().sum();
                    let qp = random_tensor(&[tq, h, d], dtype, Device::Cpu, 10);
                    let cu = |dev| {
                        VarlenBatch::from_lengths(&q_lens, &q_lens, dev)
                            .unwrap()
                            .cu_seqlens_q
                    };
                    let mut out = DeviceTensor::zeros(&[tq, h, d], dtype, dev).unwrap();
                    backend
                        .forward_paged_varlen(
                            &cfg,
                            &o,
                            &up(&qp, dev),
                            &cu(dev),
                            333,
                            &gkv,
                            &mut out,
                            None,
                        )
                        .unwrap_or_else(|e| panic!("{what} packed: {e}"));
                    let (want, _) =
                        paged_varlen_attention_f64(&cfg, &o, &qp, &cu(Device::Cpu), &ckv).unwrap();
                    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
                    assert!(err < 1e-2, "{what} packed: relative error {err:e}");
                }
            }
        }
    }
}
