//! Where training rows come from: an imported (memory-mapped) dataset folder, or dalle-mini's
//! encoded parquet files read straight (`data: {dataset: DIR_OF_PARQUET | GLOB | FILE}`),
//! streamed through [`dm_data::parquet_stream`] with the files sharded across dp ranks. Both
//! readers keep their position in a [`ReaderState`], saved in every checkpoint, so a resume is
//! exact either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use dm_data::parquet::{parquet_files, Columns, ParquetFile};
use dm_data::parquet_stream::ParquetStream;
use dm_data::{Batch, Dataset, ImportOptions, ReaderState, ShardedReader, TextTokenizer};

/// Rows the unigram baseline of a parquet dataset is counted on (the first ones in file order):
/// one streaming pass over a large dataset before training would cost more than it tells.
pub const PARQUET_BASELINE_ROWS: u64 = 100_000;

/// The training rows of a run.
pub enum TrainSource {
    /// A folder made by `dalle-mesh data import` (or the synthetic generator).
    Mapped(Arc<Dataset>),
    /// Parquet files read as they are.
    Parquet(ParquetSource),
}

/// Parquet files checked at open: columns present, row counts known.
pub struct ParquetSource {
    pub input: PathBuf,
    pub opts: ImportOptions,
    pub files: Vec<PathBuf>,
    pub rows: u64,
}

impl TrainSource {
    /// Opens `input`: parquet (file, folder of `*.parquet`, glob) with `opts`, else a dataset folder.
    pub fn open(input: &Path, opts: ImportOptions) -> Result<Self> {
        if !is_parquet(input) {
            return Ok(Self::Mapped(Arc::new(Dataset::open(input)?)));
        }
        let columns = Columns::of(&opts);
        let files = parquet_files(input)?;
        let mut rows = 0;
        for f in &files {
            rows += ParquetFile::open(f, &columns)?.rows();
        }
        tracing::info!(input = %input.display(), files = files.len(), rows, "training straight from parquet");
        Ok(Self::Parquet(ParquetSource { input: input.to_path_buf(), opts, files, rows }))
    }

    pub fn image_length(&self) -> usize {
        match self {
            Self::Mapped(d) => d.image_length(),
            Self::Parquet(p) => p.opts.image_length,
        }
    }

    pub fn image_vocab(&self) -> u32 {
        match self {
            Self::Mapped(d) => d.image_vocab(),
            Self::Parquet(p) => p.opts.image_vocab,
        }
    }

    /// The first row's caption (a default sample prompt).
    pub fn first_caption(&self) -> Result<String> {
        match self {
            Self::Mapped(d) => Ok(d.caption(0)?.to_string()),
            Self::Parquet(p) => {
                let mut caption = None;
                p.visit(1, &mut |_, c, _| caption = Some(c.to_string()))?;
                caption.with_context(|| format!("{} holds no rows", p.input.display()))
            }
        }
    }

    /// Counts of every image code (for the unigram baseline); a parquet source counts its first
    /// [`PARQUET_BASELINE_ROWS`] rows.
    pub fn code_counts(&self, classes: usize) -> Result<Vec<u64>> {
        let mut counts = vec![0u64; classes];
        let mut add = |c: u32| {
            if let Some(n) = counts.get_mut(c as usize) {
                *n += 1;
            }
        };
        match self {
            Self::Mapped(d) => {
                for i in 0..d.len() {
                    d.codes(i)?.iter().for_each(&mut add);
                }
            }
            Self::Parquet(p) => {
                if p.rows > PARQUET_BASELINE_ROWS {
                    tracing::info!(rows = PARQUET_BASELINE_ROWS, "unigram baseline counted on the first rows");
                }
                p.visit(PARQUET_BASELINE_ROWS, &mut |_, _, codes| codes.iter().copied().for_each(&mut add))?;
            }
        }
        Ok(counts)
    }

    /// Refuses a dp the source can't be sharded over (parquet: at least one file per dp rank).
    pub fn check_dp(&self, dp: usize) -> Result<()> {
        match self {
            Self::Parquet(p) if p.files.len() < dp => Err(crate::bad_input!(
                "data.dataset {}: {} parquet file(s) cannot be sharded over {dp} data-parallel ranks (mesh.dp; each \
                 rank reads whole files): split the dataset into at least {dp} files, lower mesh.dp, or import it \
                 with `dalle-mesh data import` and train on the imported folder",
                p.input.display(),
                p.files.len()
            )),
            _ => Ok(()),
        }
    }

    /// A reader at `state` (each rank has its own).
    pub fn reader(&self, tokenizer: &Arc<TextTokenizer>, state: ReaderState) -> Result<TrainReader> {
        Ok(match self {
            Self::Mapped(d) => TrainReader::Mapped(ShardedReader::with_state(d.clone(), tokenizer.clone(), state)?),
            Self::Parquet(p) => {
                TrainReader::Parquet(Box::new(ParquetStream::open(&p.input, tokenizer.clone(), p.opts.clone(), state)?))
            }
        })
    }
}

impl ParquetSource {
    /// Calls `f(row, caption, codes)` on the first `limit` rows in file order; a bad row is an
    /// error naming its file and row.
    fn visit(&self, limit: u64, f: &mut dyn FnMut(u64, &str, &[u32])) -> Result<()> {
        let columns = Columns::of(&self.opts);
        let mut seen = 0u64;
        for path in &self.files {
            if seen >= limit {
                break;
            }
            let file = ParquetFile::open(path, &columns)?;
            file.visit_rows(0, &self.opts, &mut |i, row| match row {
                Ok((caption, codes)) => {
                    f(seen, &caption, &codes);
                    seen += 1;
                    Ok(seen < limit)
                }
                Err(reason) => Err(dm_data::DataError::Corrupt {
                    path: path.clone(),
                    msg: format!(
                        "row {}: {reason}; training streams rows as they are: fix the file, or import it with \
                         `dalle-mesh data import --skip-bad` and train on the imported folder",
                        i + 1
                    ),
                }),
            })?;
        }
        Ok(())
    }
}

/// A rank's reader over a [`TrainSource`].
pub enum TrainReader {
    Mapped(ShardedReader),
    Parquet(Box<ParquetStream>),
}

impl TrainReader {
    /// The next global batch's share for dp rank `rank` of `n_ranks`.
    pub fn next_batch(&mut self, global_batch: usize, rank: usize, n_ranks: usize) -> Result<Batch> {
        Ok(match self {
            Self::Mapped(r) => r.next_batch(global_batch, rank, n_ranks)?,
            Self::Parquet(r) => r.next_batch(global_batch, rank, n_ranks)?,
        })
    }

    /// The position to save with a checkpoint.
    pub fn state(&self) -> ReaderState {
        match self {
            Self::Mapped(r) => r.state(),
            Self::Parquet(r) => r.state(),
        }
    }
}

/// True when `input` names parquet files (a `.parquet` file or glob, or a folder of them).
pub fn is_parquet(input: &Path) -> bool {
    dm_data::parquet::is_parquet_input(input)
}
