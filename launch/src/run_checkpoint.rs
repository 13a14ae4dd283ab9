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

use anyhow::{Context, Result};
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
/// `quality` (lower is better) decides the best checkpoint, which the rotation keeps.
pub fn write_checkpoint(
    out: &Path,
    step: u64,
    files: &[(&str, Vec<u8>)],
    keep: usize,
    quality: Option<f32>,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let final_dir = step_dir(out, step);
    let tmp = root.join(format!(".tmp-step_{step:08}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = write_files(&tmp, step, files) {
        // A failed write (a full disk, say) must not leave its partial copy taking space.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint step {step} into {} failed; its temporary folder was removed and the previous \
             checkpoints are intact",
            root.display()
        )));
    }
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
    let best = update_best(out, step, quality)?;
    prune(&root, keep, best)?;
    Ok(final_dir)
}

/// Writes `files` and the manifest into `tmp`, each fsynced.
fn write_files(tmp: &Path, step: u64, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let mut sums = Vec::new();
    for (name, bytes) in files {
        let path = tmp.join(name);
        let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        crate::test_disk_full(step).with_context(|| format!("writing {}", path.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        sums.push(FileSum { name: name.to_string(), bytes: bytes.len() as u64, crc32: crc32fast::hash(bytes) });
    }
    crate::test_hook("checkpoint", step);
    let manifest = CheckpointManifest { format: 1, step, files: sums };
    let path = tmp.join(MANIFEST);
    let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    f.sync_all()?;
    fsync_dir(tmp);
    Ok(())
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

/// `checkpoints/best.json`: the step of the best checkpoint and its quality.
pub const BEST: &str = "best.json";

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Best {
    step: u64,
    quality: f32,
}

/// The best checkpoint's step after saving `step` with `quality` (a best whose folder is gone,
/// or an unreadable best.json, is replaced).
fn update_best(out: &Path, step: u64, quality: Option<f32>) -> Result<Option<u64>> {
    let path = out.join("checkpoints").join(BEST);
    let old: Option<Best> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|b: &Best| step_dir(out, b.step).join(MANIFEST).exists() && b.step != step);
    let new = match (old, quality) {
        (Some(o), Some(q)) if q.is_finite() && q < o.quality => Best { step, quality: q },
        (Some(o), _) => o,
        (None, Some(q)) if q.is_finite() => Best { step, quality: q },
        (None, _) => return Ok(None),
    };
    crate::atomic_write(&path, &serde_json::to_vec(&new)?)?;
    Ok(Some(new.step))
}

/// Removes leftovers of interrupted writes and all but the newest `keep` checkpoints (and `best`).
fn prune(root: &Path, keep: usize, best: Option<u64>) -> Result<()> {
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
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)).filter(|(s, _)| Some(*s) != best) {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Checks every file of a checkpoint against its manifest.
pub fn verify(dir: &Path) -> Result<CheckpointManifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        crate::bad_input!("{}: no readable manifest.json ({e}): not a complete checkpoint", dir.display())
    })?;
    let m: CheckpointManifest = serde_json::from_str(&text)
        .map_err(|e| crate::bad_input!("{}: corrupt checkpoint manifest ({e})", path.display()))?;
    for f in &m.files {
        if Path::new(&f.name).components().count() != 1 {
            return Err(crate::bad_input!("{}: corrupt checkpoint manifest (file name {:?})", path.display(), f.name));
        }
        let p = dir.join(&f.name);
        let bytes =
            std::fs::read(&p).map_err(|e| crate::bad_input!("checkpoint file {} is missing ({e})", p.display()))?;
        let crc = crc32fast::hash(&bytes);
        if bytes.len() as u64 != f.bytes || crc != f.crc32 {
            return Err(crate::bad_input!(
                "checkpoint file {} does not match its checksum in manifest.json ({} bytes, crc32 {crc:08x}; \
                 expected {} bytes, crc32 {:08x}): the \
                 checkpoint is corrupt. `--resume RUN_FOLDER` falls back to the newest checkpoint that verifies; or \
                 name an older one with --resume RUN_FOLDER/checkpoints/step_N",
                p.display(),
                bytes.len(),
                f.bytes,
                f.crc32
            ));
        }
    }
    Ok(m)
}

/// Whether `path` is one checkpoint folder (rather than a run folder).
pub fn is_checkpoint_dir(path: &Path) -> bool {
    path.join(MANIFEST).exists()
        || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_"))
            && path.parent().is_some_and(|p| p.ends_with("checkpoints"))
}

/// The run folder of a run folder or of one of its checkpoints (`RUN/checkpoints/step_N`).
pub fn run_folder(path: &Path) -> PathBuf {
    if is_checkpoint_dir(path) {
        if let Some(run) = path.parent().and_then(Path::parent) {
            return run.to_path_buf();
        }
    }
    path.to_path_buf()
}

/// Removes what dead runs left in `out/checkpoints` (temporary folders of interrupted writes) and
/// puts back a checkpoint whose re-save was interrupted between its two renames. Call only while
/// holding the run lock ([`crate::run_lock`]). Returns the paths removed.
pub fn clean_leftovers(out: &Path) -> Result<Vec<PathBuf>> {
    let root = out.join("checkpoints");
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(removed) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix(".old-") {
            // `.old-step_N-PID`: the published copy before a re-save; restore it if the new one is missing.
            let step_name = rest.rsplit_once('-').map_or(rest, |(s, _)| s);
            let published = root.join(step_name);
            if !published.exists() && e.path().join(MANIFEST).exists() {
                std::fs::rename(e.path(), &published)
                    .with_context(|| format!("restoring {} to {}", e.path().display(), published.display()))?;
                tracing::warn!(dir = %published.display(), "restored a checkpoint whose re-save was interrupted");
                continue;
            }
        } else if !name.starts_with(".tmp-") {
            continue;
        }
        std::fs::remove_dir_all(e.path()).with_context(|| format!("removing leftover {}", e.path().display()))?;
        removed.push(e.path());
    }
    if !removed.is_empty() {
        tracing::warn!(?removed, "removed temporary checkpoint folders left by a dead run");
    }
    Ok(removed)
}

/// Moves the checkpoints of `out` newer than `step` to `out/checkpoints/set-aside/` (never
/// deleting them): after resuming from `step` they belong to an abandoned branch (or failed to
/// verify), and neither `--resume` nor the rotation may pick them again. Returns where they went.
pub fn set_aside_newer(out: &Path, step: u64, why: &str) -> Result<Vec<PathBuf>> {
    let aside = out.join("checkpoints").join("set-aside");
    let mut moved = Vec::new();
    for (s, dir) in list_checkpoints(out).into_iter().filter(|(s, _)| *s > step) {
        std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| format!("step_{s:08}"));
        let mut dest = aside.join(&name);
        let mut n = 1;
        while dest.exists() {
            dest = aside.join(format!("{name}.{n}"));
            n += 1;
        }
        std::fs::rename(&dir, &dest).with_context(|| format!("moving {} to {}", dir.display(), dest.display()))?;
        tracing::warn!(from = %dir.display(), to = %dest.display(), "set aside a checkpoint newer than the resumed one: {why}");
        moved.push(dest);
    }
    Ok(moved)
}

/// The newest checkpoint of `path` (a run folder, or one checkpoint) whose files verify; each
/// newer one that doesn't is named in a warning and left in place.
pub fn newest_verified(path: &Path) -> Result<PathBuf> {
    if is_checkpoint_dir(path) {
        verify(path)?;
        return Ok(path.to_path_buf());
    }
    let mut skipped = Vec::new();
    for (_, dir) in list_checkpoints(path).into_iter().rev() {
        match verify(&dir) {
            Ok(_) => return Ok(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "skipping a checkpoint that does not verify: {e:#}");
                skipped.push(format!("{e:#}"));
            }
        }
    }
    if skipped.is_empty() {
        latest(path)
    } else {
        Err(crate::bad_input!("no checkpoint of {} verifies:\n  {}", path.display(), skipped.join("\n  ")))
    }
}

/// The newest checkpoint of a run folder (or the folder itself if it is a checkpoint).
pub fn latest(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST).exists() {
        return Ok(path.to_path_buf());
    }
    match list_checkpoints(path).pop() {
        Some((_, dir)) => Ok(dir),
        None => Err(crate::bad_input!(
            "{} holds no checkpoint (expected {}/checkpoints/step_*/): check the path",
            path.display(),
            path.display()
        )),
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
            write_checkpoint(&out, step, &[("a.bin", vec![step as u8; 100])], 2, None).unwrap();
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
