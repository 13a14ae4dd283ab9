//! Every collective of ThreadComm (and SoloComm) against a serial reference.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dm_parallel::{
    run_ranks, CollectiveKind, CommError, CommStats, Communicator, Mesh, OpStats, ReduceOp, SoloComm, ThreadComm,
};
use dm_runtime::cpu::{CpuBackend, CpuBuf};
use dm_runtime::Backend;

const SIZES: [usize; 4] = [1, 2, 3, 4];
const LENS: [usize; 5] = [0, 1, 7, 13, 129];
const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

/// Values of mixed sign and magnitude, so that summation order changes the rounding.
fn value(rank: usize, i: usize) -> f32 {
    let base = ((i as f32) * 0.37 + rank as f32 * 1.1).sin() * (rank as f32 + 1.3).powi(3);
    base * 10f32.powi((i % 7) as i32 - 3)
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i)).collect()
}

/// The serial reference: ranks combined strictly in rank order.
fn reference(inputs: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let mut acc = inputs[0].clone();
    for x in &inputs[1..] {
        for (a, &b) in acc.iter_mut().zip(x) {
            *a = match op {
                ReduceOp::Sum | ReduceOp::Avg => *a + b,
                ReduceOp::Max => {
                    if b > *a {
                        b
                    } else {
                        *a
                    }
                }
            };
        }
    }
    if op == ReduceOp::Avg {
        acc.iter_mut().for_each(|a| *a /= inputs.len() as f32);
    }
    acc
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `f(comm)` on one thread per rank of a fresh group; returns the per-rank results.
fn on_group<T: Send>(size: usize, f: impl Fn(&ThreadComm) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group_with_timeout(size, Duration::from_secs(30));
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(&c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_reduce_matches_serial_reference() {
    for size in SIZES {
        for len in LENS {
            for op in OPS {
                let inputs: Vec<_> = (0..size).map(|r| input(r, len)).collect();
                let want = reference(&inputs, op);
                let got = on_group(size, |c| {
                    let mut buf = input(c.rank(), len);
                    c.all_reduce_slice(&mut buf, op).unwrap();
                    buf
                });
                for (r, g) in got.iter().enumerate() {
                    assert_eq!(bits(g), bits(&want), "size {size} len {len} {op:?} rank {r}");
                }
            }
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for size in SIZES {
        for len in LENS {
            let want: Vec<f32> = (0..size).flat_map(|r| input(r, len)).collect();
            let got = on_group(size, |c| {
                let mut recv = vec![f32::NAN; size * len];
                c.all_gather_slice(&input(c.rank(), len), &mut recv).unwrap();
                recv
            });
            for g in &got {
                assert_eq!(bits(g), bits(&want), "size {size} len {len}");
            }
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_reduced_chunk() {
    for size in SIZES {
        for n in [0, 1, 3, 5, 33] {
            for op in OPS {
                let inputs: Vec<_> = (0..size).map(|r| input(r, size * n)).collect();
                let full = reference(&inputs, op);
                let got = on_group(size, |c| {
                    let mut recv = vec![f32::NAN; n];
                    c.reduce_scatter_slice(&input(c.rank(), size * n), &mut recv, op).unwrap();
                    recv
                });
                for (r, g) in got.iter().enumerate() {
                    assert_eq!(bits(g), bits(&full[r * n..(r + 1) * n]), "size {size} n {n} {op:?} rank {r}");
                }
            }
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for size in SIZES {
        for len in [1, 7, 13] {
            for root in 0..size {
                let got = on_group(size, |c| {
                    let mut buf = input(c.rank(), len);
                    c.broadcast_slice(&mut buf, root).unwrap();
                    buf
                });
                for g in &got {
                    assert_eq!(bits(g), bits(&input(root, len)), "size {size} len {len} root {root}");
                }
            }
        }
    }
}

#[test]
fn results_are_bit_identical_whatever_the_arrival_order() {
    let size = 4;
    let len = 1001;
    let inputs: Vec<_> = (0..size).map(|r| input(r, len)).collect();
    // The inputs are chosen so that summation order shows in the bits (else this test proves nothing).
    let reversed: Vec<_> = inputs.iter().rev().cloned().collect();
    assert_ne!(bits(&reference(&inputs, ReduceOp::Sum)), bits(&reference(&reversed, ReduceOp::Sum)));
    for op in OPS {
        let want = reference(&inputs, op);
        // Reverse and then shuffled arrival orders.
        for delays in [[30u64, 20, 10, 0], [10, 0, 30, 20]] {
            let got = on_group(size, |c| {
                std::thread::sleep(Duration::from_millis(delays[c.rank()]));
                let mut buf = input(c.rank(), len);
                c.all_reduce_slice(&mut buf, op).unwrap();
                buf
            });
            for g in &got {
                assert_eq!(bits(g), bits(&want), "{op:?} delays {delays:?}");
            }
        }
    }
}

#[test]
fn max_propagates_nan() {
    let got = on_group(3, |c| {
        let mut buf = vec![c.rank() as f32, if c.rank() == 1 { f32::NAN } else { 1.0 }];
        c.all_reduce_slice(&mut buf, ReduceOp::Max).unwrap();
        buf
    });
    for g in got {
        assert_eq!(g[0], 2.0);
        assert!(g[1].is_nan());
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    for size in SIZES {
        let entered = AtomicUsize::new(0);
        on_group(size, |c| {
            std::thread::sleep(Duration::from_millis(15 * c.rank() as u64));
            entered.fetch_add(1, Ordering::SeqCst);
            c.barrier().unwrap();
            assert_eq!(entered.load(Ordering::SeqCst), size, "a rank left the barrier early");
            c.barrier().unwrap();
        });
    }
}

#[test]
fn many_back_to_back_rounds_stay_in_step() {
    let size = 4;
    let got = on_group(size, |c| {
        let mut checks = 0.0f64;
        for step in 0..300 {
            match step % 4 {
                0 => {
                    let mut b = vec![(c.rank() + step) as f32; 3];
                    c.all_reduce_slice(&mut b, ReduceOp::Sum).unwrap();
                    assert_eq!(b[0], (6 + 4 * step) as f32);
                    checks += b[0] as f64;
                }
                1 => {
                    let mut r = vec![0.0; size];
                    c.all_gather_slice(&[c.rank() as f32], &mut r).unwrap();
                    assert_eq!(r, vec![0.0, 1.0, 2.0, 3.0]);
                }
                2 => {
                    let mut b = vec![c.rank() as f32];
                    c.broadcast_slice(&mut b, step % size).unwrap();
                    assert_eq!(b[0], (step % size) as f32);
                }
                _ => c.barrier().unwrap(),
            }
        }
        checks
    });
    assert!(got.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn mesh_2x2_subgroups_reduce_only_within_their_group() {
    let mesh = Mesh::new(2, 2).unwrap();
    let out = run_ranks(&mesh, |rank, comms| -> Result<_, CommError> {
        let (d, t) = mesh.coords(rank);
        assert_eq!((comms.world.rank(), comms.world.size()), (rank, 4));
        assert_eq!((comms.tp.rank(), comms.tp.size()), (t, 2));
        assert_eq!((comms.dp.rank(), comms.dp.size()), (d, 2));
        assert_eq!(comms.tp.world_rank(), rank);
        assert_eq!(comms.dp.world_rank(), rank);
        let x = (10 * rank + 1) as f32;
        let mut tp = [x];
        comms.tp.all_reduce_slice(&mut tp, ReduceOp::Sum)?;
        let mut dp = [x];
        comms.dp.all_reduce_slice(&mut dp, ReduceOp::Sum)?;
        let mut world = [x];
        comms.world.all_reduce_slice(&mut world, ReduceOp::Sum)?;
        let mut tp_members = [0.0; 2];
        comms.tp.all_gather_slice(&[rank as f32], &mut tp_members)?;
        let mut dp_members = [0.0; 2];
        comms.dp.all_gather_slice(&[rank as f32], &mut dp_members)?;
        Ok((tp[0], dp[0], world[0], tp_members, dp_members))
    })
    .unwrap();
    let x = |r: usize| (10 * r + 1) as f32;
    for (rank, (tp, dp, world, tpm, dpm)) in out.into_iter().enumerate() {
        let tp_group = mesh.tp_group(rank);
        let dp_group = mesh.dp_group(rank);
        assert_eq!(tp, tp_group.iter().map(|&r| x(r)).sum::<f32>(), "rank {rank}");
        assert_eq!(dp, dp_group.iter().map(|&r| x(r)).sum::<f32>(), "rank {rank}");
        assert_eq!(world, (0..4).map(x).sum::<f32>());
        assert_eq!(tpm.to_vec(), tp_group.iter().map(|&r| r as f32).collect::<Vec<_>>());
        assert_eq!(dpm.to_vec(), dp_group.iter().map(|&r| r as f32).collect::<Vec<_>>());
    }
}

#[test]
fn stats_count_calls_and_contributed_bytes() {
    let got = on_group(3, |c| {
        let mut b = vec![1.0; 5];
        c.all_reduce_slice(&mut b, ReduceOp::Sum).unwrap();
        c.all_reduce_slice(&mut b, ReduceOp::Max).unwrap();
        let mut recv = vec![0.0; 12];
        c.all_gather_slice(&[0.0; 4], &mut recv).unwrap();
        let mut small = vec![0.0; 2];
        c.reduce_scatter_slice(&[1.0; 6], &mut small, ReduceOp::Avg).unwrap();
        let mut bc = vec![0.0; 3];
        c.broadcast_slice(&mut bc, 2).unwrap();
        c.barrier().unwrap();
        // A failed call (mismatched lengths) is not counted.
        let mut bad = vec![0.0; 1 + c.rank()];
        assert!(c.all_reduce_slice(&mut bad, ReduceOp::Sum).is_err());
        c.stats()
    });
    let want = CommStats {
        all_reduce: OpStats { calls: 2, bytes: 2 * 5 * 4 },
        all_gather: OpStats { calls: 1, bytes: 4 * 4 },
        reduce_scatter: OpStats { calls: 1, bytes: 6 * 4 },
        broadcast: OpStats { calls: 1, bytes: 3 * 4 },
        barrier: OpStats { calls: 1, bytes: 0 },
    };
    for s in got {
        assert_eq!(s, want);
        assert_eq!(s.total_calls(), 6);
        assert_eq!(s.total_bytes(), 40 + 16 + 24 + 12);
        assert_eq!(s.get(CollectiveKind::AllGather).bytes, 16);
        assert_eq!(s.merged(&s).all_reduce, OpStats { calls: 4, bytes: 80 });
    }
}

#[test]
fn mismatched_calls_fail_on_every_rank_and_the_group_recovers() {
    // Different lengths.
    let errs = on_group(3, |c| {
        let mut b = vec![0.0; if c.rank() == 2 { 4 } else { 3 }];
        let e = c.all_reduce_slice(&mut b, ReduceOp::Sum).unwrap_err();
        // The round completed, so the group is still in step.
        let mut ok = vec![1.0];
        c.all_reduce_slice(&mut ok, ReduceOp::Sum).unwrap();
        assert_eq!(ok[0], 3.0);
        e
    });
    for e in &errs {
        match e {
            CommError::Mismatch { op, detail } => {
                assert_eq!(*op, "all_reduce");
                assert!(detail.contains("rank 0 passed 3 elements but rank 2 passed 4"), "{detail}");
            }
            other => panic!("expected Mismatch, got {other:?}"),
        }
        assert!(e.to_string().contains("same lengths"), "{e}");
    }
    // Different collectives.
    let errs = on_group(2, |c| {
        if c.rank() == 0 {
            c.barrier().unwrap_err()
        } else {
            c.broadcast_slice(&mut [0.0], 0).unwrap_err()
        }
    });
    for e in errs {
        assert!(
            matches!(&e, CommError::Mismatch { detail, .. } if detail.contains("rank 0 called barrier but rank 1 called broadcast")),
            "{e:?}"
        );
    }
    // Different reduce ops.
    let errs = on_group(2, |c| {
        let op = if c.rank() == 0 { ReduceOp::Sum } else { ReduceOp::Max };
        c.all_reduce_slice(&mut [0.0], op).unwrap_err()
    });
    for e in errs {
        assert!(matches!(&e, CommError::Mismatch { detail, .. } if detail.contains("with max")), "{e:?}");
    }
    // Different broadcast roots and an invalid root.
    let errs = on_group(2, |c| c.broadcast_slice(&mut [0.0], c.rank()).unwrap_err());
    assert!(errs.iter().all(|e| matches!(e, CommError::Mismatch { .. })));
    let errs = on_group(2, |c| c.broadcast_slice(&mut [0.0], 5).unwrap_err());
    assert!(errs.iter().all(|e| *e == CommError::InvalidRoot { root: 5, size: 2 }));
    // Wrong receive buffers.
    let errs = on_group(2, |c| {
        let mut recv = vec![0.0; if c.rank() == 1 { 5 } else { 6 }];
        c.all_gather_slice(&[0.0; 3], &mut recv).unwrap_err()
    });
    assert!(errs.iter().all(|e| matches!(e, CommError::Shape { op: "all_gather", rank: 1, .. })), "{errs:?}");
    let errs = on_group(2, |c| c.reduce_scatter_slice(&[0.0; 5], &mut [0.0; 2], ReduceOp::Sum).unwrap_err());
    assert!(errs.iter().all(|e| matches!(e, CommError::Shape { op: "reduce_scatter", .. })), "{errs:?}");
    let errs = on_group(2, |c| c.reduce_scatter_slice(&[0.0; 6], &mut [0.0; 6], ReduceOp::Sum).unwrap_err());
    assert!(errs.iter().all(|e| matches!(e, CommError::Shape { op: "reduce_scatter", .. })), "{errs:?}");
}

/// A model-side helper written once against the trait.
fn average_gradients<C: Communicator<CpuBackend> + ?Sized>(
    comm: &C,
    grad: &mut CpuBuf,
) -> dm_parallel::comm::Result<()> {
    comm.all_reduce(grad, ReduceOp::Avg)
}

#[test]
fn communicator_trait_on_cpu_buffers() {
    let be = CpuBackend::new();
    let got = on_group(3, |c| {
        let r = c.rank();
        let mut g = be.upload("grad", &[r as f32, 2.0 * r as f32]).unwrap();
        average_gradients(c, &mut g).unwrap();
        let send = be.upload("send", &[r as f32; 2]).unwrap();
        let mut recv = be.zeros("recv", 6).unwrap();
        Communicator::<CpuBackend>::all_gather(c, &send, &mut recv).unwrap();
        let rs_send = be.upload("rs", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut rs = be.zeros("rs_out", 2).unwrap();
        Communicator::<CpuBackend>::reduce_scatter(c, &rs_send, &mut rs, ReduceOp::Sum).unwrap();
        let mut bc = be.upload("bc", &[r as f32]).unwrap();
        Communicator::<CpuBackend>::broadcast(c, &mut bc, 1).unwrap();
        Communicator::<CpuBackend>::barrier(c).unwrap();
        (g.as_slice().to_vec(), recv.as_slice().to_vec(), rs.as_slice().to_vec(), bc.as_slice()[0])
    });
    for (r, (g, ag, rs, bc)) in got.into_iter().enumerate() {
        assert_eq!(g, vec![1.0, 2.0]);
        assert_eq!(ag, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert_eq!(rs, vec![3.0 * (2 * r + 1) as f32, 3.0 * (2 * r + 2) as f32]);
        assert_eq!(bc, 1.0);
    }
}

#[test]
fn solo_comm_is_an_identity_that_counts() {
    let be = CpuBackend::new();
    let solo: Box<dyn Communicator<CpuBackend>> = Box::new(SoloComm::new(be.clone()));
    assert_eq!((solo.rank(), solo.size()), (0, 1));
    let mut buf = be.upload("b", &[1.0, -2.0, 3.0]).unwrap();
    solo.all_reduce(&mut buf, ReduceOp::Avg).unwrap();
    solo.broadcast(&mut buf, 0).unwrap();
    assert_eq!(buf.as_slice(), &[1.0, -2.0, 3.0]);
    let mut recv = be.zeros("r", 3).unwrap();
    solo.all_gather(&buf, &mut recv).unwrap();
    assert_eq!(recv.as_slice(), buf.as_slice());
    let mut recv2 = be.zeros("r2", 3).unwrap();
    solo.reduce_scatter(&buf, &mut recv2, ReduceOp::Sum).unwrap();
    assert_eq!(recv2.as_slice(), buf.as_slice());
    solo.barrier().unwrap();
    let mut wrong = be.zeros("w", 2).unwrap();
    assert!(matches!(solo.all_gather(&buf, &mut wrong), Err(CommError::Shape { .. })));
    assert_eq!(solo.broadcast(&mut buf, 1), Err(CommError::InvalidRoot { root: 1, size: 1 }));
    let s = solo.stats();
    assert_eq!(s.all_reduce, OpStats { calls: 1, bytes: 12 });
    assert_eq!(s.all_gather, OpStats { calls: 1, bytes: 12 });
    assert_eq!(s.reduce_scatter, OpStats { calls: 1, bytes: 12 });
    assert_eq!(s.broadcast, OpStats { calls: 1, bytes: 12 });
    assert_eq!(s.barrier, OpStats { calls: 1, bytes: 0 });
    solo.abort("test abort");
    assert_eq!(solo.barrier(), Err(CommError::Aborted { rank: 0, reason: "test abort".into() }));

    // The thread communicator is usable as a trait object too.
    let mut comms = ThreadComm::group(1);
    let one: Box<dyn Communicator<CpuBackend>> = Box::new(comms.pop().unwrap());
    let mut b = be.upload("b1", &[5.0]).unwrap();
    one.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    assert_eq!(b.as_slice(), &[5.0]);
}

#[test]
fn rank_threads_are_named_and_values_return_in_rank_order() {
    let names = Mutex::new(Vec::new());
    let out = run_ranks(&Mesh::new(3, 1).unwrap(), |rank, _comms| -> Result<usize, String> {
        names.lock().unwrap().push(std::thread::current().name().unwrap().to_string());
        Ok(rank * 10)
    })
    .unwrap();
    assert_eq!(out, vec![0, 10, 20]);
    let mut names = names.into_inner().unwrap();
    names.sort();
    assert_eq!(names, vec!["rank-0", "rank-1", "rank-2"]);
}
