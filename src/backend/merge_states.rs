//! Merging partial attention results by their log-sum-exps, on whichever device they are.

use crate::config::Layout;
use crate::error::Result;
use crate::tensor::DeviceTensor;

/// Merges two partial attention results over disjoint key sets of the same queries into
/// the first, in place, by their log-sum-exps: with `m = max(lse_a, lse_b)`,
/// `w_a = exp(lse_a - m)`, `w_b = exp(lse_b - m)`,
/// `out_a = (w_a out_a + w_b out_b) / (w_a + w_b)` and `lse_a = m + ln(w_a + w_b)`. A row
/// whose two log-sum-exps are `-inf` (no key on either side) stays zeros with `-inf`; a NaN
/// stays NaN.
///
/// `out_a` and `out_b` are `[B, Sq, H, D]` (or `[B, H, Sq, D]` with [`Layout::Bhsd`]), of
/// one float dtype; `lse_a` and `lse_b` f32 `[B, H, Sq]`; all on one device, `out_a` and
/// `lse_a` each with distinct elements and overlapping nothing else. Runs on the CPU; on a
/// GPU it is refused with [`AttentionError::NotSupported`] (no kernel yet). Refused calls
/// change nothing.
pub fn merge_states(
    layout: Layout,
    out_a: &mut DeviceTensor,
    lse_a: &mut DeviceTensor,
    out_b: &DeviceTensor,
    lse_b: &DeviceTensor,
) -> Result<()> {
    crate::backend::cpu::merge::check_and_merge(layout, out_a, lse_a, out_b, lse_b)
}
