//! forge-attn: device-resident fused attention for LLM inference.
#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod device;
pub mod dtype;
pub mod error;
pub mod kernels;
pub mod kv_cache;
pub mod legacy;
pub mod problem;
pub mod reference;
pub mod tensor;

pub use backend::cpu::CpuAttentionBackend;
pub use backend::gpu::GpuAttentionBackend;
pub use backend::{AttentionPath, DeviceAttentionBackend, FlashKernel, Support};
pub use config::{AttentionConfig, KvCacheLayout, Layout};
pub use device::{Device, TransferStats};
pub use dtype::{DType, HostElement};
pub use error::{AttentionBackendResult, AttentionError, Result};
pub use kv_cache::{KvCache, KvCacheSpec};
pub use legacy::{
    AttentionBackendRegistry, BackendImplementation, BackendPriority, HostAdapter, PathRecorder,
};
pub use problem::AttentionProblem;
pub use tensor::DeviceTensor;
