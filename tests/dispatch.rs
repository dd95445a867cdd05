//! The GPU dispatch decision, checked without a GPU: which kernel runs which problem, and
//! the reason given when none can.

use forge_attn::backend::gpu::dispatch::{
    can_use_flash_attention, plan, select_flash_kernel, PlanInput,
};
use forge_attn::kernels::TileVendor;
use forge_attn::{AttentionPath, DType, FlashKernel};

const H100_SMEM: u32 = 227 * 1024;
const AMD_SMEM: u32 = 64 * 1024;

fn input(dtype: DType, head_dim: usize, causal: bool, has_mask: bool, seq_q: usize) -> PlanInput {
    PlanInput {
        dtype,
        head_dim,
        causal,
        has_mask,
        seq_q,
        tf32: false,
        kv_aligned: true,
        qkv_aligned: true,
        ext: false,
        packed: false,
        paged: false,
        tma: true,
    }
}

#[test]
fn families_follow_mask_causal_and_query_length() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let cases = [
            (false, false, 512, FlashKernel::NonCausal),
            (true, false, 512, FlashKernel::Causal),
            (false, true, 512, FlashKernel::Masked),
            (true, true, 512, FlashKernel::Masked),
            (true, false, 1, FlashKernel::Decode),
            (false, false, 16, FlashKernel::Decode),
            (true, false, 17, FlashKernel::Causal),
            // A mask is read only by the masked prefill kernel, even for one query.
            (true, true, 1, FlashKernel::Masked),
        ];
        for (causal, mask, sq, want) in cases {
            let i = input(dtype, 128, causal, mask, sq);
            assert_eq!(select_flash_kernel(&i), want, "{i:?}");
            let p = plan(&i, true, H100_SMEM, TileVendor::Cuda);
            assert_eq!(p.path, AttentionPath::Flash(want), "{i:?}");
            assert!(p.fallback_reason.is_none());
            assert_eq!(p.flash.unwrap().tile.is_some(), want != FlashKernel::Decode);
        }
    }
}

#[test]
fn every_head_dim_multiple_of_8_up_to_256_has_a_flash_kernel() {
    for vendor in [TileVendor::Cuda, TileVendor::Hip] {
        let smem = if vendor == TileVendor::Cuda {
            H100_SMEM
        } else {
            AMD_SMEM
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for d in (8..=256).step_by(8) {
                for sq in [1, 4096] {
                    let c = can_use_flash_attention(
                        &input(dtype, d, true, false, sq),
                        true,
                        smem,
                        vendor,
                    )
                    .unwrap_or_else(|e| panic!("{vendor:?} {dtype} d={d} sq={sq}: {e}"));
                    if let Some(t) = c.tile {
                        assert!(
                            t.head_dim >= d && t.smem_bytes <= smem,
                            "{vendor:?} {dtype} d={d}: {t:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fallbacks_name_their_reason() {
    let why = |i: PlanInput, on: bool, smem: u32| {
        let p = plan(&i, on, smem, TileVendor::Cuda);
        assert_eq!(p.path, AttentionPath::Traditional, "{i:?}");
        assert!(p.flash.is_none());
        p.fallback_reason.expect("a reason")
    };
    assert!(why(input(DType::F32, 300, false, false, 64), true, H100_SMEM).contains("300"));
    assert!(why(input(DType::F32, 300, false, false, 1), true, H100_SMEM).contains("300"));
    assert!(
        why(input(DType::BF16, 100, false, false, 64), true, H100_SMEM).contains("multiple of 8")
    );
    assert!(
        why(input(DType::BF16, 128, false, false, 64), false, H100_SMEM).contains("switched off")
    );
    // A device with less shared memory than the tile needs falls back and says how much.
    let r = why(input(DType::F32, 256, false, true, 64), true, 16 * 1024);
    assert!(r.contains("shared memory") && r.contains("16384"), "{r}");
}

#[test]
fn tf32_picks_the_tf32_rows_for_f32_only() {
    for hd in [32, 64, 72, 128, 200, 256] {
        let mut i = input(DType::F32, hd, true, false, 512);
        i.tf32 = true;
        let t = plan(&i, true, H100_SMEM, TileVendor::Cuda)
            .flash
            .and_then(|f| f.tile)
            .expect("tf32 tile");
        assert!(t.tf32 && t.dtype == DType::F32 && t.head_dim >= hd, "{t:?}");
        assert_eq!(t.kernel_dtype_name(), "tf32");
        // Not asked for: the f32 SIMT row.
        i.tf32 = false;
        let t = plan(&i, true, H100_SMEM, TileVendor::Cuda)
            .flash
            .unwrap()
            .tile
            .unwrap();
        assert!(!t.tf32);
        // 16-bit inputs and the decode kernel ignore the switch.
        for (dtype, sq) in [(DType::BF16, 512), (DType::F16, 512), (DType::F32, 1)] {
            let mut j = input(dtype, hd, true, false, sq);
            j.tf32 = true;
            let p = plan(&j, true, H100_SMEM, TileVendor::Cuda);
            assert!(p.flash.unwrap().tile.is_none_or(|t| !t.tf32), "{j:?}");
        }
        // AMD has no TF32 rows: the f32 kernel runs, never the unfused path.
        let mut a = input(DType::F32, hd, false, false, 512);
        a.tf32 = true;
        let p = plan(&a, true, AMD_SMEM, TileVendor::Hip);
        assert_eq!(
            p.path,
            AttentionPath::Flash(FlashKernel::NonCausal),
            "{p:?}"
        );
        assert!(!p.flash.unwrap().tile.unwrap().tf32);
    }
}

/// Which operands Hopper's TMA copies can address follows their strides: packed and
/// strided views can, a broadcast (zero stride) or a row stride off the 16-byte grid
/// cannot, and the plan input carries the answer.
#[test]
fn tma_addressability_follows_the_operands_strides() {
    use forge_attn::backend::gpu::dispatch::tma_addressable;
    use forge_attn::problem::AttentionProblem;
    use forge_attn::{AttentionConfig, Device, DeviceTensor};
    let t = |shape: &[usize]| DeviceTensor::zeros(shape, DType::BF16, Device::Cpu).unwrap();
    let (b, s, h, d) = (2, 128, 4, 64);
    let cfg = AttentionConfig::new(h * d, h, s).with_batch_size(b);
    let check = |q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor| {
        let p = AttentionProblem::new(&cfg, q, k, v, None).unwrap();
        let addressable = tma_addressable(&p, q, k, v);
        if std::env::var("FORGE_ATTN_PREFILL_WS").as_deref() != Ok("0") {
            assert_eq!(PlanInput::of_call(&p, q, k, v).tma, addressable);
        }
        addressable
    };
    let dense = || t(&[b, s, h, d]);
    assert!(check(&dense(), &dense(), &dense()));
    // Every second head of a wider tensor: head stride 2 * D, still on the 16-byte grid.
    let every_second = || t(&[b, s, 2 * h, d]).narrow(2, 0, h).unwrap();
    assert!(check(&every_second(), &every_second(), &every_second()));
    // K / V shared by the batch entries: a zero batch stride.
    let shared = || t(&[1, s, h, d]).broadcast_dim(0, b).unwrap();
    assert!(!check(&dense(), &shared(), &shared()));
    // Rows of 68 elements (136 bytes): the head stride is off the 16-byte grid.
    let padded = || t(&[b, s, h, d + 4]).narrow(3, 0, d).unwrap();
    assert!(!check(&padded(), &dense(), &dense()));
    // One sequence, one head: the unused strides do not matter.
    let cfg1 = AttentionConfig::new(d, 1, s);
    let one = || t(&[1, s, 1, d]);
    let (q, k, v) = (one(), one(), one());
    let p = AttentionProblem::new(&cfg1, &q, &k, &v, None).unwrap();
    assert!(tma_addressable(&p, &q, &k, &v));
}
