//! Section 1: the op checks. The library's conformance cases on the device, and every op
//! of the device against the CPU backend on fresh random inputs (fp32 and bf16 mixed precision,
//! custom kernels and cuBLAS, shapes of mini and mega).

use super::*;

/// `max |got − want| / max |want|`; infinite when the lengths differ, when `got` is not finite
/// where `want` is, or when NaN positions differ (NaN in `want` must be NaN in `got`).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut max_ref, mut max_diff) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if w.is_nan() {
            if !g.is_nan() {
                return f64::INFINITY;
            }
            continue;
        }
        if !g.is_finite() {
            return f64::INFINITY;
        }
        max_ref = max_ref.max((w as f64).abs());
        max_diff = max_diff.max((g as f64 - w as f64).abs());
    }
    if max_diff == 0.0 {
        0.0
    } else {
        max_diff / max_ref.max(1e-30)
    }
}

/// Rounds to the nearest bf16 (ties to even), as `cvt.rn.bf16.f32` does for finite values.
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    f32::from_bits(r & 0xffff_0000)
}

type Outs = dm_runtime::Result<Vec<(&'static str, Vec<f32>)>>;

/// Runs `$body` with `$be` bound to the CPU reference, then to the CUDA backend (the body is
/// expanded twice, so it may be generic code over either backend type); returns both outputs.
macro_rules! on_both {
    ($cpu:expr, $gpu:expr, |$be:ident| $body:block) => {{
        let want: Outs = {
            let $be = $cpu;
            (|| -> Outs { $body })()
        };
        let got: Outs = {
            let $be = $gpu;
            (|| -> Outs { $body })()
        };
        (want, got)
    }};
}

const F32_TOL: f64 = 2e-5;
const F32_SUM_TOL: f64 = 1e-4;
const BF16_EXACT_TOL: f64 = 1e-4;
/// bf16 operands from raw f32 inputs (GEMM).
const BF16_TOL: f64 = 2e-2;
/// Tensor-core attention: Q, K, V, P, dO and dS rounded to bf16 (the gradients through dS
/// cancel, so they sit above the GEMM's error).
const BF16_ATTN_TOL: f64 = 3e-2;

/// The device side of the op checks: the CUDA backend on a GPU, or the CPU backend for dry runs
/// of the harness itself (the unit tests run every op case CPU against CPU).
pub trait DeviceUnderTest: Backend {
    /// GEMM variants: (label, handle, tolerance with bf16-exact inputs).
    fn matmul_variants(&self) -> Vec<(&'static str, Self, f64)>;
    /// Attention variants: (label, handle, tolerance).
    fn attention_variants(&self) -> Vec<(&'static str, Self, f64)>;
    /// The fp32 variants the library's conformance cases run on (their bounds are fp32's).
    fn conformance_variants(&self) -> Vec<(&'static str, Self)>;
    /// A fresh handle whose memory tracker has a budget of `bytes`.
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self>;
    /// Whether mixed-precision GEMM operands are staged with padded leading dimensions.
    fn padding_ok(&self) -> bool {
        true
    }
    /// Whether the sharded-LayerNorm layout adapters stayed asynchronous.
    fn copy_2d_ok(&self) -> bool {
        true
    }
}

impl DeviceUnderTest for CudaBackend {
    fn matmul_variants(&self) -> Vec<(&'static str, Self, f64)> {
        vec![
            ("f32 custom", self.with_options(Precision::F32, MatmulImpl::Custom), F32_SUM_TOL),
            ("f32 cublas", self.with_options(Precision::F32, MatmulImpl::Cublas), F32_SUM_TOL),
            ("bf16 custom", self.with_options(Precision::Bf16Mixed, MatmulImpl::Custom), BF16_EXACT_TOL),
            ("bf16 cublas", self.with_options(Precision::Bf16Mixed, MatmulImpl::Cublas), BF16_EXACT_TOL),
        ]
    }
    fn attention_variants(&self) -> Vec<(&'static str, Self, f64)> {
        vec![
            ("f32", self.with_options(Precision::F32, MatmulImpl::Custom), F32_SUM_TOL),
            ("bf16", self.with_options(Precision::Bf16Mixed, MatmulImpl::Custom), BF16_ATTN_TOL),
        ]
    }
    fn conformance_variants(&self) -> Vec<(&'static str, Self)> {
        vec![
            ("f32 custom", self.with_options(Precision::F32, MatmulImpl::Custom)),
            ("f32 cublas", self.with_options(Precision::F32, MatmulImpl::Cublas)),
        ]
    }
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self> {
        CudaBackend::new(self.info().ordinal, CudaOptions { memory_budget: Some(bytes), ..Default::default() })
    }
    fn padding_ok(&self) -> bool {
        self.bf16_padding_active()
    }
    fn copy_2d_ok(&self) -> bool {
        self.copy_2d_async_active()
    }
}

impl DeviceUnderTest for CpuBackend {
    fn matmul_variants(&self) -> Vec<(&'static str, Self, f64)> {
        vec![("cpu", self.clone(), 0.0)]
    }
    fn attention_variants(&self) -> Vec<(&'static str, Self, f64)> {
        vec![("cpu", self.clone(), 0.0)]
    }
    fn conformance_variants(&self) -> Vec<(&'static str, Self)> {
        vec![("cpu", self.clone())]
    }
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self> {
        Ok(CpuBackend::with_budget("cpu:budgeted", Some(bytes)))
    }
}

impl<D: DeviceUnderTest> Checker<D> {
    pub(super) fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    /// Records one row comparing every output of a case.
    pub(super) fn compare(&mut self, group: &str, name: &str, tol: f64, (want, got): (Outs, Outs)) {
        let (want, got) = match (want, got) {
            (Err(e), _) => {
                return self.row(group, name, Status::Fail, None, Some(tol), format!("CPU reference failed: {e}"))
            }
            (_, Err(e)) => return self.row(group, name, Status::Fail, None, Some(tol), format!("GPU failed: {e}")),
            (Ok(w), Ok(g)) => (w, g),
        };
        let mut worst = 0.0f64;
        let mut parts = Vec::new();
        for ((label, w), (_, g)) in want.iter().zip(&got) {
            let e = rel_err(g, w);
            worst = worst.max(e);
            parts.push(format!("{label} {e:.1e}"));
        }
        let status = if worst <= tol { Status::Pass } else { Status::Fail };
        self.row(group, name, status, Some(worst), Some(tol), parts.join(", "));
    }

    pub(super) fn handles(&self) -> Vec<(&'static str, D, f64)> {
        self.gpu.matmul_variants()
    }

    // ---- section 1: ops ----------------------------------------------------------------------

    pub(super) fn ops(&mut self) -> Result<()> {
        self.conformance();
        self.memory_ops();
        self.elementwise_ops();
        self.matmul_ops();
        self.layernorm_ops();
        self.sharded_layernorm_ops();
        self.glu_embedding_ops();
        self.attention_ops();
        self.loss_ops();
        self.adamw_ops();
        Ok(())
    }

    /// Every case of `dm_runtime::conformance` (the bodies `cargo test` runs on each backend) on
    /// each fp32 variant of the device: one row per comparison, group `cases`.
    pub(super) fn conformance(&mut self) {
        for (label, be) in self.gpu.conformance_variants() {
            for r in dm_runtime::conformance::run_all(|| Ok(be.clone())) {
                let status = if r.passed { Status::Pass } else { Status::Fail };
                self.row("cases", &format!("{label} {}", r.name), status, r.max_error, r.tolerance, r.detail);
            }
        }
    }

    pub(super) fn memory_ops(&mut self) {
        let g = "ops";
        let x = self.randn(1001, 3.0);
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        let r = on_both!(&cpu, &gpu, |be| {
            let mut a = be.upload("a", &nan(1001))?;
            be.write(&mut a, 0, &x)?;
            let mut b = be.zeros("b", 1200)?;
            be.copy(&mut b, 17, &a, 3, 900)?;
            let mut c = be.upload("c", &nan(333))?;
            be.fill(&mut c, -2.5)?;
            let e = be.zeros("empty", 0)?;
            Ok(vec![
                ("write", be.download(&a)?),
                ("copy", be.download(&b)?),
                ("fill", be.download(&c)?),
                ("empty", be.download(&e)?),
            ])
        });
        self.compare(g, "upload/write/copy/fill/download/zeros", 0.0, r);

        // A budget refusal names the tensor and allocates nothing.
        let budgeted = self.gpu.budgeted(1 << 20);
        match budgeted {
            Ok(b) => {
                let (ok, detail) = match b.zeros("too.big.tensor", 1 << 20) {
                    Ok(_) => (false, "a 4 MiB allocation passed a 1 MiB budget".to_string()),
                    Err(e) => {
                        let e = e.to_string();
                        (e.contains("too.big.tensor") && b.memory().report().current_bytes == 0, e)
                    }
                };
                self.row(
                    g,
                    "memory budget refusal names the tensor",
                    if ok { Status::Pass } else { Status::Fail },
                    None,
                    None,
                    detail,
                );
            }
            Err(e) => self.row(g, "memory budget refusal names the tensor", Status::Fail, None, None, e.to_string()),
        }
    }

    pub(super) fn elementwise_ops(&mut self) {
        let g = "ops";
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        for n in [1usize, 7, 4099, 1 << 20] {
            let (a, b) = (self.randn(n, 2.0), self.randn(n, 2.0));
            let r = on_both!(&cpu, &gpu, |be| {
                let (ab, bb) = (be.upload("a", &a)?, be.upload("b", &b)?);
                let mut out = be.upload("out", &nan(n))?;
                be.add(&mut out, &ab, &bb)?;
                let mut acc = be.upload("acc", &a)?;
                be.add_assign(&mut acc, &bb)?;
                let mut s = be.upload("s", &b)?;
                be.scale(&mut s, -0.37)?;
                let ss = be.sum_squares(&ab)? as f32;
                Ok(vec![
                    ("add", be.download(&out)?),
                    ("add_assign", be.download(&acc)?),
                    ("scale", be.download(&s)?),
                    ("sum_squares", vec![ss]),
                ])
            });
            self.compare(g, &format!("add/add_assign/scale/sum_squares n={n}"), 1e-5, r);
        }
        for (row_len, blocks) in [(64usize * 3, 5usize), (256 * 1024, 8)] {
            let row = self.randn(row_len + 5, 1.0);
            let x = self.randn(row_len * blocks, 1.0);
            let acc0 = self.randn(row_len + 5, 1.0);
            let r = on_both!(&cpu, &gpu, |be| {
                let rb = be.upload("row", &row)?;
                let mut out = be.upload("out", &x)?;
                be.add_broadcast_rows(&mut out, &rb, row_len)?;
                let mut acc = be.upload("acc", &acc0)?;
                let xb = be.upload("x", &x)?;
                be.sum_broadcast_rows(&mut acc, &xb, row_len)?;
                Ok(vec![("add_broadcast_rows", be.download(&out)?), ("sum_broadcast_rows", be.download(&acc)?)])
            });
            self.compare(g, &format!("add/sum_broadcast_rows row_len={row_len} blocks={blocks}"), F32_TOL, r);
        }
    }

    pub(super) fn matmul_ops(&mut self) {
        let g = "matmul";
        let cpu = self.cpu.clone();
        let shapes = [(67usize, 45usize, 131usize), (130, 2730, 64), (64, 16385, 40), (5, 7, 0), (1, 1, 1)];
        for (m, n, k) in shapes {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                for acc in [false, true] {
                    let spec = MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: acc };
                    // bf16-exact inputs: products of bf16 values are exact in f32, so the tensor-core
                    // GEMM must match the f32 reference to f32 rounding, exposing any indexing slip.
                    let a: Vec<f32> = self.randn(m * k, 1.0).into_iter().map(round_bf16).collect();
                    let b: Vec<f32> = self.randn(k * n, 1.0).into_iter().map(round_bf16).collect();
                    let c0 = if acc { self.randn(m * n, 1.0) } else { nan(m * n) };
                    for (label, gpu, tol) in self.handles() {
                        let r = on_both!(&cpu, &gpu, |be| {
                            let (ab, bb) = (be.upload("a", &a)?, be.upload("b", &b)?);
                            let mut c = be.upload("c", &c0)?;
                            be.matmul(&mut c, &ab, &bb, spec)?;
                            Ok(vec![("c", be.download(&c)?)])
                        });
                        let name = format!(
                            "{label} {}{} m{m} n{n} k{k}{}",
                            if ta { "t" } else { "n" },
                            if tb { "t" } else { "n" },
                            if acc { " +=" } else { "" }
                        );
                        self.compare(g, &name, tol, r);
                    }
                }
            }
        }
        // Raw f32 inputs through the bf16 path: bf16 rounding of the operands, ~1e-2.
        let (m, n, k) = (256, 2730, 1024);
        let (a, b) = (self.randn(m * k, 1.0), self.randn(k * n, 1.0));
        for (label, gpu, _) in self.handles().into_iter().filter(|h| h.0.starts_with("bf16")) {
            let spec = MatmulSpec::nn(m, n, k);
            let r = on_both!(&cpu, &gpu, |be| {
                let (ab, bb) = (be.upload("a", &a)?, be.upload("b", &b)?);
                let mut c = be.upload("c", &nan(m * n))?;
                be.matmul(&mut c, &ab, &bb, spec)?;
                Ok(vec![("c", be.download(&c)?)])
            });
            self.compare(g, &format!("{label} nn m{m} n{n} k{k} raw f32 inputs"), BF16_TOL, r);
        }
        let padded = self.gpu.padding_ok();
        self.row(
            g,
            "bf16 operands staged with padded leading dims",
            if padded { Status::Pass } else { Status::Fail },
            None,
            None,
            if padded {
                "2-D copy works".into()
            } else {
                "cuMemcpy2DAsync failed; GEMMs use the unpadded slow path".into()
            },
        );
    }

    pub(super) fn layernorm_ops(&mut self) {
        let g = "layernorm";
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        for (rows, dim) in [(37usize, 64usize), (64, 1024), (19, 2730), (8, 100)] {
            for with_scale in [false, true] {
                for acc_dx in [false, true] {
                    let x: Vec<f32> = self.randn(rows * dim, 2.0).into_iter().map(|v| v + 0.7).collect();
                    let scale = self.randn(dim, 1.5);
                    let bias = self.randn(dim, 0.5);
                    let dout = self.randn(rows * dim, 1.0);
                    let (ds0, db0) = (self.randn(dim, 0.1), self.randn(dim, 0.1));
                    let dx0 = if acc_dx { self.randn(rows * dim, 1.0) } else { nan(rows * dim) };
                    let r = on_both!(&cpu, &gpu, |be| {
                        let xb = be.upload("x", &x)?;
                        let sb = be.upload("scale", &scale)?;
                        let bb = be.upload("bias", &bias)?;
                        let s = with_scale.then_some(&sb);
                        let mut out = be.upload("out", &nan(rows * dim))?;
                        let mut mean = be.upload("mean", &nan(rows))?;
                        let mut rstd = be.upload("rstd", &nan(rows))?;
                        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &xb, s, &bb, dim)?;
                        let gb = be.upload("dout", &dout)?;
                        let mut dx = be.upload("dx", &dx0)?;
                        let mut ds = be.upload("dscale", &ds0)?;
                        let mut db = be.upload("dbias", &db0)?;
                        let dsr = if with_scale { Some(&mut ds) } else { None };
                        be.layernorm_backward(&mut dx, dsr, &mut db, &gb, &xb, &mean, &rstd, s, dim, acc_dx)?;
                        Ok(vec![
                            ("out", be.download(&out)?),
                            ("mean", be.download(&mean)?),
                            ("rstd", be.download(&rstd)?),
                            ("dx", be.download(&dx)?),
                            ("dscale", be.download(&ds)?),
                            ("dbias", be.download(&db)?),
                        ])
                    });
                    let name = format!(
                        "fwd+bwd rows{rows} dim{dim} {}{}",
                        if with_scale { "scale+bias" } else { "bias only" },
                        if acc_dx { " dx+=" } else { "" }
                    );
                    self.compare(g, &name, F32_SUM_TOL, r);
                }
            }
        }
    }

    pub(super) fn sharded_layernorm_ops(&mut self) {
        let g = "layernorm";
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        let (rows, dim, dim_global) = (33usize, 1365usize, 2730usize);
        for with_scale in [false, true] {
            let x: Vec<f32> = self.randn(rows * dim, 2.0).into_iter().map(|v| v + 0.3).collect();
            let center = self.randn(rows, 0.5);
            let sums_pos: Vec<f32> = self.randn(rows, 50.0).into_iter().map(|v| v.abs() + 1.0).collect();
            let sums_any = self.randn(rows, 50.0);
            let mean = self.randn(rows, 0.3);
            let rstd: Vec<f32> = self.randn(rows, 0.5).into_iter().map(|v| v.abs() + 0.5).collect();
            let scale = self.randn(dim, 1.5);
            let bias = self.randn(dim, 0.5);
            let dout = self.randn(rows * dim, 1.0);
            let bsums = self.randn(2 * rows, 20.0);
            let (ds0, db0) = (self.randn(dim, 0.1), self.randn(dim, 0.1));
            let r = on_both!(&cpu, &gpu, |be| {
                let xb = be.upload("x", &x)?;
                let cb = be.upload("center", &center)?;
                let mut s1 = be.upload("s1", &nan(rows))?;
                be.layernorm_row_sums(&mut s1, &xb, None, dim)?;
                let mut s2 = be.upload("s2", &nan(rows))?;
                be.layernorm_row_sums(&mut s2, &xb, Some(&cb), dim)?;
                let mut m = be.upload("m", &sums_any)?;
                be.layernorm_finish_stats(&mut m, dim_global, false)?;
                let mut r = be.upload("r", &sums_pos)?;
                be.layernorm_finish_stats(&mut r, dim_global, true)?;
                let (mb, rb) = (be.upload("mean", &mean)?, be.upload("rstd", &rstd)?);
                let (sb, bb) = (be.upload("scale", &scale)?, be.upload("bias", &bias)?);
                let s = with_scale.then_some(&sb);
                let mut out = be.upload("out", &nan(rows * dim))?;
                be.layernorm_apply(&mut out, &xb, &mb, &rb, s, &bb, dim)?;
                let gb = be.upload("dout", &dout)?;
                let mut bs = be.upload("bsums", &nan(2 * rows))?;
                be.layernorm_backward_row_sums(&mut bs, &gb, &xb, &mb, &rb, s, dim)?;
                let given = be.upload("given sums", &bsums)?;
                let mut dx = be.upload("dx", &nan(rows * dim))?;
                let mut ds = be.upload("dscale", &ds0)?;
                let mut db = be.upload("dbias", &db0)?;
                let dsr = if with_scale { Some(&mut ds) } else { None };
                be.layernorm_backward_apply(
                    &mut dx, dsr, &mut db, &gb, &xb, &mb, &rb, s, &given, dim, dim_global, false,
                )?;
                Ok(vec![
                    ("row_sums", be.download(&s1)?),
                    ("row_sums centred", be.download(&s2)?),
                    ("finish mean", be.download(&m)?),
                    ("finish rstd", be.download(&r)?),
                    ("apply", be.download(&out)?),
                    ("bwd row_sums", be.download(&bs)?),
                    ("bwd apply dx", be.download(&dx)?),
                    ("dscale", be.download(&ds)?),
                    ("dbias", be.download(&db)?),
                ])
            });
            let name = format!(
                "sharded ops rows{rows} dim{dim}/{dim_global} {}",
                if with_scale { "scale+bias" } else { "bias only" }
            );
            self.compare(g, &name, F32_SUM_TOL, r);
        }
        let active = self.gpu.copy_2d_ok();
        let detail = if active {
            "cuMemcpy2DAsync accepted"
        } else {
            "fell back to synchronous cuMemcpy2DUnaligned (correct, slow)"
        };
        self.row(
            g,
            "sharded LN layout adapters asynchronous",
            if active { Status::Pass } else { Status::Fail },
            None,
            None,
            detail.into(),
        );
    }

    pub(super) fn glu_embedding_ops(&mut self) {
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        for n in [5usize, 2048 * 2730] {
            let (a, b, dout) = (self.randn(n, 4.0), self.randn(n, 2.0), self.randn(n, 1.0));
            let r = on_both!(&cpu, &gpu, |be| {
                let (ab, bb, gb) = (be.upload("a", &a)?, be.upload("b", &b)?, be.upload("dout", &dout)?);
                let mut out = be.upload("out", &nan(n))?;
                be.gelu_glu_forward(&mut out, &ab, &bb)?;
                let (mut da, mut db) = (be.upload("da", &nan(n))?, be.upload("db", &nan(n))?);
                be.gelu_glu_backward(&mut da, &mut db, &gb, &ab, &bb)?;
                Ok(vec![("out", be.download(&out)?), ("da", be.download(&da)?), ("db", be.download(&db)?)])
            });
            self.compare("glu", &format!("gelu_glu fwd+bwd n={n}"), F32_TOL, r);
        }
        for (n_ids, dim, start, end) in
            [(37usize, 64usize, 10usize, 50usize), (512, 1024, 0, 16385), (64, 96, 100, 100)]
        {
            let ids: Vec<i32> = (0..n_ids).map(|_| self.rng.random_range(-3..(end as i32 + 20))).collect();
            let rows = end - start;
            let table = self.randn(rows * dim, 1.0);
            let dout = self.randn(n_ids * dim, 1.0);
            let dt0 = self.randn(rows * dim, 0.1);
            let range = VocabRange { start, end };
            let r = on_both!(&cpu, &gpu, |be| {
                let ib = be.upload_ids("ids", &ids)?;
                let tb = be.upload("table", &table)?;
                let mut out = be.upload("out", &nan(n_ids * dim))?;
                be.embedding_forward(&mut out, &tb, &ib, range, dim)?;
                let gb = be.upload("dout", &dout)?;
                let mut dt = be.upload("dtable", &dt0)?;
                be.embedding_backward(&mut dt, &gb, &ib, range, dim)?;
                Ok(vec![("out", be.download(&out)?), ("dtable", be.download(&dt)?)])
            });
            self.compare(
                "embedding",
                &format!("fwd+bwd ids{n_ids} dim{dim} vocab {start}..{end} (ids outside too)"),
                F32_TOL,
                r,
            );
        }
    }

    pub(super) fn attention_ops(&mut self) {
        let cpu = self.cpu.clone();
        // (name, batch, q_len, kv_len, heads, head_dim, causal,
        //  mask: 0 none, 1 partial, 2 partial + a fully masked batch)
        let cases = [
            ("encoder self", 3usize, 64usize, 64usize, 4usize, 64usize, false, 2u8),
            ("decoder causal", 2, 256, 256, 2, 64, true, 0),
            ("cross", 2, 256, 64, 2, 64, false, 2),
            ("odd causal+mask", 2, 100, 100, 3, 32, true, 1),
            ("hd24", 1, 70, 70, 2, 24, false, 0),
            ("hd80 cross", 1, 130, 90, 2, 80, false, 1),
            ("hd128 causal", 1, 128, 128, 1, 128, true, 0),
        ];
        for (name, batch, q_len, kv_len, heads, head_dim, causal, mask_kind) in cases {
            let shape = AttentionShape { batch, q_len, kv_len, heads, head_dim, causal };
            let w = shape.width();
            let q = self.randn(batch * q_len * w, 1.5);
            let k = self.randn(batch * kv_len * w, 1.5);
            let v = self.randn(batch * kv_len * w, 1.0);
            let dout = self.randn(batch * q_len * w, 1.0);
            let mask: Option<Vec<i32>> = (mask_kind > 0).then(|| {
                let mut m = Vec::with_capacity(batch * kv_len);
                for b in 0..batch {
                    let len = if mask_kind == 2 && b == 0 { 0 } else { self.rng.random_range(1..=kv_len) };
                    m.extend((0..kv_len).map(|j| (j < len) as i32));
                }
                m
            });
            for (label, gpu, tol) in self.gpu.attention_variants() {
                let r = on_both!(&cpu, &gpu, |be| {
                    let (qb, kb, vb, gb) =
                        (be.upload("q", &q)?, be.upload("k", &k)?, be.upload("v", &v)?, be.upload("dout", &dout)?);
                    let mb = mask.as_deref().map(|m| be.upload_ids("mask", m)).transpose()?;
                    let mut out = be.upload("out", &nan(q.len()))?;
                    let mut lse = be.upload("lse", &nan(shape.lse_len()))?;
                    be.attention_forward(&mut out, &mut lse, &qb, &kb, &vb, mb.as_ref(), shape)?;
                    let (mut dq, mut dk, mut dv) = (
                        be.upload("dq", &nan(q.len()))?,
                        be.upload("dk", &nan(k.len()))?,
                        be.upload("dv", &nan(v.len()))?,
                    );
                    be.attention_backward(
                        &mut dq,
                        &mut dk,
                        &mut dv,
                        &gb,
                        &qb,
                        &kb,
                        &vb,
                        &out,
                        &lse,
                        mb.as_ref(),
                        shape,
                    )?;
                    Ok(vec![
                        ("out", be.download(&out)?),
                        ("lse", be.download(&lse)?),
                        ("dq", be.download(&dq)?),
                        ("dk", be.download(&dk)?),
                        ("dv", be.download(&dv)?),
                    ])
                });
                let desc = format!(
                    "{label} {name} B{batch} Tq{q_len} Tk{kv_len} H{heads} hd{head_dim}{}{}",
                    if causal { " causal" } else { "" },
                    match mask_kind {
                        0 => "",
                        1 => " key-mask",
                        _ => " key-mask+fully-masked rows",
                    }
                );
                self.compare("attention", &desc, tol, r);
            }
        }
    }

    pub(super) fn loss_ops(&mut self) {
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        for (rows, classes) in [(5usize, 7usize), (33, 129), (64, 16385)] {
            let logits = self.randn(rows * classes, 4.0);
            let targets: Vec<i32> = (0..rows).map(|_| self.rng.random_range(0..classes as i32)).collect();
            let r = on_both!(&cpu, &gpu, |be| {
                let mut l = be.upload("logits", &logits)?;
                let tb = be.upload_ids("targets", &targets)?;
                let mut losses = be.upload("losses", &nan(rows))?;
                be.cross_entropy_fused(&mut l, &mut losses, &tb, classes, 0.25)?;
                Ok(vec![("losses", be.download(&losses)?), ("dlogits", be.download(&l)?)])
            });
            self.compare("loss", &format!("cross_entropy_fused rows{rows} classes{classes}"), 1e-5, r);
        }
        // A bad target is refused (as on the CPU), not silently turned into NaN.
        let bad = (|| -> dm_runtime::Result<()> {
            let mut l = self.gpu.upload("logits", &[0.0; 6])?;
            let mut losses = self.gpu.zeros("losses", 2)?;
            let t = self.gpu.upload_ids("targets", &[1, 3])?;
            self.gpu.cross_entropy_fused(&mut l, &mut losses, &t, 3, 1.0)
        })();
        let ok = bad.as_ref().is_err_and(|e| e.to_string().contains("target 3"));
        self.row(
            "loss",
            "out-of-range target refused",
            if ok { Status::Pass } else { Status::Fail },
            None,
            None,
            format!("{bad:?}"),
        );

        let (rows, cols, valid, start) = (48usize, 136usize, 129usize, 50usize);
        let logits = self.randn(rows * cols, 4.0);
        let targets: Vec<i32> = (0..rows).map(|_| self.rng.random_range(0..300)).collect();
        let r = on_both!(&cpu, &gpu, |be| {
            let mut l = be.upload("logits", &logits)?;
            let tb = be.upload_ids("targets", &targets)?;
            let mut mx = be.upload("max", &nan(rows))?;
            be.vocab_parallel_max(&mut mx, &l, cols, valid)?;
            let mut stats = be.upload("stats", &nan(2 * rows))?;
            be.vocab_parallel_sums(&mut stats, &l, &mx, &tb, cols, valid, start)?;
            let mut losses = be.upload("losses", &nan(rows))?;
            be.vocab_parallel_grad(&mut l, &mut losses, &mx, &stats, &tb, cols, valid, start, 0.5)?;
            Ok(vec![
                ("max", be.download(&mx)?),
                ("stats", be.download(&stats)?),
                ("losses", be.download(&losses)?),
                ("dlogits", be.download(&l)?),
            ])
        });
        self.compare(
            "loss",
            &format!("vocab_parallel max/sums/grad rows{rows} cols{cols} valid{valid} start{start}"),
            1e-5,
            r,
        );
    }

    pub(super) fn adamw_ops(&mut self) {
        let (cpu, gpu) = (self.cpu.clone(), self.gpu.clone());
        let n = 100_003;
        let (p, g, m0) = (self.randn(n, 1.0), self.randn(n, 1e-3), self.randn(n, 1e-4));
        let v0: Vec<f32> = self.randn(n, 1e-6).into_iter().map(f32::abs).collect();
        for step in [1u64, 7] {
            let s = AdamWStep { lr: 1e-3, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 0.5 };
            let r = on_both!(&cpu, &gpu, |be| {
                let (mut pb, gb, mut mb, mut vb) =
                    (be.upload("p", &p)?, be.upload("g", &g)?, be.upload("m", &m0)?, be.upload("v", &v0)?);
                be.adamw(&mut pb, &gb, &mut mb, &mut vb, &s)?;
                Ok(vec![("param", be.download(&pb)?), ("m", be.download(&mb)?), ("v", be.download(&vb)?)])
            });
            self.compare("adamw", &format!("adamw n={n} step {step} wd 0.01 grad_scale 0.5"), 1e-5, r);
        }
    }
}
