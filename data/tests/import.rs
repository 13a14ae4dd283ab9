//! Importing dalle-mini's encoded JSONL, including bad inputs.

use std::fs;
use std::io::Write;
use std::path::Path;

use dm_data::import::{import, import_jsonl, BadRowReason, ImportOptions};
use dm_data::{DataError, Dataset};

fn row(caption: &str, codes: &[i64]) -> String {
    serde_json::json!({ "caption": caption, "encoding": codes, "key": "ignored" }).to_string()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut f = fs::File::create(path).unwrap();
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
}

fn opts(skip_bad: bool) -> ImportOptions {
    ImportOptions { image_length: 4, image_vocab: 100, skip_bad, ..Default::default() }
}

/// Lines 1, 3, 5, 10 are good; the rest are bad in different ways.
fn mixed_input(path: &Path) {
    let lines: Vec<Vec<u8>> = vec![
        row("a cat", &[1, 2, 3, 4]).into_bytes(),                              // 1 ok
        row("too short", &[1, 2, 3]).into_bytes(),                             // 2 wrong length
        row("Crème brûlée", &[0, 0, 99, 99]).into_bytes(),                     // 3 ok
        row("too big", &[1, 2, 3, 100]).into_bytes(),                          // 4 code >= vocab
        b"".to_vec(),                                                          // 5 blank: ignored
        row("a dog", &[5, 6, 7, 8]).into_bytes(),                              // 6 ok
        row("   ", &[1, 2, 3, 4]).into_bytes(),                                // 7 empty caption
        b"{\"caption\": \"broken\", \"encoding\": [1, 2".to_vec(),             // 8 malformed JSON
        b"{\"caption\": \"bad \xff utf8\", \"encoding\": [1,2,3,4]}".to_vec(), // 9 invalid UTF-8
        row("negative", &[1, -2, 3, 4]).into_bytes(),                          // 10 negative code
        b"{\"caption\": \"x\", \"encoding\": [1, 2.5, 3, 4]}".to_vec(),        // 11 non-integer
        b"{\"encoding\": [1, 2, 3, 4]}".to_vec(),                              // 12 missing caption
        b"[1, 2]".to_vec(),                                                    // 13 not an object
        format!("{}\r", row("a bird", &[9, 9, 9, 9])).into_bytes(),            // 14 ok (CRLF)
    ];
    write_lines(path, &lines);
}

#[test]
fn imports_good_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<Vec<u8>> =
        (0..50).map(|i| row(&format!("caption {i}"), &[i, i + 1, i + 2, 99]).into_bytes()).collect();
    write_lines(&input, &lines);
    let out = tmp.path().join("out");
    let report = import_jsonl(&input, &out, &opts(false)).unwrap();
    assert_eq!(report.rows_written, 50);
    assert_eq!(report.rows_skipped, 0);
    let ds = Dataset::open(&out).unwrap();
    ds.verify_checksums().unwrap();
    assert_eq!(ds.len(), 50);
    let r = ds.row(7).unwrap();
    assert_eq!(r.caption, "caption 7");
    assert_eq!(r.codes.to_vec(), vec![7, 8, 9, 99]);
    assert!(ds.manifest().source.as_deref().unwrap().contains("in.jsonl"));
}

#[test]
fn bad_rows_fail_the_import_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    mixed_input(&input);
    let out = tmp.path().join("out");
    let err = import_jsonl(&input, &out, &opts(false)).unwrap_err();
    let DataError::BadRows { count, shown, .. } = &err else {
        panic!("expected BadRows, got {err:?}");
    };
    assert_eq!(*count, 9);
    let lines: Vec<u64> = shown.iter().map(|b| b.line).collect();
    assert_eq!(lines, vec![2, 4, 7, 8, 9, 10, 11, 12, 13]);
    assert_eq!(shown[0].reason, BadRowReason::WrongLength { expected: 4, actual: 3 });
    assert!(matches!(shown[1].reason, BadRowReason::CodeOutOfRange { position: 3, .. }));
    assert_eq!(shown[2].reason, BadRowReason::EmptyCaption);
    assert!(matches!(shown[3].reason, BadRowReason::MalformedJson(_)));
    assert!(matches!(shown[4].reason, BadRowReason::InvalidUtf8 { .. }));
    assert!(matches!(shown[5].reason, BadRowReason::CodeOutOfRange { position: 1, .. }));
    assert!(matches!(shown[6].reason, BadRowReason::CodeNotInteger { position: 1, .. }));
    assert_eq!(shown[7].reason, BadRowReason::MissingField("caption".into()));
    assert_eq!(shown[8].reason, BadRowReason::NotAnObject);
    let msg = err.to_string();
    assert!(msg.contains("9 bad rows") && msg.contains("line 2:") && msg.contains("skip_bad"), "{msg}");
    assert!(!out.exists());
    // Only the input is left: no temporary folder.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn skip_bad_skips_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    mixed_input(&input);
    let out = tmp.path().join("out");
    let report = import_jsonl(&input, &out, &opts(true)).unwrap();
    assert_eq!(report.rows_written, 4);
    assert_eq!(report.rows_skipped, 9);
    assert_eq!(report.blank_lines, 1);
    assert_eq!(report.lines_read, 14);
    assert_eq!(report.bad_rows.len(), 9);
    let ds = Dataset::open(&out).unwrap();
    let captions: Vec<&str> = (0..ds.len()).map(|i| ds.caption(i).unwrap()).collect();
    assert_eq!(captions, vec!["a cat", "Crème brûlée", "a dog", "a bird"]);
    assert_eq!(ds.codes(1).unwrap().to_vec(), vec![0, 0, 99, 99]);
}

#[test]
fn error_lists_at_most_ten_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<Vec<u8>> = (0..25).map(|_| b"not json".to_vec()).collect();
    write_lines(&input, &lines);
    let err = import_jsonl(&input, tmp.path().join("out"), &opts(false)).unwrap_err();
    let msg = err.to_string();
    assert_eq!(msg.matches("malformed JSON").count(), 10, "{msg}");
    assert!(msg.contains("25 bad rows") && msg.contains("and 15 more"), "{msg}");
}

#[test]
fn custom_field_names() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    write_lines(&input, &[br#"{"text": "hello", "codes": [1, 2, 3, 4]}"#.to_vec()]);
    let o = ImportOptions { caption_field: "text".into(), encoding_field: "codes".into(), ..opts(false) };
    let report = import_jsonl(&input, tmp.path().join("out"), &o).unwrap();
    assert_eq!(report.rows_written, 1);
}

#[test]
fn a_parquet_name_that_is_not_parquet_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("data.parquet");
    fs::write(&input, b"PAR1").unwrap();
    let err = import(&input, tmp.path().join("out"), &opts(false)).unwrap_err();
    assert!(matches!(err, DataError::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("data.parquet") && msg.contains("parquet file"), "{msg}");
}

#[test]
fn missing_input_is_an_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_jsonl(tmp.path().join("nope.jsonl"), tmp.path().join("out"), &opts(false)).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains("nope.jsonl"));
}
