//! CPU backend (placeholder).
use super::{AttentionPath, DeviceAttentionBackend, Support};
use crate::config::{AttentionConfig, KvCacheLayout};
use crate::error::Result;
use crate::tensor::DeviceTensor;

/// CPU backend.
#[derive(Debug, Default, Clone)]
pub struct CpuAttentionBackend;

impl DeviceAttentionBackend for CpuAttentionBackend {
    fn name(&self) -> &str {
        "cpu"
    }
    fn device(&self) -> crate::device::Device {
        crate::device::Device::Cpu
    }
    fn supports(&self, _config: &AttentionConfig) -> Support {
        Support::Yes
    }
    fn required_kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout::Contiguous
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
