//! `dalle-mesh bench comm`: the four collectives over a group of ranks at doubling sizes,
//! reported as nccl-tests reports them (`size count type redop root | time algbw busbw #wrong`,
//! `algbw = size / time`, `busbw = algbw ×` the factor of [`dm_parallel::comm::bandwidth`]),
//! each result checked element by element against the exact answer (small integers, so every
//! sum is exact in f32).
//!
//! `size` is nccl-tests' size: the larger buffer of the call (the recv buffer of an all-gather,
//! the send buffer of a reduce-scatter). Time is the mean over the timed iterations, the slowest
//! rank's.

use crate::run_config::parse_bytes;
use anyhow::{bail, Context, Result};
use dm_parallel::comm::bandwidth::bus_factor;
use dm_parallel::comm::nccl::{NcclComm, NcclId, NcclOptions};
use dm_parallel::{CollectiveKind, Communicator, ReduceOp, ThreadComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::cuda::CudaBackend;
use dm_runtime::Backend;
use serde::Serialize;
use std::time::Instant;

/// How the ranks talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Threads of this process (the CPU mesh's communicator).
    Threads,
    /// One process per rank over MPI.
    Mpi,
    /// NCCL on GPUs: threads of this process, rank r on GPU r (untested on GPUs).
    Nccl,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct CommResult {
    pub collective: String,
    pub size: u64,
    pub count: usize,
    #[serde(rename = "type")]
    pub dtype: String,
    pub redop: String,
    pub root: i64,
    pub time_us: f64,
    pub algbw_gb_s: f64,
    pub busbw_gb_s: f64,
    pub wrong: u64,
}

/// The JSON line of `bench comm`.
#[derive(Debug, Clone, Serialize)]
pub struct CommReport {
    pub transport: String,
    pub ranks: usize,
    pub results: Vec<CommResult>,
    /// Largest busbw per collective (GB/s).
    pub peak_busbw_gb_s: std::collections::BTreeMap<String, f64>,
    pub wrong: u64,
    pub pass: bool,
}

/// Parses `1KiB:256MiB` into the doubling sizes from the first to the second (inclusive).
pub fn parse_sizes(spec: &str) -> Result<Vec<u64>> {
    let (lo, hi) =
        spec.split_once(':').with_context(|| format!("--sizes `{spec}`: expected MIN:MAX, e.g. 1KiB:256MiB"))?;
    let (lo, hi) = (parse_bytes(lo)?, parse_bytes(hi)?);
    if lo < 4 || hi < lo {
        bail!("--sizes `{spec}`: need 4 B ≤ MIN ≤ MAX");
    }
    let mut v = Vec::new();
    let mut s = lo;
    while s <= hi {
        v.push(s);
        s *= 2;
    }
    Ok(v)
}

/// The collectives in the order they are run.
pub const KINDS: [CollectiveKind; 4] =
    [CollectiveKind::AllReduce, CollectiveKind::AllGather, CollectiveKind::ReduceScatter, CollectiveKind::Broadcast];

/// Rank `r`'s input element `i`: a small integer, so every reduction is exact.
fn input(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 13 + 1)) as f32
}

/// Elements of the send and recv buffers of `kind` for `count` elements of nccl size over `n`.
fn lens(kind: CollectiveKind, count: usize, n: usize) -> (usize, usize) {
    match kind {
        CollectiveKind::AllGather => (count / n, count),
        CollectiveKind::ReduceScatter => (count, count / n),
        _ => (count, count),
    }
}

/// Exact expected output element `i` of `rank`.
fn expected(kind: CollectiveKind, rank: usize, n: usize, recv_len: usize, i: usize) -> f32 {
    let sum_ranks = (n * (n + 1) / 2) as f32;
    match kind {
        CollectiveKind::AllReduce => sum_ranks * (i % 13 + 1) as f32,
        CollectiveKind::AllGather => {
            let chunk = recv_len / n;
            input(i / chunk, i % chunk)
        }
        CollectiveKind::ReduceScatter => sum_ranks * ((rank * recv_len + i) % 13 + 1) as f32,
        _ => input(0, i),
    }
}

/// One collective call on a rank.
fn call<B: Backend>(c: &dyn Communicator<B>, kind: CollectiveKind, send: &mut B::Buf, recv: &mut B::Buf) -> Result<()> {
    match kind {
        CollectiveKind::AllReduce => c.all_reduce(send, ReduceOp::Sum)?,
        CollectiveKind::AllGather => c.all_gather(send, recv)?,
        CollectiveKind::ReduceScatter => c.reduce_scatter(send, recv, ReduceOp::Sum)?,
        CollectiveKind::Broadcast => c.broadcast(send, 0)?,
        CollectiveKind::Barrier => c.barrier()?,
    }
    Ok(())
}

/// What one rank measured for one (kind, size): mean seconds and wrong elements. `sync` waits
/// for the device's queue (a no-op on the CPU; NCCL calls return before they finish).
fn rank_run<B: Backend>(
    be: &B,
    sync: fn(&B) -> Result<()>,
    c: &dyn Communicator<B>,
    kind: CollectiveKind,
    count: usize,
    iters: usize,
) -> Result<(f64, u64)> {
    let n = c.size();
    let rank = c.rank();
    let (s_len, r_len) = lens(kind, count, n);
    let init: Vec<f32> = (0..s_len).map(|i| input(rank, i)).collect();
    let mut send = be.upload("send", &init)?;
    let mut recv = be.zeros("recv", r_len)?;
    // Checked call first, on fresh inputs.
    call(c, kind, &mut send, &mut recv)?;
    let out = match kind {
        CollectiveKind::AllReduce | CollectiveKind::Broadcast => be.download(&send)?,
        _ => be.download(&recv)?,
    };
    let wrong = out.iter().enumerate().filter(|&(i, &x)| x != expected(kind, rank, n, out.len(), i)).count() as u64;
    be.write(&mut send, 0, &init)?;
    call(c, kind, &mut send, &mut recv)?; // warm-up
    sync(be)?;
    let t0 = Instant::now();
    for _ in 0..iters {
        call(c, kind, &mut send, &mut recv)?;
    }
    sync(be)?;
    Ok((t0.elapsed().as_secs_f64() / iters as f64, wrong))
}

/// Iterations for a size: about 0.1 s of work at ~1 GB/s, between 3 and 50.
fn iterations(size: u64) -> usize {
    ((1e8 / size.max(1) as f64) as usize).clamp(3, 50)
}

/// Runs every collective at every size over `ranks` ranks of `transport`: threads of this
/// process, or (`mpi`) the processes a launcher started, this one being one of them. `None` on
/// every MPI rank but world rank 0, which reports.
pub fn run(transport: Transport, ranks: usize, sizes: &[u64]) -> Result<Option<CommReport>> {
    if ranks < 2 {
        bail!("--ranks {ranks}: a collective benchmark needs at least 2 ranks");
    }
    match transport {
        Transport::Threads => {
            let (results, wrong) = measure_all(ranks, sizes, |kind, count, iters| {
                let group: Vec<_> = ThreadComm::group(ranks).into_iter().map(|c| (CpuBackend::new(), c)).collect();
                measure_on_threads(&group, cpu_sync, kind, count, iters)
            })?;
            Ok(Some(report("threads", ranks, results, wrong)))
        }
        Transport::Mpi => run_mpi(ranks, sizes),
        Transport::Nccl => run_nccl(ranks, sizes),
    }
}

/// One (collective, size) on rank threads, each with its backend and communicator: the slowest
/// rank's mean seconds and every rank's wrong elements.
fn measure_on_threads<B: Backend, C: Communicator<B>>(
    ranks: &[(B, C)],
    sync: fn(&B) -> Result<()>,
    kind: CollectiveKind,
    count: usize,
    iters: usize,
) -> Result<(f64, u64)> {
    let per_rank: Vec<(f64, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> =
            ranks.iter().map(|(be, c)| s.spawn(move || rank_run(be, sync, c, kind, count, iters))).collect();
        joined(hs)
    })?;
    Ok((per_rank.iter().map(|r| r.0).fold(0.0, f64::max), per_rank.iter().map(|r| r.1).sum()))
}

/// The results of scoped rank threads, in rank order (a panicked rank is an error).
fn joined<T>(hs: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>) -> Result<Vec<T>> {
    hs.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a benchmark rank panicked"))?).collect()
}

fn cpu_sync(_: &CpuBackend) -> Result<()> {
    Ok(())
}

fn cuda_sync(be: &CudaBackend) -> Result<()> {
    Ok(be.synchronize()?)
}

/// Refuses `--transport nccl` where fewer than `ranks` GPUs or no NCCL are usable, saying why.
fn check_nccl_ranks(ranks: usize) -> Result<()> {
    let probe = CudaBackend::probe().map_err(|e| {
        crate::bad_input!("bench comm --transport nccl: no usable GPU: {e}; use --transport threads or mpi")
    })?;
    if probe.devices.len() < ranks {
        return Err(crate::bad_input!(
            "bench comm --transport nccl --ranks {ranks} needs {ranks} GPUs but the driver sees {}; pass fewer \
             --ranks or use --transport threads",
            probe.devices.len()
        ));
    }
    dm_parallel::comm::nccl::nccl_available().map_err(|e| {
        crate::bad_input!(
            "bench comm --transport nccl: NCCL is not usable: {e}; install libnccl2 or use --transport threads"
        )
    })?;
    Ok(())
}

/// `--transport nccl`: `ranks` threads of this process, rank r on GPU r, one NCCL communicator
/// group (made once, every rank joining at the same time); the slowest rank's time. Refused
/// with the reason where fewer GPUs or no NCCL are usable. Untested on GPUs.
fn run_nccl(ranks: usize, sizes: &[u64]) -> Result<Option<CommReport>> {
    check_nccl_ranks(ranks)?;
    let fp32 = dm_model::plan::Precision::Fp32;
    let id = NcclId::new()?;
    let ranks_here: Vec<(CudaBackend, NcclComm)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..ranks)
            .map(|r| {
                let id = &id;
                s.spawn(move || -> Result<(CudaBackend, NcclComm)> {
                    let be = crate::device::cuda_backend(r, fp32, None)?;
                    let c = NcclComm::new(&be, id, r, ranks, "bench comm", NcclOptions::default())?;
                    Ok((be, c))
                })
            })
            .collect();
        joined(hs)
    })?;
    let (results, wrong) =
        measure_all(ranks, sizes, |kind, count, iters| measure_on_threads(&ranks_here, cuda_sync, kind, count, iters))?;
    Ok(Some(report("nccl", ranks, results, wrong)))
}

/// `--transport mpi`: this process is one rank; the slowest rank's time and every rank's wrong
/// elements are reduced over the group (MPI's own all-reduce of [`dm_parallel::comm::mpi`]).
fn run_mpi(ranks: usize, sizes: &[u64]) -> Result<Option<CommReport>> {
    let mesh = dm_parallel::Mesh::new(1, ranks)?;
    let Some(procs) = crate::bench_procs::join_checked(mesh, ranks, &format!("bench comm {sizes:?}"))? else {
        return Err(crate::bad_input!(
            "--transport mpi runs one process per rank, but no launcher started this one: run \
             `dalle-mesh launch --nproc {ranks} -- bench comm --transport mpi --ranks {ranks}` (or under \
             `srun --mpi=pmix -n {ranks}` / `mpirun -np {ranks}`), or use --transport threads"
        ));
    };
    crate::bench_procs::run(procs, |p| {
        let world = p.groups.2.as_ref();
        let be = CpuBackend::new();
        let (results, wrong) = measure_all(ranks, sizes, |kind, count, iters| {
            let (t, w) = rank_run(&be, cpu_sync, world, kind, count, iters)?;
            let (mut tb, mut wb) = (be.upload("time", &[t as f32])?, be.upload("wrong", &[w as f32])?);
            world.all_reduce(&mut tb, ReduceOp::Max)?;
            world.all_reduce(&mut wb, ReduceOp::Sum)?;
            Ok(((be.download(&tb)?[0] as f64).max(t), be.download(&wb)?[0] as u64))
        })?;
        Ok((p.world_rank() == 0).then(|| report("mpi", ranks, results, wrong)))
    })
}

/// Every (collective, size) through `measure(kind, count, iters) -> (slowest rank's mean
/// seconds, wrong elements of every rank)`.
fn measure_all(
    ranks: usize,
    sizes: &[u64],
    mut measure: impl FnMut(CollectiveKind, usize, usize) -> Result<(f64, u64)>,
) -> Result<(Vec<CommResult>, u64)> {
    let mut results = Vec::new();
    for kind in KINDS {
        for &size in sizes {
            let count = ((size / 4) as usize / ranks) * ranks;
            if count == 0 {
                continue;
            }
            let (time, wrong) = measure(kind, count, iterations(size))?;
            let algbw = (count * 4) as f64 / time / 1e9;
            results.push(CommResult {
                collective: kind.name().into(),
                size: count as u64 * 4,
                count,
                dtype: "float".into(),
                redop: match kind {
                    CollectiveKind::AllReduce | CollectiveKind::ReduceScatter => "sum".into(),
                    _ => "none".into(),
                },
                root: if kind == CollectiveKind::Broadcast { 0 } else { -1 },
                time_us: time * 1e6,
                algbw_gb_s: algbw,
                busbw_gb_s: algbw * bus_factor(kind, ranks),
                wrong,
            });
        }
    }
    let wrong = results.iter().map(|r| r.wrong).sum();
    Ok((results, wrong))
}

fn report(transport: &str, ranks: usize, results: Vec<CommResult>, wrong: u64) -> CommReport {
    let mut peak = std::collections::BTreeMap::new();
    for r in &results {
        let e = peak.entry(r.collective.clone()).or_insert(0.0f64);
        *e = e.max(r.busbw_gb_s);
    }
    CommReport { transport: transport.into(), ranks, results, peak_busbw_gb_s: peak, wrong, pass: wrong == 0 }
}

/// The report as nccl-tests prints it, one table per collective.
pub fn table(r: &CommReport) -> String {
    let mut out = String::new();
    for kind in KINDS {
        let rows: Vec<&CommResult> = r.results.iter().filter(|x| x.collective == kind.name()).collect();
        if rows.is_empty() {
            continue;
        }
        out += &format!("# {} over {} ranks ({})\n", kind.name(), r.ranks, r.transport);
        out += "#       size         count      type   redop    root     time   algbw   busbw  #wrong\n";
        out += "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)\n";
        for x in rows {
            out += &format!(
                "{:>12}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7.1}  {:>6.2}  {:>6.2}  {:>6}\n",
                x.size, x.count, x.dtype, x.redop, x.root, x.time_us, x.algbw_gb_s, x.busbw_gb_s, x.wrong
            );
        }
    }
    out += &format!("# Out of bounds values : {} {}\n", r.wrong, if r.pass { "OK" } else { "FAILED" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_double_from_min_to_max() {
        assert_eq!(parse_sizes("1KiB:8KiB").unwrap(), vec![1024, 2048, 4096, 8192]);
        assert_eq!(parse_sizes("4:4").unwrap(), vec![4]);
        assert!(parse_sizes("8KiB:1KiB").is_err());
        assert!(parse_sizes("1KiB").unwrap_err().to_string().contains("MIN:MAX"));
    }

    #[test]
    fn every_collective_is_verified_and_busbw_uses_the_factors() {
        let r = run(Transport::Threads, 3, &parse_sizes("1KiB:4KiB").unwrap()).unwrap().unwrap();
        assert_eq!(r.results.len(), 4 * 3);
        assert!(r.pass, "{}", table(&r));
        for x in &r.results {
            let kind = KINDS.iter().find(|k| k.name() == x.collective).unwrap();
            assert!((x.busbw_gb_s - x.algbw_gb_s * bus_factor(*kind, 3)).abs() < 1e-9);
            assert_eq!(x.count % 3, 0);
        }
        assert!(table(&r).contains("#wrong"));
    }

    #[test]
    fn the_check_catches_a_wrong_answer() {
        assert_eq!(expected(CollectiveKind::AllReduce, 0, 2, 4, 1), 3.0 * 2.0);
        assert_eq!(expected(CollectiveKind::AllGather, 0, 2, 4, 3), input(1, 1));
        assert_eq!(expected(CollectiveKind::ReduceScatter, 1, 2, 2, 0), 3.0 * 3.0);
        assert_ne!(expected(CollectiveKind::Broadcast, 1, 2, 4, 0), input(1, 0));
    }

    #[test]
    fn other_transports_say_what_they_need() {
        // No launcher variables in the test process: MPI asks for one.
        let e = run(Transport::Mpi, 2, &[1024]).unwrap_err().to_string();
        assert!(e.contains("dalle-mesh launch --nproc 2") && e.contains("--transport threads"), "{e}");
        if !dm_runtime::cuda::CudaBackend::available() {
            let e = run(Transport::Nccl, 2, &[1024]).unwrap_err().to_string();
            assert!(e.contains("no usable GPU") && e.contains("--transport threads"), "{e}");
        }
    }
}
