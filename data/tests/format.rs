//! The on-disk format: writing, opening, validation, checksums.

use std::fs;
use std::path::Path;

use dm_data::format::{CodeDtype, Dataset, DatasetWriter, CAPTIONS_FILE, CODES_FILE, MANIFEST_FILE};
use dm_data::DataError;

fn write_small(dir: &Path, rows: usize, image_length: usize, vocab: u32) -> Vec<(String, Vec<u32>)> {
    let mut w = DatasetWriter::create(dir, image_length, vocab).unwrap();
    let mut data = Vec::new();
    for r in 0..rows {
        let caption = format!("caption número {r} ✓");
        let codes: Vec<u32> = (0..image_length).map(|j| ((r * 31 + j * 7) as u32) % vocab).collect();
        w.push(&caption, &codes).unwrap();
        data.push((caption, codes));
    }
    w.finish().unwrap();
    data
}

#[test]
fn roundtrip_u16() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let data = write_small(&dir, 20, 16, 16384);
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.len(), 20);
    assert_eq!(ds.image_length(), 16);
    assert_eq!(ds.code_dtype(), CodeDtype::U16);
    assert_eq!(fs::metadata(dir.join(CODES_FILE)).unwrap().len(), 20 * 16 * 2);
    for (i, (caption, codes)) in data.iter().enumerate() {
        let row = ds.row(i).unwrap();
        assert_eq!(row.caption, caption);
        assert_eq!(row.codes.to_vec(), *codes);
        assert_eq!(row.codes.len(), 16);
    }
    ds.verify_checksums().unwrap();
    let m = ds.manifest();
    assert_eq!(m.format_version, 1);
    assert_eq!(m.captions.min_chars, "caption número 0 ✓".chars().count() as u64);
    assert_eq!(m.captions.max_bytes, "caption número 19 ✓".len() as u64);
    assert!(ds.row(20).is_err());
    // No temporary folders left next to the dataset.
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ds")]);
}

#[test]
fn roundtrip_u32_for_large_vocab() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let mut w = DatasetWriter::create(&dir, 4, 70_000).unwrap();
    w.push("big codes", &[0, 65_535, 65_536, 69_999]).unwrap();
    let m = w.finish().unwrap();
    assert_eq!(m.code_dtype, CodeDtype::U32);
    let ds = Dataset::open(&dir).unwrap();
    assert_eq!(ds.codes(0).unwrap().to_vec(), vec![0, 65_535, 65_536, 69_999]);
    // 65536 still fits u16 codes (0..=65535).
    assert_eq!(CodeDtype::for_vocab(65_536), CodeDtype::U16);
    assert_eq!(CodeDtype::for_vocab(65_537), CodeDtype::U32);
}

#[test]
fn empty_dataset_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("empty");
    DatasetWriter::create(&dir, 16, 100).unwrap().finish().unwrap();
    let ds = Dataset::open(&dir).unwrap();
    assert!(ds.is_empty());
    ds.verify_checksums().unwrap();
}

#[test]
fn writer_rejects_bad_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::create(tmp.path().join("ds"), 4, 10).unwrap();
    assert!(w.push("short", &[1, 2, 3]).is_err());
    assert!(w.push("big", &[1, 2, 3, 10]).is_err());
    w.push("ok", &[1, 2, 3, 9]).unwrap();
    assert_eq!(w.rows(), 1);
}

#[test]
fn dropped_writer_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut w = DatasetWriter::create(tmp.path().join("ds"), 4, 10).unwrap();
        w.push("row", &[1, 2, 3, 4]).unwrap();
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn writer_replaces_dataset_but_not_other_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_small(&dir, 5, 4, 10);
    write_small(&dir, 3, 4, 10);
    assert_eq!(Dataset::open(&dir).unwrap().len(), 3);

    let other = tmp.path().join("precious");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("notes.txt"), "keep me").unwrap();
    let err = DatasetWriter::create(&other, 4, 10).unwrap_err();
    assert!(err.to_string().contains("refusing"), "{err}");
    assert_eq!(fs::read_to_string(other.join("notes.txt")).unwrap(), "keep me");
}

#[test]
fn truncated_codes_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_small(&dir, 10, 16, 1000);
    let path = dir.join(CODES_FILE);
    let full = fs::metadata(&path).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(full - 7).unwrap();
    drop(f);
    let err = Dataset::open(&dir).unwrap_err();
    match &err {
        DataError::SizeMismatch { path: p, expected, actual } => {
            assert_eq!(p, &path);
            assert_eq!(*expected, full);
            assert_eq!(*actual, full - 7);
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("codes.bin") && msg.contains(&full.to_string()) && msg.contains(&(full - 7).to_string()));
    assert!(msg.contains("re-import"), "{msg}");
}

#[test]
fn missing_file_and_missing_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_small(&dir, 3, 4, 10);
    fs::remove_file(dir.join(CAPTIONS_FILE)).unwrap();
    let err = Dataset::open(&dir).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("captions.bin"));

    let err = Dataset::open(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn manifest_inconsistent_with_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_small(&dir, 3, 4, 10);
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).unwrap().replace("\"rows\": 3", "\"rows\": 4");
    fs::write(&path, text).unwrap();
    let err = Dataset::open(&dir).unwrap_err();
    assert!(matches!(err, DataError::Manifest { .. }), "{err:?}");

    let text = fs::read_to_string(&path).unwrap().replace("\"format_version\": 1", "\"format_version\": 9");
    fs::write(&path, text).unwrap();
    assert!(Dataset::open(&dir).unwrap_err().to_string().contains("format_version 9"));
}

#[test]
fn checksum_mismatch_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_small(&dir, 10, 16, 1000);
    let path = dir.join(CODES_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[5] ^= 0x01; // same size, different content
    fs::write(&path, &bytes).unwrap();
    let ds = Dataset::open(&dir).unwrap(); // opening checks sizes only
    let err = ds.verify_checksums().unwrap_err();
    assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("codes.bin"), "{err}");
}

#[test]
fn corrupt_caption_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    write_small(&dir, 2, 4, 10);
    let path = dir.join(CAPTIONS_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] = 0xFF; // invalid UTF-8, same size
    fs::write(&path, &bytes).unwrap();
    let ds = Dataset::open(&dir).unwrap();
    let err = ds.caption(0).unwrap_err();
    assert!(matches!(err, DataError::Corrupt { .. }), "{err:?}");
    assert!(ds.caption(1).is_ok());
}
