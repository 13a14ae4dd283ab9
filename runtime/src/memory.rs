//! Per-device accounting allocator: every buffer a backend hands out is registered here, so the
//! current and peak bytes of a device are exact numbers, and an optional budget turns an
//! over-budget allocation into an error that names the tensor.

use crate::error::{Result, RuntimeError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct Counters {
    device: String,
    current: AtomicU64,
    peak: AtomicU64,
    budget: AtomicU64, // 0 = unlimited
}

/// Shared handle to one device's memory counters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryTracker(Arc<Counters>);

/// A snapshot of a device's memory use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    pub current_bytes: u64,
    pub peak_bytes: u64,
    pub budget_bytes: Option<u64>,
}

impl MemoryTracker {
    pub fn new(device: impl Into<String>, budget_bytes: Option<u64>) -> Self {
        Self(Arc::new(Counters {
            device: device.into(),
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            budget: AtomicU64::new(budget_bytes.unwrap_or(0)),
        }))
    }

    /// Registers `bytes` for tensor `name`; fails (registering nothing) if that would exceed the budget.
    pub fn reserve(&self, name: &str, bytes: u64) -> Result<Reservation> {
        let c = &self.0;
        let budget = c.budget.load(Ordering::Relaxed);
        let prev = c.current.fetch_add(bytes, Ordering::SeqCst);
        let now = prev + bytes;
        if budget != 0 && now > budget {
            c.current.fetch_sub(bytes, Ordering::SeqCst);
            return Err(RuntimeError::OutOfBudget {
                device: c.device.clone(),
                tensor: name.to_string(),
                requested: bytes,
                current: prev,
                would_use: now,
                budget,
            });
        }
        c.peak.fetch_max(now, Ordering::SeqCst);
        Ok(Reservation { tracker: self.clone(), bytes })
    }

    pub fn report(&self) -> MemoryReport {
        let b = self.0.budget.load(Ordering::Relaxed);
        MemoryReport {
            current_bytes: self.0.current.load(Ordering::SeqCst),
            peak_bytes: self.0.peak.load(Ordering::SeqCst),
            budget_bytes: (b != 0).then_some(b),
        }
    }

    /// Sets (or clears, with `None`) the budget; already-held memory is not checked.
    pub fn set_budget(&self, budget_bytes: Option<u64>) {
        self.0.budget.store(budget_bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Restarts peak tracking from the current use (e.g. after loading weights).
    pub fn reset_peak(&self) {
        let cur = self.0.current.load(Ordering::SeqCst);
        self.0.peak.store(cur, Ordering::SeqCst);
    }

    pub fn device(&self) -> &str {
        &self.0.device
    }
}

/// Bytes held by one live buffer; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    tracker: MemoryTracker,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.tracker.0.current.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_current_and_peak_and_refuses_over_budget() {
        let t = MemoryTracker::new("cpu:0", Some(1000));
        let a = t.reserve("a", 600).unwrap();
        {
            let _b = t.reserve("b", 300).unwrap();
            assert_eq!(t.report().current_bytes, 900);
        }
        assert_eq!(t.report().current_bytes, 600);
        assert_eq!(t.report().peak_bytes, 900);
        let err = t.reserve("decoder.logits", 500).unwrap_err().to_string();
        assert!(err.contains("decoder.logits") && err.contains("budget"), "{err}");
        assert_eq!(t.report().current_bytes, 600, "a refused allocation registers nothing");
        drop(a);
        assert_eq!(t.report().current_bytes, 0);
    }
}
