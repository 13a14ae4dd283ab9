//! The disk cache of compiled PTX.
//!
//! One file per (family, arch, key): `<dir>/<family>-<sm_XY>-<key as 16 hex digits>.ptx`, where the
//! key hashes (FNV-1a, 64 bit) a format tag, the full source (prelude included), the architecture,
//! the NVRTC options and the NVRTC version. Files are written to a temporary name and renamed,
//! so concurrent processes never read a half-written PTX. Stale entries are never read (their key
//! differs) and may be deleted at any time.

use crate::compile::Arch;
use std::path::{Path, PathBuf};

/// Bumped when the cache layout or key material changes.
const FORMAT: &str = "dm-kernels-ptx-cache-v1";

fn fnv1a64(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The cache key of one compilation.
pub(crate) fn key(source: &str, compute_arch: &str, options: &[String], nvrtc: (i32, i32)) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    // A separator byte that cannot occur in the parts keeps ("ab", "c") and ("a", "bc") apart.
    for part in [FORMAT, source, compute_arch, &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1)] {
        h = fnv1a64(h, part.as_bytes());
        h = fnv1a64(h, &[0xff]);
    }
    for o in options {
        h = fnv1a64(h, o.as_bytes());
        h = fnv1a64(h, &[0xfe]);
    }
    h
}

/// The cache folder: `$DALLE_MESH_CACHE/kernels`, else `$HOME/.cache/dalle-mesh/kernels`.
pub(crate) fn dir() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("DALLE_MESH_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(root).join("kernels"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".cache").join("dalle-mesh").join("kernels"))
}

/// The file for one compilation; None (caching off) when the folder cannot be created.
pub(crate) fn path(family: &str, arch: &Arch, key: u64) -> Option<PathBuf> {
    let dir = dir()?;
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(format!("{family}-{}-{key:016x}.ptx", arch.sm())))
}

/// The cached PTX, if present and plausible.
pub(crate) fn read(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    (text.contains(".version") && text.contains(".target")).then_some(text)
}

/// Stores `ptx` atomically; failures only mean the next run compiles again.
pub(crate) fn write(path: &Path, ptx: &str) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, ptx).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_part() {
        let opts = vec!["-std=c++17".to_string()];
        let base = key("src", "compute_90", &opts, (13, 0));
        assert_eq!(base, key("src", "compute_90", &opts, (13, 0)));
        assert_ne!(base, key("src2", "compute_90", &opts, (13, 0)));
        assert_ne!(base, key("src", "compute_80", &opts, (13, 0)));
        assert_ne!(base, key("src", "compute_90", &[], (13, 0)));
        assert_ne!(base, key("src", "compute_90", &opts, (13, 1)));
        // FNV-1a reference value: empty input.
        assert_eq!(fnv1a64(0xcbf2_9ce4_8422_2325, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(0xcbf2_9ce4_8422_2325, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn read_rejects_non_ptx() {
        let dir = std::env::temp_dir().join(format!("dm-kernels-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.ptx");
        write(&p, "garbage");
        assert!(read(&p).is_none());
        write(&p, ".version 9.0\n.target sm_90\n");
        assert!(read(&p).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
