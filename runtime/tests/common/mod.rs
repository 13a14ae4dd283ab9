//! Shared helpers for the numeric tests: the conformance numerics of the library
//! (`dm_runtime::conformance::numerics`) plus a panicking bound check for CPU-only tests.
#![allow(dead_code)]

pub use dm_runtime::conformance::numerics::*;

#[track_caller]
pub fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    match within_bound(got, want, bound) {
        Ok(worst) => eprintln!("{what}: worst err/bound = {worst:.3}"),
        Err(e) => panic!("{what}: {e}"),
    }
}
