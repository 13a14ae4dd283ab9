//! Section 5, training steps of mini on the GPU (samples/s, MFU): the trainer's own step
//! ([`OptimizerStep`]: forward + backward, gradient norm, clipping, AdamW) on one GPU, the CUDA
//! handle of each precision / GEMM variant as its backend (the model's policy stays fp32: the
//! bf16 rows are the tensor-core GEMM of `Precision::Bf16Mixed`).

use super::*;
use crate::trainer::step::{clip_factor, OptimizerStep};
use crate::trainer::Groups;

impl Checker<CudaBackend> {
    pub(super) fn bench_steps(&mut self, deadline: Instant) -> Result<()> {
        let cfg = DalleBartConfig::mini();
        let batch = 8;
        let t = Instant::now();
        let values = ParamTable::new(&cfg).init_values(cfg.init_std, 0);
        eprintln!("gpu-check: mini init values in {:.1} s", t.elapsed().as_secs_f64());
        let data = crate::bench::random_batch(&cfg, batch, 1)?;
        let flops = step_flops(&cfg, batch).total();
        let gpu = self.gpu.info().name.clone();
        let peak = crate::device::peak_bf16_tflops(&gpu).unwrap_or(f64::NAN);
        for (label, precision, matmul) in [
            ("bf16 custom", Precision::Bf16Mixed, MatmulImpl::Custom),
            ("bf16 cublas", Precision::Bf16Mixed, MatmulImpl::Cublas),
            ("f32 custom", Precision::F32, MatmulImpl::Custom),
        ] {
            if Instant::now() > deadline {
                self.row(
                    "bench",
                    &format!("mini step {label}"),
                    Status::Skipped,
                    None,
                    None,
                    "time budget spent".into(),
                );
                continue;
            }
            let be = self.gpu.with_options(precision, matmul);
            be.memory().reset_peak();
            let model = DalleBart::new(be.clone(), cfg.clone(), values.clone())?;
            let groups = Groups { tp: None, dp: None, world: None };
            let adamw = AdamWConfig { weight_decay: 0.0, ..Default::default() };
            let mut step = OptimizerStep::new(be.clone(), model, groups, adamw, false, (0, 1), None, 0)?;
            let (warmup, steps) = if precision == Precision::F32 { (1, 3) } else { (2, 6) };
            let tokens = (batch * cfg.image_length) as f32;
            let mut times = Vec::new();
            let mut loss = f32::NAN;
            for i in 0..warmup + steps {
                let t = Instant::now();
                let local = step.backward(1, 1.0 / tokens, || Ok(data.clone()))?;
                let synced = step.sync(local)?;
                let (l, norm) = (synced.loss, synced.grad_norm);
                step.apply(synced, 1e-4, clip_factor(Some(1.0), norm))?;
                be.synchronize()?;
                loss = l;
                if i >= warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            let tflops = flops / med / 1e12;
            let peak_gib = be.memory().report().peak_bytes as f64 / (1u64 << 30) as f64;
            self.bench(
                "step",
                &format!("mini batch {batch} {label} samples/s"),
                batch as f64 / med,
                "samples/s",
                format!("{:.1} ms/step, {tflops:.1} TFLOP/s, loss {loss:.3}, peak {peak_gib:.1} GiB", med * 1e3),
            );
            self.bench(
                "step",
                &format!("mini batch {batch} {label} MFU"),
                100.0 * tflops / peak,
                "%",
                format!("{:.2} TFLOP/step (dm_model::flops) / {peak} TFLOP/s bf16 peak of {gpu}", flops / 1e12),
            );
            let finite = loss.is_finite() && (loss - (cfg.loss_classes() as f32).ln()).abs() < 1.0;
            self.row(
                "step",
                &format!("mini step {label} loss ≈ ln(vocab)"),
                if finite { Status::Pass } else { Status::Fail },
                None,
                None,
                format!("loss {loss}"),
            );
            drop(step);
        }
        Ok(())
    }
}
