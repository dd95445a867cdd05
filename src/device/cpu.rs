//! Host memory behind tensors on [`crate::Device::Cpu`].

use std::alloc::Layout;
use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Lease;
use crate::error::{AttentionError, Result};

/// Alignment of every host buffer (the widest vector load of the CPU backend).
const ALIGN: usize = 16;

/// One access in progress: a byte range of the buffer, read or written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
    pub write: bool,
}

impl Span {
    fn conflicts(&self, other: &Span) -> bool {
        (self.write || other.write) && self.start < other.end && other.start < self.end
    }
}

/// Why [`HostBuffer::try_register`] refused an access.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// Another access holds this span.
    Busy(Span),
    /// The memory was lent read-only and the access writes.
    ReadOnly,
    /// The memory was lent for a lifetime that has ended.
    Ended,
}

/// Where a buffer's bytes come from.
enum Origin {
    /// Allocated here with this layout; `None` for an empty buffer (a dangling, aligned
    /// pointer).
    Owned(Option<Layout>),
    /// Lent by the caller and never freed here; `owner` (if any) is dropped with the
    /// buffer, which is how the caller learns that forge-attn no longer uses the memory.
    Borrowed {
        _owner: Option<Arc<dyn Any + Send + Sync>>,
    },
}

/// A zero-initialised, 16-byte aligned host allocation shared by a tensor and its views,
/// or host memory lent by the caller ([`HostBuffer::borrowed`]).
///
/// Views alias one buffer the way GPU tensors alias one allocation, so the bytes are
/// reached through raw pointers. Soundness: every read or write of the bytes after the
/// buffer is first shared happens while an access is registered here
/// ([`HostBuffer::try_register`]) for the byte range it touches. Registration refuses a
/// range that overlaps one registered by another access unless both only read, so at any
/// moment a written byte belongs to exactly one access (one call on one thread): two clones
/// of a tensor written from two threads can never race, whatever `&mut` they hold. An
/// access may overlap itself (a copy within one buffer), which is ordered by its own
/// loop. Registration never waits, so it cannot deadlock; a conflict is an error.
pub(crate) struct HostBuffer {
    ptr: NonNull<u8>,
    bytes: usize,
    origin: Origin,
    /// Lent read-only: every write access is refused.
    read_only: bool,
    /// Lent for a lifetime: once it ends, every access is refused.
    lease: Option<Arc<Lease>>,
    active: Mutex<Vec<(u64, Span)>>,
    next_id: AtomicU64,
}

// SAFETY: the buffer owns plain bytes; concurrent access is only through registered,
// non-conflicting ranges (see the type's documentation).
unsafe impl Sync for HostBuffer {}
unsafe impl Send for HostBuffer {}

impl HostBuffer {
    /// `bytes` zeroed bytes, or [`AttentionError::OutOfMemory`] when the allocator refuses
    /// (never an abort). The zeroing is lazy where the system allocator hands out fresh pages.
    pub(crate) fn try_zeroed(bytes: usize) -> Result<Self> {
        let oom = |detail: &str| AttentionError::host_oom("host tensor", bytes as u64, detail);
        let (ptr, layout) = if bytes == 0 {
            (NonNull::<u128>::dangling().cast::<u8>(), None)
        } else {
            let size = bytes
                .checked_next_multiple_of(ALIGN)
                .ok_or_else(|| oom("size overflows usize"))?;
            let layout =
                Layout::from_size_align(size, ALIGN).map_err(|_| oom("size exceeds isize::MAX"))?;
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            let ptr = NonNull::new(raw).ok_or_else(|| oom("the allocator refused"))?;
            (ptr, Some(layout))
        };
        Ok(HostBuffer {
            ptr,
            bytes,
            origin: Origin::Owned(layout),
            read_only: false,
            lease: None,
            active: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// `bytes` bytes at `ptr` that the caller lends; never freed here.
    ///
    /// # Safety
    /// `ptr` is valid for reads (and, unless `read_only`, writes) of `bytes` bytes, and
    /// nothing else writes them (or, unless `read_only`, reads them) while `owner` is
    /// alive, or while `lease` has not ended when one is given.
    pub(crate) unsafe fn borrowed(
        ptr: NonNull<u8>,
        bytes: usize,
        read_only: bool,
        owner: Option<Arc<dyn Any + Send + Sync>>,
        lease: Option<Arc<Lease>>,
    ) -> Self {
        HostBuffer {
            ptr,
            bytes,
            origin: Origin::Borrowed { _owner: owner },
            read_only,
            lease,
            active: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Whether the bytes were lent by the caller rather than allocated here.
    pub(crate) fn is_borrowed(&self) -> bool {
        matches!(self.origin, Origin::Borrowed { .. })
    }

    /// Ends the lease: later registrations are refused, and this returns once the
    /// accesses in progress (on other threads) have ended, so the lender may reuse the
    /// memory as soon as it returns.
    pub(crate) fn end_lease(&self) {
        let Some(lease) = &self.lease else { return };
        loop {
            let active = self.active();
            lease.end();
            if active.is_empty() {
                return;
            }
            drop(active);
            std::thread::yield_now();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    /// Start of the buffer. Dereferencing it needs a registered access covering the bytes
    /// (or exclusive ownership of a buffer not yet shared).
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn active(&self) -> MutexGuard<'_, Vec<(u64, Span)>> {
        // The list stays consistent even if a holder panicked (pushes and retains only).
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers one access made of `spans`; returns its id for [`release`](Self::release),
    /// or why it is refused (the first registered span of another access that conflicts,
    /// a write to read-only memory, an ended lease).
    pub(crate) fn try_register(&self, spans: &[Span]) -> std::result::Result<u64, Refusal> {
        let mut active = self.active();
        // Checked under the lock that `end_lease` takes, so no access starts after it.
        if self.lease.as_ref().is_some_and(|l| l.has_ended()) {
            return Err(Refusal::Ended);
        }
        if self.read_only && spans.iter().any(|s| s.write) {
            return Err(Refusal::ReadOnly);
        }
        for s in spans {
            if let Some((_, held)) = active.iter().find(|(_, a)| a.conflicts(s)) {
                return Err(Refusal::Busy(*held));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        active.extend(spans.iter().map(|&s| (id, s)));
        Ok(id)
    }

    /// Ends the access `id`.
    pub(crate) fn release(&self, id: u64) {
        self.active().retain(|(i, _)| *i != id);
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Origin::Owned(Some(layout)) = self.origin {
            // SAFETY: allocated in `try_zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}
