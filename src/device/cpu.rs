//! Host memory behind tensors on [`crate::Device::Cpu`].

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

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

/// A zero-initialised, 16-byte aligned host allocation shared by a tensor and its views.
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
    /// Allocation layout; `None` for an empty buffer (a dangling, aligned pointer).
    layout: Option<Layout>,
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
            layout,
            active: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
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
    /// or the first registered span of another access that conflicts.
    pub(crate) fn try_register(&self, spans: &[Span]) -> std::result::Result<u64, Span> {
        let mut active = self.active();
        for s in spans {
            if let Some((_, held)) = active.iter().find(|(_, a)| a.conflicts(s)) {
                return Err(*held);
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
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `try_zeroed` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}
