//! dalle-mini's own files end to end (fixtures in tests/fixtures/interop, written by dalle-mini
//! 0.1.5 itself): parity of logits and loss on its msgpack checkpoint, the next AdamW step from
//! its opt_state.msgpack, round trips ours → dalle-mini → ours, fine-tuning from its checkpoint
//! and exporting the result back, its tokenizer's ids, and the errors bad files get.

use dalle_mesh::interop::{self, ExportDtype, ExportFormat};
use dm_model::checkpoint::{read_tensors, stacked_name, HostTensor};
use dm_model::dalle_mini::{load_model, load_model_weights, save_dalle_mini, SaveDtype};
use dm_model::parity;
use dm_model::{AdamW, AdamWConfig, DalleBart, DalleBartConfig, ParamTable};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::Backend;
use std::path::{Path, PathBuf};

fn interop_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop").join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dm-interop-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_msgpack_checkpoint_passes_parity_on_logits_and_loss() {
    let r = parity::run(&interop_dir("dallebart-hf")).unwrap();
    println!("{}", serde_json::to_string(&r).unwrap());
    assert!(r.pass, "{r:?}");
    assert_eq!(r.checked, ["logits", "loss"]);
    // fp64 is 1.8e-7 / 4.5e-7 away from the fixture's logits / loss (its README).
    assert!(r.logits_max_abs_err < 1e-6 && r.loss_abs_err < 2e-6, "{r:?}");
}

#[test]
fn a_perturbed_msgpack_weight_fails_parity() {
    let dir = scratch("perturbed");
    let src = interop_dir("dallebart-hf");
    for f in ["config.json", "batch.safetensors", "expected.safetensors", "fixture.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let (cfg, mut w) = load_model(&src).unwrap();
    let i = ParamTable::new(&cfg).index_of("lm_head.kernel").unwrap();
    w[i][5] += 1e-3;
    save_dalle_mini(&dir, &cfg, &w, SaveDtype::F32).unwrap();
    let r = parity::run(&dir).unwrap();
    assert!(!r.pass && r.logits_max_abs_err > 1e-5, "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The values of a (possibly stacked) checkpoint name from table-order values.
fn named_values(table: &ParamTable, values: &[Vec<f32>], name: &str) -> Vec<f32> {
    if let Some(i) = table.index_of(name) {
        return values[i].clone();
    }
    let layers: Vec<usize> = (0..table.specs.len())
        .filter(|&i| stacked_name(&table.specs[i].name).is_some_and(|(n, _)| n == name))
        .collect();
    assert!(!layers.is_empty(), "no parameter {name}");
    layers.iter().flat_map(|&i| values[i].clone()).collect()
}

fn f32_of(t: &HostTensor) -> &[f32] {
    match t {
        HostTensor::F32 { data, .. } => data,
        _ => panic!("not f32"),
    }
}

/// The next step from dalle-mini's optimizer state. Its gradients equal the first step's (same
/// params, same batch), so m̂ = g and v̂ = g² and the update is lr·g/(|g|+ε) + lr·wd·p: it
/// barely depends on gradient noise except where |g| is near ε. Measured: 1.2e-7 from adam2
/// (one f32 ulp of the LayerNorm scales near 1; adam2's own fp64 gap is 2.1e-7); the tolerance
/// 1e-6 is 1/1000 of the step size lr, far below a wrong step (≥ lr where a moment is wrong).
#[test]
fn opt_state_gives_the_next_steps_params() {
    let fixture = interop_dir("dallebart-hf");
    let state_dir = interop_dir("dallebart-hf-state");
    let (cfg, weights) = load_model(&fixture).unwrap();
    let table = ParamTable::new(&cfg);
    let state = dm_model::opt_state::load_adam_state(&state_dir.join("opt_state.msgpack"), &table).unwrap();
    assert_eq!(state.count, 1);
    let expected = read_tensors(&state_dir.join("expected.safetensors")).unwrap();
    // mu = (1 - b1) g and nu = (1 - b2) g² for the subset.
    for (key, t) in &expected {
        let Some(name) = key.strip_prefix("grad.") else { continue };
        let g = f32_of(t);
        let mu = named_values(&table, &state.mu, name);
        let nu = named_values(&table, &state.nu, name);
        for ((m, v), g) in mu.iter().zip(&nu).zip(g) {
            assert!((m - 0.1 * g).abs() <= 1e-7 * g.abs().max(1e-3), "{name}: mu {m} vs g {g}");
            assert!((v - 0.001 * g * g).abs() <= 1e-6 * (g * g).max(1e-9), "{name}: nu {v} vs g {g}");
        }
    }
    let batch = parity::read_batch(&fixture.join("batch.safetensors"), &cfg).unwrap();
    let be = CpuBackend::new();
    let mut model = DalleBart::new(be.clone(), cfg.clone(), weights).unwrap();
    model.forward(&batch).unwrap();
    let out = model.loss_and_backward(1.0 / (batch.batch * batch.image_len) as f32).unwrap();
    let want_loss = f32_of(&expected["loss"])[0];
    assert!((out.loss - want_loss).abs() < 2e-6, "{} vs {want_loss}", out.loss);
    let names: Vec<String> = table.specs.iter().map(|s| s.name.clone()).collect();
    let adamw = AdamWConfig { b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let mut opt = AdamW::new(&be, adamw, &names, &model.params).unwrap();
    for (buf, v) in opt.m.iter_mut().zip(&state.mu) {
        be.write(buf, 0, v).unwrap();
    }
    for (buf, v) in opt.v.iter_mut().zip(&state.nu) {
        be.write(buf, 0, v).unwrap();
    }
    opt.step = state.count;
    opt.update(&be, &mut model.params, &model.grads, 1e-3, 1.0).unwrap();
    let after = model.param_values().unwrap();
    let mut checked = 0;
    let mut worst = 0.0f32;
    for (key, t) in &expected {
        let Some(name) = key.strip_prefix("adam2.") else { continue };
        let got = named_values(&table, &after, name);
        for (a, b) in got.iter().zip(f32_of(t)) {
            worst = worst.max((a - b).abs());
        }
        checked += 1;
    }
    println!("adam2 max abs error {worst:e}");
    assert_eq!(checked, 6);
    assert!(worst < 1e-6, "adam2 max abs error {worst}");
}

#[test]
fn ours_to_dalle_mini_to_ours_is_bit_identical_in_both_layouts_and_bf16_is_exact_on_bf16_values() {
    let (fixture_cfg, fixture_w) = load_model(&interop_dir("dallebart-hf")).unwrap();
    for use_scan in [true, false] {
        let cfg = DalleBartConfig { use_scan, ..fixture_cfg.clone() };
        let dir = scratch(&format!("rt-{use_scan}"));
        save_dalle_mini(&dir, &cfg, &fixture_w, SaveDtype::F32).unwrap();
        let (back_cfg, back) = load_model(&dir).unwrap();
        assert_eq!(back_cfg, cfg);
        assert!(back.iter().flatten().zip(fixture_w.iter().flatten()).all(|(a, b)| a.to_bits() == b.to_bits()));
        // Through our own format and the export command, then back again.
        let ours = dir.join("ours");
        interop::export(&dir, ExportFormat::DalleMesh, ExportDtype::Float32, &ours).unwrap();
        let again = dir.join("again");
        interop::export(&ours, ExportFormat::DalleMini, ExportDtype::Float32, &again).unwrap();
        let table = ParamTable::new(&cfg);
        assert_eq!(load_model_weights(&ours, &table).unwrap(), fixture_w);
        assert_eq!(load_model_weights(&again, &table).unwrap(), fixture_w);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let rounded: Vec<Vec<f32>> =
        fixture_w.iter().map(|v| v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect()).collect();
    let dir = scratch("bf16");
    save_dalle_mini(&dir, &fixture_cfg, &fixture_w, SaveDtype::BF16).unwrap();
    let arrays = dm_model::flax::read_file(&dir.join("flax_model.msgpack")).unwrap();
    assert!(arrays.iter().all(|a| a.dtype == dm_model::flax::FlaxDtype::BF16));
    assert_eq!(load_model(&dir).unwrap().1, rounded);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_refuses_a_non_empty_out_folder() {
    let dir = scratch("nonempty");
    std::fs::write(dir.join("keep.txt"), "x").unwrap();
    let err = interop::export(&interop_dir("dallebart-hf"), ExportFormat::DalleMini, ExportDtype::Float32, &dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty") && err.contains("--out"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("keep.txt")).unwrap(), "x");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tokenizer_encode_gives_every_tokens_json_row() {
    let dir = interop_dir("dallebart-hf");
    let tokens: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("tokens.json")).unwrap()).unwrap();
    let captions: Vec<String> =
        tokens["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    let got = interop::tokenizer_encode(&dir, 16, false, &captions).unwrap();
    assert_eq!(got["input_ids"], tokens["input_ids"]);
    assert_eq!(got["attention_mask"], tokens["attention_mask"]);
}

/// A small dataset the fixture's model can learn: four captions, each with its own codes.
fn learnable_dataset(dir: &Path, cfg: &DalleBartConfig) {
    let captions = ["a dog", "the shiny chair is sitting on a wooden table", "a golden car", "two boats"];
    let mut w = dm_data::DatasetWriter::create(dir, cfg.image_length, cfg.image_vocab_size as u32).unwrap();
    for _ in 0..16 {
        for (k, c) in captions.iter().enumerate() {
            let codes: Vec<u32> =
                (0..cfg.image_length).map(|j| ((k * 37 + j * 11) % cfg.image_vocab_size) as u32).collect();
            w.push(c, &codes).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn fine_tuning_from_the_msgpack_checkpoint_trains_and_exports_back() {
    let fixture = interop_dir("dallebart-hf");
    let (cfg, start) = load_model(&fixture).unwrap();
    let dir = scratch("finetune");
    learnable_dataset(&dir.join("ds"), &cfg);
    let yaml = format!(
        "model: {{from: {fx}, optimizer_state: {st}}}\n\
         data: {{dataset: {ds}, tokenizer: {tok}, normalize_text: false, max_text_length: 16}}\n\
         optimizer: {{learning_rate: 0.003, warmup_steps: 0, weight_decay: 0.01}}\n\
         training: {{steps: 41, batch_size: 8, log_every: 1, eval_every: 0, save_every: 0, sample_every: 0}}\n",
        fx = fixture.display(),
        st = interop_dir("dallebart-hf-state").join("opt_state.msgpack").display(),
        ds = dir.join("ds").display(),
        tok = fixture.join("tokenizer.json").display(),
    );
    let run_cfg = dalle_mesh::run_config::RunConfig::from_yaml_str(&yaml).unwrap();
    let out = dir.join("run");
    let summary = dalle_mesh::train::train(run_cfg, &out, None).unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let logged: Vec<(u64, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let v = serde_json::from_str::<serde_json::Value>(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect();
    let losses: Vec<f64> = logged.iter().map(|(_, l)| *l).collect();
    println!("losses {losses:?}");
    // The run continues dalle-mini's step count (1), and its first loss is that of the fixture's
    // (untrained) weights: close to ln(129) = 4.86 on any batch.
    assert_eq!(logged[0].0, 2, "{logged:?}");
    assert_eq!(logged.len(), 40, "{logged:?}");
    assert!(losses[0] > 4.7, "{losses:?}");
    assert!(*losses.last().unwrap() < losses[0] - 1.0, "loss did not fall: {losses:?}");
    // Export the trained checkpoint back to dalle-mini and read it again.
    let exported = dir.join("export");
    interop::export(&out, ExportFormat::DalleMini, ExportDtype::Float32, &exported).unwrap();
    let ckpt = summary.checkpoint.unwrap();
    let table = ParamTable::new(&cfg);
    let trained = dm_model::checkpoint::load_weights(&ckpt.join("weights.safetensors"), &table).unwrap();
    assert_eq!(load_model(&exported).unwrap().1, trained);
    assert_ne!(trained, start);
    for f in ["tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        assert!(exported.join(f).is_file(), "{f}");
    }
    // The exported tokenizer still gives dalle-mini's ids.
    let tokens: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("tokens.json")).unwrap()).unwrap();
    let captions: Vec<String> =
        tokens["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    let slow = dir.join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(exported.join(f), slow.join(f)).unwrap();
    }
    for d in [&exported, &slow] {
        assert_eq!(interop::tokenizer_encode(d, 16, false, &captions).unwrap()["input_ids"], tokens["input_ids"]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_checkpoint_folders_get_errors_naming_the_file() {
    let src = interop_dir("dallebart-hf");
    let dir = scratch("bad");
    let bytes = std::fs::read(src.join("flax_model.msgpack")).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("flax_model.msgpack"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = format!("{:#}", interop::load_model(&dir).unwrap_err());
    assert!(err.contains("flax_model.msgpack") && err.contains("truncated"), "{err}");
    // A sharded checkpoint whose index names a shard that is not there.
    std::fs::remove_file(dir.join("flax_model.msgpack")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": {
        "lm_head/kernel": "flax_model-00001-of-00002.msgpack"}});
    std::fs::write(dir.join("flax_model.msgpack.index.json"), index.to_string()).unwrap();
    let err = format!("{:#}", interop::load_model(&dir).unwrap_err());
    assert!(err.contains("flax_model-00001-of-00002.msgpack") && err.contains("missing"), "{err}");
    // A checkpoint of another config: the mismatch is named.
    std::fs::remove_file(dir.join("flax_model.msgpack.index.json")).unwrap();
    std::fs::write(dir.join("flax_model.msgpack"), &bytes).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["decoder_ffn_dim"] = 64.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = format!("{:#}", interop::load_model(&dir).unwrap_err());
    assert!(err.contains("flax_model.msgpack") && err.contains("GLU_0.Dense_0.kernel"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
