//! The VQGAN that turns DalleBart's image codes into pixels and pixels into codes, as vqgan-jax
//! defines it (`VQModel`, the model of dalle-mini's `dalle-mini/vqgan_imagenet_f16_16384`):
//! [`config`] (its `config.json`), [`arch`] (the stages of encoder and decoder, which give the
//! parameter names, shapes and FLOPs), [`weights`] (loading, random init, saving) and
//! [`forward`] (the CPU forward pass through the runtime's image ops, and the quantizer).

pub mod arch;
pub mod config;
pub mod forward;
pub mod weights;

pub use config::VqganConfig;
pub use forward::{Activation, Encoded, Vqgan};
pub use weights::VqganWeights;
