//! The dp gradient reduction issued during the backward (the trainer's default, layer by layer)
//! gives the same training as the reduction after the backward, bit for bit: thread ranks on
//! dp = 2 and tp = 2 × dp = 2, with and without ZeRO-1, gradient accumulation 2, clipping active.
//! Losses, gradient norms and final weights of every rank are compared with `==` on the f32
//! values. The overlap path is checked to really issue the dp gradient collectives during
//! `backward` (and the other path none), so the comparison is between two different schedules.
//! On threads the collectives are blocking, so the step-time ratio printed is expected ≈ 1.
//!
//! The deferred path (what NCCL takes: collectives left in flight, staging kept, one join before
//! the norm) is exercised on the CPU through [`EagerDeferred`], a thread communicator that offers
//! the deferred calls and runs them at once: the same numbers again, and one join per step.

use dalle_mesh::bench::random_batch;
use dalle_mesh::trainer::step::{clip_factor, OptimizerStep};
use dalle_mesh::trainer::Groups;
use dm_model::dallebart::TpGroup;
use dm_model::{AdamWConfig, DalleBart, DalleBartConfig, ParamTable};
use dm_parallel::comm::deferred::{DeferredCollectives, OverlapTimes};
use dm_parallel::{CommStats, Communicator, Mesh, ReduceOp, ThreadComm};
use dm_runtime::cpu::{CpuBackend, CpuBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn config() -> DalleBartConfig {
    DalleBartConfig {
        encoder_ffn_dim: 42,
        decoder_ffn_dim: 42,
        image_vocab_size: 37,
        image_length: 8,
        max_text_length: 6,
        init_std: 0.05,
        ..DalleBartConfig::tiny()
    }
}

const STEPS: u64 = 3;
const MICRO_STEPS: usize = 2;
const ROWS: usize = 2;

/// One rank's run: (loss, grad norm) per step, final weights, dp gradient calls seen during
/// `backward` per step, seconds per step.
struct RankRun {
    steps: Vec<(f32, f32)>,
    weights: Vec<Vec<f32>>,
    dp_calls_in_backward: Vec<u64>,
    seconds: f64,
    /// Joins of deferred collectives (None: the dp communicator has none).
    joins: Option<u64>,
}

fn dp_calls<B: dm_runtime::Backend>(g: &Groups<B>) -> u64 {
    g.dp.as_ref().map_or(0, |c| c.stats().total_calls())
}

/// How the dp gradients are reduced in a run.
#[derive(Clone, Copy, PartialEq)]
enum Schedule {
    AfterBackward,
    DuringBackward,
    /// During the backward through the deferred calls ([`EagerDeferred`]).
    Deferred,
}

/// A thread communicator with deferred collectives that run at once (counting the joins).
struct EagerDeferred {
    inner: ThreadComm,
    joins: AtomicU64,
}

impl Communicator<CpuBackend> for EagerDeferred {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce(&self, buf: &mut CpuBuf, op: ReduceOp) -> dm_parallel::comm::Result<()> {
        self.inner.all_reduce(buf, op)
    }
    fn all_gather(&self, send: &CpuBuf, recv: &mut CpuBuf) -> dm_parallel::comm::Result<()> {
        self.inner.all_gather(send, recv)
    }
    fn reduce_scatter(&self, send: &CpuBuf, recv: &mut CpuBuf, op: ReduceOp) -> dm_parallel::comm::Result<()> {
        self.inner.reduce_scatter(send, recv, op)
    }
    fn broadcast(&self, buf: &mut CpuBuf, root: usize) -> dm_parallel::comm::Result<()> {
        self.inner.broadcast(buf, root)
    }
    fn barrier(&self) -> dm_parallel::comm::Result<()> {
        self.inner.barrier()
    }
    fn stats(&self) -> CommStats {
        self.inner.stats()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
    fn deferred(&self) -> Option<&dyn DeferredCollectives<CpuBackend>> {
        Some(self)
    }
}

impl DeferredCollectives<CpuBackend> for EagerDeferred {
    fn all_reduce_deferred(&self, buf: &mut CpuBuf, op: ReduceOp) -> dm_parallel::comm::Result<()> {
        self.inner.all_reduce(buf, op)
    }
    fn reduce_scatter_deferred(&self, send: &CpuBuf, recv: &mut CpuBuf, op: ReduceOp) -> dm_parallel::comm::Result<()> {
        self.inner.reduce_scatter(send, recv, op)
    }
    fn join_deferred(&self) -> dm_parallel::comm::Result<()> {
        self.joins.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn overlap_times(&self) -> dm_parallel::comm::Result<OverlapTimes> {
        let joins = self.joins.load(Ordering::Relaxed);
        Ok(OverlapTimes { busy_s: 0.0, waited_s: 0.0, joins })
    }
}

fn train(tp: usize, dp: usize, zero1: bool, schedule: Schedule) -> Vec<RankRun> {
    let cfg = config();
    let mesh = Mesh::new(tp, dp).unwrap();
    let full = ParamTable::new(&cfg).init_values(cfg.init_std, 11);
    dm_parallel::run_ranks(&mesh, |rank, comms| {
        let (dp_index, tp_index) = mesh.coords(rank);
        let be = CpuBackend::new();
        let arc = |c: ThreadComm| -> Arc<dyn Communicator<CpuBackend>> { Arc::new(c) };
        let dp_comm = match schedule {
            Schedule::Deferred => Arc::new(EagerDeferred { inner: comms.dp, joins: AtomicU64::new(0) }) as _,
            _ => arc(comms.dp),
        };
        let groups = Groups {
            tp: (tp > 1).then(|| arc(comms.tp)),
            dp: (dp > 1).then_some(dp_comm),
            world: Some(arc(comms.world)),
        };
        let local = ParamTable::sharded(&cfg, tp_index, tp).shard_values(&full);
        let group = groups.tp.clone().map(|comm| TpGroup { rank: tp_index, size: tp, comm });
        let model = DalleBart::new_sharded(be.clone(), cfg.clone(), group, local)?;
        let adamw = AdamWConfig { weight_decay: 0.01, ..Default::default() };
        let mut core = OptimizerStep::new(be, model, groups, adamw, zero1, (dp_index, dp), None, 0)?;
        core.set_overlap_grad_reduce(schedule != Schedule::AfterBackward);
        let tokens = (ROWS * MICRO_STEPS * dp * cfg.image_length) as f32;
        let mut run =
            RankRun { steps: vec![], weights: vec![], dp_calls_in_backward: vec![], seconds: 0.0, joins: None };
        let t0 = Instant::now();
        for step in 0..STEPS {
            let before = dp_calls(&core.groups);
            let mut micro = 0u64;
            let local = core.backward(MICRO_STEPS, 1.0 / tokens, || {
                micro += 1;
                random_batch(&cfg, ROWS, 100 * step + 10 * dp_index as u64 + micro)
            })?;
            run.dp_calls_in_backward.push(dp_calls(&core.groups) - before);
            let synced = core.sync(local)?;
            run.steps.push((synced.loss, synced.grad_norm));
            // A clip threshold below the norm, so that clipping takes part.
            let clip = clip_factor(Some(0.5 * synced.grad_norm), synced.grad_norm);
            core.apply(synced, 3e-3, clip)?;
        }
        run.seconds = t0.elapsed().as_secs_f64();
        run.joins = core.dp_overlap_times()?.map(|t| t.joins);
        run.weights = core.model.param_values()?;
        Ok::<_, anyhow::Error>(run)
    })
    .map_err(|f| anyhow::anyhow!("{f}"))
    .unwrap()
}

fn check(tp: usize, dp: usize, zero1: bool) {
    let what = format!("tp={tp} dp={dp} zero1={zero1}");
    // A first run warms the allocator and thread pools, so the two timed runs compare fairly.
    let _warm = train(tp, dp, zero1, Schedule::DuringBackward);
    let after = train(tp, dp, zero1, Schedule::AfterBackward);
    let during = train(tp, dp, zero1, Schedule::DuringBackward);
    let deferred = train(tp, dp, zero1, Schedule::Deferred);
    let tensors = ParamTable::sharded(&config(), 0, tp).specs.len() as u64;
    for (rank, (a, d)) in after.iter().zip(&during).enumerate() {
        assert!(a.dp_calls_in_backward.iter().all(|&c| c == 0), "{what} rank {rank}: after-backward path");
        assert!(
            d.dp_calls_in_backward.iter().all(|&c| c == tensors),
            "{what} rank {rank}: one dp gradient collective per tensor during the backward, got {:?} of {tensors}",
            d.dp_calls_in_backward
        );
        assert_eq!(a.steps, d.steps, "{what} rank {rank}: losses and gradient norms");
        assert!(a.weights == d.weights, "{what} rank {rank}: final weights differ");
        let f = &deferred[rank];
        assert_eq!((a.joins, d.joins, f.joins), (None, None, Some(STEPS)), "{what} rank {rank}: one join per step");
        assert_eq!(f.dp_calls_in_backward, d.dp_calls_in_backward, "{what} rank {rank}: deferred calls");
        assert_eq!(a.steps, f.steps, "{what} rank {rank}: deferred losses and gradient norms");
        assert!(a.weights == f.weights, "{what} rank {rank}: deferred final weights differ");
        assert!(
            a.weights
                != ParamTable::sharded(&config(), rank % tp, tp)
                    .shard_values(&ParamTable::new(&config()).init_values(config().init_std, 11))
        );
    }
    let (ta, td) = (after[0].seconds, during[0].seconds);
    println!("{what}: step time during/after backward = {:.3} ({td:.3} s / {ta:.3} s, {STEPS} steps)", td / ta);
}

#[test]
fn dp2_all_reduce_during_the_backward_is_bit_identical() {
    check(1, 2, false);
}

#[test]
fn dp2_zero1_reduce_scatter_during_the_backward_is_bit_identical() {
    check(1, 2, true);
}

#[test]
fn tp2_dp2_all_reduce_during_the_backward_is_bit_identical() {
    check(2, 2, false);
}

#[test]
fn tp2_dp2_zero1_reduce_scatter_during_the_backward_is_bit_identical() {
    check(2, 2, true);
}
