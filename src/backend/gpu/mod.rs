//! GPU backend (placeholder: the real one replaces this file).
use super::{AttentionPath, DeviceAttentionBackend, Support};
use crate::config::{AttentionConfig, KvCacheLayout};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::DeviceTensor;

/// GPU backend.
#[derive(Debug)]
pub struct GpuAttentionBackend {
    device: Device,
}

impl GpuAttentionBackend {
    /// A backend on `device` (a CUDA or HIP device); fails if the device is unusable.
    pub fn new(device: Device) -> Result<Self> {
        crate::device::gpu::GpuRuntime::get(device)?;
        Ok(GpuAttentionBackend { device })
    }
}

impl DeviceAttentionBackend for GpuAttentionBackend {
    fn name(&self) -> &str {
        "gpu"
    }
    fn device(&self) -> Device {
        self.device
    }
    fn supports(&self, _config: &AttentionConfig) -> Support {
        Support::Yes
    }
    fn required_kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout::FlashAttention
    }
    fn forward_into(
        &self,
        _config: &AttentionConfig,
        _q: &DeviceTensor,
        _k: &DeviceTensor,
        _v: &DeviceTensor,
        _mask: Option<&DeviceTensor>,
        _out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        todo!()
    }
}
