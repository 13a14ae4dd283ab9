//! CUDA code of attention: `attention.cu` (f32) or, in bf16-mixed precision with head_dim > 32,
//! `attention_tc.cu` (tensor cores), both beside this file with their descriptors in `kernels.rs`;
//! the backward preprocess is always the f32 one.

use super::kernels::{self as k, AttentionKernel, AttentionPath};
use crate::cuda::kernel_prelude::*;
use crate::ops::attention;

/// (B, H, Tq, Tk, hd) as the kernels' int arguments.
type Dims = (i32, i32, i32, i32, i32);

impl CudaBackend {
    fn attention_path(&self, op: &'static str, s: &AttentionShape) -> Result<AttentionPath> {
        AttentionPath::choose(s.head_dim, self.opts.precision == Precision::Bf16Mixed)
            .map_err(|detail| RuntimeError::Invalid { op, detail })
    }

    fn attention_dims(&self, op: &'static str, s: &AttentionShape) -> Result<Dims> {
        Ok((
            int(op, "batch", s.batch)?,
            int(op, "heads", s.heads)?,
            int(op, "q_len", s.q_len)?,
            int(op, "kv_len", s.kv_len)?,
            int(op, "head_dim", s.head_dim)?,
        ))
    }

    pub(crate) fn attention_forward_cuda(&self, a: attention::Forward<'_, CudaBuf, CudaIds>) -> Result<()> {
        let attention::Forward { out, lse, x: attention::Inputs { q, k, v, mask }, shape } = a;
        let op = "attention_forward";
        let path = self.attention_path(op, &shape)?;
        let l = cfg(op, path.grid(AttentionKernel::Forward, &shape))?;
        let (b, h, tq, tk, hd) = self.attention_dims(op, &shape)?;
        let (mask, causal, scale) = mask_causal_scale(mask, &shape);
        let args = (mut_ptr(out), mut_ptr(lse), ptr(q), ptr(k), ptr(v), mask, b, h, tq, tk, hd, causal, scale);
        // SAFETY: attention_{,tc_}fwd_*(out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale):
        // q/out hold B·Tq·H·hd, k/v B·Tk·H·hd, lse B·H·Tq floats, mask B·Tk ints or null (all
        // checked); the hd variant serves head_dim and the dynamic shared memory was raised.
        unsafe { self.call_kernel(path.forward(), l, args) }
    }

    pub(crate) fn attention_backward_cuda(&self, a: attention::Backward<'_, CudaBuf, CudaIds>) -> Result<()> {
        let attention::Backward { dq, dk, dv, dout, x: attention::Inputs { q, k, v, mask }, out, lse, shape } = a;
        let op = "attention_backward";
        let path = self.attention_path(op, &shape)?;
        let (b, h, tq, tk, hd) = self.attention_dims(op, &shape)?;
        let mut guard = self.scratch();
        let d = DevicePtr(raw_ptr(guard.f32_a.get(&self.dev.stream, &self.dev.memory, shape.lse_len())?));
        let l = cfg(op, k::preprocess_grid(&shape))?;
        // SAFETY: attention_bwd_preprocess_f32(D, dout, out, B, H, Tq, hd) writes B·H·Tq floats of
        // D (the scratch holds lse_len) from dout and out (B·Tq·H·hd each). The f32 version serves
        // both paths (attention_tc.cu's header: f32 I/O uses attention.cu's preprocess).
        unsafe { self.call_kernel(k::BWD_PREPROCESS_F32, l, (d, ptr(dout), ptr(out), b, h, tq, hd))? };
        let (mask, causal, scale) = mask_causal_scale(mask, &shape);
        // What both backward kernels read after their outputs.
        let (pdo, pq, pk, pv, plse) = (ptr(dout), ptr(q), ptr(k), ptr(v), ptr(lse));
        let l = cfg(op, path.grid(AttentionKernel::BackwardDkDv, &shape))?;
        let args = (mut_ptr(dk), mut_ptr(dv), pdo, pq, pk, pv, plse, d, mask, b, h, tq, tk, hd, causal, scale);
        // SAFETY: *_bwd_dkdv_*(dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal,
        // scale): dk/dv overwritten (B·Tk·H·hd each), inputs with the checked lengths, D written
        // just above.
        unsafe { self.call_kernel(path.backward_dkdv(), l, args)? };
        let l = cfg(op, path.grid(AttentionKernel::BackwardDq, &shape))?;
        let args = (mut_ptr(dq), pdo, pq, pk, pv, plse, d, mask, b, h, tq, tk, hd, causal, scale);
        // SAFETY: *_bwd_dq_*(dq, dout, ...): dq overwritten (B·Tq·H·hd), the rest as above.
        unsafe { self.call_kernel(path.backward_dq(), l, args) }
    }
}

/// The mask pointer (null without a mask), the causal flag and the softmax scale 1/√hd.
fn mask_causal_scale(mask: Option<&CudaIds>, s: &AttentionShape) -> (DevicePtr, i32, f32) {
    (DevicePtr(mask.map_or(0, CudaIds::device_ptr)), s.causal as i32, 1.0 / (s.head_dim as f32).sqrt())
}
