//! Kernel sources, variant names and their compilation (NVRTC for CUDA, prebuilt HSACO
//! for ROCm).

use crate::error::Result;

/// One kernel source file in `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// `flash_decode.hip`
    Decode,
    /// `kv_cache.hip`
    KvCache,
}

impl KernelFile {
    /// Every kernel file.
    pub const ALL: [KernelFile; 5] = [
        KernelFile::FlashNoCausal,
        KernelFile::FlashCausal,
        KernelFile::FlashMasked,
        KernelFile::Traditional,
        KernelFile::TensorOps,
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
        }
    }
}

/// Compiles a variant to PTX for compute capability `cc` (e.g. (9, 0)), cached.
#[cfg(feature = "cuda")]
pub(crate) fn compile_ptx(_spec: &KernelSpec, _cc: (i32, i32)) -> Result<std::sync::Arc<str>> {
    todo!()
}

/// Path of the prebuilt HSACO code object holding every variant of `file`.
#[cfg(feature = "rocm")]
pub(crate) fn hsaco_path(_file: KernelFile) -> Result<&'static str> {
    todo!()
}

// ---- interface stubs (replaced by the build pipeline) ----
/// A flash tile configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashTile {
    /// dtype
    pub dtype: crate::dtype::DType,
    /// head-dim bucket
    pub head_dim: usize,
    /// queries per block
    pub block_m: u32,
    /// keys per tile
    pub block_n: u32,
    /// threads per block
    pub threads: u32,
    /// dynamic shared memory
    pub smem_bytes: u32,
}
/// Tile for dtype/head_dim.
pub fn flash_tile_for(_dtype: crate::dtype::DType, _head_dim: usize) -> Option<&'static FlashTile> {
    None
}
/// Flash spec.
pub fn flash_spec(file: KernelFile, _dtype: crate::dtype::DType, _tile: &FlashTile) -> KernelSpec {
    KernelSpec::new(file, "", vec![])
}
/// Traditional spec.
pub fn traditional_spec(stem: &str, _dtype: crate::dtype::DType) -> KernelSpec {
    KernelSpec::new(KernelFile::Traditional, stem, vec![])
}
