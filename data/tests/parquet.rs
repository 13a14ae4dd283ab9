//! dalle-mini's parquet datasets (tests/fixtures/interop/parquet, written by pandas/pyarrow):
//! identical rows and codes hash on import and on `data info`, file/folder/glob inputs, and the
//! errors bad input gets.

use dm_data::import::BadRowReason;
use dm_data::parquet::{data_info, import_parquet, parquet_files, ParquetFile};
use dm_data::{DataError, Dataset, ImportOptions};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop/parquet")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

fn opts() -> ImportOptions {
    ImportOptions::new(256, 16384)
}

#[test]
fn import_gives_every_row_and_the_codes_hash_of_pandas() {
    let want = expected();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    let report = import_parquet(&fixture(), &out, &opts()).unwrap();
    assert_eq!(report.rows_written, want["total_rows"].as_u64().unwrap());
    let ds = Dataset::open(&out).unwrap();
    let mut row = 0;
    for file in want["files"].as_array().unwrap() {
        for caption in file["captions"].as_array().unwrap() {
            assert_eq!(ds.caption(row).unwrap(), caption.as_str().unwrap(), "row {row}");
            row += 1;
        }
    }
    assert_eq!(row, ds.len());
    assert_eq!(ds.codes(0).unwrap().to_vec()[..3], [0, 16383, 1]);
    let hash = want["codes_sha256_u16le_all_files"].as_str().unwrap();
    let info = data_info(&out, "caption", "encoding").unwrap();
    assert_eq!((info.rows, info.image_length, info.image_vocab), (65, 256, 16384));
    assert_eq!(info.codes_sha256_u16le, hash);
    let direct = data_info(&fixture(), "caption", "encoding").unwrap();
    assert_eq!(direct.codes_sha256_u16le, hash);
    assert_eq!((direct.rows, direct.image_length, direct.image_vocab, direct.files), (65, 256, 16384, 2));
}

#[test]
fn files_folders_and_globs_select_the_same_files_in_name_order() {
    let want = expected();
    let folder = parquet_files(&fixture()).unwrap();
    let glob = parquet_files(&fixture().join("*.parquet")).unwrap();
    assert_eq!(folder, glob);
    assert_eq!(folder.len(), 2);
    for (i, file) in want["files"].as_array().unwrap().iter().enumerate() {
        let path = fixture().join(file["name"].as_str().unwrap());
        assert_eq!(folder[i], path);
        let info = data_info(&path, "caption", "encoding").unwrap();
        assert_eq!(info.rows, file["rows"].as_u64().unwrap());
        assert_eq!(info.codes_sha256_u16le, file["codes_sha256_u16le"].as_str().unwrap());
    }
    let tmp = tempfile::tempdir().unwrap();
    let err = parquet_files(&tmp.path().join("*.parquet")).unwrap_err().to_string();
    assert!(err.contains("no .parquet files"), "{err}");
}

#[test]
fn rows_stream_from_any_start_row() {
    let file = ParquetFile::open(&fixture().join("000.parquet"), &dm_data::parquet::Columns::of(&opts())).unwrap();
    assert_eq!(file.rows(), 40);
    let mut all = Vec::new();
    file.visit_rows(0, &opts(), &mut |i, r| {
        all.push((i, r.unwrap()));
        Ok(true)
    })
    .unwrap();
    let mut tail = Vec::new();
    file.visit_rows(37, &opts(), &mut |i, r| {
        tail.push((i, r.unwrap()));
        Ok(true)
    })
    .unwrap();
    assert_eq!(tail, all[37..]);
}

#[test]
fn a_missing_encoding_column_names_the_file_the_column_and_the_flag() {
    let o = ImportOptions { encoding_field: "codes".into(), ..opts() };
    let tmp = tempfile::tempdir().unwrap();
    let err = import_parquet(&fixture(), &tmp.path().join("ds"), &o).unwrap_err().to_string();
    assert!(err.contains("000.parquet") && err.contains("`codes`") && err.contains("--encoding-column"), "{err}");
    assert!(!tmp.path().join("ds").exists());
}

#[test]
fn codes_out_of_range_and_wrong_lengths_are_bad_rows_of_the_named_file() {
    let tmp = tempfile::tempdir().unwrap();
    // Row 1 of each file holds code 16383: outside a 16383-code vocabulary.
    let err = import_parquet(&fixture(), &tmp.path().join("ds"), &ImportOptions::new(256, 16383)).unwrap_err();
    let DataError::BadRows { path, shown, .. } = &err else { panic!("{err:?}") };
    assert!(path.ends_with("000.parquet"));
    assert_eq!(shown[0].line, 1);
    assert!(matches!(&shown[0].reason, BadRowReason::CodeOutOfRange { position: 1, .. }), "{:?}", shown[0]);
    assert!(err.to_string().contains("000.parquet"), "{err}");
    let err = import_parquet(&fixture(), &tmp.path().join("ds"), &ImportOptions::new(255, 16384)).unwrap_err();
    let DataError::BadRows { count, shown, .. } = &err else { panic!("{err:?}") };
    assert_eq!(*count, 40);
    assert!(matches!(shown[0].reason, BadRowReason::WrongLength { expected: 255, actual: 256 }));
    // skip_bad keeps the good rows (none here) and reports the count.
    let o = ImportOptions { skip_bad: true, ..ImportOptions::new(256, 16383) };
    let report = import_parquet(&fixture(), &tmp.path().join("ds2"), &o).unwrap();
    assert_eq!(report.rows_written + report.rows_skipped, 65);
    assert!(report.rows_skipped >= 2);
}

#[test]
fn a_truncated_parquet_file_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture().join("001.parquet")).unwrap();
    let cut = tmp.path().join("cut.parquet");
    for len in [0, 8, bytes.len() / 2, bytes.len() - 3] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let err = import_parquet(&cut, &tmp.path().join("ds"), &opts()).unwrap_err().to_string();
        assert!(err.contains("cut.parquet"), "len {len}: {err}");
    }
}
