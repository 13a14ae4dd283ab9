//! `dalle-mesh parity` on every reference fixture made by dalle-mini (see fixtures/README.md).

use dm_model::parity;
use std::path::PathBuf;

fn fixtures() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("fixture.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "expected at least 4 fixtures in {}", root.display());
    dirs
}

#[test]
fn every_fixture_passes_parity() {
    let mut failures = Vec::new();
    for dir in fixtures() {
        let r = parity::run(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        println!("{}", serde_json::to_string(&r).unwrap());
        if !r.pass {
            failures.push(r);
        }
    }
    assert!(failures.is_empty(), "parity failed: {failures:#?}");
}

#[test]
fn parity_is_sensitive_to_a_wrong_weight() {
    // A test that can fail: perturb one weight slightly and parity must notice.
    let src = fixtures().into_iter().find(|p| p.ends_with("dallebart-tiny")).unwrap();
    let tmp = std::env::temp_dir().join(format!("dm-parity-perturbed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["config.json", "batch.safetensors", "expected.safetensors", "fixture.json"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    let table = dm_model::ParamTable::new(&dm_model::DalleBartConfig::from_file(&src.join("config.json")).unwrap());
    let mut w = dm_model::checkpoint::load_weights(&src.join("weights.safetensors"), &table).unwrap();
    let i = table.index_of("model.decoder.layers.FlaxBartDecoderLayer_1.GLU_0.Dense_2.kernel").unwrap();
    w[i][3] += 1e-3;
    dm_model::checkpoint::save_weights(&tmp.join("weights.safetensors"), &table, &w, false).unwrap();
    let r = parity::run(&tmp).unwrap();
    assert!(!r.pass, "a perturbed weight must fail parity: {r:?}");
    assert!(r.logits_max_abs_err > 1e-5);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn every_fixture_passes_parity_on_every_mesh_it_allows_and_refuses_the_others() {
    let meshes = [(1, 2), (2, 1), (2, 2), (4, 1)];
    let mut ran = 0;
    for dir in fixtures() {
        let cfg = dm_model::DalleBartConfig::from_file(&dir.join("config.json")).unwrap();
        let batch = parity::read_batch(&dir.join("batch.safetensors"), &cfg).unwrap().batch;
        for (tp, dp) in meshes {
            let allowed = dm_model::params::check_tp(&cfg, tp).is_ok() && batch.is_multiple_of(dp);
            match parity::run_mesh(&dir, tp, dp) {
                Ok(r) => {
                    assert!(allowed, "{}: tp={tp} dp={dp} should have been refused", dir.display());
                    assert!(r.pass, "{r:#?}");
                    ran += 1;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(!allowed, "{}: tp={tp} dp={dp} failed: {msg}", dir.display());
                    assert!(msg.contains("not divisible"), "unclear refusal: {msg}");
                }
            }
        }
    }
    assert!(ran >= 10, "only {ran} mesh parity runs");
    // The fixture made for it runs on all four meshes.
    let ready = fixtures().into_iter().find(|p| p.ends_with("mesh-ready")).unwrap();
    for (tp, dp) in meshes {
        assert!(parity::run_mesh(&ready, tp, dp).unwrap().pass);
    }
}
