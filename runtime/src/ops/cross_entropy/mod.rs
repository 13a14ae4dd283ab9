//! Softmax cross-entropy over logit rows, fused (one device holds every class) or in three
//! vocab-parallel steps (each tensor-parallel rank holds a column slice; the caller all-reduces
//! between the steps). Both write per-row `losses` and overwrite `logits` with the gradient
//! `grad_scale·(softmax − onehot)` (0 on padding columns). Nothing is accumulated.
//! CPU: [`cpu`]; CUDA: `cross_entropy.cu` (one block a row).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::{Result, RuntimeError};
use crate::ops::checks::{check_f32, check_len, check_valid, rows_of};
use crate::ops::{HostIds, Storage};

/// [`crate::Backend::cross_entropy_fused`].
pub struct Fused<'a, T, I> {
    pub logits: &'a mut T,
    pub losses: &'a mut T,
    pub targets: &'a I,
    pub classes: usize,
    pub grad_scale: f32,
}

/// [`crate::Backend::vocab_parallel_max`], step 1.
pub struct VocabMax<'a, T> {
    pub row_max: &'a mut T,
    pub logits: &'a T,
    pub cols: usize,
    pub valid_cols: usize,
}

/// [`crate::Backend::vocab_parallel_sums`], step 2.
pub struct VocabSums<'a, T, I> {
    pub stats: &'a mut T,
    pub logits: &'a T,
    pub row_max: &'a T,
    pub targets: &'a I,
    pub cols: usize,
    pub valid_cols: usize,
    pub vocab_start: usize,
}

/// [`crate::Backend::vocab_parallel_grad`], step 3.
pub struct VocabGrad<'a, T, I> {
    pub logits: &'a mut T,
    pub losses: &'a mut T,
    pub row_max: &'a T,
    pub stats: &'a T,
    pub targets: &'a I,
    pub cols: usize,
    pub valid_cols: usize,
    pub vocab_start: usize,
    pub grad_scale: f32,
}

impl<T: Storage, I: Storage + HostIds> Fused<'_, T, I> {
    /// Lengths, and every target inside `0..classes` (read from the ids' host copy).
    pub fn check(&self) -> Result<()> {
        let op = "cross_entropy_fused";
        let rows = rows_of(op, self.logits.elems(), self.classes)?;
        check_len(op, "losses", self.losses.elems(), rows)?;
        check_f32(op, "losses", self.losses)?;
        check_len(op, "targets", self.targets.elems(), rows)?;
        let classes = self.classes;
        if let Some((r, &t)) = self.targets.host_ids().iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= classes)
        {
            return Err(RuntimeError::Invalid { op, detail: format!("target {t} at row {r} is outside 0..{classes}") });
        }
        Ok(())
    }
}

/// Rows of `[rows, cols]` logits with `valid_cols` real columns, and the per-row buffers.
fn check_rows(
    op: &'static str,
    logits: usize,
    cols: usize,
    valid_cols: usize,
    per_row: &[(&str, usize, usize)],
) -> Result<()> {
    let rows = rows_of(op, logits, cols)?;
    for &(what, got, per) in per_row {
        check_len(op, what, got, per * rows)?;
    }
    check_valid(op, cols, valid_cols)
}

impl<T: Storage> VocabMax<'_, T> {
    pub fn check(&self) -> Result<()> {
        let per_row = [("row_max", self.row_max.elems(), 1)];
        check_f32("vocab_parallel_max", "row_max", self.row_max)?;
        check_rows("vocab_parallel_max", self.logits.elems(), self.cols, self.valid_cols, &per_row)
    }
}

impl<T: Storage, I: Storage> VocabSums<'_, T, I> {
    pub fn check(&self) -> Result<()> {
        let per_row = [
            ("stats", self.stats.elems(), 2),
            ("row_max", self.row_max.elems(), 1),
            ("targets", self.targets.elems(), 1),
        ];
        check_f32("vocab_parallel_sums", "stats", self.stats)?;
        check_f32("vocab_parallel_sums", "row_max", self.row_max)?;
        check_rows("vocab_parallel_sums", self.logits.elems(), self.cols, self.valid_cols, &per_row)
    }
}

impl<T: Storage, I: Storage> VocabGrad<'_, T, I> {
    pub fn check(&self) -> Result<()> {
        let per_row = [
            ("losses", self.losses.elems(), 1),
            ("row_max", self.row_max.elems(), 1),
            ("stats", self.stats.elems(), 2),
            ("targets", self.targets.elems(), 1),
        ];
        for (what, buf) in [("losses", &*self.losses), ("row_max", self.row_max), ("stats", self.stats)] {
            check_f32("vocab_parallel_grad", what, buf)?;
        }
        check_rows("vocab_parallel_grad", self.logits.elems(), self.cols, self.valid_cols, &per_row)
    }
}
