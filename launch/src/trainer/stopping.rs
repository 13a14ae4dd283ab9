//! When a run stops early: a stop signal (SIGTERM, SIGUSR1, ...), `training.time_limit_minutes`,
//! or the divergence guard. Every rank proposes its reason and the world agrees on the most
//! urgent one in one MAX all-reduce of a scalar per step ([`crate::stop::agree`]), before the
//! update, so nothing diverged is applied and every rank stops at the same step.

use crate::divergence::DivergenceGuard;
use crate::stop::{self, StopReason};
use anyhow::Result;
use dm_parallel::Communicator;
use dm_runtime::Backend;
use std::sync::Arc;
use std::time::Instant;

/// What a rank knows about the step it is about to apply.
pub struct Moment {
    pub rank: usize,
    /// The step's number (1-based).
    pub step: u64,
    pub loss: f32,
    pub grad_norm: f32,
    /// When this session's training began (for the time limit).
    pub started: Instant,
}

/// The world's decision for one step.
pub enum Agreed {
    /// Apply the step; then stop if the reason is a time limit or a signal.
    Go(StopReason),
    /// Stop without applying: this rank's guard message, or that another rank's guard tripped.
    Diverged(String),
}

/// Proposes this rank's reason at `now` (signal, time limit, the guard's verdict on the loss and
/// gradient norm) and returns the world's. Collective: one scalar MAX all-reduce over `world`.
pub fn agree<B: Backend>(
    be: &B,
    world: Option<&Arc<dyn Communicator<B>>>,
    guard: &mut DivergenceGuard,
    now: Moment,
    time_limit_minutes: Option<f64>,
) -> Result<Agreed> {
    let over_time = time_limit_minutes.is_some_and(|m| now.started.elapsed().as_secs_f64() > m * 60.0);
    let tripped = guard.observe(now.step, now.loss, now.grad_norm);
    let mut local = stop::local_reason(over_time).max(crate::test_stop(now.rank, now.step));
    if tripped.is_some() {
        local = StopReason::Diverged;
    }
    let reason = stop::agree(be, world, local)?;
    if reason == StopReason::Diverged {
        return Ok(Agreed::Diverged(
            tripped.unwrap_or_else(|| format!("step {}: another rank's divergence guard tripped", now.step)),
        ));
    }
    Ok(Agreed::Go(reason))
}
