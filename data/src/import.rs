//! Importing dalle-mini's encoded datasets into the on-disk format of [`crate::format`].
//!
//! dalle-mini's encoded datasets hold one row per image: a `caption` string and an `encoding`
//! (the VQGAN codes, `image_length` integers). [`import_jsonl`] reads them as JSON Lines, one
//! object per line (extra keys are ignored; blank lines are skipped). Parquet files, folders
//! and globs go to [`crate::parquet::import_parquet`].

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{DataError, Result};
use crate::format::{DatasetWriter, Manifest};

/// How many bad rows an [`ImportReport`] or [`DataError::BadRows`] keeps in detail.
pub const MAX_BAD_ROWS_KEPT: usize = 100;

/// Options of [`import_jsonl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// Codes per image; every row's encoding must have exactly this many.
    pub image_length: usize,
    /// Codes must be in `0..image_vocab`.
    pub image_vocab: u32,
    /// Skip bad rows (and report them) instead of failing the import.
    pub skip_bad: bool,
    /// JSON key of the caption (dalle-mini's `text_column`, default `caption`).
    pub caption_field: String,
    /// JSON key of the codes (dalle-mini's `encoding_column`, default `encoding`).
    pub encoding_field: String,
}

impl Default for ImportOptions {
    /// dalle-mini's defaults: 256 codes per image (16×16 VQGAN f16), vocabulary 16384.
    fn default() -> Self {
        ImportOptions {
            image_length: 256,
            image_vocab: 16384,
            skip_bad: false,
            caption_field: "caption".into(),
            encoding_field: "encoding".into(),
        }
    }
}

impl ImportOptions {
    pub fn new(image_length: usize, image_vocab: u32) -> Self {
        ImportOptions { image_length, image_vocab, ..Default::default() }
    }
}

/// Why an input line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum BadRowReason {
    /// The line is not valid UTF-8 (byte offset of the first bad byte within the line).
    InvalidUtf8 { byte_offset: usize },
    /// The line is not valid JSON.
    MalformedJson(String),
    /// The line is JSON but not an object.
    NotAnObject,
    /// A required key is absent.
    MissingField(String),
    /// The caption is not a string.
    CaptionNotString,
    /// The caption is empty or only whitespace.
    EmptyCaption,
    /// The encoding is not an array.
    EncodingNotArray,
    /// The encoding has the wrong number of codes.
    WrongLength { expected: usize, actual: usize },
    /// A code is not an integer.
    CodeNotInteger { position: usize, value: String },
    /// A code is negative or `≥ image_vocab`.
    CodeOutOfRange { position: usize, code: String, image_vocab: u32 },
}

impl std::fmt::Display for BadRowReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use BadRowReason::*;
        match self {
            InvalidUtf8 { byte_offset } => {
                write!(f, "invalid UTF-8 (at byte {byte_offset} of the line)")
            }
            MalformedJson(e) => write!(f, "malformed JSON: {e}"),
            NotAnObject => write!(f, "not a JSON object"),
            MissingField(k) => write!(f, "missing field {k:?}"),
            CaptionNotString => write!(f, "caption is not a string"),
            EmptyCaption => write!(f, "empty caption"),
            EncodingNotArray => write!(f, "encoding is not an array"),
            WrongLength { expected, actual } => {
                write!(f, "encoding has {actual} codes, expected image_length {expected}")
            }
            CodeNotInteger { position, value } => {
                write!(f, "code at position {position} is not an integer: {value}")
            }
            CodeOutOfRange { position, code, image_vocab } => {
                write!(f, "code {code} at position {position} is outside 0..{image_vocab} (image_vocab)")
            }
        }
    }
}

/// A rejected input line (1-based line number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRow {
    pub line: u64,
    pub reason: BadRowReason,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Rows in the written dataset.
    pub rows_written: u64,
    /// Lines read from the input (including blank and bad ones).
    pub lines_read: u64,
    /// Blank lines, ignored.
    pub blank_lines: u64,
    /// Bad rows skipped (only non-zero with `skip_bad`).
    pub rows_skipped: u64,
    /// The first [`MAX_BAD_ROWS_KEPT`] bad rows.
    pub bad_rows: Vec<BadRow>,
    /// The written dataset's manifest.
    pub manifest: Manifest,
}

/// Imports `input`: parquet (a `.parquet` file, a folder of them or a glob) goes to
/// [`crate::parquet::import_parquet`], anything else (`.jsonl`, `.json`, `.ndjson`) to
/// [`import_jsonl`].
pub fn import(input: impl AsRef<Path>, out_dir: impl AsRef<Path>, opts: &ImportOptions) -> Result<ImportReport> {
    let input = input.as_ref();
    if crate::parquet::is_parquet_input(input) {
        return crate::parquet::import_parquet(input, out_dir.as_ref(), opts);
    }
    import_jsonl(input, out_dir, opts)
}

/// Validates one line; `Ok((caption, codes))` for a good row.
fn parse_line(raw: &[u8], opts: &ImportOptions) -> std::result::Result<(String, Vec<u32>), BadRowReason> {
    let text = std::str::from_utf8(raw).map_err(|e| BadRowReason::InvalidUtf8 { byte_offset: e.valid_up_to() })?;
    let value: Value = serde_json::from_str(text).map_err(|e| BadRowReason::MalformedJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(BadRowReason::NotAnObject);
    };
    let caption = match obj.remove(&opts.caption_field) {
        None => return Err(BadRowReason::MissingField(opts.caption_field.clone())),
        Some(Value::String(s)) => s,
        Some(_) => return Err(BadRowReason::CaptionNotString),
    };
    if caption.trim().is_empty() {
        return Err(BadRowReason::EmptyCaption);
    }
    let encoding = match obj.get(&opts.encoding_field) {
        None => return Err(BadRowReason::MissingField(opts.encoding_field.clone())),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(BadRowReason::EncodingNotArray),
    };
    if encoding.len() != opts.image_length {
        return Err(BadRowReason::WrongLength { expected: opts.image_length, actual: encoding.len() });
    }
    let mut codes = Vec::with_capacity(encoding.len());
    for (position, v) in encoding.iter().enumerate() {
        let Value::Number(n) = v else {
            return Err(BadRowReason::CodeNotInteger { position, value: v.to_string() });
        };
        let out_of_range =
            || BadRowReason::CodeOutOfRange { position, code: n.to_string(), image_vocab: opts.image_vocab };
        if let Some(c) = n.as_u64() {
            if c >= opts.image_vocab as u64 {
                return Err(out_of_range());
            }
            codes.push(c as u32);
        } else if n.as_i64().is_some() {
            return Err(out_of_range()); // negative
        } else {
            return Err(BadRowReason::CodeNotInteger { position, value: n.to_string() });
        }
    }
    Ok((caption, codes))
}

/// Imports dalle-mini's encoded JSONL (`{"caption": str, "encoding": [int; image_length]}` per
/// line) into a dataset folder at `out_dir`.
///
/// Bad rows (malformed JSON, invalid UTF-8, missing/empty caption, wrong-length encoding,
/// codes negative or `≥ image_vocab`) are collected with their 1-based line numbers. Without
/// `skip_bad` any bad row fails the import with [`DataError::BadRows`] and nothing is written;
/// with it they are skipped and counted in the report.
pub fn import_jsonl(input: impl AsRef<Path>, out_dir: impl AsRef<Path>, opts: &ImportOptions) -> Result<ImportReport> {
    let input: PathBuf = input.as_ref().to_path_buf();
    if opts.image_length == 0 || opts.image_vocab == 0 {
        return Err(DataError::InvalidArgument("image_length and image_vocab must be > 0".into()));
    }
    if input.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        return crate::parquet::import_parquet(&input, out_dir.as_ref(), opts);
    }
    let file = File::open(&input).map_err(|e| DataError::io(&input, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut writer = DatasetWriter::create(out_dir, opts.image_length, opts.image_vocab)?;
    writer.set_source(format!("import_jsonl {}", input.display()));

    let mut line_buf = Vec::new();
    let mut lines_read = 0u64;
    let mut blank_lines = 0u64;
    let mut bad_count = 0u64;
    let mut bad_rows = Vec::new();
    loop {
        line_buf.clear();
        let n = reader.read_until(b'\n', &mut line_buf).map_err(|e| DataError::io(&input, e))?;
        if n == 0 {
            break;
        }
        lines_read += 1;
        let mut line: &[u8] = &line_buf;
        if lines_read == 1 {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line); // UTF-8 byte order mark
        }
        while let Some((&last, rest)) = line.split_last() {
            if last == b'\n' || last == b'\r' {
                line = rest;
            } else {
                break;
            }
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            blank_lines += 1;
            continue;
        }
        match parse_line(line, opts) {
            Ok((caption, codes)) => {
                // Once a bad row is seen without skip_bad, the output is discarded anyway:
                // keep scanning only to report every problem.
                if opts.skip_bad || bad_count == 0 {
                    writer.push(&caption, &codes)?;
                }
            }
            Err(reason) => {
                bad_count += 1;
                if bad_rows.len() < MAX_BAD_ROWS_KEPT {
                    bad_rows.push(BadRow { line: lines_read, reason });
                }
            }
        }
    }
    if bad_count > 0 && !opts.skip_bad {
        drop(writer); // deletes the temporary folder
        return Err(DataError::BadRows { path: input, count: bad_count as usize, shown: bad_rows });
    }
    if bad_count > 0 {
        tracing::warn!(
            "{}: skipped {bad_count} bad row(s); first: line {}: {}",
            input.display(),
            bad_rows[0].line,
            bad_rows[0].reason
        );
    }
    let rows_written = writer.rows();
    let manifest = writer.finish()?;
    Ok(ImportReport { rows_written, lines_read, blank_lines, rows_skipped: bad_count, bad_rows, manifest })
}
