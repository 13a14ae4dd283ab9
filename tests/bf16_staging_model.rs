//! The bf16 staging adapter on a whole bf16-mixed training step: DalleBart (the bf16-mixed
//! fixture's tiny model and batch) run once on the CPU backend's native bf16 ops and once on
//! `Bf16Staged<CpuBackend>` (every op through `dm_runtime::bf16_staging`, the path the CUDA backend
//! takes for its bf16 buffers, with the inner ops checked to see f32 buffers only). Loss, logits,
//! every gradient and the parameters after one AdamW step must be equal bit for bit: the adapter
//! must not change a single rounding of the mixed-precision policy.

use dm_model::parity::Fixture;
use dm_model::plan::Precision;
use dm_model::{AdamW, AdamWConfig, DalleBart};
use dm_runtime::bf16_staging::Bf16Staged;
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use std::path::PathBuf;

/// What one step computed.
struct Step {
    loss_bits: u32,
    logits: Vec<f32>,
    grads: Vec<Vec<f32>>,
    params_after: Vec<Vec<f32>>,
}

/// One bf16-mixed step on `be`: forward, loss and backward, one AdamW update.
fn step<B: Backend>(be: B, fx: &Fixture) -> Step {
    let model = DalleBart::new(be.clone(), fx.cfg.clone(), fx.weights.clone()).unwrap();
    let mut model = model.with_precision(Precision::Bf16Mixed).unwrap();
    model.forward(&fx.batch).unwrap();
    let logits = model.logits().unwrap();
    let tokens = (fx.batch.batch * fx.batch.image_len) as f32;
    let loss = model.loss_and_backward(1.0 / tokens).unwrap().loss;
    let grads = model.grad_values().unwrap();
    let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
    let mut adamw = AdamW::new(&be, AdamWConfig::default(), &names, &model.params).unwrap();
    let DalleBart { params, grads: g, .. } = &mut model;
    adamw.update(&be, params, g, 1e-3, 1.0).unwrap();
    let params = model.param_values().unwrap();
    Step { loss_bits: loss.to_bits(), logits, grads, params_after: params }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_bf16_mixed_step_through_the_staging_adapter_equals_the_native_one_bit_for_bit() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/precision/bf16-mixed");
    let fx = Fixture::load(&dir).unwrap();
    let native = step(CpuBackend::new(), &fx);
    let staged = step(Bf16Staged(CpuBackend::new()), &fx);
    assert_eq!(native.loss_bits, staged.loss_bits, "loss");
    assert_eq!(bits(&native.logits), bits(&staged.logits), "logits");
    assert_eq!(native.grads.len(), staged.grads.len());
    for (i, (n, s)) in native.grads.iter().zip(&staged.grads).enumerate() {
        assert_eq!(bits(n), bits(s), "gradient {i}");
    }
    assert_eq!(native.params_after.len(), staged.params_after.len());
    for (i, (n, s)) in native.params_after.iter().zip(&staged.params_after).enumerate() {
        assert_eq!(bits(n), bits(s), "parameter {i} after AdamW");
    }
    assert!(native.grads.iter().any(|g| g.iter().any(|&v| v != 0.0)), "the step computed gradients");
}
