//! The op conformance cases of `dm_runtime::conformance` (one body per case, generic over the
//! backend), one `#[test]` per case and backend: `cpu::*` always runs; `cuda::*` runs on GPU 0
//! where one is present and otherwise prints `SKIP cuda::<test>: <reason>` (set
//! `DM_TESTS_REQUIRE_GPU=1` to make a missing GPU a failure instead). Each test prints its rows
//! and fails listing every row that failed.

use dm_runtime::conformance::{run_case, CaseResult, Checks};
use dm_runtime::Backend;

/// Runs one case on `be`, prints every row, and panics listing the failed ones.
fn run_and_report<B: Backend>(test: &str, run: fn(&B, &mut Checks) -> CaseResult, be: &B) {
    let rows = run_case(test, run, be);
    let mut failed = Vec::new();
    for r in &rows {
        let err = r.max_error.map_or_else(|| "-".to_string(), |e| format!("{e:.3e}"));
        let tol = r.tolerance.map_or_else(|| "-".to_string(), |t| format!("{t:.1e}"));
        let status = if r.passed { "ok" } else { "FAIL" };
        eprintln!("{status:4} {test}: {} (error {err}, tolerance {tol}) {}", r.name, r.detail);
        if !r.passed {
            failed.push(format!("{}: {}", r.name, r.detail));
        }
    }
    assert!(failed.is_empty(), "{test}: {} of {} rows failed:\n{}", failed.len(), rows.len(), failed.join("\n"));
}

/// One `#[test]` per case, on the backend `backend()` of the enclosing module.
macro_rules! case_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let Some(be) = backend(stringify!($name)) else { return };
                super::run_and_report(stringify!($name), dm_runtime::conformance::cases::$name::<Be>, &be);
            }
        )*
    };
}

/// The model-sized cases as `#[ignore]`d tests (seconds to minutes each on the CPU; run them
/// with `-- --ignored`; `gpu-check` runs them on every GPU variant).
macro_rules! large_case_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            #[ignore = "model-sized: run with --ignored (gpu-check runs them on the GPU)"]
            fn $name() {
                let Some(be) = backend(stringify!($name)) else { return };
                super::run_and_report(stringify!($name), dm_runtime::conformance::cases::$name::<Be>, &be);
            }
        )*
    };
}

mod cpu {
    use dm_runtime::cpu::CpuBackend;
    use dm_runtime::{Backend, RuntimeError};

    type Be = CpuBackend;

    fn backend(_test: &str) -> Option<Be> {
        Some(CpuBackend::new())
    }

    dm_runtime::for_each_conformance_case!(case_tests);
    dm_runtime::for_each_large_conformance_case!(large_case_tests);

    #[test]
    fn budget_refusal_names_the_tensor() {
        let be = CpuBackend::with_budget("cpu:budgeted", Some(1 << 20));
        let run = |be: &Be, ck: &mut dm_runtime::conformance::Checks| {
            dm_runtime::conformance::budget_refusal_names_the_tensor(be, ck, 1 << 20)
        };
        super::run_and_report("budget_refusal_names_the_tensor", run, &be);
    }

    // ---- CPU only: the memory tracker's byte counts of host buffers ----------------------

    #[test]
    fn memory_is_accounted_and_budget_refusals_name_the_tensor() {
        let be = CpuBackend::with_budget("cpu:test", Some(64 * 1024));
        assert_eq!(be.name(), "cpu:test");
        let report = |be: &CpuBackend| be.memory().report();
        {
            let a = be.zeros("a", 1000).unwrap();
            let b = be.upload("b", &[1.0; 250]).unwrap();
            let ids = be.upload_ids("ids", &[1; 100]).unwrap();
            assert_eq!(report(&be).current_bytes, 4000 + 1000 + 400);
            {
                let _c = be.zeros("c", 2000).unwrap();
                assert_eq!(report(&be).current_bytes, 13_400);
            }
            assert_eq!(report(&be).current_bytes, 5400);
            assert_eq!(report(&be).peak_bytes, 13_400);

            let err = be.zeros("decoder.logits", 1 << 20).unwrap_err();
            assert!(
                matches!(&err, RuntimeError::OutOfBudget { tensor, requested: 4_194_304, budget: 65_536, .. } if tensor == "decoder.logits"),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("decoder.logits") && msg.contains("cpu:test"), "{msg}");
            assert!(be.upload("big.upload", &vec![0.0; 20_000]).unwrap_err().to_string().contains("big.upload"));
            assert!(be.upload_ids("big.ids", &vec![0; 20_000]).unwrap_err().to_string().contains("big.ids"));
            assert_eq!(report(&be).current_bytes, 5400, "refused allocations register nothing");
            drop((a, b, ids));
        }
        assert_eq!(report(&be).current_bytes, 0, "every buffer released");
        assert_eq!(report(&be).budget_bytes, Some(65_536));
        // The whole budget is usable once the rest is freed; clones share the tracker.
        let clone = be.clone();
        let all = clone.zeros("all", 16 * 1024).unwrap();
        assert_eq!(report(&be).current_bytes, 65_536);
        assert!(be.zeros("one.more", 1).is_err());
        drop(all);
        assert_eq!(report(&be).current_bytes, 0);
    }
}

mod cuda {
    use dm_runtime::cuda::{CudaBackend, CudaOptions};

    type Be = CudaBackend;

    /// GPU 0 in the parity mode (f32, custom kernels), or `None` after printing why where no
    /// usable GPU is present (a failure instead with `DM_TESTS_REQUIRE_GPU=1`).
    fn backend(test: &str) -> Option<Be> {
        match CudaBackend::new(0, CudaOptions::default()) {
            Ok(be) => Some(be),
            Err(e) => {
                assert!(std::env::var("DM_TESTS_REQUIRE_GPU").as_deref() != Ok("1"), "cuda::{test}: {e}");
                eprintln!("SKIP cuda::{test}: no usable GPU ({e})");
                None
            }
        }
    }

    dm_runtime::for_each_conformance_case!(case_tests);
    dm_runtime::for_each_large_conformance_case!(large_case_tests);

    /// The cases for a backend that rounds bf16 operands itself, on GPU 0 in bf16-mixed (custom
    /// kernels and cuBLAS).
    #[test]
    fn bf16_mixed_cases_on_custom_kernels_and_cublas() {
        use dm_runtime::cuda::{MatmulImpl, Precision};
        let Some(be) = backend("bf16_mixed_cases_on_custom_kernels_and_cublas") else { return };
        for matmul in [MatmulImpl::Custom, MatmulImpl::Cublas] {
            let be = be.with_options(Precision::Bf16Mixed, matmul);
            for case in dm_runtime::conformance::bf16_mixed_cases::<Be>() {
                super::run_and_report(&format!("{} {matmul:?}", case.name), case.run, &be);
            }
        }
    }

    #[test]
    fn budget_refusal_names_the_tensor() {
        let Some(_) = backend("budget_refusal_names_the_tensor") else { return };
        let be = CudaBackend::new(0, CudaOptions { memory_budget: Some(1 << 20), ..Default::default() }).unwrap();
        let run = |be: &Be, ck: &mut dm_runtime::conformance::Checks| {
            dm_runtime::conformance::budget_refusal_names_the_tensor(be, ck, 1 << 20)
        };
        super::run_and_report("budget_refusal_names_the_tensor", run, &be);
    }
}
