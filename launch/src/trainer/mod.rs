//! [`Trainer`]: the training loop of one rank, generic over the backend `B` and its
//! communicators (`Arc<dyn Communicator<B>>` for the tp, dp and world groups). `dalle-mesh train`
//! (through [`crate::train`], the CLI glue), the tests and `bench step` ([`step::OptimizerStep`])
//! drive this code on CPU ranks (threads or MPI processes) and on CUDA ranks (NCCL).
//!
//! Split by concern:
//! - [`step`]: forward/backward, the dp gradient sync (all-reduce, or ZeRO-1 reduce-scatter), the
//!   global norm, clipping and AdamW;
//! - `overlap`: the dp gradient collectives issued during the backward, layer by layer;
//! - [`metrics`]: metrics.jsonl (the batch lines and the progress bar are [`crate::rank_log`]);
//! - [`eval`]: the eval loss and the probe loss before a checkpoint;
//! - [`checkpoint`]: gathering shards, writing and loading checkpoints (exact resume);
//! - [`stopping`]: the time limit, stop signals and the divergence guard agreed by every rank;
//! - [`ranks`]: one backend and its communicators per rank, for each device and launcher.
//!
//! It lives in the `dalle-mesh` library crate (not a crate of its own) because everything it uses
//! besides the model — the run config, the data readers, the checkpoint folder, the divergence
//! guard, the stop agreement, the rank log and the process ranks — is that crate's.

pub mod checkpoint;
pub mod eval;
pub mod metrics;
mod overlap;
pub mod ranks;
pub mod step;
pub mod stopping;

use crate::divergence::{DivergenceGuard, GuardState};
use crate::run_config::RunConfig;
use crate::stop::StopReason;
use crate::train::RunData;
use anyhow::Result;
use checkpoint::{FullState, RankState, SaveExtra};
use dm_data::ReaderState;
use dm_model::dallebart::{SamplingOptions, TpGroup};
use dm_model::{AdamWConfig, Batch, DalleBart, DalleBartConfig};
use dm_parallel::{Communicator, Mesh, ReduceOp};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use metrics::Metrics;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use step::{clip_factor, Moments, OptimizerStep};

/// The communicators of one rank (None where the group has one member, or on a single device).
pub struct Groups<B: Backend> {
    pub tp: Option<Arc<dyn Communicator<B>>>,
    pub dp: Option<Arc<dyn Communicator<B>>>,
    pub world: Option<Arc<dyn Communicator<B>>>,
}

impl<B: Backend> Clone for Groups<B> {
    fn clone(&self) -> Self {
        Self { tp: self.tp.clone(), dp: self.dp.clone(), world: self.world.clone() }
    }
}

impl<B: Backend> Groups<B> {
    /// A single device: no communicators.
    pub fn single() -> Self {
        Self { tp: None, dp: None, world: None }
    }
}

/// All-reduces one scalar over `comm` (identity without one).
pub fn reduce_scalar<B: Backend>(be: &B, comm: Option<&Arc<dyn Communicator<B>>>, x: f32, op: ReduceOp) -> Result<f32> {
    let Some(c) = comm else { return Ok(x) };
    let mut b = be.upload("scalar", &[x])?;
    c.all_reduce(&mut b, op)?;
    Ok(be.download(&b)?[0])
}

/// A data batch as the model takes it, checked against the model config.
pub fn to_model_batch(b: dm_data::Batch, cfg: &DalleBartConfig) -> Result<Batch> {
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

/// What every rank shares (read-only) during a run.
pub struct Shared<'a> {
    pub cfg: &'a RunConfig,
    pub model_cfg: &'a DalleBartConfig,
    pub mesh: Mesh,
    pub out: &'a Path,
    pub data: &'a RunData,
    pub budget: Option<u64>,
    pub start_step: u64,
    pub start_reader: ReaderState,
    pub start_guard: GuardState,
    pub restored: Option<&'a FullState>,
    pub(crate) collector: std::sync::Mutex<Vec<RankState>>,
    pub baseline: f64,
    /// Ranks are processes: checkpoint shards travel through part files, not `collector`.
    pub processes: bool,
}

impl<'a> Shared<'a> {
    /// The shared state of a run; `collector` starts empty.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &'a RunConfig,
        model_cfg: &'a DalleBartConfig,
        mesh: Mesh,
        out: &'a Path,
        data: &'a RunData,
        budget: Option<u64>,
        start: (u64, ReaderState, GuardState),
        restored: Option<&'a FullState>,
        baseline: f64,
        processes: bool,
    ) -> Self {
        let (start_step, start_reader, start_guard) = start;
        Self {
            cfg,
            model_cfg,
            mesh,
            out,
            data,
            budget,
            start_step,
            start_reader,
            start_guard,
            restored,
            collector: std::sync::Mutex::new(Vec::new()),
            baseline,
            processes,
        }
    }
}

/// What world rank 0 reports at the end.
#[derive(Default)]
pub struct RankOutcome {
    pub steps: u64,
    pub final_loss: f32,
    pub eval_loss: Option<f32>,
    pub samples_per_s: f64,
    pub checkpoint: Option<PathBuf>,
    pub sample_png: Option<PathBuf>,
    pub peak_bytes: u64,
    /// Set when the run stopped early after saving.
    pub stopped: Option<StopReason>,
    /// The divergence guard's message when it stopped the run (nothing was saved).
    pub diverged: Option<String>,
}

/// The AdamW hyper-parameters of a run config.
pub fn adamw_config(cfg: &RunConfig) -> AdamWConfig {
    let o = &cfg.optimizer;
    AdamWConfig { b1: o.b1, b2: o.b2, eps: o.eps, weight_decay: o.weight_decay }
}

/// The training loop of one rank (the only rank on a single device).
pub struct Trainer<'a, B: Backend> {
    sh: &'a Shared<'a>,
    rank: usize,
    /// (dp_index, tp_index) of this rank.
    coords: (usize, usize),
    core: OptimizerStep<B>,
    reader: crate::train_data::TrainReader,
    metrics: Option<Metrics>,
    /// The next eval line also records the unigram baseline.
    first_eval: bool,
    guard: DivergenceGuard,
    progress: crate::rank_log::Progress,
    started: Instant,
    window: (Instant, usize),
    outcome: RankOutcome,
}

/// One finished optimizer step, as logged.
struct Done {
    step: u64,
    loss: f32,
    lr: f32,
    grad_norm: f32,
    reason: StopReason,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// World rank `rank` of the run `sh` on backend `be` with communicators `groups`: the model
    /// (restored or freshly initialised weights, this rank's tp shards) in the run's precision,
    /// the optimizer, the data reader at the run's position, metrics (rank 0) and the guard.
    pub fn new(rank: usize, be: B, groups: Groups<B>, sh: &'a Shared<'a>) -> Result<Self> {
        let (cfg, model_cfg, mesh) = (sh.cfg, sh.model_cfg, sh.mesh);
        let (dp_index, tp_index) = mesh.coords(rank);
        let table = dm_model::ParamTable::sharded(model_cfg, tp_index, mesh.tp());
        let full_params = match sh.restored {
            Some(r) => r.params.clone(),
            None => dm_model::ParamTable::new(model_cfg).init_values(model_cfg.init_std, cfg.training.seed),
        };
        let local = table.shard_values(&full_params);
        drop(full_params);
        let group = groups.tp.clone().map(|comm| TpGroup { rank: tp_index, size: mesh.tp(), comm });
        let model = DalleBart::new_sharded(be.clone(), model_cfg.clone(), group, local)?
            .with_precision(cfg.precision)
            .map_err(|e| crate::bad_input!("precision {}: {e}", cfg.precision.name()))?;
        let restored = sh.restored.map(|r| Moments { m: &r.m, v: &r.v });
        let zero1 = cfg.mesh.zero1 && mesh.dp() > 1;
        let core = OptimizerStep::new(
            be,
            model,
            groups,
            adamw_config(cfg),
            zero1,
            (dp_index, mesh.dp()),
            restored,
            sh.start_step,
        )?;
        let reader = sh.data.train.reader(&sh.data.tokenizer, sh.start_reader)?;
        let leader = rank == 0;
        let (metrics, baseline_written) = if leader {
            let (m, has) = Metrics::open(&sh.out.join("metrics.jsonl"), sh.restored.map(|_| sh.start_step))?;
            (Some(m), has)
        } else {
            (None, false)
        };
        let tr = &cfg.training;
        Ok(Self {
            sh,
            rank,
            coords: (dp_index, tp_index),
            core,
            reader,
            metrics,
            first_eval: !baseline_written,
            guard: DivergenceGuard::new(tr.divergence.clone(), sh.start_guard.clone()),
            progress: crate::rank_log::Progress::new(leader, crate::rank_log::batch_mode(), tr.steps, sh.start_step),
            started: Instant::now(),
            window: (Instant::now(), 0),
            outcome: RankOutcome { steps: sh.start_step, final_loss: f32::NAN, ..Default::default() },
        })
    }

    /// Trains until `training.steps`, a stop (time limit, signal) or divergence.
    pub fn run(mut self) -> Result<RankOutcome> {
        let mut step = self.sh.start_step;
        while step < self.sh.cfg.training.steps {
            let Some(done) = self.train_step(step)? else { break };
            step = done.step;
            self.log(&done)?;
            if !self.after_step(&done)? {
                break;
            }
        }
        self.progress.finish();
        self.outcome.peak_bytes = self.core.be.memory().report().peak_bytes;
        Ok(self.outcome)
    }

    /// Optimizer step number `step + 1`; None when the run diverged (nothing applied).
    fn train_step(&mut self, step: u64) -> Result<Option<Done>> {
        let (sh, tr) = (self.sh, &self.sh.cfg.training);
        let (dp_index, dp) = (self.coords.0, sh.mesh.dp());
        let lr = sh.cfg.optimizer.learning_rate_at(step);
        let micro = tr.batch_size / tr.grad_accumulation;
        let tokens_per_step = (tr.batch_size * sh.model_cfg.image_length) as f32;
        let reader = &mut self.reader;
        let local = self.core.backward(tr.grad_accumulation, 1.0 / tokens_per_step, || {
            to_model_batch(reader.next_batch(micro, dp_index, dp)?, sh.model_cfg)
        })?;
        crate::test_hook("step", step + 1);
        crate::test_fail(self.rank, step + 1)?;
        let synced = self.core.sync(local)?;
        let (loss, grad_norm) = (synced.loss, synced.grad_norm);
        let moment = stopping::Moment { rank: self.rank, step: step + 1, loss, grad_norm, started: self.started };
        let world = self.core.groups.world.as_ref();
        let reason = match stopping::agree(&self.core.be, world, &mut self.guard, moment, tr.time_limit_minutes)? {
            stopping::Agreed::Go(reason) => reason,
            stopping::Agreed::Diverged(why) => {
                self.outcome.diverged = Some(why);
                return Ok(None);
            }
        };
        let clip = clip_factor(sh.cfg.optimizer.max_grad_norm, grad_norm);
        self.core.apply(synced, lr, clip)?;
        let step = step + 1;
        self.outcome.steps = step;
        self.outcome.final_loss = loss;
        self.window.1 += tr.batch_size;
        self.progress.step(loss);
        Ok(Some(Done { step, loss, lr, grad_norm, reason }))
    }

    /// Every `log_every` steps (and the last): the batch line and a metrics.jsonl line.
    fn log(&mut self, d: &Done) -> Result<()> {
        let tr = &self.sh.cfg.training;
        if !(d.step.is_multiple_of(tr.log_every) || d.step == tr.steps) {
            return Ok(());
        }
        let be = &self.core.be;
        let dt = self.window.0.elapsed().as_secs_f64();
        self.outcome.samples_per_s = self.window.1 as f64 / dt.max(1e-9);
        let world = self.core.groups.world.as_ref();
        let peak = reduce_scalar(be, world, be.memory().report().peak_bytes as f32, ReduceOp::Max)?;
        let line = crate::rank_log::StepLine {
            step: d.step,
            loss: d.loss,
            lr: d.lr,
            grad_norm: d.grad_norm,
            samples_per_s: self.outcome.samples_per_s,
            image_tokens_per_s: self.outcome.samples_per_s * self.sh.model_cfg.image_length as f64,
            peak_bytes: peak as u64,
        };
        self.progress.logged(&line);
        if let Some(m) = self.metrics.as_mut() {
            m.write(serde_json::json!({
                "step": d.step, "loss": d.loss, "lr": d.lr, "grad_norm": d.grad_norm,
                "samples_per_s": line.samples_per_s,
                "image_tokens_per_s": line.image_tokens_per_s,
                "peak_bytes": line.peak_bytes,
            }))?;
        }
        self.window = (Instant::now(), 0);
        Ok(())
    }

    /// Eval, checkpoint and samples when due; false when the run stops here.
    fn after_step(&mut self, d: &Done) -> Result<bool> {
        let (sh, tr) = (self.sh, &self.sh.cfg.training);
        let step = d.step;
        let last = step == tr.steps;
        let out_of_time = d.reason == StopReason::TimeLimit;
        let signalled = matches!(d.reason, StopReason::Signal(_));
        if signalled {
            tracing::warn!(step, reason = ?d.reason.label(), "stop signal: saving a checkpoint, then exiting");
            crate::test_hook("signal", 0);
        }
        let mut eval_now = None;
        if (tr.eval_every > 0 && step.is_multiple_of(tr.eval_every)) || last || out_of_time {
            eval_now = self.evaluate(step)?;
        }
        let save = (tr.save_every > 0 && step.is_multiple_of(tr.save_every)) || last || out_of_time || signalled;
        let sample = (tr.sample_every > 0 && step.is_multiple_of(tr.sample_every)) || last || out_of_time;
        let (dp_index, tp_index) = self.coords;
        if save {
            // The weights about to be saved must give a sound loss on the next batch.
            let dp_group = self.core.groups.dp.clone();
            let probe =
                eval::probe_loss(&mut self.core.model, sh, dp_group.as_ref(), &self.reader, dp_index, sh.mesh.dp())?;
            if let Some(why) = self.guard.check_probe(step, probe) {
                self.outcome.diverged = Some(why);
                return Ok(false);
            }
        }
        if save || sample {
            let core = &self.core;
            let full =
                checkpoint::gather_state(&core.model, &core.opt, sh, &core.be, &core.groups, dp_index, tp_index)?;
            if let Some(full) = full {
                if save {
                    let extra =
                        SaveExtra { guard: self.guard.state().clone(), quality: eval_now.or(self.guard.median()) };
                    let (cfg, mc, st) = (sh.cfg, sh.model_cfg, self.reader.state());
                    let dir = checkpoint::save_checkpoint(sh.out, cfg, mc, sh.data, step, st, &full, extra)?;
                    self.outcome.checkpoint = Some(dir);
                }
                if sample {
                    self.outcome.sample_png = sample_from(sh, step, &full.params)?;
                }
            }
            if let Some(w) = &self.core.groups.world {
                w.barrier()?;
            }
        }
        if out_of_time {
            tracing::warn!(step, "training.time_limit_minutes reached: stopping after saving");
        }
        if out_of_time || signalled {
            self.outcome.stopped = Some(d.reason);
            return Ok(false);
        }
        Ok(true)
    }

    /// The eval loss (None without an eval set), logged and written to metrics.jsonl.
    fn evaluate(&mut self, step: u64) -> Result<Option<f32>> {
        let sh = self.sh;
        let dp_group = self.core.groups.dp.clone();
        let Some(e) = eval::eval_loss(&mut self.core.model, sh, dp_group.as_ref(), self.coords.0, sh.mesh.dp())? else {
            return Ok(None);
        };
        if let Some(m) = self.metrics.as_mut() {
            let mut line = serde_json::json!({"step": step, "eval_loss": e});
            if self.first_eval {
                line["unigram_baseline_loss"] = sh.baseline.into();
                self.first_eval = false;
            }
            m.write(line)?;
        }
        self.progress.eval(step, e, sh.baseline);
        self.outcome.eval_loss = Some(e);
        Ok(Some(e))
    }
}

/// Samples the run's prompts from full weights on a single-device CPU model (world rank 0).
fn sample_from(sh: &Shared, step: u64, params: &[Vec<f32>]) -> Result<Option<PathBuf>> {
    let tr = &sh.cfg.training;
    let prompts =
        if tr.sample_prompts.is_empty() { sh.data.default_prompts.clone() } else { tr.sample_prompts.clone() };
    if prompts.is_empty() {
        return Ok(None);
    }
    let mut model = DalleBart::new(CpuBackend::new(), sh.model_cfg.clone(), params.to_vec())?;
    let path = sh.out.join("samples").join(format!("step_{step:08}.png"));
    let opts = SamplingOptions { temperature: 1.0, top_k: Some(16), seed: tr.seed ^ step, ..Default::default() };
    let vqgan = tr.vqgan.as_deref();
    crate::sample::sample_images(&mut model, &sh.data.tokenizer, &sh.data.info, &prompts, 1, &opts, &path, vqgan)?;
    tracing::info!(path = %path.display(), "samples written");
    Ok(Some(path))
}
