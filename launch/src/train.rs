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

use crate::run_checkpoint::{self, list_checkpoints, verify, write_checkpoint};
use crate::run_config::{parse_bytes, RunConfig};
use anyhow::{bail, Context, Result};
use dm_data::{Dataset, ReaderState, ShardedReader, TextTokenizer};
use dm_model::checkpoint::{layout_tensors, load_weights, params_from_tensors, read_tensors, write_safetensors};
use dm_model::dallebart::SamplingOptions;
use dm_model::{AdamW, AdamWConfig, Batch, DalleBart, DalleBartConfig};
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
}

/// The training data of a run.
pub struct RunData {
    pub train: Arc<Dataset>,
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
    let train = Arc::new(Dataset::open(&train_dir)?);
    let eval = eval_dir.map(|e| Dataset::open(e).map(Arc::new)).transpose()?;
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
        None => vec![train.caption(0)?.to_string()],
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
pub fn unigram_baseline(ds: &Dataset, classes: usize) -> Result<f64> {
    let mut counts = vec![0u64; classes];
    for i in 0..ds.len() {
        for c in ds.codes(i)?.iter() {
            counts[c as usize] += 1;
        }
    }
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

fn param_names(model: &DalleBart<CpuBackend>) -> Vec<String> {
    model.table.specs.iter().map(|s| s.name.clone()).collect()
}

/// Appends JSON lines to metrics.jsonl.
struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// Opens metrics.jsonl, dropping lines after `resume_step` (they belong to the interrupted run).
    fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
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
            crate::atomic_write(path, kept.as_bytes())?;
        } else if resume_step.is_none() {
            let _ = std::fs::remove_file(path);
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file })
    }
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// Everything a training run holds.
struct Trainer {
    cfg: RunConfig,
    out: PathBuf,
    be: CpuBackend,
    model: DalleBart<CpuBackend>,
    opt: AdamW<CpuBackend>,
    reader: ShardedReader,
    data: RunData,
    step: u64,
}

impl Trainer {
    fn save(&self) -> Result<PathBuf> {
        let values = self.model.param_values()?;
        let stacked = self.model.config.use_scan;
        let weights = layout_tensors(&self.model.table, &values, stacked);
        let mut moments = Vec::new();
        for ((spec, m), v) in self.model.table.specs.iter().zip(&self.opt.m).zip(&self.opt.v) {
            moments.push((format!("m.{}", spec.name), spec.shape.clone(), self.be.download(m)?));
            moments.push((format!("v.{}", spec.name), spec.shape.clone(), self.be.download(v)?));
        }
        let tmp = std::env::temp_dir().join(format!("dm-save-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        write_safetensors(&tmp.join("w"), &weights)?;
        write_safetensors(&tmp.join("o"), &moments)?;
        let state = TrainerState {
            step: self.step,
            reader: self.reader.state(),
            seed: self.cfg.training.seed,
            run_config: self.cfg.clone(),
        };
        let files = vec![
            ("weights.safetensors", std::fs::read(tmp.join("w"))?),
            ("optimizer.safetensors", std::fs::read(tmp.join("o"))?),
            ("config.json", serde_json::to_vec_pretty(&self.model.config.to_json())?),
            ("trainer_state.json", serde_json::to_vec_pretty(&state)?),
            ("tokenizer.json", std::fs::read(&self.data.tokenizer_path)?),
            ("data.json", serde_json::to_vec_pretty(&self.data.info)?),
        ];
        let _ = std::fs::remove_dir_all(&tmp);
        let dir = write_checkpoint(&self.out, self.step, &files, self.cfg.training.keep_checkpoints)?;
        tracing::info!(step = self.step, dir = %dir.display(), "checkpoint saved");
        Ok(dir)
    }

    fn eval_loss(&mut self) -> Result<Option<f32>> {
        let Some(eval) = self.data.eval.clone() else { return Ok(None) };
        let micro = self.cfg.training.batch_size / self.cfg.training.grad_accumulation;
        let micro = micro.min(eval.len());
        let batches = self.cfg.training.eval_batches.min(eval.len() / micro).max(1);
        let mut reader = ShardedReader::with_state(eval, self.data.tokenizer.clone(), ReaderState::new(0))?;
        let mut sum = 0.0f64;
        for _ in 0..batches {
            let b = to_model_batch(reader.next_batch(micro, 0, 1)?, &self.model.config)?;
            sum += self.model.eval_loss(&b)? as f64;
        }
        Ok(Some((sum / batches as f64) as f32))
    }

    fn sample(&mut self) -> Result<Option<PathBuf>> {
        let prompts = if self.cfg.training.sample_prompts.is_empty() {
            self.data.default_prompts.clone()
        } else {
            self.cfg.training.sample_prompts.clone()
        };
        if prompts.is_empty() {
            return Ok(None);
        }
        let path = self.out.join("samples").join(format!("step_{:08}.png", self.step));
        let opts = SamplingOptions {
            temperature: 1.0,
            top_k: Some(16),
            seed: self.cfg.training.seed ^ self.step,
            ..Default::default()
        };
        crate::sample::sample_to_png(
            &mut self.model,
            &self.data.tokenizer,
            &self.data.info,
            &prompts,
            1,
            &opts,
            &path,
        )?;
        tracing::info!(path = %path.display(), "samples written");
        Ok(Some(path))
    }
}

/// Runs (or resumes) training into `out`.
pub fn train(cfg: RunConfig, out: &Path, resume: Option<&Path>) -> Result<TrainSummary> {
    cfg.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if resume.is_none() && !list_checkpoints(out).is_empty() {
        bail!(
            "{} already holds checkpoints of another run: pass --resume {} to continue it, or choose another --out \
             (nothing was changed)",
            out.display(),
            out.display()
        );
    }
    if cfg.mesh.tp * cfg.mesh.dp > 1 {
        bail!(
            "mesh.tp = {} × mesh.dp = {}: training on a mesh is not implemented yet; use tp: 1, dp: 1",
            cfg.mesh.tp,
            cfg.mesh.dp
        );
    }
    let budget = cfg.mesh.device_memory.as_deref().map(parse_bytes).transpose()?;
    let be = CpuBackend::with_budget("cpu:0", budget);
    let data = prepare_data(&cfg, out)?;
    let model_cfg =
        cfg.model_config(data.tokenizer.vocab_size(), data.train.image_vocab() as usize, data.train.image_length())?;
    let adamw = AdamWConfig {
        b1: cfg.optimizer.b1,
        b2: cfg.optimizer.b2,
        eps: cfg.optimizer.eps,
        weight_decay: cfg.optimizer.weight_decay,
    };

    // Fresh start or exact resume.
    let (model, opt, reader_state, step) = match resume {
        None => {
            let model = DalleBart::init(be.clone(), model_cfg.clone(), cfg.training.seed)?;
            let opt = AdamW::new(&be, adamw, &param_names(&model), &model.params)?;
            (model, opt, ReaderState::new(cfg.training.seed), 0)
        }
        Some(path) => {
            let dir = run_checkpoint::latest(path)?;
            verify(&dir)?;
            let state: TrainerState = serde_json::from_slice(&std::fs::read(dir.join("trainer_state.json"))?)
                .with_context(|| format!("{}: trainer_state.json", dir.display()))?;
            let saved_cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
            if saved_cfg != model_cfg {
                bail!(
                    "checkpoint {} was saved from a different model config:\n  checkpoint: {saved_cfg:?}\n  this run:   {model_cfg:?}\n\
                     resume with the run config it was trained with (its run.yaml), or start a new run",
                    dir.display()
                );
            }
            let table = dm_model::ParamTable::new(&model_cfg);
            let weights = load_weights(&dir.join("weights.safetensors"), &table)?;
            let model = DalleBart::new(be.clone(), model_cfg.clone(), weights)?;
            let mut opt = AdamW::new(&be, adamw, &param_names(&model), &model.params)?;
            let opt_path = dir.join("optimizer.safetensors");
            let tensors = read_tensors(&opt_path)?;
            let m = params_from_tensors(&opt_path, &table, &tensors, "m.")?;
            let v = params_from_tensors(&opt_path, &table, &tensors, "v.")?;
            for (buf, vals) in opt.m.iter_mut().zip(&m).chain(opt.v.iter_mut().zip(&v)) {
                be.write(buf, 0, vals)?;
            }
            opt.step = state.step;
            tracing::info!(step = state.step, dir = %dir.display(), "resuming");
            (model, opt, state.reader, state.step)
        }
    };
    crate::atomic_write(&out.join("run.yaml"), serde_yaml::to_string(&cfg)?.as_bytes())?;
    let reader = ShardedReader::with_state(data.train.clone(), data.tokenizer.clone(), reader_state)?;
    let baseline = unigram_baseline(&data.train, model_cfg.image_rows())?;
    let mut metrics = Metrics::open(&out.join("metrics.jsonl"), resume.map(|_| step))?;
    let mut t = Trainer { cfg: cfg.clone(), out: out.to_path_buf(), be, model, opt, reader, data, step };

    let tr = &cfg.training;
    let micro = tr.batch_size / tr.grad_accumulation;
    let tokens_per_step = (tr.batch_size * model_cfg.image_length) as f32;
    let started = Instant::now();
    let progress = indicatif::ProgressBar::new(tr.steps);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_position(t.step);
    let (mut window_start, mut window_samples) = (Instant::now(), 0usize);
    let mut last_loss = f32::NAN;
    let mut last_eval = None;
    let mut first_eval = true;
    let mut last_saved = None;
    let mut sample_png = None;
    let mut train_curve: Vec<(f64, f64)> = Vec::new();
    let mut eval_curve: Vec<(f64, f64)> = Vec::new();
    let mut samples_per_s = 0.0;
    while t.step < tr.steps {
        let lr = cfg.optimizer.learning_rate_at(t.step);
        t.model.zero_grads()?;
        let mut loss_sum = 0.0f64;
        for _ in 0..tr.grad_accumulation {
            let b = to_model_batch(t.reader.next_batch(micro, 0, 1)?, &model_cfg)?;
            t.model.forward(&b)?;
            loss_sum += t.model.loss_and_backward(1.0 / tokens_per_step)?.loss as f64;
        }
        crate::test_hook("step", t.step + 1);
        let loss = (loss_sum / tr.grad_accumulation as f64) as f32;
        if !loss.is_finite() {
            bail!(
                "loss became {loss} at step {}: lower optimizer.learning_rate or set optimizer.max_grad_norm",
                t.step + 1
            );
        }
        let mut sq = 0.0f64;
        for g in &t.model.grads {
            sq += t.be.sum_squares(g)?;
        }
        let grad_norm = sq.sqrt() as f32;
        let clip = match cfg.optimizer.max_grad_norm {
            Some(max) if grad_norm > max => max / grad_norm,
            _ => 1.0,
        };
        let DalleBart { params, grads, .. } = &mut t.model;
        t.opt.update(&t.be, params, grads, lr, clip)?;
        t.step += 1;
        last_loss = loss;
        window_samples += tr.batch_size;
        progress.inc(1);
        progress.set_message(format!("loss {loss:.4}"));
        train_curve.push((t.step as f64, loss as f64));

        if t.step.is_multiple_of(tr.log_every) || t.step == tr.steps {
            let dt = window_start.elapsed().as_secs_f64();
            samples_per_s = window_samples as f64 / dt.max(1e-9);
            metrics.write(serde_json::json!({
                "step": t.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "samples_per_s": samples_per_s,
                "image_tokens_per_s": samples_per_s * model_cfg.image_length as f64,
                "peak_bytes": t.be.memory().report().peak_bytes,
            }))?;
            (window_start, window_samples) = (Instant::now(), 0);
        }
        let last = t.step == tr.steps;
        let out_of_time = tr.time_limit_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0);
        if (tr.eval_every > 0 && t.step.is_multiple_of(tr.eval_every)) || last || out_of_time {
            if let Some(e) = t.eval_loss()? {
                let mut line = serde_json::json!({"step": t.step, "eval_loss": e});
                if first_eval {
                    line["unigram_baseline_loss"] = baseline.into();
                    first_eval = false;
                }
                metrics.write(line)?;
                eval_curve.push((t.step as f64, e as f64));
                progress.println(format!("step {} eval loss {e:.4} (unigram baseline {baseline:.4})", t.step));
                last_eval = Some(e);
            }
        }
        if (tr.sample_every > 0 && t.step.is_multiple_of(tr.sample_every)) || last || out_of_time {
            sample_png = t.sample()?;
        }
        if (tr.save_every > 0 && t.step.is_multiple_of(tr.save_every)) || last || out_of_time {
            last_saved = Some(t.save()?);
        }
        if out_of_time {
            tracing::warn!(step = t.step, "training.time_limit_minutes reached: stopping after saving");
            break;
        }
    }
    progress.finish_and_clear();
    let loss_png = out.join("loss.png");
    write_loss_curve(out, &train_curve, &eval_curve, baseline)?;
    let summary = TrainSummary {
        out: out.to_path_buf(),
        steps: t.step,
        final_loss: last_loss,
        eval_loss: last_eval,
        unigram_baseline_loss: baseline,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        samples_per_s,
        checkpoint: last_saved.or_else(|| list_checkpoints(out).pop().map(|(_, d)| d)),
        sample_png,
        loss_png,
    };
    Ok(summary)
}

/// loss.png / loss.svg from this session's points plus any earlier ones in metrics.jsonl.
fn write_loss_curve(out: &Path, _train: &[(f64, f64)], _eval: &[(f64, f64)], baseline: f64) -> Result<()> {
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
