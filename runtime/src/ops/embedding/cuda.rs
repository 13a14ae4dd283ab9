//! CUDA code of the embeddings: `kernels/cuda/embedding.cu` (the backward with atomicAdd).

use crate::cuda::kernel_prelude::*;
use crate::ops::embedding;

impl CudaBackend {
    pub(crate) fn embedding_forward_cuda(&self, a: embedding::Forward<'_, CudaBuf, CudaIds>) -> Result<()> {
        let embedding::Forward { out, table, ids, range, dim } = a;
        let op = "embedding_forward";
        if ids.is_empty() {
            return Ok(());
        }
        let l = cfg(op, lc::embedding(ids.len(), dim))?;
        let args = [
            mut_ptr(out),
            ptr(table),
            Arg::P(ids.device_ptr()),
            Arg::I(int(op, "ids", ids.len())?),
            Arg::I(int(op, "dim", dim)?),
            Arg::I(int(op, "vocab start", range.start)?),
            Arg::I(int(op, "vocab end", range.end)?),
        ];
        // SAFETY: embedding_forward_f32(out, table, ids, n_ids, dim, start, end): reads table rows
        // only for ids in [start, end) (range.len() rows held), writes n_ids·dim floats.
        unsafe { self.call_kernel("embedding", "embedding_forward_f32", l, &args) }
    }
    pub(crate) fn embedding_backward_cuda(&self, a: embedding::Backward<'_, CudaBuf, CudaIds>) -> Result<()> {
        let embedding::Backward { dtable, dout, ids, range, dim } = a;
        let op = "embedding_backward";
        if ids.is_empty() {
            return Ok(());
        }
        let l = cfg(op, lc::embedding(ids.len(), dim))?;
        let args = [
            mut_ptr(dtable),
            ptr(dout),
            Arg::P(ids.device_ptr()),
            Arg::I(int(op, "ids", ids.len())?),
            Arg::I(int(op, "dim", dim)?),
            Arg::I(int(op, "vocab start", range.start)?),
            Arg::I(int(op, "vocab end", range.end)?),
        ];
        // SAFETY: embedding_backward_f32(dtable, dout, ids, n_ids, dim, start, end): atomically
        // adds into rows of ids in range (range.len() rows held), reads n_ids·dim floats of dout.
        unsafe { self.call_kernel("embedding", "embedding_backward_f32", l, &args) }
    }
}
