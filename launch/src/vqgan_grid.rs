//! Sample grids through a VQGAN: DalleBart's codes decoded to pixels, each prompt written under
//! its image (`sample --vqgan DIR` and the trainer's `training.vqgan: DIR`).

use crate::vqgan_image::{captioned_grid, to_rgb};
use anyhow::{bail, Context, Result};
use dm_model::vqgan::{Vqgan, VqganConfig};
use std::path::Path;

/// Refuses a VQGAN whose latent grid or codebook does not fit a model's image codes, before
/// any training time is spent.
pub fn check_fits(dir: &Path, image_length: usize, image_vocab: usize) -> Result<()> {
    let cfg = VqganConfig::from_file(&dir.join("config.json"))?;
    if cfg.codes_per_image() != image_length || cfg.n_embed < image_vocab {
        bail!(
            "the VQGAN at {} decodes {} codes per image from a codebook of {}, but the model makes {image_length} codes \
             from a vocabulary of {image_vocab}; use a VQGAN made for this dataset (training.vqgan / --vqgan)",
            dir.display(),
            cfg.codes_per_image(),
            cfg.n_embed
        );
    }
    Ok(())
}

/// Decodes `codes` (prompt-major, `per_prompt` per caption) through the VQGAN at `dir` and
/// writes the captioned grid to `path`.
pub fn write(dir: &Path, codes: &[Vec<u32>], captions: &[String], per_prompt: usize, path: &Path) -> Result<()> {
    let model = Vqgan::load(dir).with_context(|| format!("loading the VQGAN at {}", dir.display()))?;
    let mut images = Vec::with_capacity(codes.len());
    for c in codes {
        images.push(to_rgb(&model.decode_codes(c)?)?);
    }
    let labels: Vec<String> = captions.iter().flat_map(|c| std::iter::repeat_n(c.clone(), per_prompt)).collect();
    captioned_grid(&images, &labels, path)?;
    Ok(())
}
