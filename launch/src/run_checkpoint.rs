//! Training checkpoints: a folder per saved step under `OUT/checkpoints/step_NNNNNNNN/` with
//!
//! | file | contents |
//! |---|---|
//! | `weights.safetensors` + `config.json` | the model under dalle-mini's names (what `parity` and `sample` load) |
//! | `optimizer.safetensors` | AdamW moments `m.<param>`, `v.<param>` (f32) |
//! | `trainer_state.json` | step, optimizer step, data-reader position, run config |
//! | `tokenizer.json`, `data.json` | what sampling needs to tokenise prompts and decode codes |
//! | `manifest.json` | size and CRC-32 of every file above, written last |
//!
//! A checkpoint is written into a temporary folder (every file fsynced), then renamed into
//! place, so a crash at any moment leaves either no new checkpoint or a complete one; loading
//! verifies every checksum. The last `keep` checkpoints are kept.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileSum {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointManifest {
    pub format: u32,
    pub step: u64,
    pub files: Vec<FileSum>,
}

/// The folder of step `step` under `out`.
pub fn step_dir(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step_{step:08}"))
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes one checkpoint atomically. `files` are (name, bytes).
pub fn write_checkpoint(out: &Path, step: u64, files: &[(&str, Vec<u8>)], keep: usize) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let final_dir = step_dir(out, step);
    let tmp = root.join(format!(".tmp-step_{step:08}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut sums = Vec::new();
    for (name, bytes) in files {
        let path = tmp.join(name);
        let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        sums.push(FileSum { name: name.to_string(), bytes: bytes.len() as u64, crc32: crc32fast::hash(bytes) });
    }
    crate::test_hook("checkpoint", step);
    let manifest = CheckpointManifest { format: 1, step, files: sums };
    let path = tmp.join(MANIFEST);
    let mut f = std::fs::File::create(&path)?;
    f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    f.sync_all()?;
    fsync_dir(&tmp);
    if final_dir.exists() {
        // Re-saving a step (e.g. after a resume): replace the old copy only once the new one is whole.
        let old = root.join(format!(".old-step_{step:08}-{}", std::process::id()));
        std::fs::rename(&final_dir, &old)?;
        std::fs::rename(&tmp, &final_dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &final_dir).with_context(|| format!("publishing {}", final_dir.display()))?;
    }
    fsync_dir(&root);
    prune(&root, keep)?;
    Ok(final_dir)
}

/// Saved checkpoint folders, oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let root = out.join("checkpoints");
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step_")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    // Leftover temporaries of interrupted writes are garbage by construction.
    for e in std::fs::read_dir(root)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            let pid_alive =
                name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| p == std::process::id());
            if !pid_alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let all = list_checkpoints(root.parent().unwrap_or(root));
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Checks every file of a checkpoint against its manifest.
pub fn verify(dir: &Path) -> Result<CheckpointManifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} has no readable manifest.json: not a complete checkpoint", dir.display()))?;
    let m: CheckpointManifest =
        serde_json::from_str(&text).with_context(|| format!("{}: manifest.json is corrupt", dir.display()))?;
    for f in &m.files {
        let p = dir.join(&f.name);
        let bytes = std::fs::read(&p).with_context(|| format!("checkpoint file {} is missing", p.display()))?;
        if bytes.len() as u64 != f.bytes || crc32fast::hash(&bytes) != f.crc32 {
            bail!(
                "checkpoint file {} does not match its checksum ({} bytes, expected {}): the checkpoint is corrupt; \
                 resume from an older one with --resume-from",
                p.display(),
                bytes.len(),
                f.bytes
            );
        }
    }
    Ok(m)
}

/// The newest checkpoint of a run folder (or the folder itself if it is a checkpoint).
pub fn latest(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST).exists() {
        return Ok(path.to_path_buf());
    }
    match list_checkpoints(path).pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!("{} holds no checkpoint (expected {}/checkpoints/step_*/)", path.display(), path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_verifies_prunes_and_detects_corruption() {
        let out = std::env::temp_dir().join(format!("dm-ckpt-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        for step in [10, 20, 30] {
            write_checkpoint(&out, step, &[("a.bin", vec![step as u8; 100])], 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(&out).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let newest = latest(&out).unwrap();
        assert_eq!(verify(&newest).unwrap().step, 30);
        std::fs::write(newest.join("a.bin"), vec![0u8; 100]).unwrap();
        let err = verify(&newest).unwrap_err().to_string();
        assert!(err.contains("a.bin") && err.contains("checksum"), "{err}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}
