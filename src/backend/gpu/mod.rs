//! The GPU backend: fused flash kernels where they apply, the unfused device path
//! otherwise, on CUDA or HIP devices. Every tensor stays on the device; `forward_into`
//! queues work on the device stream and returns without synchronizing.

use std::sync::Arc;

use super::{AttentionPath, DeviceAttentionBackend, FlashKernel};
use crate::config::{AttentionConfig, KvCacheLayout};
use crate::device::gpu::GpuRuntime;
use crate::device::{Device, GpuStream};
use crate::dtype::DType;
use crate::error::{AttentionError, Result};
use crate::kernels::abi::AttnParams;
use crate::kernels::TileVendor;
use crate::kv_cache::KvCache;
use crate::options::AttentionOptions;
use crate::problem::{AttentionProblem, HeadStrides};
use crate::tensor::{check_usable, DeviceTensor};
use tma_operands::TmaLayout;

mod decode;
mod decode_plan;
/// The path decision. Internal: public for the crate's own tests, not a stable API (it
/// may change in any release); [`Plan`], [`PlanInput`], [`FlashChoice`] and [`FlashTarget`]
/// are re-exported here.
#[doc(hidden)]
pub mod dispatch;
mod extended;
mod flash;
mod grid;
mod params;
mod tma_operands;
mod traditional;
mod workspace;

pub use decode_plan::{SplitPlan, MAX_DECODE_QUERIES};
pub use dispatch::{FlashChoice, FlashTarget, Plan, PlanInput, MAX_KERNEL_SEQ};

/// Environment switch read when a backend is created: `FORGE_ATTN_FLASH=0` turns the flash
/// kernels off (for A/B runs), `1` turns them on.
pub const FLASH_ENV: &str = "FORGE_ATTN_FLASH";

/// Environment switch read when a backend is created: `FORGE_ATTN_TF32=1` lets f32 inputs
/// run in TF32 on the tensor cores (see [`GpuAttentionBackend::with_tf32`]).
pub const TF32_ENV: &str = "FORGE_ATTN_TF32";

/// Attention on a CUDA or HIP device.
///
/// [`GpuAttentionBackend::new`] queues on the device's own stream;
/// [`GpuAttentionBackend::on_stream`] on a stream the caller names. Either way every kernel,
/// copy and workspace allocation of a call is queued on that one stream and nothing is
/// synchronized. The backend is `Send + Sync`: backends on several streams of one device
/// may run on several threads at once (they share the device's loaded kernels), and one
/// backend may be shared by threads, whose calls then queue on its one stream in the
/// order they are made.
pub struct GpuAttentionBackend {
    device: Device,
    runtime: Arc<GpuRuntime>,
    use_flash_attention: bool,
    allow_tf32: bool,
    workspace: workspace::DeviceScratch,
    decode_workspace: decode::DecodeWorkspace,
}

impl std::fmt::Debug for GpuAttentionBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuAttentionBackend")
            .field("device", &self.device)
            .field("use_flash_attention", &self.use_flash_attention)
            .field("allow_tf32", &self.allow_tf32)
            .finish()
    }
}

impl GpuAttentionBackend {
    /// A backend on `device` (CUDA or HIP); fails with `DeviceUnavailable` if the device
    /// cannot be used. Flash kernels are on unless `FORGE_ATTN_FLASH=0`.
    pub fn new(device: Device) -> Result<Self> {
        if !device.is_gpu() {
            return Err(AttentionError::DeviceUnavailable {
                device: device.to_string(),
                reason: "the GPU backend needs a CUDA or HIP device".into(),
                source: None,
            });
        }
        Ok(Self::with_runtime(GpuRuntime::get(device)?))
    }

    /// A backend queuing everything on `stream`: kernels, the copies and workspace
    /// allocations of its calls, and the frees of its workspaces when it drops. Nothing is
    /// synchronized: order the inputs' writes before the call, and the output's readers
    /// after it, on that stream (the caller's own work on it is ordered already).
    ///
    /// Its calls may be recorded in the caller's own graph (say, with cudarc's
    /// `CudaStream::begin_capture`): a call made while the stream is captured allocates
    /// nothing, and one that would (a first call, or a larger one than before) is refused
    /// with [`AttentionError::GraphCapture`] instead of breaking the capture. Run the same
    /// calls once before capturing, or reserve their workspaces with
    /// [`reserve`](Self::reserve), [`reserve_cached`](Self::reserve_cached) or
    /// [`reserve_cached_append`](Self::reserve_cached_append). Keep the backend alive as
    /// long as a graph recorded with it may replay: the graph uses its workspaces.
    ///
    /// Tensors that forge-attn allocates on the device's own stream
    /// ([`DeviceTensor::zeros`], [`KvCache::contiguous`], ...) are written there; order that
    /// stream before this one (`Device::synchronize`) before using them here, or allocate
    /// them on this stream ([`DeviceTensor::zeros_on`]).
    pub fn on_stream(stream: &GpuStream) -> Result<Self> {
        Ok(Self::with_runtime(stream.runtime().clone()))
    }

    /// The stream this backend queues on.
    pub fn stream(&self) -> GpuStream {
        GpuStream::from_runtime(self.runtime.clone())
    }

    fn with_runtime(runtime: Arc<GpuRuntime>) -> Self {
        let device = runtime.device();
        let use_flash_attention = std::env::var(FLASH_ENV).map(|v| v != "0").unwrap_or(true);
        let allow_tf32 = std::env::var(TF32_ENV).is_ok_and(|v| v == "1");
        GpuAttentionBackend {
            device,
            runtime,
            use_flash_attention,
            allow_tf32,
            workspace: Default::default(),
            decode_workspace: Default::default(),
        }
    }

    /// Makes the workspaces that [`forward_into`](DeviceAttentionBackend::forward_into)
    /// with these arguments needs, and loads its kernels, computing nothing (no kernel is
    /// queued and `out` is not written); a later call of the same shapes (or smaller) then
    /// allocates nothing, which a call recorded in a graph requires. Errors as the call
    /// would refuse it; refused with [`AttentionError::GraphCapture`] while the stream is
    /// being captured, if it would allocate.
    pub fn reserve(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        GpuRuntime::dry_run(|| {
            DeviceAttentionBackend::forward_into(self, config, q, k, v, mask, out).map(|_| ())
        })
    }

    /// [`reserve`](Self::reserve) for [`forward_cached`](Self::forward_cached): the
    /// workspaces of every call over `cache` as it grows up to its capacity (a recorded
    /// call is cut for the capacity).
    pub fn reserve_cached(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        GpuRuntime::dry_run(|| self.forward_cached(config, q, cache, out).map(|_| ()))
    }

    /// [`reserve`](Self::reserve) for [`forward_cached_append`](Self::forward_cached_append)
    /// with new tokens of `k_new`'s shape; the cache is not changed (nothing is appended).
    pub fn reserve_cached_append(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        let n = cache.check_append(k_new, v_new)?;
        check_usable(&[q, k_new, v_new], &[out])?;
        let (p, out_strides) = self.prepare_cached(config, q, cache, out, n)?;
        let new = self.fused_append(&p, k_new, v_new, n, cache);
        GpuRuntime::dry_run(|| {
            self.launch_cached(&p, q, cache, out, out_strides, new)
                .map(|_| ())
        })
    }

    /// The new tokens for a fused append, or `None` when the two-launch route runs.
    fn fused_append(
        &self,
        p: &AttentionProblem,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        n: usize,
        cache: &KvCache,
    ) -> Option<decode::NewTokens> {
        if !(decode_plan::fuses_append(p.dtype, p.head_dim)
            && p.num_kv_heads <= grid::MAX_GRID_YZ
            && dispatch::vectors_aligned(k_new)
            && dispatch::vectors_aligned(v_new))
        {
            return None;
        }
        let (ks, vs) = (k_new.strides(), v_new.strides());
        Some(decode::NewTokens {
            k: k_new.device_ptr(),
            v: v_new.device_ptr(),
            k_strides: [ks[0] as i64, ks[1] as i64, ks[2] as i64],
            v_strides: [vs[0] as i64, vs[1] as i64, vs[2] as i64],
            n,
            pool_next: cache.raw_parts().pool_next.map_or(0, |t| t.device_ptr()),
        })
    }

    /// Turns the flash kernels on or off (off: every call takes the traditional path).
    pub fn with_flash(mut self, use_flash_attention: bool) -> Self {
        self.use_flash_attention = use_flash_attention;
        self
    }

    /// Whether flash kernels may be used.
    pub fn use_flash_attention(&self) -> bool {
        self.use_flash_attention
    }

    /// Lets f32 prefill run in TF32 on the tensor cores (CUDA sm_80 and newer): Q, K, V and
    /// the probabilities are rounded to 10 mantissa bits before each product, sums stay
    /// f32. About 2x - 3x faster than the f32 kernel on an H100, with relative L2 errors
    /// around 3e-4 (like f16 inputs) instead of f32's 1e-5 contract; BENCHMARKS.md has the
    /// measurements. Off by default; `FORGE_ATTN_TF32=1` turns it on. Ignored where the
    /// device has no tensor cores, and by the decode kernel (memory-bound either way).
    pub fn with_tf32(mut self, allow_tf32: bool) -> Self {
        self.allow_tf32 = allow_tf32;
        self
    }

    /// Whether f32 prefill may run in TF32 on this backend (asked for and supported).
    pub fn tf32_enabled(&self) -> bool {
        self.allow_tf32 && self.runtime.has_mma()
    }

    /// The flash kernel that would run `input`, or the reason none can.
    pub fn can_use_flash_attention(
        &self,
        input: &PlanInput,
    ) -> std::result::Result<FlashChoice, String> {
        dispatch::can_use_flash_attention(
            &self.on_this_device(input),
            self.use_flash_attention,
            self.runtime.max_shared_bytes_per_block(),
            self.flash_target(),
        )
    }

    /// `input` with TF32 dropped where this device cannot run it.
    fn on_this_device(&self, input: &PlanInput) -> PlanInput {
        PlanInput {
            tf32: input.tf32 && self.runtime.has_mma(),
            ..*input
        }
    }

    /// Which rows of the tile table this device launches with: AMD's, Hopper's (sm_90, the
    /// wgmma kernel) or the other CUDA devices'.
    pub fn tile_vendor(&self) -> TileVendor {
        self.flash_target().tile_vendor()
    }

    /// What the flash decision knows of this device: its vendor and which tensor-core
    /// kernels it runs.
    pub fn flash_target(&self) -> FlashTarget {
        FlashTarget {
            amd: matches!(self.device, Device::Hip(_)),
            has_mma: self.runtime.has_mma(),
            has_wgmma: self.runtime.has_wgmma(),
        }
    }

    /// The path `input` would take on this backend, with the reason for any fallback.
    /// `input.tf32` is ignored where the device cannot run TF32.
    pub fn plan(&self, input: &PlanInput) -> Plan {
        dispatch::plan(
            &self.on_this_device(input),
            self.use_flash_attention,
            self.runtime.max_shared_bytes_per_block(),
            self.flash_target(),
        )
    }

    /// The path `input` would take with the per-call `options` (and a log-sum-exp output
    /// when `wants_lse`), or why none can, as
    /// [`forward_with`](DeviceAttentionBackend::forward_with) decides it: plain calls plan
    /// as [`plan`](Self::plan); the others run the flash prefill families' extended
    /// variants at any query length (not the decode kernel, not the unfused path), and are
    /// refused when no flash kernel takes them (flash switched off, a head_dim past 256).
    pub fn plan_with(
        &self,
        input: &PlanInput,
        options: &AttentionOptions,
        wants_lse: bool,
    ) -> std::result::Result<Plan, String> {
        options.validate().map_err(|e| e.to_string())?;
        if options.is_default() && !wants_lse && !input.ext {
            return Ok(self.plan(input));
        }
        let choice = self
            .ext_choice(&self.on_this_device(input))
            .map_err(|e| e.to_string())?;
        Ok(Plan {
            path: AttentionPath::Flash(choice.kernel),
            flash: Some(choice),
            fallback_reason: None,
        })
    }

    /// The path a call of `config` in `dtype` with `seq_q` queries would take.
    pub fn plan_for_config(
        &self,
        config: &AttentionConfig,
        dtype: DType,
        seq_q: usize,
        has_mask: bool,
    ) -> Plan {
        self.plan(&self.plan_input_for(config, dtype, seq_q, has_mask))
    }

    /// The plan input of a call of `config` in `dtype` with `seq_q` queries (aligned
    /// operands, this backend's TF32 setting).
    fn plan_input_for(
        &self,
        config: &AttentionConfig,
        dtype: DType,
        seq_q: usize,
        has_mask: bool,
    ) -> PlanInput {
        PlanInput {
            dtype,
            head_dim: config.head_dim,
            causal: config.is_causal,
            has_mask,
            seq_q,
            tf32: self.allow_tf32,
            kv_aligned: true,
            qkv_aligned: true,
            ext: false,
            packed: false,
            paged: false,
            tma: dispatch::warp_specialized_enabled(),
        }
    }

    /// How the decode kernel would cut `cache` for `q` right now (the chunks per sequence
    /// and KV head, `FORGE_ATTN_DECODE_SPLITS` included, the capacity's cut while the
    /// stream is recorded): what [`forward_cached`](Self::forward_cached) launches, planned
    /// by the same function. Errors as `forward_cached` would refuse the call.
    pub fn decode_split(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &DeviceTensor,
    ) -> Result<SplitPlan> {
        let (p, _) = self.prepare_cached(config, q, cache, out, 0)?;
        let view = decode::CacheView::of_cache(cache);
        let plain = decode::DecodeOptions::default();
        Ok(decode::plan_decode(&self.runtime, &p, &view, &plain)?.split)
    }

    /// Runs the unfused path regardless of the plan (for comparisons and tests).
    pub fn forward_traditional(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        let (p, out_strides) = self.prepare(config, q, k, v, mask, out)?;
        let params = AttnParams::new(&p, q, k, v, mask, out, out_strides);
        traditional::forward_traditional(&self.runtime, &self.workspace, &p, &params)?;
        Ok(AttentionPath::Traditional)
    }

    /// Attention of `q` (`[B, Sq, H, D]` or `[B, H, Sq, D]` per `config.layout`, Sq up to
    /// [`MAX_DECODE_QUERIES`]) against every token held by `cache`, contiguous or paged,
    /// with per-sequence lengths; causal aligns each sequence's queries with its last keys.
    /// Runs the split-KV decode kernel: no host transfer, no synchronization.
    pub fn forward_cached(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        let (p, out_strides) = self.prepare_cached(config, q, cache, out, 0)?;
        self.launch_cached(&p, q, cache, out, out_strides, None)
    }

    /// One decode step: appends `k_new`/`v_new` (`[B, n, Hkv, D]`, head_dim contiguous) to
    /// every sequence of `cache`, then runs [`forward_cached`](Self::forward_cached) over the
    /// grown cache. Where the decode kernel's register path runs (head_dim 64, 128, 256 in
    /// f16/bf16, 32, 64, 128 in f32, with 16-byte aligned new rows) this is one launch: the
    /// kernel reads the new tokens straight from `k_new`/`v_new`, one block per sequence
    /// writes them into the cache and the device-side lengths advance at the end. Elsewhere
    /// it is [`KvCache::append`] and the attention call, two launches. The results are the
    /// same either way; on an error nothing is appended.
    pub fn forward_cached_append(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k_new: &DeviceTensor,
        v_new: &DeviceTensor,
        cache: &mut KvCache,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        // Everything is checked before the cache changes: a refused call appends nothing.
        let n = cache.check_append(k_new, v_new)?;
        check_usable(&[q, k_new, v_new], &[out])?;
        let (p, out_strides) = self.prepare_cached(config, q, cache, out, n)?;
        let counts = vec![n; cache.batch()];
        cache.reserve(&counts)?;
        let Some(new) = self.fused_append(&p, k_new, v_new, n, cache) else {
            cache.append(k_new, v_new)?;
            return self.launch_cached(&p, q, cache, out, out_strides, None);
        };
        // Same-stream order makes the launch below see the appended rows only on the
        // two-launch route; here the kernel reads them from k_new / v_new.
        let path = self.launch_cached(&p, q, cache, out, out_strides, Some(new))?;
        cache.commit(&counts);
        Ok(path)
    }

    /// The checks of a cached call whose cache will hold `extra` more tokens per sequence.
    fn prepare_cached(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &DeviceTensor,
        extra: usize,
    ) -> Result<(AttentionProblem, HeadStrides)> {
        let parts = cache.raw_parts();
        check_usable(&[q, parts.k, parts.v, parts.seq_lens], &[out])?;
        let (p, out_strides) = cache.problem(config, q, out, extra)?;
        if p.device != self.device || cache.device() != self.device {
            return Err(AttentionError::DeviceMismatch {
                what: "q / cache".into(),
                expected: self.device.to_string(),
                got: format!("{} / {}", p.device, cache.device()),
            });
        }
        if p.seq_q > MAX_DECODE_QUERIES {
            return Err(AttentionError::NotSupported {
                backend: self.name().into(),
                reason: format!(
                    "forward_cached takes up to {MAX_DECODE_QUERIES} queries per sequence, got {}; use forward_into with KvCache::views",
                    p.seq_q
                ),
            });
        }
        let parts = cache.raw_parts();
        let unsupported = |reason: String| AttentionError::NotSupported {
            backend: self.name().into(),
            reason,
        };
        dispatch::check_kernel_limits(&p).map_err(unsupported)?;
        // A recorded call is cut for the cache's capacity, so that bounds the key indices.
        if cache.capacity() > dispatch::MAX_KERNEL_SEQ {
            return Err(unsupported(format!(
                "cache capacity {} exceeds the decode kernel's limit {}",
                cache.capacity(),
                dispatch::MAX_KERNEL_SEQ
            )));
        }
        // What the decode kernel itself would refuse, refused here, before any append.
        if decode_plan::decode_bucket(p.head_dim).is_none() {
            return Err(unsupported(format!(
                "cached attention runs the decode kernel, built for head_dim up to 256; got {}",
                p.head_dim
            )));
        }
        if !(dispatch::vectors_aligned(parts.k) && dispatch::vectors_aligned(parts.v)) {
            return Err(unsupported(format!(
                "the decode kernel reads cache rows in 16-byte vectors: {} head_dim {} rows are {} bytes; use a head_dim that is a multiple of {}",
                p.dtype,
                p.head_dim,
                p.head_dim * p.dtype.size_in_bytes(),
                16 / p.dtype.size_in_bytes()
            )));
        }
        Ok((p, out_strides))
    }

    /// Queues the decode kernel over `cache` (and the new tokens it appends, if any).
    fn launch_cached(
        &self,
        p: &AttentionProblem,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &DeviceTensor,
        out_strides: HeadStrides,
        append: Option<decode::NewTokens>,
    ) -> Result<AttentionPath> {
        let parts = cache.raw_parts();
        let view = decode::CacheView {
            k: parts.k.device_ptr(),
            v: parts.v.device_ptr(),
            k_strides: parts.strides,
            v_strides: parts.strides,
            seq_lens: parts.seq_lens.device_ptr(),
            block_table: parts.block_table.map_or(0, |t| t.device_ptr()),
            max_pages: parts.max_pages,
            page_size: parts.page_size,
            append,
            capacity: cache.capacity(),
            num_pages: parts.num_pages,
        };
        decode::forward_decode(
            &self.runtime,
            &self.decode_workspace,
            p,
            q,
            out,
            out_strides,
            &view,
        )?;
        Ok(AttentionPath::Flash(FlashKernel::Decode))
    }

    fn prepare(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &DeviceTensor,
    ) -> Result<(AttentionProblem, HeadStrides)> {
        let mut reads = vec![q, k, v];
        reads.extend(mask);
        check_usable(&reads, &[out])?;
        let p = AttentionProblem::new(config, q, k, v, mask)?;
        if p.device != self.device {
            return Err(AttentionError::DeviceMismatch {
                what: "q".into(),
                expected: self.device.to_string(),
                got: p.device.to_string(),
            });
        }
        let mut inputs = vec![q, k, v];
        inputs.extend(mask);
        let out_strides = p.output_strides(config.layout, out, &inputs)?;
        dispatch::check_kernel_limits(&p).map_err(|reason| AttentionError::NotSupported {
            backend: self.name().into(),
            reason,
        })?;
        Ok((p, out_strides))
    }
}

impl DeviceAttentionBackend for GpuAttentionBackend {
    fn name(&self) -> &str {
        "gpu"
    }

    fn device(&self) -> Device {
        self.device
    }

    fn required_kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout::FlashAttention
    }

    /// Every config that validates and whose sizes (batch_size, max_sequence_length,
    /// heads, head_dim) fit the kernels' limits, the same check `forward_into` makes
    /// ([`dispatch::check_sizes`]); some path (flash or unfused) runs each of them.
    fn supports(&self, config: &AttentionConfig) -> super::Support {
        use super::Support;
        if let Err(e) = config.validate() {
            return Support::No(e.to_string());
        }
        match dispatch::check_sizes(
            config.batch_size,
            config.max_sequence_length,
            config.max_sequence_length,
            config.num_heads,
            config.head_dim,
        ) {
            Ok(()) => Support::Yes,
            Err(reason) => Support::No(reason),
        }
    }

    /// [`GpuAttentionBackend::forward_cached`]: the split-KV decode kernel over any cache.
    fn forward_cached(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        // The inherent method (paths resolve to it before the trait's).
        GpuAttentionBackend::forward_cached(self, config, q, cache, out)
    }

    /// Every option that validates, on the flash kernels' extended variants (see
    /// [`GpuAttentionBackend::plan_with`]); refused where no flash kernel takes the config.
    fn supports_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
    ) -> super::Support {
        use super::Support;
        if let Err(e) = options.validate() {
            return Support::No(e.to_string());
        }
        match self.supports(config) {
            Support::Yes if !options.is_default() => {
                // The dtype is the call's; the head_dim and flash switch decide here.
                let input = PlanInput {
                    ext: true,
                    ..self.plan_input_for(config, DType::F16, config.max_sequence_length, false)
                };
                match self.ext_choice(&input) {
                    Ok(_) => Support::Yes,
                    Err(e) => Support::No(e.to_string()),
                }
            }
            other => other,
        }
    }

    /// Options and the log-sum-exp output on the flash kernels' extended variants, at any
    /// query length (a plain call is [`forward_into`](DeviceAttentionBackend::forward_into)).
    #[allow(clippy::too_many_arguments)]
    fn forward_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        if options.is_default() && lse.is_none() {
            return self.forward_into(config, q, k, v, mask, out);
        }
        self.forward_dense_ext(config, options, q, k, v, mask, out, lse)
    }

    /// A packed ragged batch in one launch of the flash kernels' extended variants, every
    /// option included; the offsets are read to the host once to check them.
    #[allow(clippy::too_many_arguments)]
    fn forward_varlen(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        batch: &crate::varlen::VarlenBatch,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        self.forward_packed(config, options, q, k, v, batch, out, lse)
    }

    /// K / V through the caller's block table at any number of queries: the decode kernel
    /// up to 16 per sequence, the flash kernels' extended variants beyond; every option.
    fn forward_paged(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        kv: &crate::paged::PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        self.forward_paged_kv(config, options, q, kv, out, lse)
    }

    /// Packed queries against the caller's pages in one launch of the flash kernels'
    /// extended variants; every option.
    #[allow(clippy::too_many_arguments)]
    fn forward_paged_varlen(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cu_seqlens_q: &DeviceTensor,
        max_seqlen_q: usize,
        kv: &crate::paged::PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        self.forward_paged_packed(config, options, q, cu_seqlens_q, max_seqlen_q, kv, out, lse)
    }

    /// The split-KV decode kernel over any cache (contiguous, paged, ragged; up to
    /// [`MAX_DECODE_QUERIES`] queries) with every per-call option and the log-sum-exp
    /// output: plain options without `lse` take [`forward_cached`](Self::forward_cached)'s
    /// path unchanged, anything else the decode kernel's option variant, whose splits cover
    /// only the keys some query's window reaches. Everything is checked before the launch.
    fn forward_cached_with(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cache: &KvCache,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        if options.is_default() && lse.is_none() {
            options.validate()?;
            return GpuAttentionBackend::forward_cached(self, config, q, cache, out);
        }
        let (p, out_strides) = self.prepare_cached(config, q, cache, out, 0)?;
        let parts = cache.raw_parts();
        let per_head: Vec<&DeviceTensor> = options
            .alibi_slopes
            .iter()
            .chain(options.sinks.iter())
            .collect();
        let mut others = vec![q, parts.k, parts.v, parts.seq_lens];
        others.extend(parts.block_table);
        others.extend(per_head.iter().copied());
        others.push(&*out);
        let lse_strides = options.check(&p, lse.as_deref(), &others)?;
        if let Some(t) = per_head.iter().find(|t| out.may_overlap(t)) {
            return Err(AttentionError::UnsupportedLayout {
                what: "out".into(),
                reason: format!(
                    "overlaps a per-head option tensor (shape {:?}); give it its own memory",
                    t.shape()
                ),
            });
        }
        let lse_out: Vec<&DeviceTensor> = lse.as_deref().into_iter().collect();
        check_usable(&per_head, &lse_out)?;
        let opts = decode::DecodeOptions::new(options, lse.as_deref().zip(lse_strides));
        decode::forward_decode_with(
            &self.runtime,
            &self.decode_workspace,
            &p,
            q,
            out,
            out_strides,
            &decode::CacheView::of_cache(cache),
            &opts,
        )?;
        Ok(AttentionPath::Flash(FlashKernel::Decode))
    }

    fn forward_into(
        &self,
        config: &AttentionConfig,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        mask: Option<&DeviceTensor>,
        out: &mut DeviceTensor,
    ) -> Result<AttentionPath> {
        let (p, out_strides) = self.prepare(config, q, k, v, mask, out)?;
        let plan = self.plan(&PlanInput {
            tf32: self.allow_tf32,
            ..PlanInput::of_call(&p, q, k, v)
        });
        // The flash and unfused paths share one argument block, filled once the plan has
        // chosen one of them (the decode kernel has its own).
        let params = || AttnParams::new(&p, q, k, v, mask, out, out_strides);
        match plan.flash {
            Some(choice) if choice.kernel == FlashKernel::Decode => {
                let cache = decode::CacheView::dense(&p, k, v);
                decode::forward_decode(
                    &self.runtime,
                    &self.decode_workspace,
                    &p,
                    q,
                    out,
                    out_strides,
                    &cache,
                )?
            }
            Some(choice) => {
                flash::forward_flash(&self.runtime, &p, &params(), &choice, TmaLayout::DENSE)?
            }
            None => {
                traditional::forward_traditional(&self.runtime, &self.workspace, &p, &params())?
            }
        }
        Ok(plan.path)
    }
}
