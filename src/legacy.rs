//! The original host-slice API, kept working on top of the device API.
//!
//! [`BackendImplementation`] is the original trait: attention over `&[f32]` slices that
//! returns a fresh `Vec<f32>`. [`HostAdapter`] implements it for any
//! [`DeviceAttentionBackend`] by uploading the slices to the backend's device, running it
//! and downloading the result. [`AttentionBackendRegistry`] holds named backends in
//! priority order (GPU before CPU), picks one for a config, and
//! [`forward`](AttentionBackendRegistry::forward) runs a call on the first backend that
//! accepts it, moving on when a backend refuses (a [`Dispatch`] says which ran and why the
//! others did not).
//!
//! Host slices are always `[batch, seq, heads, head_dim]` (BSHD), row-major f32:
//! q is `[batch, seq_q, num_heads, head_dim]`, k and v are
//! `[batch, seq_k, num_kv_heads, head_dim]`, the output has q's shape. The batch size
//! comes from [`AttentionConfig::batch_size`], the sequence lengths from the slice
//! lengths. The optional additive mask is `[seq_q, seq_k]`, `[batch, seq_q, seq_k]` or
//! `[batch, num_heads, seq_q, seq_k]`, told apart by its length.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::cpu::CpuAttentionBackend;
use crate::backend::gpu::GpuAttentionBackend;
use crate::backend::{AttentionPath, DeviceAttentionBackend, Support};
use crate::config::{AttentionConfig, KvCacheLayout, Layout};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{AttentionBackendResult, AttentionError, Result};
use crate::tensor::DeviceTensor;

/// An attention backend over host slices: the original, pre-device API.
///
/// `q` is `[batch, seq_q, num_heads, head_dim]`, `k` and `v` are
/// `[batch, seq_k, num_kv_heads, head_dim]`, all row-major f32; `mask` is an optional
/// additive f32 mask of `[seq_q, seq_k]`, `[batch, seq_q, seq_k]` or
/// `[batch, num_heads, seq_q, seq_k]`. The result has q's shape.
pub trait BackendImplementation: Send + Sync {
    /// Backend name, unique within a registry.
    fn name(&self) -> &str;

    /// Whether this backend runs `config`.
    fn supports(&self, config: &AttentionConfig) -> bool;

    /// Whether this backend runs `config`, and if not, why. Must agree with
    /// [`supports`](Self::supports); the default derives it from there with a generic
    /// reason. The registry asks this one, so that its errors and [`Dispatch`] reports
    /// can say why a backend was passed over.
    fn check_support(&self, config: &AttentionConfig) -> Support {
        if self.supports(config) {
            Support::Yes
        } else {
            Support::No("supports() is false for this config".into())
        }
    }

    /// The KV-cache layout this backend reads.
    fn required_kv_layout(&self) -> KvCacheLayout;

    /// Computes attention over host slices and returns the output as a new vector.
    fn forward(
        &self,
        config: &AttentionConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> AttentionBackendResult<Vec<f32>>;
}

/// A shared handle on the [`AttentionPath`] a [`HostAdapter`] took on its most recent
/// call (`None` before the first call and after a failed one).
///
/// Clones observe the same adapter, so the handle stays usable after the adapter has been
/// boxed into a registry. With several threads calling one adapter, "most recent" is the
/// call that finished last; use [`HostAdapter::forward_with_path`] where that matters.
#[derive(Debug, Clone, Default)]
pub struct PathRecorder(Arc<Mutex<Option<AttentionPath>>>);

impl PathRecorder {
    /// The path of the most recent call, if it succeeded.
    pub fn get(&self) -> Option<AttentionPath> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, path: Option<AttentionPath>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = path;
    }
}

/// The host-slice API over any [`DeviceAttentionBackend`]: uploads the slices as f32
/// BSHD tensors to the backend's device, runs the backend, downloads the output.
///
/// The device call always uses [`Layout::Bshd`], whatever `config.layout` says, because
/// host slices are defined as BSHD.
#[derive(Debug)]
pub struct HostAdapter<B> {
    inner: B,
    last_path: PathRecorder,
}

/// Dimensions of one host-slice call, derived from the config and the slice lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostShapes {
    batch: usize,
    seq_q: usize,
    seq_k: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl HostShapes {
    fn q(&self) -> [usize; 4] {
        [self.batch, self.seq_q, self.num_heads, self.head_dim]
    }

    fn kv(&self) -> [usize; 4] {
        [self.batch, self.seq_k, self.num_kv_heads, self.head_dim]
    }

    /// Derives the dimensions; every inconsistency names the expected and given length.
    fn derive(config: &AttentionConfig, q: usize, k: usize, v: usize) -> Result<Self> {
        config.validate()?;
        let (b, h, hkv, d) = (
            config.batch_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        );
        let overflow = |what: &str, heads: usize| AttentionError::InvalidConfig {
            field: "batch_size",
            reason: format!("{what} = {b} * {heads} * {d} overflows usize"),
        };
        let q_row = b
            .checked_mul(h)
            .and_then(|x| x.checked_mul(d))
            .ok_or_else(|| overflow("batch_size * num_heads * head_dim", h))?;
        let kv_row = b
            .checked_mul(hkv)
            .and_then(|x| x.checked_mul(d))
            .ok_or_else(|| overflow("batch_size * num_kv_heads * head_dim", hkv))?;
        if q == 0 || !q.is_multiple_of(q_row) {
            return Err(AttentionError::shape(
                "q length (as [batch, seq_q, num_heads, head_dim])",
                format!(
                    "a positive multiple of batch_size * num_heads * head_dim = \
                     {b} * {h} * {d} = {q_row}"
                ),
                q,
            ));
        }
        if k == 0 || !k.is_multiple_of(kv_row) {
            return Err(AttentionError::shape(
                "k length (as [batch, seq_k, num_kv_heads, head_dim])",
                format!(
                    "a positive multiple of batch_size * num_kv_heads * head_dim = \
                     {b} * {hkv} * {d} = {kv_row}"
                ),
                k,
            ));
        }
        if v != k {
            return Err(AttentionError::shape(
                "v length (as [batch, seq_k, num_kv_heads, head_dim])",
                format!("{k} (the length of k)"),
                v,
            ));
        }
        Ok(HostShapes {
            batch: b,
            seq_q: q / q_row,
            seq_k: k / kv_row,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
        })
    }

    /// The device shape of a mask of `len` elements: `[Sq, Sk]`, `[B, Sq, Sk]` or
    /// `[B, H, Sq, Sk]`. Where two readings have the same length they mean the same mask
    /// (a batch or head extent of 1), so the first one is taken.
    fn mask_shape(&self, len: usize) -> Result<Vec<usize>> {
        let (b, h, sq, sk) = (self.batch, self.num_heads, self.seq_q, self.seq_k);
        let candidates = [vec![sq, sk], vec![b, sq, sk], vec![b, h, sq, sk]];
        let sizes: Vec<Option<usize>> = candidates
            .iter()
            .map(|s| s.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x)))
            .collect();
        if let Some(i) = sizes.iter().position(|&n| n == Some(len)) {
            return Ok(candidates[i].clone());
        }
        let show = |n: Option<usize>| n.map_or_else(|| "(overflow)".to_string(), |n| n.to_string());
        Err(AttentionError::shape(
            "mask length",
            format!(
                "{} ([seq_q, seq_k] = [{sq}, {sk}]), {} ([batch, seq_q, seq_k] = [{b}, {sq}, {sk}]) \
                 or {} ([batch, num_heads, seq_q, seq_k] = [{b}, {h}, {sq}, {sk}])",
                show(sizes[0]),
                show(sizes[1]),
                show(sizes[2]),
            ),
            len,
        ))
    }
}

/// The config a [`HostAdapter`] hands its device backend: host slices are BSHD by
/// definition, so the device call must read them that way whatever `config.layout` says.
/// `supports` and `forward` both ask with this config, so they agree.
fn device_config(config: &AttentionConfig) -> AttentionConfig {
    let mut device_config = config.clone();
    device_config.layout = Layout::Bshd;
    device_config
}

impl<B: DeviceAttentionBackend> HostAdapter<B> {
    /// Wraps a device backend.
    pub fn new(backend: B) -> Self {
        HostAdapter {
            inner: backend,
            last_path: PathRecorder::default(),
        }
    }

    /// The wrapped device backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Unwraps the device backend.
    pub fn into_inner(self) -> B {
        self.inner
    }

    /// The path taken by the most recent call, `None` before the first call and after a
    /// failed one.
    pub fn last_path(&self) -> Option<AttentionPath> {
        self.last_path.get()
    }

    /// A handle that keeps reporting [`HostAdapter::last_path`] after the adapter has been
    /// moved (for example into an [`AttentionBackendRegistry`]).
    pub fn path_recorder(&self) -> PathRecorder {
        self.last_path.clone()
    }

    /// Like [`BackendImplementation::forward`], and also returns the path this call took.
    pub fn forward_with_path(
        &self,
        config: &AttentionConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<(Vec<f32>, AttentionPath)> {
        let result = self.run(config, q, k, v, mask);
        self.last_path
            .set(result.as_ref().ok().map(|(_, path)| *path));
        result
    }

    fn run(
        &self,
        config: &AttentionConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<(Vec<f32>, AttentionPath)> {
        let shapes = HostShapes::derive(config, q.len(), k.len(), v.len())?;
        let mask_shape = mask.map(|m| shapes.mask_shape(m.len())).transpose()?;

        let device_config = device_config(config);
        if let Support::No(reason) = self.inner.supports(&device_config) {
            return Err(AttentionError::NotSupported {
                backend: self.inner.name().to_string(),
                reason,
            });
        }

        let device = self.inner.device();
        let q_t = DeviceTensor::from_host(q, &shapes.q(), device)?;
        let k_t = DeviceTensor::from_host(k, &shapes.kv(), device)?;
        let v_t = DeviceTensor::from_host(v, &shapes.kv(), device)?;
        let mask_t = match (mask, &mask_shape) {
            (Some(m), Some(shape)) => Some(DeviceTensor::from_host(m, shape, device)?),
            _ => None,
        };
        let mut out = DeviceTensor::zeros(&shapes.q(), DType::F32, device)?;
        let path =
            self.inner
                .forward_into(&device_config, &q_t, &k_t, &v_t, mask_t.as_ref(), &mut out)?;
        Ok((out.to_host::<f32>()?, path))
    }
}

impl<B: DeviceAttentionBackend> BackendImplementation for HostAdapter<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn supports(&self, config: &AttentionConfig) -> bool {
        self.check_support(config).is_yes()
    }

    /// The device backend's own answer (and reason) for the config it would be handed.
    fn check_support(&self, config: &AttentionConfig) -> Support {
        self.inner.supports(&device_config(config))
    }

    fn required_kv_layout(&self) -> KvCacheLayout {
        self.inner.required_kv_layout()
    }

    fn forward(
        &self,
        config: &AttentionConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> AttentionBackendResult<Vec<f32>> {
        self.forward_with_path(config, q, k, v, mask)
            .map(|(out, _)| out)
    }
}

/// Where a backend stands in a registry's search order: higher comes first; equal
/// priorities keep their registration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BackendPriority(pub i32);

impl BackendPriority {
    /// GPU backends: tried before anything registered at [`BackendPriority::NORMAL`].
    pub const GPU: BackendPriority = BackendPriority(100);
    /// What [`AttentionBackendRegistry::register`] uses.
    pub const NORMAL: BackendPriority = BackendPriority(0);
    /// The last resort (the CPU backend): tried after everything else.
    pub const FALLBACK: BackendPriority = BackendPriority(i32::MIN);
}

/// Why [`AttentionBackendRegistry::forward_with_report`] passed over a backend.
#[derive(Debug, Clone, PartialEq)]
pub enum SkipReason {
    /// Its [`check_support`](BackendImplementation::check_support) said no, with this
    /// reason; it was not called.
    Unsupported(String),
    /// It supported the config but refused the call with this error, one of the kinds
    /// that let the next backend try (see [`AttentionBackendRegistry::forward`]).
    Refused(AttentionError),
}

/// A backend that did not run a call, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The backend's name.
    pub backend: String,
    /// Why it did not run the call.
    pub reason: SkipReason,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            SkipReason::Unsupported(reason) => write!(f, "{}: unsupported: {reason}", self.backend),
            SkipReason::Refused(err) => write!(f, "{}: refused: {err}", self.backend),
        }
    }
}

/// Which backend ran a call of [`AttentionBackendRegistry::forward_with_report`], and
/// why each backend before it in priority order did not.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    /// The backend that computed the output.
    pub backend: String,
    /// Its path, for backends registered through
    /// [`register_adapter`](AttentionBackendRegistry::register_adapter); `None` otherwise.
    pub path: Option<AttentionPath>,
    /// The backends passed over before it, in the order they were tried.
    pub skipped: Vec<Skipped>,
}

impl fmt::Display for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ran on {}", self.backend)?;
        if let Some(path) = self.path {
            write!(f, " (path {path})")?;
        }
        for (i, s) in self.skipped.iter().enumerate() {
            f.write_str(if i == 0 { "; skipped " } else { "; " })?;
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// Whether `err` from a backend's `forward` is a refusal that the next backend may not
/// share: the backend cannot run this call here (kernel, layout, device, memory), and the
/// host-slice call has no side effect to undo. Errors about the input (config, shapes,
/// dtypes) would come back from every backend; runtime failures, capacity and graph-
/// recording errors mean something went wrong while running or in the caller's setup, and
/// running elsewhere would hide that.
fn falls_through(err: &AttentionError) -> bool {
    matches!(
        err,
        AttentionError::NotSupported { .. }
            | AttentionError::UnsupportedLayout { .. }
            | AttentionError::DeviceUnavailable { .. }
            | AttentionError::OutOfMemory { .. }
            | AttentionError::KernelBuild { .. }
    )
}

struct Entry {
    backend: Box<dyn BackendImplementation>,
    priority: BackendPriority,
    path: Option<PathRecorder>,
}

/// Named host-slice backends in priority order, with an optional default.
///
/// Without a default, [`select_backend`](Self::select_backend) takes the first backend in
/// priority order that supports the config, and [`forward`](Self::forward) runs the call
/// on the first one that also accepts it. With a default, both take the default or fail:
/// a default is a promise about where the work runs, so it is never silently replaced.
#[derive(Default)]
pub struct AttentionBackendRegistry {
    /// Sorted by descending priority, ties in registration order.
    entries: Vec<Entry>,
    default: Option<String>,
}

impl fmt::Debug for AttentionBackendRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttentionBackendRegistry")
            .field(
                "backends",
                &self
                    .entries
                    .iter()
                    .map(|e| (e.backend.name(), e.priority.0))
                    .collect::<Vec<_>>(),
            )
            .field("default", &self.default)
            .finish()
    }
}

/// A short description of a config for error messages, with the validation error if any.
fn describe_config(config: &AttentionConfig) -> String {
    let mut s = format!(
        "config with num_heads {}, num_kv_heads {}, head_dim {}, batch_size {}, \
         causal {}, dropout {}, layout {:?}",
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.batch_size,
        config.is_causal,
        config.dropout,
        config.layout,
    );
    if let Err(e) = config.validate() {
        s.push_str(&format!(" (the config itself is invalid: {e})"));
    }
    s
}

impl AttentionBackendRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The standard set: the GPU backend on [`Device::best_available`] when that is a GPU
    /// and it starts ([`BackendPriority::GPU`]), and always the CPU backend, last
    /// ([`BackendPriority::FALLBACK`]). Never panics, also without any GPU driver.
    // `default()` keeps this right whatever settings the CPU backend carries.
    #[allow(clippy::default_constructed_unit_structs)]
    pub fn with_default_backends() -> Self {
        let mut registry = Self::new();
        let device = Device::best_available();
        if device.is_gpu() {
            if let Ok(gpu) = GpuAttentionBackend::new(device) {
                // Names are distinct, so registration cannot fail here.
                let _ = registry.register_adapter(HostAdapter::new(gpu), BackendPriority::GPU);
            }
        }
        let _ = registry.register_adapter(
            HostAdapter::new(CpuAttentionBackend::default()),
            BackendPriority::FALLBACK,
        );
        registry
    }

    /// Registers `backend` at [`BackendPriority::NORMAL`]. Fails if the name is taken.
    pub fn register(&mut self, backend: Box<dyn BackendImplementation>) -> Result<()> {
        self.register_with_priority(backend, BackendPriority::NORMAL)
    }

    /// Registers `backend` at `priority`. Fails if the name is taken.
    pub fn register_with_priority(
        &mut self,
        backend: Box<dyn BackendImplementation>,
        priority: BackendPriority,
    ) -> Result<()> {
        self.insert(Entry {
            backend,
            priority,
            path: None,
        })
    }

    /// Registers a [`HostAdapter`] at `priority`, keeping a handle on its path so that
    /// [`last_path`](Self::last_path) can report it. Fails if the name is taken.
    pub fn register_adapter<B: DeviceAttentionBackend + 'static>(
        &mut self,
        adapter: HostAdapter<B>,
        priority: BackendPriority,
    ) -> Result<()> {
        let path = Some(adapter.path_recorder());
        self.insert(Entry {
            backend: Box::new(adapter),
            priority,
            path,
        })
    }

    fn insert(&mut self, entry: Entry) -> Result<()> {
        let name = entry.backend.name();
        if self.position(name).is_some() {
            return Err(AttentionError::InvalidConfig {
                field: "backend name",
                reason: format!("a backend named {name:?} is already registered"),
            });
        }
        let at = self
            .entries
            .iter()
            .position(|e| e.priority < entry.priority)
            .unwrap_or(self.entries.len());
        self.entries.insert(at, entry);
        Ok(())
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.backend.name() == name)
    }

    /// Makes `name` the backend [`select_backend`](Self::select_backend) always answers.
    /// Fails with [`AttentionError::NotFound`] if no backend has that name.
    pub fn set_default(&mut self, name: &str) -> Result<()> {
        if self.position(name).is_none() {
            return Err(AttentionError::NotFound(format!(
                "{name:?} (registered: {})",
                self.list_backends().join(", ")
            )));
        }
        self.default = Some(name.to_string());
        Ok(())
    }

    /// Removes the default, going back to selection by priority.
    pub fn clear_default(&mut self) {
        self.default = None;
    }

    /// The name of the default backend, if one is set.
    pub fn default_backend(&self) -> Option<&str> {
        self.default.as_deref()
    }

    /// The backend for `config`: the default if one is set (or
    /// [`AttentionError::NotSupported`] if it does not support `config`), otherwise the
    /// first backend in priority order that supports it.
    pub fn select_backend(&self, config: &AttentionConfig) -> Result<&dyn BackendImplementation> {
        if let Some(name) = &self.default {
            let backend = self
                .get_backend(name)
                .ok_or_else(|| AttentionError::NotFound(name.clone()))?;
            if backend.check_support(config).is_yes() {
                return Ok(backend);
            }
            return Err(AttentionError::NotSupported {
                backend: name.clone(),
                reason: format!(
                    "it is the default backend and does not support this {}; \
                     clear or change the default to let another backend run it",
                    describe_config(config)
                ),
            });
        }
        if self.entries.is_empty() {
            return Err(AttentionError::NotSupported {
                backend: "any registered backend".into(),
                reason: "the registry is empty; register a backend or use \
                         AttentionBackendRegistry::with_default_backends()"
                    .into(),
            });
        }
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| e.backend.check_support(config).is_yes())
        {
            return Ok(e.backend.as_ref());
        }
        Err(self.none_supports(config))
    }

    fn none_supports(&self, config: &AttentionConfig) -> AttentionError {
        AttentionError::NotSupported {
            backend: format!(
                "any registered backend (tried {})",
                self.list_backends().join(", ")
            ),
            reason: format!("none supports this {}", describe_config(config)),
        }
    }

    /// Attention over host slices (shapes as in [`BackendImplementation::forward`]) on the
    /// first backend that can run it.
    ///
    /// With a default set, only the default runs: its refusal is returned as is.
    /// Otherwise backends are tried in priority order, skipping those whose
    /// [`check_support`](BackendImplementation::check_support) says no. A backend that
    /// supports the config may still refuse the call (a shape its kernels cannot take, a
    /// device limit); the next one is then tried when the error is one of
    /// - [`NotSupported`](AttentionError::NotSupported),
    ///   [`UnsupportedLayout`](AttentionError::UnsupportedLayout),
    ///   [`KernelBuild`](AttentionError::KernelBuild): this backend has no kernel for it;
    /// - [`DeviceUnavailable`](AttentionError::DeviceUnavailable),
    ///   [`OutOfMemory`](AttentionError::OutOfMemory): its device cannot take it now.
    ///
    /// Any other error is returned at once, without trying further backends: errors about
    /// the input ([`InvalidConfig`](AttentionError::InvalidConfig),
    /// [`ShapeMismatch`](AttentionError::ShapeMismatch), ...) would come back from every
    /// backend, and a [`Runtime`](AttentionError::Runtime) failure must be seen, not
    /// covered by another backend's result. Host-slice calls have no side effect (the
    /// inputs are borrowed, the output is new), so moving on leaves nothing behind.
    ///
    /// When every backend is passed over, the error is
    /// [`NotSupported`](AttentionError::NotSupported) naming each backend and why it did
    /// not run the call.
    pub fn forward(
        &self,
        config: &AttentionConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        self.forward_with_report(config, q, k, v, mask)
            .map(|(out, _)| out)
    }

    /// Like [`forward`](Self::forward), and also says which backend ran and why the ones
    /// before it did not. The path comes from the backend's [`PathRecorder`]; with several
    /// threads calling one backend it is the path of the call that finished last.
    pub fn forward_with_report(
        &self,
        config: &AttentionConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Dispatch)> {
        if let Some(name) = &self.default {
            let backend = self.select_backend(config)?;
            let out = backend.forward(config, q, k, v, mask)?;
            let dispatch = Dispatch {
                backend: name.clone(),
                path: self.last_path(name),
                skipped: Vec::new(),
            };
            return Ok((out, dispatch));
        }
        if self.entries.is_empty() {
            // The empty registry's error, with its remedy.
            self.select_backend(config)?;
        }
        let mut skipped = Vec::new();
        let mut any_supported = false;
        for e in &self.entries {
            let name = e.backend.name().to_string();
            if let Support::No(reason) = e.backend.check_support(config) {
                skipped.push(Skipped {
                    backend: name,
                    reason: SkipReason::Unsupported(reason),
                });
                continue;
            }
            any_supported = true;
            match e.backend.forward(config, q, k, v, mask) {
                Ok(out) => {
                    let path = e.path.as_ref().and_then(PathRecorder::get);
                    let dispatch = Dispatch {
                        backend: name,
                        path,
                        skipped,
                    };
                    return Ok((out, dispatch));
                }
                Err(err) if falls_through(&err) => skipped.push(Skipped {
                    backend: name,
                    reason: SkipReason::Refused(err),
                }),
                Err(err) => return Err(err),
            }
        }
        let listed = skipped
            .iter()
            .map(Skipped::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let reason = if any_supported {
            format!("every backend refused the call: {listed}")
        } else {
            format!("none supports this {}: {listed}", describe_config(config))
        };
        Err(AttentionError::NotSupported {
            backend: format!(
                "any registered backend (tried {})",
                self.list_backends().join(", ")
            ),
            reason,
        })
    }

    /// Backend names in priority order (the order `select_backend` tries them).
    pub fn list_backends(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| e.backend.name().to_string())
            .collect()
    }

    /// The backend named `name`.
    pub fn get_backend(&self, name: &str) -> Option<&dyn BackendImplementation> {
        self.position(name)
            .map(|i| self.entries[i].backend.as_ref())
    }

    /// The priority `name` was registered with.
    pub fn priority(&self, name: &str) -> Option<BackendPriority> {
        self.position(name).map(|i| self.entries[i].priority)
    }

    /// The path the backend named `name` took on its most recent call, for backends
    /// registered through [`register_adapter`](Self::register_adapter) (which
    /// [`with_default_backends`](Self::with_default_backends) uses); `None` otherwise,
    /// before the first call and after a failed one.
    pub fn last_path(&self, name: &str) -> Option<AttentionPath> {
        self.position(name)
            .and_then(|i| self.entries[i].path.as_ref())
            .and_then(PathRecorder::get)
    }

    /// Number of registered backends.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no backend is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
