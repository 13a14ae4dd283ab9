//! Tokenizer folders written by `DalleBartTokenizer.save_pretrained`: every row of the
//! fixture's tokens.json (dalle-mini's `padding="max_length", truncation=True`) is reproduced
//! from `tokenizer.json`, and from `vocab.json` + `merges.txt` alone.

use dm_data::hf_tokenizer::text_tokenizer;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop/dallebart-hf")
}

fn check_every_row(dir: &Path) {
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("tokens.json")).unwrap()).unwrap();
    let max_length = tokens["max_length"].as_u64().unwrap() as usize;
    let tok = text_tokenizer(dir, max_length, false).unwrap();
    let captions = tokens["captions"].as_array().unwrap();
    assert_eq!(captions.len(), 10);
    for (i, caption) in captions.iter().enumerate() {
        let enc = tok.encode(caption.as_str().unwrap()).unwrap();
        let want: Vec<i32> =
            tokens["input_ids"][i].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
        let mask: Vec<i32> =
            tokens["attention_mask"][i].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
        assert_eq!(enc.input_ids, want, "{}: row {i} {caption}", dir.display());
        assert_eq!(enc.attention_mask, mask, "row {i}");
        // Without truncation: the unpadded ids.
        let long = text_tokenizer(dir, 200, false).unwrap().encode(caption.as_str().unwrap()).unwrap();
        let unpadded: Vec<i32> =
            tokens["unpadded_input_ids"][i].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
        assert_eq!(long.input_ids[..unpadded.len()], unpadded[..], "row {i} unpadded");
    }
}

#[test]
fn tokenizer_json_gives_dalle_minis_ids_on_every_row() {
    check_every_row(&fixture());
    check_every_row(&fixture().join("tokenizer.json"));
}

#[test]
fn vocab_and_merges_alone_give_the_same_ids() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), tmp.path().join(f)).unwrap();
    }
    check_every_row(tmp.path());
}

#[test]
fn a_folder_without_tokenizer_files_is_refused_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let err = text_tokenizer(tmp.path(), 16, false).unwrap_err().to_string();
    assert!(err.contains("vocab.json") && err.contains("--tokenizer"), "{err}");
}
