//! GPU backend (placeholder).
/// GPU backend.
#[derive(Debug)]
pub struct GpuAttentionBackend;
