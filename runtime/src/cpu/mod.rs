//! The CPU backend: the f32 reference every other backend is checked against, and what CI and
//! laptops train with. Ops are plain functions over slices in the submodules (one file per op
//! family); [`CpuBackend`] checks lengths and dispatches. Threads come from rayon's global pool;
//! GEMMs go through the `gemm` crate (AVX2/AVX-512 kernels picked at run time).

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod glu;
pub mod layernorm;
pub mod math;
pub mod matmul;

use crate::backend::{AdamWStep, AttentionShape, Backend, KeyMask, MatmulSpec, VocabRange};
use crate::checks::{
    check_attention, check_embedding, check_layernorm, check_len, check_prefix, check_valid, rows_of, LayerNormLens,
};
use crate::error::{Result, RuntimeError};
use crate::memory::{MemoryTracker, Reservation};

/// An f32 buffer in host memory, registered with the device's memory tracker.
#[derive(Debug)]
pub struct CpuBuf {
    data: Vec<f32>,
    _reservation: Reservation,
}

impl CpuBuf {
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// An i32 buffer in host memory (token ids, masks).
#[derive(Debug)]
pub struct CpuIds {
    data: Vec<i32>,
    _reservation: Reservation,
}

impl CpuIds {
    pub fn as_slice(&self) -> &[i32] {
        &self.data
    }
}

/// The CPU device. Cheap to clone; clones share the memory tracker.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    memory: MemoryTracker,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::with_budget("cpu", None)
    }
    /// A CPU device with a memory budget in bytes (`None` = unlimited), named e.g. `cpu:rank3`.
    pub fn with_budget(name: &str, budget_bytes: Option<u64>) -> Self {
        Self { memory: MemoryTracker::new(name, budget_bytes) }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn name(&self) -> String {
        self.memory.device().to_string()
    }
    fn memory(&self) -> &MemoryTracker {
        &self.memory
    }

    fn zeros(&self, name: &str, len: usize) -> Result<CpuBuf> {
        let reservation = self.memory.reserve(name, (len * 4) as u64)?;
        Ok(CpuBuf { data: vec![0.0; len], _reservation: reservation })
    }
    fn upload(&self, name: &str, data: &[f32]) -> Result<CpuBuf> {
        let reservation = self.memory.reserve(name, std::mem::size_of_val(data) as u64)?;
        Ok(CpuBuf { data: data.to_vec(), _reservation: reservation })
    }
    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
    }
    fn upload_ids(&self, name: &str, ids: &[i32]) -> Result<CpuIds> {
        let reservation = self.memory.reserve(name, std::mem::size_of_val(ids) as u64)?;
        Ok(CpuIds { data: ids.to_vec(), _reservation: reservation })
    }
    fn buf_len(&self, buf: &CpuBuf) -> usize {
        buf.data.len()
    }
    fn ids_len(&self, ids: &CpuIds) -> usize {
        ids.data.len()
    }
    fn write(&self, dst: &mut CpuBuf, offset: usize, data: &[f32]) -> Result<()> {
        let end = offset + data.len();
        if end > dst.data.len() {
            return Err(RuntimeError::Shape {
                op: "write",
                detail: format!("range {offset}..{end} exceeds buffer of {}", dst.data.len()),
            });
        }
        dst.data[offset..end].copy_from_slice(data);
        Ok(())
    }
    fn fill(&self, buf: &mut CpuBuf, value: f32) -> Result<()> {
        elementwise::fill(&mut buf.data, value);
        Ok(())
    }
    fn copy(&self, dst: &mut CpuBuf, dst_off: usize, src: &CpuBuf, src_off: usize, len: usize) -> Result<()> {
        if dst_off + len > dst.data.len() || src_off + len > src.data.len() {
            return Err(RuntimeError::Shape {
                op: "copy",
                detail: format!(
                    "copy of {len} from offset {src_off} (of {}) to offset {dst_off} (of {}) is out of range",
                    src.data.len(),
                    dst.data.len()
                ),
            });
        }
        dst.data[dst_off..dst_off + len].copy_from_slice(&src.data[src_off..src_off + len]);
        Ok(())
    }

    fn add_assign(&self, acc: &mut CpuBuf, x: &CpuBuf) -> Result<()> {
        check_len("add_assign", "x", x.data.len(), acc.data.len())?;
        elementwise::add_assign(&mut acc.data, &x.data);
        Ok(())
    }
    fn add(&self, out: &mut CpuBuf, a: &CpuBuf, b: &CpuBuf) -> Result<()> {
        check_len("add", "a", a.data.len(), out.data.len())?;
        check_len("add", "b", b.data.len(), out.data.len())?;
        elementwise::add(&mut out.data, &a.data, &b.data);
        Ok(())
    }
    fn scale(&self, x: &mut CpuBuf, s: f32) -> Result<()> {
        elementwise::scale(&mut x.data, s);
        Ok(())
    }
    fn sum_squares(&self, x: &CpuBuf) -> Result<f64> {
        Ok(elementwise::sum_squares(&x.data))
    }
    fn add_broadcast_rows(&self, out: &mut CpuBuf, row: &CpuBuf, row_len: usize) -> Result<()> {
        check_prefix("add_broadcast_rows", row.data.len(), row_len)?;
        rows_of("add_broadcast_rows", out.data.len(), row_len)?;
        elementwise::add_broadcast_rows(&mut out.data, &row.data[..row_len]);
        Ok(())
    }
    fn sum_broadcast_rows(&self, acc: &mut CpuBuf, x: &CpuBuf, row_len: usize) -> Result<()> {
        check_prefix("sum_broadcast_rows", acc.data.len(), row_len)?;
        rows_of("sum_broadcast_rows", x.data.len(), row_len)?;
        elementwise::sum_broadcast_rows(&mut acc.data[..row_len], &x.data);
        Ok(())
    }

    fn matmul(&self, out: &mut CpuBuf, a: &CpuBuf, b: &CpuBuf, spec: MatmulSpec) -> Result<()> {
        let lens = [
            ("a", a.data.len(), spec.m * spec.k),
            ("b", b.data.len(), spec.k * spec.n),
            ("out", out.data.len(), spec.m * spec.n),
        ];
        if let Some((what, got, want)) = lens.iter().find(|(_, got, want)| got != want) {
            if std::env::var_os("DM_DEBUG_SHAPES").is_some() {
                eprintln!("{}", std::backtrace::Backtrace::force_capture());
            }
            return Err(RuntimeError::Shape {
                op: "matmul",
                detail: format!("{what} has {got} elements, expected {want} for {spec:?}"),
            });
        }
        matmul::matmul(&mut out.data, &a.data, &b.data, spec);
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut CpuBuf,
        mean: &mut CpuBuf,
        rstd: &mut CpuBuf,
        x: &CpuBuf,
        scale: Option<&CpuBuf>,
        bias: &CpuBuf,
        dim: usize,
    ) -> Result<()> {
        let lens = LayerNormLens {
            x: x.data.len(),
            out: out.data.len(),
            mean: mean.data.len(),
            rstd: rstd.data.len(),
            bias: bias.data.len(),
            scale: scale.map(|s| s.data.len()),
        };
        check_layernorm("layernorm_forward", lens, dim)?;
        layernorm::forward(
            &mut out.data,
            &mut mean.data,
            &mut rstd.data,
            &x.data,
            scale.map(|s| s.as_slice()),
            &bias.data,
            dim,
        );
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dx: &mut CpuBuf,
        dscale: Option<&mut CpuBuf>,
        dbias: &mut CpuBuf,
        dout: &CpuBuf,
        x: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        scale: Option<&CpuBuf>,
        dim: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let rows = rows_of("layernorm_backward", x.data.len(), dim)?;
        check_len("layernorm_backward", "dx", dx.data.len(), x.data.len())?;
        check_len("layernorm_backward", "dout", dout.data.len(), x.data.len())?;
        check_len("layernorm_backward", "mean", mean.data.len(), rows)?;
        check_len("layernorm_backward", "rstd", rstd.data.len(), rows)?;
        check_len("layernorm_backward", "dbias", dbias.data.len(), dim)?;
        if scale.is_some() != dscale.is_some() {
            return Err(RuntimeError::Invalid {
                op: "layernorm_backward",
                detail: "scale and dscale must both be given or both be absent".into(),
            });
        }
        if let Some(s) = scale {
            check_len("layernorm_backward", "scale", s.data.len(), dim)?;
        }
        if let Some(ds) = dscale.as_deref() {
            check_len("layernorm_backward", "dscale", ds.data.len(), dim)?;
        }
        layernorm::backward(
            &mut dx.data,
            dscale.map(|s| s.as_mut_slice()),
            &mut dbias.data,
            &dout.data,
            &x.data,
            &mean.data,
            &rstd.data,
            scale.map(|s| s.as_slice()),
            dim,
            accumulate_dx,
        );
        Ok(())
    }

    fn layernorm_row_sums(&self, sums: &mut CpuBuf, x: &CpuBuf, center: Option<&CpuBuf>, dim: usize) -> Result<()> {
        let rows = rows_of("layernorm_row_sums", x.data.len(), dim)?;
        check_len("layernorm_row_sums", "sums", sums.data.len(), rows)?;
        if let Some(c) = center {
            check_len("layernorm_row_sums", "center", c.data.len(), rows)?;
        }
        layernorm::row_sums(&mut sums.data, &x.data, center.map(|c| c.as_slice()), dim);
        Ok(())
    }
    fn layernorm_finish_stats(&self, sums: &mut CpuBuf, dim_global: usize, squared: bool) -> Result<()> {
        if dim_global == 0 {
            return Err(RuntimeError::Invalid { op: "layernorm_finish_stats", detail: "dim_global is 0".into() });
        }
        layernorm::finish_stats(&mut sums.data, dim_global, squared);
        Ok(())
    }
    fn layernorm_apply(
        &self,
        out: &mut CpuBuf,
        x: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        scale: Option<&CpuBuf>,
        bias: &CpuBuf,
        dim: usize,
    ) -> Result<()> {
        let op = "layernorm_apply";
        let lens = LayerNormLens {
            x: x.data.len(),
            out: out.data.len(),
            mean: mean.data.len(),
            rstd: rstd.data.len(),
            bias: bias.data.len(),
            scale: scale.map(|s| s.data.len()),
        };
        check_layernorm(op, lens, dim)?;
        layernorm::apply(&mut out.data, &x.data, &mean.data, &rstd.data, scale.map(|s| s.as_slice()), &bias.data, dim);
        Ok(())
    }
    fn layernorm_backward_row_sums(
        &self,
        sums: &mut CpuBuf,
        dout: &CpuBuf,
        x: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        scale: Option<&CpuBuf>,
        dim: usize,
    ) -> Result<()> {
        let op = "layernorm_backward_row_sums";
        let rows = rows_of(op, x.data.len(), dim)?;
        check_len(op, "sums", sums.data.len(), 2 * rows)?;
        check_len(op, "dout", dout.data.len(), x.data.len())?;
        check_len(op, "mean", mean.data.len(), rows)?;
        check_len(op, "rstd", rstd.data.len(), rows)?;
        if let Some(s) = scale {
            check_len(op, "scale", s.data.len(), dim)?;
        }
        layernorm::backward_row_sums(
            &mut sums.data,
            &dout.data,
            &x.data,
            &mean.data,
            &rstd.data,
            scale.map(|s| s.as_slice()),
            dim,
        );
        Ok(())
    }
    fn layernorm_backward_apply(
        &self,
        dx: &mut CpuBuf,
        dscale: Option<&mut CpuBuf>,
        dbias: &mut CpuBuf,
        dout: &CpuBuf,
        x: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        scale: Option<&CpuBuf>,
        sums: &CpuBuf,
        dim: usize,
        dim_global: usize,
        accumulate_dx: bool,
    ) -> Result<()> {
        let op = "layernorm_backward_apply";
        let rows = rows_of(op, x.data.len(), dim)?;
        check_len(op, "dx", dx.data.len(), x.data.len())?;
        check_len(op, "dout", dout.data.len(), x.data.len())?;
        check_len(op, "mean", mean.data.len(), rows)?;
        check_len(op, "rstd", rstd.data.len(), rows)?;
        check_len(op, "sums", sums.data.len(), 2 * rows)?;
        check_len(op, "dbias", dbias.data.len(), dim)?;
        if scale.is_some() != dscale.is_some() {
            return Err(RuntimeError::Invalid {
                op,
                detail: "scale and dscale must both be given or both be absent".into(),
            });
        }
        if let Some(s) = scale {
            check_len(op, "scale", s.data.len(), dim)?;
        }
        if let Some(s) = dscale.as_ref() {
            check_len(op, "dscale", s.data.len(), dim)?;
        }
        layernorm::backward_apply(
            &mut dx.data,
            dscale.map(|s| s.as_mut_slice()),
            &mut dbias.data,
            &dout.data,
            &x.data,
            &mean.data,
            &rstd.data,
            scale.map(|s| s.as_slice()),
            &sums.data,
            dim,
            dim_global,
            accumulate_dx,
        );
        Ok(())
    }

    fn gelu_glu_forward(&self, out: &mut CpuBuf, a: &CpuBuf, b: &CpuBuf) -> Result<()> {
        check_len("gelu_glu_forward", "a", a.data.len(), out.data.len())?;
        check_len("gelu_glu_forward", "b", b.data.len(), out.data.len())?;
        glu::forward(&mut out.data, &a.data, &b.data);
        Ok(())
    }
    fn gelu_glu_backward(&self, da: &mut CpuBuf, db: &mut CpuBuf, dout: &CpuBuf, a: &CpuBuf, b: &CpuBuf) -> Result<()> {
        let n = dout.data.len();
        for (what, len) in [("da", da.data.len()), ("db", db.data.len()), ("a", a.data.len()), ("b", b.data.len())] {
            check_len("gelu_glu_backward", what, len, n)?;
        }
        glu::backward(&mut da.data, &mut db.data, &dout.data, &a.data, &b.data);
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut CpuBuf,
        table: &CpuBuf,
        ids: &CpuIds,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        check_embedding("embedding_forward", range, dim)?;
        check_len("embedding_forward", "table", table.data.len(), range.len() * dim)?;
        check_len("embedding_forward", "out", out.data.len(), ids.data.len() * dim)?;
        embedding::forward(&mut out.data, &table.data, &ids.data, range, dim);
        Ok(())
    }
    fn embedding_backward(
        &self,
        dtable: &mut CpuBuf,
        dout: &CpuBuf,
        ids: &CpuIds,
        range: VocabRange,
        dim: usize,
    ) -> Result<()> {
        check_embedding("embedding_backward", range, dim)?;
        check_len("embedding_backward", "dtable", dtable.data.len(), range.len() * dim)?;
        check_len("embedding_backward", "dout", dout.data.len(), ids.data.len() * dim)?;
        embedding::backward(&mut dtable.data, &dout.data, &ids.data, range, dim);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut CpuBuf,
        lse: &mut CpuBuf,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        mask: KeyMask<'_, Self>,
        shape: AttentionShape,
    ) -> Result<()> {
        check_attention(
            "attention_forward",
            &shape,
            q.data.len(),
            k.data.len(),
            v.data.len(),
            mask.map(|m| m.data.len()),
        )?;
        check_len("attention_forward", "out", out.data.len(), q.data.len())?;
        check_len("attention_forward", "lse", lse.data.len(), shape.lse_len())?;
        attention::forward(&mut out.data, &mut lse.data, &q.data, &k.data, &v.data, mask.map(|m| m.as_slice()), shape);
        Ok(())
    }

    fn attention_backward(
        &self,
        dq: &mut CpuBuf,
        dk: &mut CpuBuf,
        dv: &mut CpuBuf,
        dout: &CpuBuf,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        out: &CpuBuf,
        lse: &CpuBuf,
        mask: KeyMask<'_, Self>,
        shape: AttentionShape,
    ) -> Result<()> {
        check_attention(
            "attention_backward",
            &shape,
            q.data.len(),
            k.data.len(),
            v.data.len(),
            mask.map(|m| m.data.len()),
        )?;
        check_len("attention_backward", "dq", dq.data.len(), q.data.len())?;
        check_len("attention_backward", "dk", dk.data.len(), k.data.len())?;
        check_len("attention_backward", "dv", dv.data.len(), v.data.len())?;
        check_len("attention_backward", "dout", dout.data.len(), q.data.len())?;
        check_len("attention_backward", "out", out.data.len(), q.data.len())?;
        check_len("attention_backward", "lse", lse.data.len(), shape.lse_len())?;
        attention::backward(
            attention::Grads { dq: &mut dq.data, dk: &mut dk.data, dv: &mut dv.data },
            &dout.data,
            attention::Inputs { q: &q.data, k: &k.data, v: &v.data, mask: mask.map(|m| m.as_slice()) },
            &out.data,
            &lse.data,
            shape,
        );
        Ok(())
    }

    fn cross_entropy_fused(
        &self,
        logits: &mut CpuBuf,
        losses: &mut CpuBuf,
        targets: &CpuIds,
        classes: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let rows = rows_of("cross_entropy_fused", logits.data.len(), classes)?;
        check_len("cross_entropy_fused", "losses", losses.data.len(), rows)?;
        check_len("cross_entropy_fused", "targets", targets.data.len(), rows)?;
        if let Some((r, &t)) = targets.data.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= classes) {
            return Err(RuntimeError::Invalid {
                op: "cross_entropy_fused",
                detail: format!("target {t} at row {r} is outside 0..{classes}"),
            });
        }
        cross_entropy::fused(&mut logits.data, &mut losses.data, &targets.data, classes, grad_scale);
        Ok(())
    }

    fn vocab_parallel_max(&self, row_max: &mut CpuBuf, logits: &CpuBuf, cols: usize, valid_cols: usize) -> Result<()> {
        let op = "vocab_parallel_max";
        let rows = rows_of(op, logits.data.len(), cols)?;
        check_len(op, "row_max", row_max.data.len(), rows)?;
        check_valid(op, cols, valid_cols)?;
        cross_entropy::vp_max(&mut row_max.data, &logits.data, cols, valid_cols);
        Ok(())
    }
    fn vocab_parallel_sums(
        &self,
        stats: &mut CpuBuf,
        logits: &CpuBuf,
        row_max: &CpuBuf,
        targets: &CpuIds,
        cols: usize,
        valid_cols: usize,
        vocab_start: usize,
    ) -> Result<()> {
        let op = "vocab_parallel_sums";
        let rows = rows_of(op, logits.data.len(), cols)?;
        check_len(op, "stats", stats.data.len(), 2 * rows)?;
        check_len(op, "row_max", row_max.data.len(), rows)?;
        check_len(op, "targets", targets.data.len(), rows)?;
        check_valid(op, cols, valid_cols)?;
        cross_entropy::vp_sums(
            &mut stats.data,
            &logits.data,
            &row_max.data,
            &targets.data,
            cols,
            valid_cols,
            vocab_start,
        );
        Ok(())
    }
    fn vocab_parallel_grad(
        &self,
        logits: &mut CpuBuf,
        losses: &mut CpuBuf,
        row_max: &CpuBuf,
        stats: &CpuBuf,
        targets: &CpuIds,
        cols: usize,
        valid_cols: usize,
        vocab_start: usize,
        grad_scale: f32,
    ) -> Result<()> {
        let op = "vocab_parallel_grad";
        let rows = rows_of(op, logits.data.len(), cols)?;
        check_len(op, "losses", losses.data.len(), rows)?;
        check_len(op, "row_max", row_max.data.len(), rows)?;
        check_len(op, "stats", stats.data.len(), 2 * rows)?;
        check_len(op, "targets", targets.data.len(), rows)?;
        check_valid(op, cols, valid_cols)?;
        cross_entropy::vp_grad(
            &mut logits.data,
            &mut losses.data,
            &row_max.data,
            &stats.data,
            &targets.data,
            cols,
            valid_cols,
            vocab_start,
            grad_scale,
        );
        Ok(())
    }

    fn adamw(&self, param: &mut CpuBuf, grad: &CpuBuf, m: &mut CpuBuf, v: &mut CpuBuf, step: &AdamWStep) -> Result<()> {
        let n = param.data.len();
        check_len("adamw", "grad", grad.data.len(), n)?;
        check_len("adamw", "m", m.data.len(), n)?;
        check_len("adamw", "v", v.data.len(), n)?;
        if step.step == 0 {
            return Err(RuntimeError::Invalid { op: "adamw", detail: "step count is 1-based".into() });
        }
        adamw::step(&mut param.data, &grad.data, &mut m.data, &mut v.data, step);
        Ok(())
    }
}
