//! MpiComm across real processes (cargo feature `mpi`, Open MPI's `mpirun`): every collective on
//! a tp=2 × dp=2 mesh of 4 processes equals ThreadComm on the same inputs **bit for bit** (both
//! gather every rank's contribution and combine in rank order, so the rounding is the same), and
//! every rank of a group holds identical results. Also: a call mismatch is reported as such.
//!
//! These tests start `mpirun`, so they are `#[ignore]`d in the default test run; the CI's MPI
//! block runs them with `cargo test --release -p dm-parallel --features mpi --test mpi_processes
//! -- --ignored`. When requested (`--ignored`) but `mpirun` is missing, they fail.

#![cfg(feature = "mpi")]

use std::process::Command;
use std::time::Duration;

use dm_parallel::comm::mpi::{self as dm_mpi, MpiComm};
use dm_parallel::{CommError, Communicator, Mesh, ReduceOp, ThreadComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;

const LENS: [usize; 4] = [1, 7, 129, 4096];
const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

/// Values of mixed sign and magnitude, so that summation order changes the rounding.
fn input(rank: usize, len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let base = ((i as f32) * 0.37 + rank as f32 * 1.1 + salt as f32).sin() * (rank as f32 + 1.3).powi(3);
            base * 10f32.powi((i % 7) as i32 - 3)
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs this test binary's `name` test under `mpirun -np n`; the children see OMPI_COMM_WORLD_RANK.
fn run_under_mpirun(name: &str, n: usize) -> std::process::Output {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("mpirun")
        .args(["-np", &n.to_string(), "--oversubscribe", "--allow-run-as-root"])
        .arg(exe)
        .args(["--exact", name, "--ignored", "--nocapture", "--test-threads", "1"])
        .env("DM_MPI_CHILD", "1")
        .output()
        .expect("mpirun could not be started: install Open MPI (apt-get install openmpi-bin libopenmpi-dev)");
    eprintln!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn is_child() -> bool {
    std::env::var("DM_MPI_CHILD").is_ok() && std::env::var("OMPI_COMM_WORLD_RANK").is_ok()
}

/// The thread-mesh results of every collective for every rank's inputs: what `rank` must get.
fn thread_reference(mesh: &Mesh, rank: usize, len: usize, op: ReduceOp, salt: usize) -> Vec<Vec<f32>> {
    let comms = ThreadComm::mesh_with_timeout(mesh, Duration::from_secs(30));
    let results = dm_parallel::run_ranks_on(comms, |r, c| -> Result<Vec<Vec<f32>>, CommError> {
        collect((&c.tp, &c.dp, &c.world), r, len, op, salt)
    })
    .expect("thread mesh");
    results[rank].clone()
}

/// One pass over the collectives: tp all_reduce, dp all_reduce, tp all_gather, dp reduce_scatter,
/// world broadcast from rank 3. Returns each result.
#[allow(clippy::too_many_arguments)]
fn collect<C: Communicator<CpuBackend>>(
    (tp, dp, world): (&C, &C, &C),
    rank: usize,
    len: usize,
    op: ReduceOp,
    salt: usize,
) -> Result<Vec<Vec<f32>>, CommError> {
    let be = CpuBackend::new();
    let buf = |data: Vec<f32>| be.upload("collect", &data).expect("host buffer");
    let mut a = buf(input(rank, len, salt));
    tp.all_reduce(&mut a, op)?;
    let mut b = buf(input(rank, len, salt + 1));
    dp.all_reduce(&mut b, op)?;
    let send = buf(input(rank, len, salt + 2));
    let mut g = buf(vec![0.0; 2 * len]);
    tp.all_gather(&send, &mut g)?;
    let send = buf(input(rank, 2 * len, salt + 3));
    let mut rs = buf(vec![0.0; len]);
    dp.reduce_scatter(&send, &mut rs, op)?;
    let mut bc = buf(input(rank, len, salt + 4));
    world.broadcast(&mut bc, 3)?;
    Ok([a, b, g, rs, bc].iter().map(|x| x.as_slice().to_vec()).collect())
}

#[test]
#[ignore = "starts mpirun: run with --features mpi -- --ignored (the CI's MPI block)"]
fn mpi_collectives_equal_the_thread_mesh_bit_for_bit() {
    if !is_child() {
        let out = run_under_mpirun("mpi_collectives_equal_the_thread_mesh_bit_for_bit", 4);
        assert!(out.status.success(), "a rank failed (output above)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("RANK-OK").count(), 4, "every rank must report: {text}");
        return;
    }
    let mesh = Mesh::new(2, 2).unwrap();
    let comms = MpiComm::mesh(&mesh).expect("MPI mesh");
    let rank = comms.world.world_rank();
    let mut checked = 0;
    for (salt, &len) in LENS.iter().enumerate() {
        for op in OPS {
            let got = collect((&comms.tp, &comms.dp, &comms.world), rank, len, op, salt * 10).expect("MPI collectives");
            let want = thread_reference(&mesh, rank, len, op, salt * 10);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(bits(g), bits(w), "rank {rank}: collective #{i}, len {len}, {op:?} differs from ThreadComm");
            }
            // Every rank of the world holds the same all-reduce result of its tp group: compare
            // through a gather of the first element.
            let mut all = vec![0.0f32; 4];
            comms.world.all_gather_slice(&got[0][..1], &mut all).unwrap();
            let (d, _) = mesh.coords(rank);
            assert_eq!(all[2 * d].to_bits(), all[2 * d + 1].to_bits(), "tp group {d} disagrees");
            checked += 1;
        }
    }
    comms.world.barrier().unwrap();
    let stats = dm_parallel::Communicator::<dm_runtime::cpu::CpuBackend>::stats(&comms.tp);
    assert_eq!(stats.all_reduce.calls, checked);
    drop(comms);
    dm_mpi::finalize();
    println!("RANK-OK {rank} checked {checked} cases");
}

#[test]
#[ignore = "starts mpirun: run with --features mpi -- --ignored (the CI's MPI block)"]
fn mpi_call_mismatch_is_an_error_not_a_hang() {
    if !is_child() {
        let out = run_under_mpirun("mpi_call_mismatch_is_an_error_not_a_hang", 2);
        assert!(out.status.success(), "a rank failed (output above)");
        assert_eq!(String::from_utf8_lossy(&out.stdout).matches("RANK-OK").count(), 2);
        return;
    }
    let comms = MpiComm::mesh(&Mesh::new(1, 2).unwrap()).expect("MPI mesh");
    let rank = comms.world.world_rank();
    let mut buf = vec![1.0f32; 3 + rank];
    let err = comms.dp.all_reduce_slice(&mut buf, ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, CommError::Mismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("elements") && msg.contains("dp group"), "{msg}");
    let err = comms.world.broadcast_slice(&mut buf, 5).unwrap_err();
    assert!(matches!(err, CommError::InvalidRoot { root: 5, size: 2 }), "{err}");
    comms.world.barrier().unwrap();
    drop(comms);
    dm_mpi::finalize();
    println!("RANK-OK {rank}");
}
