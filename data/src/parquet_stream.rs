//! Training straight from parquet files, streaming: each epoch the files are put in a seeded
//! order (ChaCha8, the epoch as stream), and data-parallel rank `r` of `n` reads files
//! `r, r + n, …` of that order — dalle-mini shards its streaming datasets by host the same way
//! — in row order, one local batch (`global_batch / n` rows) per step. An epoch ends when the
//! smallest shard cannot give another full local batch (so every rank takes the same number of
//! steps). The position is a [`ReaderState`]: `offset` counts the rows all ranks consumed in the
//! epoch (each rank's own position is `offset / n`), so a checkpoint resumes exactly; only one
//! decoded row group per rank is held in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::import::ImportOptions;
use crate::parquet::{parquet_files, Columns, ParquetFile};
use crate::reader::{permutation, Batch, BatchBuilder, ReaderState};
use crate::text::TextTokenizer;

/// The decoded rows of one row group, kept while a rank reads through it.
struct CachedGroup {
    file: usize,
    group: usize,
    rows: Vec<(String, Vec<u32>)>,
}

/// Reads batches from parquet files (see the module docs).
pub struct ParquetStream {
    files: Vec<ParquetFile>,
    rows_per_file: Vec<u64>,
    opts: ImportOptions,
    tokenizer: Arc<TextTokenizer>,
    state: ReaderState,
    cache: Option<CachedGroup>,
}

impl ParquetStream {
    /// Opens every parquet file `input` names (file, folder or glob), checking their columns;
    /// codes must have `opts.image_length` entries in `0..opts.image_vocab`.
    pub fn open(input: &Path, tokenizer: Arc<TextTokenizer>, opts: ImportOptions, state: ReaderState) -> Result<Self> {
        let columns = Columns::of(&opts);
        let files: Vec<ParquetFile> =
            parquet_files(input)?.iter().map(|f| ParquetFile::open(f, &columns)).collect::<Result<_>>()?;
        let rows_per_file = files.iter().map(ParquetFile::rows).collect();
        Ok(Self { files, rows_per_file, opts, tokenizer, state, cache: None })
    }

    pub fn state(&self) -> ReaderState {
        self.state
    }

    pub fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path().to_path_buf()).collect()
    }

    /// Total rows of every file.
    pub fn rows(&self) -> u64 {
        self.rows_per_file.iter().sum()
    }

    /// The file indices rank `rank` of `n_ranks` reads in `epoch`, in reading order.
    pub fn shard(&self, epoch: u64, rank: usize, n_ranks: usize) -> Result<Vec<usize>> {
        let order = permutation(self.files.len(), self.state.seed, epoch)?;
        Ok(order.iter().skip(rank).step_by(n_ranks).map(|&i| i as usize).collect())
    }

    /// Local batches per epoch: the smallest shard's full local batches.
    fn steps_per_epoch(&self, epoch: u64, local: usize, n_ranks: usize) -> Result<u64> {
        let mut steps = u64::MAX;
        for r in 0..n_ranks {
            let rows: u64 = self.shard(epoch, r, n_ranks)?.iter().map(|&f| self.rows_per_file[f]).sum();
            steps = steps.min(rows / local as u64);
        }
        Ok(steps)
    }

    /// The next global batch's share for `rank` of `n_ranks`, advancing the position by
    /// `global_batch` rows. Every rank calls this with the same arguments on its own stream.
    pub fn next_batch(&mut self, global_batch: usize, rank: usize, n_ranks: usize) -> Result<Batch> {
        if n_ranks == 0 || rank >= n_ranks || global_batch == 0 || !global_batch.is_multiple_of(n_ranks) {
            return Err(DataError::InvalidArgument(format!(
                "global batch {global_batch} must be a positive multiple of the {n_ranks} ranks (rank {rank})"
            )));
        }
        if self.files.len() < n_ranks {
            return Err(DataError::InvalidArgument(format!(
                "{} parquet file(s) cannot be sharded over {n_ranks} data-parallel ranks: split the dataset into at \
                 least {n_ranks} files, or import it with `dalle-mesh data import` and train on the imported folder",
                self.files.len()
            )));
        }
        let local = global_batch / n_ranks;
        let mut next = self.state;
        let mut steps = self.steps_per_epoch(next.epoch, local, n_ranks)?;
        if steps == 0 {
            return Err(DataError::InvalidArgument(format!(
                "a data-parallel shard of the parquet files has fewer than {local} rows (the local batch)"
            )));
        }
        if next.offset / global_batch as u64 >= steps {
            next.epoch += 1;
            next.offset = 0;
            steps = self.steps_per_epoch(next.epoch, local, n_ranks)?;
            if steps == 0 {
                return Err(DataError::InvalidArgument(format!("a shard has fewer than {local} rows")));
            }
        }
        let shard = self.shard(next.epoch, rank, n_ranks)?;
        let start = next.offset / n_ranks as u64;
        let rows = self.read_shard_rows(&shard, start, local)?;
        let mut batch = self.make_batch(&rows)?;
        batch.epoch = next.epoch;
        next.offset += global_batch as u64;
        self.state = next;
        Ok(batch)
    }

    /// `count` rows of the shard from its row `start`, with their global row ids.
    fn read_shard_rows(&mut self, shard: &[usize], start: u64, count: usize) -> Result<Vec<(u64, String, Vec<u32>)>> {
        let mut out = Vec::with_capacity(count);
        let mut skip = start;
        for &f in shard {
            let file_rows = self.rows_per_file[f];
            if skip >= file_rows {
                skip -= file_rows;
                continue;
            }
            let file_base: u64 = self.rows_per_file[..f].iter().sum();
            let mut first = 0u64;
            for (g, n) in self.files[f].row_groups().into_iter().enumerate() {
                if first + n <= skip {
                    first += n;
                    continue;
                }
                self.load_group(f, g, first)?;
                let cached = self.cache.as_ref().expect("just loaded");
                let from = (skip.max(first) - first) as usize;
                for (i, (caption, codes)) in cached.rows.iter().enumerate().skip(from) {
                    out.push((file_base + first + i as u64, caption.clone(), codes.clone()));
                    if out.len() == count {
                        return Ok(out);
                    }
                }
                first += n;
            }
            skip = 0;
        }
        Err(DataError::InvalidArgument(format!("the shard ran out of rows after {} of {count}", out.len())))
    }

    /// Decodes row group `g` of file `f` into the cache (unless it is there already).
    fn load_group(&mut self, f: usize, g: usize, first: u64) -> Result<()> {
        if self.cache.as_ref().is_some_and(|c| c.file == f && c.group == g) {
            return Ok(());
        }
        let file = &self.files[f];
        let mut rows = Vec::new();
        file.visit_group(g, first, first, &self.opts, &mut |i, row| match row {
            Ok(r) => {
                rows.push(r);
                Ok(true)
            }
            Err(reason) => Err(DataError::Corrupt {
                path: file.path().to_path_buf(),
                msg: format!(
                    "row {}: {reason}; training streams rows as they are: fix the file, or import it with \
                     `dalle-mesh data import --skip-bad` and train on the imported folder",
                    i + 1
                ),
            }),
        })?;
        self.cache = Some(CachedGroup { file: f, group: g, rows });
        Ok(())
    }

    fn make_batch(&self, rows: &[(u64, String, Vec<u32>)]) -> Result<Batch> {
        let (length, vocab) = (self.opts.image_length, self.opts.image_vocab);
        let mut builder = BatchBuilder::new(&self.tokenizer, length, vocab, rows.len());
        for (row, caption, codes) in rows {
            // Rows were checked when their row group was decoded; this only guards the invariant.
            builder.push(*row, caption, codes.iter().copied(), |code| {
                DataError::InvalidArgument(format!("row {row} has code {code} ≥ image_vocab {vocab}"))
            })?;
        }
        Ok(builder.finish())
    }
}
