//! `dalle-mesh gpu-check [--out DIR]`: everything that needs a GPU, in one command that finishes
//! within a few minutes on one H100.
//!
//! 1. **Ops** — every [`Backend`] op of [`CudaBackend`] against [`CpuBackend`] on fresh random
//!    inputs, in fp32 and bf16 mixed precision, custom kernels and cuBLAS. Outputs the op must
//!    overwrite are poisoned with NaN first, so an element a kernel forgets to write fails the
//!    row; accumulated outputs start from the same random values on both devices. Error =
//!    `max |gpu − cpu| / max |cpu|` per output (NaN where the CPU has NaN, e.g. the lse of a
//!    fully-masked row, is required to match exactly).
//! 2. **Parity** — every reference fixture under `tests/fixtures/` through
//!    [`crate::parity::run_on`] on the GPU in fp32 (custom GEMM and cuBLAS).
//! 3. **tp = 2** on one GPU — two rank threads, each with its own [`CudaBackend`] (own stream) on
//!    the same GPU, the tensor-parallel model ([`DalleBart::new_sharded`]) over the in-process
//!    [`ThreadComm`](dm_parallel::ThreadComm) (device buffers staged through host memory by [`HostStagedComm`]); the
//!    gathered logits, loss and gradients against each fixture that admits tp = 2.
//! 4. **NCCL** — a 1-rank communicator: every collective and the async all-reduce round-trip.
//! 5. **Benchmarks** — GEMM TFLOP/s (custom vs cuBLAS, fp32 and bf16) on mini's and mega's
//!    shapes, attention forward/backward TFLOP/s, cross-entropy GB/s, and mini training steps
//!    (samples/s, MFU against 989 TFLOP/s dense bf16).
//!
//! Prints a table (stderr), writes `gpu-check.json` into `--out`, and the caller exits 0 when
//! every correctness row passed, 1 when one failed, 2 when there is no usable GPU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dm_model::checkpoint::{params_from_tensors, read_tensors, HostTensor};
use dm_model::dallebart::TpGroup;
use dm_model::flops::step_flops;
use dm_model::{AdamW, AdamWConfig, DalleBart, DalleBartConfig, ParamTable};
use dm_parallel::comm::host_staged::HostStagedComm;
use dm_parallel::comm::nccl::{nccl_library_present, nccl_version, NcclComm, NcclId, NcclOptions};
use dm_parallel::{run_ranks, Communicator, Mesh, ReduceOp};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::cuda::{CudaBackend, CudaOptions, MatmulImpl, Precision};
use dm_runtime::{AdamWStep, AttentionShape, Backend, MatmulSpec, VocabRange};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::Arc;

/// Outcome of one correctness row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skipped,
}

/// One correctness check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub group: String,
    pub name: String,
    pub status: Status,
    /// Worst relative error (None when not applicable).
    pub error: Option<f64>,
    pub tolerance: Option<f64>,
    pub detail: String,
}

/// One benchmark figure.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub group: String,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuCheckReport {
    /// Whether a usable GPU was found (false: nothing below ran).
    pub available: bool,
    pub message: String,
    pub device: Option<String>,
    pub arch: Option<String>,
    pub driver_version: Option<i32>,
    pub kernel_load_s: Option<f64>,
    pub checks: Vec<CheckRow>,
    pub benches: Vec<BenchRow>,
    pub failed: usize,
    pub pass: bool,
    pub elapsed_s: f64,
    pub json: Option<PathBuf>,
}

impl GpuCheckReport {
    /// 0 all correctness rows passed, 1 some failed, 2 no usable GPU.
    pub fn exit_code(&self) -> i32 {
        if !self.available {
            2
        } else if self.pass {
            0
        } else {
            1
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("gpu-check: {}\n", self.message));
        if !self.available {
            return s;
        }
        s.push_str(&format!("{:<10} {:<58} {:<7} {:>10} {:>9}  detail\n", "group", "check", "status", "error", "tol"));
        for r in &self.checks {
            let st = match r.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skipped => "SKIPPED",
            };
            let e = r.error.map_or_else(|| "-".into(), |e| format!("{e:.2e}"));
            let t = r.tolerance.map_or_else(|| "-".into(), |t| format!("{t:.0e}"));
            s.push_str(&format!("{:<10} {:<58} {:<7} {:>10} {:>9}  {}\n", r.group, r.name, st, e, t, r.detail));
        }
        s.push_str(&format!("\n{:<10} {:<58} {:>12} {:<10} detail\n", "group", "benchmark", "value", "unit"));
        for b in &self.benches {
            s.push_str(&format!("{:<10} {:<58} {:>12.2} {:<10} {}\n", b.group, b.name, b.value, b.unit, b.detail));
        }
        s.push_str(&format!(
            "\n{} correctness rows, {} failed; {:.1} s\n",
            self.checks.iter().filter(|r| r.status != Status::Skipped).count(),
            self.failed,
            self.elapsed_s
        ));
        s
    }
}

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

    ck.section("ops", |c| c.ops());
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

fn write_json(opts: &GpuCheckOptions, report: &mut GpuCheckReport) -> Result<()> {
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("gpu-check.json");
        report.json = Some(path.clone());
        crate::atomic_write(&path, serde_json::to_string_pretty(report)?.as_bytes())?;
    }
    Ok(())
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

type Tp2Errors = ([f64; 3], String);
/// One tp rank's results: (tp_index, logits, logits columns, loss, gradients).
type Tp2Rank = (usize, Vec<f32>, (usize, usize, usize), f32, Vec<Vec<f32>>);

/// Forward, loss and backward of fixture `dir` on two tensor-parallel ranks, each on a backend
/// from `make_backend` (on the GPU check: two CUDA backends sharing one GPU); `None` when the
/// fixture's config or batch does not admit tp = 2. Returns the loss (abs), logits (max abs) and
/// gradient (max relative to each tensor's max) errors.
fn tp2_fixture<B: Backend>(
    make_backend: impl Fn() -> dm_runtime::Result<B> + Sync,
    dir: &Path,
) -> Result<Option<Tp2Errors>> {
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    let batch = crate::parity::read_batch(&dir.join("batch.safetensors"), &cfg)?;
    if crate::parity::check_mesh(&cfg, batch.batch, 2, 1).is_err() {
        return Ok(None);
    }
    let full = ParamTable::new(&cfg);
    // weights.safetensors or a dalle-mini flax_model.msgpack, through the loader parity uses.
    let weights = dm_model::dalle_mini::load_model_weights(dir, &full)?;
    let expected_path = dir.join("expected.safetensors");
    let expected = read_tensors(&expected_path)?;
    let f32_of = |name: &str| -> Result<Vec<f32>> {
        match expected.get(name) {
            Some(HostTensor::F32 { data, .. }) => Ok(data.clone()),
            _ => anyhow::bail!("{}: float tensor `{name}` is missing", expected_path.display()),
        }
    };
    let (ref_logits, ref_loss) = (f32_of("logits")?, f32_of("loss")?[0] as f64);
    let ref_grads = params_from_tensors(&expected_path, &full, &expected, "grad.")?;
    let tokens = (batch.batch * batch.image_len) as f32;
    let mesh = Mesh::new(2, 1)?;
    let results = run_ranks(&mesh, |rank, comms| -> Result<Tp2Rank> {
        let (_, tp_index) = mesh.coords(rank);
        let be = make_backend()?;
        let table = ParamTable::sharded(&cfg, tp_index, 2);
        let local = table.shard_values(&weights);
        let comm: Arc<dyn Communicator<B>> = Arc::new(HostStagedComm::new(comms.tp, be.clone()));
        let group = TpGroup { rank: tp_index, size: 2, comm };
        let mut model = DalleBart::new_sharded(be, cfg.clone(), Some(group), local)?;
        model.forward(&batch)?;
        let logits = model.logits()?;
        let cols = model.logits_columns();
        let out = model.loss_and_backward(1.0 / tokens)?;
        Ok((tp_index, logits, cols, out.loss, model.grad_values()?))
    })
    .map_err(|f| anyhow::anyhow!("{f}"))?;
    let classes = cfg.loss_classes();
    let rows = batch.batch * batch.image_len;
    let mut logits = vec![f32::NAN; ref_logits.len()];
    for (_, l, (cols, start, valid), _, _) in &results {
        for i in 0..rows {
            logits[i * classes + start..i * classes + start + valid].copy_from_slice(&l[i * cols..i * cols + valid]);
        }
    }
    let mut by_tp: Vec<_> = results.iter().collect();
    by_tp.sort_by_key(|r| r.0);
    let tables: Vec<ParamTable> = (0..2).map(|t| ParamTable::sharded(&cfg, t, 2)).collect();
    let locals: Vec<Vec<Vec<f32>>> = by_tp.iter().map(|r| r.4.clone()).collect();
    let grads = ParamTable::unshard_values(&tables, &locals);
    let mut worst = (0.0f64, String::new());
    for ((spec, g), r) in full.specs.iter().zip(&grads).zip(&ref_grads) {
        let e = rel_err(g, r);
        if e >= worst.0 {
            worst = (e, spec.name.clone());
        }
    }
    let loss_err = (by_tp[0].3 as f64 - ref_loss).abs();
    let logits_err = logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, |m: f64, x| if x.is_nan() { f64::INFINITY } else { m.max(x) });
    let detail = format!("loss {loss_err:.1e} logits {logits_err:.1e} grad {:.1e} ({})", worst.0, worst.1);
    Ok(Some(([loss_err, logits_err, worst.0], detail)))
}

// ---- comparison helpers -----------------------------------------------------------------------

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
    fn budgeted(&self, bytes: u64) -> dm_runtime::Result<Self> {
        Ok(CpuBackend::with_budget("cpu:budgeted", Some(bytes)))
    }
}

struct Checker<D: DeviceUnderTest = CudaBackend> {
    cpu: CpuBackend,
    gpu: D,
    rng: ChaCha8Rng,
    rows: Vec<CheckRow>,
    benches: Vec<BenchRow>,
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

impl<D: DeviceUnderTest> Checker<D> {
    fn new(gpu: D) -> Self {
        Self {
            cpu: CpuBackend::new(),
            gpu,
            rng: ChaCha8Rng::seed_from_u64(0x6b75_6461),
            rows: Vec::new(),
            benches: Vec::new(),
        }
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

    fn randn(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    /// Records one row comparing every output of a case.
    fn compare(&mut self, group: &str, name: &str, tol: f64, (want, got): (Outs, Outs)) {
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

    fn handles(&self) -> Vec<(&'static str, D, f64)> {
        self.gpu.matmul_variants()
    }

    // ---- section 1: ops ----------------------------------------------------------------------

    fn ops(&mut self) -> Result<()> {
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

    fn memory_ops(&mut self) {
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

    fn elementwise_ops(&mut self) {
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

    fn matmul_ops(&mut self) {
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

    fn layernorm_ops(&mut self) {
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

    fn sharded_layernorm_ops(&mut self) {
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

    fn glu_embedding_ops(&mut self) {
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

    fn attention_ops(&mut self) {
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

    fn loss_ops(&mut self) {
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

    fn adamw_ops(&mut self) {
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

impl Checker<CudaBackend> {
    // ---- section 2: parity fixtures --------------------------------------------------------------

    fn parity(&mut self, dir: &Path) -> Result<()> {
        for f in fixture_dirs(dir)? {
            let name = f.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            for (label, be) in [
                ("f32 custom", self.gpu.with_options(Precision::F32, MatmulImpl::Custom)),
                ("f32 cublas", self.gpu.with_options(Precision::F32, MatmulImpl::Cublas)),
            ] {
                match crate::parity::run_on(be, &f) {
                    Ok(r) => {
                        let detail = format!(
                            "loss {:.1e} logits {:.1e} grad {:.1e} ({}) adamw {:.1e}/{:.1e}",
                            r.loss_abs_err,
                            r.logits_max_abs_err,
                            r.grad_max_rel_err,
                            r.grad_worst_param,
                            r.adamw_from_ref_grads_max_abs_err,
                            r.adamw_max_abs_err
                        );
                        let st = if r.pass { Status::Pass } else { Status::Fail };
                        self.row(
                            "parity",
                            &format!("{name} ({label})"),
                            st,
                            Some(r.grad_max_rel_err),
                            Some(crate::parity::GRAD_REL_TOL),
                            detail,
                        );
                    }
                    Err(e) => {
                        self.row("parity", &format!("{name} ({label})"), Status::Fail, None, None, format!("{e:#}"))
                    }
                }
            }
        }
        Ok(())
    }

    // ---- section 3: tp = 2 on one GPU ---------------------------------------------------------

    fn tp2(&mut self, dir: &Path) -> Result<()> {
        let ordinal = self.gpu.info().ordinal;
        for f in fixture_dirs(dir)? {
            let name = format!(
                "tp=2 {} (f32 custom)",
                f.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            );
            match tp2_fixture(|| CudaBackend::new(ordinal, CudaOptions::default()), &f) {
                Ok(None) => {
                    self.row("tp", &name, Status::Skipped, None, None, "the fixture does not admit tp=2".into())
                }
                Ok(Some((errs, detail))) => {
                    let [loss, logits, grad] = errs;
                    let pass = loss <= crate::parity::LOSS_TOL
                        && logits <= crate::parity::LOGITS_TOL
                        && grad <= crate::parity::GRAD_REL_TOL;
                    let st = if pass { Status::Pass } else { Status::Fail };
                    self.row("tp", &name, st, Some(grad), Some(crate::parity::GRAD_REL_TOL), detail);
                }
                Err(e) => self.row("tp", &name, Status::Fail, None, None, format!("{e:#}")),
            }
        }
        Ok(())
    }

    // ---- section 4: NCCL -------------------------------------------------------------------------

    fn nccl(&mut self) -> Result<()> {
        let g = "nccl";
        if !nccl_library_present() {
            let required = std::env::var("DALLE_MESH_REQUIRE_NCCL").is_ok_and(|v| v == "1");
            let msg = dm_parallel::comm::nccl::nccl_available().err().map(|e| e.to_string()).unwrap_or_default();
            self.row(
                g,
                "1-rank communicator round trip",
                if required { Status::Fail } else { Status::Skipped },
                None,
                None,
                msg,
            );
            return Ok(());
        }
        let be = self.gpu.clone();
        let result = (|| -> Result<String> {
            let id = NcclId::new()?;
            let comm = NcclComm::new(
                &be,
                &id,
                0,
                1,
                "gpu-check",
                NcclOptions { timeout: Duration::from_secs(60), ..Default::default() },
            )?;
            let x = self.randn(1000, 3.0);
            let mut buf = be.upload("nccl.x", &x)?;
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                comm.all_reduce(&mut buf, op)?;
            }
            let after_reduce = be.download(&buf)?;
            let send = be.upload("nccl.send", &x)?;
            let mut recv = be.upload("nccl.recv", &nan(1000))?;
            comm.all_gather(&send, &mut recv)?;
            let gathered = be.download(&recv)?;
            let mut recv2 = be.upload("nccl.recv2", &nan(1000))?;
            comm.reduce_scatter(&send, &mut recv2, ReduceOp::Sum)?;
            let scattered = be.download(&recv2)?;
            comm.broadcast(&mut buf, 0)?;
            comm.barrier()?;
            // The overlapped form: compute keeps going while the side stream reduces.
            let mut grad = be.upload("nccl.grad", &x)?;
            let pending = comm.all_reduce_async(&mut grad, ReduceOp::Avg)?;
            be.scale(&mut buf, 2.0)?;
            pending.join()?;
            let grad_after = be.download(&grad)?;
            let stats = comm.stats();
            let ok = after_reduce == x && gathered == x && scattered == x && grad_after == x;
            let counts = stats.all_reduce.calls == 4
                && stats.all_gather.calls == 1
                && stats.barrier.calls == 1
                && stats.all_reduce.bytes == 4 * 4000;
            if !ok {
                anyhow::bail!("a 1-rank collective changed its data");
            }
            if !counts {
                anyhow::bail!("stats do not count calls as the other communicators do: {stats:?}");
            }
            Ok(format!(
                "NCCL {}; all_reduce sum/avg/max, all_gather, reduce_scatter, broadcast, barrier, async all_reduce",
                nccl_version()?
            ))
        })();
        match result {
            Ok(d) => self.row(g, "1-rank communicator round trip", Status::Pass, None, None, d),
            Err(e) => self.row(g, "1-rank communicator round trip", Status::Fail, None, None, format!("{e:#}")),
        }
        Ok(())
    }

    // ---- section 5: benchmarks -------------------------------------------------------------------

    /// Seconds per call of `f` (median-free: total over adaptive repetitions after one warm-up).
    fn time(be: &CudaBackend, mut f: impl FnMut() -> dm_runtime::Result<()>) -> Result<f64> {
        f()?;
        be.synchronize()?;
        let t = Instant::now();
        f()?;
        be.synchronize()?;
        let once = t.elapsed().as_secs_f64().max(1e-6);
        let reps = ((0.15 / once) as usize).clamp(3, 50);
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        be.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    }

    fn benches(&mut self, deadline: Instant) -> Result<()> {
        self.bench_gemm(deadline)?;
        self.bench_attention(deadline)?;
        self.bench_cross_entropy()?;
        self.bench_steps(deadline)?;
        Ok(())
    }

    fn bench_gemm(&mut self, deadline: Instant) -> Result<()> {
        let t = 2048; // 8 · 256 image tokens
        let shapes = [
            ("mini qkvo fwd", t, 1024, 1024, false, false),
            ("mini glu up fwd", t, 2730, 1024, false, false),
            ("mini glu down fwd", t, 1024, 2730, false, false),
            ("mini glu up dW", 1024, 2730, t, true, false),
            ("mini lm_head fwd", t, 16385, 1024, false, false),
            ("mini lm_head dX", t, 1024, 16385, false, true),
            ("mega qkvo fwd", t, 2048, 2048, false, false),
            ("mega glu up fwd", t, 4096, 2048, false, false),
            ("mega glu down fwd", t, 2048, 4096, false, false),
            ("mega lm_head fwd", t, 16416, 2048, false, false),
        ];
        for (name, m, n, k, ta, tb) in shapes {
            if Instant::now() > deadline {
                self.row("bench", &format!("gemm {name}"), Status::Skipped, None, None, "time budget spent".into());
                continue;
            }
            let spec = MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: ta };
            let (ha, hb) = (self.randn(m * k, 1.0), self.randn(k * n, 1.0));
            let a = self.gpu.upload("bench.a", &ha)?;
            let b = self.gpu.upload("bench.b", &hb)?;
            drop((ha, hb));
            let mut c = self.gpu.zeros("bench.c", m * n)?;
            let mut figures = Vec::new();
            for (label, be, _) in self.handles() {
                let s = Self::time(&be, || be.matmul(&mut c, &a, &b, spec))?;
                figures.push((label, spec.flops() / s / 1e12));
            }
            for (label, tf) in &figures {
                let vs = figures.iter().find(|f| f.0 == label.replace("custom", "cublas")).map(|f| f.1);
                let detail = match vs {
                    Some(c) if label.contains("custom") => format!("m{m} n{n} k{k}; {:.0}% of cuBLAS", 100.0 * tf / c),
                    _ => format!("m{m} n{n} k{k}"),
                };
                self.bench("gemm", &format!("{name} {label}"), *tf, "TFLOP/s", detail);
            }
        }
        Ok(())
    }

    fn bench_attention(&mut self, deadline: Instant) -> Result<()> {
        for (t, causal) in [(64usize, false), (256, false), (256, true)] {
            if Instant::now() > deadline {
                break;
            }
            let shape = AttentionShape { batch: 8, q_len: t, kv_len: t, heads: 16, head_dim: 64, causal };
            let n = 8 * t * 1024;
            let host: Vec<Vec<f32>> = (0..4).map(|_| self.randn(n, 1.0)).collect();
            let q = self.gpu.upload("bench.q", &host[0])?;
            let k = self.gpu.upload("bench.k", &host[1])?;
            let v = self.gpu.upload("bench.v", &host[2])?;
            let dout = self.gpu.upload("bench.dout", &host[3])?;
            let (mut out, mut lse) = (self.gpu.zeros("bench.out", n)?, self.gpu.zeros("bench.lse", shape.lse_len())?);
            let (mut dq, mut dk, mut dv) =
                (self.gpu.zeros("bench.dq", n)?, self.gpu.zeros("bench.dk", n)?, self.gpu.zeros("bench.dv", n)?);
            for (label, be) in [
                ("f32", self.gpu.with_options(Precision::F32, MatmulImpl::Custom)),
                ("bf16 tc", self.gpu.with_options(Precision::Bf16Mixed, MatmulImpl::Custom)),
            ] {
                let fwd = Self::time(&be, || be.attention_forward(&mut out, &mut lse, &q, &k, &v, None, shape))?;
                let bwd = Self::time(&be, || {
                    be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, None, shape)
                })?;
                let f = shape.forward_flops();
                let what = format!("T={t}{} B8 H16 hd64 {label}", if causal { " causal" } else { "" });
                self.bench(
                    "attention",
                    &format!("fwd {what}"),
                    f / fwd / 1e12,
                    "TFLOP/s",
                    format!("{:.3} ms; causal not discounted", fwd * 1e3),
                );
                self.bench(
                    "attention",
                    &format!("bwd {what}"),
                    2.5 * f / bwd / 1e12,
                    "TFLOP/s",
                    format!("{:.3} ms; 2.5× fwd FLOPs", bwd * 1e3),
                );
            }
        }
        Ok(())
    }

    fn bench_cross_entropy(&mut self) -> Result<()> {
        let (rows, classes) = (2048usize, 16385usize);
        let host = self.randn(rows * classes, 4.0);
        let mut logits = self.gpu.upload("bench.logits", &host)?;
        let mut losses = self.gpu.zeros("bench.losses", rows)?;
        let targets: Vec<i32> = (0..rows).map(|_| self.rng.random_range(0..classes as i32)).collect();
        let tb = self.gpu.upload_ids("bench.targets", &targets)?;
        let be = self.gpu.clone();
        let s = Self::time(&be, || be.cross_entropy_fused(&mut logits, &mut losses, &tb, classes, 1e-3))?;
        let bytes = 2.0 * 4.0 * (rows * classes) as f64;
        self.bench(
            "loss",
            "cross_entropy_fused 2048×16385",
            bytes / s / 1e9,
            "GB/s",
            format!("{:.3} ms; logits read + gradient written once", s * 1e3),
        );
        Ok(())
    }

    fn bench_steps(&mut self, deadline: Instant) -> Result<()> {
        let cfg = DalleBartConfig::mini();
        let batch = 8;
        let t = Instant::now();
        let values = ParamTable::new(&cfg).init_values(cfg.init_std, 0);
        eprintln!("gpu-check: mini init values in {:.1} s", t.elapsed().as_secs_f64());
        let data = crate::bench::random_batch(&cfg, batch, 1)?;
        let flops = step_flops(&cfg, batch).total();
        let gpu = self.gpu.info().name.clone();
        let peak = crate::device::peak_bf16_tflops(&gpu).unwrap_or(f64::NAN);
        for (label, precision, matmul) in [
            ("bf16 custom", Precision::Bf16Mixed, MatmulImpl::Custom),
            ("bf16 cublas", Precision::Bf16Mixed, MatmulImpl::Cublas),
            ("f32 custom", Precision::F32, MatmulImpl::Custom),
        ] {
            if Instant::now() > deadline {
                self.row(
                    "bench",
                    &format!("mini step {label}"),
                    Status::Skipped,
                    None,
                    None,
                    "time budget spent".into(),
                );
                continue;
            }
            let be = self.gpu.with_options(precision, matmul);
            be.memory().reset_peak();
            let mut model = DalleBart::new(be.clone(), cfg.clone(), values.clone())?;
            let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
            let mut opt =
                AdamW::new(&be, AdamWConfig { weight_decay: 0.0, ..Default::default() }, &names, &model.params)?;
            let (warmup, steps) = if precision == Precision::F32 { (1, 3) } else { (2, 6) };
            let mut times = Vec::new();
            let mut loss = f32::NAN;
            for i in 0..warmup + steps {
                let t = Instant::now();
                model.zero_grads()?;
                loss = model.forward_backward(&data)?.loss;
                opt.update(&be, &mut model.params, &model.grads, 1e-4, 1.0)?;
                be.synchronize()?;
                if i >= warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            let tflops = flops / med / 1e12;
            let peak_gib = be.memory().report().peak_bytes as f64 / (1u64 << 30) as f64;
            self.bench(
                "step",
                &format!("mini batch {batch} {label} samples/s"),
                batch as f64 / med,
                "samples/s",
                format!("{:.1} ms/step, {tflops:.1} TFLOP/s, loss {loss:.3}, peak {peak_gib:.1} GiB", med * 1e3),
            );
            self.bench(
                "step",
                &format!("mini batch {batch} {label} MFU"),
                100.0 * tflops / peak,
                "%",
                format!("{:.2} TFLOP/step (dm_model::flops) / {peak} TFLOP/s bf16 peak of {gpu}", flops / 1e12),
            );
            let finite = loss.is_finite() && (loss - (cfg.loss_classes() as f32).ln()).abs() < 1.0;
            self.row(
                "step",
                &format!("mini step {label} loss ≈ ln(vocab)"),
                if finite { Status::Pass } else { Status::Fail },
                None,
                None,
                format!("loss {loss}"),
            );
            drop(opt);
            drop(model);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_catches_unwritten_and_nan_mismatch() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        assert_eq!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]), f64::INFINITY, "a poisoned element left unwritten");
        assert_eq!(rel_err(&[f32::NAN, 2.0], &[f32::NAN, 2.0]), 0.0, "NaN markers match");
        assert_eq!(rel_err(&[0.0, 2.0], &[f32::NAN, 2.0]), f64::INFINITY, "a NaN marker must stay NaN");
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[], &[]), 0.0);
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0, "tie rounds to even");
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0, "tie rounds to even (up)");
        assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 2.0 / 256.0);
        assert_eq!(round_bf16(-3.0), -3.0);
        let x = 0.123_456_79f32;
        assert!(((round_bf16(x) - x) / x).abs() < 1.0 / 256.0);
    }

    /// The tp = 2 harness (host-staged communicator, sharding, gathering) on CPU ranks: what the
    /// GPU check runs, minus the GPU.
    #[test]
    fn tp2_harness_matches_the_fixture_on_cpu_ranks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dallebart-tiny");
        let (errs, detail) = tp2_fixture(|| Ok(CpuBackend::new()), &dir).unwrap().expect("tiny admits tp=2");
        assert!(errs[0] <= crate::parity::LOSS_TOL, "{detail}");
        assert!(errs[1] <= crate::parity::LOGITS_TOL, "{detail}");
        assert!(errs[2] <= crate::parity::GRAD_REL_TOL, "{detail}");
    }

    /// Every op case of section 1, CPU against CPU: the harness itself (shapes, inputs, the
    /// poisoning) is valid, so a failure on the GPU is the GPU's.
    #[test]
    fn op_cases_run_on_the_cpu_harness() {
        let mut ck = Checker::new(CpuBackend::new());
        ck.section("ops", |c| c.ops());
        let bad: Vec<_> = ck.rows.iter().filter(|r| r.status != Status::Pass).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(ck.rows.len() > 60, "{} rows", ck.rows.len());
    }

    #[test]
    fn without_a_gpu_the_check_reports_unavailable_and_exit_code_2() {
        if dm_runtime::cuda::available() {
            eprintln!("a GPU is present; skipping the no-GPU behaviour test");
            return;
        }
        let dir = std::env::temp_dir().join(format!("dm-gpu-check-{}", std::process::id()));
        let r = run(Some(&dir)).unwrap();
        assert!(!r.available && r.exit_code() == 2, "{r:?}");
        assert!(r.message.contains("no usable GPU"), "{}", r.message);
        assert!(dir.join("gpu-check.json").is_file());
        std::fs::remove_dir_all(&dir).ok();
    }
}
