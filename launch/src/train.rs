//! `dalle-mesh train`: the training loop on one device — data, gradient accumulation, clipping,
//! AdamW with dalle-mini's schedules, evaluation against the unigram baseline, atomic
//! checkpoints with exact resume, periodic samples, metrics and a loss curve.
//!
//! Output folder:
//! - `run.yaml` — the resolved run config;
//! - `metrics.jsonl` — one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`,
//!   `samples_per_s`, `image_tokens_per_s`, `peak_bytes`) and per evaluation (`eval_loss`; the
//!   first also `unigram_baseline_loss`);
//! - `checkpoints/step_*/` — see [`crate::run_checkpoint`];
//! - `samples/step_*.png` — decoded samples of the sample prompts;
//! - `loss.png`, `loss.svg` — training and eval loss against the unigram baseline.

use crate::divergence::{DivergenceGuard, GuardState};
use crate::run_checkpoint::{self, list_checkpoints, verify, write_checkpoint};
use crate::run_config::{parse_bytes, RunConfig};
use crate::stop::{self, StopReason};
use anyhow::{Context, Result};
use dm_data::{Dataset, ReaderState, ShardedReader, TextTokenizer};
use dm_model::checkpoint::{layout_tensors, load_weights, params_from_tensors, read_tensors, serialize_safetensors};
use dm_model::dallebart::SamplingOptions;
use dm_model::{AdamW, AdamWConfig, Batch, DalleBart, DalleBartConfig};
use dm_parallel::{Communicator, Mesh, ReduceOp, ThreadComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What a checkpoint needs besides weights and moments to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Completed optimizer steps.
    pub step: u64,
    pub reader: ReaderState,
    pub seed: u64,
    pub run_config: RunConfig,
    /// The divergence guard's memory at this step.
    #[serde(default)]
    pub guard: GuardState,
}

/// How a checkpoint's codes turn into pixels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataInfo {
    /// `synthetic` (decodable with the built-in codebook) or `encoded` (VQGAN codes).
    pub kind: String,
    pub grid: usize,
    pub max_text_length: usize,
    pub normalize_text: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub steps: u64,
    pub final_loss: f32,
    pub eval_loss: Option<f32>,
    pub unigram_baseline_loss: f64,
    pub minutes: f64,
    pub samples_per_s: f64,
    pub checkpoint: Option<PathBuf>,
    pub sample_png: Option<PathBuf>,
    pub loss_png: PathBuf,
    /// Largest per-rank peak of tracked device memory.
    pub peak_bytes_per_rank: u64,
    /// World rank of this process (0 when the ranks are threads); only rank 0 prints the summary.
    #[serde(skip)]
    pub world_rank: usize,
    /// Process ranks: seconds from start to a completed rendezvous handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rendezvous_s: Option<f64>,
    /// Why the run stopped before `training.steps` (`time_limit`, `SIGTERM`, ...), if it did.
    pub stopped: Option<String>,
}

impl TrainSummary {
    /// The process exit code for this outcome: [`crate::exit_code::STOPPED_REQUEUE`] after a stop
    /// signal, else success.
    pub fn exit_code(&self) -> i32 {
        match self.stopped.as_deref() {
            Some(s) if s != "time_limit" => crate::exit_code::STOPPED_REQUEUE,
            _ => crate::exit_code::SUCCESS,
        }
    }
}

/// The training data of a run.
pub struct RunData {
    pub train: crate::train_data::TrainSource,
    pub eval: Option<Arc<Dataset>>,
    pub tokenizer: Arc<TextTokenizer>,
    pub tokenizer_path: PathBuf,
    pub info: DataInfo,
    /// Captions to sample when the config lists none.
    pub default_prompts: Vec<String>,
}

/// Opens (and for the synthetic set, generates once under `out/data`) the run's data.
pub fn prepare_data(cfg: &RunConfig, out: &Path) -> Result<RunData> {
    let d = &cfg.data;
    let (train_dir, eval_dir, tok_path, kind) = match &d.dataset {
        Some(dir) => (
            dir.clone(),
            d.eval_dataset.clone(),
            d.tokenizer.clone().context("data.tokenizer is required with data.dataset")?,
            "encoded",
        ),
        None => {
            let s = &d.synthetic;
            let spec = dm_data::SyntheticSpec {
                train_rows: s.train_rows,
                eval_rows: s.eval_rows,
                image_length: s.image_length,
                seed: s.seed,
            };
            let dir = out
                .join("data")
                .join(format!("synthetic-{}x{}-{}-seed{}", s.train_rows, s.eval_rows, s.image_length, s.seed));
            let paths = dm_data::synthetic::SyntheticPaths::new(&dir);
            if !paths.held_out.exists() {
                tracing::info!(dir = %dir.display(), "generating the built-in synthetic dataset");
                dm_data::generate_synthetic(&spec, &dir)?;
            }
            (paths.train, Some(paths.eval), paths.tokenizer, "synthetic")
        }
    };
    let train = crate::train_data::TrainSource::open(&train_dir, d.parquet.options())?;
    let eval = eval_dir.map(|e| Dataset::open(e).map(Arc::new)).transpose()?;
    if d.verify {
        let mapped = match &train {
            crate::train_data::TrainSource::Mapped(ds) => Some(ds),
            crate::train_data::TrainSource::Parquet(_) => None,
        };
        for ds in mapped.into_iter().chain(eval.as_ref()) {
            let r = ds.verify()?;
            tracing::info!(dir = %ds.dir().display(), rows = r.rows, "data.verify: checksums and every row check out");
        }
    }
    let tokenizer =
        TextTokenizer::from_file(&tok_path)?.with_max_text_length(d.max_text_length)?.with_normalizer(d.normalize_text);
    let grid = (train.image_length() as f64).sqrt().round() as usize;
    let default_prompts = match &eval {
        Some(e) => {
            let mut seen = Vec::new();
            for i in 0..e.len() {
                let c = e.caption(i)?.to_string();
                if !seen.contains(&c) {
                    seen.push(c);
                }
                if seen.len() == 8 {
                    break;
                }
            }
            seen
        }
        None => vec![train.first_caption()?],
    };
    Ok(RunData {
        train,
        eval,
        tokenizer: Arc::new(tokenizer),
        tokenizer_path: tok_path,
        info: DataInfo {
            kind: kind.into(),
            grid,
            max_text_length: d.max_text_length,
            normalize_text: d.normalize_text,
        },
        default_prompts,
    })
}

/// Cross-entropy of the training set's code frequencies: the loss of a model that ignores
/// captions and positions, the bar a trained model must clearly beat.
pub fn unigram_baseline(ds: &crate::train_data::TrainSource, classes: usize) -> Result<f64> {
    let counts = ds.code_counts(classes)?;
    let total: u64 = counts.iter().sum();
    Ok(counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum())
}

fn to_model_batch(b: dm_data::Batch, cfg: &DalleBartConfig) -> Result<Batch> {
    let batch = Batch {
        batch: b.batch,
        text_len: b.text_len,
        image_len: b.image_len,
        input_ids: b.input_ids,
        attention_mask: b.attention_mask,
        labels: b.labels,
        decoder_input_ids: b.decoder_input_ids,
    };
    batch.validate(cfg)?;
    Ok(batch)
}

/// Appends JSON lines to metrics.jsonl.
struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// Opens metrics.jsonl, dropping lines after `resume_step` (they belong to the interrupted run).
    /// Also says whether the kept lines already hold `unigram_baseline_loss`.
    fn open(path: &Path, resume_step: Option<u64>) -> Result<(Self, bool)> {
        let mut has_baseline = false;
        if let (Some(step), Ok(text)) = (resume_step, std::fs::read_to_string(path)) {
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            has_baseline = kept.contains("\"unigram_baseline_loss\"");
            crate::atomic_write(path, kept.as_bytes())?;
        } else if resume_step.is_none() {
            let _ = std::fs::remove_file(path);
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok((Self { file }, has_baseline))
    }
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// The communicators of one rank (None on a single device).
#[derive(Clone)]
struct Groups {
    tp: Option<Arc<dyn Communicator<CpuBackend>>>,
    dp: Option<Arc<dyn Communicator<CpuBackend>>>,
    world: Option<Arc<dyn Communicator<CpuBackend>>>,
}

impl Groups {
    fn single() -> Self {
        Self { tp: None, dp: None, world: None }
    }
}

/// All-reduces one scalar over `comm` (identity without one).
fn reduce_scalar(
    be: &CpuBackend,
    comm: &Option<Arc<dyn Communicator<CpuBackend>>>,
    x: f32,
    op: ReduceOp,
) -> Result<f32> {
    let Some(c) = comm else { return Ok(x) };
    let mut b = be.upload("scalar", &[x])?;
    c.all_reduce(&mut b, op)?;
    Ok(be.download(&b)?[0])
}

/// A rank's host copy of its shards, handed to world rank 0 for a checkpoint.
struct RankState {
    dp_index: usize,
    tp_index: usize,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Full (unsharded) weights and optimizer state, as a checkpoint holds them.
pub struct FullState {
    pub params: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl FullState {
    /// The first tensor (its file and name) holding a NaN or an infinity.
    pub fn first_non_finite(&self, table: &dm_model::ParamTable) -> Option<String> {
        let parts = [
            ("weights.safetensors: tensor", &self.params),
            ("optimizer.safetensors: AdamW moment m of", &self.m),
            ("optimizer.safetensors: AdamW moment v of", &self.v),
        ];
        for (kind, tensors) in parts {
            for (spec, t) in table.specs.iter().zip(tensors.iter()) {
                if t.iter().any(|x| !x.is_finite()) {
                    return Some(format!("{kind} {}", spec.name));
                }
            }
        }
        None
    }
}

/// Assembles full tensors from every rank's shards (ZeRO-1 chunks concatenated across dp).
fn assemble(cfg: &DalleBartConfig, mesh: &Mesh, zero1: bool, states: &[RankState]) -> FullState {
    let tables: Vec<dm_model::ParamTable> =
        (0..mesh.tp()).map(|t| dm_model::ParamTable::sharded(cfg, t, mesh.tp())).collect();
    let by = |dp: usize, tp: usize| {
        states.iter().find(|s| s.dp_index == dp && s.tp_index == tp).expect("every rank reported")
    };
    let params: Vec<Vec<Vec<f32>>> = (0..mesh.tp()).map(|t| by(0, t).params.clone()).collect();
    let moment = |pick: &dyn Fn(&RankState) -> &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        let locals: Vec<Vec<Vec<f32>>> = (0..mesh.tp())
            .map(|t| {
                if !zero1 {
                    return pick(by(0, t)).clone();
                }
                (0..tables[t].specs.len())
                    .map(|i| {
                        let n = tables[t].specs[i].numel();
                        let mut v: Vec<f32> = (0..mesh.dp()).flat_map(|d| pick(by(d, t))[i].clone()).collect();
                        v.truncate(n);
                        v
                    })
                    .collect()
            })
            .collect();
        dm_model::ParamTable::unshard_values(&tables, &locals)
    };
    FullState {
        params: dm_model::ParamTable::unshard_values(&tables, &params),
        m: moment(&|s| &s.m),
        v: moment(&|s| &s.v),
    }
}

/// What a checkpoint records besides the model, optimizer and data position.
struct SaveExtra {
    guard: GuardState,
    /// Lower is better: the eval loss of this step, else the running median training loss. The
    /// best checkpoint is kept outside the rotation.
    quality: Option<f32>,
}

/// Writes a checkpoint from full state (world rank 0 only); refuses non-finite state.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    out: &Path,
    cfg: &RunConfig,
    model_cfg: &DalleBartConfig,
    data: &RunData,
    step: u64,
    reader: ReaderState,
    full: &FullState,
    extra: SaveExtra,
) -> Result<PathBuf> {
    if let Some(what) = full.first_non_finite(&dm_model::ParamTable::new(model_cfg)) {
        return Err(anyhow::Error::new(crate::exit_code::Diverged(format!(
            "step {step}: {what} holds non-finite values: the run diverged and the checkpoint was not saved. \
             Lower optimizer.learning_rate and resume from the last checkpoint with --resume RUN --allow-config-change"
        ))));
    }
    let table = dm_model::ParamTable::new(model_cfg);
    let weights = layout_tensors(&table, &full.params, model_cfg.use_scan);
    let mut moments = Vec::new();
    for ((spec, m), v) in table.specs.iter().zip(&full.m).zip(&full.v) {
        moments.push((format!("m.{}", spec.name), spec.shape.clone(), m.clone()));
        moments.push((format!("v.{}", spec.name), spec.shape.clone(), v.clone()));
    }
    let state = TrainerState { step, reader, seed: cfg.training.seed, run_config: cfg.clone(), guard: extra.guard };
    let files = vec![
        ("weights.safetensors", serialize_safetensors(Path::new("weights.safetensors"), &weights)?),
        ("optimizer.safetensors", serialize_safetensors(Path::new("optimizer.safetensors"), &moments)?),
        ("config.json", serde_json::to_vec_pretty(&model_cfg.to_json())?),
        ("trainer_state.json", serde_json::to_vec_pretty(&state)?),
        ("tokenizer.json", std::fs::read(&data.tokenizer_path)?),
        ("data.json", serde_json::to_vec_pretty(&data.info)?),
    ];
    let dir = write_checkpoint(out, step, &files, cfg.training.keep_checkpoints, extra.quality)?;
    tracing::info!(step, dir = %dir.display(), "checkpoint saved");
    Ok(dir)
}

/// Why one checkpoint can't be resumed from.
enum LoadError {
    /// It was saved from another model config: no older checkpoint of the folder fits either.
    Mismatch(anyhow::Error),
    /// It doesn't verify or parse, or holds non-finite values: an older one may do.
    Unusable(anyhow::Error),
}

/// One checkpoint's full state: checksums, files, model config and finite values checked.
fn load_one(dir: &Path, model_cfg: &DalleBartConfig) -> Result<(TrainerState, FullState), LoadError> {
    use LoadError::Unusable;
    verify(dir).map_err(Unusable)?;
    let saved_cfg = DalleBartConfig::from_file(&dir.join("config.json")).map_err(|e| Unusable(e.into()))?;
    if &saved_cfg != model_cfg {
        return Err(LoadError::Mismatch(crate::bad_input!(
            "checkpoint {} was saved from a different model config:\n  checkpoint: {saved_cfg:?}\n  this run:   {model_cfg:?}\n\
             resume with the run config it was trained with (its run.yaml, via --config), or start a new run with \
             another --out",
            dir.display()
        )));
    }
    let state_path = dir.join("trainer_state.json");
    let state: TrainerState = std::fs::read(&state_path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .map_err(|e| Unusable(e.context(format!("{}: unreadable trainer state", state_path.display()))))?;
    let table = dm_model::ParamTable::new(model_cfg);
    let params = load_weights(&dir.join("weights.safetensors"), &table).map_err(|e| Unusable(e.into()))?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors = read_tensors(&opt_path).map_err(|e| Unusable(e.into()))?;
    let m = params_from_tensors(&opt_path, &table, &tensors, "m.").map_err(|e| Unusable(e.into()))?;
    let v = params_from_tensors(&opt_path, &table, &tensors, "v.").map_err(|e| Unusable(e.into()))?;
    let full = FullState { params, m, v };
    if let Some(what) = full.first_non_finite(&table) {
        return Err(Unusable(crate::bad_input!("{}: {what} holds non-finite values", dir.display())));
    }
    Ok((state, full))
}

/// Loads one checkpoint folder as a resume would (checksums, every file parsed, values finite),
/// with the model config it holds; returns its step.
pub fn inspect_checkpoint(dir: &Path) -> Result<u64> {
    verify(dir)?;
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    match load_one(dir, &cfg) {
        Ok((state, _)) => Ok(state.step),
        Err(LoadError::Mismatch(e) | LoadError::Unusable(e)) => Err(e),
    }
}

/// Loads the checkpoint to resume from: `path` itself if it is one checkpoint, else the newest
/// checkpoint of the run folder `path` that loads, each skipped one named with why (skipped
/// checkpoints are left in place). Refuses one from a different model config.
fn load_checkpoint(path: &Path, model_cfg: &DalleBartConfig) -> Result<(TrainerState, FullState, PathBuf)> {
    let explicit = run_checkpoint::is_checkpoint_dir(path);
    let candidates: Vec<PathBuf> = if explicit {
        vec![path.to_path_buf()]
    } else {
        list_checkpoints(path).into_iter().rev().map(|(_, d)| d).collect()
    };
    if candidates.is_empty() {
        return Err(crate::bad_input!(
            "{} holds no checkpoint (expected {}/checkpoints/step_*/): check the --resume path",
            path.display(),
            path.display()
        ));
    }
    let mut skipped = Vec::new();
    for dir in candidates {
        match load_one(&dir, model_cfg) {
            Ok((state, full)) => {
                tracing::info!(step = state.step, dir = %dir.display(), "resuming");
                return Ok((state, full, dir));
            }
            Err(LoadError::Mismatch(e)) => return Err(e),
            Err(LoadError::Unusable(e)) if explicit => return Err(e),
            Err(LoadError::Unusable(e)) => {
                tracing::warn!(dir = %dir.display(), "skipping a checkpoint that does not load (kept, not deleted): {e:#}");
                skipped.push(format!("{}: {e:#}", dir.display()));
            }
        }
    }
    Err(crate::bad_input!("no checkpoint of {} loads:\n  {}", path.display(), skipped.join("\n  ")))
}

/// The optimizer of one rank.
enum Optimizer {
    Full(AdamW<CpuBackend>),
    Zero1(dm_parallel::zero::Zero1<CpuBackend>),
}

/// What every rank shares (read-only) during a run.
struct Shared<'a> {
    cfg: &'a RunConfig,
    model_cfg: &'a DalleBartConfig,
    mesh: Mesh,
    out: &'a Path,
    data: &'a RunData,
    budget: Option<u64>,
    start_step: u64,
    start_reader: ReaderState,
    start_guard: GuardState,
    restored: Option<&'a FullState>,
    collector: std::sync::Mutex<Vec<RankState>>,
    baseline: f64,
    /// Ranks are processes: checkpoint shards travel through part files, not `collector`.
    processes: bool,
}

/// What world rank 0 reports at the end.
#[derive(Default)]
struct RankOutcome {
    steps: u64,
    final_loss: f32,
    eval_loss: Option<f32>,
    samples_per_s: f64,
    checkpoint: Option<PathBuf>,
    sample_png: Option<PathBuf>,
    peak_bytes: u64,
    /// Set when the run stopped early after saving.
    stopped: Option<StopReason>,
    /// The divergence guard's message when it stopped the run (nothing was saved).
    diverged: Option<String>,
}

/// The training loop of one rank (the only rank on a single device).
fn run_rank(rank: usize, groups: Groups, sh: &Shared) -> Result<RankOutcome> {
    let (cfg, model_cfg, mesh) = (sh.cfg, sh.model_cfg, sh.mesh);
    let (dp_index, tp_index) = mesh.coords(rank);
    let (tp, dp) = (mesh.tp(), mesh.dp());
    let leader = rank == 0;
    let name = if mesh.world() == 1 { "cpu:0".to_string() } else { format!("cpu:rank{rank}") };
    let be = CpuBackend::with_budget(&name, sh.budget);
    let table = dm_model::ParamTable::sharded(model_cfg, tp_index, tp);
    let full_params = match sh.restored {
        Some(r) => r.params.clone(),
        None => dm_model::ParamTable::new(model_cfg).init_values(model_cfg.init_std, cfg.training.seed),
    };
    let local = table.shard_values(&full_params);
    drop(full_params);
    let group = groups.tp.clone().map(|comm| dm_model::dallebart::TpGroup { rank: tp_index, size: tp, comm });
    let mut model = DalleBart::new_sharded(be.clone(), model_cfg.clone(), group, local)?;
    let names: Vec<String> = table.specs.iter().map(|s| s.name.clone()).collect();
    let adamw = AdamWConfig {
        b1: cfg.optimizer.b1,
        b2: cfg.optimizer.b2,
        eps: cfg.optimizer.eps,
        weight_decay: cfg.optimizer.weight_decay,
    };
    let zero1 = cfg.mesh.zero1 && dp > 1;
    let mut opt = if zero1 {
        let lens: Vec<usize> = table.specs.iter().map(|s| s.numel()).collect();
        let mut z = dm_parallel::zero::Zero1::new(&be, &names, &lens, dp_index, dp)?;
        if let Some(r) = sh.restored {
            let (m, v) = (table.shard_values(&r.m), table.shard_values(&r.v));
            for i in 0..names.len() {
                let (start, end) = z.chunk_range(i);
                be.write(&mut z.shards[i].m, 0, &m[i][start..end])?;
                be.write(&mut z.shards[i].v, 0, &v[i][start..end])?;
            }
        }
        Optimizer::Zero1(z)
    } else {
        let mut a = AdamW::new(&be, adamw, &names, &model.params)?;
        if let Some(r) = sh.restored {
            for (buf, vals) in a.m.iter_mut().zip(table.shard_values(&r.m)) {
                be.write(buf, 0, &vals)?;
            }
            for (buf, vals) in a.v.iter_mut().zip(table.shard_values(&r.v)) {
                be.write(buf, 0, &vals)?;
            }
        }
        a.step = sh.start_step;
        Optimizer::Full(a)
    };
    let mut reader = sh.data.train.reader(&sh.data.tokenizer, sh.start_reader)?;
    let (mut metrics, baseline_written) = if leader {
        let (m, has) = Metrics::open(&sh.out.join("metrics.jsonl"), sh.restored.map(|_| sh.start_step))?;
        (Some(m), has)
    } else {
        (None, false)
    };
    let mut guard = DivergenceGuard::new(cfg.training.divergence.clone(), sh.start_guard.clone());

    let tr = &cfg.training;
    let micro = tr.batch_size / tr.grad_accumulation;
    let tokens_per_step = (tr.batch_size * model_cfg.image_length) as f32;
    let started = Instant::now();
    let progress = crate::rank_log::Progress::new(leader, crate::rank_log::batch_mode(), tr.steps, sh.start_step);
    let (mut window_start, mut window_samples) = (Instant::now(), 0usize);
    let mut outcome = RankOutcome { steps: sh.start_step, final_loss: f32::NAN, ..Default::default() };
    let mut first_eval = !baseline_written;
    let mut step = sh.start_step;
    while step < tr.steps {
        let lr = cfg.optimizer.learning_rate_at(step);
        model.zero_grads()?;
        let mut loss_sum = 0.0f64;
        for _ in 0..tr.grad_accumulation {
            let b = to_model_batch(reader.next_batch(micro, dp_index, dp)?, model_cfg)?;
            model.forward(&b)?;
            loss_sum += model.loss_and_backward(1.0 / tokens_per_step)?.loss as f64;
        }
        crate::test_hook("step", step + 1);
        crate::test_fail(rank, step + 1)?;
        let loss = reduce_scalar(&be, &groups.dp, (loss_sum / tr.grad_accumulation as f64) as f32, ReduceOp::Avg)?;
        // Gradient sync across dp and the global gradient norm (replicated tensors counted once).
        let counted = |i: usize| tp_index == 0 || table.specs[i].shard != dm_model::params::Shard::Replicated;
        let (grad_norm, chunks) = match &opt {
            Optimizer::Full(_) => {
                if let Some(c) = &groups.dp {
                    for g in model.grads.iter_mut() {
                        c.all_reduce(g, ReduceOp::Sum)?;
                    }
                }
                let mut sq = 0.0f64;
                for (i, g) in model.grads.iter().enumerate() {
                    if counted(i) {
                        sq += be.sum_squares(g)?;
                    }
                }
                let sq = if groups.tp.is_some() {
                    reduce_scalar(&be, &groups.tp, sq as f32, ReduceOp::Sum)? as f64
                } else {
                    sq
                };
                (sq.sqrt() as f32, None)
            }
            Optimizer::Zero1(z) => {
                let c = groups.dp.as_ref().expect("zero1 needs dp > 1");
                let chunks = z.reduce_scatter_grads(&be, c.as_ref(), &model.grads, &names)?;
                let mut sq = 0.0f64;
                for (i, g) in chunks.iter().enumerate() {
                    if counted(i) {
                        sq += be.sum_squares(g)?;
                    }
                }
                let sq = reduce_scalar(&be, &groups.world, sq as f32, ReduceOp::Sum)? as f64;
                (sq.sqrt() as f32, Some(chunks))
            }
        };
        // One agreed stop reason per step (signal, time limit, divergence), before the update, so
        // that nothing diverged is applied and every rank stops at the same step.
        let over_time = tr.time_limit_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0);
        let tripped = guard.observe(step + 1, loss, grad_norm);
        let mut local = stop::local_reason(over_time).max(crate::test_stop(rank, step + 1));
        if tripped.is_some() {
            local = StopReason::Diverged;
        }
        let reason = stop::agree(&be, groups.world.as_ref(), local)?;
        if reason == StopReason::Diverged {
            outcome.diverged =
                Some(tripped.unwrap_or_else(|| format!("step {}: another rank's divergence guard tripped", step + 1)));
            break;
        }
        let clip = match cfg.optimizer.max_grad_norm {
            Some(max) if grad_norm > max => max / grad_norm,
            _ => 1.0,
        };
        match (&mut opt, chunks) {
            (Optimizer::Full(a), _) => {
                let DalleBart { params, grads, .. } = &mut model;
                a.update(&be, params, grads, lr, clip)?;
            }
            (Optimizer::Zero1(z), Some(chunks)) => {
                let s = crate::optim_step::adamw_step(&adamw, lr, step + 1, clip);
                let c = groups.dp.as_ref().expect("zero1 needs dp > 1");
                z.update(&be, c.as_ref(), &mut model.params, &chunks, &names, &s)?;
            }
            (Optimizer::Zero1(_), None) => unreachable!("zero1 always reduce-scatters"),
        }
        step += 1;
        outcome.steps = step;
        outcome.final_loss = loss;
        window_samples += tr.batch_size;
        progress.step(loss);

        if step.is_multiple_of(tr.log_every) || step == tr.steps {
            let dt = window_start.elapsed().as_secs_f64();
            outcome.samples_per_s = window_samples as f64 / dt.max(1e-9);
            let peak = reduce_scalar(&be, &groups.world, be.memory().report().peak_bytes as f32, ReduceOp::Max)?;
            let line = crate::rank_log::StepLine {
                step,
                loss,
                lr,
                grad_norm,
                samples_per_s: outcome.samples_per_s,
                image_tokens_per_s: outcome.samples_per_s * model_cfg.image_length as f64,
                peak_bytes: peak as u64,
            };
            progress.logged(&line);
            if let Some(m) = metrics.as_mut() {
                m.write(serde_json::json!({
                    "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "samples_per_s": line.samples_per_s,
                    "image_tokens_per_s": line.image_tokens_per_s,
                    "peak_bytes": line.peak_bytes,
                }))?;
            }
            (window_start, window_samples) = (Instant::now(), 0);
        }
        let last = step == tr.steps;
        let out_of_time = reason == StopReason::TimeLimit;
        let signalled = matches!(reason, StopReason::Signal(_));
        if signalled {
            tracing::warn!(step, reason = ?reason.label(), "stop signal: saving a checkpoint, then exiting");
            crate::test_hook("signal", 0);
        }
        let mut eval_now = None;
        if (tr.eval_every > 0 && step.is_multiple_of(tr.eval_every)) || last || out_of_time {
            if let Some(e) = eval_loss(&mut model, sh, &be, &groups, dp_index, dp)? {
                if let Some(m) = metrics.as_mut() {
                    let mut line = serde_json::json!({"step": step, "eval_loss": e});
                    if first_eval {
                        line["unigram_baseline_loss"] = sh.baseline.into();
                        first_eval = false;
                    }
                    m.write(line)?;
                }
                progress.eval(step, e, sh.baseline);
                outcome.eval_loss = Some(e);
                eval_now = Some(e);
            }
        }
        let save = (tr.save_every > 0 && step.is_multiple_of(tr.save_every)) || last || out_of_time || signalled;
        let sample = (tr.sample_every > 0 && step.is_multiple_of(tr.sample_every)) || last || out_of_time;
        if save {
            // The weights about to be saved must give a sound loss on the next batch.
            let probe = probe_loss(&mut model, sh, &be, &groups, &reader, dp_index, dp)?;
            if let Some(why) = guard.check_probe(step, probe) {
                outcome.diverged = Some(why);
                break;
            }
        }
        if save || sample {
            let full = gather_state(&model, &opt, sh, &be, &groups, dp_index, tp_index)?;
            if let Some(full) = full {
                if save {
                    let extra = SaveExtra { guard: guard.state().clone(), quality: eval_now.or(guard.median()) };
                    outcome.checkpoint =
                        Some(save_checkpoint(sh.out, cfg, model_cfg, sh.data, step, reader.state(), &full, extra)?);
                }
                if sample {
                    outcome.sample_png = sample_from(sh, model_cfg, step, &full.params)?;
                }
            }
            if let Some(w) = &groups.world {
                w.barrier()?;
            }
        }
        if out_of_time {
            tracing::warn!(step, "training.time_limit_minutes reached: stopping after saving");
        }
        if out_of_time || signalled {
            outcome.stopped = Some(reason);
            break;
        }
    }
    progress.finish();
    outcome.peak_bytes = be.memory().report().peak_bytes;
    Ok(outcome)
}

/// Mean eval loss over the first `eval_batches` eval batches, split across dp.
fn eval_loss(
    model: &mut DalleBart<CpuBackend>,
    sh: &Shared,
    be: &CpuBackend,
    groups: &Groups,
    dp_index: usize,
    dp: usize,
) -> Result<Option<f32>> {
    let Some(eval) = sh.data.eval.clone() else { return Ok(None) };
    let tr = &sh.cfg.training;
    let micro = (tr.batch_size / tr.grad_accumulation).min(eval.len() / dp * dp).max(dp);
    let batches = tr.eval_batches.min(eval.len() / micro).max(1);
    let mut reader = ShardedReader::with_state(eval, sh.data.tokenizer.clone(), ReaderState::new(0))?;
    let mut sum = 0.0f64;
    for _ in 0..batches {
        let b = to_model_batch(reader.next_batch(micro, dp_index, dp)?, sh.model_cfg)?;
        sum += model.eval_loss(&b)? as f64;
    }
    let local = (sum / batches as f64) as f32;
    Ok(Some(reduce_scalar(be, &groups.dp, local, ReduceOp::Avg)?))
}

/// The loss of the current weights on the next training micro-batch (read from a copy of the
/// reader, so training does not skip it), averaged over dp: the check before a checkpoint write.
/// Collectives: one forward and loss over tp, one scalar average over dp.
fn probe_loss(
    model: &mut DalleBart<CpuBackend>,
    sh: &Shared,
    be: &CpuBackend,
    groups: &Groups,
    reader: &crate::train_data::TrainReader,
    dp_index: usize,
    dp: usize,
) -> Result<f32> {
    let tr = &sh.cfg.training;
    let mut peek = sh.data.train.reader(&sh.data.tokenizer, reader.state())?;
    let b = to_model_batch(peek.next_batch(tr.batch_size / tr.grad_accumulation, dp_index, dp)?, sh.model_cfg)?;
    let local = model.eval_loss(&b)?;
    reduce_scalar(be, &groups.dp, local, ReduceOp::Avg)
}

/// Hands this rank's shards to world rank 0, which assembles the full state (others get None).
fn gather_state(
    model: &DalleBart<CpuBackend>,
    opt: &Optimizer,
    sh: &Shared,
    be: &CpuBackend,
    groups: &Groups,
    dp_index: usize,
    tp_index: usize,
) -> Result<Option<FullState>> {
    let (m, v) = match opt {
        Optimizer::Full(a) => (
            a.m.iter().map(|b| be.download(b)).collect::<Result<Vec<_>, _>>()?,
            a.v.iter().map(|b| be.download(b)).collect::<Result<Vec<_>, _>>()?,
        ),
        Optimizer::Zero1(z) => (
            z.shards.iter().map(|s| be.download(&s.m)).collect::<Result<Vec<_>, _>>()?,
            z.shards.iter().map(|s| be.download(&s.v)).collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let state = RankState { dp_index, tp_index, params: model.param_values()?, m, v };
    if sh.processes {
        return gather_parts(state, opt, sh, groups);
    }
    sh.collector.lock().expect("collector").push(state);
    // In-process ranks hand their host copies over directly; the barrier orders the hand-over.
    if let Some(w) = &groups.world {
        w.barrier()?;
    }
    if dp_index != 0 || tp_index != 0 {
        return Ok(None);
    }
    let states = std::mem::take(&mut *sh.collector.lock().expect("collector"));
    Ok(Some(assemble(sh.model_cfg, &sh.mesh, matches!(opt, Optimizer::Zero1(_)), &states)))
}

/// [`gather_state`] for process ranks: every rank writes its part file, then (after a barrier)
/// world rank 0 reads and assembles them and removes the parts.
fn gather_parts(state: RankState, opt: &Optimizer, sh: &Shared, groups: &Groups) -> Result<Option<FullState>> {
    use crate::process_ranks::{parts_dir, read_parts, write_part};
    let rank = sh.mesh.rank_of(state.dp_index, state.tp_index);
    let dir = parts_dir(sh.out);
    write_part(&dir, rank, &(state.dp_index, state.tp_index, [state.params, state.m, state.v]))?;
    groups.world.as_ref().context("process ranks have a world communicator")?.barrier()?;
    if rank != 0 {
        return Ok(None);
    }
    let states: Vec<RankState> = read_parts(&dir, sh.mesh.world())?
        .into_iter()
        .map(|(dp_index, tp_index, [params, m, v])| RankState { dp_index, tp_index, params, m, v })
        .collect();
    for (r, s) in states.iter().enumerate() {
        let tensors =
            dm_model::ParamTable::sharded(sh.model_cfg, s.tp_index.min(sh.mesh.tp() - 1), sh.mesh.tp()).specs.len();
        if (s.dp_index, s.tp_index) != sh.mesh.coords(r) || [&s.params, &s.m, &s.v].iter().any(|g| g.len() != tensors) {
            anyhow::bail!(
                "checkpoint part {} does not belong to rank {r} of this mesh (a stale or damaged part); \
                 the previous checkpoints are intact: resume with --resume {}",
                dir.join(format!("rank{r}.part")).display(),
                sh.out.display()
            );
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Some(assemble(sh.model_cfg, &sh.mesh, matches!(opt, Optimizer::Zero1(_)), &states)))
}

/// Samples the run's prompts from full weights on a single-device model (world rank 0).
fn sample_from(sh: &Shared, model_cfg: &DalleBartConfig, step: u64, params: &[Vec<f32>]) -> Result<Option<PathBuf>> {
    let tr = &sh.cfg.training;
    let prompts =
        if tr.sample_prompts.is_empty() { sh.data.default_prompts.clone() } else { tr.sample_prompts.clone() };
    if prompts.is_empty() {
        return Ok(None);
    }
    let mut model = DalleBart::new(CpuBackend::new(), model_cfg.clone(), params.to_vec())?;
    let path = sh.out.join("samples").join(format!("step_{step:08}.png"));
    let opts = SamplingOptions { temperature: 1.0, top_k: Some(16), seed: tr.seed ^ step, ..Default::default() };
    let vqgan = tr.vqgan.as_deref();
    crate::sample::sample_images(&mut model, &sh.data.tokenizer, &sh.data.info, &prompts, 1, &opts, &path, vqgan)?;
    tracing::info!(path = %path.display(), "samples written");
    Ok(Some(path))
}

/// Choices of `train` beyond the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue (or restart) a folder whose run.yaml describes another run.
    pub allow_config_change: bool,
}

/// Runs (or resumes) training into `out`, on one device or a tp × dp mesh of CPU ranks.
pub fn train(cfg: RunConfig, out: &Path, resume: Option<&Path>) -> Result<TrainSummary> {
    train_with(cfg, out, resume, &TrainOptions::default())
}

/// Refuses `out` when its run.yaml describes a different run than `cfg`.
fn check_same_run(cfg: &RunConfig, out: &Path, opts: &TrainOptions) -> Result<()> {
    let path = out.join("run.yaml");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let Ok(saved) = serde_yaml::from_str::<RunConfig>(&text) else {
        tracing::warn!(path = %path.display(), "unreadable run.yaml of an earlier run: it will be replaced");
        return Ok(());
    };
    let diff = saved.identity_differences(cfg);
    if diff.is_empty() || opts.allow_config_change {
        if !diff.is_empty() {
            tracing::warn!(?diff, "--allow-config-change: continuing the folder with a changed config");
        }
        return Ok(());
    }
    Err(crate::bad_input!(
        "{} holds a run with another config (differs in {}); nothing was changed. Use that run's config ({}), \
         choose another --out, or pass --allow-config-change to use this config there anyway",
        out.display(),
        diff.join(", "),
        path.display()
    ))
}

/// [`train`] with options.
pub fn train_with(cfg: RunConfig, out: &Path, resume: Option<&Path>, opts: &TrainOptions) -> Result<TrainSummary> {
    cfg.validate()?;
    let world = crate::world::detect()?;
    crate::process_ranks::check_transport_early(&cfg, &world, Mesh::new(cfg.mesh.tp, cfg.mesh.dp)?)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Process ranks share the run folder: rank 0 holds the lock and tidies it for all.
    let _lock = if world.rank == 0 { Some(crate::run_lock::acquire(out)?) } else { None };
    if world.rank == 0 {
        run_checkpoint::clean_leftovers(out)?;
    }
    if resume.is_none() && !list_checkpoints(out).is_empty() {
        return Err(crate::bad_input!(
            "{} already holds checkpoints of another run: pass --resume {} to continue it, or choose another --out \
             (nothing was changed)",
            out.display(),
            out.display()
        ));
    }
    check_same_run(&cfg, out, opts)?;

    let mesh = Mesh::new(cfg.mesh.tp, cfg.mesh.dp)?;
    if !world.is_multi_process() {
        return train_in_process(cfg, out, resume, mesh, None);
    }
    let mut procs = crate::process_ranks::join(&cfg, world, mesh)?;
    let result = train_in_process(cfg, out, resume, mesh, Some(&mut procs));
    match result {
        Ok(summary) => {
            procs.finish();
            Ok(summary)
        }
        Err(e) => Err(procs.fail(e)),
    }
}

/// [`train`] of this process: every rank as a thread, or (with `procs`) the one rank of this process.
fn train_in_process(
    cfg: RunConfig,
    out: &Path,
    resume: Option<&Path>,
    mesh: Mesh,
    mut procs: Option<&mut crate::process_ranks::ProcessRank>,
) -> Result<TrainSummary> {
    if procs.is_none() {
        crate::process_ranks::check_in_process_transport(&cfg, mesh)?;
    }
    let rank0 = procs.as_ref().is_none_or(|p| p.world.rank == 0);
    let budget = cfg.mesh.device_memory.as_deref().map(parse_bytes).transpose()?;
    // Rank 0 prepares (e.g. generates the synthetic set) before the others open the data.
    if !rank0 {
        procs.as_ref().map_or(Ok(()), |p| p.barrier("data"))?;
    }
    let data = prepare_data(&cfg, out)?;
    if rank0 {
        procs.as_ref().map_or(Ok(()), |p| p.barrier("data"))?;
    }
    let model_cfg =
        cfg.model_config(data.tokenizer.vocab_size(), data.train.image_vocab() as usize, data.train.image_length())?;
    dm_model::params::check_tp(&model_cfg, mesh.tp()).map_err(|e| anyhow::anyhow!("mesh.tp = {}: {e}", mesh.tp()))?;
    data.train.check_dp(mesh.dp())?;
    if let Some(v) = &cfg.training.vqgan {
        crate::vqgan_grid::check_fits(v, model_cfg.image_length, model_cfg.image_vocab_size)?;
    }
    if let Some(b) = budget {
        crate::plan_check(&model_cfg, &cfg, b)?;
    }
    let restored = match resume {
        Some(p) => Some(load_checkpoint(p, &model_cfg)?),
        None => crate::interop::start_from(&cfg, &model_cfg)?.map(|(s, f)| (s, f, PathBuf::new())),
    };
    if let (Some(path), Some((state, _, dir)), true) = (resume, &restored, rank0) {
        let why = if run_checkpoint::is_checkpoint_dir(path) {
            format!("a branch abandoned by resuming from {}", dir.display())
        } else {
            "it does not load (see the warning above)".to_string()
        };
        run_checkpoint::set_aside_newer(out, state.step, &why)?;
    }
    let (start_step, start_reader, start_guard) =
        restored.as_ref().map_or((0, ReaderState::new(cfg.training.seed), GuardState::default()), |(s, _, _)| {
            (s.step, s.reader, s.guard.clone())
        });
    if let Some(p) = procs.as_mut() {
        p.handshake(&cfg, start_step)?;
    }
    if rank0 {
        crate::atomic_write(&out.join("run.yaml"), serde_yaml::to_string(&cfg)?.as_bytes())?;
    }
    let shared = Shared {
        cfg: &cfg,
        model_cfg: &model_cfg,
        mesh,
        out,
        data: &data,
        budget,
        start_step,
        start_reader,
        start_guard,
        restored: restored.as_ref().map(|(_, f, _)| f),
        collector: std::sync::Mutex::new(Vec::new()),
        baseline: unigram_baseline(&data.train, model_cfg.loss_classes())?,
        processes: procs.is_some(),
    };
    let started = Instant::now();
    let outcome = if let Some(p) = procs.as_ref() {
        let (tp, dp, world) = crate::process_ranks::mpi_groups(&mesh)?;
        // On failure MPI is not finalised (MPI_Finalize would wait for ranks stuck in a collective):
        // the caller reports the failure through the store and the process exits.
        let outcome = run_rank(p.world.rank, Groups { tp, dp, world: Some(world) }, &shared)?;
        crate::process_ranks::mpi_finalize();
        outcome
    } else if mesh.world() == 1 {
        run_rank(0, Groups::single(), &shared)?
    } else {
        let results = dm_parallel::run_ranks(&mesh, |rank, comms| {
            let arc = |c: ThreadComm| -> Arc<dyn Communicator<CpuBackend>> { Arc::new(c) };
            let groups = Groups {
                tp: (mesh.tp() > 1).then(|| arc(comms.tp)),
                dp: (mesh.dp() > 1).then(|| arc(comms.dp)),
                world: Some(arc(comms.world)),
            };
            run_rank(rank, groups, &shared)
        })
        .map_err(|f| anyhow::anyhow!("{f}"))?;
        let peak = results.iter().map(|r| r.peak_bytes).max().unwrap_or(0);
        let mut first = results.into_iter().next().expect("at least one rank");
        first.peak_bytes = peak;
        first
    };
    if rank0 {
        write_loss_curve(out, shared.baseline)?;
    }
    if let Some(why) = outcome.diverged {
        let kept = match list_checkpoints(out).pop() {
            Some((step, dir)) => format!("the newest checkpoint, step {step} ({}), is from before it", dir.display()),
            None => "no checkpoint was saved".to_string(),
        };
        return Err(anyhow::Error::new(crate::exit_code::Diverged(format!("{why} ({kept})"))));
    }
    Ok(TrainSummary {
        world_rank: procs.as_ref().map_or(0, |p| p.world.rank),
        rendezvous_s: procs.as_ref().map(|p| p.rendezvous_s),
        out: out.to_path_buf(),
        steps: outcome.steps,
        final_loss: outcome.final_loss,
        eval_loss: outcome.eval_loss,
        unigram_baseline_loss: shared.baseline,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        samples_per_s: outcome.samples_per_s,
        checkpoint: outcome.checkpoint.or_else(|| list_checkpoints(out).pop().map(|(_, d)| d)),
        sample_png: outcome.sample_png,
        loss_png: out.join("loss.png"),
        peak_bytes_per_rank: outcome.peak_bytes,
        stopped: outcome.stopped.and_then(StopReason::label),
    })
}

/// loss.png / loss.svg from this session's points plus any earlier ones in metrics.jsonl.
fn write_loss_curve(out: &Path, baseline: f64) -> Result<()> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    crate::plot_loss(out, &train, &eval, baseline)
}
