//! Section 1: the op checks, a runner over `dm_runtime::conformance` (the bodies `cargo test`
//! runs, each against its f64 reference): the small and the model-sized cases on every fp32
//! variant of the device (custom kernels and cuBLAS), the bf16-operand cases on the variants
//! that round operands themselves (bf16-mixed), the memory-budget refusal on a budgeted
//! handle, and two CUDA-only yes/no rows (the fast staging paths stayed enabled).

use super::*;
use dm_runtime::conformance::{self, Case, CheckRow as CaseRow};

/// The device side of the op checks: the CUDA backend on a GPU, or the CPU backend for dry runs
/// of the runner itself (the unit tests run it CPU-only).
pub trait DeviceUnderTest: Backend {
    /// The fp32 variants the conformance cases run on.
    fn conformance_variants(&self) -> Vec<(&'static str, Self)>;
    /// The variants that round GEMM and attention operands to bf16 themselves.
    fn bf16_mixed_variants(&self) -> Vec<(&'static str, Self)>;
    /// A fresh handle whose memory tracker has a budget of `bytes`.
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self>;
    /// CUDA-only status rows: (name, ok, detail when ok, detail when not).
    fn staging_rows(&self) -> Vec<(&'static str, bool, &'static str, &'static str)> {
        Vec::new()
    }
}

impl DeviceUnderTest for CudaBackend {
    fn conformance_variants(&self) -> Vec<(&'static str, Self)> {
        vec![
            ("f32 custom", self.with_options(Precision::F32, MatmulImpl::Custom)),
            ("f32 cublas", self.with_options(Precision::F32, MatmulImpl::Cublas)),
        ]
    }
    fn bf16_mixed_variants(&self) -> Vec<(&'static str, Self)> {
        vec![
            ("bf16 custom", self.with_options(Precision::Bf16Mixed, MatmulImpl::Custom)),
            ("bf16 cublas", self.with_options(Precision::Bf16Mixed, MatmulImpl::Cublas)),
        ]
    }
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self> {
        CudaBackend::new(self.info().ordinal, CudaOptions { memory_budget: Some(bytes), ..Default::default() })
    }
    fn staging_rows(&self) -> Vec<(&'static str, bool, &'static str, &'static str)> {
        vec![
            (
                "bf16 operands staged with padded leading dims",
                self.bf16_padding_active(),
                "2-D copy works",
                "cuMemcpy2DAsync failed; GEMMs use the unpadded slow path",
            ),
            (
                "sharded LN layout adapters asynchronous",
                self.copy_2d_async_active(),
                "cuMemcpy2DAsync accepted",
                "fell back to synchronous cuMemcpy2DUnaligned (correct, slow)",
            ),
        ]
    }
}

impl DeviceUnderTest for CpuBackend {
    fn conformance_variants(&self) -> Vec<(&'static str, Self)> {
        vec![("cpu", self.clone())]
    }
    fn bf16_mixed_variants(&self) -> Vec<(&'static str, Self)> {
        Vec::new() // the CPU rounds operands only through bf16 storage (the `all` cases)
    }
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self> {
        Ok(CpuBackend::with_budget("cpu:budgeted", Some(bytes)))
    }
}

/// The memory budget of the refusal check's handle.
const BUDGET: u64 = 1 << 20;

impl<D: DeviceUnderTest> Checker<D> {
    pub(super) fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    /// Section 1. `large`: also the model-sized cases (minutes on a GPU host's CPU references).
    pub(super) fn ops(&mut self, large: bool) -> Result<()> {
        for (label, be) in self.gpu.conformance_variants() {
            self.cases("cases", label, conformance::all(), &be);
            if large {
                self.cases("large", label, conformance::large_cases(), &be);
            }
        }
        for (label, be) in self.gpu.bf16_mixed_variants() {
            self.cases("bf16", label, conformance::bf16_mixed_cases(), &be);
        }
        let rows = match self.gpu.budgeted(BUDGET) {
            Ok(be) => conformance::run_case(
                "budget_refusal_names_the_tensor",
                |be: &D, ck| conformance::budget_refusal_names_the_tensor(be, ck, BUDGET),
                &be,
            ),
            Err(e) => vec![CaseRow {
                name: "budget_refusal_names_the_tensor".into(),
                max_error: None,
                tolerance: None,
                passed: false,
                detail: format!("opening a budgeted backend: {e}"),
            }],
        };
        self.case_rows("memory", "", rows);
        for (name, ok, yes, no) in self.gpu.staging_rows() {
            let status = if ok { Status::Pass } else { Status::Fail };
            self.row("staging", name, status, None, None, (if ok { yes } else { no }).into());
        }
        Ok(())
    }

    /// The cases of `list` on `be`: one row per comparison, named `<label> <case>: <what>`.
    fn cases(&mut self, group: &str, label: &str, list: Vec<Case<D>>, be: &D) {
        let rows = conformance::run_list(list, || Ok(be.clone()));
        self.case_rows(group, label, rows);
    }

    fn case_rows(&mut self, group: &str, label: &str, rows: Vec<CaseRow>) {
        for r in rows {
            let status = if r.passed { Status::Pass } else { Status::Fail };
            let name = if label.is_empty() { r.name } else { format!("{label} {}", r.name) };
            self.row(group, &name, status, r.max_error, r.tolerance, r.detail);
        }
    }
}
