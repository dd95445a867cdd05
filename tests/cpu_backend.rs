//! The CPU backend against the f64 reference: the numerical contract on many shapes,
//! layouts, masks and dtypes, plus every error `forward_into` can return.

use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, AttentionPath, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, KvCacheLayout, Layout, Support,
};

mod common;
use common::{cpu_half_bound, random_tensor, F32_BOUND, HALF_CEILING};

/// Which broadcast form the additive mask takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MaskKind {
    None,
    /// `[Sq, Sk]`
    Rank2,
    /// `[B, Sq, Sk]`
    Rank3,
    /// `[1, Sq, Sk]`
    Rank3Broadcast,
    /// `[B, H, Sq, Sk]`
    Rank4,
    /// `[B, 1, Sq, Sk]`
    Rank4HeadBroadcast,
    /// `[1, H, Sq, Sk]`
    Rank4BatchBroadcast,
}

const MASKS: [MaskKind; 7] = [
    MaskKind::None,
    MaskKind::Rank2,
    MaskKind::Rank3,
    MaskKind::Rank3Broadcast,
    MaskKind::Rank4,
    MaskKind::Rank4HeadBroadcast,
    MaskKind::Rank4BatchBroadcast,
];

#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    seq_q: usize,
    seq_k: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layout: Layout,
    causal: bool,
    mask: MaskKind,
    dtype: DType,
    /// Q, K, V and the output are permuted views (non-contiguous strides).
    views: bool,
    /// K and V are a prefix of a longer cache (narrowed views with an offset).
    cache_slice: bool,
    scale: Option<f32>,
    seed: u64,
}

impl Case {
    fn new(batch: usize, seq_q: usize, seq_k: usize, heads: usize, kv: usize, d: usize) -> Self {
        Case {
            batch,
            seq_q,
            seq_k,
            heads,
            kv_heads: kv,
            head_dim: d,
            layout: Layout::Bshd,
            causal: false,
            mask: MaskKind::None,
            dtype: DType::F32,
            views: false,
            cache_slice: false,
            scale: None,
            seed: 1,
        }
    }
    fn layout(mut self, l: Layout) -> Self {
        self.layout = l;
        self
    }
    fn causal(mut self) -> Self {
        self.causal = true;
        self
    }
    fn mask(mut self, m: MaskKind) -> Self {
        self.mask = m;
        self
    }
    fn dtype(mut self, d: DType) -> Self {
        self.dtype = d;
        self
    }
    fn views(mut self) -> Self {
        self.views = true;
        self
    }
    fn cache_slice(mut self) -> Self {
        self.cache_slice = true;
        self
    }
    fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }

    fn config(&self) -> AttentionConfig {
        let mut c = AttentionConfig::new(self.heads * self.head_dim, self.heads, 4096)
            .with_num_kv_heads(self.kv_heads)
            .with_causal(self.causal)
            .with_layout(self.layout);
        if let Some(s) = self.scale {
            c = c.with_scale(s);
        }
        c
    }

    /// Logical shape of a `[batch, seq, heads, head_dim]` operand in this case's layout.
    fn shape(&self, seq: usize, heads: usize) -> [usize; 4] {
        match self.layout {
            Layout::Bshd => [self.batch, seq, heads, self.head_dim],
            Layout::Bhsd => [self.batch, heads, seq, self.head_dim],
            l => unimplemented!("layout {l:?}"),
        }
    }

    fn seq_axis(&self) -> usize {
        match self.layout {
            Layout::Bshd => 1,
            Layout::Bhsd => 2,
            l => unimplemented!("layout {l:?}"),
        }
    }

    /// A tensor of logical shape `shape` holding `values` in physical order; with `views`
    /// it is stored with the seq and head axes swapped and permuted back.
    fn tensor(&self, values: &[f32], shape: [usize; 4]) -> DeviceTensor {
        if self.views {
            let phys = [shape[0], shape[2], shape[1], shape[3]];
            DeviceTensor::from_f32(values, &phys, self.dtype, Device::Cpu)
                .unwrap()
                .permute(&[0, 2, 1, 3])
                .unwrap()
        } else {
            DeviceTensor::from_f32(values, &shape, self.dtype, Device::Cpu).unwrap()
        }
    }

    fn operand(&self, seq: usize, heads: usize, seed: u64) -> DeviceTensor {
        // A cache slice: allocate more positions than used and take a window of them.
        let extra = if self.cache_slice { 5 } else { 0 };
        let shape = self.shape(seq + extra, heads);
        let t = self.tensor(&random_values(shape.iter().product(), seed), shape);
        if self.cache_slice {
            t.narrow(self.seq_axis(), 2, seq).unwrap()
        } else {
            t
        }
    }

    fn mask_tensor(&self) -> Option<DeviceTensor> {
        let (b, h, sq, sk) = (self.batch, self.heads, self.seq_q, self.seq_k);
        let shape: Vec<usize> = match self.mask {
            MaskKind::None => return None,
            MaskKind::Rank2 => vec![sq, sk],
            MaskKind::Rank3 => vec![b, sq, sk],
            MaskKind::Rank3Broadcast => vec![1, sq, sk],
            MaskKind::Rank4 => vec![b, h, sq, sk],
            MaskKind::Rank4HeadBroadcast => vec![b, 1, sq, sk],
            MaskKind::Rank4BatchBroadcast => vec![1, h, sq, sk],
        };
        let n: usize = shape.iter().product();
        let noise = random_values(n, self.seed ^ 0x5eed);
        let rows = n / sk;
        let mut values = Vec::with_capacity(n);
        for r in 0..rows {
            for j in 0..sk {
                let x = noise[r * sk + j];
                values.push(if r % 5 == 2 {
                    // Some rows see nothing at all.
                    f32::NEG_INFINITY
                } else if x > 0.6 && j != r % sk {
                    // Scattered removed keys (one key per row always kept).
                    f32::NEG_INFINITY
                } else {
                    // Finite additive bias.
                    2.0 * x
                });
            }
        }
        Some(DeviceTensor::from_host(&values, &shape, Device::Cpu).unwrap())
    }
}

/// Builds the case's tensors, runs the backend into a NaN-poisoned output, checks that
/// every element was written and compares with the f64 reference. Returns the error.
fn check(case: &Case) -> f64 {
    let config = case.config();
    let q = case.operand(case.seq_q, case.heads, case.seed);
    let k = case.operand(case.seq_k, case.kv_heads, case.seed + 1);
    let v = case.operand(case.seq_k, case.kv_heads, case.seed + 2);
    let mask = case.mask_tensor();
    let out_shape = case.shape(case.seq_q, case.heads);
    let mut out = case.tensor(&vec![f32::NAN; out_shape.iter().product()], out_shape);

    let path = CpuAttentionBackend::new()
        .forward_into(&config, &q, &k, &v, mask.as_ref(), &mut out)
        .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    assert_eq!(path, AttentionPath::Cpu);
    let got = out.to_f32_vec().unwrap();
    let unwritten = got.iter().filter(|x| x.is_nan()).count();
    assert_eq!(
        unwritten, 0,
        "{case:?}: {unwritten} output elements not written"
    );

    let want = attention_f64(&config, &q, &k, &v, mask.as_ref()).unwrap();
    let err = relative_l2_error(&got, &want);
    match case.dtype {
        DType::F32 => assert!(err < F32_BOUND, "{case:?}: relative L2 error {err:e}"),
        DType::F16 | DType::BF16 => {
            let naive = attention_naive_in_dtype(&config, &q, &k, &v, mask.as_ref()).unwrap();
            let naive_err = relative_l2_error(&naive, &want);
            let bound = cpu_half_bound(naive_err);
            assert!(
                err <= bound && err < HALF_CEILING,
                "{case:?}: relative L2 error {err:e}, naive {naive_err:e}"
            );
        }
        d => unimplemented!("dtype {d}"),
    }
    err
}

/// The seed of this run: `FORGE_ATTN_SEED` if set, else fresh from the clock.
fn run_seed() -> u64 {
    let seed = std::env::var("FORGE_ATTN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    println!("seed {seed} (set FORGE_ATTN_SEED={seed} to repeat)");
    seed
}

#[test]
fn f32_odd_sizes_both_layouts() {
    for (i, &(sq, sk)) in [(1, 1), (1, 7), (7, 7), (33, 130), (130, 33), (65, 64)]
        .iter()
        .enumerate()
    {
        for layout in [Layout::Bshd, Layout::Bhsd] {
            for d in [8, 72, 128] {
                check(
                    &Case::new(2, sq, sk, 3, 3, d)
                        .layout(layout)
                        .seed(i as u64 * 10 + d as u64),
                );
            }
        }
    }
}

#[test]
fn f32_head_dims() {
    for d in [8, 16, 24, 40, 64, 72, 80, 96, 100, 128, 160, 192, 256] {
        check(&Case::new(1, 17, 70, 2, 2, d).seed(d as u64));
        check(&Case::new(1, 9, 33, 2, 1, d).causal().seed(d as u64 + 1));
    }
}

#[test]
fn f32_gqa_and_mqa() {
    for layout in [Layout::Bshd, Layout::Bhsd] {
        check(&Case::new(2, 33, 47, 8, 2, 64).layout(layout));
        check(&Case::new(1, 20, 130, 4, 1, 72).layout(layout).causal());
        check(&Case::new(2, 1, 300, 8, 2, 128).layout(layout));
        check(&Case::new(1, 1, 257, 4, 1, 128).layout(layout).causal());
        check(&Case::new(1, 70, 70, 16, 2, 32).layout(layout).causal());
    }
}

#[test]
fn f32_causal_bottom_right() {
    // seq_q < seq_k (chunked prefill against a cache), equal, and seq_q > seq_k (the
    // first rows then see no key and must be zeros).
    for &(sq, sk) in &[(5, 130), (64, 200), (33, 33), (130, 33), (100, 1), (7, 3)] {
        for layout in [Layout::Bshd, Layout::Bhsd] {
            check(&Case::new(2, sq, sk, 4, 2, 40).layout(layout).causal());
        }
    }
}

#[test]
fn f32_masks_of_every_rank() {
    for (i, &mask) in MASKS.iter().enumerate() {
        for causal in [false, true] {
            let mut c = Case::new(2, 33, 70, 4, 2, 24).mask(mask).seed(i as u64);
            if causal {
                c = c.causal();
            }
            check(&c);
            check(&c.clone().layout(Layout::Bhsd).views());
        }
    }
}

#[test]
fn f32_non_contiguous_views() {
    for layout in [Layout::Bshd, Layout::Bhsd] {
        check(&Case::new(2, 19, 45, 4, 2, 72).layout(layout).views());
        check(&Case::new(2, 19, 45, 4, 2, 72).layout(layout).cache_slice());
        check(
            &Case::new(1, 64, 150, 4, 4, 64)
                .layout(layout)
                .views()
                .cache_slice()
                .causal()
                .mask(MaskKind::Rank4HeadBroadcast),
        );
    }
}

#[test]
fn f32_custom_scale() {
    let mut c = Case::new(1, 10, 20, 2, 2, 32);
    c.scale = Some(0.5);
    check(&c);
}

#[test]
fn half_precision_dtypes() {
    for dtype in [DType::F16, DType::BF16] {
        for (i, layout) in [Layout::Bshd, Layout::Bhsd].into_iter().enumerate() {
            let s = i as u64;
            check(
                &Case::new(2, 33, 130, 4, 2, 64)
                    .dtype(dtype)
                    .layout(layout)
                    .seed(s),
            );
            check(
                &Case::new(1, 1, 200, 8, 2, 128)
                    .dtype(dtype)
                    .layout(layout)
                    .seed(s),
            );
            check(
                &Case::new(1, 130, 33, 4, 1, 72)
                    .dtype(dtype)
                    .layout(layout)
                    .causal()
                    .seed(s),
            );
            check(
                &Case::new(2, 20, 70, 4, 4, 256)
                    .dtype(dtype)
                    .layout(layout)
                    .mask(MaskKind::Rank3)
                    .views()
                    .seed(s),
            );
            check(
                &Case::new(1, 7, 7, 2, 2, 8)
                    .dtype(dtype)
                    .layout(layout)
                    .cache_slice()
                    .mask(MaskKind::Rank2)
                    .causal()
                    .seed(s),
            );
        }
    }
}

#[test]
fn random_shapes() {
    let seed = run_seed();
    let mut rng = random_values(16 * 40, seed).into_iter();
    let mut pick = |n: usize| ((rng.next().unwrap_or(0.0) + 1.0) / 2.0 * n as f32) as usize % n;
    let seqs = [1, 2, 7, 16, 33, 64, 65, 130];
    let dims = [8, 16, 40, 64, 72, 96, 128, 256];
    let groups = [(1, 1), (4, 4), (8, 2), (4, 1), (6, 3)];
    for n in 0..40u64 {
        let (h, kv) = groups[pick(groups.len())];
        let mut c = Case::new(
            1 + pick(3),
            seqs[pick(seqs.len())],
            seqs[pick(seqs.len())],
            h,
            kv,
            dims[pick(dims.len())],
        )
        .mask(MASKS[pick(MASKS.len())])
        .dtype([DType::F32, DType::F16, DType::BF16][pick(3)])
        .seed(seed.wrapping_add(n * 3));
        if pick(2) == 1 {
            c = c.layout(Layout::Bhsd);
        }
        if pick(2) == 1 {
            c = c.causal();
        }
        if pick(2) == 1 {
            c = c.views();
        }
        if pick(3) == 1 {
            c = c.cache_slice();
        }
        check(&c);
    }
}

#[test]
fn fully_masked_rows_are_exact_zeros() {
    let (sq, sk, h, d) = (6, 9, 2, 16);
    let config = AttentionConfig::new(h * d, h, 16);
    let q = DeviceTensor::from_f32(
        &random_values(sq * h * d, 1),
        &[1, sq, h, d],
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let k = DeviceTensor::from_f32(
        &random_values(sk * h * d, 2),
        &[1, sk, h, d],
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let v = DeviceTensor::from_f32(
        &random_values(sk * h * d, 3),
        &[1, sk, h, d],
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let mut m = vec![0.0f32; sq * sk];
    for j in 0..sk {
        m[2 * sk + j] = f32::NEG_INFINITY;
        m[5 * sk + j] = f32::NEG_INFINITY;
    }
    let mask = DeviceTensor::from_host(&m, &[sq, sk], Device::Cpu).unwrap();
    let out = CpuAttentionBackend::new()
        .forward(&config, &q, &k, &v, Some(&mask))
        .unwrap()
        .to_f32_vec()
        .unwrap();
    for i in 0..sq {
        let row = &out[i * h * d..(i + 1) * h * d];
        if i == 2 || i == 5 {
            assert!(row.iter().all(|&x| x == 0.0), "row {i}: {row:?}");
        } else {
            assert!(row.iter().any(|&x| x != 0.0), "row {i} is zero");
        }
    }

    // Causal with more queries than keys: the first seq_q - seq_k rows see nothing.
    let config = config.with_causal(true);
    let k3 = k.narrow(1, 0, 3).unwrap();
    let v3 = v.narrow(1, 0, 3).unwrap();
    let out = CpuAttentionBackend::new()
        .forward(&config, &q, &k3, &v3, None)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    for i in 0..sq {
        let row = &out[i * h * d..(i + 1) * h * d];
        assert_eq!(row.iter().all(|&x| x == 0.0), i < 3, "row {i}");
    }
}

#[test]
fn single_key_returns_its_value() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (h, d) = (2, 8);
        let config = AttentionConfig::new(h * d, h, 4);
        let q = DeviceTensor::from_f32(
            &random_values(4 * h * d, 5),
            &[1, 4, h, d],
            dtype,
            Device::Cpu,
        )
        .unwrap();
        let k = DeviceTensor::from_f32(&random_values(h * d, 6), &[1, 1, h, d], dtype, Device::Cpu)
            .unwrap();
        let v = DeviceTensor::from_f32(&random_values(h * d, 7), &[1, 1, h, d], dtype, Device::Cpu)
            .unwrap();
        let out = CpuAttentionBackend::new()
            .forward(&config, &q, &k, &v, None)
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_eq!(out.shape(), q.shape());
        let (got, vv) = (out.to_f32_vec().unwrap(), v.to_f32_vec().unwrap());
        for i in 0..4 {
            assert_eq!(
                &got[i * h * d..(i + 1) * h * d],
                &vv[..],
                "{dtype} query {i}"
            );
        }
    }
}

#[test]
fn forward_allocates_like_q() {
    let c = Case::new(2, 9, 14, 4, 2, 16).layout(Layout::Bhsd).views();
    let config = c.config();
    let q = c.operand(9, 4, 1);
    let k = c.operand(14, 2, 2);
    let v = c.operand(14, 2, 3);
    let out = CpuAttentionBackend::new()
        .forward(&config, &q, &k, &v, None)
        .unwrap();
    assert_eq!(out.shape(), q.shape());
    assert_eq!(out.dtype(), q.dtype());
    assert_eq!(out.device(), Device::Cpu);
    assert!(out.is_contiguous());
    let want = attention_f64(&config, &q, &k, &v, None).unwrap();
    assert!(relative_l2_error(&out.to_f32_vec().unwrap(), &want) < F32_BOUND);
}

#[test]
fn backend_identity_and_supports() {
    let b = CpuAttentionBackend::new();
    assert_eq!(b.name(), "cpu");
    assert_eq!(b.device(), Device::Cpu);
    assert_eq!(b.required_kv_layout(), KvCacheLayout::Contiguous);
    let ok = AttentionConfig::new(512, 8, 1024)
        .with_num_kv_heads(2)
        .with_causal(true);
    assert_eq!(b.supports(&ok), Support::Yes);
    assert!(b.supports(&ok.clone().with_layout(Layout::Bhsd)).is_yes());
    assert!(b.supports(&AttentionConfig::new(8 * 72, 8, 3)).is_yes());
    for bad in [
        ok.clone().with_dropout(0.1),
        ok.clone().with_num_kv_heads(3),
        AttentionConfig::new(0, 0, 16),
        ok.clone().with_head_dim(48),
    ] {
        match b.supports(&bad) {
            Support::No(reason) => assert!(!reason.is_empty()),
            Support::Yes => panic!("{bad:?} should not be supported"),
        }
    }
}

/// Tensors for the error tests: B=2, Sq=5, Sk=7, H=4, Hkv=2, D=8, BSHD.
struct Setup {
    config: AttentionConfig,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    out: DeviceTensor,
}

fn tensor(shape: &[usize], dtype: DType, seed: u64) -> DeviceTensor {
    random_tensor(shape, dtype, Device::Cpu, seed)
}

fn setup() -> Setup {
    Setup {
        config: AttentionConfig::new(32, 4, 16).with_num_kv_heads(2),
        q: tensor(&[2, 5, 4, 8], DType::F32, 1),
        k: tensor(&[2, 7, 2, 8], DType::F32, 2),
        v: tensor(&[2, 7, 2, 8], DType::F32, 3),
        out: DeviceTensor::from_f32(&[f32::NAN; 320], &[2, 5, 4, 8], DType::F32, Device::Cpu)
            .unwrap(),
    }
}

fn run(s: &mut Setup, mask: Option<&DeviceTensor>) -> Result<AttentionPath, AttentionError> {
    CpuAttentionBackend::new().forward_into(&s.config, &s.q, &s.k, &s.v, mask, &mut s.out)
}

fn assert_untouched(s: &Setup) {
    assert!(s.out.to_f32_vec().unwrap().iter().all(|x| x.is_nan()));
}

#[test]
fn setup_is_valid() {
    let mut s = setup();
    assert_eq!(run(&mut s, None), Ok(AttentionPath::Cpu));
}

#[test]
fn error_wrong_heads_and_head_dim() {
    let mut s = setup();
    s.q = tensor(&[2, 5, 3, 8], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    assert_untouched(&s);

    let mut s = setup();
    s.q = tensor(&[2, 5, 4, 16], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));

    let mut s = setup();
    s.k = tensor(&[2, 7, 4, 8], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));

    let mut s = setup();
    s.k = tensor(&[2, 7, 2, 16], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));
}

#[test]
fn error_k_v_and_batch_mismatch() {
    let mut s = setup();
    s.v = tensor(&[2, 6, 2, 8], DType::F32, 1);
    let e = run(&mut s, None).unwrap_err();
    assert!(matches!(e, AttentionError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains('v'), "{e}");

    let mut s = setup();
    s.k = tensor(&[1, 7, 2, 8], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));

    let mut s = setup();
    s.q = tensor(&[2, 0, 4, 8], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));

    let mut s = setup();
    s.k = tensor(&[2, 0, 2, 8], DType::F32, 1);
    s.v = tensor(&[2, 0, 2, 8], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));

    let mut s = setup();
    s.q = tensor(&[10, 4, 8], DType::F32, 1);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));
}

#[test]
fn error_dtype_mismatch() {
    let mut s = setup();
    s.k = tensor(&[2, 7, 2, 8], DType::F16, 2);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::DTypeMismatch { .. })
    ));

    let mut s = setup();
    s.v = tensor(&[2, 7, 2, 8], DType::BF16, 2);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::DTypeMismatch { .. })
    ));

    let mut s = setup();
    s.out = tensor(&[2, 5, 4, 8], DType::F16, 2);
    let e = run(&mut s, None).unwrap_err();
    assert!(
        matches!(e, AttentionError::DTypeMismatch { ref what, .. } if what == "out"),
        "{e}"
    );
}

#[test]
fn error_mask_dtype_shape_layout() {
    let mut s = setup();
    let m = tensor(&[5, 7], DType::F16, 4);
    assert!(matches!(
        run(&mut s, Some(&m)),
        Err(AttentionError::DTypeMismatch { .. })
    ));
    for shape in [
        vec![7, 5],
        vec![5],
        vec![5, 8],
        vec![3, 5, 7],
        vec![2, 3, 5, 7],
        vec![3, 4, 5, 7],
        vec![2, 4, 6, 7],
    ] {
        let m = tensor(&shape, DType::F32, 4);
        let e = run(&mut s, Some(&m)).unwrap_err();
        assert!(
            matches!(e, AttentionError::ShapeMismatch { .. }),
            "{shape:?}: {e}"
        );
    }
    // Key axis not contiguous.
    let m = tensor(&[7, 5], DType::F32, 4).permute(&[1, 0]).unwrap();
    assert!(matches!(
        run(&mut s, Some(&m)),
        Err(AttentionError::UnsupportedLayout { .. })
    ));
    assert_untouched(&s);
    // A broadcastable mask is accepted.
    let m = tensor(&[1, 4, 5, 7], DType::F32, 4);
    assert_eq!(run(&mut s, Some(&m)), Ok(AttentionPath::Cpu));
}

#[test]
fn error_output_shape_and_overlap() {
    let mut s = setup();
    s.out = tensor(&[2, 5, 4, 9], DType::F32, 2);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    s.out = tensor(&[2, 4, 4, 8], DType::F32, 2);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    s.out = tensor(&[2, 5, 32], DType::F32, 2);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::ShapeMismatch { .. })
    ));

    // Writing over q itself.
    let mut s = setup();
    s.out = s.q.clone();
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::UnsupportedLayout { .. })
    ));

    // Views of one buffer: the output's rows overlap q's.
    let mut s = setup();
    let big = tensor(&[4, 5, 4, 8], DType::F32, 9);
    s.q = big.narrow(0, 0, 2).unwrap();
    s.out = big.narrow(0, 1, 2).unwrap();
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::UnsupportedLayout { .. })
    ));
    // Disjoint halves of one buffer are fine.
    s.out = big.narrow(0, 2, 2).unwrap();
    assert_eq!(run(&mut s, None), Ok(AttentionPath::Cpu));
    let want = attention_f64(&s.config, &s.q, &s.k, &s.v, None).unwrap();
    assert!(relative_l2_error(&s.out.to_f32_vec().unwrap(), &want) < F32_BOUND);
}

#[test]
fn error_head_dim_not_contiguous() {
    // [B, S, H, D] with H == D permuted so head_dim has stride H.
    let mut s = setup();
    s.config = AttentionConfig::new(64, 8, 16).with_num_kv_heads(8);
    s.q = tensor(&[2, 5, 8, 8], DType::F32, 1)
        .permute(&[0, 1, 3, 2])
        .unwrap();
    s.k = tensor(&[2, 7, 8, 8], DType::F32, 2);
    s.v = tensor(&[2, 7, 8, 8], DType::F32, 3);
    s.out = tensor(&[2, 5, 8, 8], DType::F32, 4);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::UnsupportedLayout { .. })
    ));
    s.q = tensor(&[2, 5, 8, 8], DType::F32, 1);
    s.out = tensor(&[2, 5, 8, 8], DType::F32, 4)
        .permute(&[0, 1, 3, 2])
        .unwrap();
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::UnsupportedLayout { .. })
    ));
}

#[test]
fn error_invalid_config() {
    let mut s = setup();
    s.config = s.config.clone().with_dropout(0.1);
    let e = run(&mut s, None).unwrap_err();
    assert!(
        matches!(
            e,
            AttentionError::InvalidConfig {
                field: "dropout",
                ..
            }
        ),
        "{e}"
    );
    assert_untouched(&s);

    let mut s = setup();
    s.config = s.config.clone().with_num_kv_heads(3);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::InvalidConfig {
            field: "num_kv_heads",
            ..
        })
    ));

    let mut s = setup();
    s.config = s.config.clone().with_scale(f32::NAN);
    assert!(matches!(
        run(&mut s, None),
        Err(AttentionError::InvalidConfig { field: "scale", .. })
    ));
}

#[test]
fn error_wrong_device() {
    let gpu = Device::best_available();
    if gpu.is_gpu() {
        let mut s = setup();
        s.q =
            DeviceTensor::from_f32(&random_values(320, 1), &[2, 5, 4, 8], DType::F32, gpu).unwrap();
        assert!(matches!(
            run(&mut s, None),
            Err(AttentionError::DeviceMismatch { .. })
        ));
        // Every operand on the GPU: the CPU backend still refuses.
        let mut s = setup();
        let up = |t: &DeviceTensor| {
            DeviceTensor::from_f32(&t.to_f32_vec().unwrap(), t.shape(), DType::F32, gpu).unwrap()
        };
        s.q = up(&s.q);
        s.k = up(&s.k);
        s.v = up(&s.v);
        s.out = up(&s.out);
        assert!(matches!(
            run(&mut s, None),
            Err(AttentionError::DeviceMismatch { .. })
        ));
    } else {
        // Without a GPU no tensor can live elsewhere: making one is itself an error.
        assert!(DeviceTensor::zeros(&[1, 1, 1, 1], DType::F32, Device::Cuda(0)).is_err());
        assert!(DeviceTensor::zeros(&[1, 1, 1, 1], DType::F32, Device::Hip(0)).is_err());
    }
}
