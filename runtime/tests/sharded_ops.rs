//! The tensor-parallel forms of LayerNorm and cross-entropy, run shard by shard with the
//! all-reduces done by hand, must equal the fused single-device ops.

use dm_runtime::cpu::{CpuBackend, CpuBuf};
use dm_runtime::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale).collect()
}

fn cols(x: &[f32], rows: usize, dim: usize, lo: usize, hi: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| x[r * dim + lo..r * dim + hi].to_vec()).collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let m = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f32, |e, (x, y)| e.max((x - y).abs())) / m
}

fn sum_into(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

#[test]
fn sharded_layernorm_equals_the_fused_op() {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let (rows, dim) = (37, 30);
    let shards = [(0, 7), (7, 19), (19, 30)];
    let x = rand_vec(&mut rng, rows * dim, 3.0);
    let dout = rand_vec(&mut rng, rows * dim, 1.0);
    let scale = rand_vec(&mut rng, dim, 1.5);
    let bias = rand_vec(&mut rng, dim, 0.5);
    for with_scale in [false, true] {
        // Fused reference.
        let (xb, bb, sb) =
            (be.upload("x", &x).unwrap(), be.upload("b", &bias).unwrap(), be.upload("s", &scale).unwrap());
        let sref = with_scale.then_some(&sb);
        let (mut out, mut mean, mut rstd) =
            (be.zeros("o", rows * dim).unwrap(), be.zeros("m", rows).unwrap(), be.zeros("r", rows).unwrap());
        be.layernorm_forward(&mut out, &mut mean, &mut rstd, &xb, sref, &bb, dim).unwrap();
        let g = be.upload("g", &dout).unwrap();
        let (mut dx, mut ds, mut db) =
            (be.zeros("dx", rows * dim).unwrap(), be.zeros("ds", dim).unwrap(), be.zeros("db", dim).unwrap());
        be.layernorm_backward(&mut dx, with_scale.then_some(&mut ds), &mut db, &g, &xb, &mean, &rstd, sref, dim, false)
            .unwrap();

        // Sharded: local row sums, "all-reduce" by hand, finish, apply.
        let up = |v: Vec<f32>| be.upload("shard", &v).unwrap();
        let parts: Vec<(CpuBuf, CpuBuf, CpuBuf, CpuBuf, usize)> = shards
            .iter()
            .map(|&(lo, hi)| {
                (
                    up(cols(&x, rows, dim, lo, hi)),
                    up(cols(&dout, rows, dim, lo, hi)),
                    up(scale[lo..hi].to_vec()),
                    up(bias[lo..hi].to_vec()),
                    hi - lo,
                )
            })
            .collect();
        let mut mean_s = vec![0.0; rows];
        for (xs, _, _, _, w) in &parts {
            let mut s = be.zeros("sum", rows).unwrap();
            be.layernorm_row_sums(&mut s, xs, None, *w).unwrap();
            sum_into(&mut mean_s, s.as_slice());
        }
        let mut mean_b = up(mean_s);
        be.layernorm_finish_stats(&mut mean_b, dim, false).unwrap();
        let mut var_s = vec![0.0; rows];
        for (xs, _, _, _, w) in &parts {
            let mut s = be.zeros("sq", rows).unwrap();
            be.layernorm_row_sums(&mut s, xs, Some(&mean_b), *w).unwrap();
            sum_into(&mut var_s, s.as_slice());
        }
        let mut rstd_b = up(var_s);
        be.layernorm_finish_stats(&mut rstd_b, dim, true).unwrap();
        assert!(max_rel(mean_b.as_slice(), mean.as_slice()) < 1e-5);
        assert!(max_rel(rstd_b.as_slice(), rstd.as_slice()) < 1e-5);
        let mut bsums = vec![0.0; 2 * rows];
        for (xs, gs, ss, _, w) in &parts {
            let mut s = be.zeros("bs", 2 * rows).unwrap();
            be.layernorm_backward_row_sums(&mut s, gs, xs, &mean_b, &rstd_b, with_scale.then_some(ss), *w).unwrap();
            sum_into(&mut bsums, s.as_slice());
        }
        let bsums = up(bsums);
        for ((xs, gs, ss, bs, w), &(lo, hi)) in parts.iter().zip(&shards) {
            let mut o = be.zeros("o", rows * w).unwrap();
            be.layernorm_apply(&mut o, xs, &mean_b, &rstd_b, with_scale.then_some(ss), bs, *w).unwrap();
            assert!(max_rel(o.as_slice(), &cols(out.as_slice(), rows, dim, lo, hi)) < 1e-5);
            let (mut dxs, mut dss, mut dbs) =
                (be.zeros("dx", rows * w).unwrap(), be.zeros("ds", *w).unwrap(), be.zeros("db", *w).unwrap());
            be.layernorm_backward_apply(
                &mut dxs,
                with_scale.then_some(&mut dss),
                &mut dbs,
                gs,
                xs,
                &mean_b,
                &rstd_b,
                with_scale.then_some(ss),
                &bsums,
                *w,
                dim,
                false,
            )
            .unwrap();
            assert!(max_rel(dxs.as_slice(), &cols(dx.as_slice(), rows, dim, lo, hi)) < 1e-4, "dx");
            assert!(max_rel(dbs.as_slice(), &db.as_slice()[lo..hi]) < 1e-5, "dbias");
            if with_scale {
                assert!(max_rel(dss.as_slice(), &ds.as_slice()[lo..hi]) < 1e-4, "dscale");
            }
        }
    }
}

#[test]
fn vocab_parallel_cross_entropy_equals_the_fused_op_and_ignores_padding() {
    let be = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let (rows, classes, tp): (usize, usize, usize) = (23, 101, 3);
    let local = classes.div_ceil(tp); // 34 columns per rank, the last rank has 33 valid + 1 padding
    let logits = rand_vec(&mut rng, rows * classes, 6.0);
    let targets: Vec<i32> = (0..rows).map(|_| rng.random_range(0..classes as i32)).collect();
    let grad_scale = 0.37;
    let ids = be.upload_ids("t", &targets).unwrap();
    let mut full = be.upload("l", &logits).unwrap();
    let mut losses = be.zeros("loss", rows).unwrap();
    be.cross_entropy_fused(&mut full, &mut losses, &ids, classes, grad_scale).unwrap();

    // Each rank's padded shard; padding columns hold a huge value that must never win.
    let shard = |r: usize| -> (Vec<f32>, usize) {
        let (lo, hi) = (r * local, ((r + 1) * local).min(classes));
        let mut v = Vec::with_capacity(rows * local);
        for row in 0..rows {
            v.extend_from_slice(&logits[row * classes + lo..row * classes + hi]);
            v.extend(std::iter::repeat_n(1e4, local - (hi - lo)));
        }
        (v, hi - lo)
    };
    let mut shards: Vec<(CpuBuf, usize)> = (0..tp)
        .map(|r| {
            let (v, n) = shard(r);
            (be.upload("s", &v).unwrap(), n)
        })
        .collect();
    let mut gmax = vec![f32::NEG_INFINITY; rows];
    for (s, valid) in &shards {
        let mut m = be.zeros("m", rows).unwrap();
        be.vocab_parallel_max(&mut m, s, local, *valid).unwrap();
        gmax.iter_mut().zip(m.as_slice()).for_each(|(a, b)| *a = a.max(*b));
    }
    let gmax = be.upload("gm", &gmax).unwrap();
    let mut stats = vec![0.0; 2 * rows];
    for (r, (s, valid)) in shards.iter().enumerate() {
        let mut st = be.zeros("st", 2 * rows).unwrap();
        be.vocab_parallel_sums(&mut st, s, &gmax, &ids, local, *valid, r * local).unwrap();
        sum_into(&mut stats, st.as_slice());
    }
    let stats = be.upload("stats", &stats).unwrap();
    for (r, (s, valid)) in shards.iter_mut().enumerate() {
        let mut l = be.zeros("l", rows).unwrap();
        be.vocab_parallel_grad(s, &mut l, &gmax, &stats, &ids, local, *valid, r * local, grad_scale).unwrap();
        assert!(max_rel(l.as_slice(), losses.as_slice()) < 1e-5, "losses on rank {r}");
        for row in 0..rows {
            let got = &s.as_slice()[row * local..(row + 1) * local];
            let want = &full.as_slice()[row * classes + r * local..row * classes + r * local + *valid];
            assert!(max_rel(&got[..*valid], want) < 1e-5, "gradient row {row} rank {r}");
            assert!(got[*valid..].iter().all(|&g| g == 0.0), "padding gets no gradient");
        }
    }
}
