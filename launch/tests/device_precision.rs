//! `device` / `precision` (issue 11): bf16-mixed trains from the flag or the key; what cannot
//! run here is refused early — exit 2, the reason, nothing written — and a run folder remembers
//! both, so a resume on another device or in another precision is refused like any other change.

mod common;
use common::*;
use std::process::Command;

/// The error line of a refused command, checked to be exit 2 (bad input), not a panic.
fn refused(out: std::process::Output, what: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    err
}

fn cuda_usable() -> bool {
    dm_runtime::cuda::CudaBackend::available()
}

#[test]
fn bf16_mixed_trains_through_the_flag_and_the_key_and_run_yaml_records_it() {
    let dir = scratch("bf16_flag");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 2");
    let out = dir.join("run");
    run_ok(train_cmd(&cfg, Some(&out), &["--precision", "bf16-mixed"]));
    let saved = std::fs::read_to_string(out.join("run.yaml")).unwrap();
    assert!(saved.contains("precision: bf16-mixed"), "{saved}");
    assert_eq!(checkpoint_steps(&out), vec![2]);
    // An unknown value of the key names the key and the choices (exit 2).
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, std::fs::read_to_string(&cfg).unwrap() + "precision: fp16\n").unwrap();
    let err = refused(run(train_cmd(&bad, Some(&dir.join("bad")), &[])), "precision: fp16");
    assert!(err.contains("precision") && err.contains("bf16-mixed"), "{err}");
    assert!(!dir.join("bad").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_without_a_gpu_is_refused_with_the_reason_and_nothing_written() {
    if cuda_usable() {
        eprintln!("a usable GPU is present: this test checks the refusal on machines without one");
        return;
    }
    let dir = scratch("cuda_refused");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 2");
    let out = dir.join("run");
    for extra in [&["--device", "cuda"][..], &["--device", "cuda", "--precision", "fp32"]] {
        let err = refused(run(train_cmd(&cfg, Some(&out), extra)), "train --device cuda");
        assert!(err.contains("no usable GPU") && err.contains("--device cpu"), "{err}");
        assert!(!out.exists(), "--out was created by a refused run");
    }
    // A tp × dp mesh of GPUs with mesh.transport nccl: the same refusal, not the transport's.
    let mesh = dir.join("mesh.yaml");
    let yaml = std::fs::read_to_string(&cfg).unwrap() + "device: cuda\nmesh: {tp: 2, dp: 2, transport: nccl}\n";
    std::fs::write(&mesh, yaml).unwrap();
    let err = refused(run(train_cmd(&mesh, Some(&out), &[])), "device: cuda with nccl");
    assert!(err.contains("no usable GPU"), "{err}");
    assert!(!out.exists());
    // sample, parity and bench step refuse it the same way.
    let sample_out = dir.join("s.png");
    let mut sample = Command::new(BIN);
    sample.args(["sample", "--checkpoint"]).arg(&dir).args(["--prompt", "a", "--device", "cuda", "--out"]);
    sample.arg(&sample_out);
    let err = refused(run(sample), "sample --device cuda");
    assert!(err.contains("no usable GPU"), "{err}");
    assert!(!sample_out.exists());
    let mut parity = Command::new(BIN);
    parity.args(["parity", "--fixture"]).arg(&dir).args(["--device", "cuda"]);
    assert!(refused(run(parity), "parity --device cuda").contains("no usable GPU"));
    let mut bench = Command::new(BIN);
    bench.args(["bench", "step", "--preset", "mini", "--device", "cuda", "--precision", "fp32"]);
    assert!(refused(run(bench), "bench step --device cuda").contains("no usable GPU"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nccl_transport_on_cpu_ranks_is_refused_naming_the_device_key() {
    let dir = scratch("nccl_on_cpu");
    let cfg = dir.join("nccl.yaml");
    let base = std::fs::read_to_string(tiny_config(&dir, "run.yaml", "", ", steps: 2")).unwrap();
    std::fs::write(&cfg, base + "mesh: {tp: 1, dp: 2, transport: nccl}\n").unwrap();
    let out = dir.join("run");
    let err = refused(run(train_cmd(&cfg, Some(&out), &[])), "mesh.transport nccl on cpu");
    assert!(err.contains("device: cuda") && err.contains("mesh.transport"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resume_on_another_device_or_precision_is_refused() {
    let dir = scratch("resume_device");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 2");
    let out = dir.join("run");
    run_ok(train_cmd(&cfg, Some(&out), &[]));
    let saved = std::fs::read_to_string(out.join("run.yaml")).unwrap();
    assert!(saved.contains("device: cpu") && saved.contains("precision: fp32"), "run.yaml records both:\n{saved}");
    // As if the folder had been trained on a GPU in bf16-mixed: a CPU fp32 resume is another run.
    for (key, from, to) in
        [("device", "device: cpu", "device: cuda"), ("precision", "precision: fp32", "precision: bf16-mixed")]
    {
        std::fs::write(out.join("run.yaml"), saved.replace(from, to)).unwrap();
        let err = refused(
            run(train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", "3"])),
            "resume with a changed key",
        );
        assert!(err.contains(&format!("differs in {key}")) && err.contains("--allow-config-change"), "{err}");
        assert_eq!(checkpoint_steps(&out), vec![2], "nothing saved is touched");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
