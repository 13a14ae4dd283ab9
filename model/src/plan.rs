//! Memory and communication plans: what one rank of a `tp × dp` mesh holds while it trains
//! DalleBart, and what it sends per optimizer step — computed from the config alone, before
//! anything is allocated.
//!
//! # Memory ([`plan`])
//!
//! In both precisions the plan counts what the model and the trainer allocate through the
//! backend (so the CPU memory tracker's peak equals it; `model/tests/plan.rs` checks that
//! exactly, in fp32 and in bf16-mixed); the activations are read off the model's own activation table
//! ([`crate::dallebart::activations`]), the one list the model allocates from:
//! - **weights**, **gradients**: this rank's [`ParamTable::sharded`] tensors, 4 bytes each;
//! - **optimizer_state**: AdamW's two moments, full local size, or with ZeRO-1 `⌈n/dp⌉` per tensor;
//! - **activations**: every buffer of the activation table for a micro-batch of
//!   `batch_per_device` rows (forward activations of both stacks with their ids, LayerNorm
//!   mean/rstd, attention lse, logits `[image tokens, local vocab]`, losses, cross-entropy
//!   statistics, the backward scratch of both stacks, `∂encoder_output`), plus one batch-ids buffer
//!   that is briefly held twice when the forward re-uploads a batch;
//! - **communication_buffers**: with ZeRO-1 the trainer's staging — the summed gradient chunks of
//!   every tensor (`Σ⌈n/dp⌉`, held from the reduce-scatter to the end of the update) plus, for the
//!   tensor being updated, its parameter chunk and the all-gather target (`(dp + 1)·⌈n/dp⌉` for the
//!   largest tensor); without ZeRO-1 the gradients are all-reduced in place (0). One-float scalar
//!   buffers (loss, grad norm, flags) are not counted;
//! - **workspace**: memory the tracker does not see. CPU: the attention kernel's per-thread score
//!   scratch, `2 · max(q_len · kv_len)` f32 per thread ([`PlanOptions::cpu_threads`]).
//!
//! `total_tracked` is the sum of the tracked parts: the tracker's peak, except that with ZeRO-1 the
//! ids re-upload (a few KiB) and the staging are not live at the same time, so there the plan is
//! high by that one ids buffer. `total` adds the workspace; `fits` compares `total` with the
//! device memory.
//!
//! For [`Precision::Bf16Mixed`] the plan counts what the policy of [`crate::precision`]
//! allocates (the CPU backend runs it with bf16 storage; the CUDA backend does not store bf16
//! yet and refuses it):
//! - weights: fp32 master copy (4 bytes per parameter) + a bf16 copy of every Dense kernel (2
//!   bytes per kernel element; embeddings and LayerNorm parameters have none); gradients fp32
//!   (4 bytes); AdamW moments fp32 (8 bytes, or ZeRO-1 chunks);
//! - activations: the same buffers as the fp32 model, at 2 bytes for the table's `Act` buffers
//!   (Dense outputs including the logits, LayerNorm outputs, attention output, residual stream,
//!   GLU intermediates, activation-gradient temporaries), at 4 bytes for the token + position
//!   embeddings, LayerNorm mean/rstd, attention lse, per-token losses and cross-entropy
//!   statistics, the gradient accumulators (residual-stream gradient `dres`, `dtmp`,
//!   `∂encoder_output`, sharded-LayerNorm sums), and the i32 token ids;
//! - communication buffers: ZeRO-1 staging in fp32 as above;
//! - workspace (estimates, untracked by any allocator): CUDA context and kernels 512 MiB, cuBLAS
//!   workspace 32 MiB, NCCL internal buffers 256 MiB per multi-rank communicator (tp, dp; world
//!   only carries scalars). FlashAttention-style kernels keep no `[T, T]` buffer. Allocator
//!   fragmentation is not modelled: keep ~10 % headroom.
//!
//! The plan is for the worst rank: every tensor-parallel rank is planned (uneven ffn splits give
//! ranks different sizes; padded vocabularies give every rank the padded width) and the largest
//! is returned. Data-parallel ranks are identical (ZeRO-1 chunks are padded to `⌈n/dp⌉`).
//!
//! # Communication ([`step_comm`])
//!
//! Per-rank collective calls and bytes of one optimizer step, in the units of
//! [`dm_parallel::CommStats`] (bytes = 4 · length of the buffer this rank passes); the formulas are
//! derived in `docs/communication.md`.

use crate::config::DalleBartConfig;
use crate::dallebart::activations::{activation_sizes, Elems, StackDims};
use crate::params::{check_tp, ParamTable};
use crate::precision::has_bf16_copy;
use dm_parallel::{CommStats, OpStats};
use serde::Serialize;

/// Numeric format of a training run (defined with the policy in [`crate::precision`]).
pub use crate::precision::Precision;

/// What to plan: a mesh, a per-rank micro-batch and a precision.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Tensor-parallel ranks (must divide the head counts: [`check_tp`]).
    pub tp: usize,
    /// Data-parallel ranks.
    pub dp: usize,
    /// Micro-batch rows per data-parallel rank (`batch_size / grad_accumulation / dp`).
    pub batch_per_device: usize,
    pub precision: Precision,
    /// ZeRO-1 optimizer-state sharding across dp (ignored when `dp == 1`, as the trainer does).
    pub zero1: bool,
    /// Memory of one device, for [`MemoryPlan::fits`].
    pub device_memory: Option<u64>,
    /// CPU threads that each keep an attention scratch (the workspace of [`Precision::Fp32`]).
    pub cpu_threads: usize,
}

impl PlanOptions {
    /// fp32, no ZeRO-1, no device memory, 2 CPU threads.
    pub fn new(tp: usize, dp: usize, batch_per_device: usize) -> Self {
        Self { tp, dp, batch_per_device, precision: Precision::Fp32, zero1: false, device_memory: None, cpu_threads: 2 }
    }
    /// Whether the optimizer state is actually sharded (ZeRO-1 asked for and dp > 1).
    pub fn zero1_active(&self) -> bool {
        self.zero1 && self.dp > 1
    }
}

/// The activation bytes by where they are allocated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ActivationBreakdown {
    /// Saved forward activations of the encoder stack (with its token ids).
    pub encoder: u64,
    /// Saved forward activations of the decoder stack (with its token ids).
    pub decoder: u64,
    /// Logits `[image tokens, local vocab]`, per-token losses, cross-entropy statistics, the
    /// attention mask and the labels.
    pub logits_and_loss: u64,
    /// Gradient scratch of both stacks and `∂encoder_output`.
    pub backward_scratch: u64,
    /// One batch-ids buffer held twice while the forward re-uploads the batch.
    pub input_transient: u64,
}

impl ActivationBreakdown {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.encoder + self.decoder + self.logits_and_loss + self.backward_scratch + self.input_transient
    }
}

/// Bytes one rank holds while training (see the module documentation for each part).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// The tensor-parallel rank planned (the largest one).
    pub tp_rank: usize,
    /// Parameters this rank holds (its tensor-parallel shard).
    pub params_per_rank: u64,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer_state: u64,
    pub activations: u64,
    pub activation_breakdown: ActivationBreakdown,
    pub communication_buffers: u64,
    /// Memory no allocator tracks (CPU attention scratch; GPU context, cuBLAS, NCCL).
    pub workspace: u64,
    /// weights + gradients + optimizer_state + activations + communication_buffers: what the
    /// device's memory tracker sees (and what `mesh.device_memory` budgets).
    pub total_tracked: u64,
    /// `total_tracked + workspace`.
    pub total: u64,
    pub device_memory: Option<u64>,
    /// `total ≤ device_memory`, when a device memory was given.
    pub fits: Option<bool>,
    pub notes: String,
}

/// Bytes of element counts at precision `p`.
fn bytes(e: Elems, p: Precision) -> u64 {
    e.act * p.act_bytes() + 4 * e.f32 + 4 * e.ids
}

/// The activation buffers of tensor-parallel rank `rank` for a micro-batch of `batch` rows: the
/// model's own activation table ([`activation_sizes`]), counted.
fn activations(c: &DalleBartConfig, tp: usize, rank: usize, batch: usize, p: Precision) -> ActivationBreakdown {
    let sizes = activation_sizes(c, (rank, tp), batch);
    let (nt, ni) = ((batch * c.max_text_length) as u64, (batch * c.image_length) as u64);
    ActivationBreakdown {
        encoder: bytes(sizes.encoder, p),
        decoder: bytes(sizes.decoder, p),
        logits_and_loss: bytes(sizes.logits_and_loss, p),
        backward_scratch: bytes(sizes.backward_scratch, p),
        input_transient: 4 * nt.max(ni),
    }
}

const MIB: u64 = 1 << 20;
/// CUDA context, modules and kernels (estimate).
const GPU_CONTEXT_BYTES: u64 = 512 * MIB;
/// cuBLAS / cuBLASLt workspace (estimate).
const GPU_BLAS_WORKSPACE_BYTES: u64 = 32 * MIB;
/// NCCL internal buffers per multi-rank communicator (estimate).
const GPU_NCCL_BYTES_PER_COMM: u64 = 256 * MIB;

/// Checks a config and options can be planned (the mesh divides the config, sizes positive).
fn check(cfg: &DalleBartConfig, opts: &PlanOptions) -> Result<(), String> {
    cfg.validate().map_err(|e| e.to_string())?;
    if opts.dp == 0 {
        return Err("dp must be at least 1".into());
    }
    if opts.batch_per_device == 0 {
        return Err("batch_per_device must be at least 1".into());
    }
    check_tp(cfg, opts.tp).map_err(|e| format!("tp = {}: {e}", opts.tp))
}

/// The memory plan of tensor-parallel rank `tp_rank` (see [`plan`] for the worst rank).
pub fn plan_rank(cfg: &DalleBartConfig, opts: &PlanOptions, tp_rank: usize) -> Result<MemoryPlan, String> {
    check(cfg, opts)?;
    if tp_rank >= opts.tp {
        return Err(format!("tp rank {tp_rank} is outside tp = {}", opts.tp));
    }
    let p = opts.precision;
    let table = ParamTable::sharded(cfg, tp_rank, opts.tp);
    let lens: Vec<u64> = table.specs.iter().map(|s| s.numel() as u64).collect();
    let n: u64 = lens.iter().sum();
    let zero1 = opts.zero1_active();
    let dp = opts.dp as u64;
    let chunks: Vec<u64> = lens.iter().map(|&l| l.div_ceil(dp)).collect();
    let chunk_sum: u64 = chunks.iter().sum();
    let chunk_max = chunks.iter().copied().max().unwrap_or(0);

    // bf16-mixed: + a 2-byte copy of every Dense kernel (crate::precision::has_bf16_copy).
    let copied: u64 = table.specs.iter().filter(|s| has_bf16_copy(s)).map(|s| s.numel() as u64).sum();
    let weights = match p {
        Precision::Fp32 => 4 * n,
        Precision::Bf16Mixed => 4 * n + 2 * copied,
    };
    let gradients = 4 * n;
    let optimizer_state = 8 * if zero1 { chunk_sum } else { n };
    let breakdown = activations(cfg, opts.tp, tp_rank, opts.batch_per_device, p);
    let activations = breakdown.total();
    let communication_buffers = if zero1 { 4 * (chunk_sum + (dp + 1) * chunk_max) } else { 0 };
    let (t_txt, t_img) = (cfg.max_text_length as u64, cfg.image_length as u64);
    let workspace = match p {
        Precision::Fp32 => {
            let scores = (t_txt * t_txt).max(t_img * t_img).max(t_img * t_txt);
            2 * scores * 4 * opts.cpu_threads as u64
        }
        Precision::Bf16Mixed => {
            let comms = (opts.tp > 1) as u64 + (opts.dp > 1) as u64;
            GPU_CONTEXT_BYTES + GPU_BLAS_WORKSPACE_BYTES + comms * GPU_NCCL_BYTES_PER_COMM
        }
    };
    let total_tracked = weights + gradients + optimizer_state + activations + communication_buffers;
    let total = total_tracked + workspace;

    let mut notes = Vec::new();
    if opts.tp > 1 {
        let coords = (tp_rank, opts.tp);
        let (enc, dec) = (StackDims::encoder(cfg, coords), StackDims::decoder(cfg, coords));
        let (fe, fd, v) = (enc.ffn_local, dec.ffn_local, dec.vocab_local);
        notes.push(format!(
            "tp rank {tp_rank}: ffn {fe}/{fd} of {}/{}, vocab {v} (padded)",
            cfg.encoder_ffn_dim, cfg.decoder_ffn_dim
        ));
    }
    if opts.zero1 && opts.dp == 1 {
        notes.push("zero1 ignored with dp = 1".into());
    }
    notes.push(match p {
        Precision::Fp32 => format!(
            "fp32 as the CPU backend allocates; workspace = attention scratch of {} threads (untracked)",
            opts.cpu_threads
        ),
        Precision::Bf16Mixed => "bf16-mixed: fp32 master + bf16 Dense kernels, fp32 grads and moments, bf16 \
            activations (embeddings, LN stats, lse, CE, grad accumulators fp32); workspace = CUDA context 512 MiB + cuBLAS 32 MiB + \
            NCCL 256 MiB per tp/dp communicator (estimates); keep ~10% headroom for fragmentation"
            .into(),
    });
    Ok(MemoryPlan {
        tp_rank,
        params_per_rank: n,
        weights,
        gradients,
        optimizer_state,
        activations,
        activation_breakdown: breakdown,
        communication_buffers,
        workspace,
        total_tracked,
        total,
        device_memory: opts.device_memory,
        fits: opts.device_memory.map(|m| total <= m),
        notes: notes.join("; "),
    })
}

/// Per-rank memory of training `cfg` with `opts`: the largest tensor-parallel rank's plan.
/// Errors name what doesn't divide (heads by tp, …) or what is zero.
pub fn plan(cfg: &DalleBartConfig, opts: &PlanOptions) -> Result<MemoryPlan, String> {
    check(cfg, opts)?;
    let mut best: Option<MemoryPlan> = None;
    for rank in 0..opts.tp {
        let p = plan_rank(cfg, opts, rank)?;
        if best.as_ref().is_none_or(|b| p.total > b.total) {
            best = Some(p);
        }
    }
    Ok(best.expect("tp ≥ 1"))
}

// ---------------------------------------------------------------------------------------------
// Communication.

/// Collective traffic of one rank, per communicator of the mesh (tp group, dp group, world).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepComm {
    pub tp: CommStats,
    pub dp: CommStats,
    pub world: CommStats,
}

impl StepComm {
    /// Field-wise sum.
    pub fn merged(&self, o: &StepComm) -> StepComm {
        StepComm { tp: self.tp.merged(&o.tp), dp: self.dp.merged(&o.dp), world: self.world.merged(&o.world) }
    }
    /// `self` repeated `k` times.
    pub fn times(&self, k: u64) -> StepComm {
        let m = |s: &CommStats| {
            let f = |o: OpStats| OpStats { calls: o.calls * k, bytes: o.bytes * k };
            CommStats {
                all_reduce: f(s.all_reduce),
                all_gather: f(s.all_gather),
                reduce_scatter: f(s.reduce_scatter),
                broadcast: f(s.broadcast),
                barrier: f(s.barrier),
            }
        };
        StepComm { tp: m(&self.tp), dp: m(&self.dp), world: m(&self.world) }
    }
}

/// `calls` collectives passing `elems` f32 in total (bytes as [`CommStats`] counts them).
fn ops(calls: u64, elems: u64) -> OpStats {
    OpStats { calls, bytes: 4 * elems }
}

/// Adds `calls` collectives passing `elems` f32 in total to `o`.
fn add(o: &mut OpStats, calls: u64, elems: u64) {
    o.calls += calls;
    o.bytes += 4 * elems;
}

/// Micro-batch token counts and sizes used by the tp formulas.
struct TpShape {
    nt: u64,
    ni: u64,
    d: u64,
    le: u64,
    ld: u64,
}

fn tp_shape(cfg: &DalleBartConfig, batch: usize) -> TpShape {
    TpShape {
        nt: (batch * cfg.max_text_length) as u64,
        ni: (batch * cfg.image_length) as u64,
        d: cfg.d_model as u64,
        le: cfg.encoder_layers as u64,
        ld: cfg.decoder_layers as u64,
    }
}

/// tp all-reduces of one forward over a micro-batch of `batch` rows (none when `tp == 1`):
/// both token embeddings `[tokens, d]`; per encoder layer out_proj `[nt, d]`, GLU-LN `2 × [nt]`,
/// Dense_2 `[nt, d]`; per decoder layer self and cross out_proj `2 × [ni, d]`, GLU-LN `2 × [ni]`,
/// Dense_2 `[ni, d]`.
pub fn forward_comm(cfg: &DalleBartConfig, tp: usize, batch: usize) -> CommStats {
    tp_all_reduces(cfg, tp, batch, |s| {
        let calls = 2 + 4 * s.le + 5 * s.ld;
        let elems = (s.nt + s.ni) * s.d + s.le * (2 * s.nt * s.d + 2 * s.nt) + s.ld * (3 * s.ni * s.d + 2 * s.ni);
        (calls, elems)
    })
}

/// The tp all-reduces `(calls, elems)` that `count` gives for a micro-batch of `batch` rows, as
/// stats (none when `tp == 1`).
fn tp_all_reduces(
    cfg: &DalleBartConfig,
    tp: usize,
    batch: usize,
    count: impl FnOnce(&TpShape) -> (u64, u64),
) -> CommStats {
    if tp <= 1 {
        return CommStats::default();
    }
    let (calls, elems) = count(&tp_shape(cfg, batch));
    CommStats { all_reduce: ops(calls, elems), ..Default::default() }
}

/// tp all-reduces of the vocab-parallel cross-entropy: row max `[ni]` (max) and `[2, ni]` sums.
pub fn loss_comm(cfg: &DalleBartConfig, tp: usize, batch: usize) -> CommStats {
    tp_all_reduces(cfg, tp, batch, |s| (2, 3 * s.ni))
}

/// tp all-reduces of one backward: lm_head input gradient `[ni, d]`; per decoder layer GLU-LN
/// sums `[2, ni]`, Dense_0/1 input gradient `[ni, d]`, cross-attention q and self-attention q/k/v
/// input gradients `2 × [ni, d]`; `∂encoder_output` `[nt, d]` once; per encoder layer GLU-LN sums
/// `[2, nt]`, Dense_0/1 and q/k/v input gradients `2 × [nt, d]`.
pub fn backward_comm(cfg: &DalleBartConfig, tp: usize, batch: usize) -> CommStats {
    tp_all_reduces(cfg, tp, batch, |s| {
        let calls = 2 + 4 * s.ld + 3 * s.le;
        let elems = (s.ni + s.nt) * s.d + s.ld * (3 * s.ni * s.d + 2 * s.ni) + s.le * (2 * s.nt * s.d + 2 * s.nt);
        (calls, elems)
    })
}

/// dp traffic of the gradient sync of tp rank `tp_rank`: one all-reduce per tensor of its local
/// gradients, or with ZeRO-1 one reduce-scatter (`dp·⌈n/dp⌉` sent) and one all-gather (`⌈n/dp⌉`
/// sent) per tensor. Nothing when `dp == 1`.
pub fn grad_sync_comm(cfg: &DalleBartConfig, opts: &PlanOptions, tp_rank: usize) -> CommStats {
    if opts.dp <= 1 {
        return CommStats::default();
    }
    let table = ParamTable::sharded(cfg, tp_rank, opts.tp);
    let tensors = table.specs.len() as u64;
    let dp = opts.dp as u64;
    if opts.zero1_active() {
        let chunks: u64 = table.specs.iter().map(|s| (s.numel() as u64).div_ceil(dp)).sum();
        CommStats { reduce_scatter: ops(tensors, dp * chunks), all_gather: ops(tensors, chunks), ..Default::default() }
    } else {
        CommStats { all_reduce: ops(tensors, table.numel() as u64), ..Default::default() }
    }
}

/// The trainer's one-float all-reduces of every step: the loss (dp, avg), the squared gradient
/// norm (tp, sum — or world with ZeRO-1) and the agreed stop reason (world, max: stop signal,
/// time limit or divergence, see `dalle_mesh::stop`). A communicator
/// of one rank is never called.
pub fn trainer_scalar_comm(opts: &PlanOptions) -> StepComm {
    let world = opts.tp * opts.dp;
    let mut c = StepComm::default();
    if opts.dp > 1 {
        add(&mut c.dp.all_reduce, 1, 1);
    }
    if opts.zero1_active() {
        add(&mut c.world.all_reduce, 1, 1);
    } else if opts.tp > 1 {
        add(&mut c.tp.all_reduce, 1, 1);
    }
    if world > 1 {
        add(&mut c.world.all_reduce, 1, 1);
    }
    c
}

/// Everything tp rank `tp_rank` sends in one ordinary optimizer step (no log line, evaluation or
/// checkpoint): `grad_accumulation` × (forward + loss + backward) over tp, the gradient sync over
/// dp, and the trainer's scalars.
pub fn step_comm(cfg: &DalleBartConfig, opts: &PlanOptions, tp_rank: usize, grad_accumulation: usize) -> StepComm {
    let b = opts.batch_per_device;
    let micro =
        forward_comm(cfg, opts.tp, b).merged(&loss_comm(cfg, opts.tp, b)).merged(&backward_comm(cfg, opts.tp, b));
    let model = StepComm { tp: micro, ..Default::default() }.times(grad_accumulation as u64);
    let sync = StepComm { dp: grad_sync_comm(cfg, opts, tp_rank), ..Default::default() };
    model.merged(&sync).merged(&trainer_scalar_comm(opts))
}

/// Extra traffic of a step that writes a log line: the world max of the peak memory.
pub fn log_line_comm(opts: &PlanOptions) -> StepComm {
    let mut c = StepComm::default();
    if opts.tp * opts.dp > 1 {
        add(&mut c.world.all_reduce, 1, 1);
    }
    c
}

/// Traffic of an evaluation of `batches` micro-batches of `batch_per_device` rows: forward and
/// loss over tp per batch, then the mean loss over dp.
pub fn eval_comm(cfg: &DalleBartConfig, opts: &PlanOptions, batches: usize) -> StepComm {
    let b = opts.batch_per_device;
    let tp = forward_comm(cfg, opts.tp, b).merged(&loss_comm(cfg, opts.tp, b));
    let mut c = StepComm { tp, ..Default::default() }.times(batches as u64);
    if opts.dp > 1 {
        add(&mut c.dp.all_reduce, 1, 1);
    }
    c
}

/// Extra traffic of a step that saves a checkpoint, before the shards are gathered: the
/// divergence probe (the loss of the weights about to be saved on the next micro-batch), an
/// evaluation of one batch.
pub fn save_probe_comm(cfg: &DalleBartConfig, opts: &PlanOptions) -> StepComm {
    eval_comm(cfg, opts, 1)
}

/// Traffic of a checkpoint or sample step: two world barriers (hand-over of the shards to world
/// rank 0, and after it has written); the shards themselves move through host memory.
pub fn checkpoint_comm(opts: &PlanOptions) -> StepComm {
    let mut c = StepComm::default();
    if opts.tp * opts.dp > 1 {
        c.world.barrier = OpStats { calls: 2, bytes: 0 };
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses() {
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::Fp32);
        assert_eq!("bf16-mixed".parse::<Precision>().unwrap(), Precision::Bf16Mixed);
        assert!("fp8".parse::<Precision>().unwrap_err().contains("fp32"));
    }

    #[test]
    fn refuses_a_mesh_the_config_cannot_take() {
        let err = plan(&DalleBartConfig::mini(), &PlanOptions::new(3, 1, 8)).unwrap_err();
        assert!(err.contains("tp = 3") && err.contains("attention_heads"), "{err}");
        assert!(plan(&DalleBartConfig::mini(), &PlanOptions::new(1, 1, 0)).is_err());
    }

    #[test]
    fn worst_rank_is_the_one_with_the_larger_ffn_share() {
        let mut c = DalleBartConfig::micro();
        c.encoder_ffn_dim = 257; // rank 1 gets 129 columns over tp 2
        let p = plan(&c, &PlanOptions::new(2, 1, 2)).unwrap();
        assert_eq!(p.tp_rank, 1);
        assert!(p.total > plan_rank(&c, &PlanOptions::new(2, 1, 2), 0).unwrap().total);
    }
}
