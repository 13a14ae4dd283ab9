//! CPU calibration of the performance model: short probes of this machine that become a
//! [`HardwareProfile`] (`dalle-mesh plan --time` without `--profile`, and the start of every
//! `sweep`). Cached as YAML so it runs once per machine.
//!
//! Probes (a few seconds):
//! - GEMM: `1024³` (the reference rate), then each of m, n, k swept over 16 … 16384 with the other
//!   two at 1024, giving the relative-rate tables of [`GemmRates`]; the dense peak for MFU is the
//!   best rate seen;
//! - the other op classes (and the GEMM per-call overhead): a probe model's training steps on the [`Profiled`] backend; each
//!   class's rate is the performance model's own work count for that model ([`step_work`]) over
//!   the measured seconds in that class, so the model's approximate counts cancel;
//! - concurrent ranks: the probe model as a tensor-parallel and as a data-parallel pair of rank
//!   threads, each class's time next to one rank's alone ([`ConcurrentRanks`]);
//! - links: a 2-rank in-process all-reduce of 1 KiB (latency α) and 16 MiB (bandwidth β).
//!
//! Built-in profiles of other machines are in `configs/hardware/` (see [`builtin_profile`]).

use crate::bench::{median, random_batch, rayon_threads};
use anyhow::{bail, Context, Result};
use dm_model::perf_model::{
    step_work, Algorithm, ClassRates, ClassSpeedups, ConcurrentRanks, GemmRates, HardwareProfile, Link, Links,
};
use dm_model::plan::{PlanOptions, Precision};
use dm_model::{AdamW, AdamWConfig, DalleBart, DalleBartConfig};
use dm_parallel::{Communicator, ReduceOp, ThreadComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::{Backend, MatmulSpec, OpClass, Profiled};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Profiles shipped with the source, by name.
pub const BUILTIN: [(&str, &str); 3] = [
    ("h100-sxm", include_str!("../../configs/hardware/h100-sxm.yaml")),
    ("tpu-v3", include_str!("../../configs/hardware/tpu-v3.yaml")),
    ("cpu-epyc-2core", include_str!("../../configs/hardware/cpu-epyc-2core.yaml")),
];

/// Parses a profile's YAML, naming `origin` in the error.
pub fn parse_profile(text: &str, origin: &str) -> Result<HardwareProfile> {
    let p: HardwareProfile = serde_yaml::from_str(text)
        .with_context(|| format!("{origin}: not a hardware profile (see configs/hardware/h100-sxm.yaml)"))?;
    let rates = [
        p.peak_flops_per_s,
        p.gemm.reference_flops_per_s,
        p.rates.attention_flops_per_s,
        p.rates.cross_entropy_elements_per_s,
        p.rates.pointwise_elements_per_s,
        p.rates.optimizer_elements_per_s,
        p.links.intra_node.bandwidth_bytes_per_s,
        p.links.inter_node.bandwidth_bytes_per_s,
    ];
    if rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) || p.devices_per_node == 0 {
        bail!("{origin}: every rate, bandwidth and devices_per_node must be positive");
    }
    Ok(p)
}

/// A built-in profile by name, or a YAML file.
pub fn builtin_profile(name_or_path: &str) -> Result<HardwareProfile> {
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
        return parse_profile(text, &format!("built-in profile {name_or_path}"));
    }
    let path = Path::new(name_or_path);
    let text = std::fs::read_to_string(path).with_context(|| {
        let names: Vec<&str> = BUILTIN.iter().map(|b| b.0).collect();
        format!("--profile {name_or_path}: no such file, and not a built-in profile ({})", names.join(", "))
    })?;
    parse_profile(&text, &path.display().to_string())
}

/// This CPU's model name and thread count, for the cache key.
fn cpu_id() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model}, {} threads", rayon_threads())
}

/// Where the calibration of this machine is cached: `$DALLE_MESH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/dalle-mesh`, else `~/.cache/dalle-mesh`.
pub fn cache_path() -> PathBuf {
    let dir = std::env::var_os("DALLE_MESH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("dalle-mesh")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache").join("dalle-mesh")))
        .unwrap_or_else(|| PathBuf::from(".dalle-mesh-cache"));
    dir.join(format!("cpu-calibration-v2-{}t.yaml", rayon_threads()))
}

/// The cached calibration of this CPU, or a fresh one (written to the cache).
pub fn cached_or_calibrate() -> Result<HardwareProfile> {
    let path = cache_path();
    if let Ok(text) = std::fs::read_to_string(&path) {
        match parse_profile(&text, &path.display().to_string()) {
            Ok(p) if p.name == cpu_id() => {
                tracing::info!(path = %path.display(), "using the cached CPU calibration");
                return Ok(p);
            }
            Ok(_) => tracing::info!(path = %path.display(), "the cached calibration is of another CPU: recalibrating"),
            Err(e) => tracing::warn!("{e:#}: recalibrating"),
        }
    }
    let p = calibrate()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::atomic_write(&path, serde_yaml::to_string(&p)?.as_bytes())?;
    tracing::info!(path = %path.display(), "CPU calibration cached");
    Ok(p)
}

/// Best-of-`reps` seconds of one GEMM shape.
fn time_gemm(be: &CpuBackend, m: usize, n: usize, k: usize, reps: usize) -> Result<f64> {
    let a = be.upload("a", &vec![0.5; m * k])?;
    let b = be.upload("b", &vec![0.25; k * n])?;
    let mut c = be.zeros("c", m * n)?;
    let s = MatmulSpec::nn(m, n, k);
    be.matmul(&mut c, &a, &b, s)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        be.matmul(&mut c, &a, &b, s)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// GEMM rate tables and the best rate seen.
fn calibrate_gemm() -> Result<(GemmRates, f64)> {
    let be = CpuBackend::new();
    const R: usize = 1024;
    let rate = |m: usize, n: usize, k: usize| -> Result<f64> {
        let flops = 2.0 * (m * n * k) as f64;
        let reps = if flops > 1e10 { 2 } else { 5 };
        Ok(flops / time_gemm(&be, m, n, k, reps)?)
    };
    let reference = rate(R, R, R)?;
    let mut best = reference;
    let sizes = [16usize, 64, 256, 1024, 4096, 16384];
    let mut axis = |which: usize| -> Result<Vec<(f64, f64)>> {
        let mut t = Vec::new();
        for &x in &sizes {
            let r = if x == R {
                reference
            } else {
                match which {
                    0 => rate(x, R, R)?,
                    1 => rate(R, x, R)?,
                    _ => rate(R, R, x)?,
                }
            };
            best = best.max(r);
            t.push((x as f64, r / reference));
        }
        Ok(t)
    };
    let (m, n, k) = (axis(0)?, axis(1)?, axis(2)?);
    Ok((GemmRates { reference_flops_per_s: reference, m, n, k, call_overhead_s: 0.0 }, best))
}

/// The probe model of the class rates: small, but with every op of the real ones (the built-in
/// tiny model, with 512 text and 1024 image tokens, 256 image and 16 text positions).
fn probe_model() -> DalleBartConfig {
    crate::run_config::tiny_model(512, 1024, 256, 16)
}

/// Median seconds of the performance model's five op classes (GEMM, attention, cross-entropy,
/// pointwise, optimizer) over 3 training steps of `model` after one warm-up; `before_step` runs
/// before each step (a barrier that keeps concurrent probe ranks in step).
fn probe_class_seconds(
    be: &Profiled<CpuBackend>,
    model: &mut DalleBart<Profiled<CpuBackend>>,
    data: &dm_model::Batch,
    before_step: &dyn Fn(),
) -> Result<[f64; 5]> {
    let names: Vec<String> = model.table.specs.iter().map(|s| s.name.clone()).collect();
    let mut opt = AdamW::new(be, AdamWConfig::default(), &names, &model.params)?;
    let mut per_class: Vec<[f64; 7]> = Vec::new();
    for i in 0..4 {
        before_step();
        let before = be.profile();
        model.zero_grads()?;
        model.forward_backward(data)?;
        let mut sq = 0.0;
        for g in &model.grads {
            sq += be.sum_squares(g)?;
        }
        opt.update(be, &mut model.params, &model.grads, 1e-4, if sq > 1.0 { 1.0 / sq.sqrt() as f32 } else { 1.0 })?;
        let p = be.profile().since(&before);
        if i > 0 {
            per_class.push(std::array::from_fn(|c| p.classes[c].seconds));
        }
    }
    let secs =
        |classes: &[OpClass]| median(per_class.iter().map(|s| classes.iter().map(|&c| s[c as usize]).sum()).collect());
    Ok([
        secs(&[OpClass::Gemm]),
        secs(&[OpClass::Attention]),
        secs(&[OpClass::CrossEntropy]),
        secs(&[OpClass::Norm, OpClass::Elementwise]),
        secs(&[OpClass::Optimizer, OpClass::Memory]),
    ])
}

/// Class rates from the probe model's steps (median seconds per class over 3 timed steps), and
/// the GEMM call overhead that makes the probe's GEMM seconds match the rate tables (small
/// products pay packing and dispatch costs the `1024`-based tables don't see).
fn calibrate_classes(gemm: &mut GemmRates) -> Result<ClassRates> {
    let cfg = probe_model();
    let batch = 4;
    let be = Profiled::new(CpuBackend::new());
    let mut model = DalleBart::init(be.clone(), cfg.clone(), 0)?;
    let data = random_batch(&cfg, batch, 1)?;
    let [gemm_s, attention_s, cross_entropy_s, pointwise_s, optimizer_s] =
        probe_class_seconds(&be, &mut model, &data, &|| ())?;
    let w = step_work(&cfg, &PlanOptions::new(1, 1, batch), 0);
    let from_tables: f64 = w.gemms.iter().map(|g| g.flops() / gemm.rate(g.m, g.n, g.k)).sum();
    gemm.call_overhead_s = ((gemm_s - from_tables) / w.gemms.len() as f64).max(0.0);
    Ok(ClassRates {
        attention_flops_per_s: w.attention_flops / attention_s,
        cross_entropy_elements_per_s: w.cross_entropy_elements / cross_entropy_s,
        pointwise_elements_per_s: w.pointwise_elements / pointwise_s,
        optimizer_elements_per_s: w.optimizer_elements / optimizer_s,
    })
}

/// [`ClassSpeedups`] of a pair of probe ranks (`tp × dp` = 2) running the probe model at the
/// same time as threads: `2 · t₁ / t₂` per class, with `t₁` the seconds the rates already
/// calibrated predict for one rank's work alone and `t₂` the seconds each rank measured while
/// both ran (mean of the two ranks); for GEMMs 2 on their per-call overhead (see below).
fn calibrate_pair(rates: &ClassRates, tp: usize, dp: usize) -> Result<ClassSpeedups> {
    let cfg = probe_model();
    let batch = 4;
    let opts = PlanOptions::new(tp, dp, batch);
    let comms = ThreadComm::group(2);
    let barrier = std::sync::Barrier::new(2);
    let data = random_batch(&cfg, batch, 1)?;
    let full = dm_model::ParamTable::new(&cfg).init_values(cfg.init_std, 0);
    let measured = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (cfg, data, full, barrier) = (&cfg, &data, &full, &barrier);
                s.spawn(move || -> Result<[f64; 5]> {
                    let be = Profiled::new(CpuBackend::new());
                    let tp_rank = if tp > 1 { rank } else { 0 };
                    let local = dm_model::ParamTable::sharded(cfg, tp_rank, tp).shard_values(full);
                    let inner: std::sync::Arc<dyn Communicator<CpuBackend>> = std::sync::Arc::new(comm);
                    let arc: std::sync::Arc<dyn Communicator<Profiled<CpuBackend>>> =
                        std::sync::Arc::new(dm_parallel::TimedComm::new(inner));
                    let group = (tp > 1).then(|| dm_model::dallebart::TpGroup { rank, size: tp, comm: arc });
                    let mut model = DalleBart::new_sharded(be.clone(), cfg.clone(), group, local)?;
                    probe_class_seconds(&be, &mut model, data, &|| {
                        barrier.wait();
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a probe rank panicked"))?)
            .collect::<Result<Vec<[f64; 5]>>>()
    })?;
    // One rank's seconds for its work alone, by class, as the calibrated rates predict (mean
    // over the tp ranks, whose work may differ by a padded shard).
    let mut alone = [0.0f64; 4];
    for r in 0..tp {
        let w = step_work(&cfg, &opts, r);
        let per_rank = [
            w.attention_flops / rates.attention_flops_per_s,
            w.cross_entropy_elements / rates.cross_entropy_elements_per_s,
            w.pointwise_elements / rates.pointwise_elements_per_s,
            w.optimizer_elements / rates.optimizer_elements_per_s,
        ];
        for (a, p) in alone.iter_mut().zip(per_rank) {
            *a += p / tp as f64;
        }
    }
    // Clamped to what two ranks can physically gain or lose (noise on a busy host).
    let gain = |i: usize| {
        let together = (measured[0][i + 1] + measured[1][i + 1]) / 2.0;
        (2.0 * alone[i] / together.max(f64::MIN_POSITIVE)).clamp(0.5, 2.0)
    };
    // GEMMs: their FLOPs add up, and the per-call overhead (packing, dispatch: cores waiting)
    // is hidden by the partner rank. Solving the pair's time for this gain divides two noisy
    // differences, so it is taken as the pair's size, not measured.
    let gemm = 2.0;
    let (attention, cross_entropy, pointwise, optimizer) = (gain(0), gain(1), gain(2), gain(3));
    Ok(ClassSpeedups { gemm, attention, cross_entropy, pointwise, optimizer })
}

/// α and β of the in-process communicator: 2 ranks, all-reduce medians at 1 KiB and 16 MiB.
fn calibrate_threads_link() -> Result<Link> {
    let time = |elems: usize| -> Result<f64> {
        let comms = ThreadComm::group(2);
        let times = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || -> Result<f64> {
                        let be = CpuBackend::new();
                        let mut buf = be.upload("x", &vec![1.0; elems])?;
                        let reps = if elems > 100_000 { 8 } else { 200 };
                        let mut t = Vec::new();
                        for _ in 0..reps {
                            let t0 = Instant::now();
                            Communicator::<CpuBackend>::all_reduce(&c, &mut buf, ReduceOp::Avg)?;
                            t.push(t0.elapsed().as_secs_f64());
                        }
                        Ok(median(t))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a probe rank panicked"))?)
                .collect::<Result<Vec<f64>>>()
        })?;
        Ok(times.into_iter().fold(0.0, f64::max))
    };
    let (small, big) = (256usize, 4 << 20);
    let (ts, tb) = (time(small)?, time(big)?);
    // SharedMemory: t = α + 2 ranks × payload / β.
    let beta = 2.0 * 4.0 * (big - small) as f64 / (tb - ts).max(1e-9);
    let alpha = (ts - 2.0 * 4.0 * small as f64 / beta).max(0.0);
    Ok(Link { alpha_s: alpha, bandwidth_bytes_per_s: beta, algorithm: Algorithm::SharedMemory })
}

/// Measures this CPU (a few seconds).
pub fn calibrate() -> Result<HardwareProfile> {
    let t0 = Instant::now();
    let (mut gemm, peak) = calibrate_gemm()?;
    let rates = calibrate_classes(&mut gemm)?;
    let concurrent_ranks = ConcurrentRanks {
        tensor_parallel: calibrate_pair(&rates, 2, 1)?,
        data_parallel: calibrate_pair(&rates, 1, 2)?,
    };
    let link = calibrate_threads_link()?;
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), peak_gflops = peak / 1e9, "CPU calibrated");
    Ok(HardwareProfile {
        name: cpu_id(),
        device: "cpu".into(),
        precision: Precision::Fp32,
        peak_flops_per_s: peak,
        devices_per_node: 1 << 20,
        ranks_share_host: true,
        concurrent_ranks,
        memory_bytes: None,
        gemm,
        rates,
        links: Links { intra_node: link, inter_node: link },
        overlap: 0.0,
        source: format!("dalle-mesh calibration (probes of {:.1} s)", t0.elapsed().as_secs_f64()),
    })
}
