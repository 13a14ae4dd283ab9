//! `VqganConfig`: vqgan-jax's `VQGANConfig`, read from (and written as) its `config.json`.
//! Keys left out take vqgan-jax's defaults; the variants vqgan-jax can express but the released
//! models never use (`double_z`, `resamp_with_conv: false`, `give_pre_end`, dropout) are refused
//! with an error naming the key.

use crate::error::{io_err, ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// GroupNorm groups everywhere in the VQGAN (so every channel count is a multiple of this).
pub const GROUPS: usize = 32;
/// GroupNorm epsilon everywhere in the VQGAN.
pub const GROUP_NORM_EPS: f32 = 1e-6;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VqganConfig {
    pub ch: usize,
    pub out_ch: usize,
    pub in_channels: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub resolution: usize,
    pub z_channels: usize,
    pub embed_dim: usize,
    pub n_embed: usize,
    pub dropout: f32,
    pub double_z: bool,
    pub resamp_with_conv: bool,
    pub give_pre_end: bool,
}

impl Default for VqganConfig {
    /// vqgan-jax's `VQGANConfig()` defaults.
    fn default() -> Self {
        VqganConfig {
            ch: 128,
            out_ch: 3,
            in_channels: 3,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            resolution: 256,
            z_channels: 256,
            embed_dim: 256,
            n_embed: 1024,
            dropout: 0.0,
            double_z: false,
            resamp_with_conv: true,
            give_pre_end: false,
        }
    }
}

impl VqganConfig {
    /// The configuration of `dalle-mini/vqgan_imagenet_f16_16384`, the VQGAN dalle-mini uses.
    pub fn released_f16_16384() -> Self {
        VqganConfig { n_embed: 16384, ..Default::default() }
    }

    /// Reads and validates a vqgan-jax `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
        let cfg: VqganConfig = serde_json::from_str(&text).map_err(|e| {
            ModelError::Config(format!(
                "{}: not a vqgan-jax config.json ({e}); fix the file or re-save it",
                path.display()
            ))
        })?;
        cfg.validate().map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Writes the config as `config.json` (vqgan-jax reads every key back).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["num_resolutions"] = self.levels().into();
        v
    }

    /// Number of resolution levels (`len(ch_mult)`).
    pub fn levels(&self) -> usize {
        self.ch_mult.len()
    }

    /// Side of the latent grid: `resolution / 2^(levels − 1)`.
    pub fn latent_side(&self) -> usize {
        self.resolution >> self.levels().saturating_sub(1)
    }

    /// Codes per image (the DalleBart `image_length` this VQGAN fits).
    pub fn codes_per_image(&self) -> usize {
        self.latent_side() * self.latent_side()
    }

    /// Whether level `level` (resolution `resolution / 2^level`) has attention blocks.
    pub fn has_attention(&self, level: usize) -> bool {
        self.attn_resolutions.contains(&(self.resolution >> level))
    }

    /// Everything the implementation needs to be true; the message names the key to fix.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let refused = [
            (
                self.double_z,
                "double_z: true (a VAE-style encoder) is not implemented; only vqgan-jax's VQModel default false is",
            ),
            (
                !self.resamp_with_conv,
                "resamp_with_conv: false is not implemented; only convolutional resampling (true) is",
            ),
            (self.give_pre_end, "give_pre_end: true is not implemented"),
            (self.dropout != 0.0, "dropout must be 0.0 (this VQGAN runs inference only)"),
        ];
        if let Some((_, msg)) = refused.iter().find(|(bad, _)| *bad) {
            return Err((*msg).into());
        }
        let dims = [
            ("ch", self.ch),
            ("out_ch", self.out_ch),
            ("in_channels", self.in_channels),
            ("num_res_blocks", self.num_res_blocks),
            ("z_channels", self.z_channels),
            ("embed_dim", self.embed_dim),
            ("n_embed", self.n_embed),
        ];
        if let Some((k, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{k} must be positive"));
        }
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return Err(format!("ch_mult {:?} must be a non-empty list of positive multipliers", self.ch_mult));
        }
        if let Some(c) = self.ch_mult.iter().map(|m| m * self.ch).find(|c| c % GROUPS != 0) {
            return Err(format!(
                "{c} channels (ch × a ch_mult entry) is not a multiple of GroupNorm's {GROUPS} groups"
            ));
        }
        let down = 1usize << (self.levels() - 1);
        if self.resolution == 0 || !self.resolution.is_multiple_of(down) {
            return Err(format!(
                "resolution {} must be a positive multiple of 2^(len(ch_mult) − 1) = {down}",
                self.resolution
            ));
        }
        if self.n_embed > i32::MAX as usize {
            return Err(format!("n_embed {} is too large", self.n_embed));
        }
        Ok(())
    }
}
