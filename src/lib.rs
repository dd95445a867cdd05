//! forge-attn: device-resident fused attention for LLM inference.
//!
//! Q, K and V live on a device as [`DeviceTensor`]s and stay there. A
//! [`DeviceAttentionBackend`] computes attention from them into a caller-owned output, so
//! a decode loop chains steps with no host round trip. [`GpuAttentionBackend`] picks a
//! fused flash kernel (non-causal, causal, additive mask, split-KV decode) where one
//! applies and falls back to an unfused device path otherwise, reporting the
//! [`AttentionPath`] it took and, through [`GpuAttentionBackend::plan`], the reason for any
//! fallback. [`CpuAttentionBackend`] runs everything on the host. The original host-slice
//! API ([`BackendImplementation`], [`AttentionBackendRegistry`]) keeps working through
//! [`HostAdapter`]. A decode step's launches can be recorded once with
//! [`Device::capture_graph`] and replayed as one [`DeviceGraph`] launch per step.
//!
//! ```
//! use forge_attn::{AttentionConfig, DType, Device, DeviceAttentionBackend, DeviceTensor};
//! use forge_attn::{CpuAttentionBackend, GpuAttentionBackend};
//!
//! # fn main() -> forge_attn::Result<()> {
//! // 2 sequences, 8 query heads sharing 2 KV heads, head_dim 64, causal.
//! let (b, s, h, hkv, d) = (2, 16, 8, 2, 64);
//! let config = AttentionConfig::new(h * d, h, s).with_num_kv_heads(hkv).with_causal(true);
//!
//! let device = Device::best_available(); // a GPU if one is usable, else the CPU
//! let backend: Box<dyn DeviceAttentionBackend> = match device {
//!     Device::Cpu => Box::new(CpuAttentionBackend::default()),
//!     gpu => Box::new(GpuAttentionBackend::new(gpu)?),
//! };
//! let data = |n: usize| (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect::<Vec<_>>();
//! let q = DeviceTensor::from_f32(&data(b * s * h * d), &[b, s, h, d], DType::F32, device)?;
//! let k = DeviceTensor::from_f32(&data(b * s * hkv * d), &[b, s, hkv, d], DType::F32, device)?;
//! let v = DeviceTensor::from_f32(&data(b * s * hkv * d), &[b, s, hkv, d], DType::F32, device)?;
//!
//! // The output is allocated once and reused; nothing leaves the device here.
//! let mut out = DeviceTensor::zeros(&[b, s, h, d], DType::F32, device)?;
//! let path = backend.forward_into(&config, &q, &k, &v, None, &mut out)?;
//! println!("{} ran {path}", backend.name());
//!
//! let host: Vec<f32> = out.to_host()?; // one explicit download
//! assert_eq!(host.len(), b * s * h * d);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_probe;
pub mod device;
pub mod dtype;
pub mod error;
/// Kernel sources, variant catalog and compilation. Internal: public for the crate's own
/// tests and benchmarks, not a stable API (it may change in any release).
#[doc(hidden)]
pub mod kernels;
pub mod kv_cache;
pub mod legacy;
pub mod options;
pub mod paged;
/// Validated call shapes shared by the backends. Internal: public for the crate's own
/// tests, not a stable API (it may change in any release).
#[doc(hidden)]
pub mod problem;
// Feature `reference` (the crate's own unit tests always have it).
#[cfg(any(test, feature = "reference"))]
pub mod reference;
pub mod tensor;
pub mod varlen;

pub use backend::cpu::CpuAttentionBackend;
pub use backend::gpu::GpuAttentionBackend;
pub use backend::merge_states;
pub use backend::{AttentionPath, DeviceAttentionBackend, FlashKernel, Support};
pub use config::{AttentionConfig, KvCacheLayout, Layout, MAX_SCALE};
pub use device::{Device, DeviceGraph, GpuStream, TransferStats};
pub use dtype::{DType, HostElement};
pub use error::{AttentionBackendResult, AttentionError, ErrorSource, Result};
pub use kernels::FlashImpl;
pub use kv_cache::{KvCache, KvCacheSpec};
pub use legacy::{
    AttentionBackendRegistry, BackendImplementation, BackendPriority, Dispatch, HostAdapter,
    PathRecorder, SkipReason, Skipped,
};
pub use options::{AttentionOptions, MAX_WINDOW};
pub use paged::{PageLayout, PagedGeometry, PagedKv};
/// Internal, not a stable API (see [`problem`]).
#[doc(hidden)]
pub use problem::AttentionProblem;
pub use tensor::{BorrowScope, DeviceTensor, MemoryOwner};
pub use varlen::{VarlenBatch, VarlenOffsets};
