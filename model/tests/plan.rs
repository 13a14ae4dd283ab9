//! The memory plan against the CPU memory tracker, and the communication formulas against the
//! communicators' counters, on one device and on a tp = 2 × dp = 2 mesh of CPU ranks.

use dm_model::dallebart::TpGroup;
use dm_model::plan::{self, MemoryPlan, PlanOptions, Precision, StepComm};
use dm_model::{AdamW, AdamWConfig, Batch, DalleBart, DalleBartConfig, ParamTable};
use dm_parallel::zero::Zero1;
use dm_parallel::{CommStats, Communicator, Mesh, OpStats, ReduceOp, ThreadComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::{AdamWStep, Backend};
use std::sync::Arc;

fn small(
    d: usize,
    layers: (usize, usize),
    ffn: usize,
    text_vocab: usize,
    image_vocab: usize,
    image_len: usize,
) -> DalleBartConfig {
    DalleBartConfig {
        d_model: d,
        encoder_layers: layers.0,
        decoder_layers: layers.1,
        encoder_attention_heads: 4,
        decoder_attention_heads: 4,
        encoder_ffn_dim: ffn,
        decoder_ffn_dim: ffn + 2,
        encoder_vocab_size: text_vocab,
        image_vocab_size: image_vocab,
        image_length: image_len,
        max_text_length: 8,
        init_std: 0.02,
        use_scan: false,
    }
}

/// The configs measured: uneven ffn splits, padded vocabularies, image tokens ≷ text tokens.
fn configs() -> Vec<(&'static str, DalleBartConfig, usize)> {
    vec![
        ("d32 L1/2 ffn43 V101 img16 b2", small(32, (1, 2), 43, 120, 100, 16), 2),
        ("d48 L2/2 ffn64 V300 img32 b3", small(48, (2, 2), 64, 250, 299, 32), 3),
        ("d64 L2/3 ffn90 V257 img64 b4", small(64, (2, 3), 90, 100, 256, 64), 4),
    ]
}

fn batch(cfg: &DalleBartConfig, rows: usize, seed: usize) -> Batch {
    let (t, l) = (cfg.max_text_length, cfg.image_length);
    let ids = (0..rows * t).map(|i| ((i * 7 + seed) % cfg.encoder_vocab_size) as i32).collect();
    let mask = (0..rows * t).map(|i| i32::from(i % t < t - 1 - (i / t) % 3)).collect();
    let labels = (0..rows * l).map(|i| ((i * 13 + 5 * seed) % cfg.image_vocab_size) as i32).collect();
    Batch::new(cfg, rows, ids, mask, labels).unwrap()
}

/// Tracker readings of one rank through one training step.
#[derive(Debug, Clone)]
struct Measured {
    tp_rank: usize,
    /// Current bytes after model init, after the optimizer, after the forward.
    init: u64,
    optimizer: u64,
    forward: u64,
    /// Peak over the whole step.
    peak: u64,
    /// Counters of the step (after − before) per communicator.
    comm: StepComm,
}

fn sub(a: &CommStats, b: &CommStats) -> CommStats {
    let d = |x: OpStats, y: OpStats| OpStats { calls: x.calls - y.calls, bytes: x.bytes - y.bytes };
    CommStats {
        all_reduce: d(a.all_reduce, b.all_reduce),
        all_gather: d(a.all_gather, b.all_gather),
        reduce_scatter: d(a.reduce_scatter, b.reduce_scatter),
        broadcast: d(a.broadcast, b.broadcast),
        barrier: d(a.barrier, b.barrier),
    }
}

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

/// One scalar all-reduce, as the trainer issues it.
fn scalar(be: &CpuBackend, c: Option<&Arc<ThreadComm>>, x: f32, op: ReduceOp) -> Result<f32, String> {
    let Some(c) = c else { return Ok(x) };
    let mut b = be.upload("scalar", &[x]).map_err(e)?;
    c.all_reduce(&mut b, op).map_err(e)?;
    Ok(be.download(&b).map_err(e)?[0])
}

/// One training step on every rank of a tp × dp mesh, as `dalle_mesh::train` runs it: init,
/// optimizer (AdamW or ZeRO-1), forward, loss and backward, loss average over dp, gradient sync
/// (all-reduce or ZeRO-1 reduce-scatter), grad-norm all-reduce, update (ZeRO-1: all-gather),
/// agreed stop reason (signal, time limit, divergence) over the world.
fn mesh_step(cfg: &DalleBartConfig, tp: usize, dp: usize, zero1: bool, rows: usize) -> Vec<Measured> {
    mesh_step_in(cfg, tp, dp, zero1, rows, Precision::Fp32)
}

/// [`mesh_step`] with the model in `precision` ([`DalleBart::with_precision`], as the trainer sets it).
fn mesh_step_in(
    cfg: &DalleBartConfig,
    tp: usize,
    dp: usize,
    zero1: bool,
    rows: usize,
    precision: Precision,
) -> Vec<Measured> {
    let mesh = Mesh::new(tp, dp).unwrap();
    let full = ParamTable::new(cfg).init_values(cfg.init_std, 7);
    let global = batch(cfg, rows * dp, 1);
    let tokens = (rows * dp * cfg.image_length) as f32;
    dm_parallel::run_ranks(&mesh, |rank, comms| -> Result<Measured, String> {
        let (dp_index, tp_index) = mesh.coords(rank);
        let be = CpuBackend::with_budget(&format!("cpu:rank{rank}"), None);
        let table = ParamTable::sharded(cfg, tp_index, tp);
        let names: Vec<String> = table.specs.iter().map(|s| s.name.clone()).collect();
        let tp_comm = Arc::new(comms.tp);
        let dp_comm = Arc::new(comms.dp);
        let world = Arc::new(comms.world);
        let group = (tp > 1).then(|| TpGroup {
            rank: tp_index,
            size: tp,
            comm: tp_comm.clone() as Arc<dyn Communicator<CpuBackend>>,
        });
        let (tp_c, dp_c, world_c) =
            ((tp > 1).then_some(&tp_comm), (dp > 1).then_some(&dp_comm), (tp * dp > 1).then_some(&world));
        let model = DalleBart::new_sharded(be.clone(), cfg.clone(), group, table.shard_values(&full)).map_err(e)?;
        let mut model = model.with_precision(precision).map_err(e)?;
        let init = be.memory().report().current_bytes;
        let zero1 = zero1 && dp > 1;
        let mut adamw = None;
        let mut z = None;
        if zero1 {
            let lens: Vec<usize> = table.specs.iter().map(|s| s.numel()).collect();
            z = Some(Zero1::new(&be, &names, &lens, dp_index, dp).map_err(e)?);
        } else {
            adamw = Some(AdamW::new(&be, AdamWConfig::default(), &names, &model.params).map_err(e)?);
        }
        let optimizer = be.memory().report().current_bytes;
        let before = StepComm { tp: tp_comm.stats(), dp: dp_comm.stats(), world: world.stats() };

        model.zero_grads().map_err(e)?;
        model.forward(&global.slice(dp_index * rows, rows)).map_err(e)?;
        let forward = be.memory().report().current_bytes;
        let loss = model.loss_and_backward(1.0 / tokens).map_err(e)?.loss;
        scalar(&be, dp_c, loss, ReduceOp::Avg)?;
        let counted = |i: usize| tp_index == 0 || table.specs[i].shard != dm_model::params::Shard::Replicated;
        if let Some(z) = z.as_mut() {
            let c = dp_c.expect("zero1 needs dp > 1");
            let chunks = z.reduce_scatter_grads(&be, c.as_ref(), &model.grads, &names).map_err(e)?;
            let sq: f64 =
                chunks.iter().enumerate().filter(|(i, _)| counted(*i)).map(|(_, g)| be.sum_squares(g).unwrap()).sum();
            scalar(&be, world_c, sq as f32, ReduceOp::Sum)?;
            let s = AdamWStep { lr: 1e-3, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
            z.update(&be, c.as_ref(), &mut model.params, &chunks, &names, &s).map_err(e)?;
        } else {
            if let Some(c) = dp_c {
                for g in model.grads.iter_mut() {
                    c.all_reduce(g, ReduceOp::Sum).map_err(e)?;
                }
            }
            let sq: f64 = model
                .grads
                .iter()
                .enumerate()
                .filter(|(i, _)| counted(*i))
                .map(|(_, g)| be.sum_squares(g).unwrap())
                .sum();
            scalar(&be, tp_c, sq as f32, ReduceOp::Sum)?;
            let DalleBart { params, grads, .. } = &mut model;
            adamw.as_mut().expect("adamw").update(&be, params, grads, 1e-3, 1.0).map_err(e)?;
        }
        scalar(&be, world_c, 0.0, ReduceOp::Max)?;
        let after = StepComm { tp: tp_comm.stats(), dp: dp_comm.stats(), world: world.stats() };
        Ok(Measured {
            tp_rank: tp_index,
            init,
            optimizer,
            forward,
            peak: be.memory().report().peak_bytes,
            comm: StepComm {
                tp: sub(&after.tp, &before.tp),
                dp: sub(&after.dp, &before.dp),
                world: sub(&after.world, &before.world),
            },
        })
    })
    .unwrap()
}

/// Checks one rank's readings against its plan: every part exactly, and the peak within 10 %
/// (it is exact too, except that with ZeRO-1 the plan counts the batch-ids re-upload, which is
/// never live together with the staging). Returns the relative error of the peak.
fn check(what: &str, p: &MemoryPlan, m: &Measured, zero1: bool) -> f64 {
    assert_eq!(m.init, p.weights + p.gradients, "{what}: weights + gradients");
    assert_eq!(m.optimizer - m.init, p.optimizer_state, "{what}: optimizer state");
    let transient = p.activation_breakdown.input_transient;
    assert_eq!(m.forward - m.optimizer, p.activations - transient, "{what}: activations");
    let expected_peak = if zero1 { p.total_tracked - transient } else { p.total_tracked };
    assert_eq!(m.peak, expected_peak, "{what}: peak");
    let err = (p.total_tracked as f64 - m.peak as f64) / m.peak as f64;
    assert!(err.abs() <= 0.10, "{what}: plan {} vs measured {} ({:+.2} %)", p.total_tracked, m.peak, 100.0 * err);
    println!(
        "{what}: plan {} B, measured peak {} B, error {:+.4} % (workspace {} B untracked)",
        p.total_tracked,
        m.peak,
        100.0 * err,
        p.workspace
    );
    err
}

#[test]
fn plan_equals_the_tracked_peak_on_one_device() {
    for (name, cfg, rows) in configs() {
        let m = &mesh_step(&cfg, 1, 1, false, rows)[0];
        let p = plan::plan(&cfg, &PlanOptions::new(1, 1, rows)).unwrap();
        check(&format!("{name} tp=1"), &p, m, false);
        assert_eq!(p.communication_buffers, 0);
    }
}

#[test]
fn plan_equals_the_tracked_peak_of_every_rank_on_tp2_dp2() {
    for (name, cfg, rows) in configs() {
        for zero1 in [false, true] {
            let mut opts = PlanOptions::new(2, 2, rows);
            opts.zero1 = zero1;
            let worst = plan::plan(&cfg, &opts).unwrap();
            for m in mesh_step(&cfg, 2, 2, zero1, rows) {
                let p = plan::plan_rank(&cfg, &opts, m.tp_rank).unwrap();
                check(&format!("{name} tp=2 dp=2 zero1={zero1} rank tp{}", m.tp_rank), &p, &m, zero1);
                assert!(worst.total_tracked >= p.total_tracked);
            }
        }
    }
}

/// bf16-mixed on CPU ranks (bf16 storage): the plan's bf16 accounting is what the policy
/// allocates, part by part, on one device and on every rank of tp = 2 × dp = 2 (with and without
/// ZeRO-1); and it is not the fp32 plan (the bf16 buffers are really half size).
#[test]
fn plan_equals_the_tracked_peak_in_bf16_mixed() {
    let bf16 =
        |tp, dp, rows, zero1| PlanOptions { precision: Precision::Bf16Mixed, zero1, ..PlanOptions::new(tp, dp, rows) };
    for (name, cfg, rows) in configs() {
        let m = &mesh_step_in(&cfg, 1, 1, false, rows, Precision::Bf16Mixed)[0];
        let p = plan::plan(&cfg, &bf16(1, 1, rows, false)).unwrap();
        check(&format!("{name} bf16-mixed tp=1"), &p, m, false);
        let f = plan::plan(&cfg, &PlanOptions::new(1, 1, rows)).unwrap();
        assert!(p.activations < f.activations * 3 / 4 && p.weights > f.weights, "{name}: bf16 vs fp32 plan");
        for zero1 in [false, true] {
            let opts = bf16(2, 2, rows, zero1);
            for m in mesh_step_in(&cfg, 2, 2, zero1, rows, Precision::Bf16Mixed) {
                let p = plan::plan_rank(&cfg, &opts, m.tp_rank).unwrap();
                check(&format!("{name} bf16-mixed tp=2 dp=2 zero1={zero1} rank tp{}", m.tp_rank), &p, &m, zero1);
            }
        }
    }
}

#[test]
fn one_step_sends_exactly_what_the_formulas_say_on_tp2_dp2() {
    for (name, cfg, rows) in configs() {
        for zero1 in [false, true] {
            let mut opts = PlanOptions::new(2, 2, rows);
            opts.zero1 = zero1;
            for m in mesh_step(&cfg, 2, 2, zero1, rows) {
                let want = plan::step_comm(&cfg, &opts, m.tp_rank, 1);
                assert_eq!(m.comm, want, "{name} zero1={zero1} tp rank {}", m.tp_rank);
                assert!(m.comm.tp.all_reduce.calls > 0 && m.comm.dp.total_calls() > 0);
            }
        }
    }
    // Degenerate meshes send nothing over groups of one.
    let (_, cfg, rows) = configs().remove(0);
    for (tp, dp) in [(1, 2), (2, 1)] {
        for m in mesh_step(&cfg, tp, dp, false, rows) {
            assert_eq!(m.comm, plan::step_comm(&cfg, &PlanOptions::new(tp, dp, rows), m.tp_rank, 1), "tp={tp} dp={dp}");
        }
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn released_configs_plan_sanely() {
    let (mini, mega) = (DalleBartConfig::mini(), DalleBartConfig::mega());
    let opts = |tp, dp, precision, zero1, mem: u64| PlanOptions {
        precision,
        zero1,
        device_memory: Some(mem * GIB),
        ..PlanOptions::new(tp, dp, 8)
    };
    // mega in fp32 on one device: 2.6 B params × 16 bytes alone are ~38.6 GiB.
    let p = plan::plan(&mega, &opts(1, 1, Precision::Fp32, false, 24)).unwrap();
    assert_eq!(p.fits, Some(false));
    assert!(p.weights + p.gradients + p.optimizer_state > 38 * GIB);
    assert_eq!(p.params_per_rank, ParamTable::new(&mega).numel() as u64);
    // mega bf16-mixed on tp = 8 × dp = 8 with ZeRO-1 is several times smaller and fits 24 GiB.
    let big = plan::plan(&mega, &opts(1, 1, Precision::Bf16Mixed, false, 24)).unwrap();
    let sharded = plan::plan(&mega, &opts(8, 8, Precision::Bf16Mixed, true, 24)).unwrap();
    assert!(sharded.total * 5 < big.total, "{} vs {}", sharded.total, big.total);
    assert_eq!(sharded.fits, Some(true));
    // bf16-mixed activations are about half the fp32 ones (logits and statistics stay fp32).
    let f = plan::plan(&mini, &opts(1, 1, Precision::Fp32, false, 24)).unwrap();
    let b = plan::plan(&mini, &opts(1, 1, Precision::Bf16Mixed, false, 24)).unwrap();
    assert!(b.activations < f.activations * 7 / 10 && b.activations > f.activations * 4 / 10);
    // More tp (or dp with ZeRO-1) ⇒ fewer bytes per rank.
    for cfg in [&mini, &mega] {
        for precision in [Precision::Fp32, Precision::Bf16Mixed] {
            let mut last = u64::MAX;
            for tp in [1, 2, 4, 8] {
                let p = plan::plan(cfg, &opts(tp, 1, precision, false, 80)).unwrap();
                assert!(p.total < last, "tp={tp}");
                last = p.total;
            }
            let mut last = u64::MAX;
            for dp in [1, 2, 4, 8] {
                let p = plan::plan(cfg, &opts(2, dp, precision, true, 80)).unwrap();
                assert!(p.optimizer_state < last || dp == 1, "dp={dp}");
                last = p.optimizer_state;
            }
        }
    }
    // A mesh the config can't take is refused with the reason.
    let err = plan::plan(&mega, &opts(3, 1, Precision::Fp32, false, 80)).unwrap_err();
    assert!(err.contains("divisible by tp = 3"), "{err}");
}
