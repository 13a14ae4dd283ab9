//! `bench comm --transport mpi`, `bench step` and `sweep --launcher slurm` with ranks as
//! processes, against a real Open MPI and SLURM (the CI's MPI/SLURM block, after
//! `scripts/slurm-ci.sh start`): `cargo test --release -p dalle-mesh --features mpi --test
//! bench_processes -- --ignored --test-threads 1`. Every test is `#[ignore]`d in the default run
//! and fails (not skips) when asked for without srun/sbatch/mpirun or without `--features mpi`.
//!
//! `bench step` over MPI processes trains bit for bit as the thread mesh does (the MPI
//! communicator sums in rank order like the threads'), so its losses are compared exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dalle-mesh");

#[cfg(feature = "mpi")]
fn require_mpi_build() {}

#[cfg(not(feature = "mpi"))]
fn require_mpi_build() {
    panic!("these tests need the MPI build: cargo test --release -p dalle-mesh --features mpi --test bench_processes -- --ignored");
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dm-benchproc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not start {cmd:?}: {e} (is SLURM / Open MPI installed?)"));
    eprintln!("--- {cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// `dalle-mesh launch --nproc N -- <args>`.
fn launch(n: usize, args: &[&str]) -> Output {
    run(Command::new("timeout").args(["300", BIN, "launch", "--nproc", &n.to_string(), "--"]).args(args))
}

/// `srun --mpi=pmix -n N dalle-mesh <args>`, refusing to wait for a node for more than 30 s.
fn srun(n: usize, args: &[&str]) -> Output {
    run(Command::new("timeout")
        .args(["300", "srun", "--mpi=pmix", "--immediate=30", "-n", &n.to_string(), BIN])
        .args(args))
}

/// The one JSON line a run printed on stdout (only rank 0 prints).
fn only_line(o: &Output) -> Value {
    assert!(o.status.success(), "the run failed: {}", o.status);
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "only rank 0 prints its JSON line: {text}");
    serde_json::from_str(lines[0]).unwrap()
}

fn check_comm_report(v: &Value, ranks: u64) {
    assert_eq!(v["transport"], "mpi");
    assert_eq!(v["ranks"], ranks);
    assert_eq!(v["pass"], true);
    assert_eq!(v["wrong"], 0);
    let rows = v["results"].as_array().unwrap();
    // 4 collectives × 1 KiB .. 64 KiB.
    assert_eq!(rows.len(), 4 * 7);
    for r in rows {
        assert!(r["time_us"].as_f64().unwrap() > 0.0 && r["busbw_gb_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["count"].as_u64().unwrap() % ranks, 0);
    }
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn bench_comm_over_mpi_processes_is_verified_and_only_rank0_prints() {
    require_mpi_build();
    let args = ["bench", "comm", "--transport", "mpi", "--sizes", "1KiB:64KiB", "--ranks"];
    let o = launch(4, &[&args[..], &["4"]].concat());
    check_comm_report(&only_line(&o), 4);
    assert!(String::from_utf8_lossy(&o.stderr).contains("# all_reduce over 4 ranks (mpi)"));
    let o = srun(2, &[&args[..], &["2"]].concat());
    check_comm_report(&only_line(&o), 2);
    // --ranks is the world the launcher started.
    let o = launch(2, &[&args[..], &["3"]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ranks 3 but the launcher started 2 processes"));
}

/// `bench step` of the micro preset; the same arguments as threads (no launcher) and as processes.
fn step_args(tp: usize, dp: usize, zero1: bool) -> Vec<String> {
    let mut a: Vec<String> = ["bench", "step", "--preset", "micro", "--batch", "2", "--steps", "2", "--warmup", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["--tp".into(), tp.to_string(), "--dp".into(), dp.to_string()]);
    if zero1 {
        a.push("--zero1".into());
    }
    a
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn bench_step_over_processes_trains_as_the_thread_mesh() {
    require_mpi_build();
    for (tp, dp, zero1, srun_it) in [(2, 2, false, false), (1, 2, true, true)] {
        let args = step_args(tp, dp, zero1);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let threads = only_line(&run(Command::new(BIN).args(&args)));
        let procs = if srun_it { only_line(&srun(tp * dp, &args)) } else { only_line(&launch(tp * dp, &args)) };
        let what = format!("tp {tp} dp {dp} zero1 {zero1} srun {srun_it}");
        assert!(procs["device"].as_str().unwrap().contains("rank processes over MPI"), "{what}: {procs}");
        assert!(threads["device"].as_str().unwrap().contains("rank threads"), "{what}");
        for k in ["world", "zero1", "global_batch", "comm_per_step", "planned_bytes", "loss_first", "loss_last"] {
            assert_eq!(procs[k], threads[k], "{what}: {k}");
        }
        assert!(procs["loss_last"].as_f64() < procs["loss_first"].as_f64(), "{what}: the mesh trains");
        let (share, mfu) = (procs["comm_share"].as_f64().unwrap(), procs["mfu"].as_f64().unwrap());
        assert!(share > 0.0 && share < 1.0 && mfu > 0.0, "{what}: {procs}");
    }
}

fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sweep(dir: &Path) -> Command {
    let mut c = Command::new("timeout");
    c.current_dir(dir).args(["300", BIN, "sweep", "--launcher", "slurm", "--config", "s.yaml", "--out", "o"]);
    c
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn sweep_on_slurm_submits_collects_records_refusals_and_resumes() {
    require_mpi_build();
    let dir = scratch("sweep");
    std::fs::write(dir.join("s.yaml"), common::sweep_grid(true)).unwrap();
    let out = dir.join("o");
    // Interrupt the sweep as soon as its jobs are submitted; they go on without it.
    let mut child = Command::new(BIN)
        .current_dir(&dir)
        .args(["sweep", "--launcher", "slurm", "--config", "s.yaml", "--out", "o"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let jobs = out.join("slurm/jobs.json");
    let t = Instant::now();
    // jobs.json is rewritten after each array (one per world size): wait for both.
    let submitted_points = |text: &str| -> usize {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|j| j["jobs"].as_object().map(|o| o.values().filter_map(|p| p.as_array().map(Vec::len)).sum()))
            .unwrap_or(0)
    };
    while submitted_points(&std::fs::read_to_string(&jobs).unwrap_or_default()) < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "the sweep did not submit both points");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let submitted = std::fs::read_to_string(&jobs).unwrap();
    // The big model's points don't fit 24 MiB: recorded before anything was submitted.
    let refused: Vec<Value> = records(&out);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|v| v["status"] == "does_not_fit" && v["model"] == "big"));
    let j: Value = serde_json::from_str(&submitted).unwrap();
    let pts: Vec<u64> = j["jobs"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p.as_array().unwrap().clone())
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(pts.len(), 2, "only the two tiny points are submitted: {submitted}");
    // Started again: it waits for (or collects) the jobs already submitted, submits nothing new.
    let o = run(&mut sweep(&dir));
    assert!(o.status.success());
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((summary["points"].as_u64(), summary["measured"].as_u64()), (Some(4), Some(2)), "{summary}");
    assert_eq!(summary["resumed"], 2);
    assert_eq!(std::fs::read_to_string(&jobs).unwrap(), submitted, "no point was submitted twice");
    let all = records(&out);
    assert_eq!(all.len(), 4);
    for v in all.iter().filter(|v| v["status"] == "ok") {
        assert_eq!(v["model"], "tiny");
        assert!(v["ranks_as"].as_str().unwrap().contains("rank processes over MPI"), "{v}");
        assert!(v["step_s"]["median"].as_f64().unwrap() > 0.0 && v["load_average"].as_f64().is_some());
    }
    for f in ["results.csv", "results.md", "throughput.png", "validation.svg"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // A third run has nothing left to do.
    let o = run(&mut sweep(&dir));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((summary["recorded"].as_u64(), summary["resumed"].as_u64()), (Some(0), Some(4)));
    std::fs::remove_dir_all(&dir).ok();
}
