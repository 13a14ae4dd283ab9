//! safetensors weights under dalle-mini's parameter names, in both of its layouts:
//! one tensor per layer (`...layers.FlaxBartEncoderLayer_3.GLU_0.Dense_0.kernel`) or stacked
//! along a leading layer axis (`use_scan`: `...layers.FlaxBartEncoderLayers.GLU_0.Dense_0.kernel`).
//! Loading validates everything (missing tensors, shapes, dtypes, non-finite values, truncated
//! files) and names the offending tensor; saving is atomic (temporary file, fsync, rename).

use crate::error::{io_err, ModelError, Result};
use crate::params::{ParamTable, DECODER_LAYER_PREFIX, ENCODER_LAYER_PREFIX};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

const ENCODER_STACKED: &str = "model.encoder.layers.FlaxBartEncoderLayers";
const DECODER_STACKED: &str = "model.decoder.layers.FlaxBartDecoderLayers";

/// A tensor read from a file, as f32 (floats) or i64 (integers).
#[derive(Debug, Clone)]
pub enum HostTensor {
    F32 { shape: Vec<usize>, data: Vec<f32> },
    Int { shape: Vec<usize>, data: Vec<i64> },
}

impl HostTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32 { shape, .. } | HostTensor::Int { shape, .. } => shape,
        }
    }
}

fn ck(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

fn convert(path: &Path, name: &str, view: &TensorView<'_>) -> Result<HostTensor> {
    let bytes = view.data();
    let shape = view.shape().to_vec();
    let t = match view.dtype() {
        Dtype::F32 => HostTensor::F32 {
            shape,
            data: bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        },
        Dtype::BF16 => HostTensor::F32 {
            shape,
            data: bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        },
        Dtype::F16 => HostTensor::F32 {
            shape,
            data: bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        },
        Dtype::I32 => HostTensor::Int {
            shape,
            data: bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
        },
        Dtype::I64 => HostTensor::Int {
            shape,
            data: bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        },
        other => {
            return Err(ck(path, format!("tensor `{name}` has dtype {other:?}; expected F32, BF16, F16, I32 or I64")))
        }
    };
    Ok(t)
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        ck(
            path,
            format!("not a valid safetensors file ({e}); it may be truncated or corrupt — re-save or re-download it"),
        )
    })?;
    st.tensors().iter().map(|(name, view)| Ok((name.clone(), convert(path, name, view)?))).collect()
}

/// Where a per-layer parameter name lives in the stacked layout: (stacked name, layer index).
pub fn stacked_name(name: &str) -> Option<(String, usize)> {
    for (prefix, stacked) in [(ENCODER_LAYER_PREFIX, ENCODER_STACKED), (DECODER_LAYER_PREFIX, DECODER_STACKED)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let (idx, tail) = rest.split_once('.')?;
            return Some((format!("{stacked}.{tail}"), idx.parse().ok()?));
        }
    }
    None
}

/// Picks the model's parameters (names `prefix + table name`) out of `tensors`, accepting either
/// layout, checking shapes and finiteness. Returns values in table order.
pub fn params_from_tensors(
    path: &Path,
    table: &ParamTable,
    tensors: &BTreeMap<String, HostTensor>,
    prefix: &str,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(table.specs.len());
    let mut missing = Vec::new();
    let mut used = std::collections::HashSet::new();
    for spec in &table.specs {
        let direct = format!("{prefix}{}", spec.name);
        let found = if let Some(t) = tensors.get(&direct) {
            used.insert(direct.clone());
            Some((direct.clone(), t, None))
        } else if let Some((stacked, layer)) = stacked_name(&spec.name) {
            let full = format!("{prefix}{stacked}");
            tensors.get(&full).map(|t| {
                used.insert(full.clone());
                (full, t, Some(layer))
            })
        } else {
            None
        };
        let Some((name, t, layer)) = found else {
            missing.push(direct);
            continue;
        };
        let HostTensor::F32 { shape, data } = t else {
            return Err(ck(path, format!("tensor `{name}` is an integer tensor; parameters must be floating point")));
        };
        let values = match layer {
            None => {
                if *shape != spec.shape {
                    return Err(ck(
                        path,
                        format!("tensor `{name}` has shape {shape:?}, the config expects {:?}", spec.shape),
                    ));
                }
                data.clone()
            }
            Some(i) => {
                let n_layers = shape.first().copied().unwrap_or(0);
                if shape.len() != spec.shape.len() + 1 || shape[1..] != spec.shape[..] || i >= n_layers {
                    return Err(ck(
                        path,
                        format!(
                            "stacked tensor `{name}` has shape {shape:?}; the config expects [layers > {i}] + {:?}",
                            spec.shape
                        ),
                    ));
                }
                let n = spec.numel();
                data[i * n..(i + 1) * n].to_vec()
            }
        };
        if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
            return Err(ck(
                path,
                format!("tensor `{name}` holds a non-finite value ({}) at flat index {pos}", values[pos]),
            ));
        }
        out.push(values);
    }
    if !missing.is_empty() {
        let shown: Vec<_> = missing.iter().take(5).map(String::as_str).collect();
        return Err(ck(
            path,
            format!(
                "{} parameter tensor(s) missing, e.g. {}; is this checkpoint from a different config?",
                missing.len(),
                shown.join(", ")
            ),
        ));
    }
    // Stacked tensors must not hold more layers than the config.
    for name in &used {
        if let Some(t) = tensors.get(name) {
            if name.contains(ENCODER_STACKED) || name.contains(DECODER_STACKED) {
                let want = table
                    .specs
                    .iter()
                    .filter(|s| stacked_name(&s.name).is_some_and(|(st, _)| name.ends_with(&st)))
                    .count();
                if want > 0 && t.shape()[0] != want {
                    return Err(ck(
                        path,
                        format!("stacked tensor `{name}` has {} layers, the config has {want}", t.shape()[0]),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Loads the model's weights from a safetensors file (either layout). Extra tensors are an error.
pub fn load_weights(path: &Path, table: &ParamTable) -> Result<Vec<Vec<f32>>> {
    let tensors = read_tensors(path)?;
    let values = params_from_tensors(path, table, &tensors, "")?;
    let known: std::collections::HashSet<String> = table
        .specs
        .iter()
        .flat_map(|s| [Some(s.name.clone()), stacked_name(&s.name).map(|(n, _)| n)])
        .flatten()
        .collect();
    if let Some(extra) = tensors.keys().find(|k| !known.contains(*k)) {
        return Err(ck(
            path,
            format!(
                "unexpected tensor `{extra}`: the config has no such parameter (different architecture or config?)"
            ),
        ));
    }
    Ok(values)
}

/// The tensors to save for the model, as (name, shape, values), in the chosen layout.
pub fn layout_tensors(table: &ParamTable, values: &[Vec<f32>], stacked: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut stacks: HashMap<String, usize> = HashMap::new();
    for (spec, v) in table.specs.iter().zip(values) {
        match stacked_name(&spec.name).filter(|_| stacked) {
            None => out.push((spec.name.clone(), spec.shape.clone(), v.clone())),
            Some((name, _layer)) => {
                // Table order lists layer 0, 1, … for each stack, so appending stacks in order.
                let slot = *stacks.entry(name.clone()).or_insert_with(|| {
                    out.push((name.clone(), [vec![0], spec.shape.clone()].concat(), Vec::new()));
                    out.len() - 1
                });
                out[slot].1[0] += 1;
                out[slot].2.extend_from_slice(v);
            }
        }
    }
    out
}

/// Writes tensors (f32) as safetensors to `path` atomically: a temporary file in the same
/// folder is written, fsynced, then renamed over `path`.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    write_atomic(path, &serialize_safetensors(path, tensors)?)
}

/// The safetensors bytes of f32 tensors (`path` only names them in errors).
pub fn serialize_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| ck(path, format!("tensor `{name}`: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, None).map_err(|e| ck(path, format!("serialising: {e}")))
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.write_all(bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    f.sync_all().map_err(io_err(format!("syncing {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {} to {}", tmp.display(), path.display())))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Saves the model's weights in the layout the config asks for (`use_scan` → stacked).
pub fn save_weights(path: &Path, table: &ParamTable, values: &[Vec<f32>], stacked: bool) -> Result<()> {
    write_safetensors(path, &layout_tensors(table, values, stacked))
}
