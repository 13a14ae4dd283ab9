//! dalle-mini's encoded datasets as parquet files (`tools/dataset/encode_dataset.ipynb`:
//! `pd.DataFrame({"caption": …, "encoding": …}).to_parquet(…)`): a string column of captions
//! (`string` or `large_string`) and a list column of codes (`list<int64>` or `list<int32>`),
//! names configurable as dalle-mini's `text_column` / `encoding_column`.
//!
//! * [`parquet_files`]: a file, a folder (its `*.parquet`, in name order) or a glob;
//! * [`ParquetFile::visit_rows`]: every row of a file, validated like JSONL rows (caption present and
//!   non-empty, exactly `image_length` codes in `0..image_vocab`), from a start row on;
//! * [`import_parquet`]: files → the memory-mapped dataset, with the same bad-row reporting
//!   as JSONL (the row number is 1-based within the file the error names).

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::error::{DataError, Result};
use crate::format::DatasetWriter;
use crate::import::{BadRow, BadRowReason, ImportOptions, ImportReport, MAX_BAD_ROWS_KEPT};

/// True if `path` names parquet input: a `.parquet` file, a folder holding some (and no
/// manifest.json), or a glob.
pub fn is_parquet_input(path: &Path) -> bool {
    let s = path.to_string_lossy();
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("parquet" | "pq"))
        || (path.is_dir() && !path.join("manifest.json").exists() && holds_parquet(path))
        || s.contains(['*', '?', '['])
}

fn holds_parquet(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| {
        entries.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x.eq_ignore_ascii_case("parquet"))))
    })
}

/// The parquet files `input` names, in name order: the file itself, a folder's `*.parquet`,
/// or the files a glob matches.
pub fn parquet_files(input: &Path) -> Result<Vec<PathBuf>> {
    let text = input.to_string_lossy();
    let mut files: Vec<PathBuf> = if input.is_file() {
        vec![input.to_path_buf()]
    } else if input.is_dir() {
        let entries = std::fs::read_dir(input).map_err(|e| DataError::io(input, e))?;
        let mut v = Vec::new();
        for entry in entries {
            let p = entry.map_err(|e| DataError::io(input, e))?.path();
            if p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
                v.push(p);
            }
        }
        v
    } else if text.contains(['*', '?', '[']) {
        let paths = glob::glob(&text)
            .map_err(|e| DataError::InvalidArgument(format!("{text}: not a valid glob pattern ({e})")))?;
        paths.filter_map(|p| p.ok()).filter(|p| p.is_file()).collect()
    } else {
        return Err(DataError::io(input, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    };
    files.sort();
    if files.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no .parquet files found (give a .parquet file, a folder holding them, or a glob like 'dir/*.parquet')",
            input.display()
        )));
    }
    Ok(files)
}

/// Column names of a dataset's parquet files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub caption: String,
    pub encoding: String,
}

impl Columns {
    pub fn of(opts: &ImportOptions) -> Self {
        Self { caption: opts.caption_field.clone(), encoding: opts.encoding_field.clone() }
    }
}

fn bad_file(path: &Path, msg: impl std::fmt::Display) -> DataError {
    DataError::Corrupt { path: path.to_path_buf(), msg: msg.to_string() }
}

/// An open parquet file and the leaf columns of its caption and codes.
pub struct ParquetFile {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    caption_leaf: usize,
    encoding_leaf: usize,
}

impl ParquetFile {
    /// Opens `path` and checks both columns exist and have a readable type.
    pub fn open(path: &Path, columns: &Columns) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| bad_file(path, format!("not a readable parquet file ({e}); is it truncated?")))?;
        let schema = reader.metadata().file_metadata().schema_descr();
        let names: Vec<&str> = schema.root_schema().get_fields().iter().map(|f| f.name()).collect();
        let leaf = |name: &str, what: &str, flag: &str| {
            let leaves: Vec<usize> =
                (0..schema.num_columns()).filter(|&i| schema.column(i).path().parts()[0] == name).collect();
            match leaves[..] {
                [i] => Ok(i),
                [] => Err(DataError::InvalidArgument(format!(
                    "{}: no `{name}` column ({what}); the file has {names:?}: pass {flag} NAME to use another column",
                    path.display()
                ))),
                _ => Err(bad_file(path, format!("column `{name}` is a nested group, not {what}"))),
            }
        };
        let caption_leaf = leaf(&columns.caption, "captions", "--caption-column")?;
        let encoding_leaf = leaf(&columns.encoding, "VQGAN codes", "--encoding-column")?;
        let (c, e) = (schema.column(caption_leaf), schema.column(encoding_leaf));
        if c.physical_type() != PhysicalType::BYTE_ARRAY || c.max_rep_level() != 0 {
            return Err(bad_file(path, format!("column `{}` is not a string column", columns.caption)));
        }
        if !matches!(e.physical_type(), PhysicalType::INT64 | PhysicalType::INT32) || e.max_rep_level() != 1 {
            return Err(bad_file(
                path,
                format!(
                    "column `{}` is not a list of int64 or int32 (found {:?})",
                    columns.encoding,
                    e.physical_type()
                ),
            ));
        }
        Ok(Self { path: path.to_path_buf(), reader, caption_leaf, encoding_leaf })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows in the file (from its metadata).
    pub fn rows(&self) -> u64 {
        self.reader.metadata().file_metadata().num_rows().max(0) as u64
    }

    /// Rows of each row group, in file order.
    pub fn row_groups(&self) -> Vec<u64> {
        self.reader.metadata().row_groups().iter().map(|g| g.num_rows().max(0) as u64).collect()
    }

    /// Calls `f(row_index, row)` for every row from `start` (0-based) on, in file order; whole
    /// row groups before `start` are skipped unread. `f` returns false to stop.
    pub fn visit_rows(&self, start: u64, opts: &ImportOptions, f: &mut RowVisitor<'_>) -> Result<()> {
        let mut first = 0u64;
        for (g, n) in self.row_groups().into_iter().enumerate() {
            if first + n > start && !self.visit_group(g, first, start, opts, f)? {
                return Ok(());
            }
            first += n;
        }
        Ok(())
    }

    /// Visits row group `g` (whose first row is `first`) from row `start` on; false if `f` stopped.
    /// Both columns are decoded whole (column readers, not per-value records).
    pub fn visit_group(
        &self,
        g: usize,
        first: u64,
        start: u64,
        opts: &ImportOptions,
        f: &mut RowVisitor<'_>,
    ) -> Result<bool> {
        let err = |e: parquet::errors::ParquetError| bad_file(&self.path, format!("row group {g}: {e}"));
        let group = self.reader.get_row_group(g).map_err(err)?;
        let n = group.metadata().num_rows().max(0) as usize;
        let captions = match group.get_column_reader(self.caption_leaf).map_err(err)? {
            ColumnReader::ByteArrayColumnReader(mut r) => {
                let (mut def, mut values) = (Vec::new(), Vec::new());
                r.read_records(n, Some(&mut def), None, &mut values).map_err(err)?;
                let optional = self.descr(self.caption_leaf).max_def_level() > 0;
                rows_of_strings(n, optional, &def, values)
            }
            _ => return Err(bad_file(&self.path, "the caption column is not a string column")),
        };
        let codes = match group.get_column_reader(self.encoding_leaf).map_err(err)? {
            ColumnReader::Int64ColumnReader(mut r) => {
                let (mut def, mut rep, mut values) = (Vec::new(), Vec::new(), Vec::new());
                r.read_records(n, Some(&mut def), Some(&mut rep), &mut values).map_err(err)?;
                self.rows_of_lists(n, &def, &rep, &values)
            }
            ColumnReader::Int32ColumnReader(mut r) => {
                let (mut def, mut rep, mut values) = (Vec::new(), Vec::new(), Vec::new());
                r.read_records(n, Some(&mut def), Some(&mut rep), &mut values).map_err(err)?;
                let values: Vec<i64> = values.into_iter().map(i64::from).collect();
                self.rows_of_lists(n, &def, &rep, &values)
            }
            _ => return Err(bad_file(&self.path, "the encoding column is not a list of integers")),
        };
        if captions.len() != n || codes.len() != n {
            return Err(bad_file(&self.path, format!("row group {g} holds {n} rows but its columns disagree")));
        }
        for (i, (caption, list)) in captions.into_iter().zip(codes).enumerate() {
            let index = first + i as u64;
            if index >= start && !f(index, parse_row(caption, list, opts))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn descr(&self, leaf: usize) -> parquet::schema::types::ColumnDescPtr {
        self.reader.metadata().file_metadata().schema_descr().column(leaf)
    }

    /// Splits a list column's levels into rows: Some(codes) per row (a null element is an
    /// `Err(position)`), None for a null list.
    fn rows_of_lists(&self, n: usize, def: &[i16], rep: &[i16], values: &[i64]) -> Vec<ListCell> {
        let d = self.descr(self.encoding_leaf);
        let max_def = d.max_def_level();
        let element_optional = d.self_type().is_optional();
        let mut rows: Vec<ListCell> = Vec::with_capacity(n);
        let mut next_value = 0usize;
        for (k, &level) in def.iter().enumerate() {
            if rep.get(k).copied().unwrap_or(0) == 0 {
                rows.push(ListCell::Empty);
            }
            let Some(row) = rows.last_mut() else { continue };
            if level == max_def {
                let v = values.get(next_value).copied().unwrap_or(0);
                next_value += 1;
                match row {
                    ListCell::Codes(c) => c.push(v),
                    ListCell::Empty => *row = ListCell::Codes(vec![v]),
                    ListCell::NullElement(_) => {}
                }
            } else if element_optional && level == max_def - 1 {
                let position = match row {
                    ListCell::Codes(c) => c.len(),
                    _ => 0,
                };
                if !matches!(row, ListCell::NullElement(_)) {
                    *row = ListCell::NullElement(position);
                }
            }
        }
        rows
    }
}

/// One row's codes as the list column holds them.
enum ListCell {
    /// No codes: an empty or null list.
    Empty,
    Codes(Vec<i64>),
    /// A null code at this position.
    NullElement(usize),
}

/// A string column's rows: Some(bytes) or None where null.
fn rows_of_strings(n: usize, optional: bool, def: &[i16], values: Vec<ByteArray>) -> Vec<Option<ByteArray>> {
    if !optional {
        return values.into_iter().map(Some).collect();
    }
    let mut values = values.into_iter();
    def.iter().take(n).map(|&d| if d > 0 { values.next() } else { None }).collect()
}

/// A validated row (caption, codes) or why it is bad.
pub type ParsedRow = std::result::Result<(String, Vec<u32>), BadRowReason>;

/// Called with each row's 0-based index in its file; returns false to stop.
pub type RowVisitor<'a> = dyn FnMut(u64, ParsedRow) -> Result<bool> + 'a;

fn parse_row(caption: Option<ByteArray>, codes: ListCell, opts: &ImportOptions) -> ParsedRow {
    let caption = match caption {
        None => return Err(BadRowReason::MissingField(opts.caption_field.clone())),
        Some(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => s.to_string(),
            Err(e) => return Err(BadRowReason::InvalidUtf8 { byte_offset: e.valid_up_to() }),
        },
    };
    if caption.trim().is_empty() {
        return Err(BadRowReason::EmptyCaption);
    }
    let list = match codes {
        ListCell::Empty => Vec::new(),
        ListCell::Codes(c) => c,
        ListCell::NullElement(position) => {
            return Err(BadRowReason::CodeNotInteger { position, value: "null".into() });
        }
    };
    if opts.image_length != 0 && list.len() != opts.image_length {
        return Err(BadRowReason::WrongLength { expected: opts.image_length, actual: list.len() });
    }
    let mut out = Vec::with_capacity(list.len());
    for (position, code) in list.into_iter().enumerate() {
        if !(0..opts.image_vocab as i64).contains(&code) {
            return Err(BadRowReason::CodeOutOfRange {
                position,
                code: code.to_string(),
                image_vocab: opts.image_vocab,
            });
        }
        out.push(code as u32);
    }
    Ok(out).map(|codes| (caption, codes))
}

/// Imports parquet files (a file, folder or glob, see [`parquet_files`]) into a dataset at
/// `out_dir`. Without `skip_bad`, the first file with bad rows fails the import, listing them
/// (row numbers 1-based within that file) and nothing is written.
pub fn import_parquet(input: &Path, out_dir: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    if opts.image_length == 0 || opts.image_vocab == 0 {
        return Err(DataError::InvalidArgument("image_length and image_vocab must be > 0".into()));
    }
    let files = parquet_files(input)?;
    let columns = Columns::of(opts);
    let opened: Vec<ParquetFile> = files.iter().map(|f| ParquetFile::open(f, &columns)).collect::<Result<_>>()?;
    let mut writer = DatasetWriter::create(out_dir, opts.image_length, opts.image_vocab)?;
    writer.set_source(format!("import_parquet {}", input.display()));
    let (mut rows_read, mut skipped, mut kept) = (0u64, 0u64, Vec::new());
    for file in &opened {
        let mut bad = Vec::new();
        let mut bad_count = 0usize;
        file.visit_rows(0, opts, &mut |i, row| {
            rows_read += 1;
            match row {
                Ok((caption, codes)) if bad_count == 0 || opts.skip_bad => writer.push(&caption, &codes)?,
                Ok(_) => {}
                Err(reason) => {
                    bad_count += 1;
                    if bad.len() < MAX_BAD_ROWS_KEPT {
                        bad.push(BadRow { line: i + 1, reason });
                    }
                }
            }
            Ok(true)
        })?;
        if bad_count > 0 && !opts.skip_bad {
            return Err(DataError::BadRows { path: file.path().to_path_buf(), count: bad_count, shown: bad });
        }
        if bad_count > 0 {
            tracing::warn!(
                "{}: skipped {bad_count} bad row(s); first: row {}: {}",
                file.path().display(),
                bad[0].line,
                bad[0].reason
            );
        }
        skipped += bad_count as u64;
        kept.extend(bad.into_iter().take(MAX_BAD_ROWS_KEPT.saturating_sub(kept.len())));
    }
    let rows_written = writer.rows();
    let manifest = writer.finish()?;
    Ok(ImportReport {
        rows_written,
        lines_read: rows_read,
        blank_lines: 0,
        rows_skipped: skipped,
        bad_rows: kept,
        manifest,
    })
}

/// What `dalle-mesh data info` prints: rows, codes per row, vocabulary and the codes hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DataInfo {
    pub rows: u64,
    pub image_length: usize,
    /// The dataset's declared vocabulary (imported datasets), or max code + 1 (parquet, which
    /// declares none).
    pub image_vocab: u32,
    /// SHA-256 (hex) of every code as little-endian u16, rows in file order, files in name order.
    pub codes_sha256_u16le: String,
    pub files: usize,
}

/// Hashes codes as little-endian u16 (codes above 65535 cannot be, and are an error).
struct CodesHash {
    hasher: sha2::Sha256,
    buf: Vec<u8>,
    max: u32,
}

impl CodesHash {
    fn new() -> Self {
        Self { hasher: sha2::Digest::new(), buf: Vec::new(), max: 0 }
    }
    fn push(&mut self, path: &Path, codes: impl Iterator<Item = u32>) -> Result<()> {
        self.buf.clear();
        for c in codes {
            let c16 = u16::try_from(c).map_err(|_| {
                DataError::InvalidArgument(format!(
                    "{}: code {c} does not fit in u16 for codes_sha256_u16le",
                    path.display()
                ))
            })?;
            self.max = self.max.max(c);
            self.buf.extend_from_slice(&c16.to_le_bytes());
        }
        sha2::Digest::update(&mut self.hasher, &self.buf);
        Ok(())
    }
    fn hex(self) -> String {
        sha2::Digest::finalize(self.hasher).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// [`DataInfo`] of an imported dataset folder, or of parquet input (file, folder or glob; the
/// code range is not checked there beyond u16, and rows must all have the same length).
pub fn data_info(input: &Path, caption_column: &str, encoding_column: &str) -> Result<DataInfo> {
    let mut hash = CodesHash::new();
    if input.join("manifest.json").is_file() {
        let ds = crate::format::Dataset::open(input)?;
        for i in 0..ds.len() {
            hash.push(input, ds.codes(i)?.iter())?;
        }
        let (rows, image_length, image_vocab) = (ds.len() as u64, ds.image_length(), ds.image_vocab());
        return Ok(DataInfo { rows, image_length, image_vocab, codes_sha256_u16le: hash.hex(), files: 1 });
    }
    let files = parquet_files(input)?;
    let columns = Columns { caption: caption_column.into(), encoding: encoding_column.into() };
    // image_length 0: any length is read; every row must then match the first.
    let opts = ImportOptions {
        image_length: 0,
        image_vocab: u32::MAX,
        caption_field: columns.caption.clone(),
        encoding_field: columns.encoding.clone(),
        ..ImportOptions::default()
    };
    let mut image_length: Option<usize> = None;
    let mut rows = 0u64;
    for path in &files {
        let file = ParquetFile::open(path, &columns)?;
        file.visit_rows(0, &opts, &mut |i, row| {
            let bad = |reason| DataError::BadRows {
                path: path.clone(),
                count: 1,
                shown: vec![BadRow { line: i + 1, reason }],
            };
            let codes = row.map_err(bad)?;
            let expected = *image_length.get_or_insert(codes.1.len());
            if codes.1.len() != expected {
                return Err(bad(BadRowReason::WrongLength { expected, actual: codes.1.len() }));
            }
            hash.push(path, codes.1.into_iter())?;
            rows += 1;
            Ok(true)
        })?;
    }
    Ok(DataInfo {
        rows,
        image_length: image_length.unwrap_or(0),
        image_vocab: if rows == 0 { 0 } else { hash.max + 1 },
        codes_sha256_u16le: hash.hex(),
        files: files.len(),
    })
}
