//! Section 5, training steps of mini on the GPU (samples/s, MFU): the step loop written out here
//! until the generic trainer runs on CUDA.

use super::*;

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
            let mut model = DalleBart::new(be.clone(), cfg.clone(), values.clone())?;
            let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
            let mut opt =
                AdamW::new(&be, AdamWConfig { weight_decay: 0.0, ..Default::default() }, &names, &model.params)?;
            let (warmup, steps) = if precision == Precision::F32 { (1, 3) } else { (2, 6) };
            let mut times = Vec::new();
            let mut loss = f32::NAN;
            for i in 0..warmup + steps {
                let t = Instant::now();
                model.zero_grads()?;
                loss = model.forward_backward(&data)?.loss;
                opt.update(&be, &mut model.params, &model.grads, 1e-4, 1.0)?;
                be.synchronize()?;
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
            drop(opt);
            drop(model);
        }
        Ok(())
    }
}
