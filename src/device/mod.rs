//! Devices, their runtimes, and the host<->device transfer counters.
//!
//! A [`Device`] is a plain value; the runtime behind a GPU device (context, stream,
//! loaded modules) is created on first use and shared by every tensor on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{AttentionError, Result};

pub use graph::DeviceGraph;
/// The status code of a failed HIP call, found as the `source()` of the error reporting
/// it.
#[cfg(feature = "rocm")]
pub use hip::HipError;
pub use stream::GpuStream;

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod driver;
pub(crate) mod gpu;
mod graph;
#[cfg(feature = "rocm")]
pub(crate) mod hip;
#[cfg(feature = "rocm")]
mod hip_sys;
mod kernel_table;
pub(crate) mod launch;
mod stream;
pub(crate) mod tensor_map;

/// The lifetime of memory lent to forge-attn for a borrow: ended by the guard that lent it,
/// after which every tensor made from that memory refuses to be used.
#[derive(Debug, Default)]
pub(crate) struct Lease {
    ended: AtomicBool,
}

impl Lease {
    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::Release);
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

/// Where a tensor lives and where attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory; attention runs on the CPU backend.
    Cpu,
    /// NVIDIA GPU by ordinal (feature `cuda`).
    Cuda(usize),
    /// AMD GPU by ordinal (feature `rocm`).
    Hip(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Hip(n) => write!(f, "hip:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = AttentionError;

    /// Parses `cpu`, `cuda`, `cuda:N`, `hip`, `hip:N` (`rocm` and `rocm:N` also name HIP
    /// devices) and `auto` ([`Device::best_available`]); the inverse of `Display`. `N` is
    /// decimal digits only. Anything else is [`AttentionError::InvalidConfig`] with field
    /// `device` and a reason quoting the given string.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || AttentionError::InvalidConfig {
            field: "device",
            reason: format!("expected cpu, cuda[:N], hip[:N] or auto, got {s:?}"),
        };
        let (kind, ord) = match s.split_once(':') {
            // `usize::from_str` takes a leading `+`; an ordinal is plain digits.
            Some((k, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                (k, Some(n.parse::<usize>().map_err(|_| bad())?))
            }
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        match (kind, ord) {
            ("cpu", None) => Ok(Device::Cpu),
            ("cuda", n) => Ok(Device::Cuda(n.unwrap_or(0))),
            ("hip" | "rocm", n) => Ok(Device::Hip(n.unwrap_or(0))),
            ("auto", None) => Ok(Device::best_available()),
            _ => Err(bad()),
        }
    }
}

/// Host<->device traffic through one device since process start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferStats {
    /// Host-to-device copies.
    pub host_to_device_calls: u64,
    /// Bytes copied host to device.
    pub host_to_device_bytes: u64,
    /// Device-to-host copies.
    pub device_to_host_calls: u64,
    /// Bytes copied device to host.
    pub device_to_host_bytes: u64,
}

impl TransferStats {
    /// Total calls in both directions (saturating at `u64::MAX`).
    pub fn total_calls(&self) -> u64 {
        self.host_to_device_calls
            .saturating_add(self.device_to_host_calls)
    }

    /// The traffic between an earlier reading and this one. Each field saturates at 0:
    /// if `earlier` is not earlier (the arguments swapped, or readings of two devices),
    /// a count that would go negative reads 0 instead of wrapping to a huge number.
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            host_to_device_calls: self
                .host_to_device_calls
                .saturating_sub(earlier.host_to_device_calls),
            host_to_device_bytes: self
                .host_to_device_bytes
                .saturating_sub(earlier.host_to_device_bytes),
            device_to_host_calls: self
                .device_to_host_calls
                .saturating_sub(earlier.device_to_host_calls),
            device_to_host_bytes: self
                .device_to_host_bytes
                .saturating_sub(earlier.device_to_host_bytes),
        }
    }
}

const MAX_ORDINALS: usize = 16;
const SLOTS: usize = 1 + 2 * MAX_ORDINALS;

struct Counter {
    h2d_calls: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_calls: AtomicU64,
    d2h_bytes: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const COUNTER: Counter = Counter {
    h2d_calls: AtomicU64::new(0),
    h2d_bytes: AtomicU64::new(0),
    d2h_calls: AtomicU64::new(0),
    d2h_bytes: AtomicU64::new(0),
};
static COUNTERS: [Counter; SLOTS] = [COUNTER; SLOTS];

fn gpu_unavailable(device: Device, reason: String) -> AttentionError {
    AttentionError::DeviceUnavailable {
        device: device.to_string(),
        reason,
        source: None,
    }
}

/// The reason a device of a runtime left out of this build cannot be used.
#[cfg(not(all(feature = "cuda", feature = "rocm")))]
fn built_without(device: Device, feature: &str) -> AttentionError {
    gpu_unavailable(device, format!("built without the `{feature}` feature"))
}

/// Whether the CUDA driver reports a device, and if not, the step that failed.
fn probe_cuda() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use std::sync::OnceLock;
        static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        PROBE
            .get_or_init(cuda_driver_state)
            .clone()
            .map_err(|reason| gpu_unavailable(Device::Cuda(0), reason))
    }
    #[cfg(not(feature = "cuda"))]
    Err(built_without(Device::Cuda(0), "cuda"))
}

/// The steps `cuda::device_count` takes, each failure named: the driver library loads,
/// `cuInit` succeeds, at least one device is counted.
#[cfg(feature = "cuda")]
fn cuda_driver_state() -> std::result::Result<(), String> {
    use cudarc::driver::result::{self, DriverError};
    use cudarc::driver::sys;
    let name = |e: DriverError| {
        e.error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0))
    };
    if !crate::cuda_probe::driver_present() {
        return Err(format!(
            "CUDA driver library {} not found",
            crate::cuda_probe::driver_name()
        ));
    }
    match result::init() {
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            return Err(
                "CUDA driver found but no CUDA device (cuInit: CUDA_ERROR_NO_DEVICE)".into(),
            )
        }
        Err(e) => return Err(format!("CUDA driver found but cuInit failed: {}", name(e))),
        Ok(()) => {}
    }
    match result::device::get_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err("CUDA driver found but it reports no CUDA device".into()),
        Err(e) => Err(format!(
            "CUDA driver found but cuDeviceGetCount failed: {}",
            name(e)
        )),
    }
}

/// Whether the HIP runtime reports a device.
fn probe_hip() -> Result<()> {
    #[cfg(feature = "rocm")]
    {
        if hip::device_count() > 0 {
            return Ok(());
        }
        Err(gpu_unavailable(
            Device::Hip(0),
            "HIP runtime found no AMD GPU (hipGetDeviceCount reported none or failed)".into(),
        ))
    }
    #[cfg(not(feature = "rocm"))]
    Err(built_without(Device::Hip(0), "rocm"))
}

impl Device {
    /// The first usable GPU (CUDA, then HIP), else [`Device::Cpu`]. Never panics, also
    /// when no driver is installed. [`Device::best_available_with_reason`] also says why
    /// no GPU was chosen.
    pub fn best_available() -> Device {
        if probe_cuda().is_ok() {
            return Device::Cuda(0);
        }
        if probe_hip().is_ok() {
            return Device::Hip(0);
        }
        Device::Cpu
    }

    /// Like [`Device::best_available`], and when that is the CPU, why no GPU was chosen:
    /// one reason per GPU runtime, in the order they were tried, joined by `"; "` (for
    /// example "CUDA driver library libcuda.so not found; built without the `rocm`
    /// feature"). `None` when a GPU was chosen.
    pub fn best_available_with_reason() -> (Device, Option<String>) {
        let mut reasons = Vec::new();
        for (device, probe) in Self::probe_gpus() {
            match probe {
                Ok(()) => return (device, None),
                Err(AttentionError::DeviceUnavailable { reason, .. }) => reasons.push(reason),
                Err(other) => reasons.push(other.to_string()),
            }
        }
        (Device::Cpu, Some(reasons.join("; ")))
    }

    /// Asks each GPU runtime, in the order [`Device::best_available`] tries them (CUDA,
    /// then HIP), whether it has a device: `Ok(())` with ordinal 0 of that kind when it
    /// has at least one, else [`AttentionError::DeviceUnavailable`] saying why (built
    /// without the feature, driver library not found, driver found but no device, ...).
    /// Probes are made once per process and never panic.
    ///
    /// `Ok` means the driver reports a device; creating its runtime
    /// ([`Device::is_available`], a backend) can still fail, with its own reason.
    pub fn probe_gpus() -> Vec<(Device, Result<()>)> {
        vec![
            (Device::Cuda(0), probe_cuda()),
            (Device::Hip(0), probe_hip()),
        ]
    }

    /// Whether this device can be used now (driver present, ordinal in range).
    pub fn is_available(&self) -> bool {
        match self {
            Device::Cpu => true,
            _ => gpu::GpuRuntime::get(*self).is_ok(),
        }
    }

    /// True for CUDA and HIP devices.
    pub fn is_gpu(&self) -> bool {
        !matches!(self, Device::Cpu)
    }

    /// A human-readable name (GPU model for GPUs).
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            _ => match gpu::GpuRuntime::get(*self) {
                Ok(rt) => format!("{self} ({})", rt.name()),
                Err(e) => format!("{self} (unavailable: {e})"),
            },
        }
    }

    /// Waits until all work queued on this device has finished.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            _ => gpu::GpuRuntime::get(*self)?.synchronize(),
        }
    }

    /// Runs `f` and returns the device time it queued, in milliseconds, measured with
    /// device events (for GPUs) or the wall clock (for the CPU).
    pub fn elapsed_ms(&self, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        match self {
            Device::Cpu => {
                let t = std::time::Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
            _ => Ok(gpu::GpuRuntime::get(*self)?.time_ms(&mut f)? as f64),
        }
    }

    /// Host<->device transfers through this device so far.
    pub fn transfer_stats(&self) -> TransferStats {
        match self.slot() {
            Some(s) => {
                let c = &COUNTERS[s];
                TransferStats {
                    host_to_device_calls: c.h2d_calls.load(Ordering::Relaxed),
                    host_to_device_bytes: c.h2d_bytes.load(Ordering::Relaxed),
                    device_to_host_calls: c.d2h_calls.load(Ordering::Relaxed),
                    device_to_host_bytes: c.d2h_bytes.load(Ordering::Relaxed),
                }
            }
            None => TransferStats::default(),
        }
    }

    fn slot(&self) -> Option<usize> {
        match *self {
            Device::Cpu => Some(0),
            Device::Cuda(n) if n < MAX_ORDINALS => Some(1 + n),
            Device::Hip(n) if n < MAX_ORDINALS => Some(1 + MAX_ORDINALS + n),
            _ => None,
        }
    }

    pub(crate) fn count_h2d(&self, bytes: usize) {
        if let Some(s) = self.slot() {
            COUNTERS[s].h2d_calls.fetch_add(1, Ordering::Relaxed);
            COUNTERS[s]
                .h2d_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_d2h(&self, bytes: usize) {
        if let Some(s) = self.slot() {
            COUNTERS[s].d2h_calls.fetch_add(1, Ordering::Relaxed);
            COUNTERS[s]
                .d2h_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod selection_tests {
    use super::*;

    #[test]
    fn from_str_round_trips_display() {
        for d in [
            Device::Cpu,
            Device::Cuda(0),
            Device::Cuda(15),
            Device::Hip(0),
            Device::Hip(3),
        ] {
            assert_eq!(d.to_string().parse::<Device>(), Ok(d), "{d}");
        }
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("rocm:2".parse::<Device>(), Ok(Device::Hip(2)));
        assert_eq!("auto".parse::<Device>(), Ok(Device::best_available()));
    }

    #[test]
    fn bad_device_strings_are_invalid_config_quoting_the_string() {
        for bad in [
            "", "gpu", "CPU", "cpu:0", "auto:1", "cuda:", "cuda:+1", "cuda:-1", "cuda: 1",
            "hip:1:2", "cuda:x", "tpu:0", " cpu",
        ] {
            match bad.parse::<Device>() {
                Err(AttentionError::InvalidConfig { field, reason }) => {
                    assert_eq!(field, "device");
                    assert!(reason.contains(&format!("{bad:?}")), "{bad:?}: {reason}");
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn probe_agrees_with_best_available_and_says_why() {
        let probes = Device::probe_gpus();
        assert_eq!(
            probes.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
            [Device::Cuda(0), Device::Hip(0)]
        );
        let (device, reason) = Device::best_available_with_reason();
        assert_eq!(device, Device::best_available());
        match probes.iter().find(|(_, p)| p.is_ok()) {
            Some((first, _)) => {
                assert_eq!(device, *first);
                assert_eq!(reason, None);
            }
            None => {
                assert_eq!(device, Device::Cpu);
                let reason = reason.expect("a reason when no GPU is chosen");
                // One reason per runtime, each the probe's own words.
                for (d, p) in &probes {
                    match p {
                        Err(AttentionError::DeviceUnavailable {
                            device, reason: r, ..
                        }) => {
                            assert_eq!(device, &d.to_string());
                            assert!(!r.is_empty());
                            assert!(reason.contains(r.as_str()), "{reason} lacks {r}");
                        }
                        other => panic!("{d}: expected DeviceUnavailable, got {other:?}"),
                    }
                }
            }
        }
        // Probing twice gives the same answers.
        assert_eq!(Device::probe_gpus(), probes);
    }

    #[cfg(not(feature = "rocm"))]
    #[test]
    fn missing_feature_is_named() {
        match &Device::probe_gpus()[1].1 {
            Err(e) => assert!(e.to_string().contains("`rocm` feature"), "{e}"),
            Ok(()) => panic!("HIP reported usable without the rocm feature"),
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_probe_matches_the_runtime_count() {
        assert_eq!(probe_cuda().is_ok(), cuda::device_count() > 0);
    }
}
