//! The divergence guard: stops a run whose loss or gradient norm is not finite, or whose loss
//! stays above `loss_factor` × the running median of the recent losses for `patience_steps`
//! steps in a row (settings: `training.divergence`). Losses of such a streak don't enter the
//! median, so a climbing loss can't raise its own bar. The trainer asks the guard before every
//! optimizer update and before every checkpoint write, so nothing diverged is ever saved.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// `training.divergence` of the run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DivergenceSection {
    /// A loss above this multiple of the running median counts as diverging (null = only the
    /// non-finite checks).
    pub loss_factor: Option<f32>,
    /// Consecutive diverging steps that stop the run.
    pub patience_steps: u64,
    /// Losses in the running median.
    pub window_steps: usize,
}

impl Default for DivergenceSection {
    fn default() -> Self {
        Self { loss_factor: Some(3.0), patience_steps: 20, window_steps: 100 }
    }
}

impl DivergenceSection {
    /// Value checks; each message names the key.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.loss_factor.is_some_and(|f| !(f.is_finite() && f > 1.0)) {
            p.push(
                "training.divergence.loss_factor must be a finite number above 1 (or null to switch the loss rule off)"
                    .into(),
            );
        }
        if self.patience_steps == 0 {
            p.push("training.divergence.patience_steps must be at least 1".into());
        }
        if self.window_steps == 0 {
            p.push("training.divergence.window_steps must be at least 1".into());
        }
        p
    }
}

/// What the guard remembers; saved in each checkpoint so a resumed run judges as the
/// uninterrupted one would.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardState {
    /// Recent non-diverging losses, oldest first.
    pub window: VecDeque<f32>,
    /// Consecutive diverging steps so far.
    pub streak: u64,
}

/// The guard of one rank (every rank sees the same dp-averaged loss and global gradient norm, so
/// every rank decides alike; the trainer still agrees on the decision).
#[derive(Debug, Clone)]
pub struct DivergenceGuard {
    cfg: DivergenceSection,
    state: GuardState,
}

impl DivergenceGuard {
    pub fn new(cfg: DivergenceSection, state: GuardState) -> Self {
        Self { cfg, state }
    }

    pub fn state(&self) -> &GuardState {
        &self.state
    }

    /// The running median of the window (None while empty).
    pub fn median(&self) -> Option<f32> {
        let mut v: Vec<f32> = self.state.window.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f32::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) })
    }

    /// A loss the running median calls diverging (or a non-finite one).
    fn too_high(&self, loss: f32) -> Option<f32> {
        let factor = self.cfg.loss_factor?;
        let median = self.median()?;
        (loss > factor * median).then_some(median)
    }

    /// Records the loss and gradient norm of step `step`; `Some(why)` when the run must stop.
    pub fn observe(&mut self, step: u64, loss: f32, grad_norm: f32) -> Option<String> {
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Some(format!(
                "step {step}: the loss is {loss} and the gradient norm {grad_norm}: the run diverged. Lower \
                 optimizer.learning_rate or set optimizer.max_grad_norm, and resume from the last checkpoint with \
                 --resume RUN --allow-config-change"
            ));
        }
        match self.too_high(loss) {
            Some(median) => {
                self.state.streak += 1;
                if self.state.streak >= self.cfg.patience_steps {
                    return Some(format!(
                        "step {step}: the loss has stayed above {} × its running median {median:.4} for {} steps \
                         (now {loss:.4}): the run diverged. Lower optimizer.learning_rate, and resume from the last \
                         checkpoint with --resume RUN --allow-config-change (or tune training.divergence)",
                        self.cfg.loss_factor.unwrap_or_default(),
                        self.state.streak
                    ));
                }
            }
            None => {
                self.state.streak = 0;
                self.state.window.push_back(loss);
                while self.state.window.len() > self.cfg.window_steps {
                    self.state.window.pop_front();
                }
            }
        }
        None
    }

    /// Whether weights about to be saved are sound: the loss `probe` they give on the next batch
    /// is finite and not diverging. `Some(why)` refuses the checkpoint.
    pub fn check_probe(&self, step: u64, probe: f32) -> Option<String> {
        if !probe.is_finite() {
            return Some(format!(
                "step {step}: the weights about to be saved give a loss of {probe} on the next batch: the run \
                 diverged, nothing was saved. Lower optimizer.learning_rate and resume from the last checkpoint with \
                 --resume RUN --allow-config-change"
            ));
        }
        let median = self.too_high(probe)?;
        Some(format!(
            "step {step}: the weights about to be saved give a loss of {probe:.4} on the next batch, above {} × the \
             running median {median:.4}: the run diverged, nothing was saved. Lower optimizer.learning_rate and \
             resume from the last checkpoint with --resume RUN --allow-config-change",
            self.cfg.loss_factor.unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(patience: u64) -> DivergenceGuard {
        DivergenceGuard::new(
            DivergenceSection { loss_factor: Some(3.0), patience_steps: patience, window_steps: 5 },
            GuardState::default(),
        )
    }

    #[test]
    fn non_finite_trips_at_once() {
        assert!(guard(5).observe(1, f32::NAN, 1.0).is_some());
        assert!(guard(5).observe(1, 1.0, f32::INFINITY).is_some());
    }

    #[test]
    fn a_climbing_loss_trips_after_patience_and_a_spike_does_not() {
        let mut g = guard(3);
        for s in 0..5 {
            assert!(g.observe(s, 2.0 - 0.1 * s as f32, 1.0).is_none());
        }
        // One spike, then back to normal: no trip, streak reset.
        assert!(g.observe(5, 100.0, 1.0).is_none());
        assert!(g.observe(6, 1.5, 1.0).is_none());
        assert_eq!(g.state().streak, 0);
        // A climb: the bad losses don't raise the median; the third in a row trips.
        assert!(g.observe(7, 10.0, 1.0).is_none());
        assert!(g.observe(8, 100.0, 1.0).is_none());
        let why = g.observe(9, 1000.0, 1.0).expect("trips");
        assert!(why.contains("running median") && why.contains("3 steps"), "{why}");
    }

    #[test]
    fn the_probe_refuses_non_finite_and_diverged_weights() {
        let mut g = guard(3);
        assert!(g.check_probe(1, 1e9).is_none(), "no history: only finiteness");
        assert!(g.check_probe(1, f32::NAN).is_some());
        g.observe(1, 2.0, 1.0);
        assert!(g.check_probe(2, 2.5).is_none());
        assert!(g.check_probe(2, 7.0).is_some());
    }
}
