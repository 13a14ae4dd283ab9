//! Dense matrix product (GEMM).
//!
//! Computes `out[m, n] (= | +=) op(a)[m, k] · op(b)[k, n]`, all row-major f32. Accumulates into
//! `out` only when [`MatmulSpec::accumulate`] says so. CPU: [`cpu`] (the `gemm` crate); CUDA:
//! `matmul.cu` (f32 SIMT or bf16 tensor cores) or cuBLAS, chosen by `runtime/src/cuda`.

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::Storage;

/// `out[m, n] (= | +=) op(a)[m, k] · op(b)[k, n]`, all row-major.
/// `a` is stored `[m, k]`, or `[k, m]` when `trans_a`; `b` is stored `[k, n]`, or `[n, k]` when `trans_b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Add into `out` instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulSpec {
    /// `out = a · b` with `a: [m, k]`, `b: [k, n]`.
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, trans_a: false, trans_b: false, accumulate: false }
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// The buffers of one [`crate::Backend::matmul`] call.
pub struct Matmul<'a, T> {
    pub out: &'a mut T,
    pub a: &'a T,
    pub b: &'a T,
    pub spec: MatmulSpec,
}

impl<T: Storage> Matmul<'_, T> {
    /// `a` holds `m·k`, `b` `k·n` and `out` `m·n` elements (`DM_DEBUG_SHAPES` prints where a
    /// mismatch came from).
    pub fn check(&self) -> Result<()> {
        let s = self.spec;
        let lens =
            [("a", self.a.elems(), s.m * s.k), ("b", self.b.elems(), s.k * s.n), ("out", self.out.elems(), s.m * s.n)];
        if let Some((what, got, want)) = lens.iter().find(|(_, got, want)| got != want) {
            if std::env::var_os("DM_DEBUG_SHAPES").is_some() {
                eprintln!("{}", std::backtrace::Backtrace::force_capture());
            }
            return Err(RuntimeError::Shape {
                op: "matmul",
                detail: format!("{what} has {got} elements, expected {want} for {s:?}"),
            });
        }
        Ok(())
    }
}
