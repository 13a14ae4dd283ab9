//! Fuzz-style robustness: bytes flipped and files truncated in every kind of input file — an
//! encoded dataset's four files, every file of a training checkpoint (as found on disk, and with
//! its manifest rewritten so the parsers themselves see the damage), a tokenizer and a run config.
//! Each damaged input must give a clean error naming the damaged file (or be read correctly), and
//! never panic or hang. Deterministic (a fixed xorshift seed); a few hundred cases in seconds.

use dalle_mesh::run_config::RunConfig;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One damaged copy of a file.
enum Damage {
    /// XOR these positions with these non-zero masks.
    Flip(Vec<(usize, u8)>),
    /// Overwrite these positions with these bytes.
    Set(Vec<(usize, u8)>),
    /// Keep the first n bytes.
    Truncate(usize),
}

fn damages(len: usize, rng: &mut Rng) -> Vec<Damage> {
    let mut d = Vec::new();
    for _ in 0..10 {
        let k = 1 + rng.below(4);
        d.push(Damage::Flip((0..k).map(|_| (rng.below(len), 1 + rng.below(255) as u8)).collect()));
    }
    // A NaN (f32 little-endian) over the last four bytes: in a safetensors file, tensor data.
    let nan = 0x7FC0_0000u32.to_le_bytes();
    let tail = len.saturating_sub(4);
    d.push(Damage::Set((0..4.min(len)).map(|k| (tail + k, nan[k])).collect()));
    for n in [0, 1, len / 2, len.saturating_sub(1), rng.below(len), rng.below(len)] {
        d.push(Damage::Truncate(n));
    }
    d
}

fn apply(bytes: &[u8], d: &Damage) -> Vec<u8> {
    match d {
        Damage::Flip(f) => {
            let mut b = bytes.to_vec();
            for &(i, m) in f {
                if i < b.len() {
                    b[i] ^= m;
                }
            }
            b
        }
        Damage::Set(f) => {
            let mut b = bytes.to_vec();
            for &(i, v) in f {
                if i < b.len() {
                    b[i] = v;
                }
            }
            b
        }
        Damage::Truncate(n) => bytes[..(*n).min(bytes.len())].to_vec(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Damages each of `files` inside the folder `clean` in every way and runs `check` on the copy.
fn fuzz_folder(
    kind: &str,
    clean: &Path,
    files: &[&str],
    rng: &mut Rng,
    mut before_check: impl FnMut(&Path),
    check: impl Fn(&Path) -> anyhow::Result<()>,
    must_fail: impl Fn(&str) -> bool,
) -> (usize, Vec<String>) {
    let work = clean.with_extension("damaged");
    let mut failures = Vec::new();
    let mut n = 0;
    for name in files {
        let bytes = std::fs::read(clean.join(name)).unwrap();
        for d in damages(bytes.len(), rng) {
            copy_dir(clean, &work);
            let damaged = apply(&bytes, &d);
            if damaged == bytes {
                continue;
            }
            std::fs::write(work.join(name), &damaged).unwrap();
            before_check(&work);
            n += 1;
            let what = format!("{kind} {name}");
            let result = catch_unwind(AssertUnwindSafe(|| check(&work)));
            let failure = match &result {
                Err(_) => Some(format!("{what}: PANIC")),
                Ok(Ok(())) if must_fail(name) => Some(format!("{what}: damage not detected")),
                Ok(Ok(())) => None,
                // A manifest's damage may surface as a mismatch of the file it describes.
                Ok(Err(e)) => {
                    let msg = format!("{e:#}");
                    let names_it =
                        msg.contains(name) || (name.contains("manifest") && msg.contains(&*work.to_string_lossy()));
                    (!names_it).then(|| format!("{what}: error does not name the file: {msg}"))
                }
            };
            if std::env::var_os("DM_FUZZ_VERBOSE").is_some() {
                eprintln!("{what}: {:?}", result.as_ref().map(|r| r.as_ref().map_err(|e| format!("{e:#}"))));
            }
            failures.extend(failure);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    (n, failures)
}

const DATASET_FILES: [&str; 4] = ["manifest.json", "codes.bin", "captions.bin", "captions.idx"];
const CHECKPOINT_FILES: [&str; 7] = [
    "manifest.json",
    "weights.safetensors",
    "optimizer.safetensors",
    "config.json",
    "trainer_state.json",
    "tokenizer.json",
    "data.json",
];

/// Rewrites a checkpoint's manifest to the files' current sizes and checksums.
fn reseal(dir: &Path) {
    let path = dir.join("manifest.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return };
    let Ok(mut m) = serde_json::from_str::<serde_json::Value>(&text) else { return };
    let Some(files) = m["files"].as_array_mut() else { return };
    for f in files {
        let Some(name) = f["name"].as_str().map(str::to_string) else { continue };
        let Ok(bytes) = std::fs::read(dir.join(&name)) else { continue };
        f["bytes"] = bytes.len().into();
        f["crc32"] = crc32fast::hash(&bytes).into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn fuzz_everything(root: &Path) -> (usize, Vec<String>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut total, mut failures) = (0, Vec::new());
    let mut add = |(n, f): (usize, Vec<String>)| {
        total += n;
        failures.extend(f);
    };

    // A small run: its dataset, tokenizer, config and one checkpoint.
    let cfg_text = "model: {d_model: 16, encoder_layers: 1, decoder_layers: 1, attention_heads: 2, ffn_dim: 24}\n\
                    data: {synthetic: {train_rows: 40, eval_rows: 8, image_length: 16, seed: 3}}\n\
                    training: {steps: 1, batch_size: 4, eval_every: 0, save_every: 1}\n";
    let cfg = RunConfig::from_yaml_str(cfg_text).unwrap();
    let run = root.join("run");
    dalle_mesh::train::train(cfg, &run, None).unwrap();
    let data = run.join("data/synthetic-40x8-16-seed3");
    let checkpoint = run.join("checkpoints/step_00000001");

    // Dataset: open and read every row (what training does), then verify (checksums). Damage to
    // a data file must always be found by verify.
    add(fuzz_folder(
        "dataset",
        &data.join("train"),
        &DATASET_FILES,
        &mut rng,
        |_| {},
        |d| {
            let ds = dm_data::Dataset::open(d)?;
            for i in 0..ds.len() {
                ds.row(i)?;
            }
            ds.verify()?;
            Ok(())
        },
        |name| name != "manifest.json",
    ));

    // Checkpoint as found: every damage is caught by the manifest's checksums.
    // Both readers of a checkpoint: `sample` and a resume.
    let check_checkpoint = |d: &Path| -> anyhow::Result<()> {
        let opts = dm_model::dallebart::SamplingOptions { temperature: 1.0, ..Default::default() };
        let sampled =
            dalle_mesh::sample::run(d, &["a red circle".to_string()], 1, &opts, &d.join("s.png"), Default::default());
        let resumed = dalle_mesh::train::inspect_checkpoint(d);
        sampled?;
        resumed?;
        Ok(())
    };
    add(fuzz_folder("checkpoint", &checkpoint, &CHECKPOINT_FILES, &mut rng, |_| {}, check_checkpoint, |_| true));
    // Resealed: the manifest agrees with the damage, so each file's own parser must cope.
    add(fuzz_folder(
        "resealed checkpoint",
        &checkpoint,
        &CHECKPOINT_FILES[1..],
        &mut rng,
        reseal,
        check_checkpoint,
        |_| false,
    ));

    // Tokenizer and run config, each a single file.
    let single = root.join("single");
    std::fs::create_dir_all(&single).unwrap();
    std::fs::copy(data.join("tokenizer.json"), single.join("tokenizer.json")).unwrap();
    std::fs::write(single.join("run.yaml"), cfg_text).unwrap();
    add(fuzz_folder(
        "tokenizer",
        &single,
        &["tokenizer.json"],
        &mut rng,
        |_| {},
        |d| {
            let tok = dm_data::TextTokenizer::from_file(d.join("tokenizer.json"))?.with_max_text_length(16)?;
            tok.encode("a red circle above a blue square")?;
            Ok(())
        },
        |_| false,
    ));
    add(fuzz_folder(
        "run config",
        &single,
        &["run.yaml"],
        &mut rng,
        |_| {},
        |d| RunConfig::from_file(&d.join("run.yaml")).map(|_| ()),
        |_| false,
    ));
    (total, failures)
}

#[test]
fn damaged_inputs_of_every_kind_give_clean_errors_naming_the_file() {
    let root: PathBuf = std::env::temp_dir().join(format!("dm-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let worker_root = root.clone();
    std::thread::spawn(move || {
        let _ = tx.send(fuzz_everything(&worker_root));
    });
    let (cases, failures) = rx.recv_timeout(Duration::from_secs(50)).expect("the fuzz cases hung (over 50 s)");
    std::fs::remove_dir_all(&root).unwrap();
    assert!(cases > 300, "only {cases} cases ran");
    assert!(failures.is_empty(), "{} of {cases} damaged inputs misbehaved:\n{}", failures.len(), failures.join("\n"));
}
