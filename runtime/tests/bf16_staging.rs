//! The bf16 staging adapter (`dm_runtime::bf16_staging`, what the CUDA backend runs every op
//! through when a buffer is bf16) against the CPU backend's native bf16 ops: every op, run once
//! natively on bf16 buffers and once through `Bf16Staged<CpuBackend>` (whose inner ops are
//! checked to see f32 buffers only), must give bit-identical outputs on the same random inputs.
//! Every buffer the op's check allows in bf16 is bf16 (plus mixed f32/bf16 calls where an op takes
//! both), so a staging step that forgot a buffer, widened or rounded wrongly, or wrote back the
//! wrong buffer fails here.

use dm_runtime::bf16_staging::{Bf16Staged, STAGING_NAME};
use dm_runtime::cpu::{CpuBackend, CpuBuf, CpuIds};
use dm_runtime::{AdamWStep, AttentionShape, Backend, DType, MatmulSpec, VocabRange};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BF: DType = DType::Bf16;
const F: DType = DType::F32;

/// Random buffers of one backend, from one seeded stream (the same seed gives both backends the
/// same values).
struct Gen<'b, B> {
    be: &'b B,
    rng: ChaCha8Rng,
}

impl<B: Backend<Buf = CpuBuf, Ids = CpuIds>> Gen<'_, B> {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.rng.random::<f32>() - 0.5) * 2.0 * scale).collect()
    }
    fn buf(&mut self, n: usize, dtype: DType) -> CpuBuf {
        let v = self.vec(n, 2.0);
        self.be.upload_typed("x", &v, dtype).unwrap()
    }
    /// Positive values (rstd).
    fn positive(&mut self, n: usize) -> CpuBuf {
        let v: Vec<f32> = self.vec(n, 1.0).iter().map(|x| 0.5 + x.abs()).collect();
        self.be.upload("p", &v).unwrap()
    }
    fn ids(&mut self, n: usize, below: i32) -> CpuIds {
        let v: Vec<i32> = (0..n).map(|_| self.rng.random_range(0..below)).collect();
        self.be.upload_ids("ids", &v).unwrap()
    }
}

/// The bit patterns of the named buffers after each op, in call order.
type Outputs = Vec<(String, Vec<u32>)>;

fn bits<B: Backend<Buf = CpuBuf>>(be: &B, b: &CpuBuf) -> Vec<u32> {
    be.download(b).unwrap().iter().map(|v| v.to_bits()).collect()
}

fn record<B: Backend<Buf = CpuBuf>>(out: &mut Outputs, be: &B, op: &str, bufs: &[&CpuBuf]) {
    for (i, b) in bufs.iter().enumerate() {
        out.push((format!("{op} buffer {i} ({})", b.dtype()), bits(be, b)));
    }
}

/// Every op of the backend once (several dtype mixes where an op takes both); returns what each
/// op wrote.
fn run_every_op<B: Backend<Buf = CpuBuf, Ids = CpuIds>>(be: &B, seed: u64) -> Outputs {
    let mut g = Gen { be, rng: ChaCha8Rng::seed_from_u64(seed) };
    let mut out = Outputs::new();
    let o = &mut out;

    // ---- moves and elementwise ----
    let mut x = g.buf(37, BF);
    be.fill(&mut x, 0.3).unwrap();
    record(o, be, "fill", &[&x]);
    let data = g.vec(11, 3.0);
    be.write(&mut x, 5, &data).unwrap();
    record(o, be, "write", &[&x]);
    for (dd, sd) in [(BF, BF), (F, BF), (BF, F)] {
        let (mut dst, src) = (g.buf(40, dd), g.buf(30, sd));
        be.copy(&mut dst, 3, &src, 2, 20).unwrap();
        record(o, be, &format!("copy {sd}->{dd}"), &[&dst]);
    }
    for (ad, xd) in [(BF, BF), (F, BF), (BF, F)] {
        let (mut acc, x) = (g.buf(50, ad), g.buf(50, xd));
        be.add_assign(&mut acc, &x).unwrap();
        record(o, be, "add_assign", &[&acc]);
    }
    let (mut sum, a, b) = (g.buf(50, BF), g.buf(50, BF), g.buf(50, F));
    be.add(&mut sum, &a, &b).unwrap();
    record(o, be, "add", &[&sum]);
    let mut x = g.buf(50, BF);
    be.scale(&mut x, 0.37).unwrap();
    record(o, be, "scale", &[&x]);
    let x = g.buf(1000, BF);
    let ss = be.sum_squares(&x).unwrap();
    o.push(("sum_squares".into(), vec![(ss.to_bits() >> 32) as u32, ss.to_bits() as u32]));
    let (mut rows, row) = (g.buf(4 * 15, BF), g.buf(20, BF));
    be.add_broadcast_rows(&mut rows, &row, 15).unwrap();
    record(o, be, "add_broadcast_rows", &[&rows]);
    let (mut acc, x) = (g.buf(15, F), g.buf(4 * 15, BF));
    be.sum_broadcast_rows(&mut acc, &x, 15).unwrap();
    record(o, be, "sum_broadcast_rows", &[&acc]);

    // ---- matmul: every transpose, overwrite and accumulate, bf16 and mixed outputs ----
    let (m, n, k) = (9, 13, 21);
    for (trans_a, trans_b, accumulate, od, ad, bd) in [
        (false, false, false, BF, BF, BF),
        (false, true, true, BF, BF, BF),
        (true, false, true, F, BF, BF),
        (true, true, false, F, BF, F),
        (false, false, true, BF, F, F),
    ] {
        let spec = MatmulSpec { m, n, k, trans_a, trans_b, accumulate };
        let (mut c, a, b) = (g.buf(m * n, od), g.buf(m * k, ad), g.buf(k * n, bd));
        be.matmul(&mut c, &a, &b, spec).unwrap();
        record(o, be, &format!("matmul {spec:?} {ad}x{bd}->{od}"), &[&c]);
    }

    // ---- layernorm, fused and sharded ----
    let (r, d) = (7, 24);
    let (mut y, x, scale, bias) = (g.buf(r * d, BF), g.buf(r * d, BF), g.buf(d, F), g.buf(d, F));
    let (mut mean, mut rstd) = (g.buf(r, F), g.buf(r, F));
    be.layernorm_forward(&mut y, &mut mean, &mut rstd, &x, Some(&scale), &bias, d).unwrap();
    record(o, be, "layernorm_forward", &[&y, &mean, &rstd]);
    for accumulate_dx in [false, true] {
        let (mut dx, mut dscale, mut dbias, dout) = (g.buf(r * d, BF), g.buf(d, F), g.buf(d, F), g.buf(r * d, BF));
        be.layernorm_backward(
            &mut dx,
            Some(&mut dscale),
            &mut dbias,
            &dout,
            &x,
            &mean,
            &rstd,
            Some(&scale),
            d,
            accumulate_dx,
        )
        .unwrap();
        record(o, be, "layernorm_backward", &[&dx, &dscale, &dbias]);
    }
    let (mut sums, center) = (g.buf(r, F), g.buf(r, F));
    be.layernorm_row_sums(&mut sums, &x, Some(&center), d).unwrap();
    record(o, be, "layernorm_row_sums", &[&sums]);
    be.layernorm_finish_stats(&mut sums, 2 * d, true).unwrap();
    record(o, be, "layernorm_finish_stats", &[&sums]);
    let (m_, rs) = (g.buf(r, F), g.positive(r));
    let mut y = g.buf(r * d, BF);
    be.layernorm_apply(&mut y, &x, &m_, &rs, None, &bias, d).unwrap();
    record(o, be, "layernorm_apply", &[&y]);
    let (mut sums2, dout) = (g.buf(2 * r, F), g.buf(r * d, BF));
    be.layernorm_backward_row_sums(&mut sums2, &dout, &x, &m_, &rs, Some(&scale), d).unwrap();
    record(o, be, "layernorm_backward_row_sums", &[&sums2]);
    let (mut dx, mut dbias) = (g.buf(r * d, BF), g.buf(d, F));
    be.layernorm_backward_apply(&mut dx, None, &mut dbias, &dout, &x, &m_, &rs, None, &sums2, d, 2 * d, true).unwrap();
    record(o, be, "layernorm_backward_apply", &[&dx, &dbias]);

    // ---- GELU-GLU ----
    let (mut h, a, b) = (g.buf(60, BF), g.buf(60, BF), g.buf(60, BF));
    be.gelu_glu_forward(&mut h, &a, &b).unwrap();
    record(o, be, "gelu_glu_forward", &[&h]);
    let (mut da, mut db, dout) = (g.buf(60, BF), g.buf(60, F), g.buf(60, BF));
    be.gelu_glu_backward(&mut da, &mut db, &dout, &a, &b).unwrap();
    record(o, be, "gelu_glu_backward", &[&da, &db]);

    // ---- embeddings (ids partly outside this shard's range) ----
    let (range, dim, tokens) = (VocabRange { start: 4, end: 14 }, 8, 12);
    let ids = g.ids(tokens, 18);
    let (mut e, table) = (g.buf(tokens * dim, BF), g.buf(10 * dim, BF));
    be.embedding_forward(&mut e, &table, &ids, range, dim).unwrap();
    record(o, be, "embedding_forward", &[&e]);
    let (mut dtable, dout) = (g.buf(10 * dim, F), g.buf(tokens * dim, BF));
    be.embedding_backward(&mut dtable, &dout, &ids, range, dim).unwrap();
    record(o, be, "embedding_backward", &[&dtable]);

    // ---- attention (masked cross-attention and causal self-attention) ----
    for (s, masked) in [
        (AttentionShape { batch: 2, q_len: 5, kv_len: 7, heads: 2, head_dim: 4, causal: false }, true),
        (AttentionShape { batch: 1, q_len: 6, kv_len: 6, heads: 3, head_dim: 4, causal: true }, false),
    ] {
        let w = s.width();
        let (q, kk, v) =
            (g.buf(s.batch * s.q_len * w, BF), g.buf(s.batch * s.kv_len * w, BF), g.buf(s.batch * s.kv_len * w, BF));
        let mask = masked.then(|| g.ids(s.batch * s.kv_len, 2));
        let (mut att, mut lse) = (g.buf(q.len(), BF), g.buf(s.lse_len(), F));
        be.attention_forward(&mut att, &mut lse, &q, &kk, &v, mask.as_ref(), s).unwrap();
        record(o, be, "attention_forward", &[&att, &lse]);
        let (mut dq, mut dk, mut dv, dout) =
            (g.buf(q.len(), BF), g.buf(kk.len(), BF), g.buf(v.len(), F), g.buf(q.len(), BF));
        be.attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &kk, &v, &att, &lse, mask.as_ref(), s).unwrap();
        record(o, be, "attention_backward", &[&dq, &dk, &dv]);
    }

    // ---- cross-entropy, fused and vocab-parallel ----
    let (rows, classes) = (6, 10);
    let targets = g.ids(rows, classes as i32);
    let (mut logits, mut losses) = (g.buf(rows * classes, BF), g.buf(rows, F));
    be.cross_entropy_fused(&mut logits, &mut losses, &targets, classes, 0.25).unwrap();
    record(o, be, "cross_entropy_fused", &[&logits, &losses]);
    let (cols, valid, start) = (8, 7, 3);
    let logits = g.buf(rows * cols, BF);
    let mut row_max = g.buf(rows, F);
    be.vocab_parallel_max(&mut row_max, &logits, cols, valid).unwrap();
    record(o, be, "vocab_parallel_max", &[&row_max]);
    let mut stats = g.buf(2 * rows, F);
    be.vocab_parallel_sums(&mut stats, &logits, &row_max, &targets, cols, valid, start).unwrap();
    record(o, be, "vocab_parallel_sums", &[&stats]);
    let (mut grad, mut losses) = (g.buf(rows * cols, BF), g.buf(rows, F));
    be.vocab_parallel_grad(&mut grad, &mut losses, &row_max, &stats, &targets, cols, valid, start, 0.5).unwrap();
    record(o, be, "vocab_parallel_grad", &[&grad, &losses]);

    // ---- AdamW (f32 only: the adapter must pass it through untouched) ----
    let (mut p, gr, mut m1, mut v1) = (g.buf(40, F), g.buf(40, F), g.buf(40, F), g.positive(40));
    let step = AdamWStep { lr: 1e-2, b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5 };
    be.adamw(&mut p, &gr, &mut m1, &mut v1, &step).unwrap();
    record(o, be, "adamw", &[&p, &m1, &v1]);
    out
}

#[test]
fn staged_ops_equal_the_native_bf16_ops_bit_for_bit() {
    for seed in [11, 12, 13] {
        let native = run_every_op(&CpuBackend::new(), seed);
        let staged = run_every_op(&Bf16Staged(CpuBackend::new()), seed);
        assert_eq!(native.len(), staged.len());
        for ((name, want), (_, got)) in native.iter().zip(&staged) {
            let first_diff = want.iter().zip(got).position(|(w, g)| w != g);
            assert!(first_diff.is_none() && want.len() == got.len(), "seed {seed}: {name} differs at {first_diff:?}");
        }
        // The outputs are not all trivial (a run that wrote nothing would also compare equal).
        assert!(native.iter().filter(|(_, v)| v.iter().any(|&b| b != 0)).count() > native.len() * 9 / 10);
    }
}

#[test]
fn staging_is_tracked_and_freed() {
    let be = CpuBackend::new();
    let staged = Bf16Staged(be.clone());
    let (mut out, a, b) =
        (be.zeros_typed("o", 64, BF).unwrap(), be.zeros_typed("a", 64, BF).unwrap(), be.zeros("b", 64).unwrap());
    let before = be.memory().report();
    staged.add(&mut out, &a, &b).unwrap();
    let after = be.memory().report();
    assert_eq!(after.current_bytes, before.current_bytes, "staging freed after the op");
    // Two bf16 buffers staged as f32 (64·4 bytes each) on top of what was live.
    assert_eq!(after.peak_bytes, before.current_bytes + 2 * 64 * 4, "{STAGING_NAME}: {after:?}");
}

#[test]
fn an_op_left_with_a_bf16_buffer_is_refused() {
    use dm_runtime::bf16_staging::require_f32;
    use dm_runtime::ops::{elementwise::Scale, Op};
    let be = CpuBackend::new();
    let mut x = be.zeros_typed("x", 4, BF).unwrap();
    let err = require_f32::<CpuBuf, CpuIds>(Op::Scale(Scale { x: &mut x, s: 2.0 })).err().expect("bf16 refused");
    assert!(err.to_string().contains("1 bf16 buffer"), "{err}");
    let mut y = be.zeros("y", 4).unwrap();
    assert!(require_f32::<CpuBuf, CpuIds>(Op::Scale(Scale { x: &mut y, s: 2.0 })).is_ok());
}
