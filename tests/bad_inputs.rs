//! Bad inputs give a clear error naming the problem, never a panic.

use dm_model::parity;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/dallebart-tiny")
}

/// A copy of the tiny fixture in a fresh temporary folder.
fn scratch_fixture(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dm-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect()
}

fn write_raw(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Edits weights.safetensors of a scratch fixture and returns parity's error text.
fn weights_error(tag: &str, edit: impl FnOnce(&mut Tensors)) -> String {
    let dir = scratch_fixture(tag);
    let path = dir.join("weights.safetensors");
    let mut t = read_raw(&path);
    edit(&mut t);
    write_raw(&path, &t);
    let err = parity::run(&dir).expect_err("bad weights must be refused");
    std::fs::remove_dir_all(&dir).unwrap();
    format!("{err:#}")
}

const VICTIM: &str = "model.encoder.layers.FlaxBartEncoderLayer_1.GLU_0.Dense_1.kernel";

#[test]
fn missing_tensor_is_named() {
    let err = weights_error("missing", |t| t.retain(|(n, ..)| n != VICTIM));
    assert!(err.contains("missing") && err.contains(VICTIM), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let err = weights_error("shape", |t| {
        let e = t.iter_mut().find(|(n, ..)| n == VICTIM).unwrap();
        e.2 = vec![e.2[1], e.2[0]];
    });
    assert!(err.contains(VICTIM) && err.contains("shape"), "{err}");
}

#[test]
fn wrong_dtype_is_named() {
    let err = weights_error("dtype", |t| {
        let e = t.iter_mut().find(|(n, ..)| n == VICTIM).unwrap();
        let mut wide = Vec::new();
        for c in e.3.chunks_exact(4) {
            wide.extend_from_slice(&(f32::from_le_bytes(c.try_into().unwrap()) as f64).to_le_bytes());
        }
        e.1 = Dtype::F64;
        e.3 = wide;
    });
    assert!(err.contains(VICTIM) && err.contains("dtype"), "{err}");
}

#[test]
fn nan_in_weights_is_named() {
    let err = weights_error("nan", |t| {
        let e = t.iter_mut().find(|(n, ..)| n == VICTIM).unwrap();
        e.3[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(err.contains(VICTIM) && err.contains("non-finite"), "{err}");
}

#[test]
fn unexpected_tensor_is_named() {
    let err =
        weights_error("extra", |t| t.push(("model.encoder.mystery.kernel".into(), Dtype::F32, vec![1], vec![0; 4])));
    assert!(err.contains("model.encoder.mystery.kernel"), "{err}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = scratch_fixture("truncated");
    let path = dir.join("weights.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", parity::run(&dir).expect_err("truncated file must be refused"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("weights.safetensors") && err.contains("truncated"), "{err}");
}

fn config_error(tag: &str, key: &str, value: serde_json::Value) -> String {
    let dir = scratch_fixture(tag);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let err = format!("{:#}", parity::run(&dir).expect_err("bad config must be refused"));
    std::fs::remove_dir_all(&dir).unwrap();
    err
}

#[test]
fn unsupported_architecture_flags_are_named() {
    for (key, value) in [
        ("ln_type", serde_json::json!("rmsnorm")),
        ("use_alibi", serde_json::json!(true)),
        ("ln_positions", serde_json::json!("preln")),
        ("use_glu", serde_json::json!(false)),
    ] {
        let err = config_error(key, key, value);
        assert!(err.contains(key) && err.contains("unsupported"), "{key}: {err}");
    }
}

#[test]
fn config_that_does_not_match_the_weights_is_refused() {
    let err = config_error("mismatch", "encoder_ffn_dim", serde_json::json!(96));
    assert!(err.contains("shape") && err.contains("Dense"), "{err}");
}

#[test]
fn out_of_range_batch_ids_are_named() {
    let dir = scratch_fixture("batch");
    let path = dir.join("batch.safetensors");
    let mut t = read_raw(&path);
    let e = t.iter_mut().find(|(n, ..)| n == "labels").unwrap();
    e.3[0..4].copy_from_slice(&100_000i32.to_le_bytes());
    write_raw(&path, &t);
    let err = format!("{:#}", parity::run(&dir).expect_err("out-of-range label must be refused"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("labels") && err.contains("100000"), "{err}");
}
