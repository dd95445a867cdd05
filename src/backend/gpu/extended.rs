//! GPU calls with per-call extensions: options (window, softcap, ALiBi, sinks) and the
//! log-sum-exp output on dense operands, and packed ragged (varlen) batches. They run the
//! `_ext` variants of the prefill flash families (every implementation: wgmma, mma.sync,
//! TF32, SIMT), or for up to 16 unmasked dense queries the decode kernel's option variant,
//! as the one dispatch decision picks; the unfused path runs none of them, so a call the
//! flash kernels cannot take is refused with the reason.

use super::dispatch::{self, FlashChoice, PlanInput};
use super::params::ParamsExt;
use super::{decode, flash, GpuAttentionBackend};
use crate::backend::{AttentionPath, DeviceAttentionBackend, FlashKernel};
use crate::config::AttentionConfig;
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{AttnParams, Strides3};
use crate::options::AttentionOptions;
use crate::problem::{AttentionProblem, HeadStrides};
use crate::tensor::{check_usable, DeviceTensor};
use crate::varlen::{check_packed, check_packed_queries, on_device, VarlenBatch};

impl GpuAttentionBackend {
    /// The extended flash variant that runs `input` (`input.ext` set), or the refusal.
    pub(crate) fn ext_choice(&self, input: &PlanInput) -> Result<FlashChoice> {
        let input = PlanInput {
            ext: true,
            ..*input
        };
        self.can_use_flash_attention(&input)
            .map_err(|reason| AttentionError::NotSupported {
                backend: self.name().into(),
                reason: format!(
                    "per-call options, the log-sum-exp output and packed batches run on the flash kernels only, and none takes this call: {reason}"
                ),
            })
    }

    /// [`DeviceAttentionBackend::forward_with`] with options or an `lse` output.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_dense_ext(
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
        let (p, out_strides) = self.prepare(config, q, k, v, mask, out)?;
        let mut others = vec![q, k, v];
        others.extend(mask);
        others.push(&*out);
        let lse_strides = options.check(&p, lse.as_deref(), &others)?;
        check_extension_tensors(options, lse.as_deref(), out)?;
        let choice = self.ext_choice(&PlanInput {
            tf32: self.allow_tf32,
            ..PlanInput::of_call(&p, q, k, v)
        })?;
        if choice.kernel == FlashKernel::Decode {
            let opts = decode::DecodeOptions::new(options, lse.as_deref().zip(lse_strides));
            decode::forward_dense_with(
                &self.runtime,
                &self.decode_workspace,
                &p,
                q,
                k,
                v,
                out,
                out_strides,
                &opts,
            )?;
            return Ok(AttentionPath::Flash(choice.kernel));
        }
        let lse = lse
            .zip(lse_strides)
            .map(|(l, st)| (l.device_ptr(), Strides3::new(st.batch, st.head, st.query)));
        let ext = ParamsExt::new(options, lse);
        let params = AttnParams::new(&p, q, k, v, mask, out, out_strides).with_ext(&ext);
        flash::forward_flash(&self.runtime, &p, &params, &choice)?;
        Ok(AttentionPath::Flash(choice.kernel))
    }

    /// [`DeviceAttentionBackend::forward_varlen`]: one launch over every sequence, each
    /// block reading its sequence's rows through the offsets. The offsets are read to the
    /// host once to check them (and to size the grid by the longest sequence).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_packed(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        batch: &VarlenBatch,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let dev = self.device;
        let pq = check_packed_queries(config, options, q, &[q, k, v], out, lse.as_deref(), dev)?;
        let (hkv, d, dtype) = (config.num_kv_heads, config.head_dim, q.dtype());
        on_device("k", k, dev)?;
        on_device("v", v, dev)?;
        let ks = check_packed("k", k, None, hkv, d, dtype, dev)?;
        let total_k = k.shape()[0];
        let vs = check_packed("v", v, Some(total_k), hkv, d, dtype, dev)?;
        on_device("cu_seqlens_q", &batch.cu_seqlens_q, dev)?;
        on_device("cu_seqlens_k", &batch.cu_seqlens_k, dev)?;
        check_usable(
            &[q, k, v, &batch.cu_seqlens_q, &batch.cu_seqlens_k],
            &[&*out],
        )?;
        check_extension_tensors(options, lse.as_deref(), out)?;
        let total_q = q.shape()[0];
        let offs = batch.validate(total_q, total_k, dev)?;
        let nb = offs.batch();
        let longest = |r: &dyn Fn(usize) -> std::ops::Range<usize>| {
            (0..nb).map(|b| r(b).len()).max().unwrap_or(0)
        };
        let (max_q, max_k) = (longest(&|b| offs.q_range(b)), longest(&|b| offs.k_range(b)));
        let unsupported = |reason: String| AttentionError::NotSupported {
            backend: self.name().into(),
            reason,
        };
        dispatch::check_sizes(nb, max_q, max_k, config.num_heads, d).map_err(unsupported)?;
        let packed = |(seq, head): (usize, usize)| HeadStrides {
            batch: 0,
            head,
            seq,
        };
        // The grid's problem: every sequence padded to the longest; the kernels stop at
        // each sequence's own length.
        let p = AttentionProblem {
            batch: nb,
            seq_q: max_q,
            seq_k: max_k,
            num_heads: config.num_heads,
            num_kv_heads: hkv,
            head_dim: d,
            scale: config.effective_scale(),
            causal: config.is_causal,
            dtype,
            device: dev,
            q: packed(pq.q),
            k: packed(ks),
            v: packed(vs),
            mask: None,
        };
        let choice = self.ext_choice(&PlanInput {
            tf32: self.allow_tf32,
            qkv_aligned: dispatch::chunk_aligned(&p, q, k, v),
            packed: true,
            ..PlanInput::of(&p)
        })?;
        if max_q == 0 {
            // No query row: nothing to write.
            return Ok(AttentionPath::Flash(choice.kernel));
        }
        let lse = lse
            .zip(pq.lse)
            .map(|(l, (head, row))| (l.device_ptr(), Strides3::new(0, head, row)));
        let ext = ParamsExt::new(options, lse).packed(
            batch.cu_seqlens_q.device_ptr(),
            batch.cu_seqlens_k.device_ptr(),
        );
        let params = AttnParams::new(&p, q, k, v, None, out, packed(pq.out)).with_ext(&ext);
        flash::forward_flash(&self.runtime, &p, &params, &choice)?;
        Ok(AttentionPath::Flash(choice.kernel))
    }
}

/// The options' per-head tensors (read) and the log-sum-exp output (written): usable
/// (borrows alive), and not overlapped by `out`.
fn check_extension_tensors(
    options: &AttentionOptions,
    lse: Option<&DeviceTensor>,
    out: &DeviceTensor,
) -> Result<()> {
    let reads: Vec<&DeviceTensor> = options
        .alibi_slopes
        .iter()
        .chain(options.sinks.iter())
        .collect();
    if let Some(t) = reads.iter().find(|t| out.may_overlap(t)) {
        return Err(AttentionError::UnsupportedLayout {
            what: "out".into(),
            reason: format!(
                "overlaps a per-head option tensor (shape {:?}); give it its own memory",
                t.shape()
            ),
        });
    }
    let writes: Vec<&DeviceTensor> = lse.into_iter().collect();
    check_usable(&reads, &writes)
}
