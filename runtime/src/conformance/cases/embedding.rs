//! See [`super`].

use super::*;

/// `out[i] = table[ids[i] − start]` for ids in the range, zero rows otherwise.
pub fn embedding_ref(table: &[f64], ids: &[i32], range: VocabRange, dim: usize) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * dim];
    for (i, &id) in ids.iter().enumerate() {
        if id >= range.start as i32 && id < range.end as i32 {
            let r = id as usize - range.start;
            out[i * dim..(i + 1) * dim].copy_from_slice(&table[r * dim..(r + 1) * dim]);
        }
    }
    out
}

pub fn embedding_case<B: Backend>(
    be: &B,
    ck: &mut Checks,
    vocab: usize,
    range: VocabRange,
    dim: usize,
    ids: &[i32],
    fd: FdEntries,
) -> CaseResult {
    let case = format!("embedding vocab={vocab} range={}..{} dim={dim} tokens={}", range.start, range.end, ids.len());
    let mut rng = rng_for(&case);
    let table = normal(&mut rng, range.len() * dim, 0.0, 1.0);
    let w = normal(&mut rng, ids.len() * dim, 0.0, 1.0);
    let dtable0 = normal(&mut rng, range.len() * dim, 0.0, 1.0);

    let (tb, wb, idb) = (up(be, "table", &table)?, up(be, "dout", &w)?, up_ids(be, "ids", ids)?);
    let mut out = nan_buf(be, "out", ids.len() * dim)?;
    be.embedding_forward(&mut out, &tb, &idb, range, dim)?;
    let t64 = f64s(&table);
    // A gather is a copy: exact (bound 0), zero rows included.
    let want = embedding_ref(&t64, ids, range, dim);
    ck.within(&format!("{case}: forward"), &down(be, &out)?, &want, &vec![0.0; want.len()]);

    let mut dtable = up(be, "dtable", &dtable0)?;
    be.embedding_backward(&mut dtable, &wb, &idb, range, dim)?;
    let w64 = f64s(&w);
    let (at, g) = fd_grads_picked(&mut rng, &[t64], fd, |x| weighted_sum(&w64, &embedding_ref(&x[0], ids, range, dim)));
    let got = down(be, &dtable)?;
    let want = add64(&g[0], &pick(&f64s(&dtable0), &at[0]));
    ck.grad(&format!("{case}: dtable (accumulated)"), &pick(&got, &at[0]), &want);
    // Rows no in-range id refers to are left exactly as they were.
    let referred: std::collections::HashSet<i32> = ids.iter().copied().collect();
    let changed: Vec<i32> = (0..range.len())
        .filter(|&r| !referred.contains(&((range.start + r) as i32)))
        .filter(|&r| got[r * dim..(r + 1) * dim] != dtable0[r * dim..(r + 1) * dim])
        .map(|r| (range.start + r) as i32)
        .collect();
    check_eq!(ck, changed, Vec::<i32>::new(), "{case}: rows of ids not looked up left alone (ids changed)");
    Ok(())
}

pub fn embedding_full_range_with_repeats<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    let mut rng = rng_for("embedding full ids");
    let mut ids: Vec<i32> = (0..40).map(|_| rand::Rng::random_range(&mut rng, 0..11)).collect();
    ids.extend([3, 3, 3, 0, 10]); // repeats accumulate, both ends of the vocabulary
    embedding_case(be, ck, 11, VocabRange::full(11), 6, &ids, FdEntries::All)?;
    Ok(())
}

pub fn embedding_partial_range<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    // A tensor-parallel rank holding rows 5..12 of a 20-row vocabulary: ids below, above, at both
    // edges and negative; repeated in-range ids.
    let ids = [4, 5, 11, 12, 7, 7, 19, 0, -1, 5, 8, 7, 13, 11];
    embedding_case(be, ck, 20, VocabRange { start: 5, end: 12 }, 9, &ids, FdEntries::All)?;
    let mut rng = rng_for("embedding partial ids");
    let ids: Vec<i32> = (0..64).map(|_| rand::Rng::random_range(&mut rng, -2..34)).collect();
    embedding_case(be, ck, 32, VocabRange { start: 16, end: 32 }, 5, &ids, FdEntries::All)?;
    Ok(())
}
