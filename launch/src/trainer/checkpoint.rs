//! Checkpoints of a training run: every rank's shards gathered on world rank 0 (in memory for
//! thread ranks, through part files for process ranks), assembled into full tensors and written
//! atomically in the on-disk format of [`crate::run_checkpoint`]; loading one back for an exact
//! resume (checksums, model config, finite values), falling back to older checkpoints that load.

use super::step::Optimizer;
use super::{Groups, Shared};
use crate::divergence::GuardState;
use crate::run_checkpoint::{self, list_checkpoints, verify, write_checkpoint};
use crate::run_config::RunConfig;
use crate::train::{RunData, TrainerState};
use anyhow::{Context, Result};
use dm_data::ReaderState;
use dm_model::checkpoint::{layout_tensors, load_weights, params_from_tensors, read_tensors, serialize_safetensors};
use dm_model::{DalleBart, DalleBartConfig};
use dm_parallel::Mesh;
use dm_runtime::Backend;
use std::path::{Path, PathBuf};

/// A rank's host copy of its shards, handed to world rank 0 for a checkpoint.
pub(crate) struct RankState {
    dp_index: usize,
    tp_index: usize,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Full (unsharded) weights and optimizer state, as a checkpoint holds them.
pub struct FullState {
    pub params: Vec<Vec<f32>>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl FullState {
    /// The first tensor (its file and name) holding a NaN or an infinity.
    pub fn first_non_finite(&self, table: &dm_model::ParamTable) -> Option<String> {
        let parts = [
            ("weights.safetensors: tensor", &self.params),
            ("optimizer.safetensors: AdamW moment m of", &self.m),
            ("optimizer.safetensors: AdamW moment v of", &self.v),
        ];
        for (kind, tensors) in parts {
            for (spec, t) in table.specs.iter().zip(tensors.iter()) {
                if t.iter().any(|x| !x.is_finite()) {
                    return Some(format!("{kind} {}", spec.name));
                }
            }
        }
        None
    }
}

/// Assembles full tensors from every rank's shards (ZeRO-1 chunks concatenated across dp).
/// Errors when a rank's shard is missing (a rank that died, or a stray part file).
fn assemble(cfg: &DalleBartConfig, mesh: &Mesh, zero1: bool, states: &[RankState]) -> Result<FullState> {
    let tables: Vec<dm_model::ParamTable> =
        (0..mesh.tp()).map(|t| dm_model::ParamTable::sharded(cfg, t, mesh.tp())).collect();
    let mut shards: Vec<&RankState> = Vec::with_capacity(mesh.world());
    for dp in 0..mesh.dp() {
        for tp in 0..mesh.tp() {
            let s = states.iter().find(|s| s.dp_index == dp && s.tp_index == tp);
            shards.push(s.with_context(|| {
                format!("checkpoint: no shard from rank dp={dp} tp={tp} (the rank stopped before handing it over)")
            })?);
        }
    }
    let by = |dp: usize, tp: usize| shards[dp * mesh.tp() + tp];
    let params: Vec<Vec<Vec<f32>>> = (0..mesh.tp()).map(|t| by(0, t).params.clone()).collect();
    let moment = |pick: &dyn Fn(&RankState) -> &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        let locals: Vec<Vec<Vec<f32>>> = (0..mesh.tp())
            .map(|t| {
                if !zero1 {
                    return pick(by(0, t)).clone();
                }
                (0..tables[t].specs.len())
                    .map(|i| {
                        let n = tables[t].specs[i].numel();
                        let mut v: Vec<f32> = (0..mesh.dp()).flat_map(|d| pick(by(d, t))[i].clone()).collect();
                        v.truncate(n);
                        v
                    })
                    .collect()
            })
            .collect();
        dm_model::ParamTable::unshard_values(&tables, &locals)
    };
    Ok(FullState {
        params: dm_model::ParamTable::unshard_values(&tables, &params),
        m: moment(&|s| &s.m),
        v: moment(&|s| &s.v),
    })
}

/// What a checkpoint records besides the model, optimizer and data position.
pub struct SaveExtra {
    pub guard: GuardState,
    /// Lower is better: the eval loss of this step, else the running median training loss. The
    /// best checkpoint is kept outside the rotation.
    pub quality: Option<f32>,
}

/// Writes a checkpoint from full state (world rank 0 only); refuses non-finite state.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    out: &Path,
    cfg: &RunConfig,
    model_cfg: &DalleBartConfig,
    data: &RunData,
    step: u64,
    reader: ReaderState,
    full: &FullState,
    extra: SaveExtra,
) -> Result<PathBuf> {
    if let Some(what) = full.first_non_finite(&dm_model::ParamTable::new(model_cfg)) {
        return Err(anyhow::Error::new(crate::exit_code::Diverged(format!(
            "step {step}: {what} holds non-finite values: the run diverged and the checkpoint was not saved. \
             Lower optimizer.learning_rate and resume from the last checkpoint with --resume RUN --allow-config-change"
        ))));
    }
    let table = dm_model::ParamTable::new(model_cfg);
    let weights = layout_tensors(&table, &full.params, model_cfg.use_scan);
    let mut moments = Vec::new();
    for ((spec, m), v) in table.specs.iter().zip(&full.m).zip(&full.v) {
        moments.push((format!("m.{}", spec.name), spec.shape.clone(), m.clone()));
        moments.push((format!("v.{}", spec.name), spec.shape.clone(), v.clone()));
    }
    let state = TrainerState { step, reader, seed: cfg.training.seed, run_config: cfg.clone(), guard: extra.guard };
    let files = vec![
        ("weights.safetensors", serialize_safetensors(Path::new("weights.safetensors"), &weights)?),
        ("optimizer.safetensors", serialize_safetensors(Path::new("optimizer.safetensors"), &moments)?),
        ("config.json", serde_json::to_vec_pretty(&model_cfg.to_json())?),
        ("trainer_state.json", serde_json::to_vec_pretty(&state)?),
        ("tokenizer.json", std::fs::read(&data.tokenizer_path)?),
        ("data.json", serde_json::to_vec_pretty(&data.info)?),
    ];
    let dir = write_checkpoint(out, step, &files, cfg.training.keep_checkpoints, extra.quality)?;
    tracing::info!(step, dir = %dir.display(), "checkpoint saved");
    Ok(dir)
}

/// Why one checkpoint can't be resumed from.
enum LoadError {
    /// It was saved from another model config: no older checkpoint of the folder fits either.
    Mismatch(anyhow::Error),
    /// It doesn't verify or parse, or holds non-finite values: an older one may do.
    Unusable(anyhow::Error),
}

/// One checkpoint's full state: checksums, files, model config and finite values checked.
fn load_one(dir: &Path, model_cfg: &DalleBartConfig) -> Result<(TrainerState, FullState), LoadError> {
    use LoadError::Unusable;
    verify(dir).map_err(Unusable)?;
    let saved_cfg = DalleBartConfig::from_file(&dir.join("config.json")).map_err(|e| Unusable(e.into()))?;
    if &saved_cfg != model_cfg {
        return Err(LoadError::Mismatch(crate::bad_input!(
            "checkpoint {} was saved from a different model config:\n  checkpoint: {saved_cfg:?}\n  this run:   {model_cfg:?}\n\
             resume with the run config it was trained with (its run.yaml, via --config), or start a new run with \
             another --out",
            dir.display()
        )));
    }
    let state_path = dir.join("trainer_state.json");
    let state: TrainerState = std::fs::read(&state_path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .map_err(|e| Unusable(e.context(format!("{}: unreadable trainer state", state_path.display()))))?;
    let table = dm_model::ParamTable::new(model_cfg);
    let params = load_weights(&dir.join("weights.safetensors"), &table).map_err(|e| Unusable(e.into()))?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors = read_tensors(&opt_path).map_err(|e| Unusable(e.into()))?;
    let m = params_from_tensors(&opt_path, &table, &tensors, "m.").map_err(|e| Unusable(e.into()))?;
    let v = params_from_tensors(&opt_path, &table, &tensors, "v.").map_err(|e| Unusable(e.into()))?;
    let full = FullState { params, m, v };
    if let Some(what) = full.first_non_finite(&table) {
        return Err(Unusable(crate::bad_input!("{}: {what} holds non-finite values", dir.display())));
    }
    Ok((state, full))
}

/// Loads one checkpoint folder as a resume would (checksums, every file parsed, values finite),
/// with the model config it holds; returns its step.
pub fn inspect_checkpoint(dir: &Path) -> Result<u64> {
    verify(dir)?;
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    match load_one(dir, &cfg) {
        Ok((state, _)) => Ok(state.step),
        Err(LoadError::Mismatch(e) | LoadError::Unusable(e)) => Err(e),
    }
}

/// Loads the checkpoint to resume from: `path` itself if it is one checkpoint, else the newest
/// checkpoint of the run folder `path` that loads, each skipped one named with why (skipped
/// checkpoints are left in place). Refuses one from a different model config.
pub fn load_checkpoint(path: &Path, model_cfg: &DalleBartConfig) -> Result<(TrainerState, FullState, PathBuf)> {
    let explicit = run_checkpoint::is_checkpoint_dir(path);
    let candidates: Vec<PathBuf> = if explicit {
        vec![path.to_path_buf()]
    } else {
        list_checkpoints(path).into_iter().rev().map(|(_, d)| d).collect()
    };
    if candidates.is_empty() {
        return Err(crate::bad_input!(
            "{} holds no checkpoint (expected {}/checkpoints/step_*/): check the --resume path",
            path.display(),
            path.display()
        ));
    }
    let mut skipped = Vec::new();
    for dir in candidates {
        match load_one(&dir, model_cfg) {
            Ok((state, full)) => {
                tracing::info!(step = state.step, dir = %dir.display(), "resuming");
                return Ok((state, full, dir));
            }
            Err(LoadError::Mismatch(e)) => return Err(e),
            Err(LoadError::Unusable(e)) if explicit => return Err(e),
            Err(LoadError::Unusable(e)) => {
                tracing::warn!(dir = %dir.display(), "skipping a checkpoint that does not load (kept, not deleted): {e:#}");
                skipped.push(format!("{}: {e:#}", dir.display()));
            }
        }
    }
    Err(crate::bad_input!("no checkpoint of {} loads:\n  {}", path.display(), skipped.join("\n  ")))
}

/// Hands this rank's shards to world rank 0, which assembles the full state (others get None).
pub fn gather_state<B: Backend>(
    model: &DalleBart<B>,
    opt: &Optimizer<B>,
    sh: &Shared,
    be: &B,
    groups: &Groups<B>,
    dp_index: usize,
    tp_index: usize,
) -> Result<Option<FullState>> {
    let (m, v) = match opt {
        Optimizer::Full(a) => (
            a.m.iter().map(|b| be.download(b)).collect::<Result<Vec<_>, _>>()?,
            a.v.iter().map(|b| be.download(b)).collect::<Result<Vec<_>, _>>()?,
        ),
        Optimizer::Zero1(z) => (
            z.shards.iter().map(|s| be.download(&s.m)).collect::<Result<Vec<_>, _>>()?,
            z.shards.iter().map(|s| be.download(&s.v)).collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let state = RankState { dp_index, tp_index, params: model.param_values()?, m, v };
    if sh.processes {
        return gather_parts(state, opt, sh, groups);
    }
    collector(sh)?.push(state);
    // In-process ranks hand their host copies over directly; the barrier orders the hand-over.
    if let Some(w) = &groups.world {
        w.barrier()?;
    }
    if dp_index != 0 || tp_index != 0 {
        return Ok(None);
    }
    let states = std::mem::take(&mut *collector(sh)?);
    assemble(sh.model_cfg, &sh.mesh, matches!(opt, Optimizer::Zero1(_)), &states).map(Some)
}

/// The in-process hand-over of checkpoint shards; poisoned only when a rank thread panicked.
fn collector<'a>(sh: &'a Shared) -> Result<std::sync::MutexGuard<'a, Vec<RankState>>> {
    sh.collector.lock().map_err(|_| anyhow::anyhow!("checkpoint: a rank thread panicked while handing over its shard"))
}

/// [`gather_state`] for process ranks: every rank writes its part file, then (after a barrier)
/// world rank 0 reads and assembles them and removes the parts.
fn gather_parts<B: Backend>(
    state: RankState,
    opt: &Optimizer<B>,
    sh: &Shared,
    groups: &Groups<B>,
) -> Result<Option<FullState>> {
    use crate::process_ranks::{parts_dir, read_parts, write_part};
    let rank = sh.mesh.rank_of(state.dp_index, state.tp_index);
    let dir = parts_dir(sh.out);
    write_part(&dir, rank, &(state.dp_index, state.tp_index, [state.params, state.m, state.v]))?;
    groups.world.as_ref().context("process ranks have a world communicator")?.barrier()?;
    if rank != 0 {
        return Ok(None);
    }
    let states: Vec<RankState> = read_parts(&dir, sh.mesh.world())?
        .into_iter()
        .map(|(dp_index, tp_index, [params, m, v])| RankState { dp_index, tp_index, params, m, v })
        .collect();
    for (r, s) in states.iter().enumerate() {
        let tensors =
            dm_model::ParamTable::sharded(sh.model_cfg, s.tp_index.min(sh.mesh.tp() - 1), sh.mesh.tp()).specs.len();
        if (s.dp_index, s.tp_index) != sh.mesh.coords(r) || [&s.params, &s.m, &s.v].iter().any(|g| g.len() != tensors) {
            anyhow::bail!(
                "checkpoint part {} does not belong to rank {r} of this mesh (a stale or damaged part); \
                 the previous checkpoints are intact: resume with --resume {}",
                dir.join(format!("rank{r}.part")).display(),
                sh.out.display()
            );
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    assemble(sh.model_cfg, &sh.mesh, matches!(opt, Optimizer::Zero1(_)), &states).map(Some)
}
