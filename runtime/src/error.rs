//! Errors raised by devices and ops.

use thiserror::Error;

/// Everything the runtime can refuse, each with the facts needed to fix it.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error(
        "out of device memory on {device}: allocating `{tensor}` ({requested} bytes) would use {would_use} bytes, over the budget of {budget} bytes (current {current} bytes); \
         lower the batch size, shard the model over more ranks (tp/dp, zero1) or raise the device memory budget"
    )]
    OutOfBudget { device: String, tensor: String, requested: u64, current: u64, would_use: u64, budget: u64 },
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("invalid argument to {op}: {detail}")]
    Invalid { op: &'static str, detail: String },
    #[error("{0}")]
    Device(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
