//! bf16-mixed against dalle-mini computing in bfloat16 (`tests/fixtures/precision/bf16-mixed`,
//! made by `scripts/reference/make_fixture.py --seed 11 --batch-size 3 --dtype bfloat16`).
//!
//! What the numerics allow. bf16 keeps 8 significand bits: one rounding moves a value by at most
//! 2⁻⁹ relative (≈ 2e-3). dalle-mesh rounds where dalle-mini's Flax modules hand bf16 from one
//! layer to the next (Dense outputs, LayerNorm outputs, residual adds, the logits; each op
//! computes in f32 and rounds its bf16 output once), but XLA's rounding points differ: it also
//! rounds the attention scores and probabilities and the GELU before its product, it may keep
//! excess f32 precision inside its fusions, its GEMMs sum in another order, and its backward
//! rounds every activation gradient (dalle-mesh keeps the residual-stream gradient in f32). So the
//! two bf16 computations carry independent rounding noise of the same size, and they are about as
//! far apart as bf16 is from fp32: measured on this fixture, the logits differ by 1.18e-3 rms
//! (bf16-mixed vs dalle-mini bf16) against 1.22e-3 (fp32 vs dalle-mini bf16). "Closer than fp32"
//! is therefore not a meaningful test here; the test checks instead:
//! - **the size of our bf16 effect equals dalle-mini's**: our bf16-mixed vs our fp32 run, measured
//!   as fixture.json's `bf16_vs_fp32` measures dalle-mini's, within a factor 2 for the logits
//!   (5.1e-3 max), the median gradient (8.9e-3 relative) and the f32 loss over the bf16 logits
//!   (1.8e-4); measured: 5.4e-3, 6.9e-3, 1.9e-4. An fp32 model (effect 0) fails, and
//!   so does one that rounds much more (bf16 master weights, moments or gradient accumulators) or
//!   much less;
//! - **ours vs theirs within two independent bf16 noises**: ≈ √2 × the bf16-vs-fp32 gap, bounded
//!   at 2×: logits ≤ 2 · 5.1e-3, gradients worst ≤ 2 · 3.1e-2 and median ≤ 2 · 8.9e-3 relative
//!   (per tensor, to its max floored at 1e-3 of the largest gradient, as the fixture computes
//!   them), the logits' rms difference ≤ 2 × our bf16 effect's; the loss (f32, over the bf16 logits, vs the fixture's `loss_f32`) ≤ 1e-3, the size of
//!   the logits' rms difference it averages;
//! - **the logits are on the bf16 grid**: a sizeable share equals dalle-mini's bit for bit (an
//!   f32 model shares none);
//! - **the AdamW step on the fp32 masters**: from the fixture's gradients it equals the fixture's
//!   step to 1e-6 (f32 optimizer, as optax on the fp32 params); from ours it differs by at most
//!   2·lr, where a near-zero gradient's sign differs (the step-1 update is ≈ lr·sign(g)).

use dm_model::checkpoint::{read_tensors, HostTensor};
use dm_model::parity::Fixture;
use dm_model::plan::Precision;
use dm_model::{AdamW, DalleBart};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/precision/bf16-mixed")
}

/// Loss, logits and gradients of one forward/backward.
struct Run {
    loss: f64,
    logits: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

/// How far one run is from another, measured as fixture.json's `bf16_vs_fp32`.
#[derive(Debug)]
struct Gaps {
    loss: f64,
    logits_max: f64,
    logits_rms: f64,
    /// Share of logits equal bit for bit.
    logits_same: f64,
    grad_worst_rel: f64,
    grad_median_rel: f64,
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).abs()).fold(0.0, f64::max)
}
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

fn gaps(got: &Run, want: &Run) -> Gaps {
    let gmax = want.grads.iter().map(|r| max_abs(r)).fold(0.0, f64::max);
    let mut rel: Vec<f64> =
        got.grads.iter().zip(&want.grads).map(|(g, r)| max_abs_diff(g, r) / max_abs(r).max(1e-3 * gmax)).collect();
    rel.sort_by(f64::total_cmp);
    let n = got.logits.len() as f64;
    let sq: f64 = got.logits.iter().zip(&want.logits).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    Gaps {
        loss: (got.loss - want.loss).abs(),
        logits_max: max_abs_diff(&got.logits, &want.logits),
        logits_rms: (sq / n).sqrt(),
        logits_same: got.logits.iter().zip(&want.logits).filter(|(a, b)| a == b).count() as f64 / n,
        grad_worst_rel: *rel.last().unwrap(),
        grad_median_rel: rel[rel.len() / 2],
    }
}

fn run(fx: &Fixture, precision: Precision) -> Run {
    let model = DalleBart::new(CpuBackend::new(), fx.cfg.clone(), fx.weights.clone()).unwrap();
    let mut model = model.with_precision(precision).unwrap();
    model.forward(&fx.batch).unwrap();
    let logits = model.logits().unwrap();
    let tokens = (fx.batch.batch * fx.batch.image_len) as f32;
    let loss = model.loss_and_backward(1.0 / tokens).unwrap().loss as f64;
    Run { loss, logits, grads: model.grad_values().unwrap() }
}

/// One AdamW step with the fixture's hyper-parameters from its weights and `grads`.
fn adamw_step(fx: &Fixture, grads: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let opt = fx.opt.unwrap();
    let be = CpuBackend::new();
    let model = DalleBart::new(be.clone(), fx.cfg.clone(), fx.weights.clone()).unwrap();
    let mut model = model.with_precision(Precision::Bf16Mixed).unwrap();
    for (g, v) in model.grads.iter_mut().zip(grads) {
        be.write(g, 0, v).unwrap();
    }
    let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
    let mut adamw = AdamW::new(&be, opt.adamw, &names, &model.params).unwrap();
    let DalleBart { params, grads, .. } = &mut model;
    adamw.update(&be, params, grads, opt.lr, 1.0).unwrap();
    model.param_values().unwrap()
}

#[test]
fn bf16_mixed_matches_dalle_mini_in_bfloat16_within_bf16_noise() {
    let dir = fixture_dir();
    let fx = Fixture::load(&dir).unwrap();
    let expected = read_tensors(&dir.join("expected.safetensors")).unwrap();
    let Some(HostTensor::F32 { data, .. }) = expected.get("loss_f32") else { panic!("no loss_f32 in the fixture") };
    let theirs = Run { loss: f64::from(data[0]), logits: fx.ref_logits.clone(), grads: fx.ref_grads.clone().unwrap() };
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let their_effect = &info["bf16_vs_fp32"];
    let their = |k: &str| their_effect[k].as_f64().unwrap_or_else(|| panic!("fixture.json: bf16_vs_fp32.{k}"));

    let (bf16, fp32) = (run(&fx, Precision::Bf16Mixed), run(&fx, Precision::Fp32));
    let vs_theirs = gaps(&bf16, &theirs);
    let our_effect = gaps(&bf16, &fp32);
    println!("bf16-mixed vs dalle-mini bf16: {vs_theirs:?}");
    println!("fp32       vs dalle-mini bf16: {:?}", gaps(&fp32, &theirs));
    println!("bf16-mixed vs fp32 (our bf16 effect): {our_effect:?}");
    println!("dalle-mini's bf16 effect: {their_effect}");

    // Our bf16 effect has dalle-mini's size.
    for (what, ours, theirs) in [
        ("logits max", our_effect.logits_max, their("logits_max_abs_diff")),
        ("grad median rel", our_effect.grad_median_rel, their("grad_median_rel")),
        ("loss (f32 over the bf16 logits)", our_effect.loss, their("loss_f32_over_bf16_logits_abs_diff")),
    ] {
        assert!(
            ours >= 0.5 * theirs && ours <= 2.0 * theirs,
            "bf16 effect on {what}: ours {ours:.3e}, dalle-mini {theirs:.3e}"
        );
    }
    // Ours vs theirs within two independent bf16 noises.
    assert!(vs_theirs.logits_max <= 2.0 * their("logits_max_abs_diff"), "{vs_theirs:?}");
    assert!(vs_theirs.grad_worst_rel <= 2.0 * their("grad_worst_rel"), "{vs_theirs:?}");
    assert!(vs_theirs.grad_median_rel <= 2.0 * their("grad_median_rel"), "{vs_theirs:?}");
    assert!(vs_theirs.loss <= 1e-3, "{vs_theirs:?}");
    assert!(vs_theirs.logits_rms <= 2.0 * our_effect.logits_rms, "logits rms: {vs_theirs:?} vs {our_effect:?}");
    // On the bf16 grid.
    assert!(vs_theirs.logits_same >= 0.1 && gaps(&fp32, &theirs).logits_same < 0.01, "{vs_theirs:?}");

    // AdamW on the fp32 masters.
    let want = fx.ref_adamw.as_ref().unwrap();
    let err = |got: &[Vec<f32>]| got.iter().zip(want).map(|(a, r)| max_abs_diff(a, r)).fold(0.0, f64::max);
    let from_ref = err(&adamw_step(&fx, &theirs.grads));
    assert!(from_ref <= 1e-6, "AdamW from the fixture's gradients: {from_ref}");
    let from_ours = err(&adamw_step(&fx, &bf16.grads));
    let lr = f64::from(fx.opt.unwrap().lr);
    println!("AdamW: from the fixture's gradients {from_ref:.2e}, from ours {from_ours:.2e} (lr {lr})");
    assert!(from_ours <= 2.0 * lr + 1e-6, "AdamW from our gradients: {from_ours}");
}
