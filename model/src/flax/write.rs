//! Writer of flax msgpack files: the nested map `flax.serialization.to_bytes` produces, arrays
//! as ext 1 `[shape, dtype name, raw LE bytes]`, arrays over [`MAX_CHUNK_BYTES`] split into
//! `__msgpack_chunked_array__` maps. Streams to disk and replaces the target atomically.

use super::dtype::FlaxDtype;
use crate::error::{io_err, ModelError, Result};
use std::io::Write;
use std::path::Path;

/// flax's `MAX_CHUNK_SIZE`: arrays larger than this many bytes are written in chunks.
pub const MAX_CHUNK_BYTES: usize = 1 << 30;
const EXT_NDARRAY: i8 = 1;

/// An array to write, borrowed: '.'-joined Flax path, shape, dtype, raw little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct FlaxArrayRef<'a> {
    pub path: &'a str,
    pub shape: &'a [usize],
    pub dtype: FlaxDtype,
    pub data: &'a [u8],
}

enum Node {
    Leaf(usize),
    Branch(Vec<(String, Node)>),
}

fn ck(path: &Path, detail: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), detail: detail.into() }
}

/// The nested tree of `arrays` (keys in first-seen order); errors on a path that is both an
/// array and a prefix of another, or on duplicates.
fn build_tree(file: &Path, arrays: &[FlaxArrayRef<'_>]) -> Result<Node> {
    let mut root = Node::Branch(Vec::new());
    for (i, a) in arrays.iter().enumerate() {
        let want = a.shape.iter().try_fold(a.dtype.itemsize(), |acc, &d| acc.checked_mul(d));
        if want != Some(a.data.len()) {
            return Err(ck(
                file,
                format!("array `{}`: shape {:?} does not match {} bytes", a.path, a.shape, a.data.len()),
            ));
        }
        let parts: Vec<&str> = a.path.split('.').collect();
        let mut node = &mut root;
        for (depth, part) in parts.iter().enumerate() {
            let Node::Branch(children) = node else {
                return Err(ck(file, format!("`{}` is both an array and a group", parts[..depth].join("."))));
            };
            let last = depth + 1 == parts.len();
            let pos = match children.iter().position(|(k, _)| k == part) {
                Some(_) if last => return Err(ck(file, format!("array `{}` given twice", a.path))),
                Some(p) => p,
                None => {
                    children.push((part.to_string(), if last { Node::Leaf(i) } else { Node::Branch(Vec::new()) }));
                    children.len() - 1
                }
            };
            node = &mut children[pos].1;
        }
    }
    Ok(root)
}

/// Writes `arrays` as one flax msgpack document to `w`.
pub fn write_to<W: Write>(w: &mut W, file: &Path, arrays: &[FlaxArrayRef<'_>]) -> Result<()> {
    write_to_chunked(w, file, arrays, MAX_CHUNK_BYTES)
}

/// [`write_to`] with another chunk threshold (flax's is [`MAX_CHUNK_BYTES`]; tests use small
/// ones to exercise `__msgpack_chunked_array__`).
pub fn write_to_chunked<W: Write>(
    w: &mut W,
    file: &Path,
    arrays: &[FlaxArrayRef<'_>],
    max_chunk_bytes: usize,
) -> Result<()> {
    let tree = build_tree(file, arrays)?;
    write_node(w, &tree, arrays, max_chunk_bytes.max(1)).map_err(io_err(format!("writing {}", file.display())))
}

/// Writes `arrays` to `path` atomically (temporary file in the same folder, fsync, rename).
pub fn write_file(path: &Path, arrays: &[FlaxArrayRef<'_>]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let result = write_to(&mut w, path, arrays).and_then(|()| {
        let f = w
            .into_inner()
            .map_err(|e| ModelError::Io { context: format!("writing {}", tmp.display()), source: e.into_error() })?;
        f.sync_all().map_err(io_err(format!("syncing {}", tmp.display())))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {} to {}", tmp.display(), path.display())))
}

fn write_node<W: Write>(w: &mut W, node: &Node, arrays: &[FlaxArrayRef<'_>], max_chunk: usize) -> std::io::Result<()> {
    match node {
        Node::Leaf(i) => write_array(w, &arrays[*i], max_chunk),
        Node::Branch(children) => {
            rmp::encode::write_map_len(w, children.len() as u32)?;
            for (k, child) in children {
                rmp::encode::write_str(w, k)?;
                write_node(w, child, arrays, max_chunk)?;
            }
            Ok(())
        }
    }
}

fn write_array<W: Write>(w: &mut W, a: &FlaxArrayRef<'_>, max_chunk: usize) -> std::io::Result<()> {
    if a.data.len() <= max_chunk {
        return write_ext(w, a.shape, a.dtype, a.data);
    }
    // flax's `_chunk`: flat chunks of MAX_CHUNK_BYTES / itemsize elements.
    let chunk = (max_chunk / a.dtype.itemsize()).max(1) * a.dtype.itemsize();
    rmp::encode::write_map_len(w, 3)?;
    rmp::encode::write_str(w, "__msgpack_chunked_array__")?;
    rmp::encode::write_bool(w, true)?;
    rmp::encode::write_str(w, "shape")?;
    rmp::encode::write_map_len(w, a.shape.len() as u32)?;
    for (i, d) in a.shape.iter().enumerate() {
        rmp::encode::write_str(w, &i.to_string())?;
        rmp::encode::write_uint(w, *d as u64)?;
    }
    rmp::encode::write_str(w, "chunks")?;
    let parts: Vec<&[u8]> = a.data.chunks(chunk).collect();
    rmp::encode::write_map_len(w, parts.len() as u32)?;
    for (i, p) in parts.iter().enumerate() {
        rmp::encode::write_str(w, &i.to_string())?;
        write_ext(w, &[p.len() / a.dtype.itemsize()], a.dtype, p)?;
    }
    Ok(())
}

/// Ext 1 with payload `[shape, dtype name, bytes]`; the raw bytes are copied straight to `w`.
fn write_ext<W: Write>(w: &mut W, shape: &[usize], dtype: FlaxDtype, data: &[u8]) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(64);
    rmp::encode::write_array_len(&mut head, 3)?;
    rmp::encode::write_array_len(&mut head, shape.len() as u32)?;
    for d in shape {
        rmp::encode::write_uint(&mut head, *d as u64)?;
    }
    rmp::encode::write_str(&mut head, dtype.name())?;
    rmp::encode::write_bin_len(&mut head, data.len() as u32)?;
    rmp::encode::write_ext_meta(w, (head.len() + data.len()) as u32, EXT_NDARRAY)?;
    w.write_all(&head)?;
    w.write_all(data)
}
