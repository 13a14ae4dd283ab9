//! MPI all-reduce bandwidth of [`MpiComm`] (gather + rank-order sum), nccl-tests style:
//! `mpirun -np 2 --oversubscribe target/release/examples/mpi_busbw`. Prints one table row per
//! size from 1 to 64 MiB: `size count type redop | time algbw busbw`, with
//! algbw = bytes / time and busbw = algbw · 2(n−1)/n (what a ring all-reduce would move). The
//! last column is Open MPI's own `MPI_Allreduce` (not rank-ordered, so not bit-stable across
//! transports) on the same buffer, for comparison in the same run.

use std::time::Instant;

use ::mpi::collective::{CommunicatorCollectives, SystemOperation};
use dm_parallel::comm::mpi::{finalize, MpiComm};
use dm_parallel::{Mesh, ReduceOp};

fn main() {
    let world = dm_parallel::comm::mpi::init().expect("MPI init");
    let comms = MpiComm::mesh(&Mesh::new(1, world.size).expect("mesh")).expect("MPI mesh");
    let n = world.size as f64;
    if world.rank == 0 {
        println!("# ranks {}  (MpiComm all_reduce = all_gather + rank-order sum)", world.size);
        println!(
            "{:>12} {:>10} {:>6} {:>6} | {:>10} {:>8} {:>8} {:>13}",
            "size", "count", "type", "redop", "time(us)", "algbw", "busbw", "native busbw"
        );
    }
    for mib in [1usize, 2, 4, 8, 16, 32, 64] {
        let count = mib * 1024 * 1024 / 4;
        let mut buf = vec![1.0f32; count];
        comms.dp.all_reduce_slice(&mut buf, ReduceOp::Sum).expect("warm-up");
        let iters = (64 / mib).clamp(2, 20);
        comms.dp.barrier().expect("barrier");
        let t = Instant::now();
        for _ in 0..iters {
            comms.dp.all_reduce_slice(&mut buf, ReduceOp::Sum).expect("all_reduce");
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        let algbw = (count * 4) as f64 / dt / 1e9;
        let world_comm = ::mpi::topology::SimpleCommunicator::world();
        let mut out = vec![0f32; count];
        world_comm.barrier();
        let t = Instant::now();
        for _ in 0..iters {
            world_comm.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
        }
        let native = (count * 4) as f64 / (t.elapsed().as_secs_f64() / iters as f64) / 1e9;
        if world.rank == 0 {
            println!(
                "{:>12} {:>10} {:>6} {:>6} | {:>10.1} {:>8.2} {:>8.2} {:>13.2}",
                count * 4,
                count,
                "float",
                "sum",
                dt * 1e6,
                algbw,
                algbw * 2.0 * (n - 1.0) / n,
                native * 2.0 * (n - 1.0) / n
            );
        }
    }
    drop(comms);
    finalize();
}
