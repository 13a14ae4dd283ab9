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

impl From<dm_parallel::layers::LayerError> for ModelError {
    fn from(e: dm_parallel::layers::LayerError) -> Self {
        match e {
            dm_parallel::layers::LayerError::Runtime(r) => ModelError::Runtime(r),
            dm_parallel::layers::LayerError::Comm(c) => ModelError::Comm(c.to_string()),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ModelError {
    let context = context.into();
    move |source| ModelError::Io { context, source }
}
