//! Grid limits, and the slicing of batches and heads past them into several launches.
//!
//! The flash and decode kernels take one sequence per grid z index and one head (query head
//! for prefill, KV head for decode) per grid y index; both axes stop at 65535 on CUDA and
//! HIP. A call with more sequences or heads runs as several launches over slices of the
//! batch and heads, each seeing its slice as a whole problem through offset base pointers,
//! so the kernels keep their indexing and every slice is queued on the same stream.

/// Largest grid y and z dimension (CUDA and HIP).
pub(crate) const MAX_GRID_YZ: usize = 65535;
/// Largest grid x dimension.
pub(crate) const MAX_GRID_X: usize = i32::MAX as usize;

/// Which heads a kernel puts on grid y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadAxis {
    /// One query head per y index (the prefill flash kernels).
    Query,
    /// One KV head per y index, serving its whole group (the decode kernel).
    Kv,
}

/// One launch's share of a call: sequences `batch0 .. batch0 + batch`, query heads
/// `head0 .. head0 + heads` and the KV heads `kv_head0 .. kv_head0 + kv_heads` they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slice {
    pub batch0: usize,
    pub batch: usize,
    pub head0: usize,
    pub heads: usize,
    pub kv_head0: usize,
    pub kv_heads: usize,
}

impl Slice {
    /// Whether this slice is the whole call (the common case: one launch).
    pub fn is_whole(&self, batch: usize, num_heads: usize) -> bool {
        self.batch0 == 0 && self.head0 == 0 && self.batch == batch && self.heads == num_heads
    }
}

/// Calls `f` for each slice of `batch` sequences x `num_heads` query heads (grouped over
/// `num_kv_heads`) such that no slice has more than [`MAX_GRID_YZ`] sequences or heads on
/// `axis`. A slice's query heads always map onto its KV heads by `h / (heads / kv_heads)`:
/// when one KV head's group alone is too large for grid y, it is cut into pieces that each
/// read that one KV head. Stops at the first error.
pub(crate) fn for_each_slice<E>(
    batch: usize,
    num_heads: usize,
    num_kv_heads: usize,
    axis: HeadAxis,
    mut f: impl FnMut(Slice) -> Result<(), E>,
) -> Result<(), E> {
    let group = (num_heads / num_kv_heads.max(1)).max(1);
    let mut b0 = 0;
    while b0 < batch {
        let nb = (batch - b0).min(MAX_GRID_YZ);
        let head_slice = |kv_head0: usize, kv_heads: usize, head0: usize, heads: usize| Slice {
            batch0: b0,
            batch: nb,
            head0,
            heads,
            kv_head0,
            kv_heads,
        };
        match axis {
            HeadAxis::Kv => {
                let mut kv0 = 0;
                while kv0 < num_kv_heads {
                    let nkv = (num_kv_heads - kv0).min(MAX_GRID_YZ);
                    f(head_slice(kv0, nkv, kv0 * group, nkv * group))?;
                    kv0 += nkv;
                }
            }
            HeadAxis::Query if group <= MAX_GRID_YZ => {
                let per = (MAX_GRID_YZ / group).max(1);
                let mut kv0 = 0;
                while kv0 < num_kv_heads {
                    let nkv = (num_kv_heads - kv0).min(per);
                    f(head_slice(kv0, nkv, kv0 * group, nkv * group))?;
                    kv0 += nkv;
                }
            }
            HeadAxis::Query => {
                for kv in 0..num_kv_heads {
                    let mut off = 0;
                    while off < group {
                        let n = (group - off).min(MAX_GRID_YZ);
                        f(head_slice(kv, 1, kv * group + off, n))?;
                        off += n;
                    }
                }
            }
        }
        b0 += nb;
    }
    Ok(())
}

/// `base` advanced by `elems` elements of `elem_bytes` each (device addresses).
pub(crate) fn offset_ptr(base: u64, elems: usize, elem_bytes: usize) -> u64 {
    if base == 0 {
        return 0;
    }
    base.wrapping_add((elems as u64).wrapping_mul(elem_bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(b: usize, h: usize, hkv: usize, axis: HeadAxis) -> Vec<Slice> {
        let mut v = Vec::new();
        for_each_slice::<()>(b, h, hkv, axis, |s| {
            v.push(s);
            Ok(())
        })
        .unwrap();
        v
    }

    /// Every (sequence, query head) exactly once, each slice within the limits and with a
    /// head -> KV head map that agrees with the whole call's.
    fn check_cover(b: usize, h: usize, hkv: usize, axis: HeadAxis) {
        let slices = collect(b, h, hkv, axis);
        let group = h / hkv;
        let mut seen = std::collections::HashSet::new();
        for s in &slices {
            assert!(s.batch <= MAX_GRID_YZ && s.batch > 0);
            let y = match axis {
                HeadAxis::Query => s.heads,
                HeadAxis::Kv => s.kv_heads,
            };
            assert!(y <= MAX_GRID_YZ && y > 0, "{s:?}");
            assert_eq!(s.heads % s.kv_heads, 0);
            let g = s.heads / s.kv_heads;
            for hh in 0..s.heads {
                let global = s.head0 + hh;
                assert_eq!(s.kv_head0 + hh / g, global / group, "{s:?}");
            }
            for bb in s.batch0..s.batch0 + s.batch {
                for hh in s.head0..s.head0 + s.heads {
                    assert!(seen.insert((bb, hh)), "({bb}, {hh}) twice");
                }
            }
        }
        assert_eq!(seen.len(), b * h);
    }

    #[test]
    fn small_calls_are_one_slice() {
        let s = collect(2048, 32, 8, HeadAxis::Query);
        assert_eq!(s.len(), 1);
        assert!(s[0].is_whole(2048, 32));
        assert_eq!(collect(4096, 64, 8, HeadAxis::Kv).len(), 1);
    }

    #[test]
    fn large_batches_and_heads_are_covered_exactly_once() {
        check_cover(70_000, 2, 1, HeadAxis::Query);
        check_cover(70_000, 2, 2, HeadAxis::Kv);
        check_cover(3, 70_000, 7, HeadAxis::Query);
        check_cover(2, 140_000, 2, HeadAxis::Query);
        check_cover(1, 70_000, 1, HeadAxis::Query);
        check_cover(1, 70_000, 70_000, HeadAxis::Kv);
        check_cover(1, 131_072, 65_536, HeadAxis::Query);
    }

    #[test]
    fn offsets_keep_null_null() {
        assert_eq!(offset_ptr(0, 10, 4), 0);
        assert_eq!(offset_ptr(256, 10, 2), 276);
    }
}
