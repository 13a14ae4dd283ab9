//! The CUDA + NCCL paths of `parity`, `bench step` under a launcher and `bench comm` (untested
//! on GPUs): on a machine without a usable GPU each refuses at once — exit 2, the driver's
//! reason and the way out, no panic, nothing written.

mod common;
use common::*;
use std::process::Command;

fn refused_without_gpu(mut cmd: Command, what: &str, way_out: &str) {
    let out = run({
        cmd.env_remove("RANK").env_remove("SLURM_PROCID").env_remove("OMPI_COMM_WORLD_RANK");
        cmd
    });
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(err.contains("no usable GPU") && err.contains(way_out), "{what}: {err}");
    assert!(out.stdout.is_empty(), "{what} printed a result: {}", text(&out.stdout));
}

fn no_gpu_here() -> bool {
    if dm_runtime::cuda::CudaBackend::available() {
        eprintln!("a usable GPU is present: these tests check the refusals on machines without one");
        return false;
    }
    true
}

#[test]
fn parity_on_cuda_ranks_is_refused_without_a_gpu() {
    if !no_gpu_here() {
        return;
    }
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dallebart-tiny");
    for extra in [&["--tp", "2"][..], &["--dp", "2", "--transport", "nccl"], &[]] {
        let mut c = Command::new(BIN);
        c.args(["parity", "--fixture"]).arg(&fixture).args(["--device", "cuda"]).args(extra);
        refused_without_gpu(c, &format!("parity --device cuda {extra:?}"), "--device cpu");
    }
}

#[test]
fn bench_step_on_cuda_under_a_launcher_is_refused_without_a_gpu() {
    if !no_gpu_here() {
        return;
    }
    // Rank 0 of a simulated two-process (torchrun-style) launch: refused before the rendezvous.
    let mut c = Command::new(BIN);
    c.args(["bench", "step", "--preset", "mini", "--device", "cuda", "--dp", "2", "--steps", "1"]);
    let out = run({
        c.env("RANK", "0").env("WORLD_SIZE", "2").env("LOCAL_RANK", "0");
        c
    });
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no usable GPU") && !err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bench_comm_over_nccl_is_refused_without_a_gpu() {
    if !no_gpu_here() {
        return;
    }
    let mut c = Command::new(BIN);
    c.args(["bench", "comm", "--transport", "nccl", "--ranks", "2", "--sizes", "1KiB:4KiB"]);
    refused_without_gpu(c, "bench comm --transport nccl", "--transport threads");
}
