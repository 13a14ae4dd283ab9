//! The image ops (runtime/src/ops) against f64 references on fresh random inputs.
//!
//! Bounds are rigorous where the op is a sum: a dot product of n terms evaluated in f32 in any
//! order is within γₙ·Σ|terms| of the exact value (Higham), so conv gets γ_{K+1}·(Σ|x·w| + |b|).
//! GroupNorm's statistics are accumulated in f64 (exact to ~1e-16 relative), so its error is the
//! few f32 roundings of `a = scale·rstd`, `b = bias − mean·a`, `x·a + b`: ≤ 4u·(|x·a| + |mean·a| + |bias|).

mod common;

use common::{assert_within, f64s, gamma, normal, rng_for, U};
use dm_runtime::ops::{
    conv2d, group_norm, spatial_attention, swish_in_place, upsample_nearest2x, Conv2dShape, GroupNormShape, Padding,
    SpatialAttentionShape, UpsampleShape,
};

/// f64 reference convolution; returns (value, Σ|terms|) per output element.
fn conv_ref(x: &[f64], w: &[f64], bias: Option<&[f64]>, s: &Conv2dShape) -> (Vec<f64>, Vec<f64>) {
    let (ho, wo, ci, co) = (s.out_height(), s.out_width(), s.in_channels, s.out_channels);
    let (mut out, mut mag) = (vec![0.0; s.output_len()], vec![0.0; s.output_len()]);
    for b in 0..s.batch {
        for y in 0..ho {
            for xo in 0..wo {
                for o in 0..co {
                    let (mut acc, mut m) = bias.map_or((0.0, 0.0), |bb| (bb[o], bb[o].abs()));
                    for dy in 0..s.kernel_h {
                        for dx in 0..s.kernel_w {
                            let iy = (y * s.stride + dy) as isize - s.padding.top as isize;
                            let ix = (xo * s.stride + dx) as isize - s.padding.left as isize;
                            if iy < 0 || ix < 0 || iy >= s.height as isize || ix >= s.width as isize {
                                continue;
                            }
                            for c in 0..ci {
                                let xv = x[((b * s.height + iy as usize) * s.width + ix as usize) * ci + c];
                                let wv = w[((dy * s.kernel_w + dx) * ci + c) * co + o];
                                acc += xv * wv;
                                m += (xv * wv).abs();
                            }
                        }
                    }
                    let i = ((b * ho + y) * wo + xo) * co + o;
                    out[i] = acc;
                    mag[i] = m;
                }
            }
        }
    }
    (out, mag)
}

fn check_conv(case: &str, s: Conv2dShape, with_bias: bool) {
    let mut rng = rng_for(case);
    let x = normal(&mut rng, s.input_len(), 0.0, 1.0);
    let w = normal(&mut rng, s.kernel_len(), 0.0, 0.3);
    let bias = normal(&mut rng, s.out_channels, 0.0, 1.0);
    let bias = with_bias.then_some(&bias[..]);
    let mut out = vec![f32::NAN; s.output_len()];
    conv2d(&mut out, &x, &w, bias, &s).unwrap();
    let bias64 = bias.map(f64s);
    let (want, mag) = conv_ref(&f64s(&x), &f64s(&w), bias64.as_deref(), &s);
    let g = gamma(s.kernel_h * s.kernel_w * s.in_channels + 1);
    let bound: Vec<f64> = mag.iter().map(|m| g * m + 1e-30).collect();
    assert_within(case, &out, &want, &bound);
}

fn shape(hw: (usize, usize), ch: (usize, usize), k: usize, stride: usize, padding: Padding) -> Conv2dShape {
    Conv2dShape {
        batch: 2,
        height: hw.0,
        width: hw.1,
        in_channels: ch.0,
        out_channels: ch.1,
        kernel_h: k,
        kernel_w: k,
        stride,
        padding,
    }
}

#[test]
fn conv3x3_same_padding_matches_f64() {
    check_conv("conv3x3", shape((9, 7), (5, 6), 3, 1, Padding::uniform(1)), true);
}

#[test]
fn conv1x1_without_padding_matches_f64() {
    check_conv("conv1x1", shape((4, 6), (8, 3), 1, 1, Padding::default()), true);
}

#[test]
fn strided_downsample_with_bottom_right_padding_matches_f64() {
    check_conv("down", shape((8, 8), (4, 4), 3, 2, Padding::bottom_right(1)), true);
    check_conv("down-odd", shape((7, 5), (3, 2), 3, 2, Padding::bottom_right(1)), false);
}

#[test]
fn uneven_padding_and_wide_images_match_f64() {
    let p = Padding { top: 2, bottom: 0, left: 1, right: 3 };
    check_conv("uneven", shape((5, 11), (2, 3), 3, 1, p), false);
}

#[test]
fn conv_refuses_inconsistent_lengths() {
    let s = shape((4, 4), (2, 2), 3, 1, Padding::uniform(1));
    let mut out = vec![0.0; s.output_len()];
    let x = vec![0.0; s.input_len()];
    let w = vec![0.0; s.kernel_len()];
    assert!(conv2d(&mut out, &x[1..], &w, None, &s).is_err());
    assert!(conv2d(&mut out, &x, &w[1..], None, &s).is_err());
    assert!(conv2d(&mut out, &x, &w, Some(&[0.0]), &s).is_err());
    let tiny = Conv2dShape { height: 1, width: 1, padding: Padding::default(), ..s };
    assert!(conv2d(&mut out, &x[..2], &w, None, &tiny).is_err(), "kernel larger than the input");
}

#[test]
fn group_norm_matches_f64() {
    let s = GroupNormShape { batch: 2, positions: 3000, channels: 64, groups: 32, eps: 1e-6 };
    let mut rng = rng_for("group_norm");
    // A non-zero mean per channel exercises the E[x²] − E[x]² form.
    let x: Vec<f32> = normal(&mut rng, s.len(), 0.0, 2.0).iter().enumerate().map(|(i, v)| v + (i % 7) as f32).collect();
    let scale = normal(&mut rng, s.channels, 1.0, 0.3);
    let bias = normal(&mut rng, s.channels, 0.0, 0.5);
    let mut out = vec![f32::NAN; s.len()];
    group_norm(&mut out, &x, &scale, &bias, &s).unwrap();
    let per = s.channels / s.groups;
    let (mut want, mut bound) = (vec![0.0; s.len()], vec![0.0; s.len()]);
    for b in 0..s.batch {
        for g in 0..s.groups {
            let idx: Vec<usize> = (0..s.positions)
                .flat_map(|p| (g * per..(g + 1) * per).map(move |c| (b * s.positions + p) * s.channels + c))
                .collect();
            let n = idx.len() as f64;
            let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / n;
            let var = idx.iter().map(|&i| (x[i] as f64 - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + 1e-6).sqrt();
            for &i in &idx {
                let c = i % s.channels;
                let a = scale[c] as f64 * rstd;
                want[i] = (x[i] as f64 - mean) * a + bias[c] as f64;
                bound[i] = 4.0 * U * ((x[i] as f64 * a).abs() + (mean * a).abs() + (bias[c] as f64).abs());
            }
        }
    }
    assert_within("group_norm", &out, &want, &bound);
}

#[test]
fn group_norm_refuses_channels_not_divisible_by_groups() {
    let s = GroupNormShape { batch: 1, positions: 4, channels: 48, groups: 32, eps: 1e-6 };
    let x = vec![0.0; s.len()];
    let mut out = vec![0.0; s.len()];
    let err = group_norm(&mut out, &x, &[1.0; 48], &[0.0; 48], &s).unwrap_err();
    assert!(err.to_string().contains("48 channels"), "{err}");
}

#[test]
fn swish_matches_f64_and_stays_finite() {
    let mut rng = rng_for("swish");
    let mut x = normal(&mut rng, 10_000, 0.0, 4.0);
    x.extend([-1e4, -100.0, 0.0, 100.0, 1e4]);
    let want: Vec<f64> = x.iter().map(|&v| v as f64 / (1.0 + (-(v as f64)).exp())).collect();
    let bound: Vec<f64> = want.iter().map(|w| 4.0 * U * w.abs() + 1e-30).collect();
    swish_in_place(&mut x);
    assert_within("swish", &x, &want, &bound);
}

#[test]
fn upsample_repeats_every_pixel_2x2() {
    let s = UpsampleShape { batch: 2, height: 3, width: 5, channels: 4 };
    let mut rng = rng_for("upsample");
    let x = normal(&mut rng, s.input_len(), 0.0, 1.0);
    let mut out = vec![f32::NAN; s.output_len()];
    upsample_nearest2x(&mut out, &x, &s).unwrap();
    for b in 0..s.batch {
        for y in 0..2 * s.height {
            for xx in 0..2 * s.width {
                for c in 0..s.channels {
                    let o = out[((b * 2 * s.height + y) * 2 * s.width + xx) * s.channels + c];
                    let i = x[((b * s.height + y / 2) * s.width + xx / 2) * s.channels + c];
                    assert_eq!(o.to_bits(), i.to_bits(), "b{b} y{y} x{xx} c{c}");
                }
            }
        }
    }
    assert!(upsample_nearest2x(&mut out[1..], &x, &s).is_err());
}

#[test]
fn spatial_attention_matches_f64() {
    let s = SpatialAttentionShape { batch: 2, positions: 37, channels: 24 };
    let mut rng = rng_for("spatial_attention");
    let (q, k, v) =
        (normal(&mut rng, s.len(), 0.0, 1.0), normal(&mut rng, s.len(), 0.0, 1.0), normal(&mut rng, s.len(), 0.0, 1.0));
    let mut out = vec![f32::NAN; s.len()];
    spatial_attention(&mut out, &q, &k, &v, &s).unwrap();
    let (n, c) = (s.positions, s.channels);
    let (mut want, mut bound) = (vec![0.0; s.len()], vec![0.0; s.len()]);
    for b in 0..s.batch {
        let row = |t: &[f32], i: usize| f64s(&t[(b * n + i) * c..(b * n + i + 1) * c]);
        for i in 0..n {
            let qi = row(&q, i);
            let scores: Vec<f64> = (0..n)
                .map(|j| qi.iter().zip(row(&k, j)).map(|(a, b)| a * b).sum::<f64>() / (c as f64).sqrt())
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for ch in 0..c {
                let (mut acc, mut mag) = (0.0, 0.0);
                for j in 0..n {
                    let t = e[j] / z * v[(b * n + j) * c + ch] as f64;
                    acc += t;
                    mag += t.abs();
                }
                want[(b * n + i) * c + ch] = acc;
                // Scores carry γ_c relative error (|q·k| ≤ Σ|q||k| ≲ √c·3 here), which the
                // softmax turns into an absolute error on the probabilities; then a sum of n terms.
                let score_err = gamma(c) * qi.iter().map(|a| a.abs()).sum::<f64>() * 4.0;
                bound[(b * n + i) * c + ch] = gamma(n + 8) * mag + 2.0 * score_err * mag + 1e-30;
            }
        }
    }
    assert_within("spatial_attention", &out, &want, &bound);
}
