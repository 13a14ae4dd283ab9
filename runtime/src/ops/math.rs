//! Scalar math written so loops over it vectorise (no branches, no libm calls).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a high part exact in f32 and a low correction (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` in f32 to within ~2 ulp for x in [-87.3, 88.3] (clamped outside: tiny/huge but finite).
/// Range reduction `x = n·ln2 + r`, |r| ≤ ln2/2, then a degree-6 minimax polynomial (Cephes expf).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let pow2n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * pow2n
}

const LANES: usize = 16;

/// Σ x with 16 independent accumulators (vectorises; also more accurate than a serial sum).
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// max x (NEG_INFINITY for an empty slice), vectorised.
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `x[i] = e^(x[i] - shift)` in place; returns Σ of the new values.
#[inline]
pub fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    sum(x)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = super::exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst}");
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(-1000.0) >= 0.0);
    }
}
