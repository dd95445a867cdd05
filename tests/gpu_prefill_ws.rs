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
            // Buckets without a warp-specialized row (80, 96) stay on mma.sync.
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
