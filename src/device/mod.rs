//! Devices, their runtimes, and the host<->device transfer counters.
//!
//! A [`Device`] is a plain value; the runtime behind a GPU device (context, stream,
//! loaded modules) is created on first use and shared by every tensor on it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{AttentionError, Result};

pub use graph::DeviceGraph;

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod gpu;
mod graph;
#[cfg(feature = "rocm")]
pub(crate) mod hip;

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

    /// Parses `cpu`, `cuda`, `cuda:N`, `hip`, `hip:N` and `auto` (best available).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || AttentionError::InvalidConfig {
            field: "device",
            reason: format!("expected cpu, cuda[:N], hip[:N] or auto, got {s:?}"),
        };
        let (kind, ord) = match s.split_once(':') {
            Some((k, n)) => (k, n.parse::<usize>().map_err(|_| bad())?),
            None => (s, 0),
        };
        match kind {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(ord)),
            "hip" | "rocm" => Ok(Device::Hip(ord)),
            "auto" => Ok(Device::best_available()),
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

impl Device {
    /// The first usable GPU (CUDA, then HIP), else [`Device::Cpu`]. Never panics, also
    /// when no driver is installed.
    pub fn best_available() -> Device {
        #[cfg(feature = "cuda")]
        if cuda::device_count() > 0 {
            return Device::Cuda(0);
        }
        #[cfg(feature = "rocm")]
        if hip::device_count() > 0 {
            return Device::Hip(0);
        }
        Device::Cpu
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
