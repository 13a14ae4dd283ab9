//! Section 5: GEMM, attention and cross-entropy throughput (the training steps are in
//! [`super::steps`]).

use super::*;

impl Checker<CudaBackend> {
    // ---- section 5: benchmarks -------------------------------------------------------------------

    /// Seconds per call of `f` (median-free: total over adaptive repetitions after one warm-up).
    pub(super) fn time(be: &CudaBackend, mut f: impl FnMut() -> dm_runtime::Result<()>) -> Result<f64> {
        f()?;
        be.synchronize()?;
        let t = Instant::now();
        f()?;
        be.synchronize()?;
        let once = t.elapsed().as_secs_f64().max(1e-6);
        let reps = ((0.15 / once) as usize).clamp(3, 50);
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        be.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    }

    /// The GEMM implementations compared: custom kernels and cuBLAS, fp32 and bf16 mixed.
    fn gemm_variants(&self) -> Vec<(&'static str, CudaBackend)> {
        let mut v = self.gpu.conformance_variants();
        v.extend(self.gpu.bf16_mixed_variants());
        v
    }

    pub(super) fn benches(&mut self, deadline: Instant) -> Result<()> {
        self.bench_gemm(deadline)?;
        self.bench_attention(deadline)?;
        self.bench_cross_entropy()?;
        self.bench_steps(deadline)?;
        Ok(())
    }

    pub(super) fn bench_gemm(&mut self, deadline: Instant) -> Result<()> {
        let t = 2048; // 8 · 256 image tokens
        let shapes = [
            ("mini qkvo fwd", t, 1024, 1024, false, false),
            ("mini glu up fwd", t, 2730, 1024, false, false),
            ("mini glu down fwd", t, 1024, 2730, false, false),
            ("mini glu up dW", 1024, 2730, t, true, false),
            ("mini lm_head fwd", t, 16385, 1024, false, false),
            ("mini lm_head dX", t, 1024, 16385, false, true),
            ("mega qkvo fwd", t, 2048, 2048, false, false),
            ("mega glu up fwd", t, 4096, 2048, false, false),
            ("mega glu down fwd", t, 2048, 4096, false, false),
            ("mega lm_head fwd", t, 16416, 2048, false, false),
        ];
        for (name, m, n, k, ta, tb) in shapes {
            if Instant::now() > deadline {
                self.row("bench", &format!("gemm {name}"), Status::Skipped, None, None, "time budget spent".into());
                continue;
            }
            let spec = MatmulSpec { m, n, k, trans_a: ta, trans_b: tb, accumulate: ta };
            let (ha, hb) = (self.randn(m * k, 1.0), self.randn(k * n, 1.0));
            let a = self.gpu.upload("bench.a", &ha)?;
            let b = self.gpu.upload("bench.b", &hb)?;
            drop((ha, hb));
            let mut c = self.gpu.zeros("bench.c", m * n)?;
            let mut figures = Vec::new();
            for (label, be) in self.gemm_variants() {
                let s = Self::time(&be, || be.matmul(&mut c, &a, &b, spec))?;
                figures.push((label, spec.flops() / s / 1e12));
            }
            for (label, tf) in &figures {
                let vs = figures.iter().find(|f| f.0 == label.replace("custom", "cublas")).map(|f| f.1);
                let detail = match vs {
                    Some(c) if label.contains("custom") => format!("m{m} n{n} k{k}; {:.0}% of cuBLAS", 100.0 * tf / c),
                    _ => format!("m{m} n{n} k{k}"),
                };
                self.bench("gemm", &format!("{name} {label}"), *tf, "TFLOP/s", detail);
            }
        }
        Ok(())
    }

    pub(super) fn bench_attention(&mut self, deadline: Instant) -> Result<()> {
        for (t, causal) in [(64usize, false), (256, false), (256, true)] {
            if Instant::now() > deadline {
                break;
            }
            let shape = AttentionShape { batch: 8, q_len: t, kv_len: t, heads: 16, head_dim: 64, causal };
            let n = 8 * t * 1024;
            let host: Vec<Vec<f32>> = (0..4).map(|_| self.randn(n, 1.0)).collect();
            let q = self.gpu.upload("bench.q", &host[0])?;
            let k = self.gpu.upload("bench.k", &host[1])?;
            let v = self.gpu.upload("bench.v", &host[2])?;
            let dout = self.gpu.upload("bench.dout", &host[3])?;
            let (mut out, mut lse) = (self.gpu.zeros("bench.out", n)?, self.gpu.zeros("bench.lse", shape.lse_len())?);
            let (mut dq, mut dk, mut dv) =
                (self.gpu.zeros("bench.dq", n)?, self.gpu.zeros("bench.dk", n)?, self.gpu.zeros("bench.dv", n)?);
            for (label, be) in [
                ("f32", self.gpu.with_options(Precision::F32, MatmulImpl::Custom)),
                ("bf16 tc", self.gpu.with_options(Precision::Bf16Mixed, MatmulImpl::Custom)),
            ] {
                let fwd = Self::time(&be, || be.attention_forward(&mut out, &mut lse, &q, &k, &v, None, shape))?;
                let bwd = Self::time(&be, || {
                    be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, None, shape)
                })?;
                let f = shape.forward_flops();
                let what = format!("T={t}{} B8 H16 hd64 {label}", if causal { " causal" } else { "" });
                self.bench(
                    "attention",
                    &format!("fwd {what}"),
                    f / fwd / 1e12,
                    "TFLOP/s",
                    format!("{:.3} ms; causal not discounted", fwd * 1e3),
                );
                self.bench(
                    "attention",
                    &format!("bwd {what}"),
                    2.5 * f / bwd / 1e12,
                    "TFLOP/s",
                    format!("{:.3} ms; 2.5× fwd FLOPs", bwd * 1e3),
                );
            }
        }
        Ok(())
    }

    pub(super) fn bench_cross_entropy(&mut self) -> Result<()> {
        let (rows, classes) = (2048usize, 16385usize);
        let host = self.randn(rows * classes, 4.0);
        let mut logits = self.gpu.upload("bench.logits", &host)?;
        let mut losses = self.gpu.zeros("bench.losses", rows)?;
        let targets: Vec<i32> = (0..rows).map(|_| self.rng.random_range(0..classes as i32)).collect();
        let tb = self.gpu.upload_ids("bench.targets", &targets)?;
        let be = self.gpu.clone();
        let s = Self::time(&be, || be.cross_entropy_fused(&mut logits, &mut losses, &tb, classes, 1e-3))?;
        let bytes = 2.0 * 4.0 * (rows * classes) as f64;
        self.bench(
            "loss",
            "cross_entropy_fused 2048×16385",
            bytes / s / 1e9,
            "GB/s",
            format!("{:.3} ms; logits read + gradient written once", s * 1e3),
        );
        Ok(())
    }
}
