//! `dalle-mesh parity`: runs a reference fixture made by dalle-mini (JAX) through dalle-mesh and
//! reports how far forward, backward and one AdamW step are from it.
//!
//! A fixture folder holds `config.json`, `weights.safetensors`, `batch.safetensors`
//! (`input_ids`, `attention_mask`, `labels`, `decoder_input_ids`), `expected.safetensors`
//! (`logits`, `loss`, `grad.<param>`, `adamw1.<param>`) and `fixture.json` (the optimizer's
//! hyper-parameters under `optimizer`).
//!
//! The weights may also be a dalle-mini folder's `flax_model.msgpack` (or sharded index); then
//! `expected.safetensors` may hold only `logits` and `loss` (dalle-mini's interop fixtures):
//! whatever it holds is checked, and the report's `checked` lists what was.

use anyhow::{bail, Context, Result};
use dm_model::checkpoint::{params_from_tensors, read_tensors, HostTensor};
use dm_model::{AdamW, AdamWConfig, Batch, DalleBart, DalleBartConfig};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

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

pub fn read_fixture_optimizer(dir: &Path) -> Result<FixtureOptimizer> {
    let path = dir.join("fixture.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let o = &v["optimizer"];
    let get = |k: &str| -> Result<f32> {
        o[k].as_f64()
            .map(|x| x as f32)
            .with_context(|| format!("{}: optimizer.{k} missing or not a number", path.display()))
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
                .map(|&v| {
                    i32::try_from(v).with_context(|| format!("{}: `{name}` value {v} overflows i32", path.display()))
                })
                .collect::<Result<_>>()?;
            Ok((shape.clone(), data))
        }
        Some(_) => bail!("{}: `{name}` must be an integer tensor", path.display()),
        None => bail!("{}: tensor `{name}` is missing", path.display()),
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
        bail!("{}: input_ids and labels must be 2-D [batch, length]", path.display());
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
    batch.validate(cfg).with_context(|| format!("{}", path.display()))?;
    Ok(batch)
}

fn f32_tensor<'a>(t: &'a BTreeMap<String, HostTensor>, name: &str, path: &Path) -> Result<&'a [f32]> {
    match t.get(name) {
        Some(HostTensor::F32 { data, .. }) => Ok(data),
        _ => bail!("{}: float tensor `{name}` is missing", path.display()),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).abs()).fold(0.0, f64::max)
}

/// Everything a parity run compares, gathered to full tensors on the host.
struct Results<'a> {
    fixture: String,
    loss: f64,
    logits: &'a [f32],
    grads: &'a [Vec<f32>],
    adamw_from_ref: &'a [Vec<f32>],
    adamw: &'a [Vec<f32>],
}

/// The reference values of a fixture.
struct Reference<'a> {
    loss: f64,
    logits: &'a [f32],
    /// Gradients and the AdamW step, when the fixture holds them.
    grads: Option<&'a [Vec<f32>]>,
    adamw: Option<&'a [Vec<f32>]>,
}

fn compare(table: &dm_model::ParamTable, got: Results, want: Reference) -> ParityReport {
    let mut checked = vec!["logits".to_string(), "loss".to_string()];
    checked.extend(want.grads.map(|_| "grads".to_string()));
    checked.extend(want.adamw.map(|_| "adamw".to_string()));
    let (want_grads, want_adamw) = (want.grads.unwrap_or(&[]), want.adamw.unwrap_or(&[]));
    let (mut grad_max_rel_err, mut grad_worst_param) = (0.0f64, String::new());
    for ((spec, g), r) in table.specs.iter().zip(got.grads).zip(want_grads) {
        let denom = max_abs(r);
        let diff = max_abs_diff(g, r);
        let rel = if denom > 0.0 { diff / denom } else { diff };
        if rel >= grad_max_rel_err {
            grad_max_rel_err = rel;
            grad_worst_param = spec.name.clone();
        }
    }
    let adam_err = |v: &[Vec<f32>]| v.iter().zip(want_adamw).map(|(a, r)| max_abs_diff(a, r)).fold(0.0, f64::max);
    // Where our own AdamW step is furthest from the reference, with the gradients behind it.
    let mut worst = (0.0f64, 0usize, 0usize);
    for (t, (a, r)) in got.adamw.iter().zip(want_adamw).enumerate() {
        for (i, (x, y)) in a.iter().zip(r).enumerate() {
            let d = (*x as f64 - *y as f64).abs();
            if d > worst.0 {
                worst = (d, t, i);
            }
        }
    }
    let (_, wt, wi) = worst;
    if !table.specs.is_empty() && !want_grads.is_empty() {
        tracing::debug!(
            param = %table.specs[wt].name,
            index = wi,
            grad = got.grads[wt][wi],
            grad_ref = want_grads[wt][wi],
            "largest AdamW difference"
        );
    }
    let loss_abs_err = (got.loss - want.loss).abs();
    let logits_max_abs_err = max_abs_diff(got.logits, want.logits);
    let adamw_from_ref_grads_max_abs_err = adam_err(got.adamw_from_ref);
    let adamw_max_abs_err = adam_err(got.adamw);
    let pass = loss_abs_err <= LOSS_TOL
        && logits_max_abs_err <= LOGITS_TOL
        && grad_max_rel_err <= GRAD_REL_TOL
        && adamw_from_ref_grads_max_abs_err <= ADAMW_FROM_REF_TOL
        && adamw_max_abs_err <= ADAMW_TOL;
    ParityReport {
        fixture: got.fixture,
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

/// The reference gradients and AdamW step of `expected` (None when it holds neither; an error
/// when it holds only some of them).
type OptionalRef = (Option<Vec<Vec<f32>>>, Option<Vec<Vec<f32>>>);

fn optional_reference(
    path: &Path,
    table: &dm_model::ParamTable,
    expected: &BTreeMap<String, HostTensor>,
) -> Result<OptionalRef> {
    let has = |p: &str| expected.keys().any(|k| k.starts_with(p));
    let grads = has("grad.").then(|| params_from_tensors(path, table, expected, "grad.")).transpose()?;
    let adamw = has("adamw1.").then(|| params_from_tensors(path, table, expected, "adamw1.")).transpose()?;
    Ok((grads, adamw))
}

/// The fixture's weights: `weights.safetensors`, or a dalle-mini `flax_model.msgpack`.
fn fixture_weights(dir: &Path, table: &dm_model::ParamTable) -> Result<Vec<Vec<f32>>> {
    Ok(dm_model::dalle_mini::load_model_weights(dir, table)?)
}

/// Runs the fixture on the CPU backend.
pub fn run(dir: &Path) -> Result<ParityReport> {
    run_on(CpuBackend::new(), dir)
}

/// Runs the fixture on any backend.
pub fn run_on<B: Backend>(backend: B, dir: &Path) -> Result<ParityReport> {
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    let table = dm_model::ParamTable::new(&cfg);
    let weights = fixture_weights(dir, &table)?;
    let batch = read_batch(&dir.join("batch.safetensors"), &cfg)?;
    let expected_path = dir.join("expected.safetensors");
    let expected = read_tensors(&expected_path)?;
    let ref_logits = f32_tensor(&expected, "logits", &expected_path)?;
    let ref_loss = f32_tensor(&expected, "loss", &expected_path)?[0] as f64;
    let (ref_grads, ref_adamw) = optional_reference(&expected_path, &table, &expected)?;
    let opt = ref_adamw.as_ref().map(|_| read_fixture_optimizer(dir)).transpose()?;

    let mut model = DalleBart::new(backend, cfg, weights.clone())?;
    model.forward(&batch)?;
    let logits = model.logits()?;
    if logits.len() != ref_logits.len() {
        bail!("logits have {} values, the fixture {}", logits.len(), ref_logits.len());
    }
    let tokens = (batch.batch * batch.image_len) as f32;
    let out = model.loss_and_backward(1.0 / tokens)?;

    let grads = model.grad_values()?;

    // One AdamW step from the reference gradients, then one from ours, both from the fixture's weights.
    let adamw_err = |model: &mut DalleBart<B>, grads: &[Vec<f32>]| -> Result<Vec<Vec<f32>>> {
        let be = model.backend().clone();
        for ((p, g), (w, gv)) in model.params.iter_mut().zip(model.grads.iter_mut()).zip(weights.iter().zip(grads)) {
            be.write(p, 0, w)?;
            be.write(g, 0, gv)?;
        }
        let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
        let Some(opt) = opt else { return Ok(Vec::new()) };
        let mut adamw = AdamW::new(&be, opt.adamw, &names, &model.params)?;
        adamw.update(&be, &mut model.params, &model.grads, opt.lr, 1.0)?;
        Ok(model.param_values()?)
    };
    let adamw_from_ref = match &ref_grads {
        Some(g) => adamw_err(&mut model, g)?,
        None => Vec::new(),
    };
    let adamw = adamw_err(&mut model, &grads)?;
    let reference =
        Reference { loss: ref_loss, logits: ref_logits, grads: ref_grads.as_deref(), adamw: ref_adamw.as_deref() };
    let results = Results {
        fixture: dir.display().to_string(),
        loss: out.loss as f64,
        logits: &logits,
        grads: &grads,
        adamw_from_ref: &adamw_from_ref,
        adamw: &adamw,
    };
    Ok(compare(&table, results, reference))
}

/// What one rank of a mesh parity run returns (host copies of its shards).
struct RankResult {
    dp_index: usize,
    tp_index: usize,
    logits: Vec<f32>,
    logits_cols: (usize, usize, usize),
    loss: f32,
    grads: Vec<Vec<f32>>,
    adamw_from_ref: Vec<Vec<f32>>,
    adamw: Vec<Vec<f32>>,
}

/// Refuses a mesh the fixture's config or batch can't take, before anything is allocated.
pub fn check_mesh(cfg: &DalleBartConfig, batch: usize, tp: usize, dp: usize) -> Result<dm_parallel::Mesh> {
    let mesh = dm_parallel::Mesh::new(tp, dp)?;
    dm_model::params::check_tp(cfg, tp).map_err(|e| anyhow::anyhow!("mesh tp={tp}: {e}"))?;
    if !batch.is_multiple_of(dp) {
        bail!("mesh dp={dp}: the batch of {batch} rows is not divisible by dp; choose a dp that divides it");
    }
    Ok(mesh)
}

/// Parity on a tp × dp mesh of CPU ranks (threads): the batch is split across dp, the weights
/// sharded across tp from the same safetensors; the gathered results are compared with the
/// same tolerances as on one device.
pub fn run_mesh(dir: &Path, tp: usize, dp: usize) -> Result<ParityReport> {
    if tp * dp == 1 {
        return run(dir);
    }
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    let opt = read_fixture_optimizer(dir)?;
    let full_table = dm_model::ParamTable::new(&cfg);
    let weights = fixture_weights(dir, &full_table)?;
    let batch = read_batch(&dir.join("batch.safetensors"), &cfg)?;
    let mesh = check_mesh(&cfg, batch.batch, tp, dp)?;
    let expected_path = dir.join("expected.safetensors");
    let expected = read_tensors(&expected_path)?;
    let ref_logits = f32_tensor(&expected, "logits", &expected_path)?.to_vec();
    let ref_loss = f32_tensor(&expected, "loss", &expected_path)?[0] as f64;
    let (Some(ref_grads), Some(ref_adamw)) = optional_reference(&expected_path, &full_table, &expected)? else {
        bail!(
            "{}: parity on a mesh needs grad.* and adamw1.* reference tensors; this fixture holds only \
             logits and loss: run it without --tp/--dp",
            expected_path.display()
        );
    };
    let rows = batch.batch / dp;
    let tokens = (batch.batch * batch.image_len) as f32;

    let results = dm_parallel::run_ranks(&mesh, |rank, comms| -> Result<RankResult> {
        let (dp_index, tp_index) = mesh.coords(rank);
        let be = CpuBackend::with_budget(&format!("cpu:rank{rank}"), None);
        let table = dm_model::ParamTable::sharded(&cfg, tp_index, tp);
        let local = table.shard_values(&weights);
        let tp_comm: std::sync::Arc<dyn dm_parallel::Communicator<CpuBackend>> = std::sync::Arc::new(comms.tp);
        let group = dm_model::dallebart::TpGroup { rank: tp_index, size: tp, comm: tp_comm };
        let mut model = DalleBart::new_sharded(be.clone(), cfg.clone(), Some(group), local.clone())?;
        let part = batch.slice(dp_index * rows, rows);
        model.forward(&part)?;
        let logits = model.logits()?;
        let out = model.loss_and_backward(1.0 / tokens)?;
        use dm_parallel::Communicator as _;
        for g in model.grads.iter_mut() {
            comms.dp.all_reduce(g, dm_parallel::ReduceOp::Sum)?;
        }
        let grads = model.grad_values()?;
        let names: Vec<String> = table.specs.iter().map(|s| s.name.clone()).collect();
        let mut step = |g: &[Vec<f32>]| -> Result<Vec<Vec<f32>>> {
            for ((p, gb), (w, gv)) in model.params.iter_mut().zip(model.grads.iter_mut()).zip(local.iter().zip(g)) {
                be.write(p, 0, w)?;
                be.write(gb, 0, gv)?;
            }
            let mut adamw = AdamW::new(&be, opt.adamw, &names, &model.params)?;
            adamw.update(&be, &mut model.params, &model.grads, opt.lr, 1.0)?;
            Ok(model.param_values()?)
        };
        let adamw_from_ref = step(&table.shard_values(&ref_grads))?;
        let adamw = step(&grads)?;
        Ok(RankResult {
            dp_index,
            tp_index,
            logits,
            logits_cols: model.logits_columns(),
            loss: out.loss,
            grads,
            adamw_from_ref,
            adamw,
        })
    })
    .map_err(|f| anyhow::anyhow!("{f}"))?;

    // Gather: logits by (dp rows, tp columns); tensors from the dp_index 0 ranks.
    let classes = cfg.loss_classes();
    let mut logits = vec![f32::NAN; ref_logits.len()];
    let per_rank_rows = rows * batch.image_len;
    for r in &results {
        let (cols, start, valid) = r.logits_cols;
        for i in 0..per_rank_rows {
            let row = r.dp_index * per_rank_rows + i;
            logits[row * classes + start..row * classes + start + valid]
                .copy_from_slice(&r.logits[i * cols..i * cols + valid]);
        }
    }
    let loss = results.iter().filter(|r| r.tp_index == 0).map(|r| r.loss as f64).sum::<f64>() / dp as f64;
    let tables: Vec<dm_model::ParamTable> = (0..tp).map(|t| dm_model::ParamTable::sharded(&cfg, t, tp)).collect();
    let gather = |pick: &dyn Fn(&RankResult) -> &Vec<Vec<f32>>| {
        let mut by_tp: Vec<&RankResult> = results.iter().filter(|r| r.dp_index == 0).collect();
        by_tp.sort_by_key(|r| r.tp_index);
        let locals: Vec<Vec<Vec<f32>>> = by_tp.iter().map(|r| pick(r).clone()).collect();
        dm_model::ParamTable::unshard_values(&tables, &locals)
    };
    let grads = gather(&|r| &r.grads);
    let adamw_ref = gather(&|r| &r.adamw_from_ref);
    let adamw_own = gather(&|r| &r.adamw);
    let reference = Reference { loss: ref_loss, logits: &ref_logits, grads: Some(&ref_grads), adamw: Some(&ref_adamw) };
    let results = Results {
        fixture: format!("{} (tp={tp}, dp={dp})", dir.display()),
        loss,
        logits: &logits,
        grads: &grads,
        adamw_from_ref: &adamw_ref,
        adamw: &adamw_own,
    };
    Ok(compare(&full_table, results, reference))
}
