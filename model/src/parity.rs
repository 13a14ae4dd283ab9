//! Parity against a reference fixture made by dalle-mini (JAX): how far forward, backward and
//! one AdamW step of dalle-mesh are from it, on one device or on a tp × dp mesh of CPU ranks
//! (threads of one process, or one process per rank: the caller hands each rank its
//! communicators and every rank runs [`rank_report`]).
//!
//! A fixture folder holds `config.json`, `weights.safetensors`, `batch.safetensors`
//! (`input_ids`, `attention_mask`, `labels`, `decoder_input_ids`), `expected.safetensors`
//! (`logits`, `loss`, `grad.<param>`, `adamw1.<param>`) and `fixture.json` (the optimizer's
//! hyper-parameters under `optimizer`).
//!
//! The weights may also be a dalle-mini folder's `flax_model.msgpack` (or sharded index); then
//! `expected.safetensors` may hold only `logits` and `loss` (dalle-mini's interop fixtures):
//! whatever it holds is checked, and the report's `checked` lists what was.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dm_parallel::{Communicator, Mesh, ReduceOp};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use serde::Serialize;

use crate::checkpoint::{params_from_tensors, read_tensors, HostTensor};
use crate::error::{ModelError, Result};
use crate::params::{ParamTable, Shard};
use crate::{AdamW, AdamWConfig, Batch, DalleBart, DalleBartConfig};

/// Pass thresholds, above the fp32-vs-fp64 gaps measured on the reference fixtures (loss ≤ 5e-7
/// and logits ≤ 2e-7 absolute, gradients ≤ 8e-7 relative to each tensor's max: tests/fixtures/README.md).
pub const LOSS_TOL: f64 = 1e-5;
pub const LOGITS_TOL: f64 = 1e-5;
pub const GRAD_REL_TOL: f64 = 1e-4;
pub const ADAMW_FROM_REF_TOL: f64 = 1e-6;
pub const ADAMW_TOL: f64 = 1e-4;

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub fixture: String,
    pub loss: f64,
    pub loss_abs_err: f64,
    pub logits_max_abs_err: f64,
    /// Worst over tensors of max|g − g_ref| / max|g_ref|.
    pub grad_max_rel_err: f64,
    pub grad_worst_param: String,
    pub adamw_from_ref_grads_max_abs_err: f64,
    pub adamw_max_abs_err: f64,
    /// The quantities compared (`logits`, `loss`, `grads`, `adamw`): what the fixture holds.
    pub checked: Vec<String>,
    pub pass: bool,
}

/// The fixture's optimizer hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct FixtureOptimizer {
    pub lr: f32,
    pub adamw: AdamWConfig,
}

fn bad(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

pub fn read_fixture_optimizer(dir: &Path) -> Result<FixtureOptimizer> {
    let path = dir.join("fixture.json");
    let text = std::fs::read_to_string(&path).map_err(crate::error::io_err(format!("reading {}", path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&path, format!("not JSON: {e}")))?;
    let o = &v["optimizer"];
    let get = |k: &str| -> Result<f32> {
        o[k].as_f64().map(|x| x as f32).ok_or_else(|| bad(&path, format!("optimizer.{k} missing or not a number")))
    };
    Ok(FixtureOptimizer {
        lr: get("learning_rate")?,
        adamw: AdamWConfig { b1: get("b1")?, b2: get("b2")?, eps: get("eps")?, weight_decay: get("weight_decay")? },
    })
}

fn int_tensor(t: &BTreeMap<String, HostTensor>, name: &str, path: &Path) -> Result<(Vec<usize>, Vec<i32>)> {
    match t.get(name) {
        Some(HostTensor::Int { shape, data }) => {
            let data = data
                .iter()
                .map(|&v| i32::try_from(v).map_err(|_| bad(path, format!("`{name}` value {v} overflows i32"))))
                .collect::<Result<_>>()?;
            Ok((shape.clone(), data))
        }
        Some(_) => Err(bad(path, format!("`{name}` must be an integer tensor"))),
        None => Err(bad(path, format!("tensor `{name}` is missing"))),
    }
}

/// Reads a fixture's batch.
pub fn read_batch(path: &Path, cfg: &DalleBartConfig) -> Result<Batch> {
    let t = read_tensors(path)?;
    let (ishape, input_ids) = int_tensor(&t, "input_ids", path)?;
    let (_, attention_mask) = int_tensor(&t, "attention_mask", path)?;
    let (lshape, labels) = int_tensor(&t, "labels", path)?;
    let (_, decoder_input_ids) = int_tensor(&t, "decoder_input_ids", path)?;
    if ishape.len() != 2 || lshape.len() != 2 {
        return Err(bad(path, "input_ids and labels must be 2-D [batch, length]"));
    }
    let batch = Batch {
        batch: ishape[0],
        text_len: ishape[1],
        image_len: lshape[1],
        input_ids,
        attention_mask,
        labels,
        decoder_input_ids,
    };
    batch.validate(cfg).map_err(|e| bad(path, e.to_string()))?;
    Ok(batch)
}

fn f32_tensor<'a>(t: &'a BTreeMap<String, HostTensor>, name: &str, path: &Path) -> Result<&'a [f32]> {
    match t.get(name) {
        Some(HostTensor::F32 { data, .. }) if !data.is_empty() => Ok(data),
        _ => Err(bad(path, format!("float tensor `{name}` is missing"))),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).abs()).fold(0.0, f64::max)
}

/// A fixture read into memory: model, inputs and the reference values.
pub struct Fixture {
    pub name: String,
    pub cfg: DalleBartConfig,
    pub table: ParamTable,
    pub weights: Vec<Vec<f32>>,
    pub batch: Batch,
    pub ref_loss: f64,
    pub ref_logits: Vec<f32>,
    /// Reference gradients and AdamW step, when the fixture holds them.
    pub ref_grads: Option<Vec<Vec<f32>>>,
    pub ref_adamw: Option<Vec<Vec<f32>>>,
    pub opt: Option<FixtureOptimizer>,
}

impl Fixture {
    /// Reads fixture folder `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
        let table = ParamTable::new(&cfg);
        let weights = crate::dalle_mini::load_model_weights(dir, &table)?;
        let batch = read_batch(&dir.join("batch.safetensors"), &cfg)?;
        let path = dir.join("expected.safetensors");
        let expected = read_tensors(&path)?;
        let ref_logits = f32_tensor(&expected, "logits", &path)?.to_vec();
        let ref_loss = f32_tensor(&expected, "loss", &path)?[0] as f64;
        let has = |p: &str| expected.keys().any(|k| k.starts_with(p));
        let ref_grads = has("grad.").then(|| params_from_tensors(&path, &table, &expected, "grad.")).transpose()?;
        let ref_adamw = has("adamw1.").then(|| params_from_tensors(&path, &table, &expected, "adamw1.")).transpose()?;
        let opt = ref_adamw.as_ref().map(|_| read_fixture_optimizer(dir)).transpose()?;
        Ok(Self {
            name: dir.display().to_string(),
            cfg,
            table,
            weights,
            batch,
            ref_loss,
            ref_logits,
            ref_grads,
            ref_adamw,
            opt,
        })
    }
}

/// Everything a parity run compares, gathered to full tensors on the host.
struct Results {
    loss: f64,
    logits: Vec<f32>,
    grads: Vec<Vec<f32>>,
    adamw_from_ref: Vec<Vec<f32>>,
    adamw: Vec<Vec<f32>>,
}

fn compare(fx: &Fixture, fixture: String, got: Results) -> ParityReport {
    let mut checked = vec!["logits".to_string(), "loss".to_string()];
    checked.extend(fx.ref_grads.as_ref().map(|_| "grads".to_string()));
    checked.extend(fx.ref_adamw.as_ref().map(|_| "adamw".to_string()));
    let (want_grads, want_adamw) = (fx.ref_grads.as_deref().unwrap_or(&[]), fx.ref_adamw.as_deref().unwrap_or(&[]));
    let (mut grad_max_rel_err, mut grad_worst_param) = (0.0f64, String::new());
    for ((spec, g), r) in fx.table.specs.iter().zip(&got.grads).zip(want_grads) {
        let denom = max_abs(r);
        let diff = max_abs_diff(g, r);
        let rel = if denom > 0.0 { diff / denom } else { diff };
        if rel >= grad_max_rel_err {
            grad_max_rel_err = rel;
            grad_worst_param = spec.name.clone();
        }
    }
    let adam_err = |v: &[Vec<f32>]| v.iter().zip(want_adamw).map(|(a, r)| max_abs_diff(a, r)).fold(0.0, f64::max);
    let loss_abs_err = (got.loss - fx.ref_loss).abs();
    let logits_max_abs_err = max_abs_diff(&got.logits, &fx.ref_logits);
    let adamw_from_ref_grads_max_abs_err = adam_err(&got.adamw_from_ref);
    let adamw_max_abs_err = adam_err(&got.adamw);
    let pass = loss_abs_err <= LOSS_TOL
        && logits_max_abs_err <= LOGITS_TOL
        && grad_max_rel_err <= GRAD_REL_TOL
        && adamw_from_ref_grads_max_abs_err <= ADAMW_FROM_REF_TOL
        && adamw_max_abs_err <= ADAMW_TOL;
    ParityReport {
        fixture,
        loss: got.loss,
        loss_abs_err,
        logits_max_abs_err,
        grad_max_rel_err,
        grad_worst_param,
        adamw_from_ref_grads_max_abs_err,
        adamw_max_abs_err,
        checked,
        pass,
    }
}

/// One AdamW step from `start` with gradients `grads` on `model`'s buffers; the new parameters.
fn adamw_step<B: Backend>(
    model: &mut DalleBart<B>,
    opt: FixtureOptimizer,
    start: &[Vec<f32>],
    grads: &[Vec<f32>],
) -> Result<Vec<Vec<f32>>> {
    let be = model.backend().clone();
    for ((p, g), (w, gv)) in model.params.iter_mut().zip(model.grads.iter_mut()).zip(start.iter().zip(grads)) {
        be.write(p, 0, w)?;
        be.write(g, 0, gv)?;
    }
    let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
    let mut adamw = AdamW::new(&be, opt.adamw, &names, &model.params)?;
    adamw.update(&be, &mut model.params, &model.grads, opt.lr, 1.0)?;
    model.param_values()
}

/// Runs the fixture on the CPU backend.
pub fn run(dir: &Path) -> Result<ParityReport> {
    run_on(CpuBackend::new(), dir)
}

/// Runs the fixture on any backend.
pub fn run_on<B: Backend>(backend: B, dir: &Path) -> Result<ParityReport> {
    let fx = Fixture::load(dir)?;
    let mut model = DalleBart::new(backend, fx.cfg.clone(), fx.weights.clone())?;
    model.forward(&fx.batch)?;
    let logits = model.logits()?;
    if logits.len() != fx.ref_logits.len() {
        return Err(ModelError::Batch(format!(
            "{}: logits have {} values, the fixture {}",
            fx.name,
            logits.len(),
            fx.ref_logits.len()
        )));
    }
    let tokens = (fx.batch.batch * fx.batch.image_len) as f32;
    let out = model.loss_and_backward(1.0 / tokens)?;
    let grads = model.grad_values()?;
    // One AdamW step from the reference gradients, then one from ours, both from the fixture's weights.
    let (mut adamw_from_ref, mut adamw) = (Vec::new(), Vec::new());
    if let Some(opt) = fx.opt {
        if let Some(g) = &fx.ref_grads {
            adamw_from_ref = adamw_step(&mut model, opt, &fx.weights, g)?;
        }
        adamw = adamw_step(&mut model, opt, &fx.weights, &grads)?;
    }
    let results = Results { loss: out.loss as f64, logits, grads, adamw_from_ref, adamw };
    Ok(compare(&fx, fx.name.clone(), results))
}

/// Refuses a mesh the fixture's config or batch can't take, before anything is allocated.
pub fn check_mesh(cfg: &DalleBartConfig, batch: usize, tp: usize, dp: usize) -> Result<Mesh> {
    let mesh = Mesh::new(tp, dp).map_err(|e| ModelError::Config(e.to_string()))?;
    crate::params::check_tp(cfg, tp).map_err(|e| ModelError::Config(format!("mesh tp={tp}: {e}")))?;
    if !batch.is_multiple_of(dp) {
        return Err(ModelError::Config(format!(
            "mesh dp={dp}: the batch of {batch} rows is not divisible by dp; choose a dp that divides it"
        )));
    }
    Ok(mesh)
}

/// Checks that `fx` can run on a tp × dp mesh: the mesh fits and the fixture holds gradients
/// and an AdamW step (what a mesh run compares); returns the mesh, the optimizer and the
/// reference gradients.
pub fn check_fixture_mesh(fx: &Fixture, tp: usize, dp: usize) -> Result<(Mesh, FixtureOptimizer, &[Vec<f32>])> {
    let mesh = check_mesh(&fx.cfg, fx.batch.batch, tp, dp)?;
    match (&fx.ref_grads, fx.opt) {
        (Some(grads), Some(opt)) => Ok((mesh, opt, grads)),
        _ => Err(ModelError::Config(format!(
            "{}: parity on a mesh needs grad.* and adamw1.* reference tensors in expected.safetensors; this \
             fixture holds only logits and loss: run it without --tp/--dp",
            fx.name
        ))),
    }
}

/// The communicators of one mesh rank (tp and dp only where that axis is > 1).
pub struct RankGroups<B: Backend = CpuBackend> {
    pub tp: Option<Arc<dyn Communicator<B>>>,
    pub dp: Option<Arc<dyn Communicator<B>>>,
    pub world: Arc<dyn Communicator<B>>,
}

fn comm_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Comm(e.to_string())
}

/// Sums `values` over the world: every rank contributes its part and zeros elsewhere, so each
/// entry is the one rank's value exactly, whatever the reduction order.
fn world_sum<B: Backend>(be: &B, world: &dyn Communicator<B>, values: &[f32]) -> Result<Vec<f32>> {
    let mut buf = be.upload("parity.world_sum", values)?;
    world.all_reduce(&mut buf, ReduceOp::Sum).map_err(comm_err)?;
    Ok(be.download(&buf)?)
}

/// One rank's part of a mesh parity run: the batch split across dp, the weights sharded across
/// tp; forward and backward (tp collectives inside the model), gradient all-reduce over dp, two
/// AdamW steps, then every result summed over the world into full tensors (see [`world_sum`]).
/// World rank 0 returns the report, the others `None`. Every rank of the mesh must call it.
pub fn rank_report(fx: &Fixture, mesh: &Mesh, rank: usize, groups: RankGroups) -> Result<Option<ParityReport>> {
    rank_report_on(CpuBackend::with_budget(&format!("cpu:rank{rank}"), None), fx, mesh, rank, groups)
}

/// [`rank_report`] on the backend `be` of this rank (a CPU rank, or a GPU with NCCL groups).
pub fn rank_report_on<B: Backend>(
    be: B,
    fx: &Fixture,
    mesh: &Mesh,
    rank: usize,
    groups: RankGroups<B>,
) -> Result<Option<ParityReport>> {
    let (tp, dp) = (mesh.tp(), mesh.dp());
    let (_, opt, ref_grads) = check_fixture_mesh(fx, tp, dp)?;
    let (dp_index, tp_index) = mesh.coords(rank);
    let table = ParamTable::sharded(&fx.cfg, tp_index, tp);
    let local = table.shard_values(&fx.weights);
    let group = groups.tp.clone().map(|comm| crate::dallebart::TpGroup { rank: tp_index, size: tp, comm });
    let mut model = DalleBart::new_sharded(be.clone(), fx.cfg.clone(), group, local.clone())?;
    let rows = fx.batch.batch / dp;
    let tokens = (fx.batch.batch * fx.batch.image_len) as f32;
    model.forward(&fx.batch.slice(dp_index * rows, rows))?;
    let logits = model.logits()?;
    let out = model.loss_and_backward(1.0 / tokens)?;
    if let Some(c) = &groups.dp {
        for g in model.grads.iter_mut() {
            c.all_reduce(g, ReduceOp::Sum).map_err(comm_err)?;
        }
    }
    let grads = model.grad_values()?;
    let adamw_from_ref = adamw_step(&mut model, opt, &local, &table.shard_values(ref_grads))?;
    let adamw = adamw_step(&mut model, opt, &local, &grads)?;

    // Logits: this rank's rows (dp) and vocabulary columns (tp).
    let classes = fx.cfg.loss_classes();
    let mut full_logits = vec![0.0f32; fx.ref_logits.len()];
    let (cols, start, valid) = model.logits_columns();
    let per_rank_rows = rows * fx.batch.image_len;
    for i in 0..per_rank_rows {
        let row = dp_index * per_rank_rows + i;
        full_logits[row * classes + start..row * classes + start + valid]
            .copy_from_slice(&logits[i * cols..i * cols + valid]);
    }
    let full_logits = world_sum(&be, groups.world.as_ref(), &full_logits)?;
    // Loss: one slot per dp rank, from its tp_index 0 rank; averaged over dp in dp order.
    let mut losses = vec![0.0f32; dp];
    if tp_index == 0 {
        losses[dp_index] = out.loss;
    }
    let losses = world_sum(&be, groups.world.as_ref(), &losses)?;
    // Tensors: the dp_index 0 ranks' shards (replicated ones from tp_index 0).
    let gather = |locals: &[Vec<f32>]| -> Result<Vec<Vec<f32>>> {
        let mut flat = Vec::new();
        let mut lens = Vec::new();
        for (spec, l) in table.specs.iter().zip(locals) {
            let mut full = vec![0.0f32; spec.full_numel()];
            let mine = dp_index == 0 && (tp_index == 0 || spec.shard != Shard::Replicated);
            if mine {
                spec.unshard_into(l, &mut full);
            }
            lens.push(full.len());
            flat.extend(full);
        }
        let summed = world_sum(&be, groups.world.as_ref(), &flat)?;
        let mut at = 0;
        Ok(lens
            .into_iter()
            .map(|n| {
                at += n;
                summed[at - n..at].to_vec()
            })
            .collect())
    };
    let (grads, adamw_from_ref, adamw) = (gather(&grads)?, gather(&adamw_from_ref)?, gather(&adamw)?);
    if rank != 0 {
        return Ok(None);
    }
    let loss = losses.iter().map(|&l| l as f64).sum::<f64>() / dp as f64;
    let results = Results { loss, logits: full_logits, grads, adamw_from_ref, adamw };
    Ok(Some(compare(fx, format!("{} (tp={tp}, dp={dp})", fx.name), results)))
}

/// Parity on a tp × dp mesh of CPU ranks that are threads of this process (see
/// [`rank_report`]); tp = dp = 1 is [`run`].
pub fn run_mesh(dir: &Path, tp: usize, dp: usize) -> Result<ParityReport> {
    if tp * dp == 1 {
        return run(dir);
    }
    let fx = Fixture::load(dir)?;
    let (mesh, _, _) = check_fixture_mesh(&fx, tp, dp)?;
    let reports = dm_parallel::run_ranks(&mesh, |rank, comms| {
        let arc = |c: dm_parallel::ThreadComm| -> Arc<dyn Communicator<CpuBackend>> { Arc::new(c) };
        let groups = RankGroups {
            tp: (tp > 1).then(|| arc(comms.tp)),
            dp: (dp > 1).then(|| arc(comms.dp)),
            world: arc(comms.world),
        };
        rank_report(&fx, &mesh, rank, groups)
    })
    .map_err(comm_err)?;
    reports.into_iter().next().flatten().ok_or_else(|| ModelError::Comm("world rank 0 returned no report".into()))
}
