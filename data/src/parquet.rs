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

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use crate::error::{DataError, Result};
use crate::format::DatasetWriter;
use crate::import::{BadRow, BadRowReason, ImportOptions, ImportReport, MAX_BAD_ROWS_KEPT};

/// True if `path` names parquet input: a `.parquet` file, a folder of them, or a glob.
pub fn is_parquet_input(path: &Path) -> bool {
    let s = path.to_string_lossy();
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("parquet" | "pq"))
        || (path.is_dir() && !path.join("manifest.json").exists())
        || s.contains(['*', '?', '['])
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

/// An open parquet file with the projection onto the two columns.
pub struct ParquetFile {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    projection: Type,
    caption_index: usize,
}

impl ParquetFile {
    /// Opens `path` and checks both columns exist.
    pub fn open(path: &Path, columns: &Columns) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| bad_file(path, format!("not a readable parquet file ({e}); is it truncated?")))?;
        let schema = reader.metadata().file_metadata().schema_descr().root_schema();
        let fields = schema.get_fields();
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        let find = |name: &str, what: &str, flag: &str| {
            fields.iter().position(|f| f.name() == name).ok_or_else(|| {
                DataError::InvalidArgument(format!(
                    "{}: no `{name}` column ({what}); the file has {names:?}: pass {flag} NAME to use another column",
                    path.display()
                ))
            })
        };
        let c = find(&columns.caption, "captions", "--caption-column")?;
        let e = find(&columns.encoding, "VQGAN codes", "--encoding-column")?;
        let projected =
            if c < e { vec![fields[c].clone(), fields[e].clone()] } else { vec![fields[e].clone(), fields[c].clone()] };
        let projection = Type::group_type_builder(schema.name())
            .with_fields(projected)
            .build()
            .map_err(|e| bad_file(path, format!("schema: {e}")))?;
        Ok(Self { path: path.to_path_buf(), reader, projection, caption_index: usize::from(c > e) })
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
    pub fn visit_group(
        &self,
        g: usize,
        first: u64,
        start: u64,
        opts: &ImportOptions,
        f: &mut RowVisitor<'_>,
    ) -> Result<bool> {
        let group = self.reader.get_row_group(g).map_err(|e| bad_file(&self.path, format!("row group {g}: {e}")))?;
        let rows = group
            .get_row_iter(Some(self.projection.clone()))
            .map_err(|e| bad_file(&self.path, format!("row group {g}: {e}")))?;
        for (i, row) in rows.enumerate() {
            let index = first + i as u64;
            if index < start {
                continue;
            }
            let row = row.map_err(|e| bad_file(&self.path, format!("row {}: {e}", index + 1)))?;
            let mut cols = row.get_column_iter().map(|(_, v)| v);
            let (a, b) = (cols.next(), cols.next());
            let (caption, encoding) = if self.caption_index == 0 { (a, b) } else { (b, a) };
            if !f(index, parse_row(caption, encoding, opts))? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A validated row (caption, codes) or why it is bad.
pub type ParsedRow = std::result::Result<(String, Vec<u32>), BadRowReason>;

/// Called with each row's 0-based index in its file; returns false to stop.
pub type RowVisitor<'a> = dyn FnMut(u64, ParsedRow) -> Result<bool> + 'a;

fn parse_row(caption: Option<&Field>, encoding: Option<&Field>, opts: &ImportOptions) -> ParsedRow {
    let caption = match caption {
        None | Some(Field::Null) => return Err(BadRowReason::MissingField(opts.caption_field.clone())),
        Some(Field::Str(s)) => s.clone(),
        Some(Field::Bytes(b)) => match std::str::from_utf8(b.data()) {
            Ok(s) => s.to_string(),
            Err(e) => return Err(BadRowReason::InvalidUtf8 { byte_offset: e.valid_up_to() }),
        },
        Some(_) => return Err(BadRowReason::CaptionNotString),
    };
    if caption.trim().is_empty() {
        return Err(BadRowReason::EmptyCaption);
    }
    let list = match encoding {
        None | Some(Field::Null) => return Err(BadRowReason::MissingField(opts.encoding_field.clone())),
        Some(Field::ListInternal(l)) => l.elements(),
        Some(_) => return Err(BadRowReason::EncodingNotArray),
    };
    if opts.image_length != 0 && list.len() != opts.image_length {
        return Err(BadRowReason::WrongLength { expected: opts.image_length, actual: list.len() });
    }
    let mut codes = Vec::with_capacity(list.len());
    for (position, v) in list.iter().enumerate() {
        let code: i128 = match v {
            Field::Long(x) => *x as i128,
            Field::Int(x) => *x as i128,
            Field::Short(x) => *x as i128,
            Field::UInt(x) => *x as i128,
            Field::ULong(x) => *x as i128,
            Field::UShort(x) => *x as i128,
            other => return Err(BadRowReason::CodeNotInteger { position, value: format!("{other}") }),
        };
        if !(0..opts.image_vocab as i128).contains(&code) {
            return Err(BadRowReason::CodeOutOfRange {
                position,
                code: code.to_string(),
                image_vocab: opts.image_vocab,
            });
        }
        codes.push(code as u32);
    }
    Ok((caption, codes))
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
