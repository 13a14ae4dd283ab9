//! The encoded dataset on disk: a folder holding
//!
//! | file | content |
//! | --- | --- |
//! | `manifest.json` | [`Manifest`]: format version, rows, image_length, image_vocab, code dtype, per-file sizes and CRC-32s, caption statistics |
//! | `codes.bin` | `rows × image_length` image codes, little-endian `u16` (while `image_vocab ≤ 65536`) or `u32` |
//! | `captions.bin` | the captions' UTF-8 bytes, concatenated with no separator |
//! | `captions.idx` | `rows + 1` little-endian `u64` byte offsets into `captions.bin`; row `i` is `[idx[i], idx[i+1])`, `idx[0] = 0`, `idx[rows] = len(captions.bin)` |
//!
//! [`Dataset::open`] memory-maps the three data files (nothing is read into memory up front)
//! and checks their sizes against the manifest; every row read checks its caption offsets, its
//! UTF-8 and that its codes are below `image_vocab` (cheap: only the rows a run reads);
//! [`Dataset::verify_checksums`] reads everything and checks the CRC-32s, and [`Dataset::verify`]
//! also checks every row (`dalle-mesh data verify`, or `data.verify: true` in a run config). [`DatasetWriter`] writes a new dataset into a temporary sibling folder
//! and renames it into place only when complete, so a reader never sees a half-written dataset.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Value of [`Manifest::format`].
pub const FORMAT_NAME: &str = "dalle-mesh-encoded";
/// Value of [`Manifest::format_version`] written by this crate (and the only one it reads).
pub const FORMAT_VERSION: u32 = 1;
/// File names inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const CODES_FILE: &str = "codes.bin";
pub const CAPTIONS_FILE: &str = "captions.bin";
pub const CAPTIONS_IDX_FILE: &str = "captions.idx";

/// Element type of `codes.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeDtype {
    U16,
    U32,
}

impl CodeDtype {
    /// `u16` while every code fits (`image_vocab ≤ 65536`), else `u32`.
    pub fn for_vocab(image_vocab: u32) -> Self {
        if image_vocab <= 1 << 16 {
            CodeDtype::U16
        } else {
            CodeDtype::U32
        }
    }

    /// Bytes per code.
    pub fn size(self) -> usize {
        match self {
            CodeDtype::U16 => 2,
            CodeDtype::U32 => 4,
        }
    }
}

/// Size and checksum of one data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Length in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE, as zlib's `crc32`) of the whole file.
    pub crc32: u32,
}

/// Statistics of the captions, in bytes of UTF-8 and in `char`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CaptionStats {
    pub total_bytes: u64,
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub mean_bytes: f64,
    pub min_chars: u64,
    pub max_chars: u64,
}

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] for datasets this crate writes.
    pub format_version: u32,
    /// Number of rows (caption + image codes pairs).
    pub rows: u64,
    /// Codes per image (e.g. 256 for a 16×16 VQGAN grid).
    pub image_length: usize,
    /// Number of distinct image codes: every code is `< image_vocab`.
    pub image_vocab: u32,
    /// Element type of `codes.bin`.
    pub code_dtype: CodeDtype,
    /// Per data file (`codes.bin`, `captions.bin`, `captions.idx`): size and CRC-32.
    pub files: BTreeMap<String, FileEntry>,
    /// Caption length statistics.
    pub captions: CaptionStats,
    /// Free-form note on where the rows came from (input path, generator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Manifest {
    fn file(&self, name: &str, manifest_path: &Path) -> Result<FileEntry> {
        self.files.get(name).copied().ok_or_else(|| DataError::Manifest {
            path: manifest_path.to_path_buf(),
            msg: format!("no entry for {name} in \"files\""),
        })
    }
}

/// A read-only mapping of one file; zero-length files are not mapped.
enum Bytes {
    Mapped(Mmap),
    Empty,
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Empty => &[],
        }
    }
}

fn map_file(path: &Path, expected: u64) -> Result<Bytes> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::MissingFile { path: path.to_path_buf() })
        }
        Err(e) => return Err(DataError::io(path, e)),
    };
    let actual = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    if actual != expected {
        return Err(DataError::SizeMismatch { path: path.to_path_buf(), expected, actual });
    }
    if actual == 0 {
        return Ok(Bytes::Empty);
    }
    // SAFETY: the file is opened read-only and the mapping is read-only. Dataset files are
    // written once by `DatasetWriter` (into a temporary folder that is renamed into place) and
    // never modified in place by this crate. The remaining hazard is another process truncating
    // or rewriting the file while it is mapped, which would make reads fault (SIGBUS) or change
    // under us; that is outside this crate's control and documented on `Dataset::open`.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
    if map.len() as u64 != expected {
        return Err(DataError::SizeMismatch { path: path.to_path_buf(), expected, actual: map.len() as u64 });
    }
    Ok(Bytes::Mapped(map))
}

/// The image codes of one row, viewed in place in the mapped `codes.bin`.
#[derive(Clone, Copy)]
pub struct CodesView<'a> {
    bytes: &'a [u8],
    dtype: CodeDtype,
}

impl<'a> CodesView<'a> {
    /// Number of codes (the dataset's `image_length`).
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Code `j`. Panics if `j >= len()`.
    pub fn get(&self, j: usize) -> u32 {
        match self.dtype {
            CodeDtype::U16 => u16::from_le_bytes([self.bytes[2 * j], self.bytes[2 * j + 1]]) as u32,
            CodeDtype::U32 => {
                let b = &self.bytes[4 * j..4 * j + 4];
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
        }
    }

    /// The codes in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + 'a {
        let view = *self;
        (0..view.len()).map(move |j| view.get(j))
    }

    /// The codes, copied out.
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// The raw little-endian bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

impl std::fmt::Debug for CodesView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One row of a dataset.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub caption: &'a str,
    pub codes: CodesView<'a>,
}

/// A memory-mapped encoded dataset (see the module docs for the format).
///
/// Opening maps the files and checks sizes; nothing is read up front beyond the manifest and
/// the first and last caption offsets. If another process truncates a data file while it is
/// mapped, reads from the mapping fault: don't rewrite datasets in place (the writer never does).
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    codes: Bytes,
    captions: Bytes,
    idx: Bytes,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset").field("dir", &self.dir).field("manifest", &self.manifest).finish()
    }
}

impl Dataset {
    /// Opens the dataset in `dir`: reads `manifest.json`, checks it and the data files' sizes,
    /// and memory-maps the data files.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::Manifest {
                    path: manifest_path,
                    msg: "not found: is this an encoded dataset folder? (create one with \
                          import_jsonl or the synthetic generator)"
                        .into(),
                })
            }
            Err(e) => return Err(DataError::io(&manifest_path, e)),
        };
        let bad = |msg: String| DataError::Manifest { path: manifest_path.clone(), msg };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT_NAME {
            return Err(bad(format!("format is {:?}, expected {FORMAT_NAME:?}", manifest.format)));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (this build reads version {FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        if manifest.image_length == 0 {
            return Err(bad("image_length is 0".into()));
        }
        if manifest.image_vocab == 0 || manifest.image_vocab > i32::MAX as u32 {
            return Err(bad(format!("image_vocab {} is out of range 1..=2^31-1", manifest.image_vocab)));
        }
        if manifest.code_dtype == CodeDtype::U16 && manifest.image_vocab > 1 << 16 {
            return Err(bad(format!("code_dtype u16 cannot hold image_vocab {}", manifest.image_vocab)));
        }
        let codes_bytes = manifest
            .rows
            .checked_mul(manifest.image_length as u64)
            .and_then(|n| n.checked_mul(manifest.code_dtype.size() as u64))
            .ok_or_else(|| bad("rows × image_length overflows".into()))?;
        let idx_bytes =
            manifest.rows.checked_add(1).and_then(|n| n.checked_mul(8)).ok_or_else(|| bad("rows overflows".into()))?;
        let codes_entry = manifest.file(CODES_FILE, &manifest_path)?;
        let captions_entry = manifest.file(CAPTIONS_FILE, &manifest_path)?;
        let idx_entry = manifest.file(CAPTIONS_IDX_FILE, &manifest_path)?;
        if codes_entry.bytes != codes_bytes {
            return Err(bad(format!(
                "{CODES_FILE} is listed as {} bytes but rows × image_length × {} = {codes_bytes}",
                codes_entry.bytes,
                manifest.code_dtype.size()
            )));
        }
        if idx_entry.bytes != idx_bytes {
            return Err(bad(format!(
                "{CAPTIONS_IDX_FILE} is listed as {} bytes but (rows + 1) × 8 = {idx_bytes}",
                idx_entry.bytes
            )));
        }

        let codes = map_file(&dir.join(CODES_FILE), codes_entry.bytes)?;
        let captions = map_file(&dir.join(CAPTIONS_FILE), captions_entry.bytes)?;
        let idx = map_file(&dir.join(CAPTIONS_IDX_FILE), idx_entry.bytes)?;
        let ds = Dataset { dir, manifest, codes, captions, idx };
        let first = ds.offset(0);
        let last = ds.offset(ds.manifest.rows as usize);
        if first != 0 || last != captions_entry.bytes {
            return Err(DataError::Corrupt {
                path: ds.dir.join(CAPTIONS_IDX_FILE),
                msg: format!(
                    "offsets run from {first} to {last}, expected 0 to {} (the size of {CAPTIONS_FILE})",
                    captions_entry.bytes
                ),
            });
        }
        Ok(ds)
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.manifest.rows as usize
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.rows == 0
    }

    pub fn image_length(&self) -> usize {
        self.manifest.image_length
    }

    pub fn image_vocab(&self) -> u32 {
        self.manifest.image_vocab
    }

    pub fn code_dtype(&self) -> CodeDtype {
        self.manifest.code_dtype
    }

    fn offset(&self, i: usize) -> u64 {
        let b = &self.idx[8 * i..8 * i + 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.len() {
            return Err(DataError::InvalidArgument(format!(
                "row {i} out of range: {} has {} rows",
                self.dir.display(),
                self.len()
            )));
        }
        Ok(())
    }

    /// Caption of row `i` (checked: offsets in bounds and valid UTF-8).
    pub fn caption(&self, i: usize) -> Result<&str> {
        self.check_index(i)?;
        let (start, end) = (self.offset(i), self.offset(i + 1));
        if start > end || end > self.captions.len() as u64 {
            return Err(DataError::Corrupt {
                path: self.dir.join(CAPTIONS_IDX_FILE),
                msg: format!(
                    "row {i} has caption byte range {start}..{end}, outside {CAPTIONS_FILE} ({} bytes)",
                    self.captions.len()
                ),
            });
        }
        std::str::from_utf8(&self.captions[start as usize..end as usize]).map_err(|e| DataError::Corrupt {
            path: self.dir.join(CAPTIONS_FILE),
            msg: format!("row {i}: caption is not valid UTF-8 ({e})"),
        })
    }

    /// Image codes of row `i`, viewed in place; every code is checked to be below `image_vocab`
    /// (a corrupt byte can't index past the vocabulary or train as a BOS code).
    pub fn codes(&self, i: usize) -> Result<CodesView<'_>> {
        self.check_index(i)?;
        let width = self.manifest.image_length * self.manifest.code_dtype.size();
        let view = CodesView { bytes: &self.codes[i * width..(i + 1) * width], dtype: self.manifest.code_dtype };
        if let Some((j, c)) = view.iter().enumerate().find(|&(_, c)| c >= self.manifest.image_vocab) {
            return Err(DataError::Corrupt {
                path: self.dir.join(CODES_FILE),
                msg: format!(
                    "row {i}: code {c} at position {j} is not below image_vocab {} (check the whole dataset with \
                     `dalle-mesh data verify {}`)",
                    self.manifest.image_vocab,
                    self.dir.display()
                ),
            });
        }
        Ok(view)
    }

    /// Row `i`: caption and codes.
    pub fn row(&self, i: usize) -> Result<Row<'_>> {
        Ok(Row { caption: self.caption(i)?, codes: self.codes(i)? })
    }

    /// Reads every data file and compares its CRC-32 with the manifest. Explicit because it
    /// touches every byte (a few seconds per GB).
    pub fn verify_checksums(&self) -> Result<()> {
        for (name, bytes) in
            [(CODES_FILE, &self.codes), (CAPTIONS_FILE, &self.captions), (CAPTIONS_IDX_FILE, &self.idx)]
        {
            let expected = self.manifest.files[name].crc32;
            let actual = crc32fast::hash(bytes);
            if actual != expected {
                return Err(DataError::ChecksumMismatch { path: self.dir.join(name), expected, actual });
            }
        }
        Ok(())
    }
}

/// What [`Dataset::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub rows: u64,
    pub bytes: u64,
}

impl Dataset {
    /// Checks everything: the CRC-32 of every data file, then every row (caption offsets in
    /// bounds and increasing, captions valid UTF-8, codes below `image_vocab`). Reads every byte.
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_checksums()?;
        for i in 0..self.len() {
            self.row(i)?;
        }
        let bytes = (self.codes.len() + self.captions.len() + self.idx.len()) as u64;
        Ok(VerifyReport { rows: self.manifest.rows, bytes })
    }
}

/// A data file being written, with its running checksum.
struct HashedFile {
    path: PathBuf,
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl HashedFile {
    fn create(path: PathBuf) -> Result<Self> {
        let file = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(HashedFile { path, out: BufWriter::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new(), bytes: 0 })
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data).map_err(|e| DataError::io(&self.path, e))?;
        self.crc.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<FileEntry> {
        let file = self.out.into_inner().map_err(|e| DataError::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&self.path, e))?;
        Ok(FileEntry { bytes: self.bytes, crc32: self.crc.finalize() })
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a dataset: rows are appended with [`push`](Self::push) into a temporary sibling
/// folder (`.NAME.tmp-PID-N`); [`finish`](Self::finish) writes the manifest and renames the
/// folder to its final name. Dropping an unfinished writer deletes the temporary folder.
///
/// If the destination already exists it is replaced, provided it is an empty folder or a
/// dataset (has `manifest.json`); anything else is refused rather than clobbered. The
/// replacement is two renames (old out of the way, new in), then the old copy is deleted.
pub struct DatasetWriter {
    out_dir: PathBuf,
    tmp_dir: PathBuf,
    image_length: usize,
    image_vocab: u32,
    dtype: CodeDtype,
    files: Option<[HashedFile; 3]>,
    rows: u64,
    caption_offset: u64,
    stats: CaptionStats,
    source: Option<String>,
    code_buf: Vec<u8>,
}

impl std::fmt::Debug for DatasetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetWriter")
            .field("out_dir", &self.out_dir)
            .field("tmp_dir", &self.tmp_dir)
            .field("image_length", &self.image_length)
            .field("image_vocab", &self.image_vocab)
            .field("rows", &self.rows)
            .finish()
    }
}

impl DatasetWriter {
    /// Starts a dataset that will live at `out_dir`.
    pub fn create(out_dir: impl AsRef<Path>, image_length: usize, image_vocab: u32) -> Result<Self> {
        let out_dir = out_dir.as_ref().to_path_buf();
        if image_length == 0 {
            return Err(DataError::InvalidArgument("image_length must be > 0".into()));
        }
        if image_vocab == 0 || image_vocab > i32::MAX as u32 {
            return Err(DataError::InvalidArgument(format!("image_vocab {image_vocab} is out of range 1..=2^31-1")));
        }
        let name = out_dir
            .file_name()
            .ok_or_else(|| {
                DataError::InvalidArgument(format!("output folder {} has no final component", out_dir.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match out_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
        check_replaceable(&out_dir)?;
        let tmp_dir =
            parent.join(format!(".{name}.tmp-{}-{}", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(|e| DataError::io(&tmp_dir, e))?;
        }
        fs::create_dir(&tmp_dir).map_err(|e| DataError::io(&tmp_dir, e))?;
        let mut w = DatasetWriter {
            out_dir,
            tmp_dir: tmp_dir.clone(),
            image_length,
            image_vocab,
            dtype: CodeDtype::for_vocab(image_vocab),
            files: None,
            rows: 0,
            caption_offset: 0,
            stats: CaptionStats::default(),
            source: None,
            code_buf: Vec::new(),
        };
        let mut idx = HashedFile::create(tmp_dir.join(CAPTIONS_IDX_FILE))?;
        idx.write(&0u64.to_le_bytes())?;
        w.files = Some([
            HashedFile::create(tmp_dir.join(CODES_FILE))?,
            HashedFile::create(tmp_dir.join(CAPTIONS_FILE))?,
            idx,
        ]);
        Ok(w)
    }

    /// Records where the rows come from (stored in the manifest's `source`).
    pub fn set_source(&mut self, source: impl Into<String>) {
        self.source = Some(source.into());
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends a row. `codes` must have `image_length` entries, each `< image_vocab`.
    pub fn push(&mut self, caption: &str, codes: &[u32]) -> Result<()> {
        if codes.len() != self.image_length {
            return Err(DataError::InvalidArgument(format!(
                "row {} has {} codes, expected image_length {}",
                self.rows,
                codes.len(),
                self.image_length
            )));
        }
        if let Some((j, &c)) = codes.iter().enumerate().find(|(_, &c)| c >= self.image_vocab) {
            return Err(DataError::InvalidArgument(format!(
                "row {}: code {c} at position {j} is not below image_vocab {}",
                self.rows, self.image_vocab
            )));
        }
        self.code_buf.clear();
        match self.dtype {
            CodeDtype::U16 => {
                for &c in codes {
                    self.code_buf.extend_from_slice(&(c as u16).to_le_bytes());
                }
            }
            CodeDtype::U32 => {
                for &c in codes {
                    self.code_buf.extend_from_slice(&c.to_le_bytes());
                }
            }
        }
        let [codes_f, captions_f, idx_f] = self.files.as_mut().expect("writer not finished");
        codes_f.write(&self.code_buf)?;
        captions_f.write(caption.as_bytes())?;
        self.caption_offset += caption.len() as u64;
        idx_f.write(&self.caption_offset.to_le_bytes())?;

        let bytes = caption.len() as u64;
        let chars = caption.chars().count() as u64;
        let s = &mut self.stats;
        if self.rows == 0 {
            s.min_bytes = bytes;
            s.max_bytes = bytes;
            s.min_chars = chars;
            s.max_chars = chars;
        } else {
            s.min_bytes = s.min_bytes.min(bytes);
            s.max_bytes = s.max_bytes.max(bytes);
            s.min_chars = s.min_chars.min(chars);
            s.max_chars = s.max_chars.max(chars);
        }
        s.total_bytes += bytes;
        self.rows += 1;
        Ok(())
    }

    /// Completes the dataset: flushes and syncs the data files, writes `manifest.json`, and
    /// renames the temporary folder to the destination. Returns the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        let [codes_f, captions_f, idx_f] = self.files.take().expect("writer not finished");
        let mut files = BTreeMap::new();
        files.insert(CODES_FILE.to_string(), codes_f.finish()?);
        files.insert(CAPTIONS_FILE.to_string(), captions_f.finish()?);
        files.insert(CAPTIONS_IDX_FILE.to_string(), idx_f.finish()?);
        let mut captions = self.stats.clone();
        if self.rows > 0 {
            captions.mean_bytes = captions.total_bytes as f64 / self.rows as f64;
        }
        let manifest = Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: FORMAT_VERSION,
            rows: self.rows,
            image_length: self.image_length,
            image_vocab: self.image_vocab,
            code_dtype: self.dtype,
            files,
            captions,
            source: self.source.clone(),
        };
        let manifest_path = self.tmp_dir.join(MANIFEST_FILE);
        let mut json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        json.push('\n');
        {
            let mut f = File::create(&manifest_path).map_err(|e| DataError::io(&manifest_path, e))?;
            f.write_all(json.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| DataError::io(&manifest_path, e))?;
        }

        check_replaceable(&self.out_dir)?;
        let old = if self.out_dir.exists() {
            let old =
                self.tmp_dir.with_file_name(format!("{}.old", self.tmp_dir.file_name().unwrap().to_string_lossy()));
            fs::rename(&self.out_dir, &old).map_err(|e| DataError::io(&self.out_dir, e))?;
            Some(old)
        } else {
            None
        };
        fs::rename(&self.tmp_dir, &self.out_dir).map_err(|e| DataError::io(&self.out_dir, e))?;
        if let Some(parent) = self.out_dir.parent() {
            // Make the rename durable; not all platforms can sync a directory, so best effort.
            if let Ok(d) = File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) {
                let _ = d.sync_all();
            }
        }
        if let Some(old) = old {
            fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
        }
        // Nothing left to clean up in Drop.
        self.tmp_dir = PathBuf::new();
        Ok(manifest)
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if !self.tmp_dir.as_os_str().is_empty() {
            self.files = None;
            let _ = fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

/// The destination may be absent, an empty folder, or a dataset folder; anything else is refused.
fn check_replaceable(out_dir: &Path) -> Result<()> {
    match fs::symlink_metadata(out_dir) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => {
            let empty = fs::read_dir(out_dir).map_err(|e| DataError::io(out_dir, e))?.next().is_none();
            if empty || out_dir.join(MANIFEST_FILE).is_file() {
                Ok(())
            } else {
                Err(DataError::InvalidArgument(format!(
                    "{} exists and is not a dataset folder (no {MANIFEST_FILE}); refusing to replace it",
                    out_dir.display()
                )))
            }
        }
        Ok(_) => Err(DataError::InvalidArgument(format!(
            "{} exists and is not a folder; refusing to replace it",
            out_dir.display()
        ))),
    }
}
