//! Numeric checks of every op of the `Backend` trait, through the trait only, with one test body
//! (`backend_ops/body.rs`) instantiated for every backend: `cpu::*` always runs; `cuda::*` runs on
//! GPU 0 where one is present and otherwise prints `SKIP cuda::<test>: <reason>` (set
//! `DM_TESTS_REQUIRE_GPU=1` to make a missing GPU a failure instead).
//!
//! For each op and case, on fresh seeded random inputs (the seed is a hash of the case name):
//! * forward: the f32 output against a naive f64 reference written here, element by element,
//!   within an error bound derived from f32 rounding (see the comment at each bound);
//! * backward: the analytic f32 gradient against central finite differences of the f64
//!   reference, for the scalar loss L = Σ w ⊙ output with fixed random weights w (so the
//!   backward is fed `dout = w`), as `max|got − want| / max|want|` per tensor ≤ `GRAD_TOL`.
//!
//! Output buffers the ops claim to overwrite are pre-filled with NaN, so an op that reads them
//! fails. Parameter gradients (which the trait accumulates) start from random values.
//! The `*_rejects_*` tests at the end show that the bounds are tight enough to catch plausible
//! bugs (a wrong transpose, a missing 1/√d, unbiased variance, tanh GELU, …).

mod common;

mod cpu {
    use super::common::*;
    use dm_runtime::cpu::CpuBackend;
    use dm_runtime::{AdamWStep, AttentionShape, Backend, MatmulSpec, RuntimeError, VocabRange};

    type Be = CpuBackend;
    type Buf = <Be as Backend>::Buf;
    type Ids = <Be as Backend>::Ids;

    fn backend() -> Be {
        CpuBackend::new()
    }

    fn runs_here(_test: &str) -> Option<()> {
        Some(())
    }

    include!("backend_ops/body.rs");

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
    use super::common::*;
    use dm_runtime::cuda::{CudaBackend, CudaOptions};
    use dm_runtime::{AdamWStep, AttentionShape, Backend, MatmulSpec, RuntimeError, VocabRange};

    type Be = CudaBackend;
    type Buf = <Be as Backend>::Buf;
    type Ids = <Be as Backend>::Ids;

    /// GPU 0 in the parity mode (f32, custom kernels); only called after `runs_here` said yes.
    fn backend() -> Be {
        CudaBackend::new(0, CudaOptions::default()).expect("GPU 0 opened a moment ago by `runs_here`")
    }

    /// `None`, after printing why, where no usable GPU is present (a failure instead with
    /// `DM_TESTS_REQUIRE_GPU=1`).
    fn runs_here(test: &str) -> Option<()> {
        let Err(e) = CudaBackend::new(0, CudaOptions::default()) else { return Some(()) };
        assert!(std::env::var("DM_TESTS_REQUIRE_GPU").as_deref() != Ok("1"), "cuda::{test}: {e}");
        eprintln!("SKIP cuda::{test}: no usable GPU ({e})");
        None
    }

    include!("backend_ops/body.rs");
}
