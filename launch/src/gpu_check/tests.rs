//! Tests of the harness that run without a GPU.

use super::*;

#[test]
fn rel_err_catches_unwritten_and_nan_mismatch() {
    assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((rel_err(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
    assert_eq!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]), f64::INFINITY, "a poisoned element left unwritten");
    assert_eq!(rel_err(&[f32::NAN, 2.0], &[f32::NAN, 2.0]), 0.0, "NaN markers match");
    assert_eq!(rel_err(&[0.0, 2.0], &[f32::NAN, 2.0]), f64::INFINITY, "a NaN marker must stay NaN");
    assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    assert_eq!(rel_err(&[], &[]), 0.0);
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(round_bf16(1.0), 1.0);
    assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0, "tie rounds to even");
    assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0, "tie rounds to even (up)");
    assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 2.0 / 256.0);
    assert_eq!(round_bf16(-3.0), -3.0);
    let x = 0.123_456_79f32;
    assert!(((round_bf16(x) - x) / x).abs() < 1.0 / 256.0);
}

/// The tp = 2 harness (host-staged communicator, sharding, gathering) on CPU ranks: what the
/// GPU check runs, minus the GPU.
#[test]
fn tp2_harness_matches_the_fixture_on_cpu_ranks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dallebart-tiny");
    let (errs, detail) = tp2_fixture(|| Ok(CpuBackend::new()), &dir).unwrap().expect("tiny admits tp=2");
    assert!(errs[0] <= crate::parity::LOSS_TOL, "{detail}");
    assert!(errs[1] <= crate::parity::LOGITS_TOL, "{detail}");
    assert!(errs[2] <= crate::parity::GRAD_REL_TOL, "{detail}");
}

/// Section 1's runner on the CPU (the small cases; `cargo test -p dm-runtime --test grad_check`
/// has the model-sized ones as ignored tests): every case ran and recorded rows, all passing.
#[test]
fn op_cases_run_on_the_cpu_harness() {
    let mut ck = Checker::new(CpuBackend::new());
    ck.section("ops", |c| c.ops(false));
    let bad: Vec<_> = ck.rows.iter().filter(|r| r.status != Status::Pass).collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(ck.rows.len() > 60, "{} rows", ck.rows.len());
    // The library's cases ran, every one of them.
    for case in dm_runtime::conformance::all::<CpuBackend>() {
        let prefix = format!("cpu {}", case.name);
        assert!(ck.rows.iter().any(|r| r.group == "cases" && r.name.starts_with(&prefix)), "{} missing", case.name);
    }
}

#[test]
fn without_a_gpu_the_check_reports_unavailable_and_exit_code_2() {
    if dm_runtime::cuda::available() {
        eprintln!("a GPU is present; skipping the no-GPU behaviour test");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dm-gpu-check-{}", std::process::id()));
    let r = run(Some(&dir)).unwrap();
    assert!(!r.available && r.exit_code() == 2, "{r:?}");
    assert!(r.message.contains("no usable GPU"), "{}", r.message);
    assert!(dir.join("gpu-check.json").is_file());
    std::fs::remove_dir_all(&dir).ok();
}
