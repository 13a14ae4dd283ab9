//! Scaling studies: the sweep (every output, refused points, resume after a kill), bench step
//! on the thread mesh (its collectives equal the performance model's), the CLI's clear refusals,
//! and plan --time's calibration cache.

mod common;

use dalle_mesh::bench::{bench_step, StepOptions};
use dm_model::perf_model::step_work;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dalle-mesh");

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dm-scaling-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 4 points: a tiny model on 1×1 and 1×2 (run), and a big one the 24 MiB budget refuses on both.
fn sweep_yaml(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("sweep.yaml");
    std::fs::write(&p, common::sweep_grid(true)).unwrap();
    p
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sweep_writes_everything_records_refusals_and_resumes_after_a_kill() {
    let dir = tmp("sweep");
    let cfg = sweep_yaml(&dir);
    let out = dir.join("out");
    // Kill it after its first point is recorded.
    let mut child = Command::new(BIN)
        .args(["sweep", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .env("DALLE_MESH_TEST_HOLD", "sweep_point:1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains("HOLD sweep_point 1") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = lines(&out.join("results.jsonl"));
    assert_eq!(first.len(), 1, "{first:?}");
    // A line torn by the kill is dropped on resume.
    let mut f = std::fs::OpenOptions::new().append(true).open(out.join("results.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"id\": \"model=tiny tp=1 dp=2").unwrap();
    drop(f);

    let o = Command::new(BIN).args(["sweep", "--config"]).arg(&cfg).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["points"], 4, "{summary}");
    assert_eq!(summary["resumed"], 1, "{summary}");
    assert_eq!(summary["recorded"], 3, "{summary}");
    assert_eq!(summary["measured"], 2, "{summary}");
    assert_eq!(summary["not_fitting"], 2, "{summary}");

    let all = lines(&out.join("results.jsonl"));
    assert_eq!(all.len(), 4);
    assert_eq!(&all[..1], &first[..], "resuming must keep the recorded points");
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "no point twice");
    for v in &all {
        if v["model"] == "big" {
            assert_eq!(v["status"], "does_not_fit", "{v}");
            assert!(v["reason"].as_str().unwrap().contains("device_memory"), "{v}");
            assert!(v.get("step_s").is_none(), "a refused point is not run: {v}");
        } else {
            assert_eq!(v["status"], "ok", "{v}");
            assert!(v["step_s"]["median"].as_f64().unwrap() > 0.0);
            assert!(v["samples_per_s"]["p10"].as_f64().unwrap() <= v["samples_per_s"]["p90"].as_f64().unwrap());
            assert!(v["predicted_step_s"].as_f64().unwrap() > 0.0);
            assert!(v["mfu"].as_f64().unwrap() > 0.0);
            assert!(v["loss_last"].as_f64().unwrap().is_finite());
            let share = v["comm_share"].as_f64().unwrap();
            assert!((0.0..1.0).contains(&share));
            assert_eq!(share == 0.0, v["world"] == 1, "{v}");
        }
    }
    for name in ["results.csv", "results.md", "calibration.yaml"] {
        assert!(out.join(name).metadata().unwrap().len() > 0, "{name}");
    }
    for plot in ["throughput", "efficiency", "memory", "comm_share", "validation"] {
        let png = std::fs::read(out.join(format!("{plot}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{plot}.png");
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && (svg.contains("polyline") || svg.contains("<circle")), "{plot}.svg");
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| tiny |") && md.contains("does_not_fit"), "{md}");
}

#[test]
fn bench_step_collectives_equal_the_performance_model() {
    let cfg = dm_model::DalleBartConfig {
        d_model: 32,
        encoder_layers: 1,
        decoder_layers: 1,
        encoder_attention_heads: 2,
        decoder_attention_heads: 2,
        encoder_ffn_dim: 40,
        decoder_ffn_dim: 40,
        encoder_vocab_size: 50,
        image_vocab_size: 30,
        image_length: 16,
        max_text_length: 8,
        init_std: 0.02,
        use_scan: false,
    };
    for zero1 in [false, true] {
        let o = StepOptions { steps: 2, warmup: 1, zero1, peak_flops_per_s: Some(1e11), ..StepOptions::new(2, 2, 2) };
        let m = bench_step("test", &cfg, &o).unwrap();
        let w = step_work(&cfg, &o.plan_options(), 0);
        assert_eq!(m.comm_per_step, w.comm, "zero1 {zero1}");
        assert!(m.loss_last < m.loss_first, "the mesh trains: {} -> {}", m.loss_first, m.loss_last);
        assert!(m.comm_share > 0.0 && m.comm_share < 1.0);
        assert!(m.mfu > 0.0 && m.samples_per_s > 0.0);
        assert!(m.planned_bytes >= m.peak_bytes);
    }
}

#[test]
fn unsupported_precision_device_transport_and_launcher_exit_2_saying_why() {
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    // bench comm --transport nccl and bench step --device cuda run on GPUs; without one they say why.
    if !dm_runtime::cuda::CudaBackend::available() {
        let o = run(&["bench", "comm", "--transport", "nccl"]);
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("no usable GPU") && e.contains("--transport threads"), "bench comm --transport nccl: {e}");
        let o = run(&["bench", "step", "--device", "cuda"]);
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("no usable GPU") && e.contains("--device cpu"), "{e}");
    }
    // MPI ranks are processes: without a launcher the command says how to start them.
    let o = run(&["bench", "comm", "--transport", "mpi", "--ranks", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dalle-mesh launch --nproc 3"));
    let dir = tmp("slurm");
    let cfg = dir.join("s.yaml");
    std::fs::write(&cfg, common::sweep_grid(false)).unwrap();
    // A job's point that isn't in the grid, or without the submitting sweep's calibration.
    for (point, says) in [("9", "has 2 points"), ("0", "calibration")] {
        let o = Command::new(BIN)
            .args(["sweep", "--point", point, "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(dir.join("o"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "--point {point}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(says), "--point {point}");
    }
    // A grid asking for a device this build can't train on is refused before anything runs.
    std::fs::write(&cfg, format!("{}  device: [cuda]\n", common::sweep_grid(false))).unwrap();
    let o = Command::new(BIN).args(["sweep", "--config"]).arg(&cfg).arg("--out").arg(dir.join("o2")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("device cuda"));
    assert!(!dir.join("o2").join("results.jsonl").exists());
}

#[test]
fn bench_comm_prints_the_nccl_tests_table_and_verifies() {
    let o = Command::new(BIN).args(["bench", "comm", "--ranks", "2", "--sizes", "1KiB:8KiB"]).output().unwrap();
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stderr);
    assert!(table.contains("algbw") && table.contains("busbw") && table.contains("#wrong"), "{table}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["pass"], true);
    assert_eq!(r["results"].as_array().unwrap().len(), 16);
}

#[test]
fn plan_time_calibrates_once_then_uses_the_cache() {
    let dir = tmp("cache");
    let run = || {
        Command::new(BIN)
            .args(["plan", "--time", "--preset", "micro", "--tp", "2", "--dp", "2", "--batch", "2"])
            .env("DALLE_MESH_CACHE_DIR", &dir)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stderr).contains("CPU calibrated"));
    let second = run();
    assert!(String::from_utf8_lossy(&second.stderr).contains("using the cached CPU calibration"));
    let v: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    for k in ["predicted_step_s", "predicted_samples_per_s", "predicted_mfu"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    assert!(v["bottleneck"].as_str().unwrap().starts_with("compute"), "{v}");
    // Built-in profiles: mini on 8 H100s.
    let o = Command::new(BIN)
        .args(["plan", "--time", "--preset", "mini", "--tp", "8", "--precision", "bf16-mixed", "--device", "cuda"])
        .args(["--profile", "h100-sxm"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tp_link"], "intra_node");
    let mfu = v["predicted_mfu"].as_f64().unwrap();
    assert!(mfu > 0.0 && mfu < 1.0, "{v}");
    let o = Command::new(BIN).args(["plan", "--time", "--device", "cuda"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--profile h100-sxm"));
}
