//! Deterministic, resumable, data-parallel batching.
//!
//! Each epoch visits the rows in a permutation drawn from ChaCha8 seeded by the reader's seed,
//! with the epoch as the stream number, so any epoch's order can be recomputed on its own. A
//! global batch is the next `global_batch` entries of that order; data-parallel rank `r` of
//! `n` takes entries `r, r + n, r + 2n, …` of it, so the ranks' batches together are exactly
//! the one-rank batch. An epoch's last partial global batch is dropped (as dalle-mini does),
//! and the next epoch starts with a fresh permutation. The read position is a [`ReaderState`]
//! (serde), saved with a checkpoint and restored with [`ShardedReader::with_state`].

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::format::Dataset;
use crate::text::TextTokenizer;

/// Where a [`ShardedReader`] is: the permutation seed, the epoch, and how many entries of the
/// epoch's order have been consumed (by all ranks together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReaderState {
    pub seed: u64,
    pub epoch: u64,
    pub offset: u64,
}

impl ReaderState {
    /// The start of epoch 0.
    pub fn new(seed: u64) -> Self {
        ReaderState { seed, epoch: 0, offset: 0 }
    }
}

/// A batch of training rows, each array row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[batch, text_len]` caption token ids (`<s> … </s> <pad>…`).
    pub input_ids: Vec<i32>,
    /// `[batch, text_len]` 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<i32>,
    /// `[batch, image_len]` image codes to predict.
    pub labels: Vec<i32>,
    /// `[batch, image_len]` decoder inputs: `image_vocab` (the decoder start token) followed by
    /// `labels[..image_len - 1]`.
    pub decoder_input_ids: Vec<i32>,
    /// Rows in this batch (the rank's local batch).
    pub batch: usize,
    pub text_len: usize,
    pub image_len: usize,
    /// Dataset row index of each batch row.
    pub rows: Vec<u64>,
    /// Epoch the rows were drawn from (0 for batches made by [`make_batch`] directly).
    pub epoch: u64,
}

/// The visiting order of `rows` rows in `epoch`: a ChaCha8 (seed, stream = epoch) shuffle.
pub fn permutation(rows: usize, seed: u64, epoch: u64) -> Result<Vec<u32>> {
    if rows > u32::MAX as usize {
        return Err(DataError::InvalidArgument(format!("{rows} rows exceed the reader's 2^32 limit")));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<u32> = (0..rows as u32).collect();
    order.shuffle(&mut rng);
    Ok(order)
}

/// Assembles a [`Batch`] row by row: captions tokenised, codes as labels, decoder inputs shifted
/// behind the start token (`image_vocab`). Both readers build their batches with it.
pub(crate) struct BatchBuilder<'t> {
    tokenizer: &'t TextTokenizer,
    image_vocab: u32,
    batch: Batch,
}

impl<'t> BatchBuilder<'t> {
    pub(crate) fn new(tokenizer: &'t TextTokenizer, image_length: usize, image_vocab: u32, rows: usize) -> Self {
        let t = tokenizer.max_text_length();
        let batch = Batch {
            input_ids: Vec::with_capacity(rows * t),
            attention_mask: Vec::with_capacity(rows * t),
            labels: Vec::with_capacity(rows * image_length),
            decoder_input_ids: Vec::with_capacity(rows * image_length),
            batch: 0,
            text_len: t,
            image_len: image_length,
            rows: Vec::with_capacity(rows),
            epoch: 0,
        };
        Self { tokenizer, image_vocab, batch }
    }

    /// Appends row `row`; a code outside `0..image_vocab` is handed to `out_of_range` for the
    /// error (the caller knows the file).
    pub(crate) fn push(
        &mut self,
        row: u64,
        caption: &str,
        codes: impl IntoIterator<Item = u32>,
        out_of_range: impl FnOnce(u32) -> DataError,
    ) -> Result<()> {
        let b = &mut self.batch;
        self.tokenizer.encode_into(caption, &mut b.input_ids, &mut b.attention_mask)?;
        let start = b.labels.len();
        for code in codes {
            if code >= self.image_vocab {
                return Err(out_of_range(code));
            }
            b.labels.push(code as i32);
        }
        b.decoder_input_ids.push(self.image_vocab as i32);
        b.decoder_input_ids.extend_from_slice(&b.labels[start..start + b.image_len - 1]);
        b.rows.push(row);
        b.batch += 1;
        Ok(())
    }

    pub(crate) fn finish(self) -> Batch {
        self.batch
    }
}

/// Builds a batch from the given dataset rows, in order (e.g. for evaluation in file order).
pub fn make_batch(dataset: &Dataset, tokenizer: &TextTokenizer, rows: &[u64]) -> Result<Batch> {
    let vocab = dataset.image_vocab();
    let mut builder = BatchBuilder::new(tokenizer, dataset.image_length(), vocab, rows.len());
    for &i in rows {
        let row = dataset.row(i as usize)?;
        builder.push(i, row.caption, row.codes.iter(), |code| DataError::Corrupt {
            path: dataset.dir().join(crate::format::CODES_FILE),
            msg: format!("row {i} has code {code} ≥ image_vocab {vocab}"),
        })?;
    }
    Ok(builder.finish())
}

/// Reads shuffled, sharded batches from a dataset (see the module docs).
pub struct ShardedReader {
    dataset: Arc<Dataset>,
    tokenizer: Arc<TextTokenizer>,
    state: ReaderState,
    order: Vec<u32>,
    order_epoch: Option<u64>,
}

impl ShardedReader {
    /// A reader at the start of epoch 0.
    pub fn new(dataset: Arc<Dataset>, tokenizer: Arc<TextTokenizer>, seed: u64) -> Result<Self> {
        Self::with_state(dataset, tokenizer, ReaderState::new(seed))
    }

    /// A reader resuming at `state` (as returned by [`state`](Self::state)).
    pub fn with_state(dataset: Arc<Dataset>, tokenizer: Arc<TextTokenizer>, state: ReaderState) -> Result<Self> {
        if dataset.is_empty() {
            return Err(DataError::InvalidArgument(format!("{} has no rows to read", dataset.dir().display())));
        }
        if state.offset > dataset.len() as u64 {
            return Err(DataError::InvalidArgument(format!(
                "reader state offset {} is past the {} rows of {}: was it saved for another dataset?",
                state.offset,
                dataset.len(),
                dataset.dir().display()
            )));
        }
        Ok(ShardedReader { dataset, tokenizer, state, order: Vec::new(), order_epoch: None })
    }

    /// The current position; save it with a checkpoint.
    pub fn state(&self) -> ReaderState {
        self.state
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// Full global batches per epoch.
    pub fn steps_per_epoch(&self, global_batch: usize) -> usize {
        self.dataset.len().checked_div(global_batch).unwrap_or(0)
    }

    /// The next global batch's share for `rank` of `n_ranks` (local batch
    /// `global_batch / n_ranks`), advancing the position by `global_batch`. Every rank calls
    /// this with the same `global_batch` and `n_ranks` on its own reader.
    pub fn next_batch(&mut self, global_batch: usize, rank: usize, n_ranks: usize) -> Result<Batch> {
        if n_ranks == 0 || rank >= n_ranks {
            return Err(DataError::InvalidArgument(format!("rank {rank} of {n_ranks} ranks")));
        }
        if global_batch == 0 || !global_batch.is_multiple_of(n_ranks) {
            return Err(DataError::InvalidArgument(format!(
                "global batch {global_batch} must be a positive multiple of the {n_ranks} ranks"
            )));
        }
        let rows = self.dataset.len();
        if global_batch > rows {
            return Err(DataError::InvalidArgument(format!(
                "global batch {global_batch} is larger than the {rows} rows of {}",
                self.dataset.dir().display()
            )));
        }
        let mut next = self.state;
        if next.offset as usize + global_batch > rows {
            next.epoch += 1;
            next.offset = 0;
        }
        if self.order_epoch != Some(next.epoch) {
            self.order = permutation(rows, next.seed, next.epoch)?;
            self.order_epoch = Some(next.epoch);
        }
        let start = next.offset as usize;
        let picked: Vec<u64> =
            self.order[start..start + global_batch].iter().skip(rank).step_by(n_ranks).map(|&i| i as u64).collect();
        let mut batch = make_batch(&self.dataset, &self.tokenizer, &picked)?;
        batch.epoch = next.epoch;
        next.offset += global_batch as u64;
        self.state = next;
        Ok(batch)
    }
}
