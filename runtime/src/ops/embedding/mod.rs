//! Token embeddings over a (possibly vocab-sharded) table.
//!
//! [`Forward`]: `out[i, :] = table[ids[i] − range.start, :]` for ids in `range`, zeros otherwise;
//! `table` holds `range.len()` rows of `dim` (overwritten output). [`Backward`]: scatter-add
//! `dtable[ids[i] − range.start, :] += dout[i, :]` for ids in `range` (accumulated).
//! CPU: [`cpu`]; CUDA: `embedding.cu` (the backward with atomicAdd).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::checks::{check_f32, check_len};
use crate::ops::Storage;

/// The half-open row range `[start, end)` of a vocabulary that one tensor-parallel rank holds.
/// Ids outside it contribute nothing on that rank. At tp = 1 it is the whole vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabRange {
    pub start: usize,
    pub end: usize,
}

impl VocabRange {
    pub fn full(rows: usize) -> Self {
        Self { start: 0, end: rows }
    }
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// [`crate::Backend::embedding_forward`].
pub struct Forward<'a, T, I> {
    pub out: &'a mut T,
    pub table: &'a T,
    pub ids: &'a I,
    pub range: VocabRange,
    pub dim: usize,
}

/// [`crate::Backend::embedding_backward`].
pub struct Backward<'a, T, I> {
    pub dtable: &'a mut T,
    pub dout: &'a T,
    pub ids: &'a I,
    pub range: VocabRange,
    pub dim: usize,
}

/// A non-empty `dim`, an ordered range, a table of `range.len()` rows and an activation of one
/// row per id.
fn check(
    op: &'static str,
    table: (&str, usize),
    rows: (&str, usize),
    ids: usize,
    range: VocabRange,
    dim: usize,
) -> Result<()> {
    if dim == 0 || range.start > range.end {
        return Err(RuntimeError::Invalid {
            op,
            detail: format!("dim {dim} and vocab range {range:?} must be non-empty"),
        });
    }
    check_len(op, table.0, table.1, range.len() * dim)?;
    check_len(op, rows.0, rows.1, ids * dim)
}

impl<T: Storage, I: Storage> Forward<'_, T, I> {
    pub fn check(&self) -> Result<()> {
        let (table, out) = (("table", self.table.elems()), ("out", self.out.elems()));
        check("embedding_forward", table, out, self.ids.elems(), self.range, self.dim)
    }
}

impl<T: Storage, I: Storage> Backward<'_, T, I> {
    pub fn check(&self) -> Result<()> {
        let (dtable, dout) = (("dtable", self.dtable.elems()), ("dout", self.dout.elems()));
        check_f32("embedding_backward", "dtable", self.dtable)?;
        check("embedding_backward", dtable, dout, self.ids.elems(), self.range, self.dim)
    }
}
