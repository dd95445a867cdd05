//! [`merge_states`](crate::merge_states) on the host: two partial attention
//! results combined row by row by their log-sum-exps, in f64.

use half::{bf16, f16};

use crate::config::Layout;
use crate::device::Device;
use crate::dtype::{DType, HostElement};
use crate::error::{AttentionError, Result};
use crate::options::check_lse;
use crate::problem::refuse_non_float;
use crate::tensor::{DeviceTensor, HostAccess};

/// `[batch, seq, heads, head_dim]` dims and the strides along them of an output tensor.
fn dims(what: &str, t: &DeviceTensor, layout: Layout) -> Result<([usize; 4], [usize; 4])> {
    if t.rank() != 4 {
        return Err(AttentionError::shape(
            what,
            "rank 4",
            format!("{:?}", t.shape()),
        ));
    }
    let (sh, st) = (t.shape(), t.strides());
    let (s, h) = match layout {
        Layout::Bshd => (1, 2),
        Layout::Bhsd => (2, 1),
    };
    Ok(([sh[0], sh[s], sh[h], sh[3]], [st[0], st[s], st[h], st[3]]))
}

/// Checks every operand, then merges on the host (refuses GPU tensors: no kernel yet).
pub(crate) fn check_and_merge(
    layout: Layout,
    out_a: &mut DeviceTensor,
    lse_a: &mut DeviceTensor,
    out_b: &DeviceTensor,
    lse_b: &DeviceTensor,
) -> Result<()> {
    refuse_non_float(&[("out_a", out_a), ("out_b", out_b)])?;
    let (da, sa) = dims("out_a", out_a, layout)?;
    let (db, sb) = dims("out_b", out_b, layout)?;
    if db != da {
        return Err(AttentionError::shape(
            "out_b (as [batch, seq, heads, head_dim])",
            format!("{da:?} (as out_a)"),
            format!("{db:?}"),
        ));
    }
    if out_b.dtype() != out_a.dtype() {
        return Err(AttentionError::DTypeMismatch {
            what: "out_b".into(),
            expected: out_a.dtype().to_string(),
            got: out_b.dtype().to_string(),
        });
    }
    let device = out_a.device();
    if out_b.device() != device {
        return Err(AttentionError::DeviceMismatch {
            what: "out_b".into(),
            expected: device.to_string(),
            got: out_b.device().to_string(),
        });
    }
    let [b, s, h, d] = da;
    if !out_a.has_distinct_elements() {
        return Err(AttentionError::UnsupportedLayout {
            what: "out_a".into(),
            reason: format!(
                "strides {:?} for shape {:?} map several elements to one address",
                out_a.strides(),
                out_a.shape()
            ),
        });
    }
    if out_a.may_overlap(out_b) || out_a.may_overlap(lse_b) {
        return Err(AttentionError::UnsupportedLayout {
            what: "out_a".into(),
            reason: "overlaps out_b or lse_b; give it its own memory".into(),
        });
    }
    // lse_b is read only: the shape, dtype and device checks of an lse output suffice.
    let st_b = check_lse(lse_b, b, h, s, device, &[]).map_err(|e| rename(e, "lse", "lse_b"))?;
    let st_a = check_lse(lse_a, b, h, s, device, &[&*out_a, out_b, lse_b])
        .map_err(|e| rename(e, "lse", "lse_a"))?;
    if device != Device::Cpu {
        return Err(AttentionError::NotSupported {
            backend: device.to_string(),
            reason: "merge_states runs on the CPU only for now (no GPU kernel yet)".into(),
        });
    }
    let _access = HostAccess::acquire(&[out_b, lse_b], &[&*out_a, &*lse_a])?;
    let host = |t: &DeviceTensor| {
        t.host_ptr().ok_or_else(|| AttentionError::DeviceMismatch {
            what: "merge_states operand".into(),
            expected: Device::Cpu.to_string(),
            got: t.device().to_string(),
        })
    };
    let ptrs = Ptrs {
        oa: host(out_a)?,
        ob: host(out_b)? as *const u8,
        la: host(lse_a)? as *mut f32,
        lb: host(lse_b)? as *const f32,
    };
    let lse_st = [
        [st_a.batch, st_a.head, st_a.query],
        [st_b.batch, st_b.head, st_b.query],
    ];
    let shape = [b, s, h, d];
    // SAFETY: every view was checked against the shape above and lies in its buffer;
    // `out_a` and `lse_a` have distinct elements and overlap no input; `_access` keeps
    // other threads off them.
    unsafe {
        match out_a.dtype() {
            DType::F32 => merge::<f32>(ptrs, shape, [sa, sb], lse_st),
            DType::F16 => merge::<f16>(ptrs, shape, [sa, sb], lse_st),
            DType::BF16 => merge::<bf16>(ptrs, shape, [sa, sb], lse_st),
            d @ (DType::I32 | DType::U32 | DType::I64) => return d.check_attention("out_a"),
        }
    }
    Ok(())
}

/// `e` with the tensor it names changed from `from` to `to`.
fn rename(e: AttentionError, from: &str, to: &str) -> AttentionError {
    use AttentionError as E;
    match e {
        E::ShapeMismatch {
            what,
            expected,
            got,
        } if what == from => E::ShapeMismatch {
            what: to.into(),
            expected,
            got,
        },
        E::DTypeMismatch {
            what,
            expected,
            got,
        } if what == from => E::DTypeMismatch {
            what: to.into(),
            expected,
            got,
        },
        E::DeviceMismatch {
            what,
            expected,
            got,
        } if what == from => E::DeviceMismatch {
            what: to.into(),
            expected,
            got,
        },
        E::UnsupportedLayout { what, reason } if what == from => E::UnsupportedLayout {
            what: to.into(),
            reason,
        },
        e => e,
    }
}

#[derive(Clone, Copy)]
struct Ptrs {
    oa: *mut u8,
    ob: *const u8,
    la: *mut f32,
    lb: *const f32,
}

/// The merge of one pair of rows' statistics: the weights of a and b and the merged
/// log-sum-exp, in f64.
pub(crate) fn merge_weights(la: f64, lb: f64) -> (f64, f64, f64) {
    if la.is_nan() || lb.is_nan() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let m = la.max(lb);
    if m == f64::NEG_INFINITY {
        // Neither side kept a key: zeros stay zeros.
        return (0.0, 0.0, f64::NEG_INFINITY);
    }
    let (wa, wb) = ((la - m).exp(), (lb - m).exp());
    let sum = wa + wb;
    (wa / sum, wb / sum, m + sum.ln())
}

/// # Safety
/// See the call site in [`check_and_merge`].
unsafe fn merge<T: HostElement>(
    p: Ptrs,
    [b, s, h, d]: [usize; 4],
    [sa, sb]: [[usize; 4]; 2],
    [lsa, lsb]: [[usize; 3]; 2],
) {
    let (oa, ob) = (p.oa as *mut T, p.ob as *const T);
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                // SAFETY: indices inside the checked shapes.
                unsafe {
                    let la = p.la.add(bi * lsa[0] + hi * lsa[1] + si * lsa[2]);
                    let lb = *p.lb.add(bi * lsb[0] + hi * lsb[1] + si * lsb[2]);
                    let (wa, wb, l) = merge_weights(*la as f64, lb as f64);
                    let ra = oa.add(bi * sa[0] + si * sa[1] + hi * sa[2]);
                    let rb = ob.add(bi * sb[0] + si * sb[1] + hi * sb[2]);
                    for x in 0..d {
                        let xa = ra.add(x * sa[3]);
                        // A side of weight 0 is left out, not multiplied (its row is
                        // zeros by contract; 0 * garbage could be NaN).
                        let mut v = 0.0f64;
                        if wa != 0.0 {
                            v += wa * (*xa).to_f32() as f64;
                        }
                        if wb != 0.0 {
                            v += wb * (*rb.add(x * sb[3])).to_f32() as f64;
                        }
                        if wa.is_nan() {
                            v = f64::NAN;
                        }
                        *xa = T::from_f32(v as f32);
                    }
                    *la = l as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::merge_weights;

    #[test]
    fn weights_of_empty_nan_and_equal_sides() {
        assert_eq!(
            merge_weights(f64::NEG_INFINITY, f64::NEG_INFINITY),
            (0.0, 0.0, f64::NEG_INFINITY)
        );
        assert_eq!(merge_weights(f64::NEG_INFINITY, 2.0), (0.0, 1.0, 2.0));
        let (wa, wb, l) = merge_weights(1.0, 1.0);
        assert_eq!((wa, wb), (0.5, 0.5));
        assert!((l - (1.0 + 2f64.ln())).abs() < 1e-15);
        assert!(merge_weights(f64::NAN, 0.0).2.is_nan());
    }
}
