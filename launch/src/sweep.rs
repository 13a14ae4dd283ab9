//! `dalle-mesh sweep`: trains a grid of points (mesh shape × ZeRO-1 × model size × batch per
//! device × precision × device) for real, each for a few timed steps after warm-up, and writes
//! what a scaling study reads:
//!
//! - `results.jsonl` — one JSON object per point, appended as each point ends (a sweep started
//!   again with the same `--out` skips the points already there, so an interrupted sweep continues
//!   where it stopped; a torn last line is dropped);
//! - `results.csv`, `results.md` — the same as a table;
//! - `throughput.{png,svg}` — samples/s against world size, with the ideal (linear) line;
//! - `efficiency.{png,svg}` — weak-scaling efficiency (fixed batch per device, tp = 1) and
//!   strong-scaling efficiency (fixed global batch), against world size;
//! - `memory.{png,svg}` — the largest rank's planned memory against tp, stacked by category
//!   (each curve is the running total: weights, + gradients, + optimizer state, + activations,
//!   + communication buffers);
//! - `comm_share.{png,svg}` — the share of step time spent in collectives against world size;
//! - `validation.{png,svg}` — predicted against measured step time, with the ±20 % band;
//! - `calibration.yaml` — the hardware profile the predictions used (measured at the start on a
//!   CPU, reused when the sweep resumes).
//!
//! A point the memory plan says won't fit `device_memory` (or a mesh the model can't take) is
//! recorded with its reason and not run. Each point also carries the performance model's
//! prediction, so the table is the model's validation.

use crate::bench::{bench_step, check_supported, Device, StepBench, StepOptions};
use crate::run_config::{parse_bytes, RunConfig};
pub use crate::sweep_report::write_outputs;
use anyhow::{bail, Context, Result};
use dm_model::perf_model::{predict, HardwareProfile, Prediction};
use dm_model::plan::{plan, Precision};
use dm_model::{DalleBartConfig, ParamTable};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the points run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Launcher {
    /// One after the other on this machine; ranks are threads.
    Local,
    /// One SLURM job per point (a job array).
    Slurm,
}

/// A model of the grid: a name, then overrides of the base model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPoint {
    pub name: String,
    /// micro, mini or mega instead of the base run config's model.
    pub preset: Option<String>,
    pub d_model: Option<usize>,
    /// Both stacks.
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub ffn_dim: Option<usize>,
    pub image_vocab: Option<usize>,
}

fn default_models() -> Vec<ModelPoint> {
    vec![ModelPoint { name: "base".into(), ..Default::default() }]
}

/// The grid: every combination is a point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Mesh shapes `TPxDP`, e.g. `1x1`, `2x1`, `1x2`, `2x2`.
    pub mesh: Vec<String>,
    #[serde(default = "default_zero1")]
    pub zero1: Vec<bool>,
    #[serde(default = "default_models")]
    pub model: Vec<ModelPoint>,
    #[serde(default = "default_batch")]
    pub batch_per_device: Vec<usize>,
    #[serde(default = "default_precision")]
    pub precision: Vec<Precision>,
    #[serde(default = "default_device")]
    pub device: Vec<Device>,
}

fn default_zero1() -> Vec<bool> {
    vec![false]
}
fn default_batch() -> Vec<usize> {
    vec![4]
}
fn default_precision() -> Vec<Precision> {
    vec![Precision::Fp32]
}
fn default_device() -> Vec<Device> {
    vec![Device::Cpu]
}
fn default_steps() -> usize {
    5
}
fn default_warmup() -> usize {
    1
}

/// A sweep YAML (`configs/sweep-cpu.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// A run config whose `model:` section is the base model and whose `mesh.device_memory` is
    /// the per-rank budget (relative paths are relative to the sweep file).
    pub base: Option<PathBuf>,
    /// Timed steps per point, after `warmup` untimed ones.
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Per-rank memory budget, overriding the base's `mesh.device_memory`.
    pub device_memory: Option<String>,
    /// Hardware profile for the predictions (a built-in name or a YAML file); default: calibrate
    /// this CPU at the start.
    pub profile: Option<String>,
    pub grid: Grid,
}

impl SweepConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: SweepConfig =
            serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: sweep config: {e}", path.display()))?;
        if let Some(b) = &c.base {
            if b.is_relative() {
                c.base = Some(path.parent().unwrap_or(Path::new(".")).join(b));
            }
        }
        c.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let g = &self.grid;
        if self.steps == 0 {
            bail!("steps must be at least 1");
        }
        for (empty, key) in [
            (g.mesh.is_empty(), "grid.mesh"),
            (g.zero1.is_empty(), "grid.zero1"),
            (g.model.is_empty(), "grid.model"),
            (g.batch_per_device.is_empty(), "grid.batch_per_device"),
            (g.precision.is_empty(), "grid.precision"),
            (g.device.is_empty(), "grid.device"),
        ] {
            if empty {
                bail!("{key} is empty: list at least one value");
            }
        }
        for m in &g.mesh {
            parse_mesh(m)?;
        }
        if g.batch_per_device.contains(&0) {
            bail!("grid.batch_per_device values must be at least 1");
        }
        let names: BTreeSet<&str> = g.model.iter().map(|m| m.name.as_str()).collect();
        if names.len() != g.model.len() {
            bail!("grid.model names must be unique");
        }
        for &p in &g.precision {
            for &d in &g.device {
                check_supported(p, d).with_context(|| format!("grid precision {p} on device {}", d.name()))?;
            }
        }
        Ok(())
    }
}

/// `"2x4"` → (tp 2, dp 4).
pub fn parse_mesh(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("grid.mesh `{s}`: expected TPxDP with positive numbers, e.g. 2x1 or 1x4");
    let (a, b) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let (tp, dp) = (a.trim().parse::<usize>().map_err(|_| bad())?, b.trim().parse::<usize>().map_err(|_| bad())?);
    if tp == 0 || dp == 0 {
        return Err(bad());
    }
    Ok((tp, dp))
}

/// One point of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub model: ModelPoint,
    pub tp: usize,
    pub dp: usize,
    pub zero1: bool,
    pub batch_per_device: usize,
    pub precision: Precision,
    pub device: Device,
}

impl Point {
    /// The key results.jsonl is resumed by.
    pub fn id(&self) -> String {
        format!(
            "model={} tp={} dp={} zero1={} batch={} precision={} device={}",
            self.model.name,
            self.tp,
            self.dp,
            self.zero1,
            self.batch_per_device,
            self.precision,
            self.device.name()
        )
    }
}

/// Every point of the grid, in grid order; ZeRO-1 on dp = 1 (the same run as off) is dropped.
pub fn points(g: &Grid) -> Result<Vec<Point>> {
    let mut out = Vec::new();
    for m in &g.model {
        for mesh in &g.mesh {
            let (tp, dp) = parse_mesh(mesh)?;
            for &zero1 in &g.zero1 {
                if zero1 && dp == 1 {
                    continue;
                }
                for &b in &g.batch_per_device {
                    for &precision in &g.precision {
                        for &device in &g.device {
                            out.push(Point { model: m.clone(), tp, dp, zero1, batch_per_device: b, precision, device });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The base run config's model with a point's overrides; vocabularies and lengths of the
/// built-in synthetic data for the `tiny` base.
pub fn model_config(base: &RunConfig, m: &ModelPoint) -> Result<DalleBartConfig> {
    let mut run = base.clone();
    if let Some(p) = &m.preset {
        run.model.preset = Some(p.clone());
        run.model.config = None;
    }
    let s = &mut run.model;
    s.d_model = m.d_model.or(s.d_model);
    s.encoder_layers = m.layers.or(s.encoder_layers);
    s.decoder_layers = m.layers.or(s.decoder_layers);
    s.attention_heads = m.heads.or(s.attention_heads);
    s.ffn_dim = m.ffn_dim.or(s.ffn_dim);
    let image_vocab = m.image_vocab.unwrap_or(dm_data::synthetic::IMAGE_VOCAB as usize);
    let mut cfg = run
        .model_config(dm_data::synthetic::SYNTHETIC_TEXT_VOCAB, image_vocab, run.data.synthetic.image_length)
        .with_context(|| format!("grid model `{}`", m.name))?;
    if let Some(v) = m.image_vocab {
        cfg.image_vocab_size = v;
    }
    Ok(cfg)
}

/// What a sweep prints at the end.
#[derive(Debug, Clone, Serialize)]
pub struct SweepSummary {
    pub out: PathBuf,
    pub points: usize,
    /// Points recorded by this invocation (measured or not).
    pub recorded: usize,
    /// Points measured (status ok), this invocation or before.
    pub measured: usize,
    /// Points found already recorded (a resumed sweep).
    pub resumed: usize,
    pub not_fitting: usize,
    pub invalid: usize,
    pub worst_prediction_error: Option<f64>,
    pub files: Vec<PathBuf>,
}

/// Reads results.jsonl, dropping (and rewriting without) lines that don't parse — a line torn by
/// an interruption.
fn load_results(path: &Path) -> Result<Vec<Value>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    let mut good = Vec::new();
    let mut torn = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v["id"].is_string() => good.push(v),
            _ => torn = true,
        }
    }
    if torn {
        tracing::warn!(path = %path.display(), "dropping a torn line of an interrupted sweep");
        let text: String = good.iter().map(|v| format!("{v}\n")).collect();
        crate::atomic_write(path, text.as_bytes())?;
    }
    Ok(good)
}

fn append(path: &Path, v: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{v}")?;
    f.sync_data()?;
    Ok(())
}

/// The hardware profile of the predictions: the resumed sweep's, the config's, or a fresh
/// calibration of this CPU.
pub(crate) fn sweep_profile(cfg: &SweepConfig, out: &Path) -> Result<HardwareProfile> {
    let saved = out.join("calibration.yaml");
    if saved.exists() {
        let text = std::fs::read_to_string(&saved)?;
        return crate::calibrate::parse_profile(&text, &saved.display().to_string());
    }
    let p = match &cfg.profile {
        Some(p) => crate::calibrate::builtin_profile(p)?,
        None => crate::calibrate::calibrate()?,
    };
    crate::atomic_write(&saved, serde_yaml::to_string(&p)?.as_bytes())?;
    Ok(p)
}

/// The record of a point before it runs: its inputs and plan, with `status` and `reason` when
/// the plan refuses it (then no options come back: the point is recorded, not run).
pub fn planned_record(
    point: &Point,
    cfg: &DalleBartConfig,
    budget: Option<u64>,
    profile: &HardwareProfile,
    (steps, warmup): (usize, usize),
) -> Result<(Value, Option<StepOptions>)> {
    let o = StepOptions {
        zero1: point.zero1,
        precision: point.precision,
        device: point.device,
        device_memory: budget,
        peak_flops_per_s: Some(profile.peak_flops_per_s),
        steps,
        warmup,
        ..StepOptions::new(point.tp, point.dp, point.batch_per_device)
    };
    let mut v = json!({
        "id": point.id(),
        "model": point.model.name,
        "d_model": cfg.d_model,
        "layers": cfg.encoder_layers,
        "ffn_dim": cfg.encoder_ffn_dim,
        "params": ParamTable::new(cfg).numel(),
        "device": point.device.name(),
        "steps": steps,
        "warmup": warmup,
    });
    crate::plan_cmd::add_mesh_fields(&mut v, &o.plan_options());
    let p = match plan(cfg, &o.plan_options()) {
        Ok(p) => p,
        Err(reason) => {
            v["status"] = "invalid".into();
            v["reason"] = reason.into();
            return Ok((v, None));
        }
    };
    v["planned_bytes"] = p.total_tracked.into();
    v["planned"] = json!({
        "weights": p.weights, "gradients": p.gradients, "optimizer_state": p.optimizer_state,
        "activations": p.activations, "communication_buffers": p.communication_buffers,
    });
    if let Some(b) = budget.filter(|&b| p.total_tracked > b) {
        v["status"] = "does_not_fit".into();
        v["reason"] = format!(
            "the memory plan needs {} per rank, over device_memory {}",
            crate::plan_cmd::human_bytes(p.total_tracked),
            crate::plan_cmd::human_bytes(b)
        )
        .into();
        return Ok((v, None));
    }
    Ok((v, Some(o)))
}

/// Adds what `bench step` measured and what the performance model predicts to a point's record.
pub fn add_measurement(
    v: &mut Value,
    cfg: &DalleBartConfig,
    o: &StepOptions,
    profile: &HardwareProfile,
    m: &StepBench,
) -> Result<()> {
    let pred: Prediction = predict(cfg, &o.plan_options(), profile).map_err(|e| anyhow::anyhow!("{e}"))?;
    v["status"] = "ok".into();
    v["samples_per_s"] = serde_json::to_value(m.samples_per_s_spread)?;
    v["image_tokens_per_s"] = serde_json::to_value(m.image_tokens_per_s)?;
    v["step_s"] = serde_json::to_value(m.step_s)?;
    v["gflops_per_s"] = m.gflops_per_s.into();
    v["peak_gflops_per_s"] = m.peak_gflops_per_s.into();
    v["mfu"] = m.mfu.into();
    v["comm_share"] = m.comm_share.into();
    v["comm_bytes_per_step"] = serde_json::to_value(&m.comm_bytes_per_step)?;
    v["compute_s_per_step"] = serde_json::to_value(m.compute_s_per_step)?;
    v["peak_bytes_per_rank"] = m.peak_bytes.into();
    v["loss_first"] = m.loss_first.into();
    v["loss_last"] = m.loss_last.into();
    v["ranks_as"] = m.device.clone().into();
    v["load_average"] = load_average().into();
    v["predicted_step_s"] = pred.predicted_step_s.into();
    v["predicted_samples_per_s"] = pred.predicted_samples_per_s.into();
    v["predicted_mfu"] = pred.predicted_mfu.into();
    v["predicted_comm_share"] = pred.predicted_comm_share.into();
    v["bottleneck"] = pred.bottleneck.into();
    v["prediction_error"] = ((pred.predicted_step_s - m.step_s.median) / m.step_s.median).into();
    Ok(())
}

/// The 1-minute load average of this host when a point ends (`/proc/loadavg`; NaN elsewhere):
/// how much else was running while it was measured.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The record of a point: its inputs, then `status` and the measurements or the reason.
fn record(
    point: &Point,
    cfg: &DalleBartConfig,
    budget: Option<u64>,
    profile: &HardwareProfile,
    steps: (usize, usize),
) -> Result<Value> {
    let (mut v, o) = planned_record(point, cfg, budget, profile, steps)?;
    if let Some(o) = o {
        let m = bench_step(&point.model.name, cfg, &o)?;
        add_measurement(&mut v, cfg, &o, profile, &m)?;
    }
    Ok(v)
}

/// A sweep's config, base run config, per-rank budget, points and their models.
pub struct Loaded {
    pub cfg: SweepConfig,
    pub budget: Option<u64>,
    pub points: Vec<Point>,
    pub models: Vec<(String, DalleBartConfig)>,
}

impl Loaded {
    pub fn from_file(config: &Path) -> Result<Self> {
        let cfg = SweepConfig::from_file(config)?;
        let base = match &cfg.base {
            Some(p) => RunConfig::from_file(p)?,
            None => RunConfig::default(),
        };
        let budget =
            cfg.device_memory.as_deref().or(base.mesh.device_memory.as_deref()).map(parse_bytes).transpose()?;
        let points = points(&cfg.grid)?;
        let models: Vec<(String, DalleBartConfig)> =
            cfg.grid.model.iter().map(|m| Ok((m.name.clone(), model_config(&base, m)?))).collect::<Result<_>>()?;
        Ok(Loaded { cfg, budget, points, models })
    }

    pub fn model(&self, p: &Point) -> Result<&DalleBartConfig> {
        Ok(&self.models.iter().find(|(n, _)| *n == p.model.name).context("grid model")?.1)
    }

    pub fn steps(&self) -> (usize, usize) {
        (self.cfg.steps, self.cfg.warmup)
    }
}

/// Runs (or continues) the sweep of `config` into `out`.
pub fn run(config: &Path, out: &Path, launcher: Launcher) -> Result<SweepSummary> {
    let l = Loaded::from_file(config)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let jsonl = out.join("results.jsonl");
    let mut results = load_results(&jsonl)?;
    let done: BTreeSet<String> = results.iter().filter_map(|v| v["id"].as_str().map(String::from)).collect();
    let pts = &l.points;
    let resumed = pts.iter().filter(|p| done.contains(&p.id())).count();
    if resumed > 0 {
        tracing::info!(resumed, total = pts.len(), "continuing an interrupted sweep");
    }
    let profile = sweep_profile(&l.cfg, out)?;
    let mut ran = 0;
    if launcher == Launcher::Slurm {
        let todo: Vec<usize> = (0..pts.len()).filter(|&i| !done.contains(&pts[i].id())).collect();
        ran = crate::sweep_slurm::run_points(config, out, &l, &profile, &todo, &mut |v| {
            append(&jsonl, &v)?;
            results.push(v);
            Ok(())
        })?;
    }
    for (i, p) in pts.iter().enumerate() {
        if launcher == Launcher::Slurm || done.contains(&p.id()) {
            continue;
        }
        tracing::info!(point = i + 1, of = pts.len(), id = %p.id(), "sweep point");
        let v =
            record(p, l.model(p)?, l.budget, &profile, l.steps()).with_context(|| format!("sweep point {}", p.id()))?;
        append(&jsonl, &v)?;
        results.push(v);
        ran += 1;
        crate::test_hook("sweep_point", ran as u64);
    }
    // Keep grid order and only this grid's points.
    let ordered: Vec<Value> =
        pts.iter().filter_map(|p| results.iter().find(|v| v["id"] == p.id().as_str()).cloned()).collect();
    let files = write_outputs(out, &ordered)?;
    let status = |s: &str| ordered.iter().filter(|v| v["status"] == s).count();
    let worst = ordered
        .iter()
        .filter_map(|v| v["prediction_error"].as_f64())
        .map(f64::abs)
        .fold(None, |a: Option<f64>, e| Some(a.map_or(e, |a| a.max(e))));
    Ok(SweepSummary {
        out: out.to_path_buf(),
        points: pts.len(),
        recorded: ran,
        measured: status("ok"),
        resumed,
        not_fitting: status("does_not_fit"),
        invalid: status("invalid"),
        worst_prediction_error: worst,
        files,
    })
}
