//! Why a run stops early, agreed by every rank at a step boundary.
//!
//! Each rank forms its local [`StopReason`] (a received signal, the time limit, the divergence
//! guard) and [`agree`] takes the MAX over the world group with one scalar all-reduce through the
//! [`Communicator`] trait (as Megatron-LM agrees on its exit flags), so every rank — threads here,
//! processes with another communicator — takes the same decision at the same step. A rank that left
//! alone would leave the others waiting in their next collective.
//!
//! The encoding orders the reasons by urgency: divergence over a signal over the time limit.

use anyhow::Result;
use dm_parallel::{Communicator, ReduceOp};
use dm_runtime::Backend;
use std::sync::Arc;

/// Why a run stops before `training.steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Keep going.
    None,
    /// `training.time_limit_minutes` passed: save, sample, exit 0.
    TimeLimit,
    /// A stop signal (its number): save, exit [`crate::exit_code::STOPPED_REQUEUE`].
    Signal(i32),
    /// The divergence guard tripped: stop without saving, exit [`crate::exit_code::DIVERGED`].
    Diverged,
}

const DIVERGED_CODE: f32 = 1000.0;
const SIGNAL_BASE: f32 = 100.0;

impl StopReason {
    /// The scalar all-reduced with MAX.
    pub fn code(self) -> f32 {
        match self {
            StopReason::None => 0.0,
            StopReason::TimeLimit => 1.0,
            StopReason::Signal(s) => SIGNAL_BASE + s as f32,
            StopReason::Diverged => DIVERGED_CODE,
        }
    }

    /// Inverse of [`code`](Self::code).
    pub fn from_code(c: f32) -> Self {
        if c >= DIVERGED_CODE {
            StopReason::Diverged
        } else if c >= SIGNAL_BASE {
            StopReason::Signal((c - SIGNAL_BASE).round() as i32)
        } else if c >= 0.5 {
            StopReason::TimeLimit
        } else {
            StopReason::None
        }
    }

    /// The more urgent of two reasons.
    pub fn max(self, other: Self) -> Self {
        if other.code() > self.code() {
            other
        } else {
            self
        }
    }

    /// For logs and the summary line: `time_limit`, `SIGTERM`, `diverged`.
    pub fn label(self) -> Option<String> {
        match self {
            StopReason::None => None,
            StopReason::TimeLimit => Some("time_limit".into()),
            StopReason::Signal(s) => Some(crate::signals::name(s)),
            StopReason::Diverged => Some("diverged".into()),
        }
    }
}

/// The world's agreed reason: one MAX all-reduce of one scalar over `world` (the local reason
/// itself on a single device).
pub fn agree<B: Backend>(be: &B, world: Option<&Arc<dyn Communicator<B>>>, local: StopReason) -> Result<StopReason> {
    let Some(comm) = world else { return Ok(local) };
    let mut buf = be.upload("stop_reason", &[local.code()])?;
    comm.all_reduce(&mut buf, ReduceOp::Max)?;
    Ok(StopReason::from_code(be.download(&buf)?[0]))
}

/// This rank's local reason before the guard: a received stop signal, else the time limit.
pub fn local_reason(over_time: bool) -> StopReason {
    match crate::signals::received() {
        Some(s) => StopReason::Signal(s),
        None if over_time => StopReason::TimeLimit,
        None => StopReason::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_order_by_urgency() {
        for r in [
            StopReason::None,
            StopReason::TimeLimit,
            StopReason::Signal(15),
            StopReason::Signal(1),
            StopReason::Diverged,
        ] {
            assert_eq!(StopReason::from_code(r.code()), r);
        }
        assert_eq!(StopReason::TimeLimit.max(StopReason::Signal(10)), StopReason::Signal(10));
        assert_eq!(StopReason::Diverged.max(StopReason::Signal(10)), StopReason::Diverged);
        assert_eq!(StopReason::None.max(StopReason::TimeLimit), StopReason::TimeLimit);
    }
}
