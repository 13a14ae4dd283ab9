//! The flax msgpack reader and writer: round trips of every dtype, nesting, scalars and
//! chunked arrays; the dalle-mini fixture read tensor by tensor; sharded checkpoints; and the
//! errors a truncated or malformed file gets.

use dm_model::flax::{self, FlaxArray, FlaxArrayRef, FlaxDtype};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

fn interop(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dm-flax-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random_arrays(seed: u64) -> Vec<FlaxArray> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dtypes = [
        FlaxDtype::F32,
        FlaxDtype::BF16,
        FlaxDtype::F16,
        FlaxDtype::I32,
        FlaxDtype::I64,
        FlaxDtype::F64,
        FlaxDtype::Bool,
    ];
    let mut out = Vec::new();
    for (i, dtype) in dtypes.iter().enumerate() {
        for (j, shape) in [vec![], vec![rng.random_range(1..5)], vec![2, 0, 3], vec![3, rng.random_range(1..40)]]
            .into_iter()
            .enumerate()
        {
            let n: usize = shape.iter().product::<usize>() * dtype.itemsize();
            let data: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            out.push(FlaxArray { path: format!("group{}.sub{j}.{}", i % 3, dtype.name()), shape, dtype: *dtype, data });
        }
    }
    out
}

fn refs(arrays: &[FlaxArray]) -> Vec<FlaxArrayRef<'_>> {
    arrays.iter().map(|a| FlaxArrayRef { path: &a.path, shape: &a.shape, dtype: a.dtype, data: &a.data }).collect()
}

#[test]
fn write_then_read_is_identical_for_every_dtype_and_shape() {
    let dir = scratch("roundtrip");
    let arrays = random_arrays(1);
    let path = dir.join("x.msgpack");
    flax::write_file(&path, &refs(&arrays)).unwrap();
    let back = flax::read_file(&path).unwrap();
    // Read order is tree order: grouped by first-seen prefix.
    let mut want = arrays.clone();
    let mut got = back.clone();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    got.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chunked_arrays_are_joined_back() {
    let arrays = random_arrays(2);
    for chunk in [1, 7, 64, 1000] {
        let mut bytes = Vec::new();
        flax::write_to_chunked(&mut bytes, Path::new("mem"), &refs(&arrays), chunk).unwrap();
        let mut got = Vec::new();
        flax::visit_reader(&bytes[..], Path::new("mem"), Some(bytes.len() as u64), &mut |a| {
            got.push(a);
            Ok(())
        })
        .unwrap();
        got.sort_by(|a, b| a.path.cmp(&b.path));
        let mut want = arrays.clone();
        want.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(got, want, "chunk {chunk}");
        if chunk == 7 {
            assert!(bytes.windows(25).any(|w| w == b"__msgpack_chunked_array__"));
        }
    }
}

#[test]
fn reads_the_dalle_mini_fixture_with_every_name_shape_and_dtype() {
    let dir = interop("dallebart-hf");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let params = fixture["params"].as_object().unwrap();
    let arrays = flax::read_file(&dir.join("flax_model.msgpack")).unwrap();
    assert_eq!(arrays.len(), params.len());
    let mut total = 0;
    for a in &arrays {
        let (shape, dtype) = (&params[&a.path][0], &params[&a.path][1]);
        let shape: Vec<usize> = shape.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(a.shape, shape, "{}", a.path);
        assert_eq!(a.dtype.name(), dtype.as_str().unwrap());
        assert!(a.to_f32().iter().all(|v| v.is_finite()));
        total += a.numel();
    }
    assert_eq!(total as u64, fixture["n_params"].as_u64().unwrap());
    // Our writer reproduces flax's bytes exactly for the same tree.
    let mut bytes = Vec::new();
    flax::write_to(&mut bytes, Path::new("mem"), &refs(&arrays)).unwrap();
    assert_eq!(bytes, std::fs::read(dir.join("flax_model.msgpack")).unwrap());
}

#[test]
fn reads_ext3_scalars_and_plain_numbers() {
    // {"a": ext3 float32 scalar 1.5, "b": {"c": 7, "d": 2.5, "e": true, "f": nil, "g": {}}}
    let mut payload = Vec::new();
    rmp::encode::write_array_len(&mut payload, 3).unwrap();
    rmp::encode::write_array_len(&mut payload, 0).unwrap();
    rmp::encode::write_str(&mut payload, "float32").unwrap();
    rmp::encode::write_bin(&mut payload, &1.5f32.to_le_bytes()).unwrap();
    let mut b = Vec::new();
    rmp::encode::write_map_len(&mut b, 2).unwrap();
    rmp::encode::write_str(&mut b, "a").unwrap();
    rmp::encode::write_ext_meta(&mut b, payload.len() as u32, 3).unwrap();
    b.extend_from_slice(&payload);
    rmp::encode::write_str(&mut b, "b").unwrap();
    rmp::encode::write_map_len(&mut b, 5).unwrap();
    rmp::encode::write_str(&mut b, "c").unwrap();
    rmp::encode::write_uint(&mut b, 7).unwrap();
    rmp::encode::write_str(&mut b, "d").unwrap();
    rmp::encode::write_f64(&mut b, 2.5).unwrap();
    rmp::encode::write_str(&mut b, "e").unwrap();
    rmp::encode::write_bool(&mut b, true).unwrap();
    rmp::encode::write_str(&mut b, "f").unwrap();
    rmp::encode::write_nil(&mut b).unwrap();
    rmp::encode::write_str(&mut b, "g").unwrap();
    rmp::encode::write_map_len(&mut b, 0).unwrap();
    let mut got = Vec::new();
    flax::visit_reader(&b[..], Path::new("mem"), None, &mut |a| {
        got.push((a.path.clone(), a.shape.clone(), a.dtype, a.to_f32()));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        got,
        vec![
            ("a".into(), vec![], FlaxDtype::F32, vec![1.5]),
            ("b.c".into(), vec![], FlaxDtype::I64, vec![7.0]),
            ("b.d".into(), vec![], FlaxDtype::F64, vec![2.5]),
            ("b.e".into(), vec![], FlaxDtype::Bool, vec![1.0]),
        ]
    );
}

fn write_index(dir: &Path, entries: &[(&str, &str)]) {
    let map: serde_json::Map<String, serde_json::Value> =
        entries.iter().map(|(k, f)| (k.replace('.', "/"), serde_json::Value::from(*f))).collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(flax::INDEX_FILE), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoints_are_read_and_checked_against_the_index() {
    let dir = scratch("sharded");
    let arrays = random_arrays(3);
    let (first, second) = arrays.split_at(arrays.len() / 2);
    let names = ["flax_model-00001-of-00002.msgpack", "flax_model-00002-of-00002.msgpack"];
    flax::write_file(&dir.join(names[0]), &refs(first)).unwrap();
    flax::write_file(&dir.join(names[1]), &refs(second)).unwrap();
    let mut entries: Vec<(&str, &str)> = first.iter().map(|a| (a.path.as_str(), names[0])).collect();
    entries.extend(second.iter().map(|a| (a.path.as_str(), names[1])));
    write_index(&dir, &entries);
    let mut got = Vec::new();
    let files = flax::visit_checkpoint(&dir, &mut |a| {
        got.push(a);
        Ok(())
    })
    .unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(got.len(), arrays.len());

    // An index entry whose shard does not hold it.
    let mut wrong = entries.clone();
    wrong.push(("not.there", names[1]));
    write_index(&dir, &wrong);
    let err = flax::visit_checkpoint(&dir, &mut |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("not/there") && err.contains(names[1]) && err.contains("index.json"), "{err}");

    // A shard file missing from the folder.
    write_index(&dir, &entries);
    std::fs::remove_file(dir.join(names[1])).unwrap();
    let err = flax::visit_checkpoint(&dir, &mut |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains(names[1]) && err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_files_are_refused_at_every_cut_naming_the_file() {
    let dir = scratch("truncated");
    let src = std::fs::read(interop("dallebart-hf").join("flax_model.msgpack")).unwrap();
    let path = dir.join("cut.msgpack");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let cuts: Vec<usize> =
        [0, 1, 2, 10, src.len() - 1].into_iter().chain((0..20).map(|_| rng.random_range(0..src.len()))).collect();
    for cut in cuts {
        std::fs::write(&path, &src[..cut]).unwrap();
        let err = flax::read_file(&path).unwrap_err().to_string();
        assert!(err.contains("cut.msgpack") && err.contains("truncated"), "cut {cut}: {err}");
    }
    // Trailing garbage is refused too.
    std::fs::write(&path, [&src[..], &[0u8]].concat()).unwrap();
    let err = flax::read_file(&path).unwrap_err().to_string();
    assert!(err.contains("trailing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn ext_doc(payload: &[u8], code: i8) -> Vec<u8> {
    let mut b = Vec::new();
    rmp::encode::write_map_len(&mut b, 1).unwrap();
    rmp::encode::write_str(&mut b, "w").unwrap();
    rmp::encode::write_ext_meta(&mut b, payload.len() as u32, code).unwrap();
    b.extend_from_slice(payload);
    b
}

fn read_err(bytes: &[u8]) -> String {
    flax::visit_reader(bytes, Path::new("bad.msgpack"), Some(bytes.len() as u64), &mut |_| Ok(()))
        .unwrap_err()
        .to_string()
}

#[test]
fn malformed_ext_payloads_are_refused_with_the_reason() {
    let payload = |shape: &[u32], dtype: &str, data: &[u8]| {
        let mut p = Vec::new();
        rmp::encode::write_array_len(&mut p, 3).unwrap();
        rmp::encode::write_array_len(&mut p, shape.len() as u32).unwrap();
        for d in shape {
            rmp::encode::write_uint(&mut p, *d as u64).unwrap();
        }
        rmp::encode::write_str(&mut p, dtype).unwrap();
        rmp::encode::write_bin(&mut p, data).unwrap();
        p
    };
    let good = payload(&[2], "float32", &[0; 8]);
    assert!(flax::visit_reader(&ext_doc(&good, 1)[..], Path::new("ok"), None, &mut |_| Ok(())).is_ok());
    let cases: Vec<(Vec<u8>, i8, &str)> = vec![
        (payload(&[3], "float32", &[0; 8]), 1, "needs"),
        (payload(&[2], "complex64", &[0; 16]), 1, "complex64"),
        (good.clone(), 7, "ext type 7"),
        (good.clone(), 2, "complex"),
        (vec![0x92, 0x90, 0xa1, b'x'], 1, "3-element"),
        ([&good[..], &[0u8]].concat(), 1, "ext says"),
    ];
    for (p, code, want) in cases {
        let err = read_err(&ext_doc(&p, code));
        assert!(err.contains("bad.msgpack") && err.contains(want), "want `{want}`: {err}");
    }
    // A string key where an array was expected, and a list leaf.
    let err = read_err(&[0x81, 0xa1, b'w', 0xa1, b'x']);
    assert!(err.contains("`w`") && err.contains("not an array"), "{err}");
}
