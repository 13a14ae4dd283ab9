//! `dalle-mesh vqgan decode|encode|parity` and `bench vqgan`.
//!
//! Codes files are JSON: `{"codes": [[c, …], …]}` (what `vqgan encode` and `sample` write for a
//! non-synthetic dataset) or a bare `[[c, …], …]`; each row is one image's codes, row-major.

use crate::vqgan_image::{load_image, to_rgb};
use anyhow::{bail, Context, Result};
use dm_model::checkpoint::{read_tensors, HostTensor};
use dm_model::vqgan::{Activation, Vqgan, VqganConfig, VqganWeights};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Reads a codes file (see the module docs).
pub fn read_codes(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let rows = match &v {
        Value::Object(o) => o.get("codes").cloned().unwrap_or(Value::Null),
        other => other.clone(),
    };
    let parsed: Option<Vec<Vec<u32>>> = serde_json::from_value(rows).ok();
    match parsed {
        Some(rows) if !rows.is_empty() => Ok(rows),
        _ => bail!(
            "{}: expected {{\"codes\": [[int, …], …]}} or [[int, …], …] with at least one row of non-negative codes",
            path.display()
        ),
    }
}

/// Decodes every row of `codes_file` into `out/NNNN.png`; returns the written paths.
pub fn decode(vqgan_dir: &Path, codes_file: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let model = Vqgan::load(vqgan_dir)?;
    let rows = read_codes(codes_file)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for (i, codes) in rows.iter().enumerate() {
        let img = model.decode_codes(codes).with_context(|| format!("{}: row {i}", codes_file.display()))?;
        let path = out.join(format!("{i:04}.png"));
        to_rgb(&img)?.save_png(&path)?;
        written.push(path);
    }
    Ok(written)
}

/// Encodes image files into a codes file; returns the codes.
pub fn encode(vqgan_dir: &Path, images: &[PathBuf], out: &Path) -> Result<Vec<Vec<u32>>> {
    if images.is_empty() {
        bail!("give at least one image file");
    }
    let model = Vqgan::load(vqgan_dir)?;
    let mut codes = Vec::new();
    for path in images {
        let img = load_image(path, model.config.resolution)?;
        codes.push(model.encode(&img)?.codes);
    }
    let json = serde_json::json!({"images": images, "codes": codes});
    crate::atomic_write(out, &serde_json::to_vec(&json)?)?;
    Ok(codes)
}

/// One `vqgan parity` run: the fixture's decode and encode against ours.
#[derive(Debug, Clone, Serialize)]
pub struct VqganParityReport {
    pub fixture: PathBuf,
    pub decode_max_abs_err: f64,
    pub decode_tolerance: f64,
    pub pre_quant_max_abs_err: f64,
    pub pre_quant_tolerance: f64,
    /// Fraction of encoded codes equal to the fixture's.
    pub encode_codes_match: f64,
    /// Positions whose code differs although their margin is above fp32 noise.
    pub encode_mismatches_beyond_noise: usize,
    /// `reconstructed` (decode of the encoder's z_q) where every code matched.
    pub reconstructed_max_abs_err: Option<f64>,
    pub pass: bool,
}

/// Tolerance multiple of the fixture's fp32-vs-fp64 gap (see [`tolerance`]).
const FP64_GAP_MULTIPLE: f64 = 10.0;

/// The tolerance for comparing our fp32 result with the fixture's fp32 result. Both differ from
/// the exact (fp64) value by fp32 rounding of about the size the fixture measured (`fp64_gap`),
/// in different orders; so their difference is about 2× that, and 10× leaves room for unlucky
/// summation orders while staying 10⁵ below what a wrong op produces (errors of order 0.1–1).
/// Without a recorded gap: 1e-5 relative to the largest value (≈ 100 f32 ulps).
fn tolerance(fp64_gap: Option<f64>, max_abs: f64) -> f64 {
    match fp64_gap {
        Some(g) => (FP64_GAP_MULTIPLE * g).max(1e-7 * max_abs),
        None => 1e-5 * max_abs.max(1.0),
    }
}

fn f32_tensor<'a>(t: &'a BTreeMap<String, HostTensor>, name: &str, path: &Path) -> Result<(&'a [usize], &'a [f32])> {
    match t.get(name) {
        Some(HostTensor::F32 { shape, data }) => Ok((shape, data)),
        _ => bail!("{}: missing float tensor `{name}`", path.display()),
    }
}

fn int_tensor<'a>(t: &'a BTreeMap<String, HostTensor>, name: &str, path: &Path) -> Result<(&'a [usize], &'a [i64])> {
    match t.get(name) {
        Some(HostTensor::Int { shape, data }) => Ok((shape, data)),
        _ => bail!("{}: missing integer tensor `{name}`", path.display()),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max)
}

fn to_codes(ints: &[i64], n_embed: usize, path: &Path) -> Result<Vec<u32>> {
    ints.iter()
        .map(|&c| {
            u32::try_from(c)
                .ok()
                .filter(|c| (*c as usize) < n_embed)
                .with_context(|| format!("{}: code {c} is outside the codebook of {n_embed}", path.display()))
        })
        .collect()
}

/// The fixture's recorded fp64 gaps (`fixture.json.verification_fp64`), when present.
fn fp64_gaps(fixture: &Path) -> (Option<f64>, Option<f64>) {
    let Ok(text) = std::fs::read_to_string(fixture.join("fixture.json")) else { return (None, None) };
    let Ok(v) = serde_json::from_str::<Value>(&text) else { return (None, None) };
    let gap = |k: &str| v["verification_fp64"][k].as_f64();
    (gap("decoded_max_abs_diff"), gap("pre_quant_max_abs_diff"))
}

/// `dalle-mesh vqgan parity --fixture DIR`: decode the fixture's codes and encode its images.
pub fn parity(fixture: &Path) -> Result<VqganParityReport> {
    let model = Vqgan::load(fixture)?;
    let cfg = &model.config;
    let exp_path = fixture.join("expected.safetensors");
    let t = read_tensors(&exp_path)?;
    let (dec_gap, pre_gap) = fp64_gaps(fixture);

    let (_, codes) = int_tensor(&t, "codes", &exp_path)?;
    let (_, decoded) = f32_tensor(&t, "decoded", &exp_path)?;
    let codes = to_codes(codes, cfg.n_embed, &exp_path)?;
    let per = cfg.codes_per_image();
    let mut ours = Vec::with_capacity(decoded.len());
    for row in codes.chunks(per) {
        ours.extend(model.decode_codes(row)?.data);
    }
    if ours.len() != decoded.len() {
        bail!("{}: `decoded` has {} values, our decode {}", exp_path.display(), decoded.len(), ours.len());
    }
    let decode_err = max_abs_diff(&ours, decoded);
    let decode_tol = tolerance(dec_gap, max_abs(decoded));

    let (ishape, images) = f32_tensor(&t, "images", &exp_path)?;
    let (_, expected_codes) = int_tensor(&t, "encoded_codes", &exp_path)?;
    let (_, pre_quant) = f32_tensor(&t, "pre_quant", &exp_path)?;
    let (_, margins) = f32_tensor(&t, "encode_margin", &exp_path)?;
    let expected_codes = to_codes(expected_codes, cfg.n_embed, &exp_path)?;
    let r = cfg.resolution;
    if ishape.len() != 4 || ishape[1..] != [r, r, cfg.in_channels] {
        bail!("{}: `images` has shape {ishape:?}, expected [B, {r}, {r}, {}]", exp_path.display(), cfg.in_channels);
    }
    let (mut our_pre, mut our_codes) = (Vec::new(), Vec::new());
    for img in images.chunks(r * r * cfg.in_channels) {
        let e = model.encode(&Activation { side: r, channels: cfg.in_channels, data: img.to_vec() })?;
        our_pre.extend(e.pre_quant.data);
        our_codes.extend(e.codes);
    }
    let pre_err = max_abs_diff(&our_pre, pre_quant);
    let pre_tol = tolerance(pre_gap, max_abs(pre_quant));
    let same = our_codes.iter().zip(&expected_codes).filter(|(a, b)| a == b).count();
    let beyond_noise = codes_beyond_noise(&model, &our_pre, &our_codes, &expected_codes, margins, pre_tol);
    let all_match = same == expected_codes.len() && our_codes.len() == expected_codes.len();
    let reconstructed_max_abs_err = match (all_match, t.get("reconstructed")) {
        (true, Some(HostTensor::F32 { data, .. })) => {
            let mut rec = Vec::new();
            for row in our_codes.chunks(per) {
                rec.extend(model.decode_codes(row)?.data);
            }
            Some(max_abs_diff(&rec, data))
        }
        _ => None,
    };
    let pass = decode_err <= decode_tol
        && pre_err <= pre_tol
        && beyond_noise == 0
        && our_codes.len() == expected_codes.len()
        && reconstructed_max_abs_err.is_none_or(|e| e <= decode_tol);
    Ok(VqganParityReport {
        fixture: fixture.to_path_buf(),
        decode_max_abs_err: decode_err,
        decode_tolerance: decode_tol,
        pre_quant_max_abs_err: pre_err,
        pre_quant_tolerance: pre_tol,
        encode_codes_match: same as f64 / expected_codes.len().max(1) as f64,
        encode_mismatches_beyond_noise: beyond_noise,
        reconstructed_max_abs_err,
        pass,
    })
}

/// Mismatched codes that fp32 noise cannot explain. With latents `z` off by at most `tol` per
/// component, the distance gap between codes `a` and `b` moves by at most
/// `2·(|z − e_a| + |z − e_b|)·√D·tol`; a mismatch whose recorded margin exceeds that is a bug.
fn codes_beyond_noise(model: &Vqgan, z: &[f32], ours: &[u32], theirs: &[u32], margins: &[f32], tol: f64) -> usize {
    let d = model.config.embed_dim;
    let book = model.weights().get(dm_model::vqgan::arch::CODEBOOK);
    let dist = |zr: &[f32], c: u32| {
        let e = &book[c as usize * d..(c as usize + 1) * d];
        zr.iter().zip(e).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt()
    };
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .filter(|(p, (a, b))| {
            let zr = &z[p * d..(p + 1) * d];
            let allowed = 2.0 * (dist(zr, **a) + dist(zr, **b)) * (d as f64).sqrt() * tol;
            margins.get(*p).is_none_or(|m| *m as f64 > allowed)
        })
        .count()
}

/// `bench vqgan`: decode (and encode) time of one image with random weights, against the
/// CPU's GEMM FLOP/s measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct VqganBench {
    pub config: String,
    pub resolution: usize,
    pub decoder_params: usize,
    pub threads: usize,
    pub decode_gflop: f64,
    pub decode_seconds: f64,
    pub decode_gflops: f64,
    pub gemm_shape: [usize; 3],
    pub gemm_gflops: f64,
    /// decode GFLOP/s ÷ GEMM GFLOP/s.
    pub decode_vs_gemm: f64,
    pub encode_gflop: f64,
    pub encode_seconds: Option<f64>,
    pub encode_gflops: Option<f64>,
    pub encode_images_per_s: Option<f64>,
}

/// Best-of-`reps` seconds of `f`.
fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// GFLOP/s of the CPU backend's matmul on a square product (the machine's practical peak).
pub fn gemm_gflops(side: usize, reps: usize) -> Result<f64> {
    let a = vec![0.5f32; side * side];
    let b = vec![0.25f32; side * side];
    let mut c = vec![0.0f32; side * side];
    let spec = dm_runtime::MatmulSpec::nn(side, side, side);
    let secs = best_of(reps, || {
        dm_runtime::cpu::matmul::matmul(&mut c, &a, &b, spec);
        Ok(())
    })?;
    Ok(spec.flops() / secs / 1e9)
}

pub fn bench(config: Option<&Path>, reps: usize, with_encode: bool) -> Result<VqganBench> {
    let (name, cfg) = match config {
        Some(p) => (p.display().to_string(), VqganConfig::from_file(p)?),
        None => ("released f16_16384 (random weights)".to_string(), VqganConfig::released_f16_16384()),
    };
    let model = Vqgan::new(cfg.clone(), VqganWeights::random(&cfg, 0))?;
    let decoder_params = dm_model::vqgan::arch::param_specs(&cfg)
        .iter()
        .filter(|s| s.name.starts_with("decoder.") || s.name.starts_with("post_quant_conv."))
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let codes: Vec<u32> = (0..cfg.codes_per_image()).map(|i| (i * 7919 % cfg.n_embed) as u32).collect();
    // GEMM first and last, so a change of machine load between the two shows as a spread.
    let gemm_side = 2048;
    let gemm_before = gemm_gflops(gemm_side, reps.max(2))?;
    let decode_seconds = best_of(reps, || model.decode_codes(&codes).map(|_| ()).map_err(Into::into))?;
    let gemm_after = gemm_gflops(gemm_side, reps.max(2))?;
    let gemm = gemm_before.max(gemm_after);
    let decode_gflops = model.decode_flops() / decode_seconds / 1e9;
    let encode_seconds = if with_encode {
        let img = Activation {
            side: cfg.resolution,
            channels: cfg.in_channels,
            data: vec![0.5; cfg.resolution.pow(2) * cfg.in_channels],
        };
        Some(best_of(reps, || model.encode(&img).map(|_| ()).map_err(Into::into))?)
    } else {
        None
    };
    Ok(VqganBench {
        config: name,
        resolution: cfg.resolution,
        decoder_params,
        threads: rayon_threads(),
        decode_gflop: model.decode_flops() / 1e9,
        decode_seconds,
        decode_gflops,
        gemm_shape: [gemm_side; 3],
        gemm_gflops: gemm,
        decode_vs_gemm: decode_gflops / gemm,
        encode_gflop: model.encode_flops() / 1e9,
        encode_seconds,
        encode_gflops: encode_seconds.map(|s| model.encode_flops() / s / 1e9),
        encode_images_per_s: encode_seconds.map(|s| 1.0 / s),
    })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// One `dalle-mesh vqgan …` invocation.
#[derive(Debug, Clone)]
pub enum VqganAction {
    Decode { vqgan: PathBuf, codes: PathBuf, out: PathBuf },
    Encode { vqgan: PathBuf, images: Vec<PathBuf>, out: PathBuf },
    Parity { fixture: PathBuf },
    Random { config: Option<PathBuf>, out: PathBuf, seed: u64 },
}

/// Runs a `vqgan` subcommand, prints its JSON line, and returns the exit code.
pub fn run_command(action: VqganAction) -> Result<i32> {
    let line = match action {
        VqganAction::Decode { vqgan, codes, out } => {
            let written = decode(&vqgan, &codes, &out)?;
            serde_json::json!({"out": out, "images": written.len()})
        }
        VqganAction::Encode { vqgan, images, out } => {
            let codes = encode(&vqgan, &images, &out)?;
            serde_json::json!({"out": out, "images": codes.len(), "codes_per_image": codes[0].len()})
        }
        VqganAction::Parity { fixture } => {
            let r = parity(&fixture).with_context(|| format!("vqgan parity on {}", fixture.display()))?;
            println!("{}", serde_json::to_string(&r)?);
            return Ok(if r.pass { 0 } else { 1 });
        }
        VqganAction::Random { config, out, seed } => {
            let cfg = match &config {
                Some(p) => VqganConfig::from_file(p)?,
                None => VqganConfig::released_f16_16384(),
            };
            let w = VqganWeights::random(&cfg, seed);
            w.save(&cfg, &out)?;
            serde_json::json!({"out": out, "params": w.len(), "codes_per_image": cfg.codes_per_image(), "n_embed": cfg.n_embed})
        }
    };
    println!("{}", serde_json::to_string(&line)?);
    Ok(0)
}
