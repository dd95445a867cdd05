//! The HSACO code objects that build.rs compiled with hipcc (feature `rocm`).

use std::path::PathBuf;

use super::KernelFile;
use crate::error::{AttentionError, Result};

/// Directory to load `<stem>.hsaco` files from instead of the build-time paths (for a
/// binary run on another machine than the one that built it).
pub const HSACO_DIR_ENV: &str = "FORGE_ATTN_HSACO_DIR";

/// The path build.rs exported for `file`, if hipcc built it.
fn built_path(file: KernelFile) -> Option<&'static str> {
    match file {
        KernelFile::FlashMasked => option_env!("FLASH_ATTENTION_HSACO"),
        KernelFile::FlashCausal => option_env!("FLASH_ATTENTION_CAUSAL_HSACO"),
        KernelFile::FlashNoCausal => option_env!("FLASH_ATTENTION_NCAUSAL_HSACO"),
        KernelFile::Traditional => option_env!("FLASH_ATTENTION_TRADITIONAL_HSACO"),
        KernelFile::TensorOps => option_env!("FLASH_ATTENTION_TENSOR_OPS_HSACO"),
        KernelFile::Decode => option_env!("FLASH_ATTENTION_DECODE_HSACO"),
    }
}

/// The AMD targets the HSACO objects were built for (comma separated), if they were built.
pub fn hip_archs_built() -> Option<&'static str> {
    option_env!("FORGE_ATTN_HIP_ARCHS_BUILT")
}

/// Path of the prebuilt HSACO code object holding every variant of `file`.
///
/// `$FORGE_ATTN_HSACO_DIR/<stem>.hsaco` when that variable is set, else the path build.rs
/// exported. Fails with [`AttentionError::KernelBuild`] when hipcc was missing at build
/// time or the file is not there.
pub fn hsaco_path(file: KernelFile) -> Result<PathBuf> {
    let err = |log: String| AttentionError::KernelBuild {
        kernel: file.file_name().to_string(),
        log,
    };
    let path = match std::env::var_os(HSACO_DIR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => {
            let stem = file.file_name().trim_end_matches(".hip");
            PathBuf::from(dir).join(format!("{stem}.hsaco"))
        }
        None => match built_path(file) {
            Some(p) => PathBuf::from(p),
            None => {
                return Err(err(
                    "kernels not built: hipcc was not found at build time (install hipcc and \
                     rebuild with --features rocm)"
                        .into(),
                ))
            }
        },
    };
    if !path.is_file() {
        return Err(err(format!(
            "HSACO code object {} not found (set {HSACO_DIR_ENV} to a directory holding \
             <kernel file stem>.hsaco when running away from the build machine)",
            path.display()
        )));
    }
    Ok(path)
}
