//! The one decision of which GPU path runs a problem. `forward`, `supports` and every
//! report ask [`plan`]; nothing else chooses.

use super::tma_operands::{TmaLayout, TmaOperands};
use crate::backend::{AttentionPath, FlashKernel};
use crate::dtype::DType;
use crate::kernels::{
    self, catalog, FlashExt, FlashImpl, FlashTile, KernelFile, KernelSpec, TileVendor,
};
use crate::problem::AttentionProblem;
use crate::tensor::DeviceTensor;

use super::decode_plan::{decode_bucket, decode_smem_bytes, MAX_DECODE_QUERIES};

/// Largest head dimension a flash kernel is built for.
pub const MAX_FLASH_HEAD_DIM: usize = 256;

/// What [`plan`] needs to know about a problem; the same for a full problem and for a
/// config-only question ("would a masked call of this config use flash?").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanInput {
    /// Element type.
    pub dtype: DType,
    /// Head dimension.
    pub head_dim: usize,
    /// Causal masking.
    pub causal: bool,
    /// An additive mask is given.
    pub has_mask: bool,
    /// Queries per sequence.
    pub seq_q: usize,
    /// f32 may run in TF32 on the tensor cores (opt-in; only where the device has them).
    pub tf32: bool,
    /// K and V rows can be read in 16-byte vectors (base addresses, strides and head_dim in
    /// whole 16-byte units, see [`vectors_aligned`]); the decode kernel needs that.
    pub kv_aligned: bool,
    /// Q, K and V can be copied in 16-byte chunks (see [`chunk_aligned`]), what the
    /// tensor-core kernels need; otherwise their tile rows run the split SIMT kernel.
    pub qkv_aligned: bool,
    /// Per-call extensions are asked for: options (window, softcap, ALiBi, sinks), a
    /// log-sum-exp output or a packed ragged batch. They run on the flash families'
    /// extended variants ([`FlashChoice::ext`]); the unfused path runs none of them.
    pub ext: bool,
    /// A packed ragged batch: never the decode kernel (which reads one dense or cached
    /// sequence per batch entry).
    pub packed: bool,
    /// K / V through a block table: the prefill families' `_paged` variants.
    pub paged: bool,
    /// Q, K and V can be read by Hopper's TMA copies (see [`tma_addressable`]): what the
    /// warp-specialized kernel (`FA_TILE_SM90_WS` rows) needs; otherwise the row's wgmma
    /// kernel runs.
    pub tma: bool,
}

impl PlanInput {
    /// The plan input of a validated problem.
    pub fn of(p: &AttentionProblem) -> Self {
        PlanInput {
            dtype: p.dtype,
            head_dim: p.head_dim,
            causal: p.causal,
            has_mask: p.mask.is_some(),
            seq_q: p.seq_q,
            tf32: false,
            kv_aligned: true,
            qkv_aligned: true,
            ext: false,
            packed: false,
            paged: false,
            tma: warp_specialized_enabled(),
        }
    }

    /// The plan input of a validated problem over these Q, K and V tensors.
    pub fn of_call(
        p: &AttentionProblem,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
    ) -> Self {
        PlanInput {
            kv_aligned: vectors_aligned(k) && vectors_aligned(v),
            qkv_aligned: chunk_aligned(p, q, k, v),
            tma: tma_plan_flag(p, [q, k, v], TmaLayout::DENSE),
            ..Self::of(p)
        }
    }
}

/// Whether the tensor-core kernels can copy Q, K and V of problem `p` (over these tensors)
/// in 16-byte chunks: base addresses on 16-byte boundaries, every batch / head / row stride
/// and head_dim a whole number of chunks. The launches of a call cut into grid slices move
/// base pointers by whole strides, so the answer holds for each of them.
pub fn chunk_aligned(
    p: &AttentionProblem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
) -> bool {
    let per = (16 / p.dtype.size_in_bytes().max(1)).max(1);
    let addr = q.device_ptr() | k.device_ptr() | v.device_ptr();
    let strides = [p.q, p.k, p.v]
        .iter()
        .fold(0, |acc, t| acc | t.batch | t.head | t.seq);
    addr.is_multiple_of(16) && strides.is_multiple_of(per) && p.head_dim.is_multiple_of(per)
}

/// `FORGE_ATTN_PREFILL_WS=0` keeps Hopper's prefill on the wgmma kernel of its
/// `FA_TILE_SM90` row instead of the warp-specialized one (A/B runs).
pub(crate) fn warp_specialized_enabled() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("FORGE_ATTN_PREFILL_WS").map_or(true, |v| v != "0"))
}

/// Whether Hopper's TMA can address Q, K and V of problem `p` over these tensors, each as
/// a `[head_dim, rows, heads, batch]` view with its launch strides
/// ([`TensorMapDesc::check`](crate::device::tensor_map::TensorMapDesc::check): 16-byte
/// aligned bases, byte strides that are non-zero multiples of 16), in the boxes of the
/// call's warp-specialized tile. Grid slices move the bases by whole strides, so it holds
/// for each.
pub fn tma_addressable(
    p: &AttentionProblem,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
) -> bool {
    tma_addressable_as(p, [q, k, v], TmaLayout::DENSE)
}

/// [`PlanInput::tma`] for a call over these tensors, whose rows lie as `layout` says: the
/// warp-specialized kernel is switched on ([`warp_specialized_enabled`]) and TMA can address
/// the operands ([`tma_addressable_as`]).
pub(crate) fn tma_plan_flag(
    p: &AttentionProblem,
    tensors: [&DeviceTensor; 3],
    layout: TmaLayout,
) -> bool {
    warp_specialized_enabled() && tma_addressable_as(p, tensors, layout)
}

/// [`tma_addressable`] for operands whose rows lie as `layout` says (packed ragged
/// batches, paged K / V: [`TmaOperands::check`]).
pub(crate) fn tma_addressable_as(
    p: &AttentionProblem,
    tensors: [&DeviceTensor; 3],
    layout: TmaLayout,
) -> bool {
    kernels::flash_tile_ws(p.dtype, p.head_dim).is_some_and(|t| {
        TmaOperands::of_problem(p, tensors, layout)
            .check(t.block_m, t.block_n)
            .is_ok()
    })
}

/// Whether every row of `t` (dims before the last) starts on a 16-byte boundary and its
/// last dim is a whole number of 16-byte vectors: what 16-byte vector loads need.
pub fn vectors_aligned(t: &DeviceTensor) -> bool {
    let es = t.dtype().size_in_bytes();
    let rank = t.rank();
    t.device_ptr().is_multiple_of(16)
        && t.shape()
            .last()
            .is_some_and(|&d| (d * es).is_multiple_of(16))
        && t.strides()[..rank.saturating_sub(1)]
            .iter()
            .zip(t.shape())
            .all(|(&s, &n)| n == 1 || (s * es).is_multiple_of(16))
}

/// What the flash decision knows of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlashTarget {
    /// AMD (HIP, the `FA_TILE_HIP` rows) or NVIDIA (CUDA, the `FA_TILE` rows).
    pub amd: bool,
    /// The device runs the mma.sync kernels (CUDA sm_80 and newer).
    pub has_mma: bool,
    /// The device runs the wgmma kernels (CUDA sm_90; its `FA_TILE_SM90` rows).
    pub has_wgmma: bool,
}

impl FlashTarget {
    /// The rows of the tile table this target launches with.
    pub fn tile_vendor(&self) -> TileVendor {
        if self.amd {
            TileVendor::Hip
        } else if self.has_wgmma {
            TileVendor::CudaSm90
        } else {
            TileVendor::Cuda
        }
    }
}

/// The usual device of a row set: AMD without tensor-core kernels, CUDA sm_80+ with
/// mma.sync, sm_90 with wgmma too.
impl From<TileVendor> for FlashTarget {
    fn from(vendor: TileVendor) -> Self {
        FlashTarget {
            amd: vendor == TileVendor::Hip,
            has_mma: vendor != TileVendor::Hip,
            has_wgmma: vendor == TileVendor::CudaSm90,
        }
    }
}

/// A flash launch: the kernel family, the implementation that runs it and, for the prefill
/// families, its tile configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashChoice {
    /// Kernel family.
    pub kernel: FlashKernel,
    /// The kernel body (the decode kernel is [`FlashImpl::Simt`]).
    pub implementation: FlashImpl,
    /// Tile configuration from kernels/flash_config.h (prefill families only).
    pub tile: Option<&'static FlashTile>,
    /// The variant with the per-call extensions: for the prefill families the `_ext`
    /// kernels (window, softcap, ALiBi, sinks, packed batches, log-sum-exp strides), for
    /// decode its option variant.
    pub ext: bool,
    /// The prefill families' variant that reads K / V through a block table (`_paged`).
    pub paged: bool,
}

impl FlashChoice {
    /// Source file of a prefill family; `None` for decode (its own file, launched by the
    /// decode path).
    pub fn file(&self) -> Option<KernelFile> {
        match self.kernel {
            FlashKernel::NonCausal => Some(KernelFile::FlashNoCausal),
            FlashKernel::Causal => Some(KernelFile::FlashCausal),
            FlashKernel::Masked => Some(KernelFile::FlashMasked),
            _ => None,
        }
    }

    /// The kernel variant a prefill launch of this choice runs; `None` for decode.
    pub fn spec(&self) -> Option<KernelSpec> {
        Some(catalog::flash_variant(
            self.file()?,
            self.tile?,
            self.implementation,
            FlashExt::of(self.ext, self.paged),
        ))
    }
}

/// The path a problem takes, with the reason when it is not flash.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The path.
    pub path: AttentionPath,
    /// The flash launch, when the path is flash.
    pub flash: Option<FlashChoice>,
    /// Why flash was not used (None when it is).
    pub fallback_reason: Option<String>,
}

impl Plan {
    /// The flash implementation that runs, when the path is flash.
    pub fn implementation(&self) -> Option<FlashImpl> {
        self.flash.map(|c| c.implementation)
    }
}

/// The flash family for a problem: Decode for short unmasked query blocks over K/V it can
/// read in 16-byte vectors (not packed batches), else Causal / NonCausal without a mask and
/// Masked with one.
pub fn select_flash_kernel(input: &PlanInput) -> FlashKernel {
    match (input.has_mask, input.causal) {
        (false, _) if input.seq_q <= MAX_DECODE_QUERIES && input.kv_aligned && !input.packed => {
            FlashKernel::Decode
        }
        (true, _) => FlashKernel::Masked,
        (false, true) => FlashKernel::Causal,
        (false, false) => FlashKernel::NonCausal,
    }
}

/// The prefill tile row and implementation of `input` (dtype, head_dim, TF32 setting,
/// alignment) on `target`; `None` when the row set has no row for it. The decision table:
///
/// | target | dtype | row | implementation |
/// |---|---|---|---|
/// | AMD | any | `FA_TILE_HIP` | SIMT |
/// | CUDA | f32, TF32 asked for, mma.sync | `FA_TILE` tf32 | TF32 if Q/K/V aligned, else split SIMT |
/// | CUDA | f32 otherwise | `FA_TILE` f32 | SIMT |
/// | CUDA sm_90 | f16/bf16, dense Q/K/V that TMA can address | `FA_TILE_SM90_WS` | warp-specialized wgmma |
/// | CUDA sm_90 | f16/bf16 with an `FA_TILE_SM90` row | that row | wgmma if aligned, else split SIMT |
/// | CUDA sm_80+ | f16/bf16 otherwise | `FA_TILE` | mma.sync if aligned, else split SIMT |
/// | CUDA before sm_80 | f16/bf16 | `FA_TILE` | split SIMT |
pub fn prefill_choice(
    input: &PlanInput,
    target: FlashTarget,
) -> Option<(&'static FlashTile, FlashImpl)> {
    let (dtype, hd, aligned) = (input.dtype, input.head_dim, input.qkv_aligned);
    let or_split = |imp: FlashImpl| if aligned { imp } else { FlashImpl::SimtSplit };
    if target.amd {
        let tile = kernels::flash_tile_for_vendor(TileVendor::Hip, dtype, hd)?;
        return Some((tile, FlashImpl::Simt));
    }
    if dtype == DType::F32 {
        if input.tf32 && target.has_mma {
            if let Some(tile) = kernels::flash_tile_tf32(TileVendor::Cuda, hd) {
                return Some((tile, or_split(FlashImpl::Tf32)));
            }
        }
        let tile = kernels::flash_tile_for_vendor(TileVendor::Cuda, dtype, hd)?;
        return Some((tile, FlashImpl::Simt));
    }
    if target.has_wgmma && aligned && input.tma {
        if let Some(tile) = kernels::flash_tile_ws(dtype, hd) {
            return Some((tile, FlashImpl::WgmmaWs));
        }
    }
    let tile = kernels::flash_tile_for_vendor(target.tile_vendor(), dtype, hd)?;
    let imp = if tile.wgmma {
        or_split(FlashImpl::Wgmma)
    } else if target.has_mma {
        or_split(FlashImpl::MmaSync)
    } else {
        FlashImpl::SimtSplit
    };
    Some((tile, imp))
}

/// The flash kernel that runs `input` on `target`, or the reason none can: the one decision
/// of family ([`select_flash_kernel`]), tile row and implementation ([`prefill_choice`]).
pub fn can_use_flash_attention(
    input: &PlanInput,
    flash_enabled: bool,
    max_shared_bytes: u32,
    target: impl Into<FlashTarget>,
) -> Result<FlashChoice, String> {
    let target = target.into();
    if !input.dtype.is_float() {
        // Every entry point refuses integer operands; a plan asked for one says so.
        return Err(format!(
            "no attention kernel takes {} (f32, f16 or bf16 only)",
            input.dtype
        ));
    }
    if !flash_enabled {
        return Err(
            "flash attention is switched off (use_flash_attention = false or FORGE_ATTN_FLASH=0)"
                .into(),
        );
    }
    if input.head_dim > MAX_FLASH_HEAD_DIM {
        return Err(format!(
            "head_dim {} exceeds the largest flash head_dim {MAX_FLASH_HEAD_DIM}",
            input.head_dim
        ));
    }
    if !input.head_dim.is_multiple_of(8) {
        return Err(format!(
            "head_dim {} is not a multiple of 8",
            input.head_dim
        ));
    }
    let kernel = select_flash_kernel(input);
    if input.ext && target.amd && kernel != FlashKernel::Decode {
        return Err(
            "per-call options, the log-sum-exp output and packed batches on the prefill kernels are built for CUDA only: the AMD code objects hold the plain flash kernels"
                .into(),
        );
    }
    let (tile, implementation, smem) = if kernel == FlashKernel::Decode {
        let bucket = decode_bucket(input.head_dim)
            .ok_or_else(|| format!("no decode kernel for head_dim {}", input.head_dim))?;
        (
            None,
            FlashImpl::Simt,
            decode_smem_bytes(input.dtype, bucket),
        )
    } else {
        let (tile, imp) = prefill_choice(input, target).ok_or_else(|| {
            format!(
                "no flash tile configuration for {} head_dim {}",
                input.dtype, input.head_dim
            )
        })?;
        (Some(tile), imp, tile.smem_bytes)
    };
    if smem > max_shared_bytes {
        return Err(format!(
            "the {kernel:?} kernel for {} head_dim {} needs {smem} bytes of shared memory, the device allows {max_shared_bytes}",
            input.dtype, input.head_dim
        ));
    }
    Ok(FlashChoice {
        kernel,
        implementation,
        tile,
        ext: input.ext,
        paged: input.paged && kernel != FlashKernel::Decode,
    })
}

/// Decides the path of `input`.
pub fn plan(
    input: &PlanInput,
    flash_enabled: bool,
    max_shared_bytes: u32,
    target: impl Into<FlashTarget>,
) -> Plan {
    match can_use_flash_attention(input, flash_enabled, max_shared_bytes, target) {
        Ok(choice) => Plan {
            path: AttentionPath::Flash(choice.kernel),
            flash: Some(choice),
            fallback_reason: None,
        },
        Err(reason) => Plan {
            path: AttentionPath::Traditional,
            flash: None,
            fallback_reason: Some(reason),
        },
    }
}

/// Longest query or key sequence the GPU kernels take: their 32-bit tile and key indices
/// stay clear of `i32::MAX` by a margin of 2^23 (a grid row of 64-key tiles).
pub const MAX_KERNEL_SEQ: usize = i32::MAX as usize - (1 << 23);

/// Whether problem sizes fit the kernels' 32-bit size fields. Batch and heads have no
/// limit of their own: calls past the grid's y / z limit run in slices (`grid.rs`).
pub fn check_kernel_limits(p: &AttentionProblem) -> Result<(), String> {
    check_sizes(p.batch, p.seq_q, p.seq_k, p.num_heads, p.head_dim)
}

/// [`check_kernel_limits`] on bare sizes (also what `supports` asks of a config).
pub fn check_sizes(
    batch: usize,
    seq_q: usize,
    seq_k: usize,
    num_heads: usize,
    head_dim: usize,
) -> Result<(), String> {
    let int = i32::MAX as usize;
    for (name, v, limit) in [
        ("batch", batch, int),
        ("seq_q", seq_q, MAX_KERNEL_SEQ),
        ("seq_k", seq_k, MAX_KERNEL_SEQ),
        ("num_heads", num_heads, int),
        ("head_dim", head_dim, int),
    ] {
        if v > limit {
            return Err(format!(
                "{name} = {v} exceeds the GPU kernels' limit {limit}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(seq_q: usize, kv_aligned: bool) -> PlanInput {
        PlanInput {
            dtype: DType::F16,
            head_dim: 128,
            causal: false,
            has_mask: false,
            seq_q,
            tf32: false,
            kv_aligned,
            qkv_aligned: true,
            ext: false,
            packed: false,
            paged: false,
            tma: true,
        }
    }

    #[test]
    fn integer_dtypes_plan_no_kernel() {
        for dtype in [DType::I32, DType::U32, DType::I64] {
            for seq_q in [1, 64] {
                let plan = super::plan(
                    &PlanInput {
                        dtype,
                        ..input(seq_q, true)
                    },
                    true,
                    u32::MAX,
                    TileVendor::Cuda,
                );
                assert_eq!(plan.flash, None, "{dtype}");
                let reason = plan.fallback_reason.unwrap();
                assert!(
                    reason.contains(&format!("no attention kernel takes {dtype}")),
                    "{reason}"
                );
            }
        }
    }

    #[test]
    fn unaligned_kv_never_takes_the_decode_kernel() {
        assert_eq!(select_flash_kernel(&input(1, true)), FlashKernel::Decode);
        assert_eq!(
            select_flash_kernel(&input(1, false)),
            FlashKernel::NonCausal
        );
        let causal = PlanInput {
            causal: true,
            ..input(16, false)
        };
        assert_eq!(select_flash_kernel(&causal), FlashKernel::Causal);
    }

    const AMD: FlashTarget = FlashTarget {
        amd: true,
        has_mma: false,
        has_wgmma: false,
    };
    const SM75: FlashTarget = FlashTarget {
        amd: false,
        has_mma: false,
        has_wgmma: false,
    };
    const SM80: FlashTarget = FlashTarget {
        amd: false,
        has_mma: true,
        has_wgmma: false,
    };
    const SM90: FlashTarget = FlashTarget {
        amd: false,
        has_mma: true,
        has_wgmma: true,
    };

    fn prefill(dtype: DType, head_dim: usize, aligned: bool, tf32: bool) -> PlanInput {
        PlanInput {
            dtype,
            head_dim,
            seq_q: 512,
            tf32,
            qkv_aligned: aligned,
            ..input(512, true)
        }
    }

    /// The decision table, written out: capability x dtype x alignment x TF32 ->
    /// implementation, and which row set the tile comes from.
    #[test]
    fn implementation_decision_table() {
        use FlashImpl::*;
        // (target, dtype, head_dim, aligned, tf32) -> (implementation, tf32 row, sm90 row)
        #[rustfmt::skip]
        let table = [
            (AMD, DType::F32, 128, true, false, Simt, false, false),
            (AMD, DType::F32, 128, true, true, Simt, false, false),
            (AMD, DType::F16, 128, true, false, Simt, false, false),
            (AMD, DType::BF16, 64, false, false, Simt, false, false),
            (SM75, DType::F32, 128, true, true, Simt, false, false),
            (SM75, DType::F16, 128, true, false, SimtSplit, false, false),
            (SM75, DType::BF16, 128, false, false, SimtSplit, false, false),
            (SM80, DType::F32, 128, true, false, Simt, false, false),
            (SM80, DType::F32, 128, false, false, Simt, false, false),
            (SM80, DType::F32, 128, true, true, Tf32, true, false),
            (SM80, DType::F32, 128, false, true, SimtSplit, true, false),
            (SM80, DType::F16, 128, true, false, MmaSync, false, false),
            (SM80, DType::F16, 128, false, false, SimtSplit, false, false),
            (SM80, DType::BF16, 256, true, true, MmaSync, false, false),
            (SM90, DType::F32, 64, true, false, Simt, false, false),
            (SM90, DType::F32, 64, true, true, Tf32, true, false),
            (SM90, DType::F32, 64, false, true, SimtSplit, true, false),
            (SM90, DType::F16, 128, true, false, WgmmaWs, false, true),
            (SM90, DType::F16, 128, false, false, SimtSplit, false, true),
            (SM90, DType::BF16, 256, true, false, WgmmaWs, false, true),
            (SM90, DType::BF16, 64, true, false, WgmmaWs, false, true),
            // Buckets 80 and 96 compute 128 columns on Hopper's rows.
            (SM90, DType::BF16, 96, true, false, WgmmaWs, false, true),
            (SM90, DType::F16, 80, false, false, SimtSplit, false, true),
            // Bucket 32 has no FA_TILE_SM90 row: mma.sync on Hopper too.
            (SM90, DType::BF16, 32, true, false, MmaSync, false, false),
        ];
        for (target, dtype, hd, aligned, tf32, want, tf32_row, sm90_row) in table {
            let i = prefill(dtype, hd, aligned, tf32);
            let c = can_use_flash_attention(&i, true, u32::MAX, target).unwrap();
            let tile = c.tile.unwrap();
            let case = format!("{target:?} {dtype} hd{hd} aligned={aligned} tf32={tf32}");
            assert_eq!(c.implementation, want, "{case}");
            let hopper_row = tile.wgmma || tile.warp_specialized;
            assert_eq!((tile.tf32, hopper_row), (tf32_row, sm90_row), "{case}");
            assert_eq!(tile.warp_specialized, want == WgmmaWs, "{case}");
            assert_eq!(tile.head_dim, hd, "{case}");
            assert_eq!(tile.dtype, dtype, "{case}");
            let p = plan(&i, true, u32::MAX, target);
            assert_eq!(p.implementation(), Some(want), "{case}");
        }
    }

    /// Every (target, dtype, head_dim, alignment, TF32) choice names a variant the catalog
    /// builds for that vendor, and one its target can compile.
    #[test]
    fn every_choice_is_a_cataloged_variant() {
        let cuda = kernels::all_variants(TileVendor::Cuda);
        let hip = kernels::all_variants(TileVendor::Hip);
        for (target, arch) in [
            (AMD, ""),
            (SM75, "compute_75"),
            (SM80, "compute_80"),
            (SM90, "compute_90"),
        ] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for hd in (8..=MAX_FLASH_HEAD_DIM).step_by(8) {
                    for (aligned, tf32) in
                        [(true, false), (true, true), (false, false), (false, true)]
                    {
                        for (causal, has_mask) in [(false, false), (true, false), (false, true)] {
                            let i = PlanInput {
                                causal,
                                has_mask,
                                ..prefill(dtype, hd, aligned, tf32)
                            };
                            let c = can_use_flash_attention(&i, true, u32::MAX, target).unwrap();
                            let spec = c.spec().unwrap();
                            let built = if target.amd { &hip } else { &cuda };
                            assert!(built.contains(&spec), "{target:?}: {} not built", spec.name);
                            assert!(target.amd || spec.builds_for(arch), "{}", spec.name);
                            assert_eq!(spec.implementation, Some(c.implementation));
                            if !aligned {
                                assert!(!c.implementation.uses_tensor_cores(), "{}", spec.name);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The warp-specialized kernel takes every call whose operands TMA can address (the
    /// caller's `tma`: dense, packed or over pages), with or without options; operands TMA
    /// cannot read take the row's wgmma kernel.
    #[test]
    fn warp_specialized_needs_tma() {
        let base = prefill(DType::BF16, 128, true, false);
        let c = can_use_flash_attention(&base, true, u32::MAX, SM90).unwrap();
        assert_eq!(c.implementation, FlashImpl::WgmmaWs);
        let tile = c.tile.unwrap();
        assert!(tile.warp_specialized && !tile.wgmma);
        assert_eq!(tile.threads, 2 * tile.block_m + 128);
        assert_eq!(
            c.spec().unwrap().name,
            "flash_attention_nocausal_bf16_hd128_sm90_ws"
        );
        // Per-call options, packed batches and pages run on it too.
        let ext = PlanInput { ext: true, ..base };
        for (input, name) in [
            (ext, "flash_attention_nocausal_bf16_hd128_sm90_ws_ext"),
            (
                PlanInput {
                    packed: true,
                    ..ext
                },
                "flash_attention_nocausal_bf16_hd128_sm90_ws_ext",
            ),
            (
                PlanInput { paged: true, ..ext },
                "flash_attention_nocausal_bf16_hd128_sm90_ws_paged",
            ),
        ] {
            let c = can_use_flash_attention(&input, true, u32::MAX, SM90).unwrap();
            assert_eq!(c.implementation, FlashImpl::WgmmaWs, "{input:?}");
            assert_eq!(c.spec().unwrap().name, name);
        }
        for other in [
            PlanInput { tma: false, ..base },
            PlanInput {
                paged: true,
                tma: false,
                ..ext
            },
        ] {
            let c = can_use_flash_attention(&other, true, u32::MAX, SM90).unwrap();
            assert_eq!(c.implementation, FlashImpl::Wgmma, "{other:?}");
            assert!(c.tile.unwrap().wgmma);
        }
        // Never on another target, whatever the input says.
        for target in [SM80, AMD] {
            let c = can_use_flash_attention(&base, true, u32::MAX, target).unwrap();
            assert_ne!(c.implementation, FlashImpl::WgmmaWs);
        }
    }

    #[test]
    fn decode_reports_simt_and_has_no_prefill_spec() {
        let c = can_use_flash_attention(&input(1, true), true, u32::MAX, SM90).unwrap();
        assert_eq!(c.kernel, FlashKernel::Decode);
        assert_eq!(c.implementation, FlashImpl::Simt);
        assert_eq!((c.file(), c.spec()), (None, None));
        let masked = PlanInput {
            has_mask: true,
            ..input(1, true)
        };
        let c = can_use_flash_attention(&masked, true, u32::MAX, SM90).unwrap();
        assert_eq!(c.file(), Some(KernelFile::FlashMasked));
        assert_eq!(
            c.spec().unwrap().name,
            "flash_attention_masked_f16_hd128_sm90_ws"
        );
    }

    #[test]
    fn row_sets_map_to_their_usual_targets() {
        assert_eq!(FlashTarget::from(TileVendor::Hip), AMD);
        assert_eq!(FlashTarget::from(TileVendor::Cuda), SM80);
        assert_eq!(FlashTarget::from(TileVendor::CudaSm90), SM90);
        for v in [TileVendor::Hip, TileVendor::Cuda, TileVendor::CudaSm90] {
            assert_eq!(FlashTarget::from(v).tile_vendor(), v);
        }
        assert_eq!(SM75.tile_vendor(), TileVendor::Cuda);
    }

    /// The host's alignment predicate is the one the tensor-core kernels used to test at run
    /// time: base addresses, every stride and head_dim in whole 16-byte chunks. (Host
    /// tensors report address 0, so the strides and head_dim are what is checked here.)
    #[test]
    fn chunk_alignment_follows_strides_and_head_dim() {
        use crate::config::AttentionConfig;
        use crate::device::Device;
        let problem = |q: &DeviceTensor, kv: &DeviceTensor, hd: usize| {
            let cfg = AttentionConfig::new(2 * hd, 2, 16).with_head_dim(hd);
            AttentionProblem::new(&cfg, q, kv, kv, None).unwrap()
        };
        let zeros =
            |d: usize| DeviceTensor::zeros(&[1, 16, 2, d], DType::F16, Device::Cpu).unwrap();
        // [B, S, H, D] f16, head_dim 64: strides 128 / 64 elements, 8 per chunk.
        let t = zeros(64);
        assert!(chunk_aligned(&problem(&t, &t, 64), &t, &t, &t));
        let later = t.narrow(1, 1, 8).unwrap();
        assert!(chunk_aligned(
            &problem(&later, &later, 64),
            &later,
            &later,
            &later
        ));
        // Rows of 68 elements narrowed to 64: the head stride is not whole chunks.
        let wide = zeros(68).narrow(3, 0, 64).unwrap();
        assert!(!chunk_aligned(
            &problem(&wide, &wide, 64),
            &wide,
            &wide,
            &wide
        ));
        // Only Q off is enough.
        assert!(!chunk_aligned(&problem(&wide, &t, 64), &wide, &t, &t));
        // head_dim 60 f16 is 120 bytes: not whole chunks.
        let odd = zeros(60);
        assert!(!chunk_aligned(&problem(&odd, &odd, 60), &odd, &odd, &odd));
        let pi = PlanInput::of_call(&problem(&odd, &odd, 60), &odd, &odd, &odd);
        assert!(!pi.qkv_aligned);
        let pi = PlanInput::of_call(&problem(&t, &t, 64), &t, &t, &t);
        assert!(pi.qkv_aligned);
    }

    #[test]
    fn large_batches_and_heads_fit_sequence_limits_do_not() {
        assert!(check_sizes(2048 * 1024, 1, 4096, 64 * 1024, 128).is_ok());
        let e = check_sizes(1, 1, MAX_KERNEL_SEQ + 1, 1, 8).unwrap_err();
        assert!(e.contains(&(MAX_KERNEL_SEQ + 1).to_string()), "{e}");
        assert!(check_sizes(1, MAX_KERNEL_SEQ, MAX_KERNEL_SEQ, 1, 8).is_ok());
    }
}
