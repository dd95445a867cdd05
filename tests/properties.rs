//! Property tests: shapes, strides, offsets, dtypes, layouts, masks, GQA ratios and cache
//! lengths are drawn at random, and every backend's answer must match the f64 reference
//! within the README's numerical contract, or be a typed `AttentionError`. Invalid inputs
//! must be refused, and a refused call must leave every tensor as it was. A panic anywhere
//! fails the property.
//!
//! The default run (`cargo test --release --test properties`) draws a small subset from a
//! fixed seed, so CI is deterministic. `FORGE_ATTN_PROPTEST_CASES=<n>` runs `n` cases per
//! property instead (a longer run), and `FORGE_ATTN_PROPTEST_SEED=<u64>` changes the seed.
//!
//! Functions named `gpu_*` run the same generators on `Device::Cuda(0)` and are ignored
//! unless asked for (`-- --include-ignored`). The remaining properties run on the CPU
//! backend, and also on the GPU where `Device::best_available()` finds one. `known_gap_*`
//! properties state a bound the library does not meet yet (their ignore reason gives the
//! measured figure); GPU runs skip them with `--skip known_gap`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use forge_attn::reference::{
    attention_f64, attention_naive_in_dtype, random_values, relative_l2_error,
};
use forge_attn::{
    AttentionConfig, AttentionError, BackendImplementation, CpuAttentionBackend, DType, Device,
    DeviceAttentionBackend, DeviceTensor, GpuAttentionBackend, HostAdapter, KvCache, KvCacheLayout,
    KvCacheSpec, Layout,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};

/// Elements per generated tensor stay under this, so that the CPU runs stay fast.
const MAX_ELEMS: usize = 48_000;

/// Value written around every input view: a backend that reads outside a view sees NaN.
const OUTSIDE_INPUT: f32 = f32::NAN;
/// Value written around every output view: a backend that writes outside it is caught.
const OUTSIDE_OUTPUT: f32 = 7.25;

type Outcome = Result<(), TestCaseError>;

/// The runner of one property: a fixed seed and no failure files, `cases` cases unless
/// `FORGE_ATTN_PROPTEST_CASES` says otherwise.
fn runner(cases: u32) -> TestRunner {
    let env_u64 = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let cases = env_u64("FORGE_ATTN_PROPTEST_CASES").map_or(cases, |n| n as u32);
    let seed = env_u64("FORGE_ATTN_PROPTEST_SEED").unwrap_or(0x0f0f_a77e_2024);
    TestRunner::new(ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    })
}

/// Runs `check` on `cases` draws of `strategy`; on failure panics with the shrunk case.
fn check<S: Strategy>(cases: u32, strategy: S, check: impl Fn(S::Value) -> Outcome)
where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = runner(cases).run(&strategy, check) {
        panic!("{e}");
    }
}

/// Runs `f`, turning a panic into a failed property (the library promises none).
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("{what} panicked: {msg}"))
    })
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

// ---------------------------------------------------------------------------------------
// Generated views
// ---------------------------------------------------------------------------------------

/// How one operand is laid out in memory: its first three logical dimensions are stored in
/// the order `perm` (a permutation of 0..3; head_dim always last), every stored dimension
/// is `pad[i]` longer than the view, and the view starts `start[i] <= pad[i]` into it. The
/// identity with no padding is a plain contiguous tensor.
#[derive(Debug, Clone, PartialEq)]
struct View {
    perm: [usize; 3],
    pad: [usize; 4],
    start: [usize; 4],
}

impl View {
    fn contiguous() -> Self {
        View {
            perm: [0, 1, 2],
            pad: [0; 4],
            start: [0; 4],
        }
    }
}

const PERMS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

/// A view; `align` > 1 keeps head_dim-axis padding and starts multiples of `align`
/// elements, so that rows of a head_dim that is a multiple of `align` start aligned.
fn view_strategy(align: usize) -> impl Strategy<Value = View> {
    let padded = (
        0..PERMS.len(),
        prop::array::uniform3(0usize..3),
        0usize..3,
        prop::array::uniform4(0usize..4),
    )
        .prop_map(move |(p, pad3, pad_d, st)| {
            let pad = [pad3[0], pad3[1], pad3[2], pad_d * align.max(1)];
            let mut start = [0; 4];
            for i in 0..3 {
                start[i] = st[i].min(pad[i]);
            }
            start[3] = (st[3] * align.max(1)).min(pad[3]);
            if align > 1 {
                start[3] -= start[3] % align;
            }
            View {
                perm: PERMS[p],
                pad,
                start,
            }
        });
    prop_oneof![1 => Just(View::contiguous()), 3 => padded]
}

/// Builds a `logical`-shaped view holding `data` (row-major logical order) on `device`,
/// inside a larger allocation filled with `outside`. Returns the view and the allocation.
fn make_view(
    data: &[f32],
    logical: [usize; 4],
    view: &View,
    dtype: DType,
    device: Device,
    outside: f32,
) -> forge_attn::Result<(DeviceTensor, DeviceTensor)> {
    let phys: Vec<usize> = (0..3)
        .map(|i| logical[view.perm[i]] + view.pad[i])
        .chain([logical[3] + view.pad[3]])
        .collect();
    let n: usize = phys.iter().product();
    let parent = DeviceTensor::from_f32(&vec![outside; n], &phys, dtype, device)?;
    let mut t = parent.clone();
    for i in 0..3 {
        t = t.narrow(i, view.start[i], logical[view.perm[i]])?;
    }
    t = t.narrow(3, view.start[3], logical[3])?;
    // Logical dimension j is stored at position inv[j].
    let mut inv = [0usize, 0, 0, 3];
    for (i, &p) in view.perm.iter().enumerate() {
        inv[p] = i;
    }
    let mut t = t.permute(&inv)?;
    let src = DeviceTensor::from_f32(data, &logical, dtype, device)?;
    t.copy_from(&src)?;
    Ok((t, parent))
}

/// Element indices (in the allocation) that `t` covers.
fn covered(t: &DeviceTensor) -> Vec<usize> {
    let (sh, st) = (t.shape(), t.strides());
    let mut idx = Vec::with_capacity(t.numel());
    let mut pos = vec![0usize; sh.len()];
    if sh.contains(&0) {
        return idx;
    }
    loop {
        idx.push(t.offset() + pos.iter().zip(st).map(|(p, s)| p * s).sum::<usize>());
        let mut d = sh.len();
        loop {
            if d == 0 {
                return idx;
            }
            d -= 1;
            pos[d] += 1;
            if pos[d] < sh[d] {
                break;
            }
            pos[d] = 0;
        }
    }
}

fn bits(t: &DeviceTensor) -> Result<Vec<u32>, TestCaseError> {
    Ok(t.to_f32_vec()
        .map_err(|e| fail(format!("download: {e}")))?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

// ---------------------------------------------------------------------------------------
// Valid attention calls
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum MaskKind {
    /// `[Sq, Sk]`
    Rank2,
    /// `[B or 1, Sq, Sk]`
    Rank3 { batch_broadcast: bool },
    /// `[B or 1, H or 1, Sq, Sk]`
    Rank4 {
        batch_broadcast: bool,
        head_broadcast: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct MaskCase {
    kind: MaskKind,
    /// Per mille of entries that are -inf.
    neg_inf_per_mille: u32,
    /// Whether some rows are masked entirely (they must give zeros).
    full_rows: bool,
    /// Extra elements after each query row (the row stride exceeds seq_k).
    row_pad: usize,
    /// Finite entries are drawn in `[-range, range)`.
    range: f32,
}

fn mask_strategy() -> impl Strategy<Value = MaskCase> {
    let kind = prop_oneof![
        Just(MaskKind::Rank2),
        any::<bool>().prop_map(|b| MaskKind::Rank3 { batch_broadcast: b }),
        (any::<bool>(), any::<bool>()).prop_map(|(b, h)| MaskKind::Rank4 {
            batch_broadcast: b,
            head_broadcast: h
        }),
    ];
    (
        kind,
        prop_oneof![Just(0u32), Just(100), Just(400), Just(900)],
        any::<bool>(),
        0usize..3,
        prop_oneof![Just(0.0f32), Just(1.0), Just(4.0)],
    )
        .prop_map(
            |(kind, neg_inf_per_mille, full_rows, row_pad, range)| MaskCase {
                kind,
                neg_inf_per_mille,
                full_rows,
                row_pad,
                range,
            },
        )
}

#[derive(Debug, Clone, PartialEq)]
struct Case {
    batch: usize,
    seq_q: usize,
    seq_k: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    layout: Layout,
    causal: bool,
    scale: Option<f32>,
    q: View,
    k: View,
    v: View,
    out: View,
    /// K and V hold one sequence, repeated over the batch with stride 0.
    kv_batch_broadcast: bool,
    mask: Option<MaskCase>,
    seed: u64,
}

/// (kv_heads, group): GQA ratios 1, 2, 4, 8, with MQA (one kv head) among them.
const HEADS: [(usize, usize); 9] = [
    (1, 1),
    (2, 1),
    (3, 1),
    (1, 2),
    (2, 2),
    (1, 4),
    (2, 4),
    (1, 8),
    (1, 3),
];

const HEAD_DIMS: [usize; 16] = [
    1, 3, 5, 8, 16, 24, 32, 40, 64, 72, 80, 96, 128, 160, 200, 256,
];

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// Valid calls; `align` as in [`view_strategy`].
fn case_strategy(align: usize) -> impl Strategy<Value = Case> {
    let seqs = prop_oneof![
        // Decode: a few queries against a longer cache.
        (1usize..=16, 1usize..=96),
        // Prefill, seq_q > seq_k included.
        (1usize..=48, 1usize..=48),
    ];
    let shape = (
        1usize..=3,
        seqs,
        0..HEADS.len(),
        prop_oneof![
            3 => prop::sample::select(HEAD_DIMS.to_vec()),
            1 => 1usize..=264,
        ],
    );
    let flags = (
        dtype_strategy(),
        prop_oneof![Just(Layout::Bshd), Just(Layout::Bhsd)],
        any::<bool>(),
        prop_oneof![
            2 => Just(None),
            1 => prop_oneof![Just(0.05f32), Just(0.5), Just(1.0), Just(2.0), Just(8.0)].prop_map(Some),
        ],
        prop::option::weighted(0.6, mask_strategy()),
        prop::bool::weighted(0.2),
        any::<u64>(),
    );
    let views = prop::array::uniform4(view_strategy(align));
    (shape, flags, views).prop_map(
        |(
            (batch, (seq_q, seq_k), hi, head_dim),
            (dtype, layout, causal, scale, mask, kv_batch_broadcast, seed),
            [q, k, v, out],
        )| {
            let (kv_heads, group) = HEADS[hi];
            let mut c = Case {
                batch,
                seq_q,
                seq_k,
                heads: kv_heads * group,
                kv_heads,
                head_dim,
                dtype,
                layout,
                causal,
                scale,
                q,
                k,
                v,
                out,
                kv_batch_broadcast,
                mask,
                seed,
            };
            c.fit();
            c
        },
    )
}

impl Case {
    /// Shrinks the sequence lengths until every view holds at most [`MAX_ELEMS`] elements
    /// (its padded allocation at most a few times that).
    fn fit(&mut self) {
        let padded = |n: usize, d: usize, h: usize, b: usize| b * n * h * d;
        while padded(
            self.seq_q.max(self.seq_k),
            self.head_dim,
            self.heads,
            self.batch,
        ) > MAX_ELEMS
            && self.seq_q.max(self.seq_k) > 1
        {
            self.seq_q = (self.seq_q * 3 / 4).max(1);
            self.seq_k = (self.seq_k * 3 / 4).max(1);
        }
        while padded(1, self.head_dim, self.heads, self.batch) > MAX_ELEMS && self.batch > 1 {
            self.batch -= 1;
        }
    }

    fn config(&self) -> AttentionConfig {
        let mut c = AttentionConfig::new(
            self.heads * self.head_dim,
            self.heads,
            self.seq_q.max(self.seq_k),
        )
        .with_num_kv_heads(self.kv_heads)
        .with_causal(self.causal)
        .with_layout(self.layout);
        if let Some(s) = self.scale {
            c = c.with_scale(s);
        }
        c
    }

    /// Logical shape of an operand with `heads` heads and `seq` positions.
    fn shape(&self, batch: usize, seq: usize, heads: usize) -> [usize; 4] {
        match self.layout {
            Layout::Bshd => [batch, seq, heads, self.head_dim],
            Layout::Bhsd => [batch, heads, seq, self.head_dim],
            l => unimplemented!("layout {l:?}"),
        }
    }

    fn mask_values(&self, m: &MaskCase) -> (Vec<f32>, Vec<usize>) {
        let (b, h, sq, sk) = (self.batch, self.heads, self.seq_q, self.seq_k);
        let shape = match m.kind {
            MaskKind::Rank2 => vec![sq, sk],
            MaskKind::Rank3 { batch_broadcast } => {
                vec![if batch_broadcast { 1 } else { b }, sq, sk]
            }
            MaskKind::Rank4 {
                batch_broadcast,
                head_broadcast,
            } => vec![
                if batch_broadcast { 1 } else { b },
                if head_broadcast { 1 } else { h },
                sq,
                sk,
            ],
        };
        let n: usize = shape.iter().product();
        let r = random_values(n, self.seed ^ 0x3a5c);
        let pick = random_values(n, self.seed ^ 0x77e1);
        let mut vals: Vec<f32> = r
            .iter()
            .zip(&pick)
            .map(|(&x, &p)| {
                if ((p + 1.0) * 500.0) < m.neg_inf_per_mille as f32 {
                    f32::NEG_INFINITY
                } else {
                    x * m.range
                }
            })
            .collect();
        if m.full_rows {
            // Every third query row of every (batch, head) slice sees no key.
            for (row, chunk) in vals.chunks_mut(sk).enumerate() {
                if (row % sq) % 3 == 1 {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        (vals, shape)
    }
}

/// The operands of one call, built on `device`.
struct Operands {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    mask: Option<DeviceTensor>,
    out: DeviceTensor,
    out_parent: DeviceTensor,
}

fn build(c: &Case, device: Device) -> forge_attn::Result<Operands> {
    let kb = if c.kv_batch_broadcast { 1 } else { c.batch };
    let qs = c.shape(c.batch, c.seq_q, c.heads);
    let ks = c.shape(kb, c.seq_k, c.kv_heads);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let (q, _) = make_view(
        &random_values(n(qs), c.seed),
        qs,
        &c.q,
        c.dtype,
        device,
        OUTSIDE_INPUT,
    )?;
    let (mut k, _) = make_view(
        &random_values(n(ks), c.seed ^ 1),
        ks,
        &c.k,
        c.dtype,
        device,
        OUTSIDE_INPUT,
    )?;
    let (mut v, _) = make_view(
        &random_values(n(ks), c.seed ^ 2),
        ks,
        &c.v,
        c.dtype,
        device,
        OUTSIDE_INPUT,
    )?;
    if c.kv_batch_broadcast {
        k = k.broadcast_dim(0, c.batch)?;
        v = v.broadcast_dim(0, c.batch)?;
    }
    let mask = match &c.mask {
        None => None,
        Some(m) => {
            let (vals, shape) = c.mask_values(m);
            let r = shape.len();
            let mut padded = shape.clone();
            padded[r - 1] += m.row_pad;
            let np: usize = padded.iter().product();
            let parent = DeviceTensor::from_f32(&vec![f32::NAN; np], &padded, DType::F32, device)?;
            let mut t = parent.narrow(r - 1, 0, shape[r - 1])?;
            t.copy_from(&DeviceTensor::from_f32(&vals, &shape, DType::F32, device)?)?;
            Some(t)
        }
    };
    let (out, out_parent) = make_view(
        &vec![0.0; n(qs)],
        qs,
        &c.out,
        c.dtype,
        device,
        OUTSIDE_OUTPUT,
    )?;
    Ok(Operands {
        q,
        k,
        v,
        mask,
        out,
        out_parent,
    })
}

/// The contract's bound for `dtype`: f32 1e-5 relative L2; f16/bf16 twice the naive
/// in-dtype error (at least one rounding of the output) and under 1e-2.
fn bound(dtype: DType, naive_err: f64) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => (2.0 * naive_err).max(f64::from(half::f16::EPSILON.to_f32()) / 2.0),
        DType::BF16 => (2.0 * naive_err).max(f64::from(half::bf16::EPSILON.to_f32()) / 2.0),
        d => unimplemented!("dtype {d}"),
    }
}

/// Checks `got` (row-major, logical order) against the reference of the call.
fn check_against_reference(
    what: &str,
    config: &AttentionConfig,
    ops: (
        &DeviceTensor,
        &DeviceTensor,
        &DeviceTensor,
        Option<&DeviceTensor>,
    ),
    got: &[f32],
) -> Outcome {
    let (q, k, v, mask) = ops;
    let want = attention_f64(config, q, k, v, mask).map_err(|e| fail(format!("reference: {e}")))?;
    let err = relative_l2_error(got, &want);
    let naive_err = match q.dtype() {
        DType::F32 => 0.0,
        _ => relative_l2_error(
            &attention_naive_in_dtype(config, q, k, v, mask)
                .map_err(|e| fail(format!("naive: {e}")))?,
            &want,
        ),
    };
    let limit = bound(q.dtype(), naive_err);
    if !(err <= limit && err < 1e-2) {
        return Err(fail(format!(
            "{what}: relative L2 error {err:.3e} > bound {limit:.3e} (naive in-dtype {naive_err:.3e})"
        )));
    }
    Ok(())
}

/// Where a property runs: the CPU backend on host tensors, or the GPU backend on a GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Cpu,
    Gpu(Device),
}

impl Target {
    fn device(self) -> Device {
        match self {
            Target::Cpu => Device::Cpu,
            Target::Gpu(d) => d,
        }
    }

    fn backend(self) -> Box<dyn DeviceAttentionBackend> {
        match self {
            Target::Cpu => Box::new(CpuAttentionBackend::new()),
            Target::Gpu(d) => Box::new(GpuAttentionBackend::new(d).expect("a usable GPU")),
        }
    }

    /// Errors a backend may give for a valid call: the CPU backend runs every valid call;
    /// the GPU backend may refuse with a reason, never fail at run time.
    fn accepts_refusal(self, e: &AttentionError) -> bool {
        match self {
            Target::Cpu => false,
            Target::Gpu(_) => matches!(
                e,
                AttentionError::NotSupported { .. } | AttentionError::UnsupportedLayout { .. }
            ),
        }
    }
}

/// The targets of a default-run property: the CPU, and the best GPU when there is one.
fn default_targets() -> Vec<Target> {
    let mut t = vec![Target::Cpu];
    let best = Device::best_available();
    if best.is_gpu() {
        t.push(Target::Gpu(best));
    }
    t
}

/// One valid call on `target`: a result within the contract (or an accepted refusal), no
/// write outside the output view.
fn valid_call(c: &Case, target: Target) -> Outcome {
    let ops = build(c, target.device()).map_err(|e| fail(format!("building operands: {e}")))?;
    let Operands {
        q,
        k,
        v,
        mask,
        mut out,
        out_parent,
    } = ops;
    let config = c.config();
    let backend = target.backend();
    let result = no_panic("forward_into", || {
        backend.forward_into(&config, &q, &k, &v, mask.as_ref(), &mut out)
    })?;
    match result {
        Ok(_) => {}
        Err(e) if target.accepts_refusal(&e) => return Ok(()),
        Err(e) => return Err(fail(format!("{target:?} refused a valid call: {e}"))),
    }
    let got = out
        .to_f32_vec()
        .map_err(|e| fail(format!("download: {e}")))?;
    check_against_reference(
        &format!("{target:?}"),
        &config,
        (&q, &k, &v, mask.as_ref()),
        &got,
    )?;
    // Nothing outside the view was written.
    let parent = out_parent
        .to_f32_vec()
        .map_err(|e| fail(format!("download: {e}")))?;
    let mut inside = vec![false; parent.len()];
    for i in covered(&out) {
        inside[i] = true;
    }
    if let Some(i) = (0..parent.len()).find(|&i| !inside[i] && parent[i] != OUTSIDE_OUTPUT) {
        return Err(fail(format!(
            "{target:?} wrote element {i} of the output's allocation, outside the view ({})",
            parent[i]
        )));
    }
    Ok(())
}

#[test]
fn valid_calls_match_the_reference() {
    let targets = default_targets();
    check(256, case_strategy(1), |c| {
        for &t in &targets {
            valid_call(&c, t)?;
        }
        Ok(())
    });
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_valid_calls_match_the_reference() {
    check(256, case_strategy(8), |c| {
        valid_call(&c, Target::Gpu(Device::Cuda(0)))
    });
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_views_at_odd_element_offsets_match_the_reference() {
    check(256, case_strategy(1), |c| {
        valid_call(&c, Target::Gpu(Device::Cuda(0)))
    });
}

// ---------------------------------------------------------------------------------------
// Invalid calls
// ---------------------------------------------------------------------------------------

/// The `Breakage` enum with every variant but `ConfigScale`, and the list of those
/// variants (one name list, so a new breakage is drawn as soon as it is declared).
macro_rules! breakages {
    ($($unit:ident),* $(,)?) => {
        /// One way to break a valid call.
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Breakage {
            $($unit,)*
            ConfigScale(f32),
        }

        /// Every breakage without a value.
        const UNIT_BREAKAGES: &[Breakage] = &[$(Breakage::$unit),*];
    };
}

breakages!(
    QRank3,
    KWrongKvHeads,
    VWrongSeq,
    KWrongBatch,
    QWrongHeadDim,
    QWrongHeads,
    KDType,
    VDType,
    MaskDType,
    MaskWrongShape,
    MaskKeyStride,
    OutDType,
    OutWrongShape,
    HeadDimStrided,
    OutAliasesQ,
    OutAliasesK,
    OutBroadcast,
    ZeroBatch,
    ZeroSeqQ,
    ZeroSeqK,
    ConfigZeroHeads,
    ConfigZeroHeadDim,
    ConfigDimMismatch,
    ConfigKvNotDividing,
    ConfigDropout,
    ConfigZeroMaxSeq,
    ConfigZeroBatchSize,
);

fn breakage_strategy() -> impl Strategy<Value = Breakage> {
    prop_oneof![
        prop::sample::select(UNIT_BREAKAGES.to_vec()),
        prop::sample::select(vec![
            0.0f32,
            -0.0,
            -1.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY
        ])
        .prop_map(Breakage::ConfigScale),
    ]
}

/// Small valid calls with contiguous operands, to be broken.
fn small_case_strategy() -> impl Strategy<Value = Case> {
    case_strategy(1).prop_map(|mut c| {
        c.q = View::contiguous();
        c.k = View::contiguous();
        c.v = View::contiguous();
        c.out = View::contiguous();
        c.kv_batch_broadcast = false;
        c.batch = c.batch.max(2);
        c.seq_q = c.seq_q.clamp(2, 12);
        c.seq_k = c.seq_k.clamp(2, 12);
        c.head_dim = c.head_dim.clamp(2, 64);
        c.mask = c.mask.map(|mut m| {
            m.kind = MaskKind::Rank2;
            m.row_pad = 0;
            m
        });
        c
    })
}

/// A broken call: config, q, k, v, mask and the output (with its allocation).
struct Broken {
    config: AttentionConfig,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    mask: Option<DeviceTensor>,
    out: DeviceTensor,
}

fn tensor(c: &Case, shape: &[usize], dtype: DType, device: Device, salt: u64) -> DeviceTensor {
    let n: usize = shape.iter().product();
    DeviceTensor::from_f32(&random_values(n, c.seed ^ salt), shape, dtype, device)
        .expect("allocation")
}

fn break_case(c: &Case, b: Breakage, device: Device) -> Broken {
    use Breakage::*;
    let mut config = c.config();
    let (bt, sq, sk, h, hk, d, dt) = (
        c.batch, c.seq_q, c.seq_k, c.heads, c.kv_heads, c.head_dim, c.dtype,
    );
    let other = if dt == DType::F32 {
        DType::F16
    } else {
        DType::F32
    };
    let mut qs = c.shape(bt, sq, h).to_vec();
    let mut ks = c.shape(bt, sk, hk).to_vec();
    let mut vs = ks.clone();
    let (qd, mut kd, mut vd, mut od) = (dt, dt, dt, dt);
    let mut os = qs.clone();
    let (seq_ax, head_ax) = match c.layout {
        Layout::Bshd => (1, 2),
        Layout::Bhsd => (2, 1),
        l => unimplemented!("layout {l:?}"),
    };
    let mut mask_shape = vec![sq, sk];
    let mut mask_dtype = DType::F32;
    let mut with_mask = c.mask.is_some();
    match b {
        QRank3 => qs = vec![bt, sq, h * d],
        KWrongKvHeads => {
            ks[head_ax] = hk + 1;
            vs[head_ax] = hk + 1;
        }
        VWrongSeq => vs[seq_ax] = sk + 1,
        KWrongBatch => {
            ks[0] = bt - 1;
            vs[0] = bt - 1;
        }
        QWrongHeadDim => {
            qs[3] = d + 1;
            os[3] = d + 1;
        }
        QWrongHeads => {
            qs[head_ax] = h + 1;
            os[head_ax] = h + 1;
        }
        KDType => kd = other,
        VDType => vd = other,
        MaskDType => {
            with_mask = true;
            mask_dtype = DType::F16;
        }
        MaskWrongShape => {
            with_mask = true;
            mask_shape = vec![sq + 1, sk];
        }
        MaskKeyStride | HeadDimStrided | OutAliasesQ | OutAliasesK | OutBroadcast => {}
        OutDType => od = other,
        OutWrongShape => os[seq_ax] = sq + 1,
        ZeroBatch => {
            qs[0] = 0;
            ks[0] = 0;
            vs[0] = 0;
            os[0] = 0;
        }
        ZeroSeqQ => {
            qs[seq_ax] = 0;
            os[seq_ax] = 0;
        }
        ZeroSeqK => {
            ks[seq_ax] = 0;
            vs[seq_ax] = 0;
        }
        ConfigZeroHeads => config.num_heads = 0,
        ConfigZeroHeadDim => config.head_dim = 0,
        ConfigDimMismatch => config.dim += 1,
        ConfigKvNotDividing => config.num_kv_heads = h + 1,
        ConfigDropout => config = config.with_dropout(0.1),
        ConfigScale(s) => config.scale = Some(s),
        ConfigZeroMaxSeq => config.max_sequence_length = 0,
        ConfigZeroBatchSize => config.batch_size = 0,
    }
    let q = tensor(c, &qs, qd, device, 10);
    let mut k = tensor(c, &ks, kd, device, 11);
    let v = tensor(c, &vs, vd, device, 12);
    if b == HeadDimStrided {
        // Same logical shape, head_dim stored outermost: its stride is not 1.
        let mut stored = ks.clone();
        stored.rotate_right(1);
        k = tensor(c, &stored, kd, device, 11)
            .permute(&[1, 2, 3, 0])
            .expect("permute");
    }
    let mut mask = with_mask.then(|| tensor(c, &mask_shape, mask_dtype, device, 13));
    if b == MaskKeyStride {
        mask = Some(
            tensor(c, &[sk, sq], DType::F32, device, 13)
                .permute(&[1, 0])
                .expect("permute"),
        );
    }
    let out = match b {
        OutAliasesQ => q.clone(),
        OutAliasesK if hk == h && sk == sq => k.clone(),
        // K differs in shape: a q-shaped view of K's allocation still overlaps it.
        OutAliasesK => {
            let big = tensor(
                c,
                &[qs.iter().product::<usize>() + ks.iter().product::<usize>()],
                dt,
                device,
                14,
            );
            k = big
                .narrow(0, 0, ks.iter().product())
                .and_then(|t| t.reshape(&ks))
                .expect("view");
            big.narrow(0, 1, qs.iter().product())
                .and_then(|t| t.reshape(&qs))
                .expect("view")
        }
        OutBroadcast => {
            let mut one = os.clone();
            one[0] = 1;
            tensor(c, &one, od, device, 15)
                .broadcast_dim(0, bt)
                .expect("broadcast")
        }
        _ => tensor(c, &os, od, device, 15),
    };
    Broken {
        config,
        q,
        k,
        v,
        mask,
        out,
    }
}

fn invalid_call(c: &Case, b: Breakage, target: Target) -> Outcome {
    let device = target.device();
    let Broken {
        config,
        q,
        k,
        v,
        mask,
        mut out,
    } = no_panic("building a broken call", || break_case(c, b, device))?;
    let before: Vec<Vec<u32>> = [&q, &k, &v, &out]
        .iter()
        .map(|t| bits(t))
        .collect::<Result<_, _>>()?;
    let backend = target.backend();
    let result = no_panic("forward_into", || {
        backend.forward_into(&config, &q, &k, &v, mask.as_ref(), &mut out)
    })?;
    if let Ok(path) = result {
        return Err(fail(format!(
            "{target:?} accepted a broken call ({b:?}) and ran {path}"
        )));
    }
    let after: Vec<Vec<u32>> = [&q, &k, &v, &out]
        .iter()
        .map(|t| bits(t))
        .collect::<Result<_, _>>()?;
    for (name, (x, y)) in ["q", "k", "v", "out"].iter().zip(before.iter().zip(&after)) {
        if x != y {
            return Err(fail(format!("{target:?}: the refused call changed {name}")));
        }
    }
    // The allocating form refuses it too, unless only the output was broken.
    use Breakage::*;
    if matches!(
        b,
        OutDType | OutWrongShape | OutAliasesQ | OutAliasesK | OutBroadcast
    ) {
        return Ok(());
    }
    let result = no_panic("forward", || {
        backend.forward(&config, &q, &k, &v, mask.as_ref())
    })?;
    if result.is_ok() {
        return Err(fail(format!(
            "{target:?}: forward accepted a broken call ({b:?})"
        )));
    }
    Ok(())
}

#[test]
fn invalid_calls_are_refused_and_change_nothing() {
    let targets = default_targets();
    check(
        128,
        (small_case_strategy(), breakage_strategy()),
        |(c, b)| {
            for &t in &targets {
                invalid_call(&c, b, t)?;
            }
            Ok(())
        },
    );
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_invalid_calls_are_refused_and_change_nothing() {
    check(
        256,
        (small_case_strategy(), breakage_strategy()),
        |(c, b)| invalid_call(&c, b, Target::Gpu(Device::Cuda(0))),
    );
}

// ---------------------------------------------------------------------------------------
// KV cache
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct CacheCase {
    batch: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    dtype: DType,
    layout: Layout,
    causal: bool,
    seq_q: usize,
    /// Tokens per append, in order; their sum is the cached length.
    chunks: Vec<usize>,
    /// Spare capacity past the cached length.
    spare: usize,
    /// Page size of a paged cache; `None` for a contiguous one.
    page_size: Option<usize>,
    /// Each appended chunk is a view with this layout.
    new_view: View,
    seed: u64,
}

fn cache_case_strategy(align: usize) -> impl Strategy<Value = CacheCase> {
    (
        (
            1usize..=3,
            0..HEADS.len(),
            prop::sample::select(HEAD_DIMS.to_vec()),
        ),
        (
            dtype_strategy(),
            prop_oneof![Just(Layout::Bshd), Just(Layout::Bhsd)],
        ),
        (any::<bool>(), 1usize..=16),
        prop::collection::vec(1usize..=24, 1..=4),
        0usize..8,
        prop::option::of(prop::sample::select(vec![1usize, 4, 16, 64])),
        view_strategy(align),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, hi, head_dim),
                (dtype, layout),
                (causal, seq_q),
                mut chunks,
                spare,
                page_size,
                new_view,
                seed,
            )| {
                let (kv_heads, group) = HEADS[hi];
                // Keep the cache small.
                let per_token = batch * kv_heads * (head_dim + 8);
                while chunks.iter().sum::<usize>() * per_token > MAX_ELEMS && chunks.len() > 1 {
                    chunks.pop();
                }
                if chunks[0] * per_token > MAX_ELEMS {
                    chunks[0] = (MAX_ELEMS / per_token).max(1);
                }
                CacheCase {
                    batch,
                    kv_heads,
                    group,
                    head_dim,
                    dtype,
                    layout,
                    causal,
                    seq_q,
                    chunks,
                    spare,
                    page_size,
                    new_view,
                    seed,
                }
            },
        )
}

impl CacheCase {
    fn len(&self) -> usize {
        self.chunks.iter().sum()
    }

    fn spec(&self) -> KvCacheSpec {
        KvCacheSpec {
            batch: self.batch,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            capacity: self.len() + self.spare,
            dtype: self.dtype,
        }
    }

    fn cache(&self, device: Device) -> forge_attn::Result<KvCache> {
        match self.page_size {
            None => KvCache::contiguous(self.spec(), KvCacheLayout::Contiguous, device),
            Some(p) => {
                let pages = self.batch * (self.len() + self.spare).div_ceil(p);
                KvCache::paged(self.spec(), p, pages, device)
            }
        }
    }

    fn config(&self) -> AttentionConfig {
        let h = self.kv_heads * self.group;
        AttentionConfig::new(h * self.head_dim, h, self.len() + self.spare)
            .with_num_kv_heads(self.kv_heads)
            .with_causal(self.causal)
            .with_layout(self.layout)
    }
}

/// Appends the chunks (each a `[B, n, Hkv, D]` view) to a new cache; returns it with the
/// dense K and V that it must hold.
fn fill_cache(
    c: &CacheCase,
    device: Device,
) -> Result<(KvCache, DeviceTensor, DeviceTensor), TestCaseError> {
    let mut cache = no_panic("creating a cache", || c.cache(device))?
        .map_err(|e| fail(format!("creating a cache: {e}")))?;
    let (b, hk, d) = (c.batch, c.kv_heads, c.head_dim);
    let len = c.len();
    let kd = random_values(b * len * hk * d, c.seed ^ 21);
    let vd = random_values(b * len * hk * d, c.seed ^ 22);
    let mut done = 0;
    for &n in &c.chunks {
        let chunk = |all: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(b * n * hk * d);
            for bi in 0..b {
                let row = (bi * len + done) * hk * d;
                out.extend_from_slice(&all[row..row + n * hk * d]);
            }
            out
        };
        let shape = [b, n, hk, d];
        let (kn, _) = make_view(
            &chunk(&kd),
            shape,
            &c.new_view,
            c.dtype,
            device,
            OUTSIDE_INPUT,
        )
        .map_err(|e| fail(format!("building k_new: {e}")))?;
        let (vn, _) = make_view(
            &chunk(&vd),
            shape,
            &c.new_view,
            c.dtype,
            device,
            OUTSIDE_INPUT,
        )
        .map_err(|e| fail(format!("building v_new: {e}")))?;
        no_panic("append", || cache.append(&kn, &vn))?
            .map_err(|e| fail(format!("append of {n} tokens: {e}")))?;
        done += n;
    }
    let shape = [b, len, hk, d];
    let k = DeviceTensor::from_f32(&kd, &shape, c.dtype, Device::Cpu).expect("host tensor");
    let v = DeviceTensor::from_f32(&vd, &shape, c.dtype, Device::Cpu).expect("host tensor");
    Ok((cache, k, v))
}

/// `t` ([B, S, H, D]) in the layout of `c` (a view, no copy).
fn in_layout(t: &DeviceTensor, layout: Layout) -> DeviceTensor {
    match layout {
        Layout::Bshd => t.clone(),
        Layout::Bhsd => t.permute(&[0, 2, 1, 3]).expect("permute"),
        l => unimplemented!("layout {l:?}"),
    }
}

fn q_for(c: &CacheCase, device: Device) -> DeviceTensor {
    let h = c.kv_heads * c.group;
    let shape = match c.layout {
        Layout::Bshd => [c.batch, c.seq_q, h, c.head_dim],
        Layout::Bhsd => [c.batch, h, c.seq_q, c.head_dim],
        l => unimplemented!("layout {l:?}"),
    };
    let n: usize = shape.iter().product();
    DeviceTensor::from_f32(&random_values(n, c.seed ^ 23), &shape, c.dtype, device)
        .expect("allocation")
}

/// Appends, checks what the cache holds, runs attention over it and refuses an append
/// past its capacity without changing it.
fn cache_call(c: &CacheCase, target: Target) -> Outcome {
    let device = target.device();
    let (mut cache, k, v) = fill_cache(c, device)?;
    if cache.lengths().iter().any(|&l| l != c.len()) {
        return Err(fail(format!(
            "lengths {:?}, expected {}",
            cache.lengths(),
            c.len()
        )));
    }
    let (dk, dv) =
        no_panic("to_dense", || cache.to_dense())?.map_err(|e| fail(format!("to_dense: {e}")))?;
    prop_assert_eq!(
        bits(&dk)?,
        bits(&k)?,
        "cached K differs from what was appended"
    );
    prop_assert_eq!(
        bits(&dv)?,
        bits(&v)?,
        "cached V differs from what was appended"
    );

    let config = c.config();
    let q = q_for(c, device);
    let q_host = q_for(c, Device::Cpu);
    let (kl, vl) = (in_layout(&k, c.layout), in_layout(&v, c.layout));
    let backend = target.backend();
    // Dense views of a contiguous cache feed forward_into directly.
    let views = no_panic("views", || cache.views())?;
    match (&views, c.page_size) {
        (Ok((kv, vv)), None) => {
            let (kv, vv) = (in_layout(kv, c.layout), in_layout(vv, c.layout));
            let mut out = DeviceTensor::zeros(q.shape(), c.dtype, device).expect("allocation");
            let r = no_panic("forward_into over cache views", || {
                backend.forward_into(&config, &q, &kv, &vv, None, &mut out)
            })?;
            match r {
                Ok(_) => {
                    let got = out.to_f32_vec().map_err(|e| fail(format!("{e}")))?;
                    check_against_reference(
                        "forward_into over views",
                        &config,
                        (&q_host, &kl, &vl, None),
                        &got,
                    )?;
                }
                Err(e) if target.accepts_refusal(&e) => {}
                Err(e) => return Err(fail(format!("forward_into over views: {e}"))),
            }
        }
        (Err(_), Some(_)) => {}
        (Ok(_), Some(_)) => return Err(fail("a paged cache gave dense views".into())),
        (Err(e), None) => return Err(fail(format!("views of a contiguous cache: {e}"))),
    }
    // The GPU backend also attends to the cache itself.
    if let Target::Gpu(d) = target {
        let gpu = GpuAttentionBackend::new(d).expect("a usable GPU");
        let mut out = DeviceTensor::zeros(q.shape(), c.dtype, device).expect("allocation");
        let r = no_panic("forward_cached", || {
            gpu.forward_cached(&config, &q, &cache, &mut out)
        })?;
        match r {
            Ok(_) => {
                let got = out.to_f32_vec().map_err(|e| fail(format!("{e}")))?;
                check_against_reference(
                    "forward_cached",
                    &config,
                    (&q_host, &kl, &vl, None),
                    &got,
                )?;
            }
            Err(e) if target.accepts_refusal(&e) => {}
            Err(e) => return Err(fail(format!("forward_cached: {e}"))),
        }
    }
    // Past the capacity: refused, nothing appended.
    let n = c.spare + 1;
    let shape = [c.batch, n, c.kv_heads, c.head_dim];
    let extra = DeviceTensor::zeros(&shape, c.dtype, device).expect("allocation");
    let before = (cache.lengths().to_vec(), cache.pages_used());
    let r = no_panic("append past capacity", || cache.append(&extra, &extra))?;
    prop_assert!(r.is_err(), "an append past the capacity was accepted");
    prop_assert_eq!((cache.lengths().to_vec(), cache.pages_used()), before);
    let (dk2, _) = cache
        .to_dense()
        .map_err(|e| fail(format!("to_dense: {e}")))?;
    prop_assert_eq!(bits(&dk2)?, bits(&k)?, "a refused append changed the cache");
    Ok(())
}

#[test]
fn kv_cache_holds_what_was_appended_and_attends_to_it() {
    let targets = default_targets();
    check(96, cache_case_strategy(1), |c| {
        for &t in &targets {
            cache_call(&c, t)?;
        }
        Ok(())
    });
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_kv_cache_holds_what_was_appended_and_attends_to_it() {
    check(128, cache_case_strategy(8), |c| {
        cache_call(&c, Target::Gpu(Device::Cuda(0)))
    });
}

// ---------------------------------------------------------------------------------------
// The host-slice API
// ---------------------------------------------------------------------------------------

/// Small f32 BSHD calls through `HostAdapter` and `BackendImplementation::forward`.
fn legacy_case_strategy() -> impl Strategy<Value = Case> {
    case_strategy(1).prop_map(|mut c| {
        c.dtype = DType::F32;
        c.layout = Layout::Bshd;
        c.kv_batch_broadcast = false;
        c.seq_q = c.seq_q.min(12);
        c.seq_k = c.seq_k.min(24);
        c.head_dim = c.head_dim.min(72);
        if let Some(m) = &mut c.mask {
            m.row_pad = 0;
            // Host masks carry their full shape: no size-1 dimensions but the rank-2 one.
            m.kind = match m.kind {
                MaskKind::Rank2 => MaskKind::Rank2,
                MaskKind::Rank3 { .. } => MaskKind::Rank3 {
                    batch_broadcast: false,
                },
                MaskKind::Rank4 { .. } => MaskKind::Rank4 {
                    batch_broadcast: false,
                    head_broadcast: false,
                },
            };
        }
        c
    })
}

fn legacy_call(c: &Case, target: Target) -> Outcome {
    let config = c.config().with_batch_size(c.batch);
    let qs = c.shape(c.batch, c.seq_q, c.heads);
    let ks = c.shape(c.batch, c.seq_k, c.kv_heads);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let (q, k, v) = (
        random_values(n(qs), c.seed),
        random_values(n(ks), c.seed ^ 1),
        random_values(n(ks), c.seed ^ 2),
    );
    let mask = c.mask.as_ref().map(|m| c.mask_values(m));
    let result = no_panic("BackendImplementation::forward", || match target {
        Target::Cpu => HostAdapter::new(CpuAttentionBackend::new()).forward(
            &config,
            &q,
            &k,
            &v,
            mask.as_ref().map(|m| m.0.as_slice()),
        ),
        Target::Gpu(d) => HostAdapter::new(GpuAttentionBackend::new(d).expect("a usable GPU"))
            .forward(&config, &q, &k, &v, mask.as_ref().map(|m| m.0.as_slice())),
    })?;
    let got = match result {
        Ok(got) => got,
        Err(e) if target.accepts_refusal(&e) => return Ok(()),
        Err(e) => return Err(fail(format!("{target:?} refused a valid host call: {e}"))),
    };
    let t = |d: &[f32], s: &[usize]| {
        DeviceTensor::from_f32(d, s, DType::F32, Device::Cpu).expect("host tensor")
    };
    let mt = mask.as_ref().map(|(m, s)| t(m, s));
    check_against_reference(
        "host-slice forward",
        &config,
        (&t(&q, &qs), &t(&k, &ks), &t(&v, &ks), mt.as_ref()),
        &got,
    )?;
    // A slice of the wrong length is refused.
    let short = &k[..k.len() - 1];
    let r = no_panic("BackendImplementation::forward", || {
        HostAdapter::new(CpuAttentionBackend::new()).forward(&config, &q, short, &v, None)
    })?;
    prop_assert!(r.is_err(), "a short k slice was accepted");
    Ok(())
}

#[test]
fn host_slice_calls_match_the_reference() {
    let targets = default_targets();
    check(96, legacy_case_strategy(), |c| {
        for &t in &targets {
            legacy_call(&c, t)?;
        }
        Ok(())
    });
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_host_slice_calls_match_the_reference() {
    check(96, legacy_case_strategy(), |c| {
        legacy_call(&c, Target::Gpu(Device::Cuda(0)))
    });
}

// ---------------------------------------------------------------------------------------
// Removed keys: garbage there must not reach the output
// ---------------------------------------------------------------------------------------

/// How keys are removed from some rows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Removal {
    /// A -inf mask entry.
    Mask,
    /// The causal cut.
    Causal,
}

#[derive(Debug, Clone, PartialEq)]
struct GarbageCase {
    case: Case,
    removal: Removal,
    /// Garbage written into removed keys.
    value: f32,
    in_k: bool,
    in_v: bool,
}

/// Garbage in K (`in_k`) or in V (otherwise) at keys removed by one of `removals`.
fn garbage_strategy(removals: Vec<Removal>, in_k: bool) -> impl Strategy<Value = GarbageCase> {
    (
        case_strategy(1),
        prop::sample::select(removals),
        prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
    )
        .prop_map(move |(mut case, removal, value)| {
            case.layout = Layout::Bshd;
            case.q = View::contiguous();
            case.k = View::contiguous();
            case.v = View::contiguous();
            case.kv_batch_broadcast = false;
            case.seq_k = case.seq_k.max(2);
            case.causal = removal == Removal::Causal;
            case.mask = None;
            GarbageCase {
                case,
                removal,
                value,
                in_k,
                in_v: !in_k,
            }
        })
}

fn garbage_call(g: &GarbageCase, target: Target) -> Outcome {
    let c = &g.case;
    let (b, sq, sk, h, hk, d) = (c.batch, c.seq_q, c.seq_k, c.heads, c.kv_heads, c.head_dim);
    let shift = sk as isize - sq as isize;
    // Removed keys: the later half under the causal cut (rows before it never see them),
    // every third key under the mask (masked for every row).
    let removed: Vec<bool> = (0..sk)
        .map(|j| match g.removal {
            Removal::Causal => j > sk / 2,
            Removal::Mask => j % 3 == 1,
        })
        .collect();
    let clean_row = |i: usize| match g.removal {
        Removal::Causal => (i as isize + shift) < (sk / 2 + 1) as isize,
        Removal::Mask => true,
    };
    let kvn = b * sk * hk * d;
    let (kd, vd) = (
        random_values(kvn, c.seed ^ 1),
        random_values(kvn, c.seed ^ 2),
    );
    let poison = |clean: &[f32], on: bool| -> Vec<f32> {
        let mut x = clean.to_vec();
        if on {
            for (row, chunk) in x.chunks_mut(hk * d).enumerate() {
                if removed[row % sk] {
                    chunk.fill(g.value);
                }
            }
        }
        x
    };
    let mask: Option<Vec<f32>> = (g.removal == Removal::Mask).then(|| {
        (0..sq * sk)
            .map(|x| {
                if removed[x % sk] {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect()
    });
    let dev = target.device();
    let t = |x: &[f32], s: &[usize], dev: Device| {
        DeviceTensor::from_f32(x, s, c.dtype, dev).map_err(|e| fail(format!("{e}")))
    };
    let (qs, ks) = ([b, sq, h, d], [b, sk, hk, d]);
    let q = t(&random_values(b * sq * h * d, c.seed), &qs, dev)?;
    let k = t(&poison(&kd, g.in_k), &ks, dev)?;
    let v = t(&poison(&vd, g.in_v), &ks, dev)?;
    let m = match &mask {
        Some(m) => Some(
            DeviceTensor::from_f32(m, &[sq, sk], DType::F32, dev)
                .map_err(|e| fail(format!("{e}")))?,
        ),
        None => None,
    };
    let config = c.config();
    let mut out = DeviceTensor::zeros(&qs, c.dtype, dev).map_err(|e| fail(format!("{e}")))?;
    let backend = target.backend();
    let r = no_panic("forward_into", || {
        backend.forward_into(&config, &q, &k, &v, m.as_ref(), &mut out)
    })?;
    match r {
        Ok(_) => {}
        Err(e) if target.accepts_refusal(&e) => return Ok(()),
        Err(e) => return Err(fail(format!("{target:?} refused a valid call: {e}"))),
    }
    let got = out.to_f32_vec().map_err(|e| fail(format!("{e}")))?;
    // The answer without the garbage, on the rows that must not see it.
    let hq = |x: &[f32], s: &[usize]| t(x, s, Device::Cpu);
    let (qh, kh, vh) = (
        hq(&q.to_f32_vec().map_err(|e| fail(format!("{e}")))?, &qs)?,
        hq(&kd, &ks)?,
        hq(&vd, &ks)?,
    );
    let mh = mask
        .as_ref()
        .map(|m| DeviceTensor::from_f32(m, &[sq, sk], DType::F32, Device::Cpu).expect("host"));
    let want =
        attention_f64(&config, &qh, &kh, &vh, mh.as_ref()).map_err(|e| fail(format!("{e}")))?;
    let naive = attention_naive_in_dtype(&config, &qh, &kh, &vh, mh.as_ref())
        .map_err(|e| fail(format!("{e}")))?;
    let rows = |x: usize| (x / (h * d)) % sq;
    let pick_f32 = |x: &[f32]| -> Vec<f32> {
        x.iter()
            .enumerate()
            .filter(|(i, _)| clean_row(rows(*i)))
            .map(|(_, &v)| v)
            .collect()
    };
    let want_rows: Vec<f64> = want
        .iter()
        .enumerate()
        .filter(|(i, _)| clean_row(rows(*i)))
        .map(|(_, &v)| v)
        .collect();
    let err = relative_l2_error(&pick_f32(&got), &want_rows);
    let naive_err = match c.dtype {
        DType::F32 => 0.0,
        _ => relative_l2_error(&pick_f32(&naive), &want_rows),
    };
    let limit = bound(c.dtype, naive_err);
    prop_assert!(
        err <= limit && err < 1e-2,
        "{target:?}: garbage in removed keys reached the output: relative L2 error {err:.3e} > {limit:.3e}"
    );
    Ok(())
}

#[test]
fn garbage_in_k_past_the_causal_cut_is_never_read() {
    let targets = default_targets();
    check(48, garbage_strategy(vec![Removal::Causal], true), |g| {
        for &t in &targets {
            garbage_call(&g, t)?;
        }
        Ok(())
    });
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_garbage_in_k_past_the_causal_cut_is_never_read() {
    check(128, garbage_strategy(vec![Removal::Causal], true), |g| {
        garbage_call(&g, Target::Gpu(Device::Cuda(0)))
    });
}

// NaN/inf in the V row of a key removed inside a key tile that rows still see gives NaN on
// the GPU paths (0 x NaN in P V, as in FlashAttention and torch; the README's contract),
// so the V properties hold for the CPU backend, which skips removed keys.
#[test]
fn garbage_in_v_past_the_causal_cut_is_never_read_on_the_cpu() {
    let targets = [Target::Cpu];
    check(96, garbage_strategy(vec![Removal::Causal], false), |g| {
        for &t in &targets {
            garbage_call(&g, t)?;
        }
        Ok(())
    });
}

#[test]
fn garbage_in_v_at_masked_keys_is_never_read_on_the_cpu() {
    let targets = [Target::Cpu];
    check(96, garbage_strategy(vec![Removal::Mask], false), |g| {
        for &t in &targets {
            garbage_call(&g, t)?;
        }
        Ok(())
    });
}

#[test]
fn garbage_in_k_at_masked_keys_is_never_read() {
    let targets = default_targets();
    check(96, garbage_strategy(vec![Removal::Mask], true), |g| {
        for &t in &targets {
            garbage_call(&g, t)?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// Extreme values and sizes
// ---------------------------------------------------------------------------------------

/// Valid calls whose mask removes keys with a huge finite negative value (the padding
/// style of many model codes) instead of -inf, or whose explicit scale is huge.
fn extreme_case_strategy() -> impl Strategy<Value = (Case, f32, bool)> {
    (
        case_strategy(1),
        prop::sample::select(vec![-f32::MAX, -1e30f32, -3e38]),
        any::<bool>(),
    )
        .prop_map(|(mut c, big, huge_scale)| {
            c.mask = Some(MaskCase {
                kind: MaskKind::Rank2,
                neg_inf_per_mille: 0,
                full_rows: true,
                row_pad: 0,
                range: 1.0,
            });
            if huge_scale {
                c.scale = Some(f32::MAX);
                c.mask = None;
            }
            (c, big, huge_scale)
        })
}

/// Like [`valid_call`], with the mask's -inf entries replaced by `big`.
fn extreme_call(c: &Case, big: f32, target: Target) -> Outcome {
    let dev = target.device();
    let ops = build(c, dev).map_err(|e| fail(format!("{e}")))?;
    let mask = match &ops.mask {
        Some(m) => {
            let vals: Vec<f32> = m
                .to_f32_vec()
                .map_err(|e| fail(format!("{e}")))?
                .into_iter()
                .map(|x| if x == f32::NEG_INFINITY { big } else { x })
                .collect();
            Some(
                DeviceTensor::from_f32(&vals, m.shape(), DType::F32, dev)
                    .map_err(|e| fail(format!("{e}")))?,
            )
        }
        None => None,
    };
    let config = c.config();
    let backend = target.backend();
    let mut out = ops.out.clone();
    let r = no_panic("forward_into", || {
        backend.forward_into(&config, &ops.q, &ops.k, &ops.v, mask.as_ref(), &mut out)
    })?;
    match r {
        // Refusing a huge scale is allowed; a huge mask value is a valid mask.
        Err(AttentionError::InvalidConfig { field: "scale", .. }) if c.scale == Some(f32::MAX) => {
            Ok(())
        }
        Err(e) if target.accepts_refusal(&e) => Ok(()),
        Err(e) => Err(fail(format!("{target:?} refused: {e}"))),
        Ok(_) => {
            let got = out.to_f32_vec().map_err(|e| fail(format!("{e}")))?;
            check_against_reference(
                &format!("{target:?}"),
                &config,
                (&ops.q, &ops.k, &ops.v, mask.as_ref()),
                &got,
            )
        }
    }
}

#[test]
fn huge_negative_masks_match_the_reference() {
    let targets = default_targets();
    let masks = extreme_case_strategy().prop_filter("a mask", |(_, _, huge_scale)| !huge_scale);
    check(96, masks, |(c, big, _)| {
        for &t in &targets {
            extreme_call(&c, big, t)?;
        }
        Ok(())
    });
}

#[test]
fn huge_scales_are_refused_or_computed() {
    let targets = default_targets();
    let scales =
        extreme_case_strategy().prop_filter("a huge scale", |(_, _, huge_scale)| *huge_scale);
    check(48, scales, |(c, big, _)| {
        for &t in &targets {
            extreme_call(&c, big, t)?;
        }
        Ok(())
    });
}

/// Long caches of f32 keys, many of them identical.
fn long_case_strategy() -> impl Strategy<Value = (usize, usize, bool, u64)> {
    (
        prop::sample::select(vec![20_000usize, 50_000, 100_000]),
        prop::sample::select(vec![1usize, 2, 4]),
        any::<bool>(),
        any::<u64>(),
    )
}

fn long_call((seq_k, d, identical, seed): (usize, usize, bool, u64), target: Target) -> Outcome {
    let dev = target.device();
    let config = AttentionConfig::new(d, 1, seq_k);
    let q = DeviceTensor::from_f32(&random_values(d, seed), &[1, 1, 1, d], DType::F32, dev)
        .map_err(|e| fail(format!("{e}")))?;
    let kv: Vec<f32> = if identical {
        random_values(d, seed ^ 5).repeat(seq_k)
    } else {
        random_values(seq_k * d, seed ^ 5)
    };
    let k = DeviceTensor::from_f32(&kv, &[1, seq_k, 1, d], DType::F32, dev)
        .map_err(|e| fail(format!("{e}")))?;
    let v = DeviceTensor::from_f32(
        &random_values(seq_k * d, seed ^ 6),
        &[1, seq_k, 1, d],
        DType::F32,
        dev,
    )
    .map_err(|e| fail(format!("{e}")))?;
    let mut out =
        DeviceTensor::zeros(&[1, 1, 1, d], DType::F32, dev).map_err(|e| fail(format!("{e}")))?;
    let backend = target.backend();
    no_panic("forward_into", || {
        backend.forward_into(&config, &q, &k, &v, None, &mut out)
    })?
    .map_err(|e| fail(format!("{e}")))?;
    let got = out.to_f32_vec().map_err(|e| fail(format!("{e}")))?;
    check_against_reference(
        &format!("{target:?} seq_k {seq_k}"),
        &config,
        (&q, &k, &v, None),
        &got,
    )
}

#[test]
fn long_sequences_keep_the_f32_contract_on_the_cpu() {
    check(12, long_case_strategy(), |x| long_call(x, Target::Cpu));
}

/// The GPU's f32 kernels sum in f32 (per lane, per key group, per split): measured on the
/// H200 at 50,000 random keys, head_dim 2, one query, relative L2 1.2e-5 against the 1e-5
/// contract (the output, a mean over many keys, is far smaller than the values summed).
#[test]
#[ignore = "known gap: f32 GPU sums lose the 1e-5 contract at 50k random keys (1.2e-5 measured)"]
fn known_gap_gpu_long_sequences_keep_the_f32_contract() {
    check(12, long_case_strategy(), |x| {
        long_call(x, Target::Gpu(Device::Cuda(0)))
    });
}

#[test]
fn validate_refuses_wrapping_dims() {
    check(64, (1u32..=63, 1u32..=63), |(a, b)| {
        let (h, d) = (1usize << a, (1usize << b) + 1);
        let Some(dim) = h.checked_mul(d).or(Some(h.wrapping_mul(d))) else {
            unreachable!()
        };
        let config = AttentionConfig::new(dim, h, 4).with_head_dim(d);
        let r = no_panic("validate", || config.validate())?;
        if h.checked_mul(d).is_none() {
            prop_assert!(
                r.is_err(),
                "validate accepted num_heads {h} x head_dim {d} as dim {dim}"
            );
        }
        Ok(())
    });
}

/// A stride-0 append whose token count wraps `len + n` past the capacity check. May end
/// the process (an out-of-bounds write) until fixed.
#[test]
fn huge_appends_are_refused() {
    check(
        16,
        (1usize..=3, 1usize..=2, 1usize..=8, 0usize..4),
        |(b, hk, d, back)| {
            let spec = KvCacheSpec {
                batch: b,
                num_kv_heads: hk,
                head_dim: d,
                capacity: 16,
                dtype: DType::F32,
            };
            let mut cache = KvCache::contiguous(spec, KvCacheLayout::Contiguous, Device::Cpu)
                .map_err(|e| fail(format!("{e}")))?;
            let one =
                DeviceTensor::zeros(&[b, 1, hk, d], DType::F32, Device::Cpu).expect("allocation");
            cache.append(&one, &one).map_err(|e| fail(format!("{e}")))?;
            // len + n wraps to a value within the capacity.
            let n = usize::MAX - back;
            // Either the view is refused when it is made (its byte size overflows) or the
            // append is; both with a typed error.
            let r = no_panic("broadcast and append", || {
                let big = one.broadcast_dim(1, n)?;
                cache.append(&big, &big)
            })?;
            prop_assert!(r.is_err(), "an append of {n} tokens was accepted");
            prop_assert_eq!(cache.lengths().to_vec(), vec![1; b]);
            Ok(())
        },
    );
}

/// Broadcast views whose element count overflows are refused when made, or their download
/// is; never a wrapped size.
#[test]
fn huge_views_are_refused() {
    check(16, (32u32..=40, 32u32..=40), |(a, b)| {
        let t = DeviceTensor::zeros(&[1, 1], DType::F32, Device::Cpu).expect("allocation");
        let r = no_panic("broadcast and to_host", || {
            let t = t
                .broadcast_dim(0, 1 << a)
                .and_then(|t| t.broadcast_dim(1, 1 << b))?;
            t.to_host::<f32>().map(|v| v.len())
        })?;
        prop_assert!(r.is_err(), "to_host of a [2^{a}, 2^{b}] view gave {:?}", r);
        Ok(())
    });
}
