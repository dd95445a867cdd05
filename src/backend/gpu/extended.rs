//! GPU calls with per-call extensions: options (window, softcap, ALiBi, sinks) and the
//! log-sum-exp output on dense operands, packed ragged (varlen) batches, and K / V on the
//! caller's pages (any number of queries per sequence). They run the
//! `_ext` variants of the prefill flash families (every implementation: wgmma, mma.sync,
//! TF32, SIMT), or for up to 16 unmasked dense queries the decode kernel's option variant,
//! as the one dispatch decision picks; the unfused path runs none of them, so a call the
//! flash kernels cannot take is refused with the reason.

use super::dispatch::{self, FlashChoice, PlanInput};
use super::params::ParamsExt;
use super::tma_operands::{TmaLayout, TmaRows};
use super::{decode, flash, GpuAttentionBackend};
use crate::backend::{AttentionPath, DeviceAttentionBackend, FlashKernel};
use crate::config::AttentionConfig;
use crate::error::{AttentionError, Result};
use crate::kernels::abi::{AttnParams, Strides3};
use crate::options::AttentionOptions;
use crate::paged::{PagedGeometry, PagedKv};
use crate::problem::{AttentionProblem, CachedKeys, HeadStrides};
use crate::tensor::{check_usable, DeviceTensor};
use crate::varlen::{check_packed_keys, check_packed_queries, on_device, VarlenBatch};

impl GpuAttentionBackend {
    /// Queues the extended flash variant `choice` for `p`: the argument block of the
    /// operands with `ext` filled in.
    #[allow(clippy::too_many_arguments)]
    fn launch_ext(
        &self,
        p: &AttentionProblem,
        choice: &FlashChoice,
        [q, k, v]: [&DeviceTensor; 3],
        mask: Option<&DeviceTensor>,
        out: &DeviceTensor,
        out_strides: HeadStrides,
        ext: &ParamsExt,
        layout: TmaLayout,
    ) -> Result<AttentionPath> {
        let params = AttnParams::new(p, q, k, v, mask, out, out_strides).with_ext(ext);
        flash::forward_flash(&self.runtime, p, &params, choice, layout)?;
        Ok(AttentionPath::Flash(choice.kernel))
    }

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
        self.launch_ext(
            &p,
            &choice,
            [q, k, v],
            mask,
            out,
            out_strides,
            &ext,
            TmaLayout::DENSE,
        )
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
        let (ks, vs) = check_packed_keys(config, q, k, v, batch, dev)?;
        check_usable(
            &[q, k, v, &batch.cu_seqlens_q, &batch.cu_seqlens_k],
            &[&*out],
        )?;
        check_extension_tensors(options, lse.as_deref(), out)?;
        // The borrows are checked above, before the offsets are read.
        let offs = batch.validate(q.shape()[0], k.shape()[0], dev)?;
        let nb = offs.batch();
        let (max_q, max_k) = offs.longest();
        let unsupported = |reason: String| AttentionError::NotSupported {
            backend: self.name().into(),
            reason,
        };
        dispatch::check_sizes(nb, max_q, max_k, config.num_heads, config.head_dim)
            .map_err(unsupported)?;
        let packed = |(seq, head): (usize, usize)| HeadStrides {
            batch: 0,
            head,
            seq,
        };
        // The grid's problem: every sequence padded to the longest; the kernels stop at
        // each sequence's own length.
        let p = grid_problem(
            config,
            q,
            nb,
            (max_q, max_k),
            [packed(pq.q), packed(ks), packed(vs)],
        );
        let layout = TmaLayout {
            q: TmaRows::Packed {
                total: q.shape()[0],
            },
            kv: TmaRows::Packed {
                total: k.shape()[0],
            },
        };
        let choice = self.ext_choice(&PlanInput {
            tf32: self.allow_tf32,
            qkv_aligned: dispatch::chunk_aligned(&p, q, k, v),
            packed: true,
            tma: dispatch::tma_plan_flag(&p, [q, k, v], layout),
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
        self.launch_ext(
            &p,
            &choice,
            [q, k, v],
            None,
            out,
            packed(pq.out),
            &ext,
            layout,
        )
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

impl GpuAttentionBackend {
    /// The checked problem of a paged call: `q` against `kv`'s geometry, its output
    /// strides and the log-sum-exp strides (queries are dense here; see
    /// [`forward_paged_packed`](Self::forward_paged_packed) for packed ones).
    #[allow(clippy::type_complexity)]
    fn paged_problem(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        kv: &PagedKv,
        out: &DeviceTensor,
        lse: Option<&DeviceTensor>,
    ) -> Result<(
        AttentionProblem,
        HeadStrides,
        Option<crate::options::LseStrides>,
        PagedGeometry,
    )> {
        let dev = self.device;
        on_device("q", q, dev)?;
        let g = kv.check_for_call(config, q, dev)?;
        let keys = CachedKeys {
            batch: g.batch,
            num_kv_heads: g.num_kv_heads,
            head_dim: g.head_dim,
            dtype: kv.dtype(),
            device: dev,
            // Sequences of length 0 read no key; one key slot keeps the problem valid.
            max_len: g.lens.iter().copied().max().unwrap_or(0).max(1),
            strides: kv.strides_of(&kv.k_pages),
        };
        let mut p = AttentionProblem::cached(config, q, &keys, 0)?;
        p.v = kv.strides_of(&kv.v_pages);
        let mut inputs = vec![q, &kv.k_pages, &kv.v_pages, &kv.block_table, &kv.seq_lens];
        inputs.extend(options.alibi_slopes.as_ref());
        inputs.extend(options.sinks.as_ref());
        let os = p.output_strides(config.layout, out, &inputs)?;
        let mut others = inputs.clone();
        others.push(out);
        let lse_strides = options.check(&p, lse, &others)?;
        check_usable(&inputs, &[out])?;
        check_extension_tensors(options, lse, out)?;
        self.check_paged_limits(&p, kv, &g)?;
        Ok((p, os, lse_strides, g))
    }

    /// The kernels' 32-bit limits for a paged call.
    fn check_paged_limits(
        &self,
        p: &AttentionProblem,
        kv: &PagedKv,
        g: &PagedGeometry,
    ) -> Result<()> {
        let capacity = g.max_pages.checked_mul(kv.page_size);
        let fits = capacity
            .ok_or_else(|| "max_pages * page_size overflows".to_string())
            .and_then(|cap| dispatch::check_sizes(p.batch, p.seq_q, cap, p.num_heads, p.head_dim))
            .and_then(|()| dispatch::check_sizes(g.num_pages, g.max_pages, kv.page_size, 1, 1));
        fits.map_err(|reason| AttentionError::NotSupported {
            backend: self.name().into(),
            reason,
        })
    }

    /// [`DeviceAttentionBackend::forward_paged`]: up to 16 queries per sequence on the
    /// decode kernel (its option variant when options or an lse are given), longer query
    /// blocks on the flash kernels' extended variants reading K / V through the block
    /// table; as [`dispatch`] decides. The block table and lengths are read to the host
    /// once to check them.
    pub(super) fn forward_paged_kv(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        kv: &PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let (p, os, lse_strides, g) =
            self.paged_problem(config, options, q, kv, out, lse.as_deref())?;
        let (k, v) = (&kv.k_pages, &kv.v_pages);
        let layout = TmaLayout {
            q: TmaRows::PerBatch,
            kv: TmaRows::Paged {
                num_pages: g.num_pages,
                page_size: kv.page_size,
            },
        };
        let choice = self.ext_choice(&PlanInput {
            tf32: self.allow_tf32,
            kv_aligned: dispatch::vectors_aligned(k) && dispatch::vectors_aligned(v),
            qkv_aligned: dispatch::chunk_aligned(&p, q, k, v),
            paged: true,
            tma: dispatch::tma_plan_flag(&p, [q, k, v], layout),
            ..PlanInput::of(&p)
        })?;
        if choice.kernel == FlashKernel::Decode {
            let view = decode::CacheView {
                k: k.device_ptr(),
                v: v.device_ptr(),
                k_strides: p.k,
                v_strides: p.v,
                seq_lens: kv.seq_lens.device_ptr(),
                block_table: kv.block_table.device_ptr(),
                max_pages: g.max_pages,
                page_size: kv.page_size,
                append: None,
                // What the table can address: a replay with longer sequences stays covered.
                capacity: g.max_pages * kv.page_size,
                num_pages: g.num_pages,
            };
            let opts = decode::DecodeOptions::new(options, lse.as_deref().zip(lse_strides));
            decode::forward_decode_with(
                &self.runtime,
                &self.decode_workspace,
                &p,
                q,
                out,
                os,
                &view,
                &opts,
            )?;
            return Ok(AttentionPath::Flash(choice.kernel));
        }
        let lse = lse
            .zip(lse_strides)
            .map(|(l, st)| (l.device_ptr(), Strides3::new(st.batch, st.head, st.query)));
        let ext = ParamsExt::new(options, lse).paged(
            kv.block_table.device_ptr(),
            kv.seq_lens.device_ptr(),
            g.max_pages,
            kv.page_size,
        );
        self.launch_ext(&p, &choice, [q, k, v], None, out, os, &ext, layout)
    }

    /// [`DeviceAttentionBackend::forward_paged_varlen`]: packed queries against paged K / V
    /// in one launch of the flash kernels' extended variants.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_paged_packed(
        &self,
        config: &AttentionConfig,
        options: &AttentionOptions,
        q: &DeviceTensor,
        cu_seqlens_q: &DeviceTensor,
        max_seqlen_q: usize,
        kv: &PagedKv,
        out: &mut DeviceTensor,
        lse: Option<&mut DeviceTensor>,
    ) -> Result<AttentionPath> {
        let dev = self.device;
        let pools = [q, &kv.k_pages, &kv.v_pages];
        let pq = check_packed_queries(config, options, q, &pools, out, lse.as_deref(), dev)?;
        on_device("cu_seqlens_q", cu_seqlens_q, dev)?;
        let g = kv.check_for_call(config, q, dev)?;
        check_usable(
            &[
                q,
                &kv.k_pages,
                &kv.v_pages,
                &kv.block_table,
                &kv.seq_lens,
                cu_seqlens_q,
            ],
            &[&*out],
        )?;
        check_extension_tensors(options, lse.as_deref(), out)?;
        let total_q = q.shape()[0];
        let offs = g.query_offsets(cu_seqlens_q, total_q, max_seqlen_q, dev)?;
        let max_q = offs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let max_len = g.lens.iter().copied().max().unwrap_or(0).max(1);
        let qs = HeadStrides {
            batch: 0,
            head: pq.q.1,
            seq: pq.q.0,
        };
        let kvs = [kv.strides_of(&kv.k_pages), kv.strides_of(&kv.v_pages)];
        let p = grid_problem(config, q, g.batch, (max_q, max_len), [qs, kvs[0], kvs[1]]);
        self.check_paged_limits(&p, kv, &g)?;
        let (k, v) = (&kv.k_pages, &kv.v_pages);
        let layout = TmaLayout {
            q: TmaRows::Packed { total: total_q },
            kv: TmaRows::Paged {
                num_pages: g.num_pages,
                page_size: kv.page_size,
            },
        };
        let choice = self.ext_choice(&PlanInput {
            tf32: self.allow_tf32,
            qkv_aligned: dispatch::chunk_aligned(&p, q, k, v),
            packed: true,
            paged: true,
            tma: dispatch::tma_plan_flag(&p, [q, k, v], layout),
            ..PlanInput::of(&p)
        })?;
        if max_q == 0 {
            return Ok(AttentionPath::Flash(choice.kernel));
        }
        let lse = lse
            .zip(pq.lse)
            .map(|(l, (head, row))| (l.device_ptr(), Strides3::new(0, head, row)));
        let ext = ParamsExt::new(options, lse)
            .packed(cu_seqlens_q.device_ptr(), 0)
            .paged(
                kv.block_table.device_ptr(),
                kv.seq_lens.device_ptr(),
                g.max_pages,
                kv.page_size,
            );
        let os = HeadStrides {
            batch: 0,
            head: pq.out.1,
            seq: pq.out.0,
        };
        self.launch_ext(&p, &choice, [q, k, v], None, out, os, &ext, layout)
    }
}

/// The problem a packed call's grid is sized by: `batch` sequences padded to the longest
/// (`seq_q`, `seq_k`) (the kernels stop at each sequence's own length), Q / K / V element
/// strides `[q, k, v]`, `q`'s dtype and device, no mask.
fn grid_problem(
    config: &AttentionConfig,
    q: &DeviceTensor,
    batch: usize,
    (seq_q, seq_k): (usize, usize),
    [qs, ks, vs]: [HeadStrides; 3],
) -> AttentionProblem {
    AttentionProblem {
        batch,
        seq_q,
        seq_k,
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        scale: config.effective_scale(),
        causal: config.is_causal,
        dtype: q.dtype(),
        device: q.device(),
        q: qs,
        k: ks,
        v: vs,
        mask: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::dtype::DType;

    #[test]
    fn an_output_over_a_per_head_tensor_is_refused() {
        let out = DeviceTensor::zeros(&[8], DType::F32, Device::Cpu).unwrap();
        let slopes = out.narrow(0, 0, 4).unwrap();
        let o = AttentionOptions::new().with_alibi_slopes(slopes);
        let e = check_extension_tensors(&o, None, &out).unwrap_err();
        assert!(
            matches!(&e, AttentionError::UnsupportedLayout { what, reason } if what == "out" && reason.contains("per-head")),
            "{e:?}"
        );
        let own = DeviceTensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
        let o = AttentionOptions::new().with_sinks(own);
        assert!(check_extension_tensors(&o, None, &out).is_ok());
    }

    #[test]
    fn the_grid_problem_takes_the_longest_sequence_and_the_given_strides() {
        let config = AttentionConfig::new(4 * 16, 4, 64)
            .with_num_kv_heads(2)
            .with_causal(true)
            .with_scale(0.25);
        let q = DeviceTensor::zeros(&[10, 4, 16], DType::BF16, Device::Cpu).unwrap();
        let s = |head, seq| HeadStrides {
            batch: 0,
            head,
            seq,
        };
        let p = grid_problem(&config, &q, 3, (7, 40), [s(16, 64), s(16, 32), s(1, 2)]);
        assert_eq!((p.batch, p.seq_q, p.seq_k), (3, 7, 40));
        assert_eq!((p.num_heads, p.num_kv_heads, p.head_dim), (4, 2, 16));
        assert_eq!((p.scale, p.causal, p.dtype), (0.25, true, DType::BF16));
        assert_eq!((p.q, p.k, p.v), (s(16, 64), s(16, 32), s(1, 2)));
        assert!(p.mask.is_none());
    }
}
