//! The VQGAN's parameters under vqgan-jax's Flax names ('.'-joined), checked against the
//! architecture's parameter list: loaded from a model folder, initialised at random (for
//! benchmarks and tests) or saved as `config.json` + `weights.safetensors`.

use super::arch::{param_specs, ParamKind, ParamSpec};
use super::config::VqganConfig;
use crate::checkpoint::{read_tensors, write_safetensors, HostTensor};
use crate::error::{io_err, ModelError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The weights file a folder saved by [`VqganWeights::save`] holds.
pub const SAFETENSORS_FILE: &str = "weights.safetensors";
/// vqgan-jax's `save_pretrained` weights file.
pub const MSGPACK_FILE: &str = "flax_model.msgpack";
pub const CONFIG_FILE: &str = "config.json";

/// Every parameter of one VQGAN, by Flax name.
#[derive(Debug, Clone)]
pub struct VqganWeights {
    tensors: HashMap<String, Vec<f32>>,
}

fn ck(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Every array of a Flax msgpack file (through [`crate::flax`], the project's one msgpack
/// reader) under its '.'-joined path; a leading `params.` (a `{"params": …}` wrapper) is dropped.
fn read_msgpack(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    crate::flax::visit_file(path, &mut |a| {
        let name = a.path.strip_prefix("params.").unwrap_or(&a.path).to_string();
        let t = if a.dtype.is_float() {
            HostTensor::F32 { data: a.to_f32(), shape: a.shape }
        } else {
            HostTensor::Int { data: a.to_i64(), shape: a.shape }
        };
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}

impl VqganWeights {
    /// Checks named tensors against the config's parameter list: every parameter present with its
    /// exact shape and finite values, nothing unexpected. `path` names the source in errors.
    pub fn from_tensors(cfg: &VqganConfig, mut tensors: BTreeMap<String, HostTensor>, path: &Path) -> Result<Self> {
        let mut out = HashMap::new();
        for spec in param_specs(cfg) {
            let t = tensors.remove(&spec.name).ok_or_else(|| {
                ck(
                    path,
                    format!(
                        "parameter `{}` {:?} is missing; the weights do not match config.json",
                        spec.name, spec.shape
                    ),
                )
            })?;
            let HostTensor::F32 { shape, data } = t else {
                return Err(ck(path, format!("parameter `{}` holds integers; expected floats", spec.name)));
            };
            if shape != spec.shape {
                return Err(ck(
                    path,
                    format!("parameter `{}` has shape {shape:?}, config.json implies {:?}", spec.name, spec.shape),
                ));
            }
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(ck(path, format!("parameter `{}` has a non-finite value at flat index {i}", spec.name)));
            }
            out.insert(spec.name, data);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(ck(
                path,
                format!(
                    "unexpected tensor `{extra}` ({} unexpected in all); the weights do not match config.json",
                    tensors.len()
                ),
            ));
        }
        Ok(VqganWeights { tensors: out })
    }

    /// Loads `<dir>/config.json` and the weights: `flax_model.msgpack` (vqgan-jax's
    /// `save_pretrained`) when present, else `weights.safetensors` ('.'-joined Flax names).
    pub fn load_dir(dir: &Path) -> Result<(VqganConfig, Self)> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(ck(
                dir,
                format!("no {CONFIG_FILE}: give a vqgan-jax model folder (config.json + {MSGPACK_FILE})"),
            ));
        }
        let cfg = VqganConfig::from_file(&cfg_path)?;
        let msgpack = dir.join(MSGPACK_FILE);
        let safetensors = dir.join(SAFETENSORS_FILE);
        let (tensors, source) = if msgpack.is_file() {
            (read_msgpack(&msgpack)?, msgpack)
        } else if safetensors.is_file() {
            (read_tensors(&safetensors)?, safetensors)
        } else {
            return Err(ck(dir, format!("no weights: expected {MSGPACK_FILE} or {SAFETENSORS_FILE}")));
        };
        Ok((cfg.clone(), Self::from_tensors(&cfg, tensors, &source)?))
    }

    /// Random weights of the config's shapes (for benchmarks and tests): kernels
    /// N(0, 1/fan_in), biases 0, GroupNorm scales 1, codebook U(−1/n_embed, 1/n_embed) as
    /// taming-transformers initialises it.
    pub fn random(cfg: &VqganConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = param_specs(cfg)
            .into_iter()
            .map(|ParamSpec { name, shape, kind }| {
                let n: usize = shape.iter().product();
                let data = match kind {
                    ParamKind::Kernel { fan_in } => {
                        let std = (1.0 / fan_in as f32).sqrt();
                        (0..n).map(|_| std * rng.sample::<f32, _>(StandardNormal)).collect()
                    }
                    ParamKind::Bias => vec![0.0; n],
                    ParamKind::NormScale => vec![1.0; n],
                    ParamKind::Codebook => {
                        let r = 1.0 / cfg.n_embed as f32;
                        (0..n).map(|_| rng.random_range(-r..r)).collect()
                    }
                };
                (name, data)
            })
            .collect();
        VqganWeights { tensors }
    }

    /// Writes `<dir>/config.json` and `<dir>/weights.safetensors` (a folder [`Self::load_dir`] reads).
    pub fn save(&self, cfg: &VqganConfig, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
            param_specs(cfg).into_iter().map(|s| (s.name.clone(), s.shape, self.get(&s.name).to_vec())).collect();
        write_safetensors(&dir.join(SAFETENSORS_FILE), &tensors)?;
        let json = serde_json::to_vec_pretty(&cfg.to_json()).map_err(|e| ModelError::Config(e.to_string()))?;
        crate::checkpoint::write_atomic(&dir.join(CONFIG_FILE), &json)
    }

    /// The parameter `name`. Every name of the config's parameter list is present (checked at
    /// construction); the stages only ask for those.
    pub fn get(&self, name: &str) -> &[f32] {
        self.tensors.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Number of scalar parameters.
    pub fn len(&self) -> usize {
        self.tensors.values().map(Vec::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
