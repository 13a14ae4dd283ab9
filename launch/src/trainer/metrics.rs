//! metrics.jsonl of a run: one JSON object per logged step and per evaluation, appended and
//! flushed line by line; a resumed run drops the lines after its checkpoint's step.

use anyhow::Result;
use std::io::Write;
use std::path::Path;

/// Appends JSON lines to metrics.jsonl.
pub struct Metrics {
    file: std::fs::File,
}

impl Metrics {
    /// Opens metrics.jsonl, dropping lines after `resume_step` (they belong to the interrupted run).
    /// Also says whether the kept lines already hold `unigram_baseline_loss`.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<(Self, bool)> {
        let mut has_baseline = false;
        if let (Some(step), Ok(text)) = (resume_step, std::fs::read_to_string(path)) {
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            has_baseline = kept.contains("\"unigram_baseline_loss\"");
            crate::atomic_write(path, kept.as_bytes())?;
        } else if resume_step.is_none() {
            let _ = std::fs::remove_file(path);
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok((Self { file }, has_baseline))
    }
    pub fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        self.file.flush()?;
        Ok(())
    }
}
