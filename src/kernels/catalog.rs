//! The kernel catalog: every variant of every kernel file, with its entry-point name and
//! the defines that select it. This is the one place that spells a kernel name; launches
//! ask it for a [`KernelSpec`].
//!
//! | file | entry points | NVRTC defines |
//! |---|---|---|
//! | `flash_attention_nocausal.hip` | `flash_attention_nocausal_<dt>_hd<N>[_sm90][<impl>][_ext\|_paged]` | `FA_VARIANT_{DT,HD,BM,BN,THREADS,SMEM}` from the [`FlashTile`], `FA_VARIANT_IMPL` from the [`FlashImpl`], `FA_VARIANT_NAME` (the entry point), `FA_VARIANT_EXT=1` for `_ext`, `=2` for `_paged` |
//! | `flash_attention_causal.hip` | `flash_attention_causal_<dt>_hd<N>[_sm90][<impl>][_ext\|_paged]` | same |
//! | `flash_attention_masked.hip` | `flash_attention_masked_<dt>_hd<N>[_sm90][<impl>][_ext]` | same |
//! | `attention_traditional.hip` | `attn_scores_<dt>`, `attn_softmax_rows`, `attn_pv_<dt>` | `FA_VARIANT_DT` |
//! | `tensor_ops.hip` | `copy_strided_b2/_b4`, `fill_b2/_b4` | none |
//! | `flash_decode.hip` | `flash_decode_<dt>_hd<N>`, `flash_decode_combine_<dt>` | `FA_VARIANT_{DT,HD}` |
//! | `flash_decode.hip` (per-call options) | `flash_decode_opt_<dt>_hd<N>`, `flash_decode_combine_opt_<dt>` | `FA_VARIANT_{DT,HD}`, `FA_VARIANT_OPTS=1` |
//! | `kv_cache.hip` | `kv_append_b2/_b4` | none |
//!
//! `<dt>` is `f32`, `f16`, `bf16` (or `tf32` for a TF32 flash row); `<N>` is a head-dim
//! bucket; `_sm90` marks an `FA_TILE_SM90` row; `<impl>` is the implementation's suffix
//! ([`FlashImpl::name_suffix`]: none for SIMT, so the AMD objects keep their names); `_ext`
//! marks the variant with the per-call extensions and `_paged` the one that also reads K / V
//! through a block table ([`FlashExt`]);
//! `_b2`/`_b4` name the element size in bytes. Names are unique across all files.

use super::tiles::{flash_table, flash_table_ws, FlashTile, TileVendor};
use crate::dtype::DType;

/// One kernel source file in `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelFile {
    /// `flash_attention_nocausal.hip`
    FlashNoCausal,
    /// `flash_attention_causal.hip`
    FlashCausal,
    /// `flash_attention_masked.hip` (additive mask, optional causal)
    FlashMasked,
    /// `attention_traditional.hip`
    Traditional,
    /// `tensor_ops.hip`
    TensorOps,
    /// `flash_decode.hip` (split-KV decode: a few queries against a long KV cache)
    Decode,
    /// `kv_cache.hip` (appends new tokens to a device KV cache)
    KvCache,
}

impl KernelFile {
    /// Every kernel file.
    pub const ALL: [KernelFile; 7] = [
        KernelFile::FlashNoCausal,
        KernelFile::FlashCausal,
        KernelFile::FlashMasked,
        KernelFile::Traditional,
        KernelFile::TensorOps,
        KernelFile::Decode,
        KernelFile::KvCache,
    ];

    /// The three flash files, one per mask mode.
    pub const FLASH: [KernelFile; 3] = [
        KernelFile::FlashNoCausal,
        KernelFile::FlashCausal,
        KernelFile::FlashMasked,
    ];

    /// File name under `kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            KernelFile::FlashNoCausal => "flash_attention_nocausal.hip",
            KernelFile::FlashCausal => "flash_attention_causal.hip",
            KernelFile::FlashMasked => "flash_attention_masked.hip",
            KernelFile::Traditional => "attention_traditional.hip",
            KernelFile::TensorOps => "tensor_ops.hip",
            KernelFile::Decode => "flash_decode.hip",
            KernelFile::KvCache => "kv_cache.hip",
        }
    }

    /// File name without the `.hip` extension; also the name of its HSACO code object
    /// (`<stem>.hsaco`).
    pub fn stem(self) -> &'static str {
        self.file_name().trim_end_matches(".hip")
    }

    /// The mask-mode word of a flash file's entry points (`nocausal`, `causal`, `masked`);
    /// `None` for the other files.
    pub fn flash_mode(self) -> Option<&'static str> {
        match self {
            KernelFile::FlashNoCausal | KernelFile::FlashCausal | KernelFile::FlashMasked => {
                self.stem().strip_prefix("flash_attention_")
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for KernelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_name())
    }
}

/// A kernel variant: which file, which entry point, and the defines that select it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// Source file.
    pub file: KernelFile,
    /// Entry point (unique across all files).
    pub name: String,
    /// `-D` defines that make the file emit only this variant (NVRTC path).
    pub defines: Vec<(&'static str, String)>,
    /// Built for the architecture-specific target on sm_90 (`compute_90a`, which has
    /// wgmma); no other target builds it (see [`KernelSpec::builds_for`]).
    pub arch_specific: bool,
    /// The flash implementation this variant runs (flash files only).
    pub implementation: Option<FlashImpl>,
}

impl KernelSpec {
    /// A kernel variant.
    pub fn new(
        file: KernelFile,
        name: impl Into<String>,
        defines: Vec<(&'static str, String)>,
    ) -> Self {
        KernelSpec {
            file,
            name: name.into(),
            defines,
            arch_specific: false,
            implementation: None,
        }
    }

    /// Whether NVRTC can build this variant for `arch` (`compute_XY`, optionally with an
    /// `a`/`f` suffix): the tensor-core bodies exist only where the target has their
    /// instructions (mma.sync from compute_80; wgmma on compute_90, which an
    /// [arch-specific](Self::arch_specific) variant turns into compute_90a). Every other
    /// variant builds everywhere. An `arch` that is not of that form builds only those.
    pub fn builds_for(&self, arch: &str) -> bool {
        let Some(imp) = self.implementation else {
            return true;
        };
        let digits: String = arch
            .strip_prefix("compute_")
            .unwrap_or("")
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let cc: u32 = digits.parse().unwrap_or(0);
        match imp {
            FlashImpl::Simt | FlashImpl::SimtSplit => true,
            FlashImpl::MmaSync | FlashImpl::Tf32 => cc >= 80,
            FlashImpl::Wgmma | FlashImpl::WgmmaWs => cc == 90,
        }
    }
}

/// The kernel body a flash launch runs, chosen on the host
/// (`backend::gpu::dispatch::can_use_flash_attention`) and compiled alone
/// (`FA_VARIANT_IMPL`); each has its own entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FlashImpl {
    /// The SIMT kernel on the row's own tile: every f32 row, every AMD row (and the decode
    /// kernel, which is SIMT too).
    Simt,
    /// The SIMT kernel in smaller tiles on a row sized for a tensor-core kernel: inputs the
    /// tensor-core copies cannot read (base addresses, strides or head_dim not in whole
    /// 16-byte chunks), or CUDA before sm_80.
    SimtSplit,
    /// f16/bf16 on mma.sync (CUDA sm_80 and newer).
    MmaSync,
    /// f32 in TF32 on mma.sync (opt-in; CUDA sm_80 and newer).
    Tf32,
    /// f16/bf16 on Hopper's warpgroup MMA (sm_90, built for compute_90a).
    Wgmma,
    /// f16/bf16 on Hopper, warp specialized: one producer warpgroup feeding K / V by TMA
    /// into an mbarrier ring, math warpgroups taking turns on the tensor cores (sm_90,
    /// compute_90a; plain calls on Q / K / V that TMA can address).
    WgmmaWs,
}

impl FlashImpl {
    /// Every implementation.
    pub const ALL: [FlashImpl; 6] = [
        FlashImpl::Simt,
        FlashImpl::SimtSplit,
        FlashImpl::MmaSync,
        FlashImpl::Tf32,
        FlashImpl::Wgmma,
        FlashImpl::WgmmaWs,
    ];

    /// The `FA_VARIANT_IMPL` token that makes `flash_entry.h` compile this body.
    pub fn token(self) -> &'static str {
        match self {
            FlashImpl::Simt => "simt",
            FlashImpl::SimtSplit => "split",
            FlashImpl::MmaSync => "mma",
            FlashImpl::Tf32 => "tf32",
            FlashImpl::Wgmma => "wgmma",
            FlashImpl::WgmmaWs => "wgws",
        }
    }

    /// What the entry-point name of a tile row adds for this implementation: nothing for
    /// SIMT (the names of the AMD code objects), `_split`, `_mma` (f16/bf16 and TF32 rows
    /// alike: the row's dtype token tells them apart), `_wgmma`, `_ws`.
    pub fn name_suffix(self) -> &'static str {
        match self {
            FlashImpl::Simt => "",
            FlashImpl::SimtSplit => "_split",
            FlashImpl::MmaSync | FlashImpl::Tf32 => "_mma",
            FlashImpl::Wgmma => "_wgmma",
            FlashImpl::WgmmaWs => "_ws",
        }
    }

    /// Whether it runs on the tensor cores.
    pub fn uses_tensor_cores(self) -> bool {
        matches!(
            self,
            FlashImpl::MmaSync | FlashImpl::Tf32 | FlashImpl::Wgmma | FlashImpl::WgmmaWs
        )
    }

    /// The implementations a tile row is built for, the one for aligned inputs first:
    /// SIMT for f32 and AMD rows; the row's tensor-core kernel and the split SIMT kernel for
    /// the f16/bf16, TF32 and `FA_TILE_SM90` rows of CUDA; the warp-specialized kernel
    /// alone for an `FA_TILE_SM90_WS` row (its calls have already passed the TMA check).
    pub fn for_tile(tile: &FlashTile, vendor: TileVendor) -> &'static [FlashImpl] {
        if vendor == TileVendor::Hip {
            return &[FlashImpl::Simt];
        }
        if tile.warp_specialized {
            &[FlashImpl::WgmmaWs]
        } else if tile.wgmma {
            &[FlashImpl::Wgmma, FlashImpl::SimtSplit]
        } else if tile.tf32 {
            &[FlashImpl::Tf32, FlashImpl::SimtSplit]
        } else if tile.dtype == DType::F32 {
            &[FlashImpl::Simt]
        } else {
            &[FlashImpl::MmaSync, FlashImpl::SimtSplit]
        }
    }
}

impl std::fmt::Display for FlashImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlashImpl::Simt => "simt",
            FlashImpl::SimtSplit => "simt-split",
            FlashImpl::MmaSync => "mma.sync",
            FlashImpl::Tf32 => "tf32-mma.sync",
            FlashImpl::Wgmma => "wgmma",
            FlashImpl::WgmmaWs => "wgmma-ws",
        })
    }
}

/// Every dtype a kernel is instantiated for.
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Element sizes (bytes) of the dtype-blind kernels (`_b2`, `_b4`).
const ELEM_SIZES: [usize; 2] = [2, 4];

/// Head-dim buckets the decode kernel is instantiated for.
pub const DECODE_BUCKETS: [usize; 9] = [32, 64, 80, 96, 128, 160, 192, 224, 256];

/// The bucket the decode combine kernel of [`all_variants`] is listed with (the combine
/// kernel is the same in every bucket's compile unit).
const COMBINE_LISTED_BUCKET: usize = 128;

/// The flash variant of `file` for `tile` on `implementation`:
/// `flash_attention_<mode>_<dt>_hd<N>[_sm90]<suffix>` with the tile's `FA_VARIANT_*`
/// defines, `FA_VARIANT_IMPL` and `FA_VARIANT_NAME` (the name), `<mode>` from
/// [`KernelFile::flash_mode`] and `<suffix>` from [`FlashImpl::name_suffix`].
///
/// `<dt>` is the tile's dtype, or `tf32` for a TF32 row; an `FA_TILE_SM90` or
/// `FA_TILE_SM90_WS` row's name has `_sm90`. [`FlashImpl::Wgmma`] and
/// [`FlashImpl::WgmmaWs`] variants are [`KernelSpec::arch_specific`]. `file` should be
/// one of [`KernelFile::FLASH`]; otherwise the name is one no kernel file defines
/// (`flash_attention_<file stem>_...`), so loading it fails with a
/// [`crate::AttentionError::KernelBuild`] instead of running the wrong kernel.
pub fn flash(file: KernelFile, tile: &FlashTile, implementation: FlashImpl) -> KernelSpec {
    flash_variant(file, tile, implementation, FlashExt::Plain)
}

/// Which per-call extensions a flash variant is built with (`FA_VARIANT_EXT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlashExt {
    /// None: the plain kernels (`FA_VARIANT_EXT` unset), whose code the extensions do not
    /// change.
    Plain,
    /// Window, softcap, ALiBi, sinks, packed ragged batches, log-sum-exp strides
    /// (`FA_VARIANT_EXT=1`, name suffix `_ext`).
    Options,
    /// [`FlashExt::Options`] with K / V read through a block table (`FA_VARIANT_EXT=2`,
    /// suffix `_paged`; the unmasked files only: paged calls take no additive mask).
    Paged,
}

impl FlashExt {
    /// The level for a call with extensions (`ext`) over pages (`paged`).
    pub fn of(ext: bool, paged: bool) -> Self {
        match (ext || paged, paged) {
            (_, true) => FlashExt::Paged,
            (true, false) => FlashExt::Options,
            _ => FlashExt::Plain,
        }
    }

    /// Entry-point name suffix.
    pub fn name_suffix(self) -> &'static str {
        match self {
            FlashExt::Plain => "",
            FlashExt::Options => "_ext",
            FlashExt::Paged => "_paged",
        }
    }
}

/// [`flash`] with the extensions `ext` ([`FlashExt`]).
pub fn flash_variant(
    file: KernelFile,
    tile: &FlashTile,
    implementation: FlashImpl,
    ext: FlashExt,
) -> KernelSpec {
    let mode = file.flash_mode().unwrap_or_else(|| file.stem());
    let dt = tile.kernel_dtype_name();
    let row = if tile.wgmma || tile.warp_specialized {
        "_sm90"
    } else {
        ""
    };
    let name = format!(
        "flash_attention_{mode}_{dt}_hd{}{row}{}{}",
        tile.head_dim,
        implementation.name_suffix(),
        ext.name_suffix()
    );
    let mut defines = vec![
        ("FA_VARIANT_DT", dt.to_string()),
        ("FA_VARIANT_HD", tile.head_dim.to_string()),
        ("FA_VARIANT_BM", tile.block_m.to_string()),
        ("FA_VARIANT_BN", tile.block_n.to_string()),
        ("FA_VARIANT_THREADS", tile.threads.to_string()),
        ("FA_VARIANT_SMEM", tile.smem_bytes.to_string()),
        ("FA_VARIANT_IMPL", implementation.token().to_string()),
        ("FA_VARIANT_NAME", name.clone()),
    ];
    match ext {
        FlashExt::Plain => {}
        FlashExt::Options => defines.push(("FA_VARIANT_EXT", "1".to_string())),
        FlashExt::Paged => defines.push(("FA_VARIANT_EXT", "2".to_string())),
    }
    KernelSpec {
        arch_specific: matches!(implementation, FlashImpl::Wgmma | FlashImpl::WgmmaWs),
        implementation: Some(implementation),
        ..KernelSpec::new(file, name, defines)
    }
}

/// The three launches of the unfused path (`attention_traditional.hip`), in launch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraditionalKernel {
    /// Scaled, masked scores `Q K^T` into the f32 workspace.
    Scores,
    /// Row softmax over the workspace (dtype-free).
    Softmax,
    /// `P V` into the output.
    Pv,
}

impl TraditionalKernel {
    /// The three kernels in launch order.
    pub const ALL: [TraditionalKernel; 3] = [
        TraditionalKernel::Scores,
        TraditionalKernel::Softmax,
        TraditionalKernel::Pv,
    ];
}

/// A kernel of `attention_traditional.hip`, selected by `-DFA_VARIANT_DT=<dt>`: `attn_scores_<dt>`,
/// `attn_pv_<dt>`, or the dtype-free `attn_softmax_rows`, which always uses the `f32`
/// compile unit so every dtype shares one build.
pub fn traditional(kernel: TraditionalKernel, dtype: DType) -> KernelSpec {
    let (name, unit) = match kernel {
        TraditionalKernel::Scores => (format!("attn_scores_{}", dtype.name()), dtype),
        TraditionalKernel::Softmax => ("attn_softmax_rows".to_string(), DType::F32),
        TraditionalKernel::Pv => (format!("attn_pv_{}", dtype.name()), dtype),
    };
    KernelSpec::new(
        KernelFile::Traditional,
        name,
        vec![("FA_VARIANT_DT", unit.name().to_string())],
    )
}

/// `<stem>_b<elem_bytes>` of `kernel` (no defines).
fn elem_spec(kernel: ElemKernel, elem_bytes: usize) -> KernelSpec {
    let (file, stem) = match kernel {
        ElemKernel::CopyStrided => (KernelFile::TensorOps, "copy_strided"),
        ElemKernel::Fill => (KernelFile::TensorOps, "fill"),
        ElemKernel::KvAppend => (KernelFile::KvCache, "kv_append"),
    };
    KernelSpec::new(file, format!("{stem}_b{elem_bytes}"), vec![])
}

/// [`elem_spec`] for 2- and 4-byte elements; `None` for other sizes.
fn by_elem_size(kernel: ElemKernel, elem_bytes: usize) -> Option<KernelSpec> {
    ELEM_SIZES
        .contains(&elem_bytes)
        .then(|| elem_spec(kernel, elem_bytes))
}

/// The strided copy of `tensor_ops.hip` for `elem_bytes`-byte elements (2 or 4).
pub fn copy_strided(elem_bytes: usize) -> Option<KernelSpec> {
    by_elem_size(ElemKernel::CopyStrided, elem_bytes)
}

/// The fill of `tensor_ops.hip` for `elem_bytes`-byte elements (2 or 4).
pub fn fill(elem_bytes: usize) -> Option<KernelSpec> {
    by_elem_size(ElemKernel::Fill, elem_bytes)
}

/// The KV-cache append of `kv_cache.hip` for `elem_bytes`-byte elements (2 or 4).
pub fn kv_append(elem_bytes: usize) -> Option<KernelSpec> {
    by_elem_size(ElemKernel::KvAppend, elem_bytes)
}

/// The compile unit of `flash_decode.hip` for `dtype` and head-dim `bucket`, with the
/// per-call options (`FA_VARIANT_OPTS=1`) or without.
fn decode_unit(name: String, dtype: DType, bucket: usize, with_options: bool) -> KernelSpec {
    let mut defines = vec![
        ("FA_VARIANT_DT", dtype.name().to_string()),
        ("FA_VARIANT_HD", bucket.to_string()),
    ];
    if with_options {
        defines.push(("FA_VARIANT_OPTS", "1".to_string()));
    }
    KernelSpec::new(KernelFile::Decode, name, defines)
}

/// The split-KV decode kernel `flash_decode_<dt>_hd<bucket>`; `bucket` is one of
/// [`DECODE_BUCKETS`].
pub fn decode(dtype: DType, bucket: usize) -> KernelSpec {
    decode_unit(
        format!("flash_decode_{}_hd{bucket}", dtype.name()),
        dtype,
        bucket,
        false,
    )
}

/// The split-KV decode kernel with the per-call options (window, softcap, ALiBi, sinks,
/// log-sum-exp output) `flash_decode_opt_<dt>_hd<bucket>`: a compile unit of its own, so
/// [`decode`] keeps the plain code.
pub fn decode_with_options(dtype: DType, bucket: usize) -> KernelSpec {
    decode_unit(
        format!("flash_decode_opt_{}_hd{bucket}", dtype.name()),
        dtype,
        bucket,
        true,
    )
}

/// The split merge `flash_decode_combine_<dt>`, from the compile unit of `bucket` (the one
/// its [`decode`] launch was built in, so no second build is needed).
pub fn decode_combine(dtype: DType, bucket: usize) -> KernelSpec {
    decode_unit(
        format!("flash_decode_combine_{}", dtype.name()),
        dtype,
        bucket,
        false,
    )
}

/// The split merge of [`decode_with_options`] `flash_decode_combine_opt_<dt>` (sinks and
/// the log-sum-exp output), from that kernel's compile unit of `bucket`.
pub fn decode_combine_with_options(dtype: DType, bucket: usize) -> KernelSpec {
    decode_unit(
        format!("flash_decode_combine_opt_{}", dtype.name()),
        dtype,
        bucket,
        true,
    )
}

/// Decode entries per dtype and bucket: plain and option units, each a kernel and its merge.
const DECODE_PER_BUCKET: usize = 4;
/// Ids of the decode kernels, first in the table.
const DECODE_IDS: usize = DTYPES.len() * DECODE_BUCKETS.len() * DECODE_PER_BUCKET;
/// First id of `attention_traditional.hip`: scores per dtype, the one softmax, P V per dtype.
const TRADITIONAL_BASE: usize = DECODE_IDS;
const TRADITIONAL_IDS: usize = 2 * DTYPES.len() + 1;
/// First id of the dtype-blind kernels: copy, fill, KV append, each per element size.
const ELEM_BASE: usize = TRADITIONAL_BASE + TRADITIONAL_IDS;

/// The dtype-blind kernels (`<stem>_b2` / `<stem>_b4`), in id order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElemKernel {
    /// `copy_strided` of `tensor_ops.hip`.
    CopyStrided,
    /// `fill` of `tensor_ops.hip`.
    Fill,
    /// `kv_append` of `kv_cache.hip`.
    KvAppend,
}

const ELEM_KERNELS: [ElemKernel; 3] = [
    ElemKernel::CopyStrided,
    ElemKernel::Fill,
    ElemKernel::KvAppend,
];

/// A kernel of the fixed part of the catalog (every variant but the flash ones, whose rows
/// come from `flash_config.h`) as a small dense index. A launch by id looks its loaded
/// function up in a fixed table ([`KernelId::index`]) and builds no [`KernelSpec`] and no
/// name; [`KernelId::spec`] is the variant the id stands for, built only to load it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelId(u16);

fn dtype_index(dtype: DType) -> Option<usize> {
    DTYPES.iter().position(|&d| d == dtype)
}

fn elem_index(elem_bytes: usize) -> Option<usize> {
    ELEM_SIZES.iter().position(|&b| b == elem_bytes)
}

impl KernelId {
    /// Number of ids: every id's [`index`](Self::index) is below it.
    pub const COUNT: usize = ELEM_BASE + ELEM_KERNELS.len() * ELEM_SIZES.len();

    fn at(index: usize) -> KernelId {
        debug_assert!(index < Self::COUNT);
        // COUNT is far below u16::MAX.
        KernelId(index as u16)
    }

    /// The index of this id in a table of [`KernelId::COUNT`] entries.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// Every id, in index order.
    pub fn all() -> impl Iterator<Item = KernelId> {
        (0..Self::COUNT).map(KernelId::at)
    }

    fn decode_entry(
        dtype: DType,
        bucket: usize,
        with_options: bool,
        combine: bool,
    ) -> Option<KernelId> {
        let d = dtype_index(dtype)?;
        let b = DECODE_BUCKETS.iter().position(|&x| x == bucket)?;
        let unit = (d * DECODE_BUCKETS.len() + b) * DECODE_PER_BUCKET;
        Some(KernelId::at(
            unit + 2 * usize::from(with_options) + usize::from(combine),
        ))
    }

    /// [`decode`] (or [`decode_with_options`]) of a float `dtype` and a `bucket` of
    /// [`DECODE_BUCKETS`]; `None` for any other.
    pub fn decode(dtype: DType, bucket: usize, with_options: bool) -> Option<KernelId> {
        Self::decode_entry(dtype, bucket, with_options, false)
    }

    /// [`decode_combine`] (or [`decode_combine_with_options`]) from the compile unit of
    /// [`KernelId::decode`] with the same arguments.
    pub fn decode_combine(dtype: DType, bucket: usize, with_options: bool) -> Option<KernelId> {
        Self::decode_entry(dtype, bucket, with_options, true)
    }

    /// [`traditional`] of a float `dtype` (the softmax has one id, whatever the dtype).
    pub fn traditional(kernel: TraditionalKernel, dtype: DType) -> Option<KernelId> {
        let d = dtype_index(dtype)?;
        let offset = match kernel {
            TraditionalKernel::Scores => d,
            TraditionalKernel::Softmax => DTYPES.len(),
            TraditionalKernel::Pv => DTYPES.len() + 1 + d,
        };
        Some(KernelId::at(TRADITIONAL_BASE + offset))
    }

    fn elem(kernel: ElemKernel, elem_bytes: usize) -> Option<KernelId> {
        let k = ELEM_KERNELS.iter().position(|&x| x == kernel)?;
        let e = elem_index(elem_bytes)?;
        Some(KernelId::at(ELEM_BASE + k * ELEM_SIZES.len() + e))
    }

    /// [`copy_strided`] for `elem_bytes`-byte elements (2 or 4).
    pub fn copy_strided(elem_bytes: usize) -> Option<KernelId> {
        Self::elem(ElemKernel::CopyStrided, elem_bytes)
    }

    /// [`fill`] for `elem_bytes`-byte elements (2 or 4).
    pub fn fill(elem_bytes: usize) -> Option<KernelId> {
        Self::elem(ElemKernel::Fill, elem_bytes)
    }

    /// [`kv_append`] for `elem_bytes`-byte elements (2 or 4).
    pub fn kv_append(elem_bytes: usize) -> Option<KernelId> {
        Self::elem(ElemKernel::KvAppend, elem_bytes)
    }

    /// The variant this id stands for, from the catalog's functions above (built anew on
    /// every call: for loading, not for launching).
    pub fn spec(self) -> KernelSpec {
        let i = self.index();
        if i < DECODE_IDS {
            let unit = i / DECODE_PER_BUCKET;
            let dtype = DTYPES[unit / DECODE_BUCKETS.len()];
            let bucket = DECODE_BUCKETS[unit % DECODE_BUCKETS.len()];
            return match i % DECODE_PER_BUCKET {
                0 => decode(dtype, bucket),
                1 => decode_combine(dtype, bucket),
                2 => decode_with_options(dtype, bucket),
                _ => decode_combine_with_options(dtype, bucket),
            };
        }
        if i < ELEM_BASE {
            let t = i - TRADITIONAL_BASE;
            let n = DTYPES.len();
            return match t {
                _ if t < n => traditional(TraditionalKernel::Scores, DTYPES[t]),
                _ if t == n => traditional(TraditionalKernel::Softmax, DType::F32),
                _ => traditional(TraditionalKernel::Pv, DTYPES[t - n - 1]),
            };
        }
        let e = i - ELEM_BASE;
        let kernel = ELEM_KERNELS[e / ELEM_SIZES.len()];
        elem_spec(kernel, ELEM_SIZES[e % ELEM_SIZES.len()])
    }

    /// The entry-point name of [`spec`](Self::spec), from a table built once per process
    /// (no allocation after the first call).
    pub fn name(self) -> &'static str {
        static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let names = NAMES.get_or_init(|| KernelId::all().map(|id| id.spec().name).collect());
        &names[self.index()]
    }
}

/// Every variant of every file, as NVRTC builds them: flash (3 files x every `FA_TILE` and
/// `FA_TILE_SM90` row x each of its [`FlashImpl::for_tile`]), traditional (per dtype, plus the dtype-free softmax once), tensor
/// ops, decode (per dtype x head-dim bucket, plain and with options, plus each one's
/// combine kernel once per dtype) and KV cache.
///
/// A malformed `flash_config.h` leaves the flash variants out; [`flash_table`] reports it.
pub fn all_nvrtc_variants() -> Vec<KernelSpec> {
    all_variants(TileVendor::Cuda)
}

/// Every entry point a build for `vendor` must provide: [`all_nvrtc_variants`] for CUDA;
/// for AMD the flash variants follow the `FA_TILE_HIP` rows, all SIMT (the defines do not
/// matter there: hipcc builds every variant of a file into one code object). A variant
/// builds only for the targets of [`KernelSpec::builds_for`].
pub fn all_variants(vendor: TileVendor) -> Vec<KernelSpec> {
    let mut specs = Vec::new();
    let mut tiles = flash_table(vendor).unwrap_or(&[]).to_vec();
    if vendor == TileVendor::Cuda {
        tiles.extend_from_slice(flash_table(TileVendor::CudaSm90).unwrap_or(&[]));
        tiles.extend_from_slice(flash_table_ws().unwrap_or(&[]));
    }
    for file in KernelFile::FLASH {
        for tile in &tiles {
            for &imp in FlashImpl::for_tile(tile, vendor) {
                specs.push(flash(file, tile, imp));
                // The extended variants are NVRTC-built only: the AMD code objects hold
                // the plain SIMT rows.
                if vendor != TileVendor::Hip {
                    specs.push(flash_variant(file, tile, imp, FlashExt::Options));
                    if file != KernelFile::FlashMasked {
                        specs.push(flash_variant(file, tile, imp, FlashExt::Paged));
                    }
                }
            }
        }
    }
    for kernel in TraditionalKernel::ALL {
        if kernel == TraditionalKernel::Softmax {
            specs.push(traditional(kernel, DType::F32));
        } else {
            specs.extend(DTYPES.iter().map(|&dt| traditional(kernel, dt)));
        }
    }
    specs.extend(ELEM_SIZES.iter().filter_map(|&b| copy_strided(b)));
    specs.extend(ELEM_SIZES.iter().filter_map(|&b| fill(b)));
    for dtype in DTYPES {
        specs.extend(DECODE_BUCKETS.iter().map(|&b| decode(dtype, b)));
        specs.extend(
            DECODE_BUCKETS
                .iter()
                .map(|&b| decode_with_options(dtype, b)),
        );
    }
    specs.extend(
        DTYPES
            .iter()
            .map(|&dt| decode_combine(dt, COMBINE_LISTED_BUCKET)),
    );
    specs.extend(
        DTYPES
            .iter()
            .map(|&dt| decode_combine_with_options(dt, COMBINE_LISTED_BUCKET)),
    );
    specs.extend(ELEM_SIZES.iter().filter_map(|&b| kv_append(b)));
    specs
}
