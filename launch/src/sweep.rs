//! placeholder
use anyhow::Result;
use std::path::Path;
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Launcher { Local, Slurm }
pub fn run(_c: &Path, _o: &Path, _l: Launcher) -> Result<serde_json::Value> { anyhow::bail!("not implemented yet") }
