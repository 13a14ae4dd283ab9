//! dalle-mini's optimizer state: `opt_state.msgpack` as `tools/train/train.py` writes it for
//! `--optim adam` — `flax.serialization.to_bytes` of one optax `adamw` chain state per
//! parameter group (`standard`, `scanned_encoder`, `scanned_decoder`):
//! `{group: {"0": {count, mu: params, nu: params}, "1": {}, "2": {count}}}`, `count` int32 of
//! shape `[]` or `[n_layers]` (scanned groups are vmapped over the layer axis). Read into our
//! AdamW moments (table order, fp32) and one step count.

use crate::dalle_mini::Slots;
use crate::error::{ModelError, Result};
use crate::flax;
use crate::params::ParamTable;
use std::collections::BTreeMap;
use std::path::Path;

/// AdamW state read from dalle-mini: first/second moments in table order and the update count.
#[derive(Debug, Clone)]
pub struct AdamState {
    pub mu: Vec<Vec<f32>>,
    pub nu: Vec<Vec<f32>>,
    /// Updates applied so far (every group and layer agree).
    pub count: u64,
}

fn ck(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// Reads `opt_state.msgpack` (streaming) for the parameters of `table`.
pub fn load_adam_state(path: &Path, table: &ParamTable) -> Result<AdamState> {
    let (mut mu, mut nu) = (Slots::new(table), Slots::new(table));
    let mut counts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    flax::visit_file(path, &mut |a| {
        let mut parts = a.path.splitn(4, '.');
        let (group, state, field, rest) = (parts.next(), parts.next(), parts.next(), parts.next());
        match (state, field, rest) {
            (Some("0" | "2"), Some("count"), None) => {
                counts.insert(a.path.clone(), a.to_i64());
                Ok(())
            }
            (Some("0"), Some(which @ ("mu" | "nu")), Some(name)) => {
                let slots = if which == "mu" { &mut mu } else { &mut nu };
                if !slots.knows(name) {
                    return Err(ck(path, format!("`{}`: {name} is not a parameter of this config", a.path)));
                }
                slots.accept(path, &flax::FlaxArray { path: name.to_string(), ..a })
            }
            _ => Err(ck(
                path,
                format!(
                    "unexpected entry `{}` (group `{}`): only the state of train.py's `--optim adam` \
                     ({{group: {{0: {{count, mu, nu}}, 1: {{}}, 2: {{count}}}}}}) can be read",
                    a.path,
                    group.unwrap_or("")
                ),
            )),
        }
    })?;
    let (mu, nu) = (mu.finish(path)?, nu.finish(path)?);
    let all: Vec<i64> = counts.values().flatten().copied().collect();
    let Some(&count) = all.first() else {
        return Err(ck(path, "holds no `count`: is this an adam optimizer state?"));
    };
    if all.iter().any(|&c| c != count) || count < 0 {
        return Err(ck(
            path,
            format!(
                "not implemented: step counts differ between groups or layers ({counts:?}); dalle-mesh keeps one count"
            ),
        ));
    }
    Ok(AdamState { mu, nu, count: count as u64 })
}
