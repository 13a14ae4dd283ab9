//! Helpers of the run-safety tests: scratch folders, a tiny run config, running the binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dalle-mesh");

pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dm-safe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny, fast run config (a few ms per step); `extra` is appended to the `training:` map.
pub fn tiny_config(dir: &Path, name: &str, optimizer: &str, training: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "model: {{d_model: 32, encoder_layers: 1, decoder_layers: 2, attention_heads: 2, ffn_dim: 48}}\n\
             data: {{synthetic: {{train_rows: 300, eval_rows: 40, image_length: 16, seed: 1}}}}\n\
             optimizer: {{warmup_steps: 3, max_grad_norm: 0.5{optimizer}}}\n\
             training: {{batch_size: 8, grad_accumulation: 2, log_every: 1{eval}{training}}}\n",
            eval = if training.contains("eval_every") { "" } else { ", eval_every: 0" },
        ),
    )
    .unwrap();
    p
}

pub fn train_cmd(cfg: &Path, out: Option<&Path>, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "--config"]).arg(cfg);
    if let Some(o) = out {
        cmd.arg("--out").arg(o);
    }
    cmd.args(extra).env("RUST_LOG", "warn");
    cmd
}

pub fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

pub fn run(mut cmd: Command) -> Output {
    cmd.output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// The summary line a command printed.
pub fn summary(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no summary line; stderr: {}", text(&out.stderr)));
    serde_json::from_str(line).unwrap()
}

/// Training-loss lines of metrics.jsonl: (step, exact decimal of the loss).
pub fn losses(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v.get("loss")?.to_string()))
        })
        .collect()
}

/// Waits until metrics.jsonl of `out` has at least `n` lines.
pub fn wait_for_lines(out: &Path, n: usize, child: &mut Child) {
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
        if lines >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before writing {n} metrics lines");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress in 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn send(child: &Child, sig: i32) {
    // SAFETY: kill(2) with the pid of a child this test spawned and has not reaped yet.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
}

/// Waits for a child, failing the test if it takes longer than `limit`.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the run did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

pub fn checkpoint_steps(out: &Path) -> Vec<u64> {
    dalle_mesh::run_checkpoint::list_checkpoints(out).into_iter().map(|(s, _)| s).collect()
}

/// Spawns `cmd` with `DALLE_MESH_TEST_HOLD=hold`, waits until it holds there, and SIGKILLs it.
pub fn kill_at_hold(mut cmd: Command, hold: &str) {
    cmd.env("DALLE_MESH_TEST_HOLD", hold).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reached = BufReader::new(stderr).lines().map_while(|l| l.ok()).any(|l| l.starts_with("HOLD "));
    assert!(reached, "the run ended before reaching {hold}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Runs `cmd` to a successful end.
pub fn run_ok(cmd: Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    out
}

/// A sweep grid of 2-step points on the 1×1 and 1×2 meshes: a tiny model, and with `with_big` a
/// big one that the 24 MiB budget refuses on both.
pub fn sweep_grid(with_big: bool) -> String {
    let big = if with_big { "    - {name: big, d_model: 512, layers: 2, heads: 4, ffn_dim: 1024}\n" } else { "" };
    format!(
        "steps: 2\nwarmup: 1\ndevice_memory: 24MiB\nprofile: cpu-epyc-2core\ngrid:\n  mesh: [1x1, 1x2]\n  model:\n    \
         - {{name: tiny, d_model: 32, layers: 1, heads: 2, ffn_dim: 64}}\n{big}  batch_per_device: [2]\n"
    )
}
