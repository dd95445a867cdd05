//! The loaded functions of the catalog's fixed kernels ([`KernelId`]), one slot per id, read
//! without a lock or a hash: the launch path of a decode call looks its kernels up here.
//! A miss (first use, or more shared memory than the slot was made ready for) goes through
//! the driver's own loading path once and fills the slot.

// Built with neither `cuda` nor `rocm`, no driver fills a table.
#![cfg_attr(not(any(feature = "cuda", feature = "rocm")), allow(dead_code))]

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::kernels::KernelId;

/// One id's function handle (null until loaded) and the most dynamic shared memory it was
/// made ready for.
#[derive(Default)]
struct Slot {
    func: AtomicPtr<c_void>,
    shared_bytes: AtomicU32,
}

/// A function handle per [`KernelId`] of one context (CUDA) or device (HIP), shared by
/// every stream of it. Handles are stored untyped: both vendors' function handles are
/// pointers.
pub(crate) struct KernelTable {
    slots: Box<[Slot]>,
}

impl Default for KernelTable {
    fn default() -> Self {
        KernelTable {
            slots: (0..KernelId::COUNT).map(|_| Slot::default()).collect(),
        }
    }
}

impl KernelTable {
    /// The function of `id` if it is loaded and ready for `shared_bytes`.
    #[inline]
    pub fn get(&self, id: KernelId, shared_bytes: u32) -> Option<*mut c_void> {
        let slot = self.slots.get(id.index())?;
        let func = slot.func.load(Ordering::Acquire);
        // The shared-memory limit only grows, and is stored after the driver raised it.
        (!func.is_null() && shared_bytes <= slot.shared_bytes.load(Ordering::Acquire))
            .then_some(func)
    }

    /// Records `func` as `id`'s function, ready for `shared_bytes` (the driver has loaded
    /// it and raised its limit that far).
    pub fn store(&self, id: KernelId, func: *mut c_void, shared_bytes: u32) {
        if let Some(slot) = self.slots.get(id.index()) {
            slot.func.store(func, Ordering::Release);
            slot.shared_bytes.fetch_max(shared_bytes, Ordering::AcqRel);
        }
    }

    /// [`get`](Self::get), else `load` (the driver's path by spec, which loads the function
    /// and opts it into `shared_bytes`) and [`store`](Self::store).
    #[inline]
    pub fn get_or_load<F>(
        &self,
        id: KernelId,
        shared_bytes: u32,
        load: impl FnOnce() -> crate::error::Result<*mut F>,
    ) -> crate::error::Result<*mut F> {
        if let Some(f) = self.get(id, shared_bytes) {
            return Ok(f.cast());
        }
        let f = load()?;
        self.store(id, f.cast(), shared_bytes);
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn a_slot_answers_once_stored_and_only_within_its_shared_memory() {
        let t = KernelTable::default();
        let id = KernelId::decode(DType::BF16, 128, false).unwrap();
        let other = KernelId::decode_combine(DType::BF16, 128, false).unwrap();
        assert_eq!(t.get(id, 0), None);
        let f = 0x1000 as *mut c_void;
        t.store(id, f, 4096);
        assert_eq!(t.get(id, 0), Some(f));
        assert_eq!(t.get(id, 4096), Some(f));
        assert_eq!(t.get(id, 4097), None);
        assert_eq!(t.get(other, 0), None);
        // A later, smaller store keeps the larger limit.
        t.store(id, f, 1024);
        assert_eq!(t.get(id, 4096), Some(f));
        // Every id has a slot of its own.
        for id in KernelId::all() {
            t.store(id, (0x10 * (id.index() + 1)) as *mut c_void, 0);
        }
        for id in KernelId::all() {
            assert_eq!(t.get(id, 0), Some((0x10 * (id.index() + 1)) as *mut c_void));
        }
    }

    #[test]
    fn a_miss_loads_once_then_reads_the_slot() {
        let t = KernelTable::default();
        let id = KernelId::kv_append(2).unwrap();
        let mut loads = 0;
        for _ in 0..3 {
            let f = t
                .get_or_load(id, 100, || {
                    loads += 1;
                    Ok(0x2000 as *mut u8)
                })
                .unwrap();
            assert_eq!(f, 0x2000 as *mut u8);
        }
        assert_eq!(loads, 1);
        // More shared memory: through the loader again (it raises the limit).
        t.get_or_load(id, 200, || {
            loads += 1;
            Ok(0x2000 as *mut u8)
        })
        .unwrap();
        assert_eq!(loads, 2);
        // A failed load leaves the slot as it was.
        let failed = t.get_or_load(KernelId::fill(4).unwrap(), 0, || {
            Err::<*mut u8, _>(crate::error::AttentionError::NotSupported {
                backend: "test".into(),
                reason: "no".into(),
            })
        });
        assert!(failed.is_err());
        assert_eq!(t.get(KernelId::fill(4).unwrap(), 0), None);
    }
}
