//! AdamW as `optax.adamw` (b1, b2, eps, eps_root = 0, decoupled weight decay on every parameter):
//! fp32 moments per parameter, updated on the parameter's device through [`Backend::adamw`].

use crate::error::Result;
use dm_runtime::{AdamWStep, Backend};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// optax's defaults with dalle-mini's weight decay off; callers set what they train with.
    fn default() -> Self {
        Self { b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Optimizer state: first and second moments for each parameter (table order) and the step count.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub m: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    /// Number of updates applied so far.
    pub step: u64,
}

impl<B: Backend> AdamW<B> {
    /// Zero moments shaped like `params` (lengths from the backend).
    pub fn new(be: &B, config: AdamWConfig, names: &[String], params: &[B::Buf]) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (name, p) in names.iter().zip(params) {
            let n = be.buf_len(p);
            m.push(be.zeros(&format!("adam_m.{name}"), n)?);
            v.push(be.zeros(&format!("adam_v.{name}"), n)?);
        }
        Ok(Self { config, m, v, step: 0 })
    }

    /// Applies one update with learning rate `lr` to every parameter; `grad_scale` multiplies
    /// the gradients first (clipping).
    pub fn update(&mut self, be: &B, params: &mut [B::Buf], grads: &[B::Buf], lr: f32, grad_scale: f32) -> Result<()> {
        self.step += 1;
        let s = AdamWStep {
            lr,
            b1: self.config.b1,
            b2: self.config.b2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step,
            grad_scale,
        };
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            be.adamw(p, g, m, v, &s)?;
        }
        Ok(())
    }
}
