//! `dalle-mesh data encode-images`: (image file, caption) pairs → an encoded dataset, through a
//! VQGAN. The input is either
//! - a folder: every `*.png` / `*.jpg` / `*.jpeg` with a caption in the `.txt` file of the same
//!   stem next to it (img2dataset's layout), in file-name order; or
//! - a JSON Lines file: `{"image": path, "caption": str}` per line, paths relative to the file.
//!
//! Images are read in batches (decoded and resized in parallel), each encoded to
//! `codes_per_image` codes. Unreadable images and pairs without a caption are skipped, counted
//! and listed (the first few) in the report; only a run with no usable pair at all fails.

use crate::vqgan_image::load_image;
use anyhow::{bail, Context, Result};
use dm_model::vqgan::Vqgan;
use serde::Serialize;
use std::path::{Path, PathBuf};

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// Skipped items listed in the report (all are counted).
const SKIPPED_LISTED: usize = 20;

/// One (image, caption) pair; `caption` is `None` when it could not be found.
#[derive(Debug, Clone)]
struct Pair {
    image: PathBuf,
    caption: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub image: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EncodeImagesReport {
    pub out: PathBuf,
    pub rows_written: u64,
    pub skipped_unreadable: usize,
    pub skipped_no_caption: usize,
    /// The first skipped items, with the reason.
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
    pub images_per_s: f64,
}

fn folder_pairs(dir: &Path) -> Result<Vec<Pair>> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
        })
        .collect();
    images.sort();
    Ok(images
        .into_iter()
        .map(|image| {
            let caption = std::fs::read_to_string(image.with_extension("txt")).ok().map(|c| c.trim().to_string());
            Pair { image, caption: caption.filter(|c| !c.is_empty()) }
        })
        .collect())
}

fn jsonl_pairs(file: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!("{} line {}: not JSON; expected {{\"image\": path, \"caption\": str}}", file.display(), i + 1)
        })?;
        let Some(image) = v["image"].as_str() else {
            bail!(
                "{} line {}: no \"image\" path; expected {{\"image\": path, \"caption\": str}}",
                file.display(),
                i + 1
            );
        };
        let caption = v["caption"].as_str().map(str::trim).filter(|c| !c.is_empty()).map(String::from);
        pairs.push(Pair { image: base.join(image), caption });
    }
    Ok(pairs)
}

/// Encodes `input` (folder or JSONL) through the VQGAN at `vqgan_dir` into a dataset at `out`.
pub fn run(input: &Path, vqgan_dir: &Path, out: &Path, batch: usize) -> Result<EncodeImagesReport> {
    let model = Vqgan::load(vqgan_dir)?;
    let pairs = if input.is_dir() { folder_pairs(input)? } else { jsonl_pairs(input)? };
    if pairs.is_empty() {
        bail!(
            "{}: no images found (a folder of .png/.jpg with .txt captions, or a JSONL of {{\"image\", \"caption\"}})",
            input.display()
        );
    }
    let start = std::time::Instant::now();
    let mut writer = dm_data::DatasetWriter::create(out, model.config.codes_per_image(), model.config.n_embed as u32)?;
    writer.set_source(format!("encode-images {} through {}", input.display(), vqgan_dir.display()));
    let bar = indicatif::ProgressBar::new(pairs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding {bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut skipped, mut unreadable, mut no_caption) = (Vec::new(), 0, 0);
    let note = |image: &Path, reason: String, skipped: &mut Vec<Skipped>| {
        tracing::warn!(image = %image.display(), %reason, "skipped");
        if skipped.len() < SKIPPED_LISTED {
            skipped.push(Skipped { image: image.to_path_buf(), reason });
        }
    };
    for chunk in pairs.chunks(batch.max(1)) {
        let loaded = load_batch(chunk, model.config.resolution);
        for (pair, img) in chunk.iter().zip(loaded) {
            bar.inc(1);
            let Some(caption) = &pair.caption else {
                no_caption += 1;
                note(&pair.image, "no caption".into(), &mut skipped);
                continue;
            };
            match img {
                Ok(img) => writer.push(caption, &model.encode(&img)?.codes)?,
                Err(e) => {
                    unreadable += 1;
                    note(&pair.image, format!("{e:#}"), &mut skipped);
                }
            }
        }
    }
    bar.finish_and_clear();
    let rows = writer.rows();
    if rows == 0 {
        bail!(
            "{}: none of the {} images could be encoded ({unreadable} unreadable, {no_caption} without a caption); nothing written",
            input.display(),
            pairs.len()
        );
    }
    writer.finish()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(EncodeImagesReport {
        out: out.to_path_buf(),
        rows_written: rows,
        skipped_unreadable: unreadable,
        skipped_no_caption: no_caption,
        skipped,
        seconds,
        images_per_s: rows as f64 / seconds.max(1e-9),
    })
}

/// Reads and prepares a batch of images on all cores (pairs without a caption are not read).
fn load_batch(chunk: &[Pair], resolution: usize) -> Vec<Result<dm_model::vqgan::Activation>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = chunk
            .iter()
            .map(|p| {
                s.spawn(
                    move || if p.caption.is_some() { load_image(&p.image, resolution) } else { bail!("no caption") },
                )
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("image decoder panicked"))).collect()
    })
}
