//! Crash safety of training: SIGKILL during a step and during a checkpoint write, then resume;
//! the resumed run reproduces the uninterrupted run's losses bit for bit.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tiny, fast run: 16 steps, a checkpoint every 4.
fn write_config(dir: &Path) -> PathBuf {
    let p = dir.join("run.yaml");
    std::fs::write(
        &p,
        "model: {d_model: 32, encoder_layers: 1, decoder_layers: 2, attention_heads: 2, ffn_dim: 48}\n\
         data: {synthetic: {train_rows: 300, eval_rows: 40, image_length: 16, seed: 1}}\n\
         optimizer: {learning_rate: 0.003, warmup_steps: 3, max_grad_norm: 0.5}\n\
         training: {steps: 16, batch_size: 8, grad_accumulation: 2, log_every: 1, eval_every: 0, save_every: 4, keep_checkpoints: 2}\n",
    )
    .unwrap();
    p
}

fn train(cfg: &Path, out: &Path, resume: bool) -> Command {
    let args: Vec<&str> = if resume { vec!["--resume", out.to_str().unwrap()] } else { vec![] };
    train_cmd(cfg, Some(out), &args)
}

fn run_to_end(cfg: &Path, out: &Path, resume: bool) {
    run_ok(train(cfg, out, resume));
}

fn run_and_kill_at(cfg: &Path, out: &Path, resume: bool, hold: &str) {
    kill_at_hold(train(cfg, out, resume), hold);
}

#[test]
fn sigkill_during_a_step_and_during_a_checkpoint_write_then_resume_is_exact() {
    let dir = scratch("resume");
    let cfg = write_config(&dir);
    let reference = dir.join("reference");
    run_to_end(&cfg, &reference, false);
    let want = losses(&reference);
    assert_eq!(want.len(), 16);

    let out = dir.join("interrupted");
    // Killed in the middle of step 7 (after its backward): checkpoint 4 is the newest.
    run_and_kill_at(&cfg, &out, false, "step:7");
    // Resumed from 4, killed while writing checkpoint 12: its files exist only in a temporary folder.
    run_and_kill_at(&cfg, &out, true, "checkpoint:12");
    let ckpts: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(ckpts.iter().any(|n| n.starts_with(".tmp-step_00000012")), "{ckpts:?}");
    assert!(!ckpts.contains(&"step_00000012".to_string()), "{ckpts:?}");
    // Resumed from 8, to the end.
    run_to_end(&cfg, &out, true);
    assert_eq!(losses(&out), want, "resumed losses differ from the uninterrupted run");

    // The final weights are identical too.
    let a = std::fs::read(reference.join("checkpoints/step_00000016/weights.safetensors")).unwrap();
    let b = std::fs::read(out.join("checkpoints/step_00000016/weights.safetensors")).unwrap();
    assert!(a == b, "final weights differ");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn stderr_of(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_run_configs_are_clear_errors() {
    let dir = scratch("badcfg");
    let cases = [
        ("training: [1, 2\n", "run config"),
        ("training:\n  stepz: 3\n", "stepz"),
        ("training:\n  batch_size: 10\n  grad_accumulation: 3\n", "grad_accumulation"),
        ("optimizer:\n  schedule: cosine\n", "cosine"),
    ];
    for (i, (yaml, needle)) in cases.iter().enumerate() {
        let p = dir.join(format!("c{i}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        let err = stderr_of(&["train", "--config", p.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
        assert!(err.contains(needle), "{yaml:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_to_clobber_a_run_and_to_resume_with_another_config() {
    let dir = scratch("clobber");
    let cfg = write_config(&dir);
    let out = dir.join("run");
    run_to_end(&cfg, &out, false);
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    // A new run into the same folder is refused, nothing changed.
    let err = stderr_of(&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(err.contains("already holds checkpoints") && err.contains("--resume"), "{err}");
    // Resuming with a different model is refused before anything is written, naming the key.
    let other = dir.join("other.yaml");
    std::fs::write(&other, std::fs::read_to_string(&cfg).unwrap().replace("d_model: 32", "d_model: 64")).unwrap();
    let err = stderr_of(&[
        "train",
        "--config",
        other.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--resume",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("another config") && err.contains("model.d_model"), "{err}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    assert!(out.join("checkpoints/step_00000016/manifest.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_or_truncated_data_is_refused_before_training() {
    let dir = scratch("baddata");
    let ds = dir.join("ds");
    let gen = Command::new(BIN)
        .args([
            "data",
            "synthetic",
            "--out",
            ds.to_str().unwrap(),
            "--train-rows",
            "50",
            "--eval-rows",
            "10",
            "--image-length",
            "16",
        ])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let codes = ds.join("train/codes.bin");
    let bytes = std::fs::read(&codes).unwrap();
    std::fs::write(&codes, &bytes[..bytes.len() - 10]).unwrap();
    let cfg = dir.join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data: {{dataset: {}, tokenizer: {}, max_text_length: 16}}\ntraining: {{steps: 2, batch_size: 4}}\n",
            ds.join("train").display(),
            ds.join("tokenizer.json").display()
        ),
    )
    .unwrap();
    let err = stderr_of(&["train", "--config", cfg.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(err.contains("codes.bin"), "{err}");

    // Import with an out-of-range code names the line.
    let jsonl = dir.join("rows.jsonl");
    let good: Vec<u32> = vec![3; 16];
    let mut bad = good.clone();
    bad[5] = 5000;
    std::fs::write(
        &jsonl,
        format!(
            "{}\n{}\n",
            serde_json::json!({"caption": "a cat", "encoding": good}),
            serde_json::json!({"caption": "a dog", "encoding": bad})
        ),
    )
    .unwrap();
    let err = stderr_of(&[
        "data",
        "import",
        jsonl.to_str().unwrap(),
        "--out",
        dir.join("imported").to_str().unwrap(),
        "--image-length",
        "16",
        "--image-vocab",
        "1024",
    ]);
    assert!(err.contains('2') && err.contains("5000"), "{err}");
    assert!(!dir.join("imported").exists(), "a failed import writes nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}
