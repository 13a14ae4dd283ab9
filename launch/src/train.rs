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

use crate::divergence::GuardState;
use crate::run_checkpoint::{self, list_checkpoints};
use crate::run_config::{parse_bytes, RunConfig};
use crate::stop::StopReason;
use crate::trainer::checkpoint::load_checkpoint;
pub use crate::trainer::checkpoint::{inspect_checkpoint, FullState};
use crate::trainer::Shared;
use anyhow::{Context, Result};
use dm_data::{Dataset, ReaderState, TextTokenizer};
use dm_parallel::Mesh;
use serde::{Deserialize, Serialize};
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
    let mesh = Mesh::new(cfg.mesh.tp, cfg.mesh.dp)?;
    crate::process_ranks::check_transport_early(&cfg, &world, mesh)?;
    let local_rank = world.is_multi_process().then_some(world.local_rank);
    let gpus_here = crate::trainer::ranks::gpus_needed_here(&mesh, local_rank);
    crate::device::check(cfg.device, cfg.precision, gpus_here, mesh.world())?;
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
    let start = (start_step, start_reader, start_guard);
    let baseline = unigram_baseline(&data.train, model_cfg.loss_classes())?;
    let full = restored.as_ref().map(|(_, f, _)| f);
    let shared = Shared::new(&cfg, &model_cfg, mesh, out, &data, budget, start, full, baseline, procs.is_some());
    let started = Instant::now();
    let outcome = crate::trainer::ranks::train_here(&shared, procs.as_deref())?;
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
