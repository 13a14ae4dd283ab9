//! The performance model: the time of one training step of DalleBart on a `tp × dp` mesh,
//! predicted from the config and a [`HardwareProfile`] — what `dalle-mesh plan --time` prints
//! and what `dalle-mesh bench step` measures.
//!
//! `step = compute + communication − overlap`, per rank:
//! - **compute** ([`StepWork`]): the step's work by op class on the largest tensor-parallel rank —
//!   GEMM FLOPs call by call (forward, input gradient, weight gradient of every kernel; the same
//!   count as [`crate::flops`] restricted to matrix products, padded vocabularies included),
//!   attention FLOPs (forward + 2× for the backward, causal half counted), cross-entropy logit
//!   elements, pointwise activation elements (LayerNorms, GELU-GLU, residual adds, embeddings, fills)
//!   and optimizer elements — each over the rate the profile gives for that class. GEMM rates
//!   depend on the shape ([`GemmRates`]);
//! - **communication**: per collective, an α-β cost `α + bytes / β` of the analytic calls and
//!   bytes of [`crate::plan::step_comm`] (`docs/communication.md`), where `bytes` are the wire
//!   bytes of a ring (`dm_parallel::comm::bandwidth`) for [`Algorithm::Ring`] links, or `size ×`
//!   the payload for [`Algorithm::SharedMemory`] (the in-process thread communicator copies every
//!   rank's buffer in and the result out). The tp group stays inside a node when
//!   `tp ≤ devices_per_node`; the dp group crosses nodes when `tp · dp > devices_per_node`;
//! - **overlap**: `profile.overlap × min(compute, communication)` is hidden (0 for the runtime as
//!   it is: every collective blocks the rank that calls it).
//!
//! On a CPU whose ranks are threads of one process ([`HardwareProfile::ranks_share_host`]) the
//! ranks share the host's cores, so the compute of every rank adds up (`Σ ranks`) — less what
//! concurrent ranks gain over one rank on the same cores ([`ConcurrentRanks`]: one rank leaves
//! cores idle in its fork-join waits and small products, which a second rank fills; measured by
//! the calibration per op class, for tensor- and for data-parallel pairs of ranks) — and MFU is
//! measured against one host's peak.

use crate::config::DalleBartConfig;
use crate::flops::step_flops;
use crate::params::{ParamTable, DECODER_LAYER_PREFIX, ENCODER_LAYER_PREFIX};
use crate::plan::{step_comm, PlanOptions, Precision, StepComm};
use dm_parallel::comm::bandwidth::{nccl_size, wire_bytes};
use dm_parallel::{CollectiveKind, CommStats};
use serde::{Deserialize, Serialize};

/// How a link's collectives move data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Ring collectives (NCCL, MPI): each rank sends `bus_factor × size` over its link.
    Ring,
    /// The in-process rendezvous: every rank's payload is copied in, reduced and copied out, so a
    /// collective moves `ranks × payload` through memory.
    SharedMemory,
}

/// An α-β link: `time = alpha_s + bytes / bandwidth_bytes_per_s` per collective call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub alpha_s: f64,
    /// Per direction, per device.
    pub bandwidth_bytes_per_s: f64,
    pub algorithm: Algorithm,
}

impl Link {
    /// Seconds of `calls` collectives of `kind` moving `payload` bytes (as [`CommStats`] counts
    /// them) over a group of `ranks`.
    pub fn seconds(&self, kind: CollectiveKind, calls: u64, payload: f64, ranks: usize) -> f64 {
        if calls == 0 || ranks <= 1 {
            return 0.0;
        }
        let bytes = match self.algorithm {
            Algorithm::Ring => wire_bytes(kind, payload, ranks),
            Algorithm::SharedMemory => ranks as f64 * nccl_size(kind, payload, ranks),
        };
        calls as f64 * self.alpha_s + bytes / self.bandwidth_bytes_per_s
    }
}

/// The two links of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    pub intra_node: Link,
    pub inter_node: Link,
}

/// GEMM throughput as a function of the shape: `rate(m, n, k) = reference_flops_per_s · e_m(m) ·
/// e_n(n) · e_k(k)`, each `e` interpolated log-linearly in its table of `(size, relative rate)`
/// (clamped at the ends; 1 at the reference shape). An empty table means 1 along that axis.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GemmRates {
    /// FLOP/s of the reference shape the tables are relative to.
    pub reference_flops_per_s: f64,
    pub m: Vec<(f64, f64)>,
    pub n: Vec<(f64, f64)>,
    pub k: Vec<(f64, f64)>,
    /// Fixed cost per call (kernel launch, thread-pool dispatch).
    pub call_overhead_s: f64,
}

fn interp_log(table: &[(f64, f64)], x: f64) -> f64 {
    let Some(first) = table.first() else { return 1.0 };
    let last = table[table.len() - 1];
    if x <= first.0 {
        return first.1;
    }
    if x >= last.0 {
        return last.1;
    }
    for w in table.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x <= x1 {
            let t = (x.ln() - x0.ln()) / (x1.ln() - x0.ln());
            return (y0.ln() + t * (y1.ln() - y0.ln())).exp();
        }
    }
    last.1
}

impl GemmRates {
    /// Predicted FLOP/s of one `m × n × k` product.
    pub fn rate(&self, m: usize, n: usize, k: usize) -> f64 {
        let e = interp_log(&self.m, m as f64) * interp_log(&self.n, n as f64) * interp_log(&self.k, k as f64);
        self.reference_flops_per_s * e
    }
    /// Predicted seconds of one product.
    pub fn seconds(&self, g: &Gemm) -> f64 {
        self.call_overhead_s + g.flops() / self.rate(g.m, g.n, g.k)
    }
}

/// Rates of the non-GEMM op classes (work units per second, see [`StepWork`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRates {
    pub attention_flops_per_s: f64,
    pub cross_entropy_elements_per_s: f64,
    pub pointwise_elements_per_s: f64,
    pub optimizer_elements_per_s: f64,
}

/// Aggregate throughput of two ranks running an op class at the same time on one host over one
/// rank's ([`HardwareProfile::ranks_share_host`] only): `2 · t₁ / t₂`, where `t₁` is one rank's
/// time for its work alone and `t₂` each rank's time with both running. 1 means the ranks' work
/// simply adds up; 2 means a second rank costs nothing (it runs on cores the first left idle).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpeedups {
    /// On the GEMMs' per-call overhead ([`GemmRates::call_overhead_s`]) only: their FLOPs add up.
    pub gemm: f64,
    pub attention: f64,
    pub cross_entropy: f64,
    pub pointwise: f64,
    pub optimizer: f64,
}

impl ClassSpeedups {
    /// No gain: the work of concurrent ranks adds up.
    pub const NONE: ClassSpeedups =
        ClassSpeedups { gemm: 1.0, attention: 1.0, cross_entropy: 1.0, pointwise: 1.0, optimizer: 1.0 };

    fn all(&self) -> [f64; 5] {
        [self.gemm, self.attention, self.cross_entropy, self.pointwise, self.optimizer]
    }
}

impl Default for ClassSpeedups {
    fn default() -> Self {
        Self::NONE
    }
}

/// [`ClassSpeedups`] of the two ways ranks of a thread mesh run together, measured by the CPU
/// calibration with two probe ranks: a tensor-parallel pair (half of every product each, in
/// lock-step through its collectives) and a data-parallel pair (whole products each).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConcurrentRanks {
    pub tensor_parallel: ClassSpeedups,
    pub data_parallel: ClassSpeedups,
}

impl ConcurrentRanks {
    /// The speedups of a `tp × dp` thread mesh: none on one rank, the tensor-parallel pair's when
    /// the ranks are split by tp (their products are the tp-sized ones), else the dp pair's.
    pub fn for_mesh(&self, tp: usize, dp: usize) -> ClassSpeedups {
        match (tp, dp) {
            (1, 1) => ClassSpeedups::NONE,
            (1, _) => self.data_parallel,
            _ => self.tensor_parallel,
        }
    }
}

/// What a device (or a CPU host) can do, for [`predict`]. Stored as YAML under
/// `configs/hardware/`; `dalle-mesh plan --time` on a CPU without a profile measures one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    pub name: String,
    /// `cpu`, `cuda` or `tpu`.
    pub device: String,
    /// The precision every rate is for.
    pub precision: Precision,
    /// Dense matrix-multiply peak of one device at `precision`: the MFU denominator.
    pub peak_flops_per_s: f64,
    pub devices_per_node: usize,
    /// Ranks are threads of one process sharing the host's cores (the CPU thread mesh).
    #[serde(default)]
    pub ranks_share_host: bool,
    /// What concurrent ranks gain on the shared host (with `ranks_share_host`; default none).
    #[serde(default)]
    pub concurrent_ranks: ConcurrentRanks,
    /// Memory of one device.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    pub gemm: GemmRates,
    pub rates: ClassRates,
    pub links: Links,
    /// Fraction of `min(compute, communication)` the runtime hides.
    #[serde(default)]
    pub overlap: f64,
    /// Where the numbers come from.
    #[serde(default)]
    pub source: String,
}

/// One matrix product `[m, k] · [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl Gemm {
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// The work of one optimizer step (one micro-batch, no accumulation) on tensor-parallel rank
/// `tp_rank`, by op class.
#[derive(Debug, Clone, PartialEq)]
pub struct StepWork {
    /// Every product of the forward and backward, in no particular order.
    pub gemms: Vec<Gemm>,
    pub attention_flops: f64,
    /// Logit elements the loss passes over (`image tokens × local vocabulary`).
    pub cross_entropy_elements: f64,
    /// Activation elements of the pointwise work: per stack `tokens × (d · (3 per attention block +
    /// 3 per GLU + 3) + ffn_local · 3 per GLU)` — an approximate count (the profile's rate is
    /// calibrated against the same count, so the constant cancels).
    pub pointwise_elements: f64,
    /// Local parameters (zeroed gradients, norm) plus the elements AdamW updates (a ZeRO-1 chunk).
    pub optimizer_elements: f64,
    /// Collective calls and bytes of the step.
    pub comm: StepComm,
}

impl StepWork {
    /// Σ GEMM FLOPs.
    pub fn gemm_flops(&self) -> f64 {
        self.gemms.iter().map(Gemm::flops).sum()
    }
}

/// The step's work on tp rank `tp_rank` of the mesh in `opts` (micro-batch `batch_per_device`).
pub fn step_work(cfg: &DalleBartConfig, opts: &PlanOptions, tp_rank: usize) -> StepWork {
    let table = ParamTable::sharded(cfg, tp_rank, opts.tp);
    let b = opts.batch_per_device;
    let (nt, ni) = (b * cfg.max_text_length, b * cfg.image_length);
    let mut gemms = Vec::new();
    for s in table.specs.iter().filter(|s| s.name.ends_with(".kernel")) {
        let (rows, cols) = (s.shape[0], s.shape[1]);
        let cross_kv = s.name.ends_with("FlaxBartAttention_1.k_proj.kernel")
            || s.name.ends_with("FlaxBartAttention_1.v_proj.kernel");
        let tokens = if s.name.starts_with(ENCODER_LAYER_PREFIX) || cross_kv { nt } else { ni };
        // forward, weight gradient, input gradient
        gemms.push(Gemm { m: tokens, n: cols, k: rows });
        gemms.push(Gemm { m: rows, n: cols, k: tokens });
        gemms.push(Gemm { m: tokens, n: rows, k: cols });
    }
    debug_assert!(table.specs.iter().any(|s| s.name.starts_with(DECODER_LAYER_PREFIX)) || cfg.decoder_layers == 0);
    let tp = opts.tp;
    let (eh, dh) = (cfg.encoder_attention_heads / tp, cfg.decoder_attention_heads / tp);
    let (ehd, dhd) = (cfg.d_model / cfg.encoder_attention_heads, cfg.d_model / cfg.decoder_attention_heads);
    let (t, l, bf) = (cfg.max_text_length as f64, cfg.image_length as f64, b as f64);
    let fwd = |heads: usize, hd: usize, q: f64, kv: f64| 4.0 * bf * heads as f64 * hd as f64 * q * kv;
    let attention_flops = 3.0
        * (cfg.encoder_layers as f64 * fwd(eh, ehd, t, t)
            + cfg.decoder_layers as f64 * (fwd(dh, dhd, l, l) + fwd(dh, dhd, l, t)));
    let vocab_local = table.specs[table.lm_head].shape[1];
    let ffn_local = |ffn: usize| crate::params::split_axis(ffn, tp, tp_rank, false).1 as f64;
    let d = cfg.d_model as f64;
    let stack = |tokens: usize, layers: usize, blocks: usize, ffn: usize| {
        tokens as f64 * (layers as f64 * (d * (3.0 * blocks as f64 + 3.0) + 3.0 * ffn_local(ffn)) + 3.0 * d)
    };
    let pointwise =
        stack(nt, cfg.encoder_layers, 1, cfg.encoder_ffn_dim) + stack(ni, cfg.decoder_layers, 2, cfg.decoder_ffn_dim);
    let local = table.numel() as f64;
    let updated =
        if opts.zero1_active() { table.specs.iter().map(|s| s.numel().div_ceil(opts.dp) as f64).sum() } else { local };
    StepWork {
        gemms,
        attention_flops,
        cross_entropy_elements: (ni * vocab_local) as f64,
        pointwise_elements: pointwise,
        optimizer_elements: local + updated,
        comm: step_comm(cfg, opts, tp_rank, 1),
    }
}

/// Predicted seconds of one step by component (per rank; see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct TimeBreakdown {
    pub gemm_s: f64,
    pub attention_s: f64,
    pub cross_entropy_s: f64,
    pub pointwise_s: f64,
    pub optimizer_s: f64,
    pub compute_s: f64,
    pub tp_comm_s: f64,
    pub dp_comm_s: f64,
    pub world_comm_s: f64,
    pub comm_s: f64,
    pub overlap_s: f64,
}

/// What `plan --time` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub profile: String,
    pub predicted_step_s: f64,
    pub predicted_samples_per_s: f64,
    pub predicted_image_tokens_per_s: f64,
    pub predicted_mfu: f64,
    pub predicted_comm_share: f64,
    /// `compute (gemm)`, `tp communication (intra-node)`, …: the largest part of the step.
    pub bottleneck: String,
    /// Model FLOPs of one step over the whole mesh ([`crate::flops`]).
    pub model_flops_per_step: f64,
    pub breakdown: TimeBreakdown,
    /// The tp group's and the dp group's link: `intra_node` or `inter_node`.
    pub tp_link: String,
    pub dp_link: String,
}

fn comm_seconds(link: &Link, stats: &CommStats, ranks: usize) -> f64 {
    CollectiveKind::ALL
        .iter()
        .map(|&k| {
            let o = stats.get(k);
            link.seconds(k, o.calls, o.bytes as f64, ranks)
        })
        .sum()
}

/// Predicts one step of `cfg` on the mesh of `opts` with `profile`; an error names a mesh the
/// config can't take or a precision the profile doesn't describe.
pub fn predict(cfg: &DalleBartConfig, opts: &PlanOptions, profile: &HardwareProfile) -> Result<Prediction, String> {
    if opts.precision != profile.precision {
        return Err(format!(
            "the hardware profile `{}` describes {} training, not {}: pass --precision {} or a profile measured at {}",
            profile.name, profile.precision, opts.precision, profile.precision, opts.precision
        ));
    }
    crate::params::check_tp(cfg, opts.tp)?;
    if opts.batch_per_device == 0 {
        return Err("the batch per device must be at least 1".into());
    }
    let (tp, dp, world) = (opts.tp, opts.dp, opts.tp * opts.dp);
    let ranks: Vec<(StepWork, TimeBreakdown)> = (0..tp)
        .map(|r| {
            let w = step_work(cfg, opts, r);
            let rates = &profile.rates;
            let mut t = TimeBreakdown {
                gemm_s: w.gemms.iter().map(|g| profile.gemm.seconds(g)).sum(),
                attention_s: w.attention_flops / rates.attention_flops_per_s,
                cross_entropy_s: w.cross_entropy_elements / rates.cross_entropy_elements_per_s,
                pointwise_s: w.pointwise_elements / rates.pointwise_elements_per_s,
                optimizer_s: w.optimizer_elements / rates.optimizer_elements_per_s,
                ..Default::default()
            };
            t.compute_s = t.gemm_s + t.attention_s + t.cross_entropy_s + t.pointwise_s + t.optimizer_s;
            (w, t)
        })
        .collect();
    let worst =
        ranks
            .iter()
            .map(|(_, t)| *t)
            .fold(TimeBreakdown::default(), |a, t| if t.compute_s > a.compute_s { t } else { a });
    let comm_of =
        ranks.iter().max_by(|a, b| a.1.compute_s.total_cmp(&b.1.compute_s)).map(|(w, _)| w.comm).unwrap_or_default();
    let per_node = profile.devices_per_node.max(1);
    let (tp_inter, dp_inter) = (tp > per_node, world > per_node);
    let link = |inter: bool| if inter { &profile.links.inter_node } else { &profile.links.intra_node };
    let mut t = worst;
    if profile.ranks_share_host {
        // Every rank's compute runs on the same cores: the ranks' work adds up, less what
        // running together gains over running one after another.
        let gain = profile.concurrent_ranks.for_mesh(tp, dp).all();
        let host = |class: fn(&TimeBreakdown) -> f64, i: usize| {
            ranks.iter().map(|(_, r)| class(r)).sum::<f64>() * dp as f64 / gain[i].max(f64::MIN_POSITIVE)
        };
        // GEMMs: the products' FLOPs add up; the gain is on their per-call overhead (packing and
        // dispatch, when one rank leaves cores idle).
        let calls: f64 = ranks.iter().map(|(w, _)| w.gemms.len() as f64).sum::<f64>() * dp as f64;
        let overhead = calls * profile.gemm.call_overhead_s;
        let flops_s = ranks.iter().map(|(_, r)| r.gemm_s).sum::<f64>() * dp as f64 - overhead;
        t.gemm_s = flops_s + overhead / gain[0].max(f64::MIN_POSITIVE);
        t.attention_s = host(|r| r.attention_s, 1);
        t.cross_entropy_s = host(|r| r.cross_entropy_s, 2);
        t.pointwise_s = host(|r| r.pointwise_s, 3);
        t.optimizer_s = host(|r| r.optimizer_s, 4);
        t.compute_s = t.gemm_s + t.attention_s + t.cross_entropy_s + t.pointwise_s + t.optimizer_s;
    }
    t.tp_comm_s = comm_seconds(link(tp_inter), &comm_of.tp, tp);
    t.dp_comm_s = comm_seconds(link(dp_inter), &comm_of.dp, dp);
    t.world_comm_s = comm_seconds(link(world > per_node), &comm_of.world, world);
    t.comm_s = t.tp_comm_s + t.dp_comm_s + t.world_comm_s;
    t.overlap_s = profile.overlap.clamp(0.0, 1.0) * t.compute_s.min(t.comm_s);
    let step = t.compute_s + t.comm_s - t.overlap_s;
    let flops = step_flops(cfg, opts.batch_per_device).total() * dp as f64;
    let devices = if profile.ranks_share_host { 1.0 } else { world as f64 };
    let samples = (opts.batch_per_device * dp) as f64 / step;
    let name = |inter: bool| if inter { "inter_node" } else { "intra_node" };
    let parts = [
        ("compute (gemm)", t.gemm_s),
        ("compute (attention)", t.attention_s),
        ("compute (cross-entropy)", t.cross_entropy_s),
        ("compute (pointwise)", t.pointwise_s),
        ("compute (optimizer)", t.optimizer_s),
        (if tp_inter { "tp communication (inter-node)" } else { "tp communication (intra-node)" }, t.tp_comm_s),
        (if dp_inter { "dp communication (inter-node)" } else { "dp communication (intra-node)" }, t.dp_comm_s),
        ("world communication", t.world_comm_s),
    ];
    let bottleneck = parts.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|p| p.0).unwrap_or("compute (gemm)");
    Ok(Prediction {
        profile: profile.name.clone(),
        predicted_step_s: step,
        predicted_samples_per_s: samples,
        predicted_image_tokens_per_s: samples * cfg.image_length as f64,
        predicted_mfu: flops / step / (profile.peak_flops_per_s * devices),
        predicted_comm_share: (t.comm_s - t.overlap_s) / step,
        bottleneck: bottleneck.to_string(),
        model_flops_per_step: flops,
        breakdown: t,
        tp_link: name(tp_inter).into(),
        dp_link: name(dp_inter).into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> HardwareProfile {
        let link = |a: f64, b: f64| Link { alpha_s: a, bandwidth_bytes_per_s: b, algorithm: Algorithm::Ring };
        HardwareProfile {
            name: "test".into(),
            device: "cuda".into(),
            precision: Precision::Fp32,
            peak_flops_per_s: 1e12,
            devices_per_node: 8,
            ranks_share_host: false,
            concurrent_ranks: ConcurrentRanks::default(),
            memory_bytes: None,
            gemm: GemmRates { reference_flops_per_s: 1e12, ..Default::default() },
            rates: ClassRates {
                attention_flops_per_s: 1e12,
                cross_entropy_elements_per_s: 1e10,
                pointwise_elements_per_s: 1e10,
                optimizer_elements_per_s: 1e10,
            },
            links: Links { intra_node: link(1e-5, 1e11), inter_node: link(1e-5, 1e10) },
            overlap: 0.0,
            source: String::new(),
        }
    }

    #[test]
    fn gemm_flops_are_the_model_count_of_the_matrix_products() {
        // flops.rs counts 6 · params · tokens over every layer tensor; the products are the
        // kernels only, so the difference is the LayerNorm parameters × their tokens.
        let cfg = DalleBartConfig::micro();
        let w = step_work(&cfg, &PlanOptions::new(1, 1, 4), 0);
        let f = step_flops(&cfg, 4);
        assert_eq!(w.gemms.len() % 3, 0);
        let table = ParamTable::new(&cfg);
        let ln: f64 = table
            .specs
            .iter()
            .filter(|s| s.name.starts_with(ENCODER_LAYER_PREFIX) || s.name.starts_with(DECODER_LAYER_PREFIX))
            .filter(|s| !s.name.ends_with(".kernel"))
            .map(|s| {
                let tokens =
                    if s.name.starts_with(ENCODER_LAYER_PREFIX) { cfg.max_text_length } else { cfg.image_length };
                6.0 * 4.0 * (s.numel() * tokens) as f64
            })
            .sum();
        assert!((w.gemm_flops() + ln - (f.dense + f.lm_head)).abs() < 1.0, "{} {ln} {:?}", w.gemm_flops(), f);
        assert!((w.attention_flops - f.attention).abs() < 1.0);
    }

    #[test]
    fn tp_splits_the_work_and_dp_crosses_nodes() {
        let cfg = DalleBartConfig::mini();
        let p = profile();
        let one = predict(&cfg, &PlanOptions::new(1, 1, 8), &p).unwrap();
        let tp8 = predict(&cfg, &PlanOptions::new(8, 1, 8), &p).unwrap();
        assert!(tp8.breakdown.gemm_s < one.breakdown.gemm_s / 7.0);
        assert!(tp8.breakdown.tp_comm_s > 0.0 && one.breakdown.comm_s == 0.0);
        assert_eq!(tp8.tp_link, "intra_node");
        let big = predict(&cfg, &PlanOptions::new(8, 8, 8), &p).unwrap();
        assert_eq!(big.dp_link, "inter_node");
        assert!(big.breakdown.dp_comm_s > 0.0);
        assert!(one.predicted_mfu > 0.0 && one.predicted_mfu <= 1.0);
        let err = predict(&cfg, &PlanOptions { precision: Precision::Bf16Mixed, ..PlanOptions::new(1, 1, 8) }, &p)
            .unwrap_err();
        assert!(err.contains("--precision fp32"), "{err}");
        assert!(predict(&cfg, &PlanOptions::new(3, 1, 8), &p).is_err());
    }

    #[test]
    fn ranks_sharing_a_host_add_up_less_their_measured_concurrency_gain() {
        let cfg = DalleBartConfig::micro();
        let mut p = profile();
        p.ranks_share_host = true;
        p.gemm.call_overhead_s = 1e-4;
        let time = |p: &HardwareProfile, tp: usize, dp: usize| predict(&cfg, &PlanOptions::new(tp, dp, 4), p).unwrap();
        let (one, dp2, tp2) = (time(&p, 1, 1), time(&p, 1, 2), time(&p, 2, 1));
        // Without a gain, two data-parallel ranks take twice one rank's compute.
        assert!((dp2.breakdown.compute_s - 2.0 * one.breakdown.compute_s).abs() < 1e-12);
        let gain = |x: f64| ClassSpeedups { gemm: x, attention: x, cross_entropy: x, pointwise: x, optimizer: x };
        p.concurrent_ranks = ConcurrentRanks { tensor_parallel: gain(1.6), data_parallel: gain(1.25) };
        let (one_g, dp2_g, tp2_g) = (time(&p, 1, 1), time(&p, 1, 2), time(&p, 2, 1));
        assert_eq!(one_g.predicted_step_s, one.predicted_step_s, "one rank has no partner");
        let (b, g) = (dp2.breakdown, dp2_g.breakdown);
        assert!((g.attention_s - b.attention_s / 1.25).abs() < 1e-12);
        assert!((g.pointwise_s - b.pointwise_s / 1.25).abs() < 1e-12);
        assert!((tp2_g.breakdown.optimizer_s - tp2.breakdown.optimizer_s / 1.6).abs() < 1e-12);
        // GEMMs: their FLOPs add up, the gain is on the per-call overhead only.
        let overhead = 2.0 * step_work(&cfg, &PlanOptions::new(1, 2, 4), 0).gemms.len() as f64 * 1e-4;
        assert!((g.gemm_s - (b.gemm_s - overhead + overhead / 1.25)).abs() < 1e-12, "{} {}", g.gemm_s, b.gemm_s);
        assert!(g.compute_s < b.compute_s);
        assert_eq!(tp2_g.breakdown.comm_s, tp2.breakdown.comm_s, "the gain is compute only");
        // A 2×2 mesh is split by tp: it takes the tensor-parallel pair's gain.
        assert_eq!(p.concurrent_ranks.for_mesh(2, 2), gain(1.6));
    }

    #[test]
    fn alpha_beta_link() {
        let l = Link { alpha_s: 1e-3, bandwidth_bytes_per_s: 1e9, algorithm: Algorithm::Ring };
        // 2 calls, 1 MB payload over 4 ranks: 2 ms + 1.5 MB / 1 GB/s.
        let s = l.seconds(CollectiveKind::AllReduce, 2, 1e6, 4);
        assert!((s - (2e-3 + 1.5e-3)).abs() < 1e-12, "{s}");
        let m = Link { algorithm: Algorithm::SharedMemory, ..l };
        assert!((m.seconds(CollectiveKind::AllReduce, 1, 1e6, 4) - (1e-3 + 4e-3)).abs() < 1e-12);
        assert_eq!(l.seconds(CollectiveKind::AllReduce, 5, 1e6, 1), 0.0);
    }

    #[test]
    fn gemm_rate_interpolates_log_linearly_and_clamps() {
        let g = GemmRates {
            reference_flops_per_s: 100.0,
            m: vec![(16.0, 0.25), (256.0, 1.0)],
            n: vec![],
            k: vec![],
            call_overhead_s: 0.0,
        };
        assert_eq!(g.rate(4, 1, 1), 25.0);
        assert_eq!(g.rate(1024, 1, 1), 100.0);
        assert!((g.rate(64, 1, 1) - 50.0).abs() < 1e-9);
    }
}
