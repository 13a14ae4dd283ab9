//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while reading, writing, importing or batching data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `manifest.json` is missing, unreadable, or describes something this crate can't read.
    #[error("{path}: invalid manifest: {msg}")]
    Manifest { path: PathBuf, msg: String },

    /// A data file listed in the manifest is absent.
    #[error("{path}: missing (the manifest lists it); re-import the dataset")]
    MissingFile { path: PathBuf },

    /// A data file's size disagrees with the manifest (usually a truncated copy).
    #[error(
        "{path}: expected {expected} bytes (per manifest.json) but found {actual} bytes; \
         the file is truncated or corrupt, re-import the dataset"
    )]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },

    /// A data file's checksum disagrees with the manifest.
    #[error(
        "{path}: checksum mismatch (manifest crc32 {expected:08x}, file crc32 {actual:08x}); \
         the file is corrupt, re-import the dataset"
    )]
    ChecksumMismatch { path: PathBuf, expected: u32, actual: u32 },

    /// Internally inconsistent content (e.g. caption offsets out of bounds, invalid UTF-8).
    #[error("{path}: corrupt dataset: {msg}; re-import the dataset")]
    Corrupt { path: PathBuf, msg: String },

    /// Input rows that failed validation during an import (without `skip_bad`).
    #[error("{}", bad_rows_message(.path, *.count, .shown))]
    BadRows {
        path: PathBuf,
        /// Total number of bad rows.
        count: usize,
        /// The first few bad rows (at most [`crate::import::MAX_BAD_ROWS_KEPT`]).
        shown: Vec<crate::import::BadRow>,
    },

    /// An input format this crate does not read (yet).
    #[error("{0}")]
    Unsupported(String),

    /// A caller passed arguments that can't work (zero sizes, mismatched lengths, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A `tokenizers` error (loading, training, encoding or saving).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Writing or encoding a PNG failed.
    #[error("{path}: png: {msg}")]
    Png { path: PathBuf, msg: String },
}

/// How many bad rows an error message lists before summarising the rest.
pub const BAD_ROWS_IN_MESSAGE: usize = 10;

struct BadRowsDisplay<'a> {
    path: &'a PathBuf,
    count: usize,
    shown: &'a [crate::import::BadRow],
}

impl fmt::Display for BadRowsDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} bad row{}; nothing was written (pass skip_bad to skip them):",
            self.path.display(),
            self.count,
            if self.count == 1 { "" } else { "s" }
        )?;
        for row in self.shown.iter().take(BAD_ROWS_IN_MESSAGE) {
            write!(f, "\n  line {}: {}", row.line, row.reason)?;
        }
        let listed = self.shown.len().min(BAD_ROWS_IN_MESSAGE);
        if self.count > listed {
            write!(f, "\n  ... and {} more", self.count - listed)?;
        }
        Ok(())
    }
}

fn bad_rows_message(path: &PathBuf, count: usize, shown: &[crate::import::BadRow]) -> String {
    BadRowsDisplay { path, count, shown }.to_string()
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
