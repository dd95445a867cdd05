//! Legacy host-slice API (placeholder).
/// Legacy trait.
pub trait BackendImplementation {}
/// Registry.
pub struct AttentionBackendRegistry;
/// Adapter.
pub struct HostAdapter<B>(pub B);
