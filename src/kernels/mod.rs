//! Kernel sources, variant names and their compilation (NVRTC for CUDA, prebuilt HSACO
//! for ROCm).
//!
//! Every file of `kernels/` is embedded in the library ([`kernel_sources`]). One kernel
//! source serves both vendors:
//!
//! * ROCm: `build.rs` compiles each `.hip` file with hipcc into one HSACO code object that
//!   holds every variant of that file (`hsaco_path`, feature `rocm`).
//! * CUDA: NVRTC compiles one variant at a time, at run time, on first use
//!   (`compile_ptx`, feature `cuda`); the `FA_VARIANT_*` defines of its [`KernelSpec`] make the file emit
//!   just that variant. PTX is cached in memory and on disk.
//!
//! Variant names (entry points, unique across all files):
//!
//! | file | entry points | NVRTC defines |
//! |---|---|---|
//! | `flash_attention_nocausal.hip` | `flash_attention_nocausal_<dt>_hd<N>[_sm90]` | `FA_VARIANT_{DT,HD,BM,BN,THREADS,SMEM}` from the [`FlashTile`] (and `FA_VARIANT_WGMMA` for `_sm90`) |
//! | `flash_attention_causal.hip` | `flash_attention_causal_<dt>_hd<N>` | same |
//! | `flash_attention.hip` | `flash_attention_masked_<dt>_hd<N>` | same |
//! | `attention_traditional.hip` | `attn_scores_<dt>`, `attn_softmax_rows`, `attn_pv_<dt>` | `FA_VARIANT_DT` |
//! | `tensor_ops.hip` | `copy_strided_b2/_b4`, `fill_b2/_b4` | none |
//! | `flash_decode.hip` | `flash_decode_<dt>_hd<N>`, `flash_decode_combine_<dt>` | `FA_VARIANT_{DT,HD}` |
//! | `kv_cache.hip` | `kv_append_b2/_b4` | none |
//!
//! `<dt>` is `f32`, `f16` or `bf16`; `<N>` is a head-dim bucket. The flash tile table in
//! `kernels/flash_config.h` has one row set per vendor ([`flash_table`]): `FA_TILE` rows
//! for CUDA (NVRTC builds the variant of the row it is asked for), `FA_TILE_SM90` rows that
//! replace some of them on sm_90 (Hopper's wgmma kernel, built for `compute_90a`, names
//! ending in `_sm90`), `FA_TILE_HIP` rows for AMD (hipcc builds all of them); a launch uses
//! the row of its device's vendor and architecture.

use crate::dtype::DType;

#[cfg(feature = "rocm")]
mod hsaco;
#[cfg(feature = "cuda")]
mod nvrtc;
mod source;
#[cfg(test)]
mod tests;
mod tiles;

#[cfg(feature = "rocm")]
pub use hsaco::{hip_archs_built, hsaco_path};
#[cfg(feature = "cuda")]
pub use nvrtc::{compile_ptx, nvrtc_available};
pub use source::{full_source, kernel_source, kernel_sources};
pub use tiles::{
    flash_table, flash_tile_for, flash_tile_for_vendor, flash_tile_tf32, flash_tiles,
    parse_flash_config, FlashTile, TileVendor,
};

/// One kernel source file in `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelFile {
    /// `flash_attention_nocausal.hip`
    FlashNoCausal,
    /// `flash_attention_causal.hip`
    FlashCausal,
    /// `flash_attention.hip` (additive mask, optional causal)
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
            KernelFile::FlashMasked => "flash_attention.hip",
            KernelFile::Traditional => "attention_traditional.hip",
            KernelFile::TensorOps => "tensor_ops.hip",
            KernelFile::Decode => "flash_decode.hip",
            KernelFile::KvCache => "kv_cache.hip",
        }
    }

    /// The mask-mode word of a flash file's entry points (`nocausal`, `causal`, `masked`);
    /// `None` for the other files.
    pub fn flash_mode(self) -> Option<&'static str> {
        match self {
            KernelFile::FlashNoCausal => Some("nocausal"),
            KernelFile::FlashCausal => Some("causal"),
            KernelFile::FlashMasked => Some("masked"),
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
    /// wgmma); other targets build it as usual, and it falls back to their kernels.
    pub arch_specific: bool,
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
        }
    }
}

/// Entry points of `attention_traditional.hip` that do not depend on the dtype.
const DTYPE_FREE_TRADITIONAL: [&str; 1] = ["attn_softmax_rows"];

/// Name stems of `attention_traditional.hip`, in launch order.
pub const TRADITIONAL_STEMS: [&str; 3] = ["attn_scores", "attn_softmax_rows", "attn_pv"];

/// Entry points of `tensor_ops.hip`.
pub const TENSOR_OPS_KERNELS: [&str; 4] =
    ["copy_strided_b2", "copy_strided_b4", "fill_b2", "fill_b4"];

/// Entry points of `kv_cache.hip`.
pub const KV_CACHE_KERNELS: [&str; 2] = ["kv_append_b2", "kv_append_b4"];

/// The flash variant of `file` for `tile`: `flash_attention_<mode>_<dt>_hd<N>` with the
/// tile's `FA_VARIANT_*` defines, `<mode>` from [`KernelFile::flash_mode`].
///
/// `<dt>` is the tile's dtype, or `tf32` for a TF32 row. An `FA_TILE_SM90` row's name ends
/// in `_sm90`; it also defines `FA_VARIANT_WGMMA=1` and is [`KernelSpec::arch_specific`]. `file` should be one of
/// [`KernelFile::FLASH`]; otherwise
/// the name is one no kernel file defines (`flash_attention_<file stem>_...`), so loading
/// it fails with a [`crate::AttentionError::KernelBuild`] instead of running the wrong kernel.
pub fn flash_spec(file: KernelFile, tile: &FlashTile) -> KernelSpec {
    let mode = file
        .flash_mode()
        .unwrap_or_else(|| file.file_name().trim_end_matches(".hip"));
    let dt = tile.kernel_dtype_name();
    let suffix = if tile.wgmma { "_sm90" } else { "" };
    let name = format!("flash_attention_{mode}_{dt}_hd{}{suffix}", tile.head_dim);
    let mut defines = vec![
        ("FA_VARIANT_DT", dt.to_string()),
        ("FA_VARIANT_HD", tile.head_dim.to_string()),
        ("FA_VARIANT_BM", tile.block_m.to_string()),
        ("FA_VARIANT_BN", tile.block_n.to_string()),
        ("FA_VARIANT_THREADS", tile.threads.to_string()),
        ("FA_VARIANT_SMEM", tile.smem_bytes.to_string()),
    ];
    if tile.wgmma {
        defines.push(("FA_VARIANT_WGMMA", "1".to_string()));
    }
    KernelSpec {
        arch_specific: tile.wgmma,
        ..KernelSpec::new(file, name, defines)
    }
}

/// A kernel of `attention_traditional.hip`: `<name_stem>_<dt>` selected by
/// `-DFA_VARIANT_DT=<dt>`. Dtype-independent kernels (`attn_softmax_rows`) keep their bare
/// name and always use the `f32` compile unit, so every dtype shares one build.
pub fn traditional_spec(name_stem: &str, dtype: DType) -> KernelSpec {
    if DTYPE_FREE_TRADITIONAL.contains(&name_stem) {
        return KernelSpec::new(
            KernelFile::Traditional,
            name_stem,
            vec![("FA_VARIANT_DT", DType::F32.name().to_string())],
        );
    }
    KernelSpec::new(
        KernelFile::Traditional,
        format!("{name_stem}_{}", dtype.name()),
        vec![("FA_VARIANT_DT", dtype.name().to_string())],
    )
}

/// A kernel of `tensor_ops.hip` (no defines).
pub fn tensor_ops_spec(name: &str) -> KernelSpec {
    KernelSpec::new(KernelFile::TensorOps, name, vec![])
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Every variant of every file, as NVRTC builds them: flash (3 files x every `FA_TILE` and
/// `FA_TILE_SM90` row), traditional (per dtype, plus the dtype-free softmax once), tensor ops, decode
/// (per dtype x head-dim bucket, plus the combine kernel once per dtype) and KV cache.
///
/// A malformed `flash_config.h` leaves the flash variants out; [`flash_table`] reports it.
pub fn all_nvrtc_variants() -> Vec<KernelSpec> {
    all_variants(TileVendor::Cuda)
}

/// Every entry point a build for `vendor` must provide: [`all_nvrtc_variants`] for CUDA;
/// for AMD the flash variants follow the `FA_TILE_HIP` rows (the defines do not matter
/// there: hipcc builds every variant of a file into one code object).
pub fn all_variants(vendor: TileVendor) -> Vec<KernelSpec> {
    let mut specs = Vec::new();
    let mut tiles = flash_table(vendor).unwrap_or(&[]).to_vec();
    if vendor == TileVendor::Cuda {
        tiles.extend_from_slice(flash_table(TileVendor::CudaSm90).unwrap_or(&[]));
    }
    for file in KernelFile::FLASH {
        for tile in &tiles {
            specs.push(flash_spec(file, tile));
        }
    }
    for stem in TRADITIONAL_STEMS {
        if DTYPE_FREE_TRADITIONAL.contains(&stem) {
            specs.push(traditional_spec(stem, DType::F32));
        } else {
            specs.extend(DTYPES.iter().map(|&dt| traditional_spec(stem, dt)));
        }
    }
    specs.extend(TENSOR_OPS_KERNELS.iter().map(|n| tensor_ops_spec(n)));
    specs.extend(crate::backend::gpu::all_decode_specs());
    specs.extend(
        KV_CACHE_KERNELS
            .iter()
            .map(|n| KernelSpec::new(KernelFile::KvCache, *n, vec![])),
    );
    specs
}
