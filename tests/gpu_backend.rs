//! GPU backend against the f64 reference: flash and traditional paths over the shape
//! matrix, dispatch, errors, and device-resident loops. Run on a GPU machine with
//! `--include-ignored`.

use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionPath, DType, Device, DeviceAttentionBackend,
    DeviceTensor, FlashKernel, GpuAttentionBackend, Layout,
};

mod common;
use common::{gpu, gpu_half_bound, F32_BOUND};

#[derive(Clone, Copy, Debug, PartialEq)]
enum MaskKind {
    None,
    /// [Sq, Sk]
    Rank2,
    /// [B, Sq, Sk]
    Rank3,
    /// [B, H, Sq, Sk]
    Rank4,
    /// [1, H, Sq, Sk]: batch broadcast
    HeadsOnly,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    sq: usize,
    sk: usize,
    h: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    mask: MaskKind,
    layout: Layout,
    dtype: DType,
}

impl Case {
    fn new(b: usize, sq: usize, sk: usize, h: usize, hkv: usize, d: usize) -> Self {
        Case {
            b,
            sq,
            sk,
            h,
            hkv,
            d,
            causal: false,
            mask: MaskKind::None,
            layout: Layout::Bshd,
            dtype: DType::F32,
        }
    }
    fn causal(mut self, c: bool) -> Self {
        self.causal = c;
        self
    }
    fn mask(mut self, m: MaskKind) -> Self {
        self.mask = m;
        self
    }
    fn layout(mut self, l: Layout) -> Self {
        self.layout = l;
        self
    }
    fn dtype(mut self, t: DType) -> Self {
        self.dtype = t;
        self
    }
    fn config(&self) -> AttentionConfig {
        AttentionConfig::new(self.h * self.d, self.h, self.sq.max(self.sk))
            .with_num_kv_heads(self.hkv)
            .with_causal(self.causal)
            .with_layout(self.layout)
    }
    fn shape(&self, s: usize, heads: usize) -> Vec<usize> {
        match self.layout {
            Layout::Bshd => vec![self.b, s, heads, self.d],
            Layout::Bhsd => vec![self.b, heads, s, self.d],
            l => unimplemented!("layout {l:?}"),
        }
    }
}

struct Inputs {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    mask: Option<DeviceTensor>,
}

fn mask_values(shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let sk = shape[shape.len() - 1];
    let mut m: Vec<f32> = random_values(n, seed)
        .into_iter()
        .map(|x| x * 2.0)
        .collect();
    for (i, x) in m.iter_mut().enumerate() {
        let row = i / sk;
        // Every third row fully masked, and a scattering of masked keys elsewhere.
        if row % 3 == 1 || (i * 7919) % 5 == 0 {
            *x = f32::NEG_INFINITY;
        }
    }
    m
}

fn make_inputs(c: &Case, dev: Device, seed: u64) -> Inputs {
    let qs = c.shape(c.sq, c.h);
    let ks = c.shape(c.sk, c.hkv);
    let up = |shape: &[usize], s: u64| {
        let n = shape.iter().product();
        DeviceTensor::from_f32(&random_values(n, s), shape, c.dtype, dev).expect("upload")
    };
    let mask_shape = match c.mask {
        MaskKind::None => None,
        MaskKind::Rank2 => Some(vec![c.sq, c.sk]),
        MaskKind::Rank3 => Some(vec![c.b, c.sq, c.sk]),
        MaskKind::Rank4 => Some(vec![c.b, c.h, c.sq, c.sk]),
        MaskKind::HeadsOnly => Some(vec![1, c.h, c.sq, c.sk]),
    };
    Inputs {
        q: up(&qs, seed),
        k: up(&ks, seed + 1),
        v: up(&ks, seed + 2),
        mask: mask_shape.map(|s| {
            DeviceTensor::from_host(&mask_values(&s, seed + 3), &s, dev).expect("mask upload")
        }),
    }
}

fn poisoned(shape: &[usize], dtype: DType, dev: Device) -> DeviceTensor {
    let n: usize = shape.iter().product();
    DeviceTensor::from_f32(&vec![f32::NAN; n], shape, dtype, dev).expect("poisoned output")
}

/// Relative L2 error allowed for f32 inputs computed in TF32 (10 mantissa bits, like f16,
/// with f32 sums and no f16 range limits).
const TF32_TOLERANCE: f64 = 2e-3;

/// Runs one case on the given path and checks it against the reference; returns the error.
fn check(backend: &GpuAttentionBackend, c: &Case, traditional: bool, seed: u64) -> f64 {
    let dev = backend.device();
    let x = make_inputs(c, dev, seed);
    let cfg = c.config();
    let mut out = poisoned(&c.shape(c.sq, c.h), c.dtype, dev);
    let path = if traditional {
        backend.forward_traditional(&cfg, &x.q, &x.k, &x.v, x.mask.as_ref(), &mut out)
    } else {
        backend.forward_into(&cfg, &x.q, &x.k, &x.v, x.mask.as_ref(), &mut out)
    }
    .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    if !traditional {
        let want = match (c.mask != MaskKind::None, c.causal) {
            (false, _) if c.sq <= forge_attn::backend::gpu::MAX_DECODE_QUERIES => {
                FlashKernel::Decode
            }
            (true, _) => FlashKernel::Masked,
            (false, true) => FlashKernel::Causal,
            (false, false) => FlashKernel::NonCausal,
        };
        assert_eq!(path, AttentionPath::Flash(want), "{c:?}");
    }
    let got = out.to_f32_vec().expect("download");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{c:?}: unwritten or non-finite output (seed {seed})"
    );
    // The reference reads the same (rounded) inputs back from the device.
    let want = attention_f64(&cfg, &x.q, &x.k, &x.v, x.mask.as_ref()).expect("reference");
    let err = relative_l2_error(&got, &want);
    let bound = match c.dtype {
        DType::F32 if backend.tf32_enabled() && !traditional => TF32_TOLERANCE,
        DType::F32 => F32_BOUND,
        _ => {
            let naive =
                attention_naive_in_dtype(&cfg, &x.q, &x.k, &x.v, x.mask.as_ref()).expect("naive");
            gpu_half_bound(relative_l2_error(&naive, &want))
        }
    };
    assert!(
        err <= bound,
        "{c:?} traditional={traditional}: relative L2 error {err:.3e} > {bound:.1e} (seed {seed})"
    );
    err
}

fn shape_matrix() -> Vec<Case> {
    use MaskKind::*;
    let mut cases = vec![
        Case::new(1, 1, 1, 1, 1, 64),
        Case::new(2, 1, 77, 8, 2, 128),
        Case::new(1, 33, 33, 4, 4, 32),
        Case::new(2, 130, 130, 4, 2, 64).causal(true),
        Case::new(1, 65, 257, 8, 8, 80).causal(true),
        Case::new(1, 257, 65, 4, 1, 96).causal(true),
        Case::new(1, 100, 100, 2, 2, 128).mask(Rank2),
        Case::new(2, 70, 90, 4, 2, 64).mask(Rank3).causal(true),
        Case::new(2, 31, 47, 4, 4, 64).mask(Rank4),
        Case::new(2, 40, 40, 4, 2, 128).mask(HeadsOnly),
        Case::new(1, 129, 129, 32, 8, 128).causal(true),
        Case::new(1, 64, 200, 4, 1, 256),
        Case::new(1, 50, 50, 2, 2, 72),
        Case::new(1, 17, 23, 2, 2, 8),
        Case::new(1, 4097, 4097, 2, 1, 64).causal(true),
        Case::new(1, 3, 4097, 2, 2, 128),
        Case::new(2, 96, 96, 4, 4, 160)
            .layout(Layout::Bhsd)
            .causal(true),
        Case::new(2, 33, 65, 4, 2, 192)
            .layout(Layout::Bhsd)
            .mask(Rank2),
        Case::new(1, 20, 20, 2, 2, 224),
        Case::new(2, 200, 333, 8, 2, 256).causal(true),
        Case::new(1, 130, 190, 2, 1, 248).layout(Layout::Bhsd),
        Case::new(1, 150, 150, 4, 4, 120).mask(Rank4).causal(true),
    ];
    let extra: Vec<Case> = cases
        .iter()
        .filter(|c| c.sq * c.sk <= 200_000)
        .flat_map(|c| [c.dtype(DType::F16), c.dtype(DType::BF16)])
        .collect();
    cases.extend(extra);
    // Under compute-sanitizer (100x slower) keep the cases that fit in a few tiles.
    if std::env::var_os("FORGE_ATTN_SANITIZE").is_some() {
        cases.retain(|c| c.sq * c.sk <= 40_000);
    }
    cases
}

#[test]
#[ignore = "needs a GPU"]
fn flash_matches_reference_over_shape_matrix() {
    let backend = GpuAttentionBackend::new(gpu())
        .expect("backend")
        .with_flash(true);
    for (i, c) in shape_matrix().iter().enumerate() {
        let seed = 1000 + i as u64;
        let err = check(&backend, c, false, seed);
        println!("flash {c:?}: err {err:.2e}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn tf32_flash_matches_reference_within_its_tolerance() {
    let backend = GpuAttentionBackend::new(gpu())
        .expect("backend")
        .with_flash(true)
        .with_tf32(true);
    assert!(backend.tf32_enabled(), "TF32 needs CUDA sm_80 or newer");
    let mut worst = 0.0f64;
    for (i, c) in shape_matrix()
        .iter()
        .filter(|c| c.dtype == DType::F32)
        .enumerate()
    {
        let plan = backend.plan_for_config(&c.config(), c.dtype, c.sq, c.mask != MaskKind::None);
        let tile = plan.flash.and_then(|f| f.tile);
        if c.sq > forge_attn::backend::gpu::MAX_DECODE_QUERIES || c.mask != MaskKind::None {
            assert!(tile.is_some_and(|t| t.tf32), "{c:?}: {plan:?}");
        }
        let err = check(&backend, c, false, 9000 + i as u64);
        worst = worst.max(err);
        println!("tf32 {c:?}: err {err:.2e}");
    }
    println!("tf32 worst relative L2 error {worst:.2e} (tolerance {TF32_TOLERANCE:.0e})");

    // Inputs whose rows are not 16-byte aligned take the split f32 SIMT entry point of the
    // TF32 row (the host's choice): f32 accuracy.
    let dev = backend.device();
    let (b, s, h, d) = (1, 70, 2, 64);
    let wide = |seed| {
        DeviceTensor::from_f32(
            &random_values(b * s * h * (d + 1), seed),
            &[b, s, h, d + 1],
            DType::F32,
            dev,
        )
        .unwrap()
        .narrow(3, 1, d)
        .unwrap()
    };
    let (q, k, v) = (wide(1), wide(2), wide(3));
    let cfg = AttentionConfig::new(h * d, h, s).with_causal(true);
    let mut out = poisoned(&[b, s, h, d], DType::F32, dev);
    backend
        .forward_into(&cfg, &q, &k, &v, None, &mut out)
        .unwrap();
    let want = attention_f64(&cfg, &q, &k, &v, None).unwrap();
    let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want);
    assert!(
        err <= 1e-5,
        "unaligned TF32 fallback: relative L2 error {err:.3e}"
    );
}

#[test]
#[ignore = "needs a GPU"]
fn traditional_matches_reference_over_shape_matrix() {
    let backend = GpuAttentionBackend::new(gpu()).expect("backend");
    for (i, c) in shape_matrix().iter().enumerate() {
        if c.sq * c.sk > 2_000_000 {
            continue;
        }
        let err = check(&backend, c, true, 5000 + i as u64);
        println!("traditional {c:?}: err {err:.2e}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn flash_and_traditional_agree() {
    let backend = GpuAttentionBackend::new(gpu()).expect("backend");
    let dev = backend.device();
    for c in [
        Case::new(2, 300, 300, 8, 2, 64).causal(true),
        Case::new(1, 200, 333, 4, 4, 128).mask(MaskKind::Rank3),
    ] {
        let x = make_inputs(&c, dev, 77);
        let cfg = c.config();
        let mut a = poisoned(&c.shape(c.sq, c.h), c.dtype, dev);
        let mut b = poisoned(&c.shape(c.sq, c.h), c.dtype, dev);
        backend
            .forward_into(&cfg, &x.q, &x.k, &x.v, x.mask.as_ref(), &mut a)
            .unwrap();
        backend
            .forward_traditional(&cfg, &x.q, &x.k, &x.v, x.mask.as_ref(), &mut b)
            .unwrap();
        let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let err = relative_l2_error(&a, &b64);
        assert!(err < 1e-5, "{c:?}: flash vs traditional {err:.3e}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn dispatch_reports_fallbacks() {
    let backend = GpuAttentionBackend::new(gpu()).expect("backend");
    let cfg = AttentionConfig::new(4 * 300, 4, 64)
        .with_head_dim(300)
        .with_causal(true);
    let plan = backend.plan_for_config(&cfg, DType::F32, 64, false);
    assert_eq!(plan.path, AttentionPath::Traditional);
    assert!(plan.fallback_reason.unwrap().contains("300"));
    // head_dim 300 still runs, on the traditional path.
    let c = Case::new(1, 9, 9, 4, 4, 300).causal(true);
    let dev = backend.device();
    let x = make_inputs(&c, dev, 3);
    let mut out = poisoned(&c.shape(9, 4), DType::F32, dev);
    let path = backend
        .forward_into(&c.config(), &x.q, &x.k, &x.v, None, &mut out)
        .unwrap();
    assert_eq!(path, AttentionPath::Traditional);
    let off = GpuAttentionBackend::new(dev).unwrap().with_flash(false);
    let cfg = AttentionConfig::new(512, 4, 64);
    let plan = off.plan_for_config(&cfg, DType::BF16, 64, false);
    assert_eq!(plan.path, AttentionPath::Traditional);
    assert!(plan.fallback_reason.unwrap().contains("switched off"));
}

#[test]
#[ignore = "needs a GPU"]
fn hopper_runs_its_own_tile_rows() {
    use forge_attn::kernels::TileVendor;
    let backend = GpuAttentionBackend::new(gpu()).expect("backend");
    let desc = backend.device().describe();
    let vendor = backend.tile_vendor();
    println!("{desc}: {vendor:?}");
    assert_eq!(
        vendor == TileVendor::CudaSm90,
        desc.contains("sm_90"),
        "{desc}"
    );
    for (dtype, hd, causal) in [
        (DType::BF16, 128, false),
        (DType::F16, 256, true),
        (DType::BF16, 64, true),
        (DType::F16, 200, false),
    ] {
        let cfg = AttentionConfig::new(4 * hd, 4, 512)
            .with_head_dim(hd)
            .with_causal(causal);
        let plan = backend.plan_for_config(&cfg, dtype, 512, false);
        let tile = plan.flash.and_then(|c| c.tile).expect("a flash tile");
        // On Hopper the warp-specialized row (plain calls) or the wgmma row.
        assert_eq!(
            tile.wgmma || tile.warp_specialized,
            vendor == TileVendor::CudaSm90,
            "{dtype} hd{hd}"
        );
        // f32 and buckets without a Hopper row stay on the FA_TILE rows.
        let f32_tile = backend
            .plan_for_config(&cfg, DType::F32, 512, false)
            .flash
            .and_then(|c| c.tile)
            .expect("an f32 flash tile");
        assert!(!f32_tile.wgmma);
    }
    let cfg = AttentionConfig::new(4 * 96, 4, 512).with_head_dim(96);
    let plan = backend.plan_for_config(&cfg, DType::BF16, 512, false);
    assert!(!plan.flash.and_then(|c| c.tile).expect("tile").wgmma);
}

#[test]
#[ignore = "needs a GPU"]
fn out_of_memory_is_an_error() {
    let dev = gpu();
    match DeviceTensor::zeros(&[1 << 20, 1 << 20, 64], DType::F32, dev) {
        Err(AttentionError::OutOfMemory { .. }) => {}
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    // The device stays usable afterwards.
    let t = DeviceTensor::from_f32(&[1.0, 2.0, 3.0], &[3], DType::F32, dev).unwrap();
    assert_eq!(t.to_host::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
}

#[test]
#[ignore = "needs a GPU"]
fn bad_shapes_are_errors() {
    let backend = GpuAttentionBackend::new(gpu()).expect("backend");
    let dev = backend.device();
    let c = Case::new(1, 8, 8, 4, 2, 64);
    let x = make_inputs(&c, dev, 9);
    let cfg = c.config();
    let mut wrong_out = DeviceTensor::zeros(&[1, 8, 4, 32], DType::F32, dev).unwrap();
    assert!(matches!(
        backend.forward_into(&cfg, &x.q, &x.k, &x.v, None, &mut wrong_out),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    let bad_cfg = cfg.clone().with_num_kv_heads(4);
    let mut out = DeviceTensor::zeros(&[1, 8, 4, 64], DType::F32, dev).unwrap();
    assert!(matches!(
        backend.forward_into(&bad_cfg, &x.q, &x.k, &x.v, None, &mut out),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    let cpu_q = DeviceTensor::zeros(&[1, 8, 4, 64], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(
        backend.forward_into(&cfg, &cpu_q, &x.k, &x.v, None, &mut out),
        Err(AttentionError::DeviceMismatch { .. })
    ));
    let bf = DeviceTensor::zeros(&[1, 8, 2, 64], DType::BF16, dev).unwrap();
    assert!(matches!(
        backend.forward_into(&cfg, &x.q, &bf, &x.v, None, &mut out),
        Err(AttentionError::DTypeMismatch { .. })
    ));
}

#[test]
#[ignore = "needs a GPU"]
fn device_copies_and_views() {
    let dev = gpu();
    let data = random_values(2 * 5 * 3 * 8, 11);
    let t = DeviceTensor::from_host(&data, &[2, 5, 3, 8], dev).unwrap();
    // A strided view downloads correctly.
    let view = t.narrow(1, 1, 3).unwrap().narrow(2, 1, 2).unwrap();
    let got = view.to_host::<f32>().unwrap();
    let mut want = Vec::new();
    for b in 0..2 {
        for s in 1..4 {
            for h in 1..3 {
                for d in 0..8 {
                    want.push(data[((b * 5 + s) * 3 + h) * 8 + d]);
                }
            }
        }
    }
    assert_eq!(got, want);
    // Copy into a view of a larger tensor, on the device.
    let big = DeviceTensor::zeros(&[2, 10, 2, 8], DType::F32, dev).unwrap();
    big.narrow(1, 4, 3).unwrap().copy_from(&view).unwrap();
    let back = big.narrow(1, 4, 3).unwrap().to_host::<f32>().unwrap();
    assert_eq!(back, want);
    let bf = DeviceTensor::from_f32(&data, &[2, 5, 3, 8], DType::BF16, dev).unwrap();
    let v2 = bf.permute(&[0, 2, 1, 3]).unwrap();
    let host: Vec<f32> = v2.to_f32_vec().unwrap();
    assert_eq!(host.len(), data.len());
    assert!((host[8] - half::bf16::from_f32(data[3 * 8]).to_f32()).abs() == 0.0);
}

/// The host chooses the implementation from the device and the inputs: f16/bf16 rows whose
/// Q, K, V are not in whole 16-byte chunks run the split SIMT entry point (CUDA) or the
/// SIMT kernel (AMD), aligned ones the device's tensor-core kernel; both match the reference.
#[test]
#[ignore = "needs a GPU"]
fn unaligned_inputs_run_the_implementation_the_plan_names() {
    use forge_attn::backend::gpu::PlanInput;
    use forge_attn::problem::AttentionProblem;
    use forge_attn::FlashImpl;
    let backend = GpuAttentionBackend::new(gpu()).expect("backend");
    let target = backend.flash_target();
    let dev = backend.device();
    let (b, s, h, d) = (2, 200, 2, 64);
    for dtype in [DType::F16, DType::BF16] {
        for (pad, aligned) in [(0, true), (1, false)] {
            let t = |seed| {
                DeviceTensor::from_f32(
                    &random_values(b * s * h * (d + pad), seed),
                    &[b, s, h, d + pad],
                    dtype,
                    dev,
                )
                .unwrap()
                .narrow(3, pad, d)
                .unwrap()
            };
            let (q, k, v) = (t(11), t(12), t(13));
            let cfg = AttentionConfig::new(h * d, h, s)
                .with_batch_size(b)
                .with_causal(true);
            let p = AttentionProblem::new(&cfg, &q, &k, &v, None).unwrap();
            let input = PlanInput::of_call(&p, &q, &k, &v);
            assert_eq!(input.qkv_aligned, aligned, "{dtype} pad {pad}");
            let plan = backend.plan(&input);
            let want = match (target.amd, aligned, target.has_wgmma, target.has_mma) {
                (true, _, _, _) => FlashImpl::Simt,
                (false, false, _, _) => FlashImpl::SimtSplit,
                (false, true, true, _) => FlashImpl::WgmmaWs,
                (false, true, false, true) => FlashImpl::MmaSync,
                (false, true, false, false) => FlashImpl::SimtSplit,
            };
            assert_eq!(
                plan.implementation(),
                Some(want),
                "{dtype} pad {pad}: {plan:?}"
            );
            let mut out = poisoned(&[b, s, h, d], dtype, dev);
            let path = backend
                .forward_into(&cfg, &q, &k, &v, None, &mut out)
                .unwrap();
            assert_eq!(path, plan.path);
            let want_out = attention_f64(&cfg, &q, &k, &v, None).unwrap();
            let naive = attention_naive_in_dtype(&cfg, &q, &k, &v, None).unwrap();
            let bound = gpu_half_bound(relative_l2_error(&naive, &want_out));
            let err = relative_l2_error(&out.to_f32_vec().unwrap(), &want_out);
            assert!(
                err <= bound,
                "{dtype} {want}: relative L2 error {err:.3e} > {bound:.1e}"
            );
        }
    }
}
