//! `dalle-mesh plan`: per-rank memory (and per-step communication) of training a model on a
//! `tp × dp` mesh, from the config alone — see [`dm_model::plan`] for what each number counts.

use anyhow::Result;
use dm_model::plan::{self, MemoryPlan, PlanOptions};
use dm_model::{DalleBartConfig, ParamTable};
use serde_json::{json, Value};

/// Bytes in GiB, rounded to 0.01.
pub fn gib(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0
}

/// Bytes for people: `1.23 GiB`, `45.6 MiB`, `7.8 KiB` or `12 B`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.2} GiB", b / 1_073_741_824.0),
    }
}

/// The mesh and batch of `opts` as `plan` and `sweep` report them: tp, dp, world, batch per device,
/// global batch, precision, zero1 (only where dp > 1).
pub fn add_mesh_fields(v: &mut Value, opts: &PlanOptions) {
    let fields = json!({
        "tp": opts.tp,
        "dp": opts.dp,
        "world": opts.tp * opts.dp,
        "batch_per_device": opts.batch_per_device,
        "global_batch": opts.batch_per_device * opts.dp,
        "precision": opts.precision.name(),
        "zero1": opts.zero1_active(),
    });
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
}

/// The plan of the largest rank as one JSON object: the inputs, every part in bytes (and a `gib`
/// object with the same parts rounded), `fits`, the activation breakdown, the collectives of
/// one optimizer step (no gradient accumulation) and notes. A mesh the config can't take (heads
/// not divisible by tp, …) is an error naming the reason.
pub fn run(cfg: &DalleBartConfig, opts: PlanOptions) -> Result<Value> {
    let p = plan::plan(cfg, &opts).map_err(|e| anyhow::anyhow!("cannot plan this mesh: {e}"))?;
    let comm = plan::step_comm(cfg, &opts, p.tp_rank, 1);
    let mut v = json!({
        "model": {
            "d_model": cfg.d_model,
            "encoder_layers": cfg.encoder_layers,
            "decoder_layers": cfg.decoder_layers,
            "params": ParamTable::new(cfg).numel(),
        },
        "tp_rank": p.tp_rank,
        "params_per_rank": p.params_per_rank,
        "weights": p.weights,
        "gradients": p.gradients,
        "optimizer_state": p.optimizer_state,
        "activations": p.activations,
        "activation_breakdown": p.activation_breakdown,
        "communication_buffers": p.communication_buffers,
        "workspace": p.workspace,
        "total_tracked": p.total_tracked,
        "total": p.total,
        "device_memory": p.device_memory,
        "fits": p.fits,
        "gib": gib_view(&p),
        "communication_per_step": comm,
        "notes": p.notes,
    });
    add_mesh_fields(&mut v, &opts);
    Ok(v)
}

fn gib_view(p: &MemoryPlan) -> Value {
    json!({
        "weights": gib(p.weights),
        "gradients": gib(p.gradients),
        "optimizer_state": gib(p.optimizer_state),
        "activations": gib(p.activations),
        "communication_buffers": gib(p.communication_buffers),
        "workspace": gib(p.workspace),
        "total_tracked": gib(p.total_tracked),
        "total": gib(p.total),
        "device_memory": p.device_memory.map(gib),
    })
}

/// The hardware profile `plan --time` and `sweep` predict with: `--profile` (a built-in name or a
/// YAML file), else on `--device cpu` this CPU's cached calibration; `--device cuda` needs one.
pub fn resolve_profile(
    device: crate::bench::Device,
    profile: Option<&str>,
) -> Result<dm_model::perf_model::HardwareProfile> {
    match (profile, device) {
        (Some(p), _) => crate::calibrate::builtin_profile(p),
        (None, crate::bench::Device::Cpu) => crate::calibrate::cached_or_calibrate(),
        (None, crate::bench::Device::Cuda) => Err(crate::bad_input!(
            "plan --time --device cuda needs a hardware profile: pass --profile h100-sxm (or a YAML file like \
             configs/hardware/h100-sxm.yaml)"
        )),
    }
}

/// Adds the performance model's prediction (`predicted_step_s`, `predicted_samples_per_s`,
/// `predicted_mfu`, `bottleneck`, and the breakdown) to a plan report.
pub fn add_time(
    report: &mut Value,
    cfg: &DalleBartConfig,
    opts: &PlanOptions,
    device: crate::bench::Device,
    profile: Option<&str>,
) -> Result<()> {
    let profile = resolve_profile(device, profile)?;
    let p = dm_model::perf_model::predict(cfg, opts, &profile).map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = serde_json::to_value(&p)?;
    if let (Some(obj), Some(add)) = (report.as_object_mut(), v.as_object()) {
        for (k, x) in add {
            obj.insert(k.clone(), x.clone());
        }
    }
    Ok(())
}
