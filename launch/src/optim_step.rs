//! The AdamW step arguments `train` and `bench step` hand the ZeRO-1 update (the full-optimizer
//! path builds the same inside [`dm_model::AdamW::update`]).

use dm_model::AdamWConfig;
use dm_runtime::AdamWStep;

/// Step `step` (1-based, for the bias correction) at learning rate `lr`, gradients scaled by
/// `grad_scale` (the clipping factor), with `adamw`'s betas, epsilon and weight decay.
pub fn adamw_step(adamw: &AdamWConfig, lr: f32, step: u64, grad_scale: f32) -> AdamWStep {
    AdamWStep { lr, b1: adamw.b1, b2: adamw.b2, eps: adamw.eps, weight_decay: adamw.weight_decay, step, grad_scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_every_field() {
        let c = AdamWConfig { b1: 0.8, b2: 0.95, eps: 1e-6, weight_decay: 0.1 };
        let s = adamw_step(&c, 3e-4, 7, 0.5);
        assert_eq!(
            (s.lr, s.b1, s.b2, s.eps, s.weight_decay, s.step, s.grad_scale),
            (3e-4, 0.8, 0.95, 1e-6, 0.1, 7, 0.5)
        );
    }
}
