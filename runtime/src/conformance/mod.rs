//! The op conformance checks: one body per case, generic over [`Backend`], that `cargo test`
//! runs on the CPU always and on CUDA where a GPU is present, and `dalle-mesh gpu-check` runs on
//! the GPU. A case never panics on a wrong result: every comparison becomes a [`CheckRow`]
//! (name, worst error, tolerance, pass/fail) and the runner decides.
//!
//! For each op and case, on fresh seeded random inputs (the seed is a hash of the case name):
//! * forward: the f32 output against a naive f64 reference, element by element, within an error
//!   bound derived from f32 rounding (see the comment at each bound); the row's error is the
//!   worst `|got − want| / bound`, its tolerance 1;
//! * backward: the analytic f32 gradient against central finite differences of the f64
//!   reference, for the scalar loss L = Σ w ⊙ output with fixed random weights w (so the
//!   backward is fed `dout = w`), as `max|got − want| / max|want|` per tensor ≤ [`GRAD_TOL`].
//!
//! Output buffers the ops claim to overwrite are pre-filled with NaN, so an op that reads them
//! fails. Parameter gradients (which the trait accumulates) start from random values. The
//! `*_rejects_*` cases show that the bounds are tight enough to catch plausible bugs (a wrong
//! transpose, a missing 1/√d, unbiased variance, tanh GELU, …).
//!
//! [`GRAD_TOL`]: numerics::GRAD_TOL

pub mod numerics;

use crate::Backend;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One comparison of a case.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRow {
    /// The case and what was compared, e.g. `matmul 7x13x5 …: forward`.
    pub name: String,
    /// The worst error in the units of `tolerance` (None for yes/no checks).
    pub max_error: Option<f64>,
    pub tolerance: Option<f64>,
    pub passed: bool,
    /// Why it failed, or a detail worth printing.
    pub detail: String,
}

/// An error that ends a case early (a backend call that failed, a bad call that was accepted);
/// the runner turns it into a failed row.
pub type CaseError = Box<dyn std::error::Error + Send + Sync>;
pub type CaseResult = std::result::Result<(), CaseError>;

/// The rows one case records.
#[derive(Debug, Default)]
pub struct Checks {
    pub rows: Vec<CheckRow>,
}

impl Checks {
    fn push(&mut self, name: &str, max_error: Option<f64>, tolerance: Option<f64>, passed: bool, detail: String) {
        self.rows.push(CheckRow { name: name.to_string(), max_error, tolerance, passed, detail });
    }

    /// |got[i] − want[i]| ≤ bound[i] for every element (NaN/inf in `got` always fails).
    pub fn within(&mut self, what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
        let worst = numerics::worst_ratio(got, want, bound);
        match numerics::within_bound(got, want, bound) {
            Ok(_) => self.push(what, Some(worst), Some(1.0), true, String::new()),
            Err(e) => self.push(what, Some(worst), Some(1.0), false, e),
        }
    }

    /// An analytic gradient against its finite-difference reference, within `GRAD_TOL`.
    pub fn grad(&mut self, what: &str, got: &[f32], want: &[f64]) {
        let tol = numerics::GRAD_TOL;
        match numerics::grad_rel(got, want) {
            Ok(e) if e.rel <= tol => self.push(what, Some(e.rel), Some(tol), true, String::new()),
            Ok(e) => self.push(what, Some(e.rel), Some(tol), false, e.describe(tol)),
            Err(why) => self.push(what, None, Some(tol), false, why),
        }
    }

    /// A yes/no check.
    pub fn holds(&mut self, what: &str, ok: bool, detail: String) {
        self.push(what, None, None, ok, if ok { String::new() } else { detail });
    }

    pub fn failed(&self) -> impl Iterator<Item = &CheckRow> {
        self.rows.iter().filter(|r| !r.passed)
    }
}

/// `check!(ck, cond)` / `check!(ck, cond, "message {x}")`: a yes/no row named by the message
/// (or the condition), failing when `cond` is false.
macro_rules! check {
    ($ck:expr, $cond:expr $(,)?) => {
        $ck.holds(stringify!($cond), $cond, String::from("false"))
    };
    ($ck:expr, $cond:expr, $($msg:tt)+) => {{
        let what = format!($($msg)+);
        $ck.holds(&what, $cond, String::from("false"))
    }};
}

/// `check_eq!(ck, a, b)` / `check_eq!(ck, a, b, "message")`: a row failing when `a != b`,
/// printing both sides.
macro_rules! check_eq {
    ($ck:expr, $a:expr, $b:expr $(,)?) => {
        check_eq!($ck, $a, $b, "{} == {}", stringify!($a), stringify!($b))
    };
    ($ck:expr, $a:expr, $b:expr, $($msg:tt)+) => {{
        let (a, b) = (&$a, &$b);
        let what = format!($($msg)+);
        let ok = *a == *b;
        let detail = if ok { String::new() } else { format!("left {:?}, right {:?}", a, b) };
        $ck.holds(&what, ok, detail)
    }};
}

pub mod cases;

/// One named case: its body, generic over the backend.
pub struct Case<B: Backend> {
    pub name: &'static str,
    pub run: fn(&B, &mut Checks) -> CaseResult,
}

/// Calls `$m! { name, name, … }` with every case of [`cases`], so the list is written once: the
/// library's [`all`] and the `#[test]` wrappers of `runtime/tests/grad_check.rs` read it.
#[macro_export]
macro_rules! for_each_conformance_case {
    ($m:ident) => {
        $m! {
            matmul_odd_sizes_all_transposes_and_accumulate,
            matmul_thin_shapes,
            matmul_parallel_path_all_transposes,
            matmul_empty_inner_dimension,
            layernorm_with_scale,
            layernorm_bias_only,
            layernorm_shard_ops_against_f64,
            gelu_glu_forward_and_backward,
            embedding_full_range_with_repeats,
            embedding_partial_range,
            attention_cross_no_mask,
            attention_cross_key_padding_and_fully_masked_batch_row,
            attention_causal,
            attention_causal_with_key_padding,
            cross_entropy_odd_class_counts,
            cross_entropy_rejects_out_of_range_targets,
            vocab_parallel_cross_entropy_against_f64,
            matmul_bf16_storage_odd_sizes,
            attention_bf16_storage,
            adamw_matches_optax_for_three_steps,
            adamw_rejects_step_zero,
            elementwise_ops_are_exact,
            broadcast_rows_add_and_sum,
            matmul_shape_errors,
            layernorm_shape_errors,
            attention_shape_errors,
            other_ops_shape_errors,
            matmul_bound_rejects_a_wrong_transpose,
            attention_checks_reject_a_missing_scale_and_a_stopped_masked_gradient,
            layernorm_bound_rejects_unbiased_variance_and_missing_eps,
            gelu_bound_rejects_the_tanh_approximation,
            cross_entropy_checks_reject_a_missing_grad_scale,
            adamw_bound_rejects_missing_bias_correction,
            bf16_bound_rejects_unrounded_and_truncated_operands,
            sharded_bounds_reject_a_missing_bias_and_an_unscaled_gradient,
        }
    };
}

/// Calls `$m! { … }` with the model-sized cases ([`cases::large`]'s): kept out of `cargo test`
/// (their f64 references take seconds each on one core); `gpu-check` runs them, and
/// `runtime/tests/grad_check.rs` has them as `#[ignore]`d tests (`-- --ignored`).
#[macro_export]
macro_rules! for_each_large_conformance_case {
    ($m:ident) => {
        $m! {
            large_matmul_model_shapes,
            large_layernorm_model_widths,
            large_layernorm_shard_of_mega,
            large_attention_model_shapes,
            large_cross_entropy_image_vocab,
            large_embedding_image_vocab,
            large_gelu_glu_and_elementwise,
        }
    };
}

macro_rules! case_list {
    ($($name:ident),* $(,)?) => {
        /// Every case, in the order of [`for_each_conformance_case`].
        pub fn all<B: Backend>() -> Vec<Case<B>> {
            vec![$(Case { name: stringify!($name), run: cases::$name::<B> }),*]
        }
    };
}
for_each_conformance_case!(case_list);

macro_rules! large_case_list {
    ($($name:ident),* $(,)?) => {
        /// The model-sized cases, in the order of [`for_each_large_conformance_case`].
        pub fn large_cases<B: Backend>() -> Vec<Case<B>> {
            vec![$(Case { name: stringify!($name), run: cases::$name::<B> }),*]
        }
    };
}
for_each_large_conformance_case!(large_case_list);

/// The cases for a backend that rounds f32 GEMM and attention operands to bf16 itself (CUDA's
/// `Precision::Bf16Mixed`); on any other backend they fail (its results are not rounded), so
/// only such a backend runs them. Their bodies run on bf16 storage in [`all`].
pub fn bf16_mixed_cases<B: Backend>() -> Vec<Case<B>> {
    vec![
        Case { name: "matmul_bf16_rounded_by_backend", run: cases::matmul_bf16_rounded_by_backend::<B> },
        Case { name: "attention_bf16_rounded_by_backend", run: cases::attention_bf16_rounded_by_backend::<B> },
    ]
}

/// A backend whose memory budget is `budget` bytes refuses a larger allocation with an error
/// that names the tensor and the device, and registers nothing (all backends share the tracker,
/// so this holds for each; the caller makes the budgeted backend).
pub fn budget_refusal_names_the_tensor<B: Backend>(be: &B, ck: &mut Checks, budget: u64) -> CaseResult {
    let report = be.memory().report();
    check_eq!(ck, report.budget_bytes, Some(budget), "the backend has the budget");
    let before = report.current_bytes;
    let elems = (budget / 4 + 1) as usize;
    match be.zeros("too.big.tensor", elems) {
        Ok(_) => check!(ck, false, "a {}-byte allocation passed a {budget}-byte budget", 4 * elems),
        Err(e) => {
            let msg = e.to_string();
            check!(ck, msg.contains("too.big.tensor") && msg.contains(&be.name()), "the refusal names both: {msg}");
        }
    }
    check_eq!(ck, be.memory().report().current_bytes, before, "a refused allocation registers nothing");
    Ok(())
}

/// Runs one case on `be`: its rows, plus a failed row when it ended early with an error, when it
/// panicked, or when it recorded nothing (a case that checks nothing must not pass).
pub fn run_case<B: Backend>(name: &str, run: fn(&B, &mut Checks) -> CaseResult, be: &B) -> Vec<CheckRow> {
    let mut ck = Checks::default();
    let outcome = catch_unwind(AssertUnwindSafe(|| run(be, &mut ck)));
    let end = match outcome {
        Ok(Ok(())) if ck.rows.is_empty() => Some("the case recorded no check".to_string()),
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("ended early: {e}")),
        Err(panic) => Some(format!("panicked: {}", panic_message(panic.as_ref()))),
    };
    if let Some(detail) = end {
        ck.push(name, None, None, false, detail);
    }
    ck.rows
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_string())
}

/// Runs every case on backends from `backend` (a fresh one per case); rows are named
/// `<case>: <what>`.
pub fn run_all<B: Backend>(backend: impl FnMut() -> crate::Result<B>) -> Vec<CheckRow> {
    run_list(all::<B>(), backend)
}

/// Runs the cases of `list` ([`all`], [`large_cases`], [`bf16_mixed_cases`]) like [`run_all`].
pub fn run_list<B: Backend>(list: Vec<Case<B>>, mut backend: impl FnMut() -> crate::Result<B>) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    for case in list {
        match backend() {
            Ok(be) => rows.extend(run_case(case.name, case.run, &be).into_iter().map(|mut r| {
                if r.name != case.name {
                    r.name = format!("{}: {}", case.name, r.name);
                }
                r
            })),
            Err(e) => rows.push(CheckRow {
                name: case.name.to_string(),
                max_error: None,
                tolerance: None,
                passed: false,
                detail: format!("opening the backend failed: {e}"),
            }),
        }
    }
    rows
}
