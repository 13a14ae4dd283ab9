//! Streaming reader of flax msgpack files (see the module docs for the format).

use super::dtype::FlaxDtype;
use crate::error::{io_err, ModelError, Result};
use rmp::Marker;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// The single-file checkpoint name transformers uses.
pub const WEIGHTS_FILE: &str = "flax_model.msgpack";
/// The index of a sharded transformers checkpoint.
pub const INDEX_FILE: &str = "flax_model.msgpack.index.json";

const EXT_NDARRAY: i8 = 1;
const EXT_COMPLEX: i8 = 2;
const EXT_NPSCALAR: i8 = 3;
const CHUNKED_KEY: &str = "__msgpack_chunked_array__";
/// Nesting deeper than this is refused (a corrupt file must not overflow the stack).
const MAX_DEPTH: usize = 128;

/// One array of a Flax tree: its '.'-joined path, shape, dtype and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct FlaxArray {
    pub path: String,
    pub shape: Vec<usize>,
    pub dtype: FlaxDtype,
    pub data: Vec<u8>,
}

impl FlaxArray {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values as f32 (see [`FlaxDtype::to_f32`]).
    pub fn to_f32(&self) -> Vec<f32> {
        self.dtype.to_f32(&self.data)
    }
    /// The values as i64 (see [`FlaxDtype::to_i64`]).
    pub fn to_i64(&self) -> Vec<i64> {
        self.dtype.to_i64(&self.data)
    }
}

/// Streams every array of the msgpack file `path` to `visit`, in file order.
pub fn visit_file(path: &Path, visit: &mut dyn FnMut(FlaxArray) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).ok();
    visit_reader(BufReader::with_capacity(1 << 20, file), path, len, visit)
}

/// Every array of the msgpack file `path`, in file order.
pub fn read_file(path: &Path) -> Result<Vec<FlaxArray>> {
    let mut out = Vec::new();
    visit_file(path, &mut |a| {
        out.push(a);
        Ok(())
    })?;
    Ok(out)
}

/// Streams one msgpack document from `reader` (`name` is used in errors; `len`, when known,
/// bounds allocations) and checks nothing follows it.
pub fn visit_reader(
    reader: impl Read,
    name: &Path,
    len: Option<u64>,
    visit: &mut dyn FnMut(FlaxArray) -> Result<()>,
) -> Result<()> {
    let mut d = Decoder { rd: reader, pos: 0, len, file: name.to_path_buf() };
    let mut path = String::new();
    d.value(&mut path, 0, visit)?;
    let mut extra = [0u8; 1];
    match d.rd.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(d.err("trailing bytes after the msgpack document; the file is corrupt")),
        Err(e) => Err(d.err(format!("read error: {e}"))),
    }
}

/// Streams a checkpoint's arrays: `path` is a msgpack file, or a folder holding
/// `flax_model.msgpack` or a sharded checkpoint (`flax_model.msgpack.index.json` + its shards).
/// Returns the files read.
pub fn visit_checkpoint(path: &Path, visit: &mut dyn FnMut(FlaxArray) -> Result<()>) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        visit_file(path, visit)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let single = path.join(WEIGHTS_FILE);
    if single.is_file() {
        visit_file(&single, visit)?;
        return Ok(vec![single]);
    }
    let index = path.join(INDEX_FILE);
    if !index.is_file() {
        return Err(ck(
            path,
            format!("holds neither {WEIGHTS_FILE} nor {INDEX_FILE}; point at a folder written by save_pretrained"),
        ));
    }
    visit_sharded(path, &index, visit)
}

fn visit_sharded(dir: &Path, index: &Path, visit: &mut dyn FnMut(FlaxArray) -> Result<()>) -> Result<Vec<PathBuf>> {
    let weight_map = read_index(index)?;
    let shards: BTreeSet<&String> = weight_map.values().collect();
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    for shard in shards {
        let file = dir.join(shard);
        if !file.is_file() {
            return Err(ck(
                index,
                format!("lists shard `{shard}`, which is missing from {}; copy every shard file", dir.display()),
            ));
        }
        visit_file(&file, &mut |a| {
            let key = a.path.replace('.', "/");
            match weight_map.get(&key) {
                Some(s) if s == shard => {}
                Some(s) => return Err(ck(&file, format!("holds `{}`, which the index places in `{s}`", a.path))),
                None => return Err(ck(&file, format!("holds `{}`, which the index does not list", a.path))),
            }
            seen.insert(key);
            visit(a)
        })?;
        files.push(file);
    }
    if let Some((name, shard)) = weight_map.iter().find(|(k, _)| !seen.contains(*k)) {
        return Err(ck(index, format!("lists `{name}` in shard `{shard}`, but that shard does not hold it")));
    }
    Ok(files)
}

/// `weight_map` of a transformers index: '/'-joined name → shard file name.
fn read_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(index).map_err(io_err(format!("reading {}", index.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ck(index, format!("not valid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ck(index, "has no `weight_map` object; is it a transformers index?"))?;
    map.iter()
        .map(|(k, f)| {
            let f = f.as_str().ok_or_else(|| ck(index, format!("weight_map entry `{k}` is not a file name")))?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(ck(index, format!("weight_map entry `{k}` names `{f}`, not a file in the same folder")));
            }
            Ok((k.clone(), f.to_string()))
        })
        .collect()
}

fn ck(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

struct Decoder<R> {
    rd: R,
    pos: u64,
    len: Option<u64>,
    file: PathBuf,
}

/// A decoded msgpack scalar, or the start of a container.
enum Item {
    Nil,
    Bool(bool),
    Int(i128),
    F32(f32),
    F64(f64),
    Str(u32),
    Bin(u32),
    Array(u32),
    Map(u32),
    Ext { code: i8, len: u32 },
}

impl<R: Read> Decoder<R> {
    fn err(&self, detail: impl std::fmt::Display) -> ModelError {
        ck(&self.file, format!("at byte {}: {detail}", self.pos))
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.rd.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(self.err(
                "the file ends in the middle of a value: it is truncated (an interrupted copy or download?); copy it again",
            )),
            Err(e) => Err(self.err(format!("read error: {e}"))),
        }
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.bytes(&mut b)?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.be::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u32> {
        Ok(u16::from_be_bytes(self.be()?) as u32)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.be()?))
    }

    fn item(&mut self) -> Result<Item> {
        let m = Marker::from_u8(self.u8()?);
        Ok(match m {
            Marker::Null => Item::Nil,
            Marker::True => Item::Bool(true),
            Marker::False => Item::Bool(false),
            Marker::FixPos(v) => Item::Int(v as i128),
            Marker::FixNeg(v) => Item::Int(v as i128),
            Marker::U8 => Item::Int(self.u8()? as i128),
            Marker::U16 => Item::Int(self.u16()? as i128),
            Marker::U32 => Item::Int(self.u32()? as i128),
            Marker::U64 => Item::Int(u64::from_be_bytes(self.be()?) as i128),
            Marker::I8 => Item::Int(i8::from_be_bytes(self.be()?) as i128),
            Marker::I16 => Item::Int(i16::from_be_bytes(self.be()?) as i128),
            Marker::I32 => Item::Int(i32::from_be_bytes(self.be()?) as i128),
            Marker::I64 => Item::Int(i64::from_be_bytes(self.be()?) as i128),
            Marker::F32 => Item::F32(f32::from_be_bytes(self.be()?)),
            Marker::F64 => Item::F64(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(n) => Item::Str(n as u32),
            Marker::Str8 => Item::Str(self.u8()? as u32),
            Marker::Str16 => Item::Str(self.u16()?),
            Marker::Str32 => Item::Str(self.u32()?),
            Marker::Bin8 => Item::Bin(self.u8()? as u32),
            Marker::Bin16 => Item::Bin(self.u16()?),
            Marker::Bin32 => Item::Bin(self.u32()?),
            Marker::FixArray(n) => Item::Array(n as u32),
            Marker::Array16 => Item::Array(self.u16()?),
            Marker::Array32 => Item::Array(self.u32()?),
            Marker::FixMap(n) => Item::Map(n as u32),
            Marker::Map16 => Item::Map(self.u16()?),
            Marker::Map32 => Item::Map(self.u32()?),
            Marker::FixExt1 | Marker::FixExt2 | Marker::FixExt4 | Marker::FixExt8 | Marker::FixExt16 => {
                let len = match m {
                    Marker::FixExt1 => 1,
                    Marker::FixExt2 => 2,
                    Marker::FixExt4 => 4,
                    Marker::FixExt8 => 8,
                    _ => 16,
                };
                Item::Ext { code: self.u8()? as i8, len }
            }
            Marker::Ext8 => {
                let len = self.u8()? as u32;
                Item::Ext { code: self.u8()? as i8, len }
            }
            Marker::Ext16 => {
                let len = self.u16()?;
                Item::Ext { code: self.u8()? as i8, len }
            }
            Marker::Ext32 => {
                let len = self.u32()?;
                Item::Ext { code: self.u8()? as i8, len }
            }
            Marker::Reserved => return Err(self.err("byte 0xc1 is not valid msgpack; the file is corrupt")),
        })
    }

    /// Reads `n` raw bytes, refusing lengths beyond the end of the file before allocating.
    fn blob(&mut self, n: u32) -> Result<Vec<u8>> {
        if let Some(len) = self.len {
            if self.pos + n as u64 > len {
                return Err(self.err(format!(
                    "a {n}-byte value runs past the end of the file ({len} bytes): it is truncated; copy it again"
                )));
            }
        }
        let mut v = vec![0u8; n as usize];
        self.bytes(&mut v)?;
        Ok(v)
    }

    fn string(&mut self, n: u32) -> Result<String> {
        let b = self.blob(n)?;
        String::from_utf8(b).map_err(|_| self.err("a key is not valid UTF-8; the file is corrupt"))
    }

    fn key(&mut self) -> Result<String> {
        match self.item()? {
            Item::Str(n) => self.string(n),
            Item::Int(i) => Ok(i.to_string()),
            _ => Err(self.err("a map key is not a string; this is not a flax checkpoint")),
        }
    }

    /// Decodes one value at `path`, passing every array found under it to `visit`.
    fn value(&mut self, path: &mut String, depth: usize, visit: &mut dyn FnMut(FlaxArray) -> Result<()>) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nesting deeper than {MAX_DEPTH} levels; the file is corrupt")));
        }
        let scalar = |dtype: FlaxDtype, data: Vec<u8>| FlaxArray { path: String::new(), shape: vec![], dtype, data };
        let mut arr = match self.item()? {
            Item::Nil => return Ok(()),
            Item::Map(n) => return self.map(n, path, depth, visit),
            Item::Ext { code, len } => self.ext(code, len)?,
            Item::Bool(b) => scalar(FlaxDtype::Bool, vec![b as u8]),
            Item::Int(i) => match i64::try_from(i) {
                Ok(v) => scalar(FlaxDtype::I64, v.to_le_bytes().to_vec()),
                Err(_) => scalar(FlaxDtype::U64, (i as u64).to_le_bytes().to_vec()),
            },
            Item::F32(v) => scalar(FlaxDtype::F32, v.to_le_bytes().to_vec()),
            Item::F64(v) => scalar(FlaxDtype::F64, v.to_le_bytes().to_vec()),
            Item::Str(_) | Item::Bin(_) | Item::Array(_) => {
                return Err(self
                    .err(format!("`{path}` is a string, bytes or list, not an array; this is not a flax checkpoint")))
            }
        };
        arr.path = path.clone();
        visit(arr)
    }

    fn map(
        &mut self,
        n: u32,
        path: &mut String,
        depth: usize,
        visit: &mut dyn FnMut(FlaxArray) -> Result<()>,
    ) -> Result<()> {
        for i in 0..n {
            let key = self.key()?;
            if i == 0 && key == CHUNKED_KEY {
                let mut arr = self.chunked(n - 1, path)?;
                arr.path = path.clone();
                return visit(arr);
            }
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&key);
            self.value(path, depth + 1, visit)?;
            path.truncate(len);
        }
        Ok(())
    }

    /// Ext 1 (ndarray) or 3 (numpy scalar): payload `[shape, dtype name, raw bytes]`.
    fn ext(&mut self, code: i8, len: u32) -> Result<FlaxArray> {
        match code {
            EXT_NDARRAY | EXT_NPSCALAR => {}
            EXT_COMPLEX => return Err(self.err("a complex number (msgpack ext 2); complex weights are not supported")),
            other => {
                return Err(self.err(format!(
                    "msgpack ext type {other} is not a flax array (flax writes ext 1 for arrays, 3 for scalars)"
                )))
            }
        }
        let start = self.pos;
        let bad = |d: &Self, what: &str| d.err(format!("ext {code} payload is not [shape, dtype, bytes]: {what}"));
        let Item::Array(3) = self.item()? else { return Err(bad(self, "it is not a 3-element list")) };
        let Item::Array(rank) = self.item()? else { return Err(bad(self, "the shape is not a list")) };
        let mut shape = Vec::with_capacity(rank.min(64) as usize);
        for _ in 0..rank {
            match self.item()? {
                Item::Int(d) if (0..=u32::MAX as i128 * 16).contains(&d) => shape.push(d as usize),
                _ => return Err(bad(self, "a dimension is not a non-negative integer")),
            }
        }
        let Item::Str(n) = self.item()? else { return Err(bad(self, "the dtype is not a string")) };
        let name = self.string(n)?;
        let dtype = FlaxDtype::from_name(&name).ok_or_else(|| {
            self.err(format!("dtype `{name}` is not supported (float16/32/64, bfloat16, ints, bool)"))
        })?;
        let Item::Bin(nbytes) = self.item()? else { return Err(bad(self, "the data is not a byte string")) };
        let want = shape.iter().try_fold(dtype.itemsize(), |a, &d| a.checked_mul(d));
        if want != Some(nbytes as usize) {
            return Err(bad(
                self,
                &format!("shape {shape:?} of {name} needs {want:?} bytes, the payload holds {nbytes}"),
            ));
        }
        let data = self.blob(nbytes)?;
        if self.pos - start != len as u64 {
            return Err(bad(self, &format!("the ext says {len} bytes, its content took {}", self.pos - start)));
        }
        Ok(FlaxArray { path: String::new(), shape, dtype, data })
    }

    /// The rest of a `__msgpack_chunked_array__` map (`rest` entries after the marker).
    fn chunked(&mut self, rest: u32, path: &str) -> Result<FlaxArray> {
        let bad = |d: &Self, what: &str| d.err(format!("chunked array `{path}`: {what}"));
        let Item::Bool(true) = self.item()? else { return Err(bad(self, "the marker is not `true`")) };
        let (mut shape, mut chunks) = (None, None);
        for _ in 0..rest {
            let key = self.key()?;
            let Item::Map(n) = self.item()? else { return Err(bad(self, &format!("`{key}` is not a map"))) };
            match key.as_str() {
                "shape" => {
                    let mut dims = BTreeMap::new();
                    for _ in 0..n {
                        let k = self.key()?;
                        let Item::Int(d) = self.item()? else { return Err(bad(self, "a dimension is not an integer")) };
                        dims.insert(k, usize::try_from(d).map_err(|_| bad(self, "a dimension is negative"))?);
                    }
                    shape = Some(in_index_order(dims).ok_or_else(|| bad(self, "shape keys are not 0..n"))?);
                }
                "chunks" => {
                    let mut parts = BTreeMap::new();
                    for _ in 0..n {
                        let k = self.key()?;
                        let Item::Ext { code, len } = self.item()? else {
                            return Err(bad(self, "a chunk is not an array"));
                        };
                        parts.insert(k, self.ext(code, len)?);
                    }
                    chunks = Some(in_index_order(parts).ok_or_else(|| bad(self, "chunk keys are not 0..n"))?);
                }
                other => return Err(bad(self, &format!("unexpected key `{other}`"))),
            }
        }
        let (Some(shape), Some(chunks)) = (shape, chunks) else { return Err(bad(self, "needs `shape` and `chunks`")) };
        let dtype = chunks.first().map(|c| c.dtype).ok_or_else(|| bad(self, "has no chunks"))?;
        if chunks.iter().any(|c| c.dtype != dtype) {
            return Err(bad(self, "chunks have different dtypes"));
        }
        let mut data = Vec::with_capacity(chunks.iter().map(|c| c.data.len()).sum());
        for c in chunks {
            data.extend_from_slice(&c.data);
        }
        if shape.iter().product::<usize>() * dtype.itemsize() != data.len() {
            return Err(bad(
                self,
                &format!("chunks hold {} bytes, shape {shape:?} needs a different size", data.len()),
            ));
        }
        Ok(FlaxArray { path: String::new(), shape, dtype, data })
    }
}

/// Values of a map keyed "0", "1", …, in index order (None if the keys are not exactly 0..n).
fn in_index_order<T>(m: BTreeMap<String, T>) -> Option<Vec<T>> {
    let mut v: Vec<(usize, T)> = m.into_iter().map(|(k, t)| Some((k.parse().ok()?, t))).collect::<Option<_>>()?;
    v.sort_by_key(|(i, _)| *i);
    v.iter().enumerate().all(|(i, (k, _))| i == *k).then(|| v.into_iter().map(|(_, t)| t).collect())
}
