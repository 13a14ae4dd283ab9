//! See [`super`].

use super::*;

pub fn elementwise_ops_are_exact<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    elementwise_case(be, ck, 70_001) // several parallel chunks plus a ragged tail
}

/// add, add_assign, scale (bit-exact), sum_squares (within γ), fill/write/copy and their refusals
/// on `n` elements.
pub fn elementwise_case<B: Backend>(be: &B, ck: &mut Checks, n: usize) -> CaseResult {
    let mut rng = rng_for(&format!("elementwise n={n}"));
    let (a, b) = (normal(&mut rng, n, 0.0, 2.0), normal(&mut rng, n, 1.0, 3.0));
    let (ab, bb) = (up(be, "a", &a)?, up(be, "b", &b)?);

    // One f32 rounding each, so the results must equal the host's f32 arithmetic bit for bit.
    let mut out = nan_buf(be, "out", n)?;
    be.add(&mut out, &ab, &bb)?;
    check!(ck, down(be, &out)?.iter().zip(a.iter().zip(&b)).all(|(o, (a, b))| o.to_bits() == (a + b).to_bits()), "add");
    let mut acc = up(be, "acc", &a)?;
    be.add_assign(&mut acc, &bb)?;
    check!(
        ck,
        down(be, &acc)?.iter().zip(a.iter().zip(&b)).all(|(o, (a, b))| o.to_bits() == (a + b).to_bits()),
        "add_assign"
    );
    be.scale(&mut acc, -0.37)?;
    check!(
        ck,
        down(be, &acc)?.iter().zip(a.iter().zip(&b)).all(|(o, (a, b))| o.to_bits() == ((a + b) * -0.37).to_bits()),
        "scale"
    );

    // Σx² in f32 runs of 256 summed in f64: relative error ≤ γ₂₅₇ (the square plus the run).
    let want: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
    let got = be.sum_squares(&ab)?;
    check!(ck, (got - want).abs() <= gamma(257) * want, "sum_squares {got} vs {want}");
    check_eq!(ck, be.sum_squares(&be.zeros("z", 0)?)?, 0.0);

    // fill, write, copy: data movement, exact.
    let mut f = nan_buf(be, "f", n)?;
    be.fill(&mut f, 3.25)?;
    check!(ck, down(be, &f)?.iter().all(|&x| x == 3.25), "fill");
    be.write(&mut f, 10, &[1.0, 2.0, 3.0])?;
    be.copy(&mut f, n - 4, &ab, 5, 4)?;
    let got = down(be, &f)?;
    check_eq!(ck, &got[8..14], &[3.25, 3.25, 1.0, 2.0, 3.0, 3.25]);
    check_eq!(ck, &got[n - 5..], &[3.25, a[5], a[6], a[7], a[8]]);
    check!(ck, be.write(&mut f, n - 2, &[1.0, 2.0, 3.0]).is_err(), "write past the end");
    check!(ck, be.copy(&mut f, n - 3, &ab, 0, 4).is_err(), "copy past the end of dst");
    check!(ck, be.copy(&mut f, 0, &ab, n - 3, 4).is_err(), "copy past the end of src");
    check_eq!(ck, down(be, &f)?, got, "refused writes change nothing");
    check_eq!(ck, be.buf_len(&f), n);

    // Length mismatches.
    let short = be.zeros("short", n - 1)?;
    check!(ck, be.add(&mut out, &ab, &short).is_err());
    check!(ck, be.add_assign(&mut acc, &short).is_err());
    Ok(())
}

pub fn broadcast_rows_add_and_sum<B: Backend>(be: &B, ck: &mut Checks) -> CaseResult {
    broadcast_rows_case(be, ck, 9, 11)
}

/// add_broadcast_rows (bit-exact) and sum_broadcast_rows (within γ) over `blocks` rows of
/// `row_len`, with longer row/acc buffers and the refusals (`row_len` must not divide by 7).
pub fn broadcast_rows_case<B: Backend>(be: &B, ck: &mut Checks, blocks: usize, row_len: usize) -> CaseResult {
    let mut rng = rng_for(&format!("broadcast rows {blocks}x{row_len}"));
    let x = normal(&mut rng, blocks * row_len, 0.0, 1.0);
    let row = normal(&mut rng, row_len, 0.0, 1.0);
    let acc0 = normal(&mut rng, row_len, 0.0, 1.0);
    let (rb, xb) = (up(be, "row", &row)?, up(be, "x", &x)?);

    let mut out = up(be, "out", &x)?;
    be.add_broadcast_rows(&mut out, &rb, row_len)?;
    let got = down(be, &out)?;
    let wrong: Vec<usize> =
        (0..blocks * row_len).filter(|&i| got[i].to_bits() != (x[i] + row[i % row_len]).to_bits()).collect();
    check_eq!(ck, wrong, Vec::<usize>::new(), "add_broadcast_rows bit-exact (elements that differ)");

    // acc[j] += Σ_i x[i, j]: blocks + 1 terms, error ≤ γ_blocks·Σ|terms|.
    let mut acc = up(be, "acc", &acc0)?;
    be.sum_broadcast_rows(&mut acc, &xb, row_len)?;
    let want: Vec<f64> =
        (0..row_len).map(|j| acc0[j] as f64 + (0..blocks).map(|i| x[i * row_len + j] as f64).sum::<f64>()).collect();
    let bound: Vec<f64> = (0..row_len)
        .map(|j| {
            gamma(blocks) * (acc0[j].abs() as f64 + (0..blocks).map(|i| x[i * row_len + j].abs() as f64).sum::<f64>())
        })
        .collect();
    ck.within("sum_broadcast_rows", &down(be, &acc)?, &want, &bound);

    // Only the first row_len elements of a longer row / acc take part; the rest is untouched.
    let long_row = up(be, "long_row", &[row.as_slice(), &[1e6; 4]].concat())?;
    let mut out2 = up(be, "out2", &x)?;
    be.add_broadcast_rows(&mut out2, &long_row, row_len)?;
    check_eq!(ck, down(be, &out2)?, got, "add_broadcast_rows with a longer row");
    let mut long_acc = up(be, "long_acc", &[acc0.as_slice(), &[-5.0; 3]].concat())?;
    be.sum_broadcast_rows(&mut long_acc, &xb, row_len)?;
    let long_got = down(be, &long_acc)?;
    let acc_got = down(be, &acc)?;
    check_eq!(ck, &long_got[..row_len], acc_got.as_slice(), "sum_broadcast_rows with a longer acc");
    check_eq!(ck, &long_got[row_len..], &[-5.0; 3]);

    check!(ck, be.add_broadcast_rows(&mut out, &rb, row_len + 1).is_err(), "row shorter than row_len");
    check!(ck, be.sum_broadcast_rows(&mut acc, &xb, row_len + 1).is_err(), "acc shorter than row_len");
    let row7 = up(be, "row7", &row[..7])?;
    check!(ck, be.add_broadcast_rows(&mut out, &row7, 7).is_err(), "{} is not a multiple of 7", blocks * row_len);
    check!(ck, be.sum_broadcast_rows(&mut acc, &xb, 7).is_err());
    Ok(())
}
