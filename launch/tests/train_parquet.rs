//! Training straight from dalle-mini's encoded parquet files (tests/fixtures/interop/parquet):
//! the files sharded across dp ranks, an exact resume after SIGKILL, bad files named.

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop")
}

/// A tiny model on the parquet fixture (65 rows in 2 files), dp = 2: each rank reads one file, an
/// epoch is 6 steps of 8 rows, so 8 steps cross into epoch 1.
fn parquet_config(dir: &Path, dataset: &Path, parquet: &str) -> PathBuf {
    let p = dir.join("run.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {{d_model: 32, encoder_layers: 1, decoder_layers: 1, attention_heads: 2, ffn_dim: 48}}\n\
             data: {{dataset: {}, tokenizer: {}, max_text_length: 16{parquet}}}\n\
             optimizer: {{learning_rate: 0.003, warmup_steps: 2}}\n\
             training: {{steps: 8, batch_size: 8, log_every: 1, eval_every: 0, save_every: 4, sample_every: 0}}\n\
             mesh: {{dp: 2}}\n",
            dataset.display(),
            fixtures().join("dallebart-hf/tokenizer.json").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn parquet_training_resumes_bit_for_bit_after_sigkill() {
    let dir = scratch("parquet");
    let cfg = parquet_config(&dir, &fixtures().join("parquet"), "");
    let (reference, interrupted) = (dir.join("reference"), dir.join("interrupted"));
    let summary_line = summary(&run_ok(train_cmd(&cfg, Some(&reference), &[])));
    assert_eq!(summary_line["steps"], 8);
    let want = losses(&reference);
    assert_eq!(want.len(), 8);
    // Killed in step 6 (checkpoint 4 is the newest), resumed to the end: the same losses.
    kill_at_hold(train_cmd(&cfg, Some(&interrupted), &[]), "step:6");
    assert_eq!(checkpoint_steps(&interrupted), [4]);
    run_ok(train_cmd(&cfg, Some(&interrupted), &["--resume", "auto"]));
    assert_eq!(losses(&interrupted), want, "resumed parquet run differs from the uninterrupted one");
    let weights = |d: &Path| std::fs::read(d.join("checkpoints/step_00000008/weights.safetensors")).unwrap();
    assert!(weights(&reference) == weights(&interrupted), "final weights differ");
    // The reader position in the checkpoint: epoch 1 after 8 steps of a 6-step epoch.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("checkpoints/step_00000008/trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!((state["reader"]["epoch"].as_u64(), state["reader"]["offset"].as_u64()), (Some(1), Some(16)));
    // The same rows from a glob of the files.
    let glob_cfg = parquet_config(&dir, &fixtures().join("parquet/*.parquet"), "");
    let glob = dir.join("glob");
    run_ok(train_cmd(&glob_cfg, Some(&glob), &[]));
    assert_eq!(losses(&glob), want);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_parquet_is_a_clear_error_naming_the_file() {
    let dir = scratch("badparquet");
    let data = fixtures().join("parquet");
    let cases = [
        (", parquet: {encoding_column: codes}", "codes", "000.parquet"),
        (", parquet: {image_vocab: 100}", "100", "000.parquet"),
        (", parquet: {image_length: 16}", "16", "000.parquet"),
    ];
    for (extra, needle, file) in cases {
        let cfg = parquet_config(&dir, &data, extra);
        let out = run(train_cmd(&cfg, Some(&dir.join("o")), &[]));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(err.contains(needle) && err.contains(file), "{extra}: {err}");
    }
    // More dp ranks than files.
    let cfg = parquet_config(&dir, &data.join("000.parquet"), "");
    let out = run(train_cmd(&cfg, Some(&dir.join("o2")), &[]));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be sharded over 2"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
