//! `dalle-mesh gpu-check [--out DIR]`: everything that needs a GPU, in one command that finishes
//! within a few minutes on one H100.
//!
//! 1. **Ops** — the op conformance cases of `dm_runtime::conformance` (the bodies `cargo test`
//!    runs on the CPU, each against an f64 reference within a bound derived from the numerics):
//!    the small and the model-sized ones ([`conformance::large_cases`](dm_runtime::conformance::large_cases))
//!    on the f32 custom-kernel and cuBLAS variants, the bf16-operand cases on the bf16-mixed
//!    variants, the memory-budget refusal, and whether the fast staging paths stayed enabled.
//! 2. **Parity** — every reference fixture under `tests/fixtures/` through
//!    [`crate::parity::run_on`] on the GPU in fp32 (custom GEMM and cuBLAS).
//! 3. **tp = 2** on one GPU — two rank threads, each with its own [`CudaBackend`] (own stream) on
//!    the same GPU, the tensor-parallel model ([`DalleBart::new_sharded`]) over the in-process
//!    [`ThreadComm`](dm_parallel::ThreadComm) (device buffers staged through host memory by [`HostStagedComm`]); the
//!    gathered logits, loss and gradients against each fixture that admits tp = 2.
//! 4. **NCCL** — a 1-rank communicator: every collective and the async all-reduce round-trip.
//! 5. **Benchmarks** — GEMM TFLOP/s (custom vs cuBLAS, fp32 and bf16) on mini's and mega's
//!    shapes, attention forward/backward TFLOP/s, cross-entropy GB/s, and mini training steps
//!    (samples/s, MFU against the peak table of `crate::device`).
//!
//! Sections 1–4 are correctness rows, section 5 figures; [`ops`] is a runner over the library's
//! cases. Modules: [`report`] (rows, table, JSON), [`ops`], [`fixtures`]
//! (parity and tp = 2), [`nccl`], [`bench`] (GEMM, attention, cross-entropy) and [`steps`]
//! (training steps).
//!
//! Prints a table (stderr), writes `gpu-check.json` into `--out`, and the caller exits 0 when
//! every correctness row passed, 1 when one failed, 2 when there is no usable GPU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dm_model::checkpoint::{params_from_tensors, read_tensors, HostTensor};
use dm_model::dallebart::TpGroup;
use dm_model::flops::step_flops;
use dm_model::{AdamWConfig, DalleBart, DalleBartConfig, ParamTable};
use dm_parallel::comm::host_staged::HostStagedComm;
use dm_parallel::comm::nccl::{nccl_library_present, nccl_version, NcclComm, NcclId, NcclOptions};
use dm_parallel::{run_ranks, Communicator, Mesh, ReduceOp};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::cuda::{CudaBackend, CudaOptions, MatmulImpl, Precision};
use dm_runtime::{AttentionShape, Backend, MatmulSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::Arc;

mod bench;
mod fixtures;
mod nccl;
mod ops;
mod report;
mod steps;
#[cfg(test)]
mod tests;

pub use dm_runtime::conformance::numerics::{rel_err, round_bf16};
#[cfg(test)]
use fixtures::tp2_fixture;
pub use ops::DeviceUnderTest;
use report::write_json;
pub use report::{BenchRow, CheckRow, GpuCheckReport, Status};

/// What to run.
#[derive(Debug, Clone)]
pub struct GpuCheckOptions {
    pub out: Option<PathBuf>,
    /// Folder of reference fixtures (default `$DALLE_MESH_FIXTURES`, else `tests/fixtures`).
    pub fixtures: PathBuf,
    pub ordinal: usize,
    /// Run the benchmarks (section 5).
    pub benches: bool,
    /// Optional benchmarks are skipped once this much time has passed.
    pub time_budget: Duration,
}

impl GpuCheckOptions {
    pub fn new(out: Option<&Path>) -> Self {
        let fixtures =
            std::env::var_os("DALLE_MESH_FIXTURES").map_or_else(|| PathBuf::from("tests/fixtures"), PathBuf::from);
        Self {
            out: out.map(Path::to_path_buf),
            fixtures,
            ordinal: 0,
            benches: true,
            time_budget: Duration::from_secs(300),
        }
    }
}

/// Runs the whole check with default options (see the module docs) and prints the table.
pub fn run(out: Option<&Path>) -> Result<GpuCheckReport> {
    run_with(&GpuCheckOptions::new(out))
}

pub fn run_with(opts: &GpuCheckOptions) -> Result<GpuCheckReport> {
    let t0 = Instant::now();
    let mut report = GpuCheckReport {
        available: false,
        message: String::new(),
        device: None,
        arch: None,
        driver_version: None,
        kernel_load_s: None,
        checks: Vec::new(),
        benches: Vec::new(),
        failed: 0,
        pass: false,
        elapsed_s: 0.0,
        json: None,
    };
    let probe = CudaBackend::probe();
    let be = match probe.and_then(|p| {
        report.driver_version = Some(p.driver_version);
        CudaBackend::new(opts.ordinal, CudaOptions::default())
    }) {
        Ok(be) => be,
        Err(e) => {
            report.message = format!("no usable GPU, nothing checked: {e}");
            report.elapsed_s = t0.elapsed().as_secs_f64();
            eprintln!("{}", report.table());
            write_json(opts, &mut report)?;
            return Ok(report);
        }
    };
    report.available = true;
    report.device = Some(be.name());
    report.arch = Some(be.arch().to_string());
    let tl = Instant::now();
    let mut ck = Checker::new(be.clone());
    match be.preload_kernels() {
        Ok(times) => {
            report.kernel_load_s = Some(tl.elapsed().as_secs_f64());
            let detail =
                times.iter().map(|(f, d)| format!("{f} {:.1}s", d.as_secs_f64())).collect::<Vec<_>>().join(", ");
            ck.row("kernels", "compile + load every family", Status::Pass, None, None, detail);
        }
        Err(e) => ck.row("kernels", "compile + load every family", Status::Fail, None, None, e.to_string()),
    }
    report.message = format!(
        "{} ({}), driver {}, NCCL {}",
        be.name(),
        be.arch(),
        report.driver_version.unwrap_or(0),
        nccl_version().map_or_else(|_| "absent".to_string(), |v| v.to_string())
    );
    eprintln!("gpu-check: {}", report.message);

    ck.section("ops", |c| c.ops(true));
    ck.section("parity", |c| c.parity(&opts.fixtures));
    ck.section("tp", |c| c.tp2(&opts.fixtures));
    ck.section("nccl", |c| c.nccl());
    if opts.benches {
        let deadline = t0 + opts.time_budget;
        ck.section("bench", |c| c.benches(deadline));
    }

    report.checks = ck.rows;
    report.benches = ck.benches;
    report.failed = report.checks.iter().filter(|r| r.status == Status::Fail).count();
    report.pass = report.failed == 0;
    report.elapsed_s = t0.elapsed().as_secs_f64();
    write_json(opts, &mut report)?;
    eprintln!("{}", report.table());
    Ok(report)
}

/// The fixture folders (those with a `config.json`) under `dir`, sorted.
fn fixture_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the fixtures folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    fixtures.sort();
    Ok(fixtures)
}

/// A buffer's worth of NaN: outputs an op must overwrite start poisoned.
fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

struct Checker<D: DeviceUnderTest = CudaBackend> {
    pub(super) gpu: D,
    pub(super) rng: ChaCha8Rng,
    pub(super) rows: Vec<CheckRow>,
    pub(super) benches: Vec<BenchRow>,
}

impl<D: DeviceUnderTest> Checker<D> {
    fn new(gpu: D) -> Self {
        Self { gpu, rng: ChaCha8Rng::seed_from_u64(0x6b75_6461), rows: Vec::new(), benches: Vec::new() }
    }

    fn row(
        &mut self,
        group: &str,
        name: &str,
        status: Status,
        error: Option<f64>,
        tolerance: Option<f64>,
        detail: String,
    ) {
        let r = CheckRow { group: group.into(), name: name.into(), status, error, tolerance, detail };
        if r.status == Status::Fail {
            eprintln!("FAIL {} {}: {}", r.group, r.name, r.detail);
        }
        self.rows.push(r);
    }

    fn bench(&mut self, group: &str, name: &str, value: f64, unit: &str, detail: String) {
        eprintln!("bench {group} {name}: {value:.2} {unit} {detail}");
        self.benches.push(BenchRow { group: group.into(), name: name.into(), value, unit: unit.into(), detail });
    }

    /// Runs one section; an error that escapes it becomes a failed row instead of ending the check.
    fn section(&mut self, group: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        let t = Instant::now();
        if let Err(e) = f(self) {
            self.row(group, "section aborted", Status::Fail, None, None, format!("{e:#}"));
        }
        eprintln!("gpu-check: section {group} done in {:.1} s", t.elapsed().as_secs_f64());
    }
}
