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
//! Every variant's entry-point name, file and defines are in [`catalog`]; the Rust
//! mirrors of the kernels' argument blocks are in `abi`.
//!
//! The flash tile table in `kernels/flash_config.h` has one row set per vendor ([`flash_table`]): `FA_TILE` rows
//! for CUDA (NVRTC builds the variant of the row it is asked for), `FA_TILE_SM90` rows that
//! replace some of them on sm_90 (Hopper's wgmma kernel, built for `compute_90a`, names
//! with `_sm90`), `FA_TILE_HIP` rows for AMD (hipcc builds all of them); a launch uses
//! the row of its device's vendor and architecture, on the [`FlashImpl`] the host chose
//! for it (each implementation has its own entry point).

pub(crate) mod abi;
pub mod catalog;
#[cfg(feature = "rocm")]
mod hsaco;
#[cfg(feature = "cuda")]
mod nvrtc;
mod source;
#[cfg(test)]
mod tests;
mod tiles;

pub use catalog::{
    all_nvrtc_variants, all_variants, FlashExt, FlashImpl, KernelFile, KernelId, KernelSpec,
};
#[cfg(feature = "rocm")]
pub use hsaco::{hip_archs_built, hsaco_path};
#[cfg(feature = "cuda")]
pub use nvrtc::{compile_ptx, nvrtc_available};
pub use source::{full_source, kernel_source, kernel_sources};
pub use tiles::{
    flash_table, flash_table_ws, flash_tile_for, flash_tile_for_vendor, flash_tile_tf32,
    flash_tile_ws, flash_tiles, parse_flash_config, FlashTile, TileVendor,
};
