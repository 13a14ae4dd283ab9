//! Model FLOPs of one training step, counted as dalle-mini's reference benchmark counts them so
//! GFLOP/s figures compare like for like: forward + backward = 3 × forward matmul FLOPs.
//!
//! - dense: 6 · (weights) · (tokens they multiply): encoder layers × text tokens, decoder layers
//!   × image tokens except cross-attention k/v projections × text tokens, lm_head × image tokens;
//! - attention score/value products: 6 · B · d · (enc 2T² + dec (2L² + 2LT)) per layer (the
//!   causal half is counted too);
//! - not counted: LayerNorm, GELU, softmax, cross-entropy, embeddings, AdamW.

use crate::config::DalleBartConfig;
use crate::params::{ParamTable, DECODER_LAYER_PREFIX, ENCODER_LAYER_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepFlops {
    pub dense: f64,
    pub lm_head: f64,
    pub attention: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.dense + self.lm_head + self.attention
    }
}

pub fn step_flops(cfg: &DalleBartConfig, batch: usize) -> StepFlops {
    let table = ParamTable::new(cfg);
    let (t, l, d, b) = (cfg.max_text_length as f64, cfg.image_length as f64, cfg.d_model as f64, batch as f64);
    let sum = |pred: &dyn Fn(&str) -> bool| -> f64 {
        table.specs.iter().filter(|s| pred(&s.name)).map(|s| s.numel() as f64).sum()
    };
    let enc = sum(&|n| n.starts_with(ENCODER_LAYER_PREFIX));
    let dec = sum(&|n| n.starts_with(DECODER_LAYER_PREFIX));
    let cross_kv = sum(&|n| {
        n.starts_with(DECODER_LAYER_PREFIX)
            && (n.ends_with("FlaxBartAttention_1.k_proj.kernel") || n.ends_with("FlaxBartAttention_1.v_proj.kernel"))
    });
    let dense = 6.0 * b * (enc * t + (dec - cross_kv) * l + cross_kv * t);
    let lm_head = 6.0 * b * table.specs[table.lm_head].numel() as f64 * l;
    let attention = 6.0
        * b
        * d
        * (cfg.encoder_layers as f64 * 2.0 * t * t + cfg.decoder_layers as f64 * (2.0 * l * l + 2.0 * l * t));
    StepFlops { dense, lm_head, attention }
}

#[cfg(test)]
mod tests {
    #[test]
    fn micro_batch8_matches_the_reference_benchmark_count() {
        // dalle-mini's bench_train.py reports 73.9 GFLOP per micro step at batch 8.
        let f = super::step_flops(&crate::DalleBartConfig::micro(), 8).total();
        assert!((f / 1e9 - 73.9).abs() < 0.1, "{}", f / 1e9);
    }
}
