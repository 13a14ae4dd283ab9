//! dalle-mini's own checkpoint folders: `config.json` + `flax_model.msgpack` (or a sharded
//! `flax_model.msgpack.index.json` + shards), as `DalleBart.save_pretrained` writes them, in
//! either layout (stacked `use_scan` or one tensor per layer), float32/float16/bfloat16 weights
//! cast to the fp32 master. Loading streams: each array goes straight into the parameter slots
//! it fills, so peak memory is the fp32 parameters plus one raw tensor.
//!
//! [`load_model_weights`] reads whichever format a folder holds (ours: `weights.safetensors`).

use crate::checkpoint::{layout_tensors, load_weights, stacked_name, write_atomic};
use crate::config::DalleBartConfig;
use crate::error::{ModelError, Result};
use crate::flax::{self, FlaxArray, FlaxArrayRef, FlaxDtype};
use crate::params::ParamTable;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The weights file of our own checkpoints.
pub const SAFETENSORS_FILE: &str = "weights.safetensors";

/// Which weights a model folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `weights.safetensors` (dalle-mesh).
    Safetensors,
    /// `flax_model.msgpack` or a sharded index (dalle-mini / transformers).
    Flax,
}

/// The format of the weights in `dir`, or an error naming what was looked for.
pub fn detect(dir: &Path) -> Result<WeightsFormat> {
    if dir.join(SAFETENSORS_FILE).is_file() {
        Ok(WeightsFormat::Safetensors)
    } else if dir.join(flax::WEIGHTS_FILE).is_file() || dir.join(flax::INDEX_FILE).is_file() {
        Ok(WeightsFormat::Flax)
    } else {
        Err(ck(
            dir,
            format!(
                "holds no model weights: expected {SAFETENSORS_FILE} (dalle-mesh) or {} / {} (dalle-mini)",
                flax::WEIGHTS_FILE,
                flax::INDEX_FILE
            ),
        ))
    }
}

/// The model weights (table order, fp32) of a folder in either format.
pub fn load_model_weights(dir: &Path, table: &ParamTable) -> Result<Vec<Vec<f32>>> {
    match detect(dir)? {
        WeightsFormat::Safetensors => load_weights(&dir.join(SAFETENSORS_FILE), table),
        WeightsFormat::Flax => load_flax_weights(dir, table),
    }
}

/// The config and weights of a dalle-mini folder (or of ours).
pub fn load_model(dir: &Path) -> Result<(DalleBartConfig, Vec<Vec<f32>>)> {
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    let weights = load_model_weights(dir, &ParamTable::new(&cfg))?;
    Ok((cfg, weights))
}

fn ck(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Where each checkpoint name goes: a table index, or (for stacked names) one index per layer.
pub(crate) struct Slots<'a> {
    table: &'a ParamTable,
    direct: HashMap<String, usize>,
    stacked: HashMap<String, Vec<usize>>,
    values: Vec<Option<Vec<f32>>>,
    /// Arrays seen per dtype, for the cast log.
    dtypes: BTreeMap<&'static str, usize>,
}

impl<'a> Slots<'a> {
    pub(crate) fn new(table: &'a ParamTable) -> Self {
        let mut direct = HashMap::new();
        let mut stacked: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, spec) in table.specs.iter().enumerate() {
            direct.insert(spec.name.clone(), i);
            if let Some((name, layer)) = stacked_name(&spec.name) {
                let v = stacked.entry(name).or_default();
                if v.len() <= layer {
                    v.resize(layer + 1, usize::MAX);
                }
                v[layer] = i;
            }
        }
        Self { table, direct, stacked, values: vec![None; table.specs.len()], dtypes: BTreeMap::new() }
    }

    /// Names `name` would fill; None if it is not a parameter of this config.
    pub(crate) fn knows(&self, name: &str) -> bool {
        self.direct.contains_key(name) || self.stacked.contains_key(name)
    }

    /// Places one array (converted to f32) into its slot(s), checking shape and finiteness.
    pub(crate) fn accept(&mut self, file: &Path, a: &FlaxArray) -> Result<()> {
        if !a.dtype.is_float() {
            return Err(ck(file, format!("`{}` is {}; parameters must be floating point", a.path, a.dtype.name())));
        }
        *self.dtypes.entry(a.dtype.name()).or_default() += 1;
        let values = a.to_f32();
        if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
            return Err(ck(
                file,
                format!("`{}` holds a non-finite value ({}) at flat index {pos}", a.path, values[pos]),
            ));
        }
        if let Some(&i) = self.direct.get(&a.path) {
            let spec = &self.table.specs[i];
            if a.shape != spec.shape {
                return Err(ck(
                    file,
                    format!("`{}` has shape {:?}, the config expects {:?}", a.path, a.shape, spec.shape),
                ));
            }
            return self.put(file, i, &a.path, values);
        }
        let Some(layers) = self.stacked.get(&a.path).cloned() else {
            return Err(ck(
                file,
                format!(
                    "unexpected array `{}`: the config has no such parameter (different architecture or config?)",
                    a.path
                ),
            ));
        };
        let spec_shape = &self.table.specs[layers[0]].shape;
        if a.shape.len() != spec_shape.len() + 1 || a.shape[1..] != spec_shape[..] || a.shape[0] != layers.len() {
            return Err(ck(
                file,
                format!(
                    "stacked `{}` has shape {:?}; the config expects [{} layers] + {:?}",
                    a.path,
                    a.shape,
                    layers.len(),
                    spec_shape
                ),
            ));
        }
        let n = values.len() / layers.len();
        for (layer, &i) in layers.iter().enumerate() {
            self.put(file, i, &a.path, values[layer * n..(layer + 1) * n].to_vec())?;
        }
        Ok(())
    }

    fn put(&mut self, file: &Path, i: usize, name: &str, v: Vec<f32>) -> Result<()> {
        if self.values[i].is_some() {
            return Err(ck(file, format!("`{name}` gives parameter {} a second time", self.table.specs[i].name)));
        }
        self.values[i] = Some(v);
        Ok(())
    }

    pub(crate) fn finish(self, file: &Path) -> Result<Vec<Vec<f32>>> {
        let missing: Vec<&str> = self
            .values
            .iter()
            .zip(&self.table.specs)
            .filter(|(v, _)| v.is_none())
            .map(|(_, s)| s.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(ck(
                file,
                format!(
                    "{} parameter(s) missing, e.g. {}; is this checkpoint from a different config?",
                    missing.len(),
                    missing.iter().take(5).copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for (dtype, count) in &self.dtypes {
            if *dtype != "float32" {
                tracing::info!(file = %file.display(), dtype, arrays = count, "weights cast to the fp32 master");
            }
        }
        Ok(self.values.into_iter().map(|v| v.unwrap_or_default()).collect())
    }
}

/// Reads a dalle-mini folder's (or one msgpack file's) weights into table order, streaming.
pub fn load_flax_weights(path: &Path, table: &ParamTable) -> Result<Vec<Vec<f32>>> {
    let named = weights_file_name(path);
    let mut slots = Slots::new(table);
    flax::visit_checkpoint(path, &mut |a| slots.accept(&named, &a))?;
    slots.finish(&named)
}

/// The file errors about a checkpoint's content name: the msgpack (or index) file itself.
fn weights_file_name(path: &Path) -> PathBuf {
    if !path.is_dir() {
        return path.to_path_buf();
    }
    let single = path.join(flax::WEIGHTS_FILE);
    if single.is_file() {
        single
    } else {
        path.join(flax::INDEX_FILE)
    }
}

/// The dtype weights are written in by [`save_dalle_mini`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    fn flax(self) -> FlaxDtype {
        match self {
            SaveDtype::F32 => FlaxDtype::F32,
            SaveDtype::BF16 => FlaxDtype::BF16,
            SaveDtype::F16 => FlaxDtype::F16,
        }
    }
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            SaveDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            SaveDtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        }
    }
}

/// Writes `config.json` + `flax_model.msgpack` into `dir` as `DalleBart.save_pretrained` does
/// (layout from `cfg.use_scan`). Each file is replaced atomically.
pub fn save_dalle_mini(dir: &Path, cfg: &DalleBartConfig, values: &[Vec<f32>], dtype: SaveDtype) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(crate::error::io_err(format!("creating {}", dir.display())))?;
    let table = ParamTable::new(cfg);
    let tensors = layout_tensors(&table, values, cfg.use_scan);
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| dtype.encode(v)).collect();
    let arrays: Vec<FlaxArrayRef<'_>> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| FlaxArrayRef { path: name, shape, dtype: dtype.flax(), data })
        .collect();
    flax::write_file(&dir.join(flax::WEIGHTS_FILE), &arrays)?;
    let text = serde_json::to_vec_pretty(&cfg.to_json()).map_err(|e| ck(dir, format!("config.json: {e}")))?;
    write_atomic(&dir.join("config.json"), &text)
}
