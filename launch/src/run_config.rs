//! The YAML run configuration of `dalle-mesh train`. Every section has defaults that make the
//! built-in run (a small model on the built-in synthetic dataset, CPU); unknown keys and
//! impossible values are errors that name the key.
//!
//! ```yaml
//! model:            # one of: preset (micro|mini|mega), config (a dalle-mini config.json), or fields
//!   preset: micro
//!   d_model: 128    # fields override the preset / file
//! data:
//!   synthetic: {train_rows: 20000, eval_rows: 1000, image_length: 256, seed: 0}
//!   # or: dataset: DIR, eval_dataset: DIR, tokenizer: tokenizer.json
//!   # dataset may be dalle-mini's encoded parquet (a file, a folder of *.parquet, a glob), read as is:
//!   parquet: {image_length: 256, image_vocab: 16384, caption_column: caption, encoding_column: encoding}
//!   normalize_text: true
//! optimizer: {learning_rate: 1e-3, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.0,
//!             schedule: constant, warmup_steps: 100, decay_steps: 1000, decay_rate: 0.5,
//!             end_learning_rate: 0.0, max_grad_norm: 1.0}
//! training: {steps: 1000, batch_size: 32, grad_accumulation: 1, seed: 0, log_every: 10,
//!            eval_every: 100, eval_batches: 4, save_every: 200, keep_checkpoints: 3,
//!            sample_every: 0, sample_prompts: [...], sample_prompts_file: null,
//!            time_limit_minutes: null, vqgan: null}
//! mesh: {tp: 1, dp: 1, zero1: false, device_memory: null, transport: auto}  # auto|threads|mpi|nccl
//! device: cpu       # cpu | cuda (one GPU per rank, NCCL between GPUs)
//! precision: fp32   # fp32 | bf16-mixed
//! ```

use crate::bad_input;
use anyhow::{bail, Context, Result};
use dm_model::DalleBartConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `cpu` or `cuda` (one GPU per rank, NCCL between them; see [`crate::device`]).
    pub device: crate::device::Device,
    /// `fp32` or `bf16-mixed` (the trainer's numeric policy, independent of the device).
    pub precision: dm_model::plan::Precision,
    pub model: ModelSection,
    pub data: DataSection,
    pub optimizer: OptimizerSection,
    pub training: TrainingSection,
    pub mesh: MeshSection,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            device: crate::device::Device::Cpu,
            precision: dm_model::plan::Precision::Fp32,
            model: Default::default(),
            data: Default::default(),
            optimizer: Default::default(),
            training: Default::default(),
            mesh: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `micro`, `mini`, `mega`, or `tiny` (the built-in default: a small model for CPU runs).
    pub preset: Option<String>,
    /// A dalle-mini `config.json`.
    pub config: Option<PathBuf>,
    /// Start from this checkpoint's weights (and its config): a dalle-mini folder
    /// (`flax_model.msgpack`) or one of ours — fine-tuning, as dalle-mini's `--model_name_or_path`.
    pub from: Option<PathBuf>,
    /// With `from`: dalle-mini's `opt_state.msgpack` (`--optim adam`), to continue its AdamW.
    pub optimizer_state: Option<PathBuf>,
    pub d_model: Option<usize>,
    pub encoder_layers: Option<usize>,
    pub decoder_layers: Option<usize>,
    pub attention_heads: Option<usize>,
    pub ffn_dim: Option<usize>,
    pub init_std: Option<f32>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: Some("tiny".into()),
            config: None,
            from: None,
            optimizer_state: None,
            d_model: None,
            encoder_layers: None,
            decoder_layers: None,
            attention_heads: None,
            ffn_dim: None,
            init_std: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSection {
    pub train_rows: usize,
    pub eval_rows: usize,
    pub image_length: usize,
    pub seed: u64,
}

impl Default for SyntheticSection {
    fn default() -> Self {
        Self { train_rows: 20_000, eval_rows: 1_000, image_length: 256, seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// The built-in synthetic dataset (used unless `dataset` is given).
    pub synthetic: SyntheticSection,
    /// An encoded dataset folder (`dalle-mesh data import`).
    pub dataset: Option<PathBuf>,
    pub eval_dataset: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (required with `dataset`).
    pub tokenizer: Option<PathBuf>,
    /// dalle-mini's caption normaliser.
    pub normalize_text: bool,
    /// Caption length in tokens (the model's max_text_length).
    pub max_text_length: usize,
    /// Check the datasets' checksums and every row before training (reads every byte).
    pub verify: bool,
    /// How to read a parquet `dataset` (dalle-mini's encoded files).
    pub parquet: ParquetSection,
}

/// The columns and code shape of parquet training files (dalle-mini's `text_column`,
/// `encoding_column`; its VQGAN's 256 codes of 16384).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetSection {
    pub image_length: usize,
    pub image_vocab: u32,
    pub caption_column: String,
    pub encoding_column: String,
}

impl Default for ParquetSection {
    fn default() -> Self {
        Self {
            image_length: 256,
            image_vocab: 16384,
            caption_column: "caption".into(),
            encoding_column: "encoding".into(),
        }
    }
}

impl ParquetSection {
    /// The reader's options (the same checks as `dalle-mesh data import`, bad rows are errors).
    pub fn options(&self) -> dm_data::ImportOptions {
        dm_data::ImportOptions {
            caption_field: self.caption_column.clone(),
            encoding_field: self.encoding_column.clone(),
            ..dm_data::ImportOptions::new(self.image_length, self.image_vocab)
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            synthetic: SyntheticSection::default(),
            dataset: None,
            eval_dataset: None,
            tokenizer: None,
            normalize_text: true,
            max_text_length: 16,
            verify: false,
            parquet: ParquetSection::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Exponential,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    pub learning_rate: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// After warm-up: constant, linear (to end_learning_rate over decay_steps) or exponential
    /// (× decay_rate every decay_steps, staircase off), as dalle-mini's `lr_decay` options.
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub decay_steps: u64,
    pub decay_rate: f32,
    pub end_learning_rate: f32,
    /// Clip the global gradient norm to this (None = no clipping).
    pub max_grad_norm: Option<f32>,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            learning_rate: 3e-3,
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            warmup_steps: 50,
            decay_steps: 1000,
            decay_rate: 0.5,
            end_learning_rate: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

impl OptimizerSection {
    /// Learning rate for update number `step` (0-based), as dalle-mini's schedules: linear
    /// warm-up from 0, then the chosen decay counted from the end of warm-up.
    pub fn learning_rate_at(&self, step: u64) -> f32 {
        let lr = self.learning_rate;
        if step < self.warmup_steps {
            return lr * step as f32 / self.warmup_steps as f32;
        }
        let t = (step - self.warmup_steps) as f32;
        match self.schedule {
            Schedule::Constant => lr,
            Schedule::Linear => {
                let frac = (t / self.decay_steps.max(1) as f32).min(1.0);
                lr + (self.end_learning_rate - lr) * frac
            }
            Schedule::Exponential => lr * self.decay_rate.powf(t / self.decay_steps.max(1) as f32),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    pub steps: u64,
    /// Global batch (all data-parallel ranks, all accumulation micro-steps).
    pub batch_size: usize,
    pub grad_accumulation: usize,
    pub seed: u64,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub save_every: u64,
    pub keep_checkpoints: usize,
    /// Sample `sample_prompts` every N steps (0 = only at the end).
    pub sample_every: u64,
    pub sample_prompts: Vec<String>,
    /// A file of prompts to sample, one per line (added to `sample_prompts`).
    pub sample_prompts_file: Option<PathBuf>,
    /// Stop (after saving) once this much wall time has passed.
    pub time_limit_minutes: Option<f64>,
    /// The divergence guard ([`crate::divergence`]).
    pub divergence: crate::divergence::DivergenceSection,
    /// A VQGAN folder (config.json + weights): sample grids decode through it, prompts under images.
    pub vqgan: Option<PathBuf>,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 32,
            grad_accumulation: 1,
            seed: 0,
            log_every: 10,
            eval_every: 100,
            eval_batches: 4,
            save_every: 200,
            keep_checkpoints: 3,
            sample_every: 0,
            sample_prompts: Vec::new(),
            sample_prompts_file: None,
            time_limit_minutes: None,
            divergence: Default::default(),
            vqgan: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshSection {
    pub tp: usize,
    pub dp: usize,
    pub zero1: bool,
    /// Per-rank memory budget, e.g. "24GiB" (None = unlimited).
    pub device_memory: Option<String>,
    /// How the ranks talk (see [`crate::process_ranks`]).
    pub transport: Transport,
}

/// `mesh.transport`: `auto` picks threads in one process, MPI between CPU processes, NCCL
/// between GPU processes; the others force one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Auto,
    Threads,
    Mpi,
    Nccl,
}

impl Default for MeshSection {
    fn default() -> Self {
        Self { tp: 1, dp: 1, zero1: false, device_memory: None, transport: Transport::Auto }
    }
}

/// Parses "24GiB", "512MiB", "80GB", "1.5GiB" or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().with_context(|| format!("`{s}` is not a size like 24GiB or 512MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => bail!("unknown size unit `{other}` in `{s}`: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"),
    };
    if !(n.is_finite() && n >= 0.0) {
        bail!("size `{s}` must be non-negative");
    }
    Ok((n * mult) as u64)
}

/// The built-in small model for CPU runs on the synthetic dataset.
pub fn tiny_model(text_vocab: usize, image_vocab: usize, image_length: usize, text_length: usize) -> DalleBartConfig {
    DalleBartConfig {
        d_model: 128,
        encoder_layers: 2,
        decoder_layers: 2,
        encoder_attention_heads: 4,
        decoder_attention_heads: 4,
        encoder_ffn_dim: 256,
        decoder_ffn_dim: 256,
        encoder_vocab_size: text_vocab,
        image_vocab_size: image_vocab,
        image_length,
        max_text_length: text_length,
        init_std: 0.02,
        use_scan: true,
    }
}

/// Settings a continued run may change without being "another run": its length and time limit,
/// the logging, evaluation, checkpoint and sampling cadence (and the sampling VQGAN), the divergence guard, and the mesh
/// (checkpoints move between mesh shapes).
pub const CONTINUABLE_KEYS: [&str; 13] = [
    "training.steps",
    "training.time_limit_minutes",
    "training.log_every",
    "training.eval_every",
    "training.eval_batches",
    "training.save_every",
    "training.keep_checkpoints",
    "training.sample_every",
    "training.sample_prompts",
    "training.sample_prompts_file",
    "training.divergence",
    "training.vqgan",
    "mesh",
];

/// `key.sub.leaf -> value` of a config.
fn flatten(cfg: &RunConfig) -> std::collections::BTreeMap<String, serde_yaml::Value> {
    fn walk(prefix: &str, v: &serde_yaml::Value, out: &mut std::collections::BTreeMap<String, serde_yaml::Value>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    let k = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
                    walk(&if prefix.is_empty() { k } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if let Ok(v) = serde_yaml::to_value(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// A float key's problem: not finite, or outside what makes sense ("≥ 0", "> 0", ...).
fn number_problem<T: Into<f64> + std::fmt::Display + Copy>(key: &str, v: T, ok: bool, want: &str) -> Option<String> {
    let shown = v;
    let v: f64 = v.into();
    if v.is_nan() {
        Some(format!("{key} is NaN; it must be a finite number {want}"))
    } else if v.is_infinite() {
        Some(format!("{key} is {shown}; it must be a finite number {want}"))
    } else if !ok {
        Some(format!("{key} is {shown}; it must be {want}"))
    } else {
        None
    }
}

/// Refuses a top-level `key` whose value is not one of `choices`, naming the key and the choices
/// (serde's message names neither at the top level).
fn check_choice(doc: &serde_yaml::Value, key: &str, choices: &[&str]) -> Result<()> {
    let Some(v) = doc.get(key) else { return Ok(()) };
    if v.as_str().is_some_and(|s| choices.contains(&s)) {
        return Ok(());
    }
    let shown = serde_yaml::to_string(v).unwrap_or_default();
    Err(bad_input!("run config: {key} is {:?}; it must be one of {}", shown.trim(), choices.join(", ")))
}

impl RunConfig {
    /// Parses and validates a YAML run config. An empty document (nothing but blanks or comments) is
    /// refused: the built-in run is what `train` does without `--config`.
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| bad_input!("run config: {e}"))?;
        if value.is_null() {
            return Err(bad_input!(
                "run config: the file is empty (no keys). Leave out --config to train the built-in run, or write \
                 the keys to change (see README, Run config)"
            ));
        }
        check_choice(&value, "device", &["cpu", "cuda"])?;
        check_choice(&value, "precision", &["fp32", "bf16-mixed"])?;
        let cfg: RunConfig = serde_yaml::from_value(value).map_err(|e| bad_input!("run config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad_input!("reading the run config {}: {e} (check the --config path)", path.display()))?;
        Self::from_yaml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Value checks serde cannot express; the error lists every problem, each naming its key.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(bad_input!("run config: {}", problems.join("; ")));
        }
        crate::interop::check_parquet_dataset(&self.data)?;
        Ok(())
    }

    fn problems(&self) -> Vec<String> {
        let t = &self.training;
        let o = &self.optimizer;
        let m = &self.mesh;
        let mut p: Vec<String> = [
            (t.batch_size == 0, "training.batch_size must be positive".to_string()),
            (t.grad_accumulation == 0, "training.grad_accumulation must be positive".into()),
            (
                t.grad_accumulation > 0 && !t.batch_size.is_multiple_of(t.grad_accumulation),
                format!(
                    "training.batch_size {} is not divisible by training.grad_accumulation {}",
                    t.batch_size, t.grad_accumulation
                ),
            ),
            (t.steps == 0, "training.steps must be positive".into()),
            (t.log_every == 0, "training.log_every must be positive".into()),
            (t.keep_checkpoints == 0, "training.keep_checkpoints must be at least 1".into()),
            (m.tp == 0 || m.dp == 0, "mesh.tp and mesh.dp must be at least 1".into()),
            (
                self.data.dataset.is_some() && self.data.tokenizer.is_none(),
                "data.tokenizer is required with data.dataset (a tokenizer.json)".into(),
            ),
            (self.data.max_text_length < 2, "data.max_text_length must be at least 2 (<s> and </s>)".into()),
            (
                self.model.preset.is_some() && self.model.config.is_some(),
                "give either model.preset or model.config, not both".into(),
            ),
        ]
        .into_iter()
        .filter_map(|(bad, msg)| bad.then_some(msg))
        .collect();
        let numbers = [
            number_problem("optimizer.learning_rate", o.learning_rate, o.learning_rate >= 0.0, "≥ 0"),
            number_problem("optimizer.end_learning_rate", o.end_learning_rate, o.end_learning_rate >= 0.0, "≥ 0"),
            number_problem("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0.0, "≥ 0"),
            number_problem("optimizer.b1", o.b1, (0.0..1.0).contains(&o.b1), "in [0, 1)"),
            number_problem("optimizer.b2", o.b2, (0.0..1.0).contains(&o.b2), "in [0, 1)"),
            number_problem("optimizer.eps", o.eps, o.eps > 0.0, "> 0"),
            number_problem(
                "optimizer.decay_rate",
                o.decay_rate,
                o.decay_rate > 0.0 && o.decay_rate <= 1.0,
                "in (0, 1] (a decay)",
            ),
            o.max_grad_norm
                .and_then(|g| number_problem("optimizer.max_grad_norm", g, g > 0.0, "> 0 (or null for no clipping)")),
            t.time_limit_minutes
                .and_then(|l| number_problem("training.time_limit_minutes", l, l > 0.0, "> 0 (or null for no limit)")),
            self.model.init_std.and_then(|s| {
                number_problem("model.init_std", s, s > 0.0 && s <= 1.0, "in (0, 1] (dalle-mini uses 0.02)")
            }),
        ];
        p.extend(numbers.into_iter().flatten());
        p.extend(t.divergence.problems());
        let per_rank = t.batch_size / t.grad_accumulation.max(1);
        if m.dp > 0 && !per_rank.is_multiple_of(m.dp) {
            p.push(format!(
                "the micro-batch training.batch_size / grad_accumulation = {per_rank} is not divisible by mesh.dp {}",
                m.dp
            ));
        }
        if let Some(f) = &t.sample_prompts_file {
            if !f.is_file() {
                p.push(format!("training.sample_prompts_file {} does not exist", f.display()));
            }
        }
        if let Some(v) = &t.vqgan {
            if !v.join("config.json").is_file() {
                p.push(format!("training.vqgan {} is not a VQGAN folder (no config.json)", v.display()));
            }
        }
        if let Some(mem) = &m.device_memory {
            if let Err(e) = parse_bytes(mem) {
                p.push(format!("mesh.device_memory: {e}"));
            }
        }
        if let Err(e) = crate::interop::check_model_from(&self.model) {
            p.push(format!("{e:#}").trim_start_matches("run config: ").to_string());
        }
        p
    }

    /// The keys (dotted) in which `other` describes a different run than `self`: everything but
    /// the settings a run may change when it is continued ([`CONTINUABLE_KEYS`]).
    pub fn identity_differences(&self, other: &RunConfig) -> Vec<String> {
        let (a, b) = (flatten(self), flatten(other));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| !CONTINUABLE_KEYS.iter().any(|c| k.as_str() == *c || k.starts_with(&format!("{c}."))))
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
    }

    /// The model config: preset or config.json, then explicit fields. `tiny` (the default)
    /// takes its vocabularies and lengths from the data.
    pub fn model_config(&self, text_vocab: usize, image_vocab: usize, image_length: usize) -> Result<DalleBartConfig> {
        let s = &self.model;
        let mut c = match (&s.preset, &s.config) {
            _ if s.from.is_some() => crate::interop::from_config(s)?,
            (_, Some(path)) => DalleBartConfig::from_file(path)?,
            (Some(p), None) if p == "tiny" => {
                tiny_model(text_vocab, image_vocab, image_length, self.data.max_text_length)
            }
            (Some(p), None) => DalleBartConfig::preset(p)?,
            (None, None) => tiny_model(text_vocab, image_vocab, image_length, self.data.max_text_length),
        };
        if let Some(v) = s.d_model {
            c.d_model = v;
        }
        if let Some(v) = s.encoder_layers {
            c.encoder_layers = v;
        }
        if let Some(v) = s.decoder_layers {
            c.decoder_layers = v;
        }
        if let Some(v) = s.attention_heads {
            c.encoder_attention_heads = v;
            c.decoder_attention_heads = v;
        }
        if let Some(v) = s.ffn_dim {
            c.encoder_ffn_dim = v;
            c.decoder_ffn_dim = v;
        }
        if let Some(v) = s.init_std {
            c.init_std = v;
        }
        c.validate().context("model section")?;
        if c.encoder_vocab_size < text_vocab {
            bail!(
                "model encoder_vocab_size {} is smaller than the tokenizer's vocabulary {text_vocab}",
                c.encoder_vocab_size
            );
        }
        if c.image_vocab_size < image_vocab || c.image_length != image_length {
            bail!(
                "the model (image_vocab_size {}, image_length {}) does not fit the dataset (image vocab {image_vocab}, image length {image_length})",
                c.image_vocab_size,
                c.image_length
            );
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = RunConfig::default();
        c.validate().unwrap();
        let back = RunConfig::from_yaml_str(&serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = RunConfig::from_yaml_str("training:\n  stepz: 3\n").unwrap_err().to_string();
        assert!(err.contains("stepz"), "{err}");
    }

    #[test]
    fn batch_not_divisible_by_accumulation_is_refused() {
        let err = RunConfig::from_yaml_str("training:\n  batch_size: 10\n  grad_accumulation: 3\n").unwrap_err();
        assert!(err.to_string().contains("grad_accumulation"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_an_error() {
        assert!(RunConfig::from_yaml_str("training: [1, 2\n").is_err());
    }

    #[test]
    fn schedules() {
        let mut o = OptimizerSection { learning_rate: 1.0, warmup_steps: 10, ..Default::default() };
        assert_eq!(o.learning_rate_at(0), 0.0);
        assert_eq!(o.learning_rate_at(5), 0.5);
        assert_eq!(o.learning_rate_at(50), 1.0);
        o.schedule = Schedule::Linear;
        o.decay_steps = 10;
        assert!((o.learning_rate_at(15) - 0.5).abs() < 1e-6);
        assert_eq!(o.learning_rate_at(100), 0.0);
        o.schedule = Schedule::Exponential;
        o.decay_rate = 0.5;
        assert!((o.learning_rate_at(20) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn nonsense_values_are_refused_naming_the_key() {
        let cases = [
            ("optimizer: {end_learning_rate: -0.1}", "optimizer.end_learning_rate"),
            ("optimizer: {weight_decay: -0.01}", "optimizer.weight_decay"),
            ("optimizer: {learning_rate: .nan}", "optimizer.learning_rate is NaN"),
            ("optimizer: {learning_rate: .inf}", "optimizer.learning_rate is inf"),
            ("optimizer: {decay_rate: 2.0}", "optimizer.decay_rate"),
            ("optimizer: {max_grad_norm: .inf}", "optimizer.max_grad_norm"),
            ("training: {time_limit_minutes: -1}", "training.time_limit_minutes"),
            ("training: {divergence: {loss_factor: 0.5}}", "training.divergence.loss_factor"),
            ("training: {divergence: {patience_steps: 0}}", "training.divergence.patience_steps"),
            ("model: {init_std: 1.0e6}", "model.init_std"),
            ("data: {max_text_length: 1}", "data.max_text_length"),
        ];
        for (yaml, key) in cases {
            let err = RunConfig::from_yaml_str(yaml).expect_err(yaml);
            assert!(err.to_string().contains(key), "{yaml}: {err}");
            assert_eq!(crate::exit_code::for_error(&err), crate::exit_code::BAD_INPUT, "{yaml}");
        }
    }

    #[test]
    fn device_and_precision_are_top_level_keys() {
        let c = RunConfig::from_yaml_str("device: cuda\nprecision: bf16-mixed\n").unwrap();
        assert_eq!((c.device, c.precision), (crate::device::Device::Cuda, dm_model::plan::Precision::Bf16Mixed));
        assert_eq!(RunConfig::default().device, crate::device::Device::Cpu);
        for (yaml, key, choices) in
            [("device: tpu\n", "device is", "cpu, cuda"), ("precision: fp16\n", "precision is", "fp32, bf16-mixed")]
        {
            let err = RunConfig::from_yaml_str(yaml).expect_err(yaml);
            let msg = format!("{err:#}");
            assert!(msg.contains(key) && msg.contains(choices), "{yaml}: {msg}");
            assert_eq!(crate::exit_code::for_error(&err), crate::exit_code::BAD_INPUT, "{yaml}");
        }
        // A changed device or precision is another run.
        let other = RunConfig { precision: dm_model::plan::Precision::Bf16Mixed, ..RunConfig::default() };
        assert_eq!(RunConfig::default().identity_differences(&other), ["precision"]);
    }

    #[test]
    fn an_empty_config_is_refused() {
        for text in ["", "\n", "# only a comment\n", "---\n"] {
            let err = RunConfig::from_yaml_str(text).expect_err(text).to_string();
            assert!(err.contains("empty") && err.contains("--config"), "{text:?}: {err}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
