//! The run folder is never lost or clobbered (issue 8, items 3-7 and the lineage items): the run
//! lock, another config refused, `--resume X` continuing in X, fallback past a corrupt checkpoint,
//! leftovers of dead runs, a full disk, lineage after an explicit older resume, the unigram baseline
//! line, corrupt dataset codes, `sample` values, and flags named in error messages.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn refused(out: &std::process::Output, code: i32) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_held_folder_is_refused_naming_the_holder_and_resume_continues_in_its_folder() {
    let dir = scratch("lock");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 100000, save_every: 100000");
    let out = dir.join("run");
    let mut first = spawn(train_cmd(&cfg, Some(&out), &[]));
    wait_for_lines(&out, 3, &mut first);
    // A second run into the same folder, new or resumed, is refused while the first lives.
    for extra in [vec![], vec!["--resume", out.to_str().unwrap()]] {
        let err = refused(&run(train_cmd(&cfg, Some(&out), &extra)), 2);
        assert!(err.contains(&format!("pid {}", first.id())) && err.contains("in use by another run"), "{err}");
    }
    send(&first, libc::SIGTERM);
    let done = wait_with_limit(first, Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(75));
    let stopped_at = summary(&done)["steps"].as_u64().unwrap();

    // `--resume X` without --out continues in X (nothing appears under ./runs/default).
    let total = (stopped_at + 2).to_string();
    let mut cmd = train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", &total]);
    cmd.current_dir(&dir);
    ok(&run(cmd));
    assert!(!dir.join("runs").exists(), "--resume without --out wrote into runs/default");
    assert_eq!(checkpoint_steps(&out).last(), Some(&(stopped_at + 2)));

    // A different run (another learning rate) is refused unless asked for explicitly.
    let other = tiny_config(&dir, "other.yaml", ", learning_rate: 0.01", ", steps: 100000, save_every: 100000");
    let more = (stopped_at + 4).to_string();
    let args = ["--resume", out.to_str().unwrap(), "--steps", &more];
    let err = refused(&run(train_cmd(&other, None, &args)), 2);
    assert!(err.contains("optimizer.learning_rate") && err.contains("--allow-config-change"), "{err}");
    let mut allowed = args.to_vec();
    allowed.push("--allow-config-change");
    ok(&run(train_cmd(&other, None, &allowed)));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Flips one byte in the middle of a file.
fn flip(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

#[test]
fn resume_skips_a_corrupt_checkpoint_and_dead_runs_leftovers_and_survives_a_full_disk() {
    let dir = scratch("fallback");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 12, save_every: 4, keep_checkpoints: 3");
    let reference = dir.join("reference");
    ok(&run(train_cmd(&cfg, Some(&reference), &["--steps", "16"])));

    let out = dir.join("run");
    ok(&run(train_cmd(&cfg, Some(&out), &[])));
    assert_eq!(checkpoint_steps(&out), vec![4, 8, 12]);
    let newest = out.join("checkpoints/step_00000012");
    flip(&newest.join("weights.safetensors"));
    let corrupt = std::fs::read(newest.join("weights.safetensors")).unwrap();
    // Leftover of a dead run's interrupted write.
    let leftover = out.join("checkpoints/.tmp-step_00000099-4000000");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("weights.safetensors"), vec![0u8; 1 << 16]).unwrap();

    let resumed = run(train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", "16"]));
    ok(&resumed);
    let err = text(&resumed.stderr);
    assert!(err.contains("skipping") && err.contains("step_00000012") && err.contains("checksum"), "{err}");
    assert!(!leftover.exists(), "the dead run's temporary folder is still there");
    // The corrupt checkpoint was set aside, byte for byte, not deleted; the run went on from 8.
    let aside = out.join("checkpoints/set-aside/step_00000012/weights.safetensors");
    assert_eq!(std::fs::read(&aside).unwrap(), corrupt);
    assert_eq!(losses(&out), losses(&reference), "the run from the fallback checkpoint is not exact");

    // A full disk while writing step 20: clear error, no temporary folder left, resume works.
    let mut cmd = train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", "24"]);
    cmd.env("DALLE_MESH_TEST_DISK_FULL", "20");
    let failed = run(cmd);
    let err = refused(&failed, 1);
    assert!(err.contains("step 20") && err.contains("temporary folder was removed"), "{err}");
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with(".tmp-")), "{names:?}");
    ok(&run(train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", "24"])));
    assert_eq!(checkpoint_steps(&out).last(), Some(&24));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_an_older_checkpoint_sets_the_abandoned_branch_aside_and_the_baseline_is_written_once() {
    let dir = scratch("lineage");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 16, save_every: 4, keep_checkpoints: 10, eval_every: 4");
    let out = dir.join("run");
    ok(&run(train_cmd(&cfg, Some(&out), &[])));
    let older = out.join("checkpoints/step_00000008");
    ok(&run(train_cmd(&cfg, None, &["--resume", older.to_str().unwrap(), "--steps", "10"])));
    // The branch from 8 ends at 10; 12 and 16 belong to the abandoned branch.
    assert_eq!(checkpoint_steps(&out), vec![4, 8, 10]);
    assert!(out.join("checkpoints/set-aside/step_00000016/manifest.json").exists());
    ok(&run(train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", "12"])));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> =
        lines.iter().filter(|v| v.get("loss").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "the run continued from 10, not from the abandoned 16");
    let baselines = lines.iter().filter(|v| v.get("unigram_baseline_loss").is_some()).count();
    assert_eq!(baselines, 1, "unigram_baseline_loss written {baselines} times");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes one code of row 0 of `ds/train/codes.bin` (u16).
fn poke_code(ds: &Path, value: u16) {
    let p = ds.join("train/codes.bin");
    let mut b = std::fs::read(&p).unwrap();
    b[6..8].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&p, b).unwrap();
}

#[test]
fn a_corrupt_dataset_code_is_a_clear_error_and_data_verify_finds_every_corruption() {
    let dir = scratch("codes");
    let ds = dir.join("ds");
    let mut gen = std::process::Command::new(BIN);
    gen.args(["data", "synthetic", "--out", ds.to_str().unwrap(), "--train-rows", "50", "--eval-rows", "10"]);
    ok(&run(gen));
    let verify = |d: &Path| {
        let mut c = std::process::Command::new(BIN);
        c.args(["data", "verify", d.to_str().unwrap()]);
        run(c)
    };
    ok(&verify(&ds.join("train")));
    let cfg = dir.join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data: {{dataset: {}, tokenizer: {}}}\ntraining: {{steps: 2, batch_size: 4, save_every: 0, eval_every: 0}}\n",
            ds.join("train").display(),
            ds.join("tokenizer.json").display()
        ),
    )
    .unwrap();
    let vocab = dm_data::Dataset::open(ds.join("train")).unwrap().image_vocab() as u16;
    let clean = std::fs::read(ds.join("train/codes.bin")).unwrap();
    for bad in [u16::MAX, vocab] {
        poke_code(&ds, bad);
        let err = refused(&run(train_cmd(&cfg, Some(&dir.join(format!("o{bad}"))), &[])), 2);
        assert!(err.contains("codes.bin") && err.contains(&format!("code {bad}")), "{err}");
        let err = refused(&verify(&ds.join("train")), 2);
        assert!(err.contains("codes.bin"), "{err}");
    }
    std::fs::write(ds.join("train/codes.bin"), &clean).unwrap();
    ok(&verify(&ds.join("train")));
    flip(&ds.join("train/captions.bin"));
    let err = refused(&verify(&ds.join("train")), 2);
    assert!(err.contains("captions.bin") && err.contains("checksum"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sample_refuses_nonsense_values_and_warns_when_a_prompt_is_truncated() {
    let dir = scratch("sample");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 2, save_every: 2");
    let out = dir.join("run");
    ok(&run(train_cmd(&cfg, Some(&out), &[])));
    let sample = |extra: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.args(["sample", "--checkpoint", out.to_str().unwrap(), "--n", "1", "--out"])
            .arg(dir.join("s.png"))
            .args(extra)
            .env("RUST_LOG", "warn");
        run(c)
    };
    let cases: [(&[&str], &str); 8] = [
        (&["--temperature", "NaN"], "--temperature"),
        (&["--temperature=-1"], "--temperature"),
        (&["--cond-scale", "NaN"], "--cond-scale"),
        (&["--cond-scale=-2"], "--cond-scale"),
        (&["--top-k", "0"], "--top-k"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--top-p", "0"], "--top-p"),
        (&["--n", "0"], "--n"),
    ];
    for (args, flag) in cases {
        let mut all = args.to_vec();
        all.extend(["--prompt", "a red circle"]);
        let err = refused(&sample(&all), 2);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    let long = "a red circle above a blue square ".repeat(300);
    let done = sample(&["--prompt", &long]);
    ok(&done);
    let err = text(&done.stderr);
    assert!(err.contains("truncated to its first 14 tokens"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `--flags` of every subcommand, from the binary's own help.
fn all_flags() -> std::collections::BTreeSet<String> {
    let mut flags = std::collections::BTreeSet::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let out = std::process::Command::new(BIN).args(&path).arg("--help").output().unwrap();
        let help = text(&out.stdout);
        let mut in_commands = false;
        for line in help.lines() {
            if line.starts_with("Commands:") {
                in_commands = true;
                continue;
            }
            if in_commands {
                match line.split_whitespace().next() {
                    Some("help") | None => in_commands = !line.trim().is_empty(),
                    Some(sub) => todo.push(path.iter().cloned().chain([sub.to_string()]).collect()),
                }
            }
            for w in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
                if w.starts_with("--") && w.len() > 2 {
                    flags.insert(w.to_string());
                }
            }
        }
    }
    flags
}

/// `--words` inside the string literals of a Rust source file.
fn flags_in_string_literals(src: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut chars = src.chars().peekable();
    let (mut in_str, mut lit) = (false, String::new());
    while let Some(c) = chars.next() {
        match (in_str, c) {
            (false, '"') => in_str = true,
            (false, '/') if chars.peek() == Some(&'/') => {
                // A comment: skip to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => {
                in_str = false;
                for (i, _) in lit.match_indices("--") {
                    let word: String = lit[i + 2..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                        .collect();
                    let starts_word = word.starts_with(|c: char| c.is_ascii_lowercase());
                    if starts_word && !lit[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '-') {
                        found.push(format!("--{word}"));
                    }
                }
                lit.clear();
            }
            (true, c) => lit.push(c),
            _ => {}
        }
    }
    found
}

#[test]
fn every_flag_named_in_a_message_exists() {
    // Options of other programs: the CUDA kernel compiler's, dalle-mini's train.py `--optim`,
    // cargo's (`--release`), SLURM's (`srun --ntasks`, `--mpi=pmix`, sbatch's), and Open MPI's mpirun's.
    const FOREIGN: [&str; 15] = [
        "--parsable",
        "--job-name",
        "--array",
        "--dependency",
        "--output",
        "--gpu-architecture",
        "--include-path",
        "--warn-on-spills",
        "--optim",
        "--release",
        "--ntasks",
        "--mpi",
        "--oversubscribe",
        "--tag-output",
        "--allow-run-as-root",
    ];
    let flags = all_flags();
    assert!(flags.contains("--resume") && flags.contains("--top-p"), "{flags:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut missing = Vec::new();
    for krate in ["launch", "data", "model", "parallel", "runtime", "kernels"] {
        let mut stack = vec![root.join(krate).join("src")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    for f in flags_in_string_literals(&std::fs::read_to_string(&p).unwrap()) {
                        if !flags.contains(&f) && !FOREIGN.contains(&f.as_str()) {
                            missing.push(format!("{}: {f}", p.display()));
                        }
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "messages name flags that don't exist: {missing:?}");
}
