//! DalleBart, the encoder-decoder transformer dalle-mini trains, built on the runtime's op-level
//! backend interface: config ([`config`]), parameter table under dalle-mini's names ([`params`]),
//! safetensors checkpoints in both layouts ([`checkpoint`]), explicit forward and backward
//! ([`dallebart`]), and AdamW as optax computes it ([`optimizer`]).

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod dalle_mini;
pub mod dallebart;
pub mod error;
pub mod flax;
pub mod flops;
pub mod opt_state;
pub mod optimizer;
pub mod params;
pub mod parity;
pub mod perf_model;
pub mod plan;
pub mod precision;
pub mod vqgan;

pub use batch::Batch;
pub use config::DalleBartConfig;
pub use dallebart::{DalleBart, StepOutput};
pub use error::{ModelError, Result};
pub use optimizer::{AdamW, AdamWConfig};
pub use params::{ParamSpec, ParamTable};
