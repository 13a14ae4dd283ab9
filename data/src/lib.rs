//! dm-data: the data side of training DalleBart.
//!
//! * [`format`]: the encoded dataset on disk (memory-mapped reading, atomic writing).
//! * [`import`]: dalle-mini's encoded JSONL → dataset, with bad-row reporting.
//! * [`hf_tokenizer`]: tokenizer folders as dalle-mini / transformers save them.
//! * [`parquet`]: dalle-mini's encoded parquet files: import, row streaming, `data info`.
//! * [`parquet_stream`]: training batches straight from parquet files, dp-sharded by file, resumable.
//! * [`text`]: dalle-mini's caption normaliser and a BART-convention tokenizer (+ BPE training).
//! * [`synthetic`]: a built-in, learnable, procedurally generated dataset with a tiny codebook.
//! * [`image`]: RGB images and PNG grids for looking at codes.
//! * [`reader`]: deterministic, resumable, data-parallel-sharded batching.

pub mod error;
pub mod format;
pub mod hf_tokenizer;
pub mod image;
pub mod import;
pub mod parquet;
pub mod parquet_stream;
pub mod reader;
pub mod synthetic;
pub mod text;

pub use error::{DataError, Result};
pub use format::{CodeDtype, CodesView, Dataset, DatasetWriter, Manifest, Row, VerifyReport};
pub use image::{save_png_grid, RgbImage};
pub use import::{import, import_jsonl, BadRow, BadRowReason, ImportOptions, ImportReport};
pub use reader::{make_batch, Batch, ReaderState, ShardedReader};
pub use synthetic::{decode_codes, dominant_colour, expected_colour_regions, generate_synthetic, Scene, SyntheticSpec};
pub use text::{normalize_text, train_bpe, EncodedText, TextTokenizer};
