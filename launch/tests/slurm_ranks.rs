//! Ranks as processes against a real SLURM and Open MPI (the CI's MPI/SLURM block):
//! `scripts/slurm-ci.sh start`, then `cargo test --release -p dalle-mesh --features mpi --test
//! slurm_ranks -- --ignored --test-threads 1`. Every test is `#[ignore]`d in the default run and
//! fails (not skips) when asked for without srun/sbatch/mpirun or without `--features mpi`.
//!
//! How close: **bit for bit**. The MPI communicator gathers every rank's buffer and sums in rank
//! order, as the thread mesh does, and every process computes the same ops on the same shards, so
//! the losses, gradient norms and checkpoint files of a 4-process run equal the thread mesh's
//! exactly (the comparisons below are on the text of metrics.jsonl and the bytes of the
//! checkpoint files, no tolerance).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dalle-mesh");

#[cfg(feature = "mpi")]
fn require_mpi_build() {}

#[cfg(not(feature = "mpi"))]
fn require_mpi_build() {
    panic!("these tests need the MPI build: cargo test --release -p dalle-mesh --features mpi --test slurm_ranks -- --ignored");
}

fn config_text(zero1: bool, steps: u64, save_every: u64) -> String {
    format!(
        "model: {{d_model: 32, encoder_layers: 1, decoder_layers: 2, attention_heads: 4, ffn_dim: 42}}\n\
         data: {{synthetic: {{train_rows: 300, eval_rows: 40, image_length: 16, seed: 2}}}}\n\
         optimizer: {{learning_rate: 0.003, warmup_steps: 3, max_grad_norm: 0.5, weight_decay: 0.01}}\n\
         training: {{steps: {steps}, batch_size: 8, grad_accumulation: 2, log_every: 1, eval_every: 10, \
         save_every: {save_every}, keep_checkpoints: 5}}\n\
         mesh: {{tp: 2, dp: 2, zero1: {zero1}}}\n"
    )
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dm-slurm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The thread mesh's run of `config` (this test process, no launcher variables).
fn thread_run(config: &Path, out: &Path) {
    let cfg = dalle_mesh::run_config::RunConfig::from_file(config).unwrap();
    dalle_mesh::train::train(cfg, out, None).unwrap();
}

/// The training lines of metrics.jsonl (step, loss and grad norm as written).
fn loss_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!("{} {} {}", v["step"].as_u64()?, v.get("loss")?, v["grad_norm"]))
        })
        .collect()
}

fn checkpoint_bytes(out: &Path, step: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = out.join("checkpoints").join(format!("step_{step:08}"));
    (std::fs::read(dir.join("weights.safetensors")).unwrap(), std::fs::read(dir.join("optimizer.safetensors")).unwrap())
}

fn assert_same_run(want: &Path, got: &Path, last_step: u64, what: &str) {
    let (a, b) = (loss_lines(want), loss_lines(got));
    assert_eq!(a.len() as u64, last_step, "{what}: reference steps");
    assert_eq!(a, b, "{what}: losses differ from the thread mesh");
    assert!(checkpoint_bytes(want, last_step) == checkpoint_bytes(got, last_step), "{what}: checkpoint files differ");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not start {cmd:?}: {e} (is SLURM / Open MPI installed?)"));
    eprintln!("--- {cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// `srun --mpi=pmix -n N dalle-mesh <args>`, refusing to wait for a node for more than 30 s.
fn srun(n: usize, cwd: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.current_dir(cwd).args(["300", "srun", "--mpi=pmix", "--immediate=30", "-n", &n.to_string(), BIN]).args(args);
    c
}

/// Submits `script` with sbatch; returns the job id.
fn sbatch(cwd: &Path, script: &Path, extra: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = Command::new("sbatch");
    c.current_dir(cwd).arg("--parsable").args(extra).arg(script).env("DALLE_MESH", BIN);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run(&mut c);
    assert!(out.status.success(), "sbatch failed");
    String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string()
}

/// `scontrol show job` fields of a job.
fn job_field(id: &str, field: &str) -> Option<String> {
    let out = Command::new("scontrol").args(["show", "job", id]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{field}=")).map(str::to_string))
}

/// Polls (every 0.2 s) until the job ends; returns its final state and exit code.
fn wait_job(id: &str, timeout: Duration) -> (String, String) {
    let t = Instant::now();
    loop {
        let state = job_field(id, "JobState").unwrap_or_default();
        if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"].contains(&state.as_str()) {
            return (state, job_field(id, "ExitCode").unwrap_or_default());
        }
        assert!(t.elapsed() < timeout, "job {id} still {state} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/cpu-mpi.sbatch")
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn srun_tp2_dp2_equals_the_thread_mesh_with_and_without_zero1() {
    require_mpi_build();
    for zero1 in [false, true] {
        let dir = scratch(&format!("srun-{zero1}"));
        let cfg = write_config(&dir, "run.yaml", &config_text(zero1, 12, 6));
        thread_run(&cfg, &dir.join("threads"));
        let out = run(&mut srun(4, &dir, &["train", "--config", "run.yaml", "--out", "procs"]));
        assert!(out.status.success(), "srun run failed");
        let json = String::from_utf8_lossy(&out.stdout);
        assert_eq!(json.lines().count(), 1, "only rank 0 prints the summary: {json}");
        assert!(json.contains("\"rendezvous_s\""), "{json}");
        assert_same_run(&dir.join("threads"), &dir.join("procs"), 12, &format!("srun zero1={zero1}"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn sbatch_template_run_equals_the_thread_mesh() {
    require_mpi_build();
    let dir = scratch("sbatch");
    let cfg = write_config(&dir, "run.yaml", &config_text(false, 12, 6));
    thread_run(&cfg, &dir.join("threads"));
    let id = sbatch(&dir, &template(), &["-o", "job.out"], &[("CONFIG", "run.yaml"), ("OUT", "procs")]);
    let (state, code) = wait_job(&id, Duration::from_secs(240));
    let log = std::fs::read_to_string(dir.join("job.out")).unwrap_or_default();
    assert_eq!((state.as_str(), code.as_str()), ("COMPLETED", "0:0"), "job log:\n{log}");
    assert_same_run(&dir.join("threads"), &dir.join("procs"), 12, "sbatch");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[ignore = "needs Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn launch_nproc_4_equals_the_thread_mesh() {
    require_mpi_build();
    for zero1 in [false, true] {
        let dir = scratch(&format!("launch-{zero1}"));
        let cfg = write_config(&dir, "run.yaml", &config_text(zero1, 12, 6));
        thread_run(&cfg, &dir.join("threads"));
        let out = run(Command::new("timeout")
            .current_dir(&dir)
            .args(["300", BIN, "launch", "--nproc", "4", "--", "train", "--config", "run.yaml", "--out", "procs"]));
        assert!(out.status.success(), "launch failed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("[rank 3] "), "output is prefixed with the rank");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "one JSON line");
        assert_same_run(&dir.join("threads"), &dir.join("procs"), 12, &format!("launch zero1={zero1}"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Pids of the dalle-mesh processes whose command line mentions `marker`, with their rank.
fn ranks_running(marker: &str) -> Vec<(u32, Option<usize>)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.starts_with(BIN) || !cmd.contains(marker) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let rank = String::from_utf8_lossy(&env)
            .split('\0')
            .find_map(|kv| kv.strip_prefix("SLURM_PROCID=").and_then(|r| r.parse().ok()));
        found.push((pid, rank));
    }
    found
}

fn wait_for_steps(out: &Path, n: usize, timeout: Duration) {
    let t = Instant::now();
    while loss_lines(out).len() < n {
        assert!(t.elapsed() < timeout, "the run did not reach step {n} in {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn a_sigkilled_rank_ends_every_process_naming_it() {
    require_mpi_build();
    let dir = scratch("kill");
    write_config(&dir, "run.yaml", &config_text(false, 5000, 10000));
    let child = srun(4, &dir, &["train", "--config", "run.yaml", "--out", "killed"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&dir.join("killed"), 2, Duration::from_secs(120));
    let victim = ranks_running("killed").into_iter().find(|(_, r)| *r == Some(2)).expect("rank 2 is running").0;
    let t = Instant::now();
    let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
    let out = child.wait_with_output().unwrap();
    let all_gone = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    eprintln!("SIGKILL of rank 2 → every process exited after {:.2} s", all_gone.as_secs_f64());
    assert!(!out.status.success(), "srun reports the failure");
    assert!(all_gone < Duration::from_secs(60), "took {all_gone:?}");
    for r in [0, 1, 3] {
        assert!(stderr.contains(&format!("rank {r}: stopping because rank 2 failed")), "rank {r} names rank 2");
    }
    assert!(stderr.contains("the process died") && stderr.contains("all_reduce"), "names the death and collective");
    assert!(ranks_running("killed").is_empty(), "no orphan processes");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn usr1_preemption_saves_once_requeues_and_resumes_exactly() {
    require_mpi_build();
    let dir = scratch("preempt");
    // Long enough (seconds) that the signal, which SLURM delivers with a delay of seconds, lands mid-run.
    let steps = 1500;
    let cfg = write_config(&dir, "run.yaml", &config_text(true, steps, 10000));
    thread_run(&cfg, &dir.join("threads"));
    let id = sbatch(&dir, &template(), &["-o", "job.out"], &[("CONFIG", "run.yaml"), ("OUT", "procs")]);
    wait_for_steps(&dir.join("procs"), 10, Duration::from_secs(120));
    let _ = run(Command::new("scancel").args(["--signal=USR1", &id]));
    let (state, code) = wait_job(&id, Duration::from_secs(400));
    let log = std::fs::read_to_string(dir.join("job.out")).unwrap_or_default();
    assert_eq!((state.as_str(), code.as_str()), ("COMPLETED", "0:0"), "job log:\n{log}");
    assert!(log.contains("requeueing job"), "the first run exited 75 and the template requeued it:\n{log}");
    let restarts: u32 = job_field(&id, "Restarts").and_then(|r| r.parse().ok()).unwrap_or(0);
    assert_eq!(restarts, 1, "requeued exactly once");
    // One checkpoint at the stop step (save_every is beyond the run) plus the final one.
    let ckpts: Vec<String> = std::fs::read_dir(dir.join("procs/checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step_"))
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    assert_same_run(&dir.join("threads"), &dir.join("procs"), steps, "preempted and requeued");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn a_mismatched_config_and_a_wrong_world_size_are_refused() {
    require_mpi_build();
    let dir = scratch("refuse");
    write_config(&dir, "a.yaml", &config_text(false, 12, 6));
    write_config(&dir, "b.yaml", &config_text(false, 13, 6));
    let script = format!(
        "if [ \"$SLURM_PROCID\" = 3 ]; then c=b.yaml; else c=a.yaml; fi; exec {BIN} train --config $c --out mixed"
    );
    let out = run(Command::new("timeout").current_dir(&dir).args([
        "120",
        "srun",
        "--mpi=pmix",
        "--immediate=30",
        "-n",
        "4",
        "bash",
        "-c",
        &script,
    ]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ranks of this run disagree") && stderr.contains("ranks [3] have"), "names rank 3");
    assert!(stderr.contains("run config"), "names what differs");
    assert!(!dir.join("mixed/checkpoints").exists(), "nothing trained");

    let out = run(&mut srun(3, &dir, &["train", "--config", "a.yaml", "--out", "three"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("started 3 processes") && stderr.contains("needs 4"), "names both numbers");
    assert!(stderr.contains("--ntasks"), "names the likely cause");
    std::fs::remove_dir_all(&dir).ok();
}

/// The mesh-ready parity fixture (tests/fixtures), which runs on tp=2 × dp=2.
fn mesh_ready_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mesh-ready")
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn parity_as_4_processes_equals_the_thread_mesh_report() {
    require_mpi_build();
    let fixture = mesh_ready_fixture();
    let want = serde_json::to_string(&dm_model::parity::run_mesh(&fixture, 2, 2).unwrap()).unwrap();
    let dir = scratch("parity");
    let args = ["parity", "--fixture", fixture.to_str().unwrap(), "--tp", "2", "--dp", "2"];
    // srun: rank 0 prints the one JSON line, identical to the thread mesh's report.
    let out = run(&mut srun(4, &dir, &args));
    assert!(out.status.success(), "srun parity failed");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), [want.as_str()], "srun parity report");
    // dalle-mesh launch: the same (other ranks print nothing on stdout).
    let out =
        run(Command::new("timeout").current_dir(&dir).args(["300", BIN, "launch", "--nproc", "4", "--"]).args(args));
    assert!(out.status.success(), "launch parity failed");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), [want.as_str()], "launch parity report");
    // A world that is not the mesh: refused on every rank, naming the rank and both numbers.
    let out = run(&mut srun(2, &dir, &args));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: rank 1: ") && stderr.contains("started 2 processes"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
#[ignore = "needs SLURM + Open MPI + --features mpi (the CI's MPI/SLURM block)"]
fn srun_batch_logs_come_from_rank_0_tagged_with_its_rank() {
    require_mpi_build();
    let dir = scratch("batchlog");
    write_config(&dir, "run.yaml", &config_text(false, 4, 0));
    let mut cmd = srun(4, &dir, &["train", "--config", "run.yaml", "--out", "procs"]);
    let out = run(cmd.env("RUST_LOG", "info"));
    assert!(out.status.success(), "srun train failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains(" train step=")).collect();
    assert_eq!(progress.len(), 4, "one line per step (log_every 1):\n{stderr}");
    assert!(progress.iter().all(|l| l.starts_with("rank=0 ")), "{progress:?}");
    assert!(!stderr.contains('\u{1b}'), "no ANSI colours in batch logs");
    std::fs::remove_dir_all(&dir).ok();
}
