//! Deterministic, resumable, sharded batching.

use std::collections::BTreeSet;
use std::sync::Arc;

use dm_data::reader::permutation;
use dm_data::synthetic::{generate_synthetic, SyntheticSpec};
use dm_data::{make_batch, Batch, Dataset, ReaderState, ShardedReader, TextTokenizer};

struct Fixture {
    _tmp: tempfile::TempDir,
    ds: Arc<Dataset>,
    tok: Arc<TextTokenizer>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec { train_rows: 103, eval_rows: 4, image_length: 16, seed: 5 };
    generate_synthetic(&spec, tmp.path()).unwrap();
    let ds = Arc::new(Dataset::open(tmp.path().join("train")).unwrap());
    let tok = TextTokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap().with_max_text_length(24).unwrap();
    Fixture { _tmp: tmp, ds, tok: Arc::new(tok) }
}

/// Interleaves the ranks' batches back into global order (rank r held entries r, r+n, ...).
fn interleave(parts: &[Batch]) -> Batch {
    let n = parts.len();
    let (t, l) = (parts[0].text_len, parts[0].image_len);
    let b: usize = parts.iter().map(|p| p.batch).sum();
    let mut out = Batch {
        input_ids: vec![],
        attention_mask: vec![],
        labels: vec![],
        decoder_input_ids: vec![],
        batch: b,
        text_len: t,
        image_len: l,
        rows: vec![],
        epoch: parts[0].epoch,
    };
    for k in 0..b {
        let (p, j) = (&parts[k % n], k / n);
        out.input_ids.extend_from_slice(&p.input_ids[j * t..(j + 1) * t]);
        out.attention_mask.extend_from_slice(&p.attention_mask[j * t..(j + 1) * t]);
        out.labels.extend_from_slice(&p.labels[j * l..(j + 1) * l]);
        out.decoder_input_ids.extend_from_slice(&p.decoder_input_ids[j * l..(j + 1) * l]);
        out.rows.push(p.rows[j]);
    }
    out
}

#[test]
fn batch_contents_follow_the_conventions() {
    let f = fixture();
    let mut r = ShardedReader::new(f.ds.clone(), f.tok.clone(), 1).unwrap();
    let b = r.next_batch(8, 0, 1).unwrap();
    assert_eq!((b.batch, b.text_len, b.image_len), (8, 24, 16));
    assert_eq!(b.input_ids.len(), 8 * 24);
    assert_eq!(b.attention_mask.len(), 8 * 24);
    assert_eq!(b.labels.len(), 8 * 16);
    assert_eq!(b.decoder_input_ids.len(), 8 * 16);
    let vocab = f.ds.image_vocab() as i32;
    for (k, &row) in b.rows.iter().enumerate() {
        let data = f.ds.row(row as usize).unwrap();
        let enc = f.tok.encode(data.caption).unwrap();
        assert_eq!(&b.input_ids[k * 24..(k + 1) * 24], &enc.input_ids[..]);
        assert_eq!(&b.attention_mask[k * 24..(k + 1) * 24], &enc.attention_mask[..]);
        let labels: Vec<i32> = data.codes.iter().map(|c| c as i32).collect();
        assert_eq!(&b.labels[k * 16..(k + 1) * 16], &labels[..]);
        let dec = &b.decoder_input_ids[k * 16..(k + 1) * 16];
        assert_eq!(dec[0], vocab);
        assert_eq!(&dec[1..], &labels[..15]);
    }
    // make_batch in file order gives the same rows.
    let again = make_batch(&f.ds, &f.tok, &b.rows).unwrap();
    assert_eq!(again.labels, b.labels);
    assert_eq!(again.input_ids, b.input_ids);
}

#[test]
fn epochs_are_permutations_and_drop_the_remainder() {
    let f = fixture();
    let mut r = ShardedReader::new(f.ds.clone(), f.tok.clone(), 9).unwrap();
    assert_eq!(r.steps_per_epoch(8), 12); // 103 rows: 96 used, 7 dropped per epoch
    let mut epoch_rows = [BTreeSet::new(), BTreeSet::new()];
    let mut orders: [Vec<u64>; 2] = [vec![], vec![]];
    for step in 0..24 {
        let b = r.next_batch(8, 0, 1).unwrap();
        assert_eq!(b.epoch as usize, step / 12);
        epoch_rows[step / 12].extend(b.rows.iter().copied());
        orders[step / 12].extend(b.rows.iter().copied());
    }
    assert_eq!(epoch_rows[0].len(), 96);
    assert_eq!(epoch_rows[1].len(), 96);
    assert_ne!(orders[0], orders[1]);
    assert_eq!(r.state(), ReaderState { seed: 9, epoch: 1, offset: 96 });
    // Rows are the epoch's permutation, in order.
    let perm = permutation(103, 9, 1).unwrap();
    let expected: Vec<u64> = perm[..96].iter().map(|&i| i as u64).collect();
    assert_eq!(orders[1], expected);
    // Different seeds give different orders.
    assert_ne!(permutation(103, 9, 0).unwrap(), permutation(103, 10, 0).unwrap());
}

#[test]
fn resuming_from_a_saved_state_repeats_exactly() {
    let f = fixture();
    let mut a = ShardedReader::new(f.ds.clone(), f.tok.clone(), 42).unwrap();
    for _ in 0..9 {
        a.next_batch(8, 1, 2).unwrap();
    }
    let saved = serde_json::to_string(&a.state()).unwrap();
    // Continue past the epoch boundary (12 steps per epoch).
    let rest_a: Vec<Batch> = (0..10).map(|_| a.next_batch(8, 1, 2).unwrap()).collect();
    let state: ReaderState = serde_json::from_str(&saved).unwrap();
    assert_eq!(state, ReaderState { seed: 42, epoch: 0, offset: 72 });
    let mut b = ShardedReader::with_state(f.ds.clone(), f.tok.clone(), state).unwrap();
    let rest_b: Vec<Batch> = (0..10).map(|_| b.next_batch(8, 1, 2).unwrap()).collect();
    assert_eq!(rest_a, rest_b);
    assert_eq!(rest_a.last().unwrap().epoch, 1);
    assert_eq!(a.state(), b.state());
}

#[test]
fn ranks_together_equal_the_single_rank_batch() {
    let f = fixture();
    let global = 12;
    for n in [2usize, 3, 4, 6] {
        let mut ranks: Vec<ShardedReader> =
            (0..n).map(|_| ShardedReader::new(f.ds.clone(), f.tok.clone(), 3).unwrap()).collect();
        let mut one = ShardedReader::new(f.ds.clone(), f.tok.clone(), 3).unwrap();
        for _ in 0..12 {
            let parts: Vec<Batch> =
                ranks.iter_mut().enumerate().map(|(r, reader)| reader.next_batch(global, r, n).unwrap()).collect();
            assert!(parts.iter().all(|p| p.batch == global / n));
            let whole = one.next_batch(global, 0, 1).unwrap();
            assert_eq!(interleave(&parts), whole, "n = {n}");
        }
        assert!(ranks.iter().all(|r| r.state() == one.state()));
    }
}

#[test]
fn bad_arguments_are_errors() {
    let f = fixture();
    let mut r = ShardedReader::new(f.ds.clone(), f.tok.clone(), 0).unwrap();
    assert!(r.next_batch(10, 0, 4).is_err()); // not a multiple
    assert!(r.next_batch(8, 4, 4).is_err()); // rank out of range
    assert!(r.next_batch(8, 0, 0).is_err());
    assert!(r.next_batch(0, 0, 1).is_err());
    assert!(r.next_batch(104, 0, 1).is_err()); // more than the rows
    assert_eq!(r.state(), ReaderState::new(0)); // failed calls don't move the reader
    let far = ReaderState { seed: 0, epoch: 0, offset: 1000 };
    assert!(ShardedReader::with_state(f.ds.clone(), f.tok.clone(), far).is_err());
}
