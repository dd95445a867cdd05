//! Errors of every layer: one enum, each variant saying what was expected and what was given.

use std::sync::Arc;

use thiserror::Error;

/// Every failure forge-attn reports. Bad input is always an error, never a panic.
///
/// Errors that come from a driver, a runtime or a compiler (CUDA driver calls, NVRTC, HIP)
/// keep that error as their [`std::error::Error::source`] where it is at hand (an
/// [`ErrorSource`]); the message of the variant itself already names it. Two errors are
/// equal when their variants and fields are, whatever their sources.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum AttentionError {
    /// A configuration field is invalid.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it, with the given and expected values.
        reason: String,
    },
    /// A tensor has the wrong shape.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which tensor or argument.
        what: String,
        /// The expected shape or length.
        expected: String,
        /// The shape or length that was given.
        got: String,
    },
    /// A tensor has the wrong element type.
    #[error("dtype mismatch for {what}: expected {expected}, got {got}")]
    DTypeMismatch {
        /// Which tensor.
        what: String,
        /// Expected dtype.
        expected: String,
        /// Given dtype.
        got: String,
    },
    /// A tensor lives on the wrong device.
    #[error("device mismatch for {what}: expected {expected}, got {got}")]
    DeviceMismatch {
        /// Which tensor.
        what: String,
        /// Expected device.
        expected: String,
        /// Given device.
        got: String,
    },
    /// A tensor's memory layout is not one the operation accepts.
    #[error("unsupported layout for {what}: {reason}")]
    UnsupportedLayout {
        /// Which tensor.
        what: String,
        /// Why the layout is rejected.
        reason: String,
    },
    /// The backend or kernel cannot run this problem.
    #[error("not supported by {backend}: {reason}")]
    NotSupported {
        /// Backend name.
        backend: String,
        /// Why not.
        reason: String,
    },
    /// No backend of that name is registered.
    #[error("backend not found: {0}")]
    NotFound(String),
    /// The device is not usable (no driver, no GPU, runtime missing).
    #[error("device {device} unavailable: {reason}")]
    DeviceUnavailable {
        /// The device asked for.
        device: String,
        /// Why it cannot be used.
        reason: String,
        /// The driver's error, when one caused this.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A device allocation failed.
    #[error("out of memory on {device}: requested {requested_bytes} bytes ({detail})")]
    OutOfMemory {
        /// The device.
        device: String,
        /// Bytes asked for.
        requested_bytes: u64,
        /// The runtime's message.
        detail: String,
        /// The runtime's (or the host allocator's) error, when one caused this.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A kernel failed to compile or load; the log is included.
    #[error("kernel build failed for {kernel}: {log}")]
    KernelBuild {
        /// The kernel variant.
        kernel: String,
        /// Compiler or loader log.
        log: String,
        /// The compiler's or loader's error, when one caused this.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A device runtime call failed.
    #[error("device runtime error in {op}: {detail}")]
    Runtime {
        /// The operation that failed.
        op: String,
        /// The runtime's message.
        detail: String,
        /// The runtime's error, when one caused this.
        #[source]
        source: Option<ErrorSource>,
    },
    /// Host memory of a tensor is being written (or, for a write, read) by another thread
    /// in an overlapping range at this moment; the call did nothing. Tensors that share
    /// storage (clones and views) may be used from several threads as long as one thread's
    /// writes never overlap another's reads or writes.
    #[error("storage of {what} is busy: {reason}")]
    StorageBusy {
        /// The tensor whose memory is in use.
        what: String,
        /// Which access conflicts, with the byte ranges.
        reason: String,
    },
    /// A KV cache cannot take more tokens.
    #[error("KV cache capacity exceeded: {0}")]
    CapacityExceeded(String),
    /// An operation that a device graph cannot record was called while recording one
    /// ([`Device::capture_graph`](crate::Device::capture_graph)).
    #[error("{op} is not allowed while recording a device graph on {device}: {reason}")]
    GraphCapture {
        /// The device being recorded.
        device: String,
        /// The refused operation.
        op: String,
        /// Why it cannot be recorded, and what to do instead.
        reason: String,
    },
    /// Memory handed to forge-attn to wrap as a tensor (a device or host pointer, a slice)
    /// cannot hold it: a null pointer, a pointer not on the named device, an address not
    /// aligned for the dtype, or a range shorter than the shape and strides reach; or a
    /// write to memory that was lent read-only.
    #[error("invalid memory for {what}: expected {expected}, got {got}")]
    InvalidMemory {
        /// Which tensor or argument.
        what: String,
        /// What the memory must satisfy.
        expected: String,
        /// What was given (the address, device, length).
        got: String,
    },
    /// A tensor made from borrowed memory was used after the borrow ended (a clone or a
    /// view kept past the guard that lent it).
    #[error("the borrow of {what} has ended: {reason}")]
    BorrowEnded {
        /// Which tensor.
        what: String,
        /// What ended the borrow.
        reason: String,
    },
}

impl PartialEq for AttentionError {
    fn eq(&self, other: &Self) -> bool {
        use AttentionError as E;
        // Exhaustive over `self`, so a new variant must be added here; sources are skipped.
        match self {
            E::InvalidConfig { field, reason } => {
                matches!(other, E::InvalidConfig { field: f, reason: r } if (f, r) == (field, reason))
            }
            E::ShapeMismatch {
                what,
                expected,
                got,
            } => {
                matches!(other, E::ShapeMismatch { what: w, expected: e, got: g } if (w, e, g) == (what, expected, got))
            }
            E::DTypeMismatch {
                what,
                expected,
                got,
            } => {
                matches!(other, E::DTypeMismatch { what: w, expected: e, got: g } if (w, e, g) == (what, expected, got))
            }
            E::DeviceMismatch {
                what,
                expected,
                got,
            } => {
                matches!(other, E::DeviceMismatch { what: w, expected: e, got: g } if (w, e, g) == (what, expected, got))
            }
            E::UnsupportedLayout { what, reason } => {
                matches!(other, E::UnsupportedLayout { what: w, reason: r } if (w, r) == (what, reason))
            }
            E::NotSupported { backend, reason } => {
                matches!(other, E::NotSupported { backend: b, reason: r } if (b, r) == (backend, reason))
            }
            E::NotFound(name) => matches!(other, E::NotFound(n) if n == name),
            E::DeviceUnavailable { device, reason, .. } => {
                matches!(other, E::DeviceUnavailable { device: d, reason: r, .. } if (d, r) == (device, reason))
            }
            E::OutOfMemory {
                device,
                requested_bytes,
                detail,
                ..
            } => matches!(
                other,
                E::OutOfMemory { device: d, requested_bytes: b, detail: t, .. }
                    if (d, b, t) == (device, requested_bytes, detail)
            ),
            E::KernelBuild { kernel, log, .. } => {
                matches!(other, E::KernelBuild { kernel: k, log: l, .. } if (k, l) == (kernel, log))
            }
            E::Runtime { op, detail, .. } => {
                matches!(other, E::Runtime { op: o, detail: d, .. } if (o, d) == (op, detail))
            }
            E::StorageBusy { what, reason } => {
                matches!(other, E::StorageBusy { what: w, reason: r } if (w, r) == (what, reason))
            }
            E::CapacityExceeded(why) => matches!(other, E::CapacityExceeded(w) if w == why),
            E::GraphCapture { device, op, reason } => {
                matches!(other, E::GraphCapture { device: d, op: o, reason: r } if (d, o, r) == (device, op, reason))
            }
            E::InvalidMemory {
                what,
                expected,
                got,
            } => {
                matches!(other, E::InvalidMemory { what: w, expected: e, got: g } if (w, e, g) == (what, expected, got))
            }
            E::BorrowEnded { what, reason } => {
                matches!(other, E::BorrowEnded { what: w, reason: r } if (w, r) == (what, reason))
            }
        }
    }
}

/// The underlying error of an [`AttentionError`] (a CUDA driver, NVRTC or HIP error, or a
/// failed host allocation), shared so that the error stays `Clone`.
///
/// It displays as the underlying error and its own `source()` continues that error's
/// chain. [`AttentionError`]'s `PartialEq` compares what the variants say, not where they
/// came from, and so two sources compare equal too. [`ErrorSource::get`] gives the
/// underlying error for downcasting.
#[derive(Clone)]
pub struct ErrorSource(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl ErrorSource {
    /// Wraps `e`.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ErrorSource(Arc::new(e))
    }

    /// The underlying error, e.g. for `downcast_ref::<cudarc::driver::DriverError>()`.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Debug for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for ErrorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for ErrorSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for ErrorSource {
    /// Always true (see the type's docs).
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, AttentionError>;

/// The original result alias of the host-slice API.
pub type AttentionBackendResult<T> = std::result::Result<T, AttentionError>;

impl AttentionError {
    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        AttentionError::ShapeMismatch {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// A failed host allocation of `bytes` bytes for `what`.
    pub(crate) fn host_oom(what: &str, bytes: u64, detail: impl std::fmt::Display) -> Self {
        AttentionError::OutOfMemory {
            device: "cpu".into(),
            requested_bytes: bytes,
            detail: format!("{what}: {detail}"),
            source: None,
        }
    }

    /// A `try_reserve` of `bytes` bytes for `what` that failed with `e` (kept as the source).
    pub(crate) fn host_reserve_failed(
        what: &str,
        bytes: u64,
        e: std::collections::TryReserveError,
    ) -> Self {
        AttentionError::OutOfMemory {
            device: "cpu".into(),
            requested_bytes: bytes,
            detail: format!("{what}: {e}"),
            source: Some(ErrorSource::new(e)),
        }
    }
}
