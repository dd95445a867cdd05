//! The public surface of `Device`, `TransferStats`, `DType`, `AttentionConfig` and
//! `DeviceTensor`, exercised on `Device::Cpu` (and on GPUs only where that cannot fail).

use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use half::{bf16, f16};

use forge_attn::{
    AttentionConfig, AttentionError, DType, Device, DeviceTensor, HostElement, Layout,
    TransferStats,
};

mod common;
use common::cpu_f32;

/// The transfer counters are process-wide: tests that move data hold this lock so the
/// counts each one checks are its own.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn iota(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

// ---- Device -------------------------------------------------------------------------

#[test]
fn device_display() {
    assert_eq!(Device::Cpu.to_string(), "cpu");
    assert_eq!(Device::Cuda(0).to_string(), "cuda:0");
    assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    assert_eq!(Device::Hip(1).to_string(), "hip:1");
}

#[test]
fn device_from_str() {
    assert_eq!(Device::from_str("cpu"), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:2".parse::<Device>(), Ok(Device::Cuda(2)));
    assert_eq!("hip".parse::<Device>(), Ok(Device::Hip(0)));
    assert_eq!("hip:1".parse::<Device>(), Ok(Device::Hip(1)));
    assert_eq!("rocm:4".parse::<Device>(), Ok(Device::Hip(4)));
    assert_eq!("auto".parse::<Device>(), Ok(Device::best_available()));
    // Display round-trips.
    for d in [Device::Cpu, Device::Cuda(7), Device::Hip(2)] {
        assert_eq!(d.to_string().parse::<Device>(), Ok(d));
    }
    for bad in [
        "", "gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "hip:1:2", "tpu:0",
    ] {
        match bad.parse::<Device>() {
            Err(AttentionError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "device");
                assert!(reason.contains(&format!("{bad:?}")), "{reason}");
            }
            other => panic!("{bad:?} parsed as {other:?}"),
        }
    }
}

#[test]
fn device_availability_never_panics() {
    let best = Device::best_available();
    assert!(
        best.is_available(),
        "best_available returned unusable {best}"
    );
    assert!(Device::Cpu.is_available());
    assert!(!Device::Cuda(999).is_available());
    assert!(!Device::Hip(999).is_available());
    assert!(!Device::Cpu.is_gpu());
    assert!(Device::Cuda(0).is_gpu() && Device::Hip(0).is_gpu());
    // Probing GPUs that may not exist reports, never panics.
    let _ = Device::Cuda(0).is_available();
    let _ = Device::Hip(0).is_available();
}

#[test]
fn device_describe_and_synchronize() {
    assert!(Device::Cpu.describe().starts_with("cpu"));
    let missing = Device::Cuda(999).describe();
    assert!(
        missing.contains("cuda:999") && missing.contains("unavailable"),
        "{missing}"
    );
    assert!(Device::Hip(999).describe().contains("unavailable"));
    assert_eq!(Device::Cpu.synchronize(), Ok(()));
    assert!(matches!(
        Device::Cuda(999).synchronize(),
        Err(AttentionError::DeviceUnavailable { .. })
    ));
    let best = Device::best_available();
    assert_eq!(best.synchronize(), Ok(()));
    assert!(best.describe().starts_with(&best.to_string()));
}

#[test]
fn transfer_stats_count_calls_and_bytes() {
    let _guard = serial();
    let before = Device::Cpu.transfer_stats();

    let t = DeviceTensor::from_host(&iota(10), &[2, 5], Device::Cpu).unwrap();
    let s = Device::Cpu.transfer_stats().since(&before);
    assert_eq!(
        s,
        TransferStats {
            host_to_device_calls: 1,
            host_to_device_bytes: 40,
            device_to_host_calls: 0,
            device_to_host_bytes: 0,
        }
    );

    let _ = t.to_host::<f32>().unwrap();
    let h = DeviceTensor::from_f32(&iota(6), &[6], DType::F16, Device::Cpu).unwrap();
    let _ = h.to_f32_vec().unwrap();
    let s = Device::Cpu.transfer_stats().since(&before);
    assert_eq!(s.host_to_device_calls, 2);
    assert_eq!(s.host_to_device_bytes, 40 + 12);
    assert_eq!(s.device_to_host_calls, 2);
    assert_eq!(s.device_to_host_bytes, 40 + 12);
    assert_eq!(s.total_calls(), 4);

    // Allocation, views and device-side copies move nothing across the bus.
    let mark = Device::Cpu.transfer_stats();
    let mut z = DeviceTensor::zeros(&[2, 5], DType::F32, Device::Cpu).unwrap();
    z.copy_from(&t).unwrap();
    let _ = z.narrow(1, 1, 2).unwrap().permute(&[1, 0]).unwrap();
    assert_eq!(Device::Cpu.transfer_stats().since(&mark).total_calls(), 0);

    // Failed transfers are not counted.
    assert!(DeviceTensor::from_host(&iota(3), &[2, 2], Device::Cpu).is_err());
    assert!(t.to_host::<f16>().is_err());
    assert_eq!(Device::Cpu.transfer_stats().since(&mark).total_calls(), 0);

    // Ordinals beyond the tracked range read as zero.
    assert_eq!(
        Device::Cuda(10_000).transfer_stats(),
        TransferStats::default()
    );
}

#[test]
fn transfer_stats_arithmetic() {
    let a = TransferStats {
        host_to_device_calls: 5,
        host_to_device_bytes: 500,
        device_to_host_calls: 3,
        device_to_host_bytes: 30,
    };
    let b = TransferStats {
        host_to_device_calls: 2,
        host_to_device_bytes: 100,
        device_to_host_calls: 1,
        device_to_host_bytes: 10,
    };
    assert_eq!(a.total_calls(), 8);
    assert_eq!(
        a.since(&b),
        TransferStats {
            host_to_device_calls: 3,
            host_to_device_bytes: 400,
            device_to_host_calls: 2,
            device_to_host_bytes: 20,
        }
    );
    assert_eq!(a.since(&a), TransferStats::default());
    assert_eq!(TransferStats::default().total_calls(), 0);
}

// ---- DType --------------------------------------------------------------------------

#[test]
fn dtype_properties() {
    assert_eq!(DType::F32.size_in_bytes(), 4);
    assert_eq!(DType::F16.size_in_bytes(), 2);
    assert_eq!(DType::BF16.size_in_bytes(), 2);
    assert_eq!(DType::F32.name(), "f32");
    assert_eq!(DType::F16.name(), "f16");
    assert_eq!(DType::BF16.name(), "bf16");
    for d in [DType::F32, DType::F16, DType::BF16] {
        assert_eq!(d.to_string(), d.name());
    }
    assert_eq!(<f32 as HostElement>::DTYPE, DType::F32);
    assert_eq!(<f16 as HostElement>::DTYPE, DType::F16);
    assert_eq!(<bf16 as HostElement>::DTYPE, DType::BF16);
    assert_eq!(<f16 as HostElement>::from_f32(1.5).to_f32(), 1.5);
    assert_eq!(<bf16 as HostElement>::from_f32(-2.0).to_f32(), -2.0);
    assert_eq!(<f32 as HostElement>::from_f32(0.1).to_f32(), 0.1);
    // Rounding to the narrow types.
    assert_eq!(<f16 as HostElement>::from_f32(1.0 + 1e-4).to_f32(), 1.0);
    assert_eq!(<bf16 as HostElement>::from_f32(1.0 + 1e-3).to_f32(), 1.0);
}

// ---- AttentionConfig ----------------------------------------------------------------

#[test]
fn config_new_and_builders() {
    let c = AttentionConfig::new(512, 8, 1024);
    assert_eq!(
        (c.dim, c.num_heads, c.head_dim, c.max_sequence_length),
        (512, 8, 64, 1024)
    );
    assert!(!c.is_causal);
    assert_eq!(c.dropout, 0.0);
    assert_eq!(c.num_kv_heads, 8);
    assert_eq!(c.batch_size, 1);
    assert_eq!(c.scale, None);
    assert_eq!(c.layout, Layout::Bshd);
    assert_eq!(Layout::default(), Layout::Bshd);
    assert_eq!(c.validate(), Ok(()));
    // No division by zero heads.
    assert_eq!(AttentionConfig::new(64, 0, 8).head_dim, 0);

    let c = c
        .with_causal(true)
        .with_dropout(0.0)
        .with_head_dim(64)
        .with_num_kv_heads(2)
        .with_batch_size(3)
        .with_scale(0.25)
        .with_layout(Layout::Bhsd)
        .with_max_sequence_length(77);
    assert!(c.is_causal);
    assert_eq!(c.num_kv_heads, 2);
    assert_eq!(c.batch_size, 3);
    assert_eq!(c.scale, Some(0.25));
    assert_eq!(c.layout, Layout::Bhsd);
    assert_eq!(c.max_sequence_length, 77);
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.clone().with_dropout(0.5).dropout, 0.5);
    assert_eq!(c.clone().with_head_dim(32).head_dim, 32);
}

#[test]
fn config_scale_and_group_size() {
    let c = AttentionConfig::new(512, 8, 16);
    assert_eq!(c.effective_scale(), 0.125);
    assert_eq!(c.clone().with_scale(0.5).effective_scale(), 0.5);
    let c72 = AttentionConfig::new(8 * 72, 8, 16);
    assert!((c72.effective_scale() - 1.0 / 72f32.sqrt()).abs() < 1e-7);
    // head_dim 0 does not divide by zero.
    assert_eq!(AttentionConfig::new(0, 0, 1).effective_scale(), 1.0);

    assert_eq!(c.group_size(), 1);
    assert_eq!(c.clone().with_num_kv_heads(2).group_size(), 4);
    assert_eq!(c.clone().with_num_kv_heads(1).group_size(), 8);
    assert_eq!(c.clone().with_num_kv_heads(0).group_size(), 8);
}

fn invalid_field(c: &AttentionConfig) -> (&'static str, String) {
    match c.validate() {
        Err(AttentionError::InvalidConfig { field, reason }) => (field, reason),
        other => panic!("{c:?} validated as {other:?}"),
    }
}

#[test]
fn config_every_validation_error() {
    let ok = AttentionConfig::new(512, 8, 1024);
    let cases: Vec<(AttentionConfig, &str, &str)> = vec![
        (AttentionConfig::new(512, 0, 1024), "num_heads", "got 0"),
        (ok.clone().with_head_dim(0), "head_dim", "got 0"),
        (
            AttentionConfig {
                dim: 0,
                ..ok.clone()
            },
            "dim",
            "got 0",
        ),
        (ok.clone().with_num_kv_heads(0), "num_kv_heads", "got 0"),
        (ok.clone().with_batch_size(0), "batch_size", "got 0"),
        (
            ok.clone().with_max_sequence_length(0),
            "max_sequence_length",
            "got 0",
        ),
        (ok.clone().with_head_dim(48), "dim", "8 * 48 = 384, got 512"),
        (AttentionConfig::new(500, 8, 16), "dim", "got 500"),
        (ok.clone().with_num_kv_heads(3), "num_kv_heads", "(8)"),
        (ok.clone().with_num_kv_heads(16), "num_kv_heads", "(16)"),
        (ok.clone().with_dropout(0.1), "dropout", "got 0.1"),
        (ok.clone().with_dropout(-0.5), "dropout", "got -0.5"),
        (ok.clone().with_dropout(f32::NAN), "dropout", "NaN"),
        (ok.clone().with_scale(0.0), "scale", "got 0"),
        (ok.clone().with_scale(-1.0), "scale", "got -1"),
        (ok.clone().with_scale(f32::NAN), "scale", "NaN"),
        (ok.clone().with_scale(f32::INFINITY), "scale", "inf"),
        (ok.clone().with_scale(f32::MAX), "scale", "<= 65536"),
        (ok.clone().with_scale(65536.5), "scale", "got 65536.5"),
        (
            AttentionConfig::new(1 << 40, 1 << 40, 16).with_head_dim(1 << 40),
            "dim",
            "1099511627776 * 1099511627776 overflows usize",
        ),
    ];
    for (c, field, needle) in cases {
        let (got_field, reason) = invalid_field(&c);
        assert_eq!(got_field, field, "{c:?}: {reason}");
        assert!(
            reason.contains(needle),
            "{field}: {reason:?} lacks {needle:?}"
        );
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.starts_with("invalid config") && msg.contains(field),
            "{msg}"
        );
    }
    // Signed zero dropout is zero.
    assert_eq!(ok.with_dropout(-0.0).validate(), Ok(()));
}

// ---- DeviceTensor -------------------------------------------------------------------

#[test]
fn zeros_and_metadata() {
    let _guard = serial();
    let t = DeviceTensor::zeros(&[2, 3, 4], DType::F16, Device::Cpu).unwrap();
    assert_eq!(t.shape(), &[2, 3, 4]);
    assert_eq!(t.strides(), &[12, 4, 1]);
    assert_eq!(t.offset(), 0);
    assert_eq!(t.rank(), 3);
    assert_eq!(t.numel(), 24);
    assert_eq!(t.size_in_bytes(), 48);
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(t.device(), Device::Cpu);
    assert!(t.is_contiguous());
    assert!(t.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    let dbg = format!("{t:?}");
    assert!(
        dbg.contains("DeviceTensor") && dbg.contains("[2, 3, 4]"),
        "{dbg}"
    );

    let empty = DeviceTensor::zeros(&[0, 5], DType::F32, Device::Cpu).unwrap();
    assert_eq!((empty.numel(), empty.size_in_bytes()), (0, 0));
    assert!(empty.to_host::<f32>().unwrap().is_empty());

    assert!(matches!(
        DeviceTensor::zeros(&[1, 1, 1, 1, 1], DType::F32, Device::Cpu),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    // Sizes whose byte count overflows are errors, not panics or huge allocations.
    assert!(matches!(
        DeviceTensor::zeros(&[usize::MAX, 2], DType::F32, Device::Cpu),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        DeviceTensor::zeros(&[usize::MAX / 2, 1], DType::F32, Device::Cpu),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    // A missing GPU is an error.
    assert!(matches!(
        DeviceTensor::zeros(&[2], DType::F32, Device::Cuda(999)),
        Err(AttentionError::DeviceUnavailable { .. })
    ));
}

#[test]
fn from_host_every_element_type() {
    let _guard = serial();
    let t = cpu_f32(&iota(6), &[2, 3]);
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(t.to_host::<f32>().unwrap(), iota(6));

    let h: Vec<f16> = iota(6).into_iter().map(f16::from_f32).collect();
    let t = DeviceTensor::from_host(&h, &[3, 2], Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::F16);
    assert_eq!(t.to_host::<f16>().unwrap(), h);

    let b: Vec<bf16> = iota(6).into_iter().map(bf16::from_f32).collect();
    let t = DeviceTensor::from_host(&b, &[6], Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(t.to_host::<bf16>().unwrap(), b);

    match DeviceTensor::from_host(&iota(5), &[2, 3], Device::Cpu) {
        Err(AttentionError::ShapeMismatch { expected, got, .. }) => {
            assert!(expected.contains('6'), "{expected}");
            assert_eq!(got, "5");
        }
        other => panic!("{other:?}"),
    }
    assert!(DeviceTensor::from_host(&iota(7), &[2, 3], Device::Cpu).is_err());
    assert!(DeviceTensor::from_host(&iota(1), &[1, 1, 1, 1, 1], Device::Cpu).is_err());
}

#[test]
fn from_f32_rounds_to_each_dtype() {
    let _guard = serial();
    let values = [0.1f32, -1.3, 1e-3, 65504.0, 3.0e38, 0.0];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = DeviceTensor::from_f32(&values, &[2, 3], dtype, Device::Cpu).unwrap();
        assert_eq!(t.dtype(), dtype);
        assert_eq!(t.size_in_bytes(), 6 * dtype.size_in_bytes());
        let want: Vec<f32> = values
            .iter()
            .map(|&x| match dtype {
                DType::F32 => x,
                DType::F16 => f16::from_f32(x).to_f32(),
                DType::BF16 => bf16::from_f32(x).to_f32(),
                d => unimplemented!("dtype {d}"),
            })
            .collect();
        assert_eq!(t.to_f32_vec().unwrap(), want, "{dtype}");
        assert!(DeviceTensor::from_f32(&values, &[4], dtype, Device::Cpu).is_err());
    }
}

#[test]
fn to_host_checks_the_element_type() {
    let _guard = serial();
    let t = DeviceTensor::from_f32(&iota(4), &[4], DType::F16, Device::Cpu).unwrap();
    match t.to_host::<f32>() {
        Err(AttentionError::DTypeMismatch { expected, got, .. }) => {
            assert_eq!((expected.as_str(), got.as_str()), ("f16", "f32"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        t.to_host::<bf16>(),
        Err(AttentionError::DTypeMismatch { .. })
    ));
    assert!(t.to_host::<f16>().is_ok());
    assert_eq!(t.to_f32_vec().unwrap(), iota(4));
}

#[test]
fn narrow_views_share_storage() {
    let _guard = serial();
    let t = cpu_f32(&iota(24), &[2, 3, 4]);
    let v = t.narrow(1, 1, 2).unwrap();
    assert_eq!(v.shape(), &[2, 2, 4]);
    assert_eq!(v.strides(), t.strides());
    assert_eq!(v.offset(), 4);
    assert_eq!(v.numel(), 16);
    assert_eq!(v.size_in_bytes(), 64);
    assert!(!v.is_contiguous());
    assert!(v.shares_storage_with(&t) && t.shares_storage_with(&v));
    assert_eq!(
        v.to_f32_vec().unwrap(),
        [4., 5., 6., 7., 8., 9., 10., 11., 16., 17., 18., 19., 20., 21., 22., 23.]
    );
    // Narrowing the outermost dimension keeps it contiguous; views of views compose.
    let outer = t.narrow(0, 1, 1).unwrap();
    assert!(outer.is_contiguous());
    assert_eq!(outer.offset(), 12);
    let inner = outer.narrow(2, 3, 1).unwrap();
    assert_eq!(inner.offset(), 15);
    assert_eq!(inner.to_f32_vec().unwrap(), [15., 19., 23.]);
    assert_eq!(t.narrow(2, 4, 0).unwrap().numel(), 0);

    for (dim, start, len) in [(3, 0, 1), (1, 2, 2), (2, 0, 5), (0, usize::MAX, 2)] {
        assert!(
            matches!(
                t.narrow(dim, start, len),
                Err(AttentionError::ShapeMismatch { .. })
            ),
            "narrow({dim}, {start}, {len})"
        );
    }
}

#[test]
fn reshape_needs_contiguity() {
    let _guard = serial();
    let t = cpu_f32(&iota(24), &[2, 3, 4]);
    let r = t.reshape(&[4, 6]).unwrap();
    assert_eq!(r.shape(), &[4, 6]);
    assert_eq!(r.strides(), &[6, 1]);
    assert!(r.shares_storage_with(&t));
    assert_eq!(r.to_f32_vec().unwrap(), iota(24));
    // A contiguous view with an offset reshapes too.
    let tail = t.narrow(0, 1, 1).unwrap().reshape(&[12]).unwrap();
    assert_eq!(
        tail.to_f32_vec().unwrap(),
        (12..24).map(|i| i as f32).collect::<Vec<_>>()
    );

    assert!(matches!(
        t.reshape(&[5, 5]),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        t.reshape(&[1, 2, 3, 2, 2]),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        t.permute(&[0, 2, 1]).unwrap().reshape(&[24]),
        Err(AttentionError::UnsupportedLayout { .. })
    ));
    assert!(matches!(
        t.narrow(2, 0, 2).unwrap().reshape(&[12]),
        Err(AttentionError::UnsupportedLayout { .. })
    ));
}

#[test]
fn permute_reorders_dimensions() {
    let _guard = serial();
    let t = cpu_f32(&iota(6), &[2, 3]);
    let p = t.permute(&[1, 0]).unwrap();
    assert_eq!(p.shape(), &[3, 2]);
    assert_eq!(p.strides(), &[1, 3]);
    assert!(!p.is_contiguous());
    assert!(p.shares_storage_with(&t));
    assert_eq!(p.to_f32_vec().unwrap(), [0., 3., 1., 4., 2., 5.]);
    assert!(t.permute(&[0, 1]).unwrap().is_contiguous());

    let t4 = cpu_f32(&iota(24), &[1, 2, 3, 4]);
    let p4 = t4.permute(&[0, 2, 1, 3]).unwrap();
    assert_eq!(p4.shape(), &[1, 3, 2, 4]);
    assert_eq!(p4.strides(), &[24, 4, 12, 1]);
    assert_eq!(
        p4.permute(&[0, 2, 1, 3]).unwrap().to_f32_vec().unwrap(),
        iota(24)
    );

    for bad in [&[0][..], &[0, 0], &[1, 2], &[0, 1, 2], &[]] {
        assert!(
            matches!(t.permute(bad), Err(AttentionError::ShapeMismatch { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn contiguity_rules() {
    let t = DeviceTensor::zeros(&[2, 1, 3], DType::F32, Device::Cpu).unwrap();
    assert!(t.is_contiguous());
    // Size-1 dimensions may carry any stride.
    assert!(t.permute(&[1, 0, 2]).unwrap().is_contiguous());
    assert!(!t.permute(&[2, 1, 0]).unwrap().is_contiguous());
    assert!(t.narrow(0, 1, 1).unwrap().is_contiguous());
    assert!(!t.narrow(2, 0, 2).unwrap().is_contiguous());
}

#[test]
fn shares_storage() {
    let a = DeviceTensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
    let b = DeviceTensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
    assert!(a.shares_storage_with(&a.clone()));
    assert!(a.shares_storage_with(&a.narrow(0, 2, 2).unwrap()));
    assert!(!a.shares_storage_with(&b));
}

#[test]
fn copy_from_into_views() {
    let _guard = serial();
    // Views write through to the tensor they were taken from.
    let dst = DeviceTensor::zeros(&[4, 3], DType::F32, Device::Cpu).unwrap();
    let src = cpu_f32(&[1., 2., 3., 4., 5., 6.], &[2, 3]);
    let mut rows = dst.narrow(0, 1, 2).unwrap();
    rows.copy_from(&src).unwrap();
    assert_eq!(
        dst.to_f32_vec().unwrap(),
        [0., 0., 0., 1., 2., 3., 4., 5., 6., 0., 0., 0.]
    );

    // Strided source into a strided destination column.
    assert!(
        dst.narrow(1, 2, 1).unwrap().reshape(&[4]).is_err(),
        "a column view is not contiguous"
    );
    let mut col = dst.narrow(1, 2, 1).unwrap();
    let src_col = cpu_f32(&iota(8), &[2, 4])
        .narrow(0, 1, 1)
        .unwrap()
        .permute(&[1, 0])
        .unwrap();
    col.copy_from(&src_col).unwrap();
    assert_eq!(
        dst.to_f32_vec().unwrap(),
        [0., 0., 4., 1., 2., 5., 4., 5., 6., 0., 0., 7.]
    );

    // Whole-tensor copies of every dtype.
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let s = DeviceTensor::from_f32(&iota(6), &[3, 2], dtype, Device::Cpu).unwrap();
        let mut d = DeviceTensor::zeros(&[3, 2], dtype, Device::Cpu).unwrap();
        d.copy_from(&s).unwrap();
        assert_eq!(d.to_f32_vec().unwrap(), iota(6));
    }

    let mut d = DeviceTensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(
        d.copy_from(&cpu_f32(&iota(6), &[3, 2])),
        Err(AttentionError::ShapeMismatch { .. })
    ));
    let half = DeviceTensor::from_f32(&iota(6), &[2, 3], DType::F16, Device::Cpu).unwrap();
    assert!(matches!(
        d.copy_from(&half),
        Err(AttentionError::DTypeMismatch { .. })
    ));
    assert!(d.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn gpu_tensors_when_present() {
    let _guard = serial();
    let gpu = Device::best_available();
    if !gpu.is_gpu() {
        return;
    }
    let t = DeviceTensor::from_f32(&iota(12), &[3, 4], DType::F32, gpu).unwrap();
    assert_eq!(t.device(), gpu);
    assert_eq!(
        t.permute(&[1, 0]).unwrap().to_f32_vec().unwrap()[..3],
        [0., 4., 8.]
    );
    let mut c = DeviceTensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap();
    assert!(matches!(
        c.copy_from(&t),
        Err(AttentionError::DeviceMismatch { .. })
    ));
}
