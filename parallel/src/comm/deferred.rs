//! Collectives left in flight: how the data-parallel gradient reduction overlaps the backward.
//!
//! A communicator that can run collectives beside the compute order (NCCL: on its side stream)
//! offers [`DeferredCollectives`] through [`super::Communicator::deferred`]. A deferred call is
//! ordered after everything already enqueued on the compute order (so it reads the final
//! gradient) but the compute order does **not** wait for it: later compute overlaps it until
//! [`DeferredCollectives::join_deferred`] makes the compute order wait for every deferred call so
//! far. Communicators without it (threads, MPI, solo) return `None` and callers issue the
//! ordinary blocking collective at the same place — the same calls in the same order on every
//! rank either way, so the numbers are identical.
//!
//! Contract for the caller: the buffers of a deferred call stay alive and are neither read nor
//! written by other work until `join_deferred` returned.

use super::ReduceOp;
use super::Result;
use dm_runtime::Backend;

/// The seconds of the deferred collectives measured so far (see [`OverlapTimes::hidden_share`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OverlapTimes {
    /// Time the deferred collectives ran on the communicator's stream (Σ end − start per call).
    pub busy_s: f64,
    /// Time the compute order stood still at the joins waiting for them.
    pub waited_s: f64,
    /// Joins measured.
    pub joins: u64,
}

impl OverlapTimes {
    /// The share of the collectives' time hidden behind compute: `1 − waited / busy`, `None`
    /// before anything ran.
    pub fn hidden_share(&self) -> Option<f64> {
        (self.busy_s > 0.0).then(|| (1.0 - self.waited_s / self.busy_s).clamp(0.0, 1.0))
    }

    /// `self − earlier` (the times of the calls in between).
    pub fn since(&self, earlier: &OverlapTimes) -> OverlapTimes {
        OverlapTimes {
            busy_s: self.busy_s - earlier.busy_s,
            waited_s: self.waited_s - earlier.waited_s,
            joins: self.joins - earlier.joins,
        }
    }
}

/// Collectives that run beside the compute order until joined (see the module docs).
pub trait DeferredCollectives<B: Backend>: Send + Sync {
    /// Starts `buf = op(buf of every rank)` in place.
    fn all_reduce_deferred(&self, buf: &mut B::Buf, op: ReduceOp) -> Result<()>;
    /// Starts the reduce-scatter of [`super::Communicator::reduce_scatter`].
    fn reduce_scatter_deferred(&self, send: &B::Buf, recv: &mut B::Buf, op: ReduceOp) -> Result<()>;
    /// Makes the compute order wait for every deferred collective so far (and counts them in
    /// [`super::Communicator::stats`]).
    fn join_deferred(&self) -> Result<()>;
    /// The busy and waited time of the joined collectives so far (waits until they finished).
    fn overlap_times(&self) -> Result<OverlapTimes>;
}

#[cfg(test)]
mod tests {
    use super::OverlapTimes;

    #[test]
    fn hidden_share_is_one_minus_wait_over_busy() {
        let t = OverlapTimes { busy_s: 2.0, waited_s: 0.5, joins: 1 };
        assert_eq!(t.hidden_share(), Some(0.75));
        assert_eq!(OverlapTimes::default().hidden_share(), None, "nothing ran");
        let all_waited = OverlapTimes { busy_s: 1.0, waited_s: 1.5, joins: 1 };
        assert_eq!(all_waited.hidden_share(), Some(0.0));
        let later = OverlapTimes { busy_s: 5.0, waited_s: 1.0, joins: 3 };
        assert_eq!(later.since(&t), OverlapTimes { busy_s: 3.0, waited_s: 0.5, joins: 2 });
    }
}
