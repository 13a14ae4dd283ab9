//! Errors of the model layer; every message names the offending item and how to fix it.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("config: {0}")]
    Config(String),
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: String, detail: String },
    #[error("batch: {0}")]
    Batch(String),
    #[error("collective failed: {0}")]
    Comm(String),
    #[error(transparent)]
    Runtime(#[from] dm_runtime::RuntimeError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ModelError {
    let context = context.into();
    move |source| ModelError::Io { context, source }
}
