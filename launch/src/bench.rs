//! `dalle-mesh bench`: throughput of full training steps, and of the GEMMs they are made of.
//! Figures are medians over timed repetitions after warm-up; compare ratios measured in one run.

use anyhow::Result;
use dm_model::flops::step_flops;
use dm_model::{AdamW, AdamWConfig, Batch, DalleBart, DalleBartConfig};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::{Backend, MatmulSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    pub preset: String,
    pub device: String,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub samples_per_s: f64,
    pub step_s_median: f64,
    pub step_s_min: f64,
    pub gflop_per_step: f64,
    pub gflops_per_s: f64,
    pub peak_bytes: u64,
    pub params: usize,
    pub threads: usize,
}

/// A random but valid batch (captions with a few padded positions).
pub fn random_batch(cfg: &DalleBartConfig, batch: usize, seed: u64) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = cfg.max_text_length;
    let mut input_ids = Vec::with_capacity(batch * t);
    let mut mask = Vec::with_capacity(batch * t);
    for _ in 0..batch {
        let len = rng.random_range(2..=t);
        for j in 0..t {
            let real = j < len;
            mask.push(real as i32);
            input_ids.push(if real { rng.random_range(0..cfg.encoder_vocab_size as i32) } else { 1 });
        }
    }
    let labels = (0..batch * cfg.image_length).map(|_| rng.random_range(0..cfg.image_vocab_size as i32)).collect();
    Ok(Batch::new(cfg, batch, input_ids, mask, labels)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Times `steps` full training steps (zero grads, forward, backward, AdamW) after `warmup`.
pub fn bench_step(preset: &str, cfg: DalleBartConfig, batch: usize, steps: usize, warmup: usize) -> Result<StepBench> {
    let be = CpuBackend::new();
    let mut model = DalleBart::init(be.clone(), cfg.clone(), 0)?;
    let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
    let mut opt = AdamW::new(&be, AdamWConfig { weight_decay: 0.0, ..Default::default() }, &names, &model.params)?;
    let data = random_batch(&cfg, batch, 1)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        model.zero_grads()?;
        let out = model.forward_backward(&data)?;
        opt.update(&be, &mut model.params, &model.grads, 1e-4, 1.0)?;
        let dt = t0.elapsed().as_secs_f64();
        tracing::info!(step = i, loss = out.loss, seconds = dt, warmup = i < warmup, "bench step");
        if i >= warmup {
            times.push(dt);
        }
    }
    let med = median(times.clone());
    let flops = step_flops(&cfg, batch).total();
    Ok(StepBench {
        preset: preset.to_string(),
        device: be.name(),
        batch,
        steps,
        warmup,
        samples_per_s: batch as f64 / med,
        step_s_median: med,
        step_s_min: times.iter().copied().fold(f64::INFINITY, f64::min),
        gflop_per_step: flops / 1e9,
        gflops_per_s: flops / med / 1e9,
        peak_bytes: be.memory().report().peak_bytes,
        params: model.table.numel(),
        threads: rayon_threads(),
    })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmBench {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub gflops_per_s: f64,
}

/// The distinct GEMM shapes of one training step of `cfg` at `batch` (forward and backward).
pub fn model_gemm_shapes(cfg: &DalleBartConfig, batch: usize) -> Vec<(String, MatmulSpec)> {
    let d = cfg.d_model;
    let nt = batch * cfg.max_text_length;
    let ni = batch * cfg.image_length;
    let v = cfg.image_rows();
    let f = cfg.decoder_ffn_dim;
    let sp = |m, n, k, ta, tb| MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: ta };
    vec![
        ("lm_head fwd".into(), sp(ni, v, d, false, false)),
        ("lm_head dW".into(), sp(d, v, ni, true, false)),
        ("lm_head dX".into(), sp(ni, d, v, false, true)),
        ("dec qkvo fwd".into(), sp(ni, d, d, false, false)),
        ("dec qkvo dW".into(), sp(d, d, ni, true, false)),
        ("dec glu up fwd".into(), sp(ni, f, d, false, false)),
        ("dec glu up dW".into(), sp(d, f, ni, true, false)),
        ("dec glu down fwd".into(), sp(ni, d, f, false, false)),
        ("enc qkvo fwd".into(), sp(nt, d, d, false, false)),
    ]
}

/// GFLOP/s of the CPU backend's GEMM on the model's shapes (median of `reps`).
pub fn bench_gemm(cfg: &DalleBartConfig, batch: usize, reps: usize) -> Result<Vec<GemmBench>> {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut out = Vec::new();
    for (name, s) in model_gemm_shapes(cfg, batch) {
        let a: Vec<f32> = (0..s.m * s.k).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..s.k * s.n).map(|_| rng.random::<f32>() - 0.5).collect();
        let (a, b) = (be.upload("a", &a)?, be.upload("b", &b)?);
        let mut c = be.zeros("c", s.m * s.n)?;
        be.matmul(&mut c, &a, &b, s)?;
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                be.matmul(&mut c, &a, &b, s).map(|_| t0.elapsed().as_secs_f64())
            })
            .collect::<std::result::Result<_, _>>()?;
        out.push(GemmBench {
            name,
            m: s.m,
            n: s.n,
            k: s.k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            gflops_per_s: s.flops() / median(times) / 1e9,
        });
    }
    Ok(out)
}
