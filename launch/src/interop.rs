//! dalle-mini's own files on the command line: `export` (a checkpoint → a folder that
//! `DalleBart.from_pretrained` and `DalleBartTokenizer.from_pretrained` load, or back to ours),
//! `tokenizer encode`, `data info`, and starting a run from a dalle-mini checkpoint
//! (`model: {from: DIR, optimizer_state: FILE}`).

use crate::run_checkpoint;
use crate::run_config::RunConfig;
use crate::train::{FullState, TrainerState};
use anyhow::{bail, Context, Result};
use dm_model::dalle_mini::{self, SaveDtype, WeightsFormat};
use dm_model::{DalleBartConfig, ParamTable};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A model folder: ours (a run folder, one of its checkpoints, or an exported folder) or a
/// dalle-mini one. Returns the folder that holds the weights and config.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").is_file() && dalle_mini::detect(path).is_ok() {
        if path.join(run_checkpoint::MANIFEST).is_file() {
            run_checkpoint::verify(path)?;
        }
        return Ok(path.to_path_buf());
    }
    let dir = run_checkpoint::newest_verified(path).with_context(|| {
        format!(
            "{} is neither a model folder (config.json + weights.safetensors or flax_model.msgpack) nor a run folder",
            path.display()
        )
    })?;
    Ok(dir)
}

/// The config and fp32 weights of any model folder (see [`model_dir`]).
pub fn load_model(path: &Path) -> Result<(PathBuf, DalleBartConfig, Vec<Vec<f32>>)> {
    let dir = model_dir(path)?;
    let (cfg, weights) = dalle_mini::load_model(&dir)?;
    Ok((dir, cfg, weights))
}

/// Output formats of `dalle-mesh export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// config.json + flax_model.msgpack + tokenizer files, as DalleBart.save_pretrained writes.
    DalleMini,
    /// config.json + weights.safetensors (+ tokenizer.json).
    DalleMesh,
}

/// Weight dtypes of a dalle-mini export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    Float32,
    Bfloat16,
    Float16,
}

/// Refuses to write into a folder that already holds files (nothing saved is overwritten).
fn fresh_out(out: &Path) -> Result<()> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?.next().is_some();
        if non_empty {
            bail!("{} already exists and is not empty: choose another --out (nothing was changed)", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

/// `dalle-mesh export`: writes `checkpoint`'s model (and tokenizer) to `out` in `format`.
pub fn export(checkpoint: &Path, format: ExportFormat, dtype: ExportDtype, out: &Path) -> Result<Value> {
    let (dir, cfg, weights) = load_model(checkpoint)?;
    fresh_out(out)?;
    let table = ParamTable::new(&cfg);
    let mut files = vec!["config.json".to_string()];
    match format {
        ExportFormat::DalleMini => {
            let dtype = match dtype {
                ExportDtype::Float32 => SaveDtype::F32,
                ExportDtype::Bfloat16 => SaveDtype::BF16,
                ExportDtype::Float16 => SaveDtype::F16,
            };
            dalle_mini::save_dalle_mini(out, &cfg, &weights, dtype)?;
            files.push(dm_model::flax::WEIGHTS_FILE.into());
            files.extend(export_tokenizer(&dir, out)?);
        }
        ExportFormat::DalleMesh => {
            if dtype != ExportDtype::Float32 {
                bail!("--dtype applies to --format dalle-mini only (dalle-mesh weights are float32)");
            }
            dm_model::checkpoint::save_weights(&out.join("weights.safetensors"), &table, &weights, cfg.use_scan)?;
            crate::atomic_write(&out.join("config.json"), &serde_json::to_vec_pretty(&cfg.to_json())?)?;
            files.push("weights.safetensors".into());
            if dir.join("tokenizer.json").is_file() {
                std::fs::copy(dir.join("tokenizer.json"), out.join("tokenizer.json"))?;
                files.push("tokenizer.json".into());
            }
        }
    }
    Ok(json!({"out": out, "from": dir, "format": format!("{format:?}"), "params": table.numel(), "files": files}))
}

/// Tokenizer files beside an export: a dalle-mini source's are copied as they are; our
/// tokenizer.json is written with string merges (readable by transformers' tokenizers 0.13),
/// plus the vocab.json / merges.txt / special_tokens_map.json / tokenizer_config.json that
/// `DalleBartTokenizer.save_pretrained` writes.
fn export_tokenizer(src: &Path, out: &Path) -> Result<Vec<String>> {
    let names = ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"];
    if dalle_mini::detect(src).ok() == Some(WeightsFormat::Flax) {
        let mut copied = Vec::new();
        for n in names {
            if src.join(n).is_file() {
                std::fs::copy(src.join(n), out.join(n))
                    .with_context(|| format!("copying {}", src.join(n).display()))?;
                copied.push(n.to_string());
            }
        }
        return Ok(copied);
    }
    let path = src.join("tokenizer.json");
    if !path.is_file() {
        tracing::warn!(dir = %src.display(), "no tokenizer.json beside the checkpoint: the export has no tokenizer");
        return Ok(Vec::new());
    }
    let mut tok: Value =
        serde_json::from_slice(&std::fs::read(&path)?).with_context(|| format!("parsing {}", path.display()))?;
    let model = tok.get_mut("model").and_then(Value::as_object_mut).context("tokenizer.json has no model")?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        bail!("{}: only BPE tokenizers can be exported for DalleBartTokenizer", path.display());
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Value::as_array)
        .context("tokenizer.json model has no merges")?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) => Ok(p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")),
            _ => bail!("{}: a merge is neither a string nor a pair", path.display()),
        })
        .collect::<Result<_>>()?;
    model.insert("merges".into(), json!(merges));
    let vocab = model.get("vocab").cloned().context("tokenizer.json model has no vocab")?;
    crate::atomic_write(&out.join("tokenizer.json"), &serde_json::to_vec(&tok)?)?;
    crate::atomic_write(&out.join("vocab.json"), &serde_json::to_vec(&vocab)?)?;
    let merges_txt: String = std::iter::once("#version: 0.2".to_string()).chain(merges).map(|l| l + "\n").collect();
    crate::atomic_write(&out.join("merges.txt"), merges_txt.as_bytes())?;
    let token = |t: &str, lstrip: bool| json!({"content": t, "lstrip": lstrip, "normalized": true, "rstrip": false, "single_word": false});
    let specials = json!({
        "bos_token": token("<s>", false), "cls_token": token("<s>", false), "eos_token": token("</s>", false),
        "mask_token": token("<mask>", true), "pad_token": token("<pad>", false), "sep_token": token("</s>", false),
        "unk_token": token("<unk>", false),
    });
    crate::atomic_write(&out.join("special_tokens_map.json"), &serde_json::to_vec_pretty(&specials)?)?;
    let config = json!({
        "tokenizer_class": "DalleBartTokenizer", "add_prefix_space": false, "errors": "replace",
        "model_max_length": 1024, "trim_offsets": true,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "cls_token": "<s>", "sep_token": "</s>",
    });
    crate::atomic_write(&out.join("tokenizer_config.json"), &serde_json::to_vec_pretty(&config)?)?;
    Ok(names.iter().map(|n| n.to_string()).collect())
}

/// `dalle-mesh tokenizer encode`: ids and masks of `captions` as dalle-mini's tokenizer gives
/// them with `padding="max_length", truncation=True, max_length`.
pub fn tokenizer_encode(tokenizer: &Path, max_length: usize, normalize: bool, captions: &[String]) -> Result<Value> {
    let tok = dm_data::hf_tokenizer::text_tokenizer(tokenizer, max_length, normalize)?;
    let (mut ids, mut masks) = (Vec::new(), Vec::new());
    for c in captions {
        let e = tok.encode(c)?;
        ids.push(e.input_ids);
        masks.push(e.attention_mask);
    }
    Ok(json!({"input_ids": ids, "attention_mask": masks}))
}

/// The starting state of a run with `model.from` (and `model.optimizer_state`): the folder's
/// weights, dalle-mini's AdamW moments and step count (zero moments and step 0 without one).
pub fn start_from(cfg: &RunConfig, model_cfg: &DalleBartConfig) -> Result<Option<(TrainerState, FullState)>> {
    let Some(from) = &cfg.model.from else { return Ok(None) };
    let dir = model_dir(from)?;
    let table = ParamTable::new(model_cfg);
    let params = dalle_mini::load_model_weights(&dir, &table)?;
    let (m, v, step) = match &cfg.model.optimizer_state {
        Some(file) => {
            let s = dm_model::opt_state::load_adam_state(file, &table)?;
            tracing::info!(file = %file.display(), step = s.count, "AdamW moments and step count from dalle-mini");
            (s.mu, s.nu, s.count)
        }
        None => {
            let zeros: Vec<Vec<f32>> = table.specs.iter().map(|s| vec![0.0; s.numel()]).collect();
            (zeros.clone(), zeros, 0)
        }
    };
    tracing::info!(from = %dir.display(), step, "starting from a checkpoint's weights");
    let state = TrainerState {
        step,
        reader: dm_data::ReaderState::new(cfg.training.seed),
        seed: cfg.training.seed,
        run_config: cfg.clone(),
        guard: Default::default(),
    };
    Ok(Some((state, FullState { params, m, v })))
}

/// Checks `model.from` / `model.optimizer_state` against the rest of the model section.
pub fn check_model_from(m: &crate::run_config::ModelSection) -> Result<()> {
    if m.optimizer_state.is_some() && m.from.is_none() {
        bail!("run config: model.optimizer_state needs model.from (the checkpoint those moments belong to)");
    }
    let Some(from) = &m.from else { return Ok(()) };
    if m.config.is_some() {
        bail!("run config: model.from brings its own config.json: remove model.config");
    }
    let overrides = [
        ("d_model", m.d_model.is_some()),
        ("encoder_layers", m.encoder_layers.is_some()),
        ("decoder_layers", m.decoder_layers.is_some()),
        ("attention_heads", m.attention_heads.is_some()),
        ("ffn_dim", m.ffn_dim.is_some()),
    ];
    if let Some((key, _)) = overrides.iter().find(|(_, set)| *set) {
        bail!("run config: model.{key} cannot change the architecture of model.from ({}): remove it", from.display());
    }
    if let Some(f) = &m.optimizer_state {
        if !f.is_file() {
            bail!("run config: model.optimizer_state {} does not exist", f.display());
        }
    }
    Ok(())
}

/// The model config of `model.from` (its config.json).
pub fn from_config(m: &crate::run_config::ModelSection) -> Result<DalleBartConfig> {
    let from = m.from.as_deref().context("model.from is not set")?;
    let dir = model_dir(from)?;
    Ok(DalleBartConfig::from_file(&dir.join("config.json"))?)
}

/// `data.eval_dataset` naming parquet files: evaluation reads imported folders only (training
/// streams parquet, see [`crate::train_data`]); the error says how to import them.
pub fn check_parquet_dataset(d: &crate::run_config::DataSection) -> Result<()> {
    if let Some(p) = d.eval_dataset.as_deref().filter(|p| dm_data::parquet::is_parquet_input(p)) {
        bail!(
            "run config: data.eval_dataset {} is parquet: not implemented: evaluating straight from parquet (training \
             from parquet is: data.dataset); import it first with `dalle-mesh data import {} --out DATASET` and set \
             data.eval_dataset: DATASET",
            p.display(),
            p.display()
        );
    }
    Ok(())
}
