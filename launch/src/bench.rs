//! `dalle-mesh bench`: throughput of full training steps (on one device or a `tp × dp` mesh of
//! CPU ranks), and of the GEMMs they are made of. Figures are medians over timed repetitions
//! after warm-up; compare ratios measured in one run. `bench comm` is in [`crate::bench_comm`].

use crate::bench_procs::RankTotals;
use crate::trainer::step::{clip_factor, OptimizerStep};
use anyhow::{anyhow, bail, Context, Result};
use dm_model::dallebart::TpGroup;
use dm_model::flops::step_flops;
use dm_model::params::check_tp;
use dm_model::plan::{PlanOptions, Precision, StepComm};
use dm_model::{AdamWConfig, Batch, DalleBart, DalleBartConfig, ParamTable};
use dm_parallel::{CollectiveKind, CommStats, Communicator, Mesh, OpStats, ThreadComm, TimedComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::{Backend, MatmulSpec, OpClass, OpProfile, Profiled};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// A random but valid batch (captions with a few padded positions).
pub fn random_batch(cfg: &DalleBartConfig, batch: usize, seed: u64) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = cfg.max_text_length;
    let mut input_ids = Vec::with_capacity(batch * t);
    let mut mask = Vec::with_capacity(batch * t);
    for _ in 0..batch {
        let len = rng.random_range(2..=t);
        for j in 0..t {
            let real = j < len;
            mask.push(real as i32);
            input_ids.push(if real { rng.random_range(0..cfg.encoder_vocab_size as i32) } else { 1 });
        }
    }
    let labels = (0..batch * cfg.image_length).map(|_| rng.random_range(0..cfg.image_vocab_size as i32)).collect();
    Ok(Batch::new(cfg, batch, input_ids, mask, labels)?)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub use crate::device::Device;

/// What `bench step` runs: a mesh, a micro-batch per data-parallel rank, and how long.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOptions {
    pub tp: usize,
    pub dp: usize,
    pub zero1: bool,
    /// Rows per data-parallel rank.
    pub batch_per_device: usize,
    pub steps: usize,
    pub warmup: usize,
    pub precision: Precision,
    pub device: Device,
    /// Per-rank memory budget of the CPU ranks (None = unlimited).
    pub device_memory: Option<u64>,
    /// The device's dense peak for MFU; None = measure it with a short GEMM probe (CPU).
    pub peak_flops_per_s: Option<f64>,
}

impl StepOptions {
    /// One CPU device, fp32, 2 warm-up and 10 timed steps.
    pub fn new(tp: usize, dp: usize, batch_per_device: usize) -> Self {
        Self {
            tp,
            dp,
            zero1: false,
            batch_per_device,
            steps: 10,
            warmup: 2,
            precision: Precision::Fp32,
            device: Device::Cpu,
            device_memory: None,
            peak_flops_per_s: None,
        }
    }
    /// The memory plan's options for this run.
    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            precision: self.precision,
            zero1: self.zero1,
            device_memory: self.device_memory,
            cpu_threads: rayon_threads(),
            ..PlanOptions::new(self.tp, self.dp, self.batch_per_device)
        }
    }
}

/// Refuses, before anything is allocated, what can't run here: a precision the model does not
/// implement yet, `--device cuda` without a usable GPU (exit 2 through main).
pub fn check_supported(precision: Precision, device: Device) -> Result<()> {
    crate::device::check(device, precision, 1, 1)
}

/// Median, 10th and 90th percentile (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

impl Spread {
    pub fn of(v: &[f64]) -> Spread {
        if v.is_empty() {
            return Spread { median: f64::NAN, p10: f64::NAN, p90: f64::NAN };
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| s[((q * (s.len() - 1) as f64).round() as usize).min(s.len() - 1)];
        Spread { median: median(v.to_vec()), p10: at(0.1), p90: at(0.9) }
    }
    /// `k / x` of every figure (a time spread becomes a rate spread; p10 and p90 swap).
    pub fn inverse(&self, k: f64) -> Spread {
        Spread { median: k / self.median, p10: k / self.p90, p90: k / self.p10 }
    }
}

/// Seconds per step in each op class, averaged over ranks and timed steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ClassSeconds {
    pub gemm: f64,
    pub attention: f64,
    pub cross_entropy: f64,
    pub norm: f64,
    pub elementwise: f64,
    pub optimizer: f64,
    pub memory: f64,
}

impl ClassSeconds {
    fn from_profile(p: &OpProfile, per: f64) -> Self {
        let s = |c: OpClass| p.get(c).seconds / per;
        ClassSeconds {
            gemm: s(OpClass::Gemm),
            attention: s(OpClass::Attention),
            cross_entropy: s(OpClass::CrossEntropy),
            norm: s(OpClass::Norm),
            elementwise: s(OpClass::Elementwise),
            optimizer: s(OpClass::Optimizer),
            memory: s(OpClass::Memory),
        }
    }
}

/// What `bench step` reports (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    pub preset: String,
    pub device: String,
    pub precision: String,
    pub tp: usize,
    pub dp: usize,
    pub world: usize,
    pub zero1: bool,
    pub batch_per_device: usize,
    pub global_batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub step_s_median: f64,
    pub step_s_min: f64,
    pub step_s: Spread,
    pub samples_per_s: f64,
    pub samples_per_s_spread: Spread,
    pub image_tokens_per_s: Spread,
    /// Model FLOPs of one step over the whole mesh (`model/src/flops.rs`).
    pub gflop_per_step: f64,
    pub gflops_per_s: f64,
    /// Dense peak of the device(s) the mesh runs on (CPU: one host shared by every rank).
    pub peak_gflops_per_s: f64,
    pub mfu: f64,
    /// Time in collectives (waiting and copying) over step time, averaged over ranks.
    pub comm_share: f64,
    pub comm_wait_s_per_step: f64,
    /// Share of the dp gradient collectives' time hidden behind the backward on world rank 0
    /// (`1 − compute-stream wait at the join / comm-stream busy time`, from CUDA events:
    /// [`crate::trainer::step::OptimizerStep::dp_overlap_times`]). `null` on CPU ranks (threads
    /// and MPI run the collectives blocking, so nothing is hidden) and without a dp group.
    pub dp_comm_hidden_share: Option<f64>,
    /// Calls and bytes of one step on world rank 0, per communicator (tp, dp, world).
    pub comm_per_step: StepComm,
    /// Σ bytes of one step on world rank 0, by collective kind.
    pub comm_bytes_per_step: std::collections::BTreeMap<String, u64>,
    pub compute_s_per_step: ClassSeconds,
    /// Largest per-rank peak of tracked memory, and what the memory plan says for it.
    pub peak_bytes: u64,
    pub planned_bytes: u64,
    pub loss_first: f32,
    pub loss_last: f32,
    pub params: usize,
    pub threads: usize,
}

/// What one rank measured.
struct RankRun {
    step_s: Vec<f64>,
    wait_s: Vec<f64>,
    profile: OpProfile,
    comm: StepComm,
    losses: Vec<f32>,
    peak_bytes: u64,
    /// The measured steps' deferred dp collectives (None where they run blocking).
    overlap: Option<dm_parallel::comm::deferred::OverlapTimes>,
}

type Comm<B> = Arc<dyn Communicator<Profiled<B>>>;
/// A group's communicator under the timer: threads or MPI between CPU processes, NCCL between GPUs.
type Inner<B> = Arc<dyn Communicator<B>>;
/// A rank's (tp, dp, world) communicators before the timer.
type InnerGroups<B> = (Option<Inner<B>>, Option<Inner<B>>, Option<Inner<B>>);
/// A group's communicator as the model sees it, and its timer.
type Timed<B> = Option<(Comm<B>, Arc<TimedComm<B>>)>;

/// One rank's communicators, timed.
struct RankGroups<B: Backend> {
    tp: Timed<B>,
    dp: Timed<B>,
    world: Timed<B>,
}

impl RankGroups<CpuBackend> {
    fn new(mesh: &Mesh, comms: dm_parallel::RankComms) -> Self {
        let arc = |c: ThreadComm, on: bool| on.then(|| Arc::new(c) as Arc<dyn Communicator<CpuBackend>>);
        Self::timed((arc(comms.tp, mesh.tp() > 1), arc(comms.dp, mesh.dp() > 1), arc(comms.world, mesh.world() > 1)))
    }
    /// A process rank's MPI groups.
    fn of_process(g: &crate::process_ranks::ProcessGroups) -> Self {
        Self::timed((g.0.clone(), g.1.clone(), Some(g.2.clone())))
    }
}

impl<B: Backend> RankGroups<B> {
    fn timed(g: InnerGroups<B>) -> Self {
        let wrap = |c: Option<Inner<B>>| {
            c.map(|inner| {
                let t = Arc::new(TimedComm::new(inner));
                (t.clone() as Comm<B>, t)
            })
        };
        RankGroups { tp: wrap(g.0), dp: wrap(g.1), world: wrap(g.2) }
    }
    fn all(&self) -> [&Timed<B>; 3] {
        [&self.tp, &self.dp, &self.world]
    }
    fn wait_s(&self) -> f64 {
        self.all().iter().filter_map(|g| g.as_ref()).map(|(_, t)| t.times().total()).sum()
    }
    fn stats(&self) -> StepComm {
        let s = |g: &Timed<B>| g.as_ref().map(|(c, _)| c.stats()).unwrap_or_default();
        StepComm { tp: s(&self.tp), dp: s(&self.dp), world: s(&self.world) }
    }
    /// The trainer's view of the timed groups.
    fn trainer_groups(&self) -> crate::trainer::Groups<Profiled<B>> {
        let c = |g: &Timed<B>| g.as_ref().map(|(c, _)| c.clone());
        crate::trainer::Groups { tp: c(&self.tp), dp: c(&self.dp), world: c(&self.world) }
    }
}

fn diff(a: &StepComm, b: &StepComm) -> StepComm {
    let d = |x: &CommStats, y: &CommStats| {
        let mut out = *x;
        for k in CollectiveKind::ALL {
            let (o, e) = (x.get(k), y.get(k));
            let v = OpStats { calls: o.calls - e.calls, bytes: o.bytes - e.bytes };
            match k {
                CollectiveKind::AllReduce => out.all_reduce = v,
                CollectiveKind::AllGather => out.all_gather = v,
                CollectiveKind::ReduceScatter => out.reduce_scatter = v,
                CollectiveKind::Broadcast => out.broadcast = v,
                CollectiveKind::Barrier => out.barrier = v,
            }
        }
        out
    };
    StepComm { tp: d(&a.tp, &b.tp), dp: d(&a.dp, &b.dp), world: d(&a.world, &b.world) }
}

/// The training loop of one rank: the trainer's optimizer step ([`crate::trainer::step`], the
/// same collectives as `train` — forward, loss and backward over tp, the loss average over dp,
/// the gradient all-reduce or ZeRO-1 reduce-scatter/update/all-gather, the global gradient norm
/// and clipping to 1 — and the world stop agreement) with AdamW at lr 1e-3 on this dp rank's
/// fixed random batch, so the loss falls. Each step ends by reading the agreement's value back
/// from the device, so on a GPU the step time is the device's, not the enqueueing host's.
fn run_rank<B: Backend>(
    cfg: &DalleBartConfig,
    o: &StepOptions,
    mesh: &Mesh,
    rank: usize,
    inner: B,
    groups: RankGroups<B>,
) -> Result<RankRun> {
    let (dp_index, tp_index) = mesh.coords(rank);
    let be = Profiled::new(inner);
    let table = ParamTable::sharded(cfg, tp_index, mesh.tp());
    let local = table.shard_values(&ParamTable::new(cfg).init_values(cfg.init_std, 0));
    let group = groups.tp.as_ref().map(|(c, _)| TpGroup { rank: tp_index, size: mesh.tp(), comm: c.clone() });
    let model = DalleBart::new_sharded(be.clone(), cfg.clone(), group, local)?.with_precision(o.precision)?;
    let adamw = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    let trainer_groups = groups.trainer_groups();
    let world = trainer_groups.world.clone();
    let mut core =
        OptimizerStep::new(be.clone(), model, trainer_groups, adamw, o.zero1, (dp_index, mesh.dp()), None, 0)?;
    let data = random_batch(cfg, o.batch_per_device, 1 + dp_index as u64)?;
    let tokens = (o.batch_per_device * mesh.dp() * cfg.image_length) as f32;
    let mut run = RankRun {
        step_s: Vec::new(),
        wait_s: Vec::new(),
        profile: OpProfile::default(),
        comm: StepComm::default(),
        losses: Vec::new(),
        peak_bytes: 0,
        overlap: None,
    };
    let mut start_profile = be.profile();
    let mut start_overlap = None;
    for i in 0..o.warmup + o.steps {
        if i == o.warmup {
            start_profile = be.profile();
            start_overlap = core.dp_overlap_times()?;
        }
        let (wait0, comm0) = (groups.wait_s(), groups.stats());
        let t0 = Instant::now();
        let local = core.backward(1, 1.0 / tokens, || Ok(data.clone()))?;
        let synced = core.sync(local)?;
        let (loss, norm) = (synced.loss, synced.grad_norm);
        core.apply(synced, 1e-3, clip_factor(Some(1.0), norm))?;
        // The trainer's stop agreement (every rank takes part, as in `train`), after the update
        // so that the step ends on every rank together; reading its result back waits for the
        // device's queue.
        crate::stop::agree(&be, world.as_ref(), crate::stop::StopReason::None)?;
        let dt = t0.elapsed().as_secs_f64();
        tracing::debug!(rank, step = i, loss, seconds = dt, warmup = i < o.warmup, "bench step");
        if i >= o.warmup {
            run.step_s.push(dt);
            run.wait_s.push(groups.wait_s() - wait0);
            run.losses.push(loss);
            if i == o.warmup {
                run.comm = diff(&groups.stats(), &comm0);
            }
        }
    }
    run.profile = be.profile().since(&start_profile);
    run.overlap = core.dp_overlap_times()?.zip(start_overlap).map(|(end, start)| end.since(&start));
    run.peak_bytes = be.memory().report().peak_bytes;
    Ok(run)
}

/// Measures a dense peak for MFU on this CPU: the best of a few 1024³ and 2048³ GEMMs.
pub fn cpu_peak_flops() -> Result<f64> {
    let be = CpuBackend::new();
    let mut best = 0.0f64;
    for n in [1024usize, 2048] {
        let a = be.upload("a", &vec![0.5; n * n])?;
        let b = be.upload("b", &vec![0.25; n * n])?;
        let mut c = be.zeros("c", n * n)?;
        let s = MatmulSpec::nn(n, n, n);
        be.matmul(&mut c, &a, &b, s)?;
        for _ in 0..3 {
            let t0 = Instant::now();
            be.matmul(&mut c, &a, &b, s)?;
            best = best.max(s.flops() / t0.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

/// Checks `o` and the model, and plans one rank: the planned bytes.
fn check_step(cfg: &DalleBartConfig, o: &StepOptions) -> Result<(Mesh, u64)> {
    check_supported(o.precision, o.device)?;
    if o.steps == 0 || o.batch_per_device == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    let mesh = Mesh::new(o.tp, o.dp)?;
    check_tp(cfg, o.tp).map_err(|e| anyhow!("--tp {}: {e}", o.tp))?;
    let plan = dm_model::plan::plan(cfg, &o.plan_options()).map_err(|e| anyhow!("cannot plan this mesh: {e}"))?;
    if let Some(budget) = o.device_memory {
        if plan.total_tracked > budget {
            bail!(
                "the memory plan of one rank needs {} but the device memory is {}: lower --batch, raise --tp, or \
                 pass --zero1",
                crate::plan_cmd::human_bytes(plan.total_tracked),
                crate::plan_cmd::human_bytes(budget)
            );
        }
    }
    Ok((mesh, plan.total_tracked))
}

fn peak_of(o: &StepOptions) -> Result<f64> {
    match o.peak_flops_per_s {
        Some(p) => Ok(p),
        None => cpu_peak_flops(),
    }
}

/// Times `steps` training steps after `warmup` on the mesh of `o` (ranks are CPU threads).
pub fn bench_step(preset: &str, cfg: &DalleBartConfig, o: &StepOptions) -> Result<StepBench> {
    let (mesh, planned) = check_step(cfg, o)?;
    if o.device == Device::Cuda {
        return bench_step_cuda(preset, cfg, o, mesh, planned);
    }
    let peak = peak_of(o)?;
    let runs = dm_parallel::run_ranks(&mesh, |rank, comms| {
        let be = CpuBackend::with_budget(&format!("cpu:rank{rank}"), o.device_memory);
        run_rank(cfg, o, &mesh, rank, be, RankGroups::new(&mesh, comms))
    })
    .map_err(|f| anyhow!("{f}"))?;
    let first = runs.first().context("no ranks ran")?;
    let totals: Vec<RankTotals> = runs.iter().map(RankRun::totals).collect();
    let device = format!("{} ({} rank threads sharing {} cores)", o.device.name(), mesh.world(), rayon_threads());
    summarise(preset, cfg, o, first, &totals, peak, planned, device)
}

/// [`bench_step`] on GPUs: rank r of this process on GPU r, NCCL between them (one process
/// driving every GPU of the mesh). MFU against the dense bf16 peak of the GPU's name
/// ([`crate::device::PEAK_BF16_DENSE_TFLOPS`]; `null` for a GPU the table does not know).
/// **Untested on GPUs** (written without one).
fn bench_step_cuda(
    preset: &str,
    cfg: &DalleBartConfig,
    o: &StepOptions,
    mesh: Mesh,
    planned: u64,
) -> Result<StepBench> {
    crate::device::check_cuda(mesh.world(), mesh.world() > 1)?;
    let backend = |gpu: usize| crate::device::cuda_backend(gpu, o.precision, o.device_memory);
    let runs = if mesh.world() == 1 {
        vec![run_rank(cfg, o, &mesh, 0, backend(0)?, RankGroups::timed((None, None, None)))?]
    } else {
        let ids = crate::trainer::ranks::InProcessIds::new(&mesh)?;
        dm_parallel::run_ranks(&mesh, |rank, _thread_comms| {
            let be = backend(rank)?;
            let g = ids.join(&mesh, rank, &be)?;
            run_rank(cfg, o, &mesh, rank, be, RankGroups::timed((g.tp, g.dp, g.world)))
        })
        .map_err(|f| anyhow!("{f}"))?
    };
    let (gpu, peak) = cuda_peak(o, mesh.world())?;
    let first = runs.first().context("no ranks ran")?;
    let totals: Vec<RankTotals> = runs.iter().map(RankRun::totals).collect();
    let device = format!("cuda ({} × {gpu}, one rank per GPU in one process, NCCL)", mesh.world());
    summarise(preset, cfg, o, first, &totals, peak, planned, device)
}

/// The name of GPU 0 and the dense bf16 peak (FLOP/s) of `gpus` of them: `--peak-tflops`, else
/// the table's figure for the name, else NaN (MFU not reported).
fn cuda_peak(o: &StepOptions, gpus: usize) -> Result<(String, f64)> {
    let gpu = dm_runtime::cuda::CudaBackend::probe()?.devices.first().map(|d| d.name.clone()).unwrap_or_default();
    let peak = match (o.peak_flops_per_s, crate::device::peak_bf16_tflops(&gpu)) {
        (Some(p), _) => p,
        (None, Some(t)) => t * 1e12 * gpus as f64,
        (None, None) => {
            tracing::warn!(gpu = %gpu, "no dense bf16 peak known for this GPU: MFU is not reported");
            f64::NAN
        }
    };
    Ok((gpu, peak))
}

/// [`bench_step`] on this process's GPU (`LOCAL_RANK`) when a launcher started one process per
/// GPU: NCCL communicators through the rendezvous store (as `train` makes them); world rank 0
/// gathers every rank's totals and reports. **Untested on GPUs** (written without one).
fn bench_step_cuda_process(
    preset: &str,
    cfg: &DalleBartConfig,
    o: &StepOptions,
    (mesh, planned): (Mesh, u64),
    p: &crate::process_ranks::ProcessRank,
) -> Result<Option<StepBench>> {
    let (rank, gpu) = (p.world.rank, p.world.local_rank);
    crate::device::check_cuda(gpu + 1, mesh.world() > 1)?;
    let be = crate::device::cuda_backend(gpu, o.precision, o.device_memory)?;
    let c = dm_parallel::comm::nccl::NcclComm::mesh(&be, &mesh, rank, &p.store, Default::default())?;
    let g = crate::trainer::ranks::nccl_groups(&mesh, c.tp, c.dp, c.world);
    let run = run_rank(cfg, o, &mesh, rank, be, RankGroups::timed((g.tp, g.dp, g.world)))?;
    let Some(totals) = crate::bench_procs::gather_on_rank0(p, "bench-step", run.totals())? else { return Ok(None) };
    let (name, peak) = cuda_peak(o, mesh.world())?;
    let device = format!("cuda ({} × {name}, one process per GPU, NCCL through the store)", mesh.world());
    summarise(preset, cfg, o, &run, &totals, peak, planned, device).map(Some)
}

/// [`bench_step`] where this process runs: as threads, or, when a launcher started one process
/// per rank (`dalle-mesh launch --nproc N -- bench step ...`, `srun`, `mpirun`), as this
/// process's rank over MPI. `None` on every process rank but world rank 0 (which reports).
pub fn bench_step_here(preset: &str, cfg: &DalleBartConfig, o: &StepOptions) -> Result<Option<StepBench>> {
    let (mesh, planned) = check_step(cfg, o)?;
    let what = format!("bench step {preset} {o:?}");
    if o.device == Device::Cuda {
        let Some(rank) = crate::bench_procs::join_cuda(mesh, &what)? else {
            return bench_step(preset, cfg, o).map(Some);
        };
        return crate::bench_procs::run_cuda(rank, |p| bench_step_cuda_process(preset, cfg, o, (mesh, planned), p));
    }
    let Some(procs) = crate::bench_procs::join(mesh, &what)? else {
        return bench_step(preset, cfg, o).map(Some);
    };
    crate::bench_procs::run(procs, |p| {
        let rank = p.world_rank();
        let be = CpuBackend::with_budget(&format!("cpu:rank{rank}"), o.device_memory);
        let run = run_rank(cfg, o, &mesh, rank, be, RankGroups::of_process(&p.groups))?;
        let Some(totals) = p.gather_on_rank0("bench-step", run.totals())? else { return Ok(None) };
        // The probe runs after the steps, while the other ranks are idle.
        let peak = peak_of(o)?;
        let device = format!("{} ({} rank processes over MPI)", o.device.name(), mesh.world());
        summarise(preset, cfg, o, &run, &totals, peak, planned, device).map(Some)
    })
}

impl RankRun {
    fn totals(&self) -> RankTotals {
        RankTotals {
            step_s: self.step_s.clone(),
            wait_s: self.wait_s.clone(),
            profile: RankTotals::profile_from(&self.profile),
            peak_bytes: self.peak_bytes,
        }
    }
}

/// The report of world rank 0's run `first` and every rank's `totals`.
#[allow(clippy::too_many_arguments)]
fn summarise(
    preset: &str,
    cfg: &DalleBartConfig,
    o: &StepOptions,
    first: &RankRun,
    totals: &[RankTotals],
    peak: f64,
    planned: u64,
    device: String,
) -> Result<StepBench> {
    let world = o.tp * o.dp;
    // Every step ends with a world collective, so world rank 0's step time is the mesh's.
    let step = Spread::of(&first.step_s);
    let global = o.batch_per_device * o.dp;
    let flops = step_flops(cfg, o.batch_per_device).total() * o.dp as f64;
    let timed: f64 = totals.iter().map(|r| r.step_s.iter().sum::<f64>()).sum();
    let waited: f64 = totals.iter().map(|r| r.wait_s.iter().sum::<f64>()).sum();
    let mut profile = OpProfile::default();
    for r in totals {
        for (a, b) in profile.classes.iter_mut().zip(&r.profile_of()?.classes) {
            a.calls += b.calls;
            a.units += b.units;
            a.seconds += b.seconds;
        }
    }
    let mut bytes = std::collections::BTreeMap::new();
    for k in CollectiveKind::ALL {
        let c = &first.comm;
        let b = c.tp.get(k).bytes + c.dp.get(k).bytes + c.world.get(k).bytes;
        bytes.insert(k.name().to_string(), b);
    }
    let per_rank_steps = (totals.len() * o.steps) as f64;
    Ok(StepBench {
        preset: preset.to_string(),
        device,
        precision: o.precision.name().into(),
        tp: o.tp,
        dp: o.dp,
        world,
        zero1: o.zero1 && o.dp > 1,
        batch_per_device: o.batch_per_device,
        global_batch: global,
        steps: o.steps,
        warmup: o.warmup,
        step_s_median: step.median,
        step_s_min: first.step_s.iter().copied().fold(f64::INFINITY, f64::min),
        step_s: step,
        samples_per_s: global as f64 / step.median,
        samples_per_s_spread: step.inverse(global as f64),
        image_tokens_per_s: step.inverse((global * cfg.image_length) as f64),
        gflop_per_step: flops / 1e9,
        gflops_per_s: flops / step.median / 1e9,
        peak_gflops_per_s: peak / 1e9,
        // CPU: the mesh shares one host, its peak is the host's; CUDA: the sum of the GPUs' peaks.
        mfu: flops / step.median / peak,
        comm_share: waited / timed.max(f64::MIN_POSITIVE),
        comm_wait_s_per_step: waited / per_rank_steps,
        dp_comm_hidden_share: first.overlap.and_then(|t| t.hidden_share()),
        comm_per_step: first.comm,
        comm_bytes_per_step: bytes,
        compute_s_per_step: ClassSeconds::from_profile(&profile, per_rank_steps),
        peak_bytes: totals.iter().map(|r| r.peak_bytes).max().unwrap_or(0),
        planned_bytes: planned,
        loss_first: first.losses.first().copied().unwrap_or(f32::NAN),
        loss_last: first.losses.last().copied().unwrap_or(f32::NAN),
        params: ParamTable::new(cfg).numel(),
        threads: rayon_threads(),
    })
}

pub fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmBench {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub gflops_per_s: f64,
}

/// The distinct GEMM shapes of one training step of `cfg` at `batch` (forward and backward).
pub fn model_gemm_shapes(cfg: &DalleBartConfig, batch: usize) -> Vec<(String, MatmulSpec)> {
    let d = cfg.d_model;
    let nt = batch * cfg.max_text_length;
    let ni = batch * cfg.image_length;
    let v = cfg.loss_classes();
    let f = cfg.decoder_ffn_dim;
    let sp = |m, n, k, ta, tb| MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: ta };
    vec![
        ("lm_head fwd".into(), sp(ni, v, d, false, false)),
        ("lm_head dW".into(), sp(d, v, ni, true, false)),
        ("lm_head dX".into(), sp(ni, d, v, false, true)),
        ("dec qkvo fwd".into(), sp(ni, d, d, false, false)),
        ("dec qkvo dW".into(), sp(d, d, ni, true, false)),
        ("dec glu up fwd".into(), sp(ni, f, d, false, false)),
        ("dec glu up dW".into(), sp(d, f, ni, true, false)),
        ("dec glu down fwd".into(), sp(ni, d, f, false, false)),
        ("enc qkvo fwd".into(), sp(nt, d, d, false, false)),
    ]
}

/// GFLOP/s of the CPU backend's GEMM on the model's shapes (median of `reps`).
pub fn bench_gemm(cfg: &DalleBartConfig, batch: usize, reps: usize) -> Result<Vec<GemmBench>> {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut out = Vec::new();
    for (name, s) in model_gemm_shapes(cfg, batch) {
        let a: Vec<f32> = (0..s.m * s.k).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..s.k * s.n).map(|_| rng.random::<f32>() - 0.5).collect();
        let (a, b) = (be.upload("a", &a)?, be.upload("b", &b)?);
        let mut c = be.zeros("c", s.m * s.n)?;
        be.matmul(&mut c, &a, &b, s)?;
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                be.matmul(&mut c, &a, &b, s).map(|_| t0.elapsed().as_secs_f64())
            })
            .collect::<std::result::Result<_, _>>()?;
        out.push(GemmBench {
            name,
            m: s.m,
            n: s.n,
            k: s.k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            gflops_per_s: s.flops() / median(times) / 1e9,
        });
    }
    Ok(out)
}
