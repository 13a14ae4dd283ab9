//! `dalle-mesh sample`: generate image codes for prompts from a checkpoint and decode them.
//! Codes of the built-in synthetic dataset decode through its codebook to a PNG grid (one row
//! per prompt); codes of an imported (VQGAN-encoded) dataset decode through a VQGAN folder
//! (`--vqgan DIR`) into a grid with each prompt under its image, or are written as JSON without one.

use crate::train::DataInfo;
use anyhow::{bail, Context, Result};
use dm_data::TextTokenizer;
use dm_model::dallebart::{Prompt, SamplingOptions};
use dm_model::DalleBart;
use dm_runtime::Backend;
use std::path::{Path, PathBuf};

fn prompt(tok: &TextTokenizer, caption: &str) -> Result<Prompt> {
    let e = tok.encode(caption)?;
    Ok(Prompt { input_ids: e.input_ids, attention_mask: e.attention_mask })
}

/// Refuses sampling options that make no sense, naming the flag.
pub fn validate_options(opts: &SamplingOptions, n: usize) -> Result<()> {
    let mut p = Vec::new();
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        p.push(format!("--temperature {} must be a finite number ≥ 0 (0 = greedy)", opts.temperature));
    }
    if opts.top_k == Some(0) {
        p.push("--top-k 0 keeps no code: give at least 1 (or leave it out for no top-k)".to_string());
    }
    if let Some(tp) = opts.top_p.filter(|p| !(p.is_finite() && *p > 0.0 && *p <= 1.0)) {
        p.push(format!("--top-p {tp} must be in (0, 1]"));
    }
    if !(opts.cond_scale.is_finite() && opts.cond_scale >= 0.0) {
        p.push(format!("--cond-scale {} must be a finite number ≥ 0 (1 = no guidance)", opts.cond_scale));
    }
    if n == 0 {
        p.push("--n 0 asks for no samples: give at least 1".to_string());
    }
    if !p.is_empty() {
        return Err(crate::bad_input!("sample: {}", p.join("; ")));
    }
    Ok(())
}

/// Warns for each caption longer than the model's text length: it is cut to that many tokens.
pub fn warn_truncated(tok: &TextTokenizer, captions: &[String]) -> Result<usize> {
    let room = tok.max_text_length() - 2;
    let mut cut = 0;
    for (i, c) in captions.iter().enumerate() {
        let tokens = tok.token_ids(c)?.len();
        if tokens > room {
            cut += 1;
            tracing::warn!(
                "prompt {} has {tokens} tokens: truncated to its first {room} tokens (the model reads \
                 max_text_length {} including <s> and </s>)",
                i + 1,
                tok.max_text_length()
            );
        }
    }
    Ok(cut)
}

/// Generates `n` samples per prompt and writes them to `path` (PNG for synthetic codes, JSON
/// otherwise; through the VQGAN at `vqgan` when given, a PNG grid with each prompt under its
/// image). Returns the codes, prompt-major.
#[allow(clippy::too_many_arguments)]
pub fn sample_images<B: Backend>(
    model: &mut DalleBart<B>,
    tok: &TextTokenizer,
    info: &DataInfo,
    captions: &[String],
    n: usize,
    opts: &SamplingOptions,
    path: &Path,
    vqgan: Option<&Path>,
) -> Result<Vec<Vec<u32>>> {
    let mut prompts = Vec::new();
    for c in captions {
        for _ in 0..n {
            prompts.push(prompt(tok, c)?);
        }
    }
    let uncond = prompt(tok, "")?;
    let codes = model.generate(&prompts, Some(&uncond), opts)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(dir) = vqgan {
        crate::vqgan_grid::write(dir, &codes, captions, n, path)?;
    } else if info.kind == "synthetic" {
        let images = codes.iter().map(|c| dm_data::decode_codes(c, info.grid)).collect::<dm_data::Result<Vec<_>>>()?;
        dm_data::save_png_grid(&images, path)?;
    } else {
        let json = serde_json::json!({"prompts": captions, "per_prompt": n, "codes": codes});
        std::fs::write(path.with_extension("json"), serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(codes)
}

/// How a model folder's codes decode: its data.json (our checkpoints), or for a dalle-mini
/// folder VQGAN codes on a square grid, with config.json's `normalize_text`.
fn data_info_of(dir: &Path, cfg: &dm_model::DalleBartConfig) -> Result<DataInfo> {
    let path = dir.join("data.json");
    if path.is_file() {
        return serde_json::from_slice(&std::fs::read(&path)?).with_context(|| format!("{}", path.display()));
    }
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    Ok(DataInfo {
        kind: "encoded".into(),
        grid: (cfg.image_length as f64).sqrt().round() as usize,
        max_text_length: cfg.max_text_length,
        normalize_text: config["normalize_text"].as_bool().unwrap_or(false),
    })
}

/// Where `sample` computes (`--device`, `--precision`).
#[derive(Debug, Clone, Copy)]
pub struct On {
    pub device: crate::device::Device,
    pub precision: dm_model::plan::Precision,
}

impl Default for On {
    fn default() -> Self {
        On { device: crate::device::Device::Cpu, precision: dm_model::plan::Precision::Fp32 }
    }
}

/// How `sample` decodes and computes: through the VQGAN folder `vqgan` when given
/// (`--vqgan DIR`), `on` a device in a precision. The default: no VQGAN, the CPU, fp32.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup<'a> {
    pub vqgan: Option<&'a Path>,
    pub on: On,
}

/// Loads a checkpoint (a run folder, one `step_*` folder, or a dalle-mini folder) and samples
/// `n` images per caption from it into `out`, as `setup` says (CUDA: GPU `LOCAL_RANK`, else 0;
/// untested on GPUs). Refuses an unusable device or precision before loading anything.
pub fn run(
    checkpoint: &Path,
    captions: &[String],
    n: usize,
    opts: &SamplingOptions,
    out: &Path,
    setup: Setup<'_>,
) -> Result<PathBuf> {
    let Setup { vqgan, on } = setup;
    let gpu = crate::world::detect()?.local_rank;
    crate::device::check(on.device, on.precision, gpu + 1, 1)?;
    if captions.is_empty() {
        bail!(crate::exit_code::BadInput("give at least one --prompt".into()));
    }
    validate_options(opts, n)?;
    let (dir, cfg, weights) = crate::interop::load_model(checkpoint)?;
    if let Some(v) = vqgan {
        crate::vqgan_grid::check_fits(v, cfg.image_length, cfg.image_vocab_size)?;
    }
    let info = data_info_of(&dir, &cfg)?;
    let tok = dm_data::hf_tokenizer::text_tokenizer(&dir, cfg.max_text_length, info.normalize_text)?;
    warn_truncated(&tok, captions)?;
    match on.device {
        crate::device::Device::Cpu => {
            let model = DalleBart::new(dm_runtime::cpu::CpuBackend::new(), cfg, weights)?;
            let mut model = model.with_precision(on.precision)?;
            sample_images(&mut model, &tok, &info, captions, n, opts, out, vqgan)?;
        }
        crate::device::Device::Cuda => {
            let be = crate::device::cuda_backend(gpu, on.precision, None)?;
            let mut model = DalleBart::new(be, cfg, weights)?.with_precision(on.precision)?;
            sample_images(&mut model, &tok, &info, captions, n, opts, out, vqgan)?;
        }
    }
    Ok(if info.kind == "synthetic" || vqgan.is_some() { out.to_path_buf() } else { out.with_extension("json") })
}
