//! The tensor-parallel linears and region operators: a Megatron MLP `y = (x · W1) · W2` with W1
//! column-parallel and W2 row-parallel, on tp = 2 and tp = 3 thread ranks, equals the one-device
//! [`Linear`] forward and backward up to floating-point reordering (inputs from a seeded
//! generator; each rank checks its own weight-gradient shards).

use std::sync::Arc;

use dm_parallel::layers::{self, ColumnParallelLinear, GradMode, Linear, RowParallelLinear, TpGroup};
use dm_parallel::{run_ranks, Communicator, Mesh};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;

const ROWS: usize = 5;
const INPUTS: usize = 7;
const HIDDEN: usize = 12;
const OUTPUTS: usize = 4;

/// Values in [-1, 1) from a splitmix64 stream.
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Columns `cols` of a row-major `[rows, width]` matrix.
fn columns(m: &[f32], width: usize, cols: std::ops::Range<usize>) -> Vec<f32> {
    m.chunks(width).flat_map(|row| row[cols.clone()].to_vec()).collect()
}

struct Mlp {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw1: Vec<f32>,
    dw2: Vec<f32>,
}

/// Forward and backward of the MLP: on one device when `tp` is `None`, else this rank's shard
/// (`w1`, `w2` are then this rank's slices, `hidden` its width).
fn mlp(
    be: &CpuBackend,
    tp: Option<&TpGroup<CpuBackend>>,
    (x, w1, w2, dy): (&[f32], &[f32], &[f32], &[f32]),
    hidden: usize,
) -> Mlp {
    let up = |v: &[f32]| be.upload("t", v).unwrap();
    let (x, w1, w2, dy) = (up(x), up(w1), up(w2), up(dy));
    let zeros = |n: usize| be.zeros("t", n).unwrap();
    let (mut h, mut y) = (zeros(ROWS * hidden), zeros(ROWS * OUTPUTS));
    let col = ColumnParallelLinear { rows: ROWS, inputs: INPUTS, outputs_local: hidden };
    let row = RowParallelLinear { rows: ROWS, inputs_local: hidden, outputs: OUTPUTS };
    col.forward(be, &mut h, layers::region_entry_forward::<CpuBackend>(&x), &w1).unwrap();
    row.forward(be, tp, &mut y, &h, &w2).unwrap();
    let (mut dh, mut dx, mut dw1, mut dw2) =
        (zeros(ROWS * hidden), zeros(ROWS * INPUTS), zeros(INPUTS * hidden), zeros(hidden * OUTPUTS));
    row.backward(be, &mut dw2, &mut dh, &h, &dy, &w2).unwrap();
    col.backward(be, &mut dw1, &mut dx, &x, &dh, &w1, GradMode::Overwrite).unwrap();
    layers::region_entry_backward(tp, &mut dx).unwrap();
    let down = |b| be.download(b).unwrap();
    Mlp { y: down(&y), dx: down(&dx), dw1: down(&dw1), dw2: down(&dw2) }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    // Sums of at most 12 products of values below 1 in magnitude: reordering costs a few ulps of
    // numbers below ~12.
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn column_then_row_parallel_equals_one_device_forward_and_backward() {
    let (x, w1, w2, dy) =
        (values(1, ROWS * INPUTS), values(2, INPUTS * HIDDEN), values(3, HIDDEN * OUTPUTS), values(4, ROWS * OUTPUTS));
    let be = CpuBackend::new();
    let full = mlp(&be, None, (&x, &w1, &w2, &dy), HIDDEN);
    for tp in [2, 3] {
        let mesh = Mesh::new(tp, 1).unwrap();
        let shard = HIDDEN / tp;
        let results = run_ranks(&mesh, |rank, comms| -> Result<Mlp, String> {
            let be = CpuBackend::new();
            let comm: Arc<dyn Communicator<CpuBackend>> = Arc::new(comms.tp);
            let group = TpGroup { rank, size: tp, comm };
            let cols = rank * shard..(rank + 1) * shard;
            let w1_local = columns(&w1, HIDDEN, cols.clone());
            let w2_local = w2[cols.start * OUTPUTS..cols.end * OUTPUTS].to_vec();
            Ok(mlp(&be, Some(&group), (&x, &w1_local, &w2_local, &dy), shard))
        })
        .unwrap();
        for (rank, r) in results.iter().enumerate() {
            let cols = rank * shard..(rank + 1) * shard;
            let what = |t: &str| format!("tp {tp} rank {rank}: {t}");
            assert_close(&r.y, &full.y, &what("y"));
            assert_close(&r.dx, &full.dx, &what("dx"));
            assert_close(&r.dw1, &columns(&full.dw1, HIDDEN, cols.clone()), &what("dW1"));
            assert_close(&r.dw2, &full.dw2[cols.start * OUTPUTS..cols.end * OUTPUTS], &what("dW2"));
        }
    }
}

#[test]
fn without_the_region_collectives_the_shards_are_partial() {
    // The test above can fail: skipping the exit all-reduce leaves each rank with a partial y.
    let (x, w1, w2) = (values(5, ROWS * INPUTS), values(6, INPUTS * HIDDEN), values(7, HIDDEN * OUTPUTS));
    let be = CpuBackend::new();
    let up = |v: &[f32]| be.upload("t", v).unwrap();
    let (xb, w1b, w2b) = (up(&x), up(&w1), up(&w2));
    let (mut h, mut y) = (be.zeros("h", ROWS * HIDDEN).unwrap(), be.zeros("y", ROWS * OUTPUTS).unwrap());
    Linear { rows: ROWS, inputs: INPUTS, outputs: HIDDEN }.forward(&be, &mut h, &xb, &w1b).unwrap();
    Linear { rows: ROWS, inputs: HIDDEN, outputs: OUTPUTS }.forward(&be, &mut y, &h, &w2b).unwrap();
    let full = be.download(&y).unwrap();
    let shard = HIDDEN / 2;
    let w1_local = columns(&w1, HIDDEN, 0..shard);
    let w2_local = w2[..shard * OUTPUTS].to_vec();
    let (mut hl, mut yl) = (be.zeros("h", ROWS * shard).unwrap(), be.zeros("y", ROWS * OUTPUTS).unwrap());
    ColumnParallelLinear { rows: ROWS, inputs: INPUTS, outputs_local: shard }
        .forward(&be, &mut hl, &xb, &up(&w1_local))
        .unwrap();
    RowParallelLinear { rows: ROWS, inputs_local: shard, outputs: OUTPUTS }
        .forward(&be, None, &mut yl, &hl, &up(&w2_local))
        .unwrap();
    let partial = be.download(&yl).unwrap();
    assert!(partial.iter().zip(&full).any(|(p, f)| (p - f).abs() > 1e-3));
}
