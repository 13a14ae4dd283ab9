//! CUDA code of the embeddings: `embedding.cu` beside this file (the backward with atomicAdd;
//! descriptors in `kernels.rs`).

use super::kernels::{self as k, EmbeddingArgs};
use super::VocabRange;
use crate::cuda::kernel_prelude::*;
use crate::ops::embedding;

impl CudaBackend {
    /// The grid and arguments of both embedding kernels: (rows written, rows read, ids, n_ids,
    /// dim, vocab start, vocab end).
    fn embedding_call(
        op: &'static str,
        (dst, src): (DevicePtr, DevicePtr),
        ids: &CudaIds,
        range: &VocabRange,
        dim: usize,
    ) -> Result<(KernelGrid, EmbeddingArgs)> {
        let l = cfg(op, k::embedding(ids.len(), dim))?;
        let args = (
            dst,
            src,
            DevicePtr(ids.device_ptr()),
            int(op, "ids", ids.len())?,
            int(op, "dim", dim)?,
            int(op, "vocab start", range.start)?,
            int(op, "vocab end", range.end)?,
        );
        Ok((l, args))
    }

    pub(crate) fn embedding_forward_cuda(&self, a: embedding::Forward<'_, CudaBuf, CudaIds>) -> Result<()> {
        let embedding::Forward { out, table, ids, range, dim } = a;
        if ids.is_empty() {
            return Ok(());
        }
        let (l, args) = Self::embedding_call("embedding_forward", (mut_ptr(out), ptr(table)), ids, &range, dim)?;
        // SAFETY: embedding_forward_f32(out, table, ids, n_ids, dim, start, end): reads table rows
        // only for ids in [start, end) (range.len() rows held), writes n_ids·dim floats.
        unsafe { self.call_kernel(k::FORWARD, l, args) }
    }
    pub(crate) fn embedding_backward_cuda(&self, a: embedding::Backward<'_, CudaBuf, CudaIds>) -> Result<()> {
        let embedding::Backward { dtable, dout, ids, range, dim } = a;
        if ids.is_empty() {
            return Ok(());
        }
        let (l, args) = Self::embedding_call("embedding_backward", (mut_ptr(dtable), ptr(dout)), ids, &range, dim)?;
        // SAFETY: embedding_backward_f32(dtable, dout, ids, n_ids, dim, start, end): atomically
        // adds into rows of ids in range (range.len() rows held), reads n_ids·dim floats of dout.
        unsafe { self.call_kernel(k::BACKWARD, l, args) }
    }
}
