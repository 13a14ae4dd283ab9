//! bf16 storage on the CPU backend: buffers of `DType::Bf16` hold half the bytes, and every op
//! on them computes in f32 from the exactly widened inputs and rounds its bf16 outputs once
//! (nearest even). So an op on bf16 buffers must equal, bit for bit, the f32 op on the rounded
//! inputs followed by rounding the outputs; f32 outputs (statistics, losses) are not rounded.

use dm_runtime::cpu::{CpuBackend, CpuBuf};
use dm_runtime::{AdamWStep, AttentionShape, Backend, DType, MatmulSpec};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale).collect()
}

fn round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn up(be: &CpuBackend, x: &[f32], dtype: DType) -> CpuBuf {
    be.upload_typed("t", x, dtype).unwrap()
}

fn down(be: &CpuBackend, b: &CpuBuf) -> Vec<f32> {
    be.download(b).unwrap()
}

#[test]
fn bf16_buffers_count_two_bytes_and_round_to_nearest_even() {
    let be = CpuBackend::new();
    let z = be.zeros_typed("z", 1000, DType::Bf16).unwrap();
    assert_eq!(be.memory().report().current_bytes, 2000);
    assert_eq!(z.dtype(), DType::Bf16);
    drop(z);
    let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 0.1, -7.3e-5, 65504.0, 1e-40];
    let b = up(&be, &x, DType::Bf16);
    assert_eq!(be.memory().report().current_bytes, 2 * x.len() as u64);
    let got = down(&be, &b);
    assert_eq!(got[..2], [1.0, 1.0 + 2f32.powi(-6)], "ties to even");
    assert_eq!(got, round(&x));
    for (g, v) in got.iter().zip(&x).filter(|(_, v)| v.is_normal()) {
        // (1e-40 is subnormal: its error is absolute, below bf16's smallest subnormal step.)
        assert!((g - v).abs() <= v.abs() * 2f32.powi(-8), "{g} vs {v}: within half an ulp (2^-9 relative)");
    }
    // A cast is a copy between dtypes; widening back is exact.
    let mut wide = be.zeros("w", x.len()).unwrap();
    be.copy(&mut wide, 0, &b, 0, x.len()).unwrap();
    assert_eq!(down(&be, &wide), round(&x));
}

#[test]
fn dense_and_elementwise_ops_on_bf16_equal_the_f32_op_on_rounded_values() {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (m, n, k) = (13, 17, 29);
    let (a, b) = (rand_vec(&mut rng, m * k, 1.0), rand_vec(&mut rng, k * n, 1.0));
    let acc0 = rand_vec(&mut rng, m * n, 1.0);
    for accumulate in [false, true] {
        let spec = MatmulSpec { accumulate, ..MatmulSpec::nn(m, n, k) };
        let mut want = be.upload("want", &round(&acc0)).unwrap();
        be.matmul(&mut want, &be.upload("a", &round(&a)).unwrap(), &be.upload("b", &round(&b)).unwrap(), spec).unwrap();
        let mut got = up(&be, &acc0, DType::Bf16);
        be.matmul(&mut got, &up(&be, &a, DType::Bf16), &up(&be, &b, DType::Bf16), spec).unwrap();
        assert_eq!(down(&be, &got), round(&down(&be, &want)), "matmul accumulate={accumulate}");
        // bf16 operands into an f32 output (a weight gradient): no rounding of the output.
        let mut f = be.upload("f", &acc0).unwrap();
        be.matmul(&mut f, &up(&be, &a, DType::Bf16), &up(&be, &b, DType::Bf16), spec).unwrap();
        let mut fw = be.upload("fw", &acc0).unwrap();
        be.matmul(&mut fw, &be.upload("a", &round(&a)).unwrap(), &be.upload("b", &round(&b)).unwrap(), spec).unwrap();
        assert_eq!(down(&be, &f), down(&be, &fw));
        assert_ne!(down(&be, &f), round(&down(&be, &f)), "an f32 output keeps its f32 bits");
    }
    let (x, y) = (rand_vec(&mut rng, 300, 2.0), rand_vec(&mut rng, 300, 2.0));
    let mut want = be.zeros("want", 300).unwrap();
    be.add(&mut want, &be.upload("x", &round(&x)).unwrap(), &be.upload("y", &round(&y)).unwrap()).unwrap();
    let mut got = be.zeros_typed("got", 300, DType::Bf16).unwrap();
    be.add(&mut got, &up(&be, &x, DType::Bf16), &up(&be, &y, DType::Bf16)).unwrap();
    assert_eq!(down(&be, &got), round(&down(&be, &want)), "add");
    let mut want = be.zeros("want", 300).unwrap();
    be.gelu_glu_forward(&mut want, &be.upload("x", &round(&x)).unwrap(), &be.upload("y", &round(&y)).unwrap()).unwrap();
    let mut got = be.zeros_typed("got", 300, DType::Bf16).unwrap();
    be.gelu_glu_forward(&mut got, &up(&be, &x, DType::Bf16), &up(&be, &y, DType::Bf16)).unwrap();
    assert_eq!(down(&be, &got), round(&down(&be, &want)), "gelu_glu");
}

#[test]
fn layernorm_attention_and_loss_keep_their_statistics_in_f32() {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (rows, dim) = (11, 24);
    let x = rand_vec(&mut rng, rows * dim, 3.0);
    let (scale, bias) = (rand_vec(&mut rng, dim, 1.0), rand_vec(&mut rng, dim, 0.5));
    let (sb, bb) = (be.upload("s", &scale).unwrap(), be.upload("b", &bias).unwrap());
    let run = |x: &CpuBuf, dtype: DType| {
        let mut out = be.zeros_typed("out", rows * dim, dtype).unwrap();
        let (mut mean, mut rstd) = (be.zeros("mean", rows).unwrap(), be.zeros("rstd", rows).unwrap());
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, x, Some(&sb), &bb, dim).unwrap();
        (down(&be, &out), down(&be, &mean), down(&be, &rstd))
    };
    let want = run(&be.upload("x", &round(&x)).unwrap(), DType::F32);
    let got = run(&up(&be, &x, DType::Bf16), DType::Bf16);
    assert_eq!(got.0, round(&want.0));
    assert_eq!((got.1, got.2), (want.1, want.2), "statistics in f32");

    // Attention: q/k/v/out bf16, lse f32.
    let s = AttentionShape { batch: 2, q_len: 5, kv_len: 7, heads: 2, head_dim: 4, causal: false };
    let (q, k, v) =
        (rand_vec(&mut rng, 2 * 5 * 8, 1.0), rand_vec(&mut rng, 2 * 7 * 8, 1.0), rand_vec(&mut rng, 2 * 7 * 8, 1.0));
    let attn = |dtype: DType, src: &dyn Fn(&[f32]) -> CpuBuf| {
        let mut out = be.zeros_typed("o", q.len(), dtype).unwrap();
        let mut lse = be.zeros("lse", s.lse_len()).unwrap();
        be.attention_forward(&mut out, &mut lse, &src(&q), &src(&k), &src(&v), None, s).unwrap();
        (down(&be, &out), down(&be, &lse))
    };
    let want = attn(DType::F32, &|x| be.upload("x", &round(x)).unwrap());
    let got = attn(DType::Bf16, &|x| up(&be, x, DType::Bf16));
    assert_eq!((got.0, got.1), (round(&want.0), want.1));

    // Cross-entropy over bf16 logits: losses f32, the gradient written back rounded.
    let (rows, classes) = (6, 10);
    let logits = rand_vec(&mut rng, rows * classes, 2.0);
    let targets = be.upload_ids("t", &[0, 3, 9, 2, 2, 7]).unwrap();
    let ce = |mut l: CpuBuf| {
        let mut losses = be.zeros("losses", rows).unwrap();
        be.cross_entropy_fused(&mut l, &mut losses, &targets, classes, 0.25).unwrap();
        (down(&be, &l), down(&be, &losses))
    };
    let want = ce(be.upload("l", &round(&logits)).unwrap());
    let got = ce(up(&be, &logits, DType::Bf16));
    assert_eq!((got.0, got.1), (round(&want.0), want.1));
}

#[test]
fn buffers_kept_in_f32_refuse_bf16_naming_the_buffer() {
    let be = CpuBackend::new();
    let (rows, dim) = (3, 4);
    let x = be.zeros_typed("x", rows * dim, DType::Bf16).unwrap();
    let bias = be.zeros("bias", dim).unwrap();
    let mut out = be.zeros_typed("out", rows * dim, DType::Bf16).unwrap();
    let mut mean = be.zeros_typed("mean", rows, DType::Bf16).unwrap();
    let mut rstd = be.zeros("rstd", rows).unwrap();
    let err = be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, None, &bias, dim).unwrap_err().to_string();
    assert!(err.contains("`mean` is bf16"), "{err}");
    let mut p = be.zeros("p", 8).unwrap();
    let g = be.zeros("g", 8).unwrap();
    let (mut m, mut v) = (be.zeros_typed("m", 8, DType::Bf16).unwrap(), be.zeros("v", 8).unwrap());
    let step = AdamWStep { lr: 1e-3, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    let err = be.adamw(&mut p, &g, &mut m, &mut v, &step).unwrap_err().to_string();
    assert!(err.contains("`m` is bf16"), "{err}");
    let s = AttentionShape { batch: 1, q_len: 2, kv_len: 2, heads: 1, head_dim: 2, causal: true };
    let qkv = be.zeros_typed("q", 4, DType::Bf16).unwrap();
    let mut o = be.zeros_typed("o", 4, DType::Bf16).unwrap();
    let mut lse = be.zeros_typed("lse", 2, DType::Bf16).unwrap();
    let err = be.attention_forward(&mut o, &mut lse, &qkv, &qkv, &qkv, None, s).unwrap_err().to_string();
    assert!(err.contains("`lse` is bf16"), "{err}");
}
