//! Streaming training batches from parquet: the data-parallel ranks read disjoint files, an
//! epoch covers each shard's full local batches, and a saved position resumes exactly.

use dm_data::parquet_stream::ParquetStream;
use dm_data::{ImportOptions, ReaderState, TextTokenizer};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop/parquet")
}

fn tokenizer() -> Arc<TextTokenizer> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop/dallebart-hf");
    Arc::new(dm_data::hf_tokenizer::text_tokenizer(&dir, 16, false).unwrap())
}

fn stream(state: ReaderState) -> ParquetStream {
    ParquetStream::open(&fixture(), tokenizer(), ImportOptions::new(256, 16384), state).unwrap()
}

#[test]
fn ranks_read_disjoint_files_and_an_epoch_is_the_smallest_shards_batches() {
    // 40 + 25 rows; dp 2, local batch 4: the 25-row shard gives 6 steps, so an epoch is 6 steps.
    let mut ranks = [stream(ReaderState::new(3)), stream(ReaderState::new(3))];
    let mut seen: [HashSet<u64>; 2] = [HashSet::new(), HashSet::new()];
    for step in 0..6 {
        for (r, s) in ranks.iter_mut().enumerate() {
            let b = s.next_batch(8, r, 2).unwrap();
            assert_eq!((b.batch, b.epoch, b.labels.len()), (4, 0, 4 * 256), "step {step}");
            seen[r].extend(b.rows.iter().copied());
        }
    }
    assert_eq!(seen[0].len() + seen[1].len(), 48);
    // Each rank's rows lie in one file: rows 0..40 are 000.parquet, 40..65 are 001.parquet.
    let file_of = |set: &HashSet<u64>| set.iter().map(|&r| r >= 40).collect::<HashSet<bool>>();
    assert_eq!(file_of(&seen[0]).len(), 1);
    assert_eq!(file_of(&seen[1]).len(), 1);
    assert_ne!(file_of(&seen[0]), file_of(&seen[1]));
    // Step 7 starts epoch 1.
    assert_eq!(ranks[0].next_batch(8, 0, 2).unwrap().epoch, 1);
}

#[test]
fn a_saved_position_resumes_exactly() {
    let mut a = stream(ReaderState::new(9));
    for _ in 0..11 {
        a.next_batch(8, 0, 1).unwrap();
    }
    let mut b = stream(a.state());
    for _ in 0..12 {
        assert_eq!(a.next_batch(8, 0, 1).unwrap(), b.next_batch(8, 0, 1).unwrap());
    }
}

#[test]
fn batches_hold_the_files_rows() {
    let mut s = stream(ReaderState::new(0));
    let b = s.next_batch(2, 0, 1).unwrap();
    // Whichever file comes first, its row 0 starts with codes 0, 16383, 1.
    assert_eq!(&b.labels[..3], &[0, 16383, 1]);
    assert_eq!(b.decoder_input_ids[0], 16384);
    assert_eq!(&b.decoder_input_ids[1..3], &[0, 16383]);
    assert_eq!(b.input_ids[0], 0);
}

#[test]
fn more_ranks_than_files_is_refused_with_advice() {
    let mut s = stream(ReaderState::new(0));
    let err = s.next_batch(3, 0, 3).unwrap_err().to_string();
    assert!(err.contains("3 data-parallel ranks") && err.contains("data import"), "{err}");
}
