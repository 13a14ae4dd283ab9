//! Embedding gather (forward) and scatter-add (backward) over the vocabulary rows one rank holds.

use crate::backend::VocabRange;
use rayon::prelude::*;

#[inline]
fn local_row(id: i32, range: VocabRange) -> Option<usize> {
    let id = usize::try_from(id).ok()?;
    (range.start..range.end).contains(&id).then(|| id - range.start)
}

pub fn forward(out: &mut [f32], table: &[f32], ids: &[i32], range: VocabRange, dim: usize) {
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &id)| match local_row(id, range) {
        Some(r) => o.copy_from_slice(&table[r * dim..(r + 1) * dim]),
        None => o.fill(0.0),
    });
}

pub fn backward(dtable: &mut [f32], dout: &[f32], ids: &[i32], range: VocabRange, dim: usize) {
    // Tokens are few (batch × length) and rows may repeat: a serial scatter is exact and fast.
    for (g, &id) in dout.chunks(dim).zip(ids) {
        if let Some(r) = local_row(id, range) {
            for (d, g) in dtable[r * dim..(r + 1) * dim].iter_mut().zip(g) {
                *d += g;
            }
        }
    }
}
