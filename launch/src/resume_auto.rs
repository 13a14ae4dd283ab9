//! `--resume auto`: what a self-requeueing sbatch script passes. Continue from the newest
//! checkpoint of `--out` that loads when the folder has checkpoints, else start a fresh run there.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// The value of `--resume` that asks for [`resolve`].
pub const AUTO: &str = "auto";

/// True when `--resume` was given as `auto`.
pub fn is_auto(resume: Option<&Path>) -> bool {
    resume.is_some_and(|p| p.as_os_str() == AUTO)
}

/// The `--resume` path `auto` stands for: `out` when it holds checkpoints (the newest that loads
/// is taken, and one that doesn't is skipped with a warning, as for `--resume OUT`), `None` (a
/// fresh start) when it holds none. `out` is required.
pub fn resolve(out: Option<&Path>) -> Result<Option<PathBuf>> {
    let Some(out) = out else {
        return Err(crate::bad_input!(
            "--resume auto needs --out: it continues the run in that folder when it holds a checkpoint and starts \
             one there otherwise (e.g. `dalle-mesh train --config run.yaml --out runs/job --resume auto`)"
        ));
    };
    let checkpoints = crate::run_checkpoint::list_checkpoints(out);
    match checkpoints.last() {
        Some((step, _)) => {
            tracing::info!(out = %out.display(), newest_step = step, "--resume auto: continuing the run in --out");
            Ok(Some(out.to_path_buf()))
        }
        None => {
            tracing::info!(out = %out.display(), "--resume auto: no checkpoint in --out, starting a fresh run");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_out_and_follows_the_folder() {
        assert!(is_auto(Some(Path::new("auto"))) && !is_auto(Some(Path::new("runs/auto/x"))) && !is_auto(None));
        let e = resolve(None).unwrap_err();
        assert_eq!(crate::exit_code::for_error(&e), crate::exit_code::BAD_INPUT);
        assert!(e.to_string().contains("--out"), "{e}");
        let dir = std::env::temp_dir().join(format!("dm-resume-auto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(resolve(Some(&dir)).unwrap(), None);
        std::fs::create_dir_all(dir.join("checkpoints/step_00000004")).unwrap();
        assert_eq!(resolve(Some(&dir)).unwrap(), Some(dir.clone()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
