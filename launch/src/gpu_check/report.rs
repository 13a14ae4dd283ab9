//! The report of `gpu-check`: its rows, the table on stderr and `gpu-check.json`.

use super::*;

/// Outcome of one correctness row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skipped,
}

/// One correctness check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub group: String,
    pub name: String,
    pub status: Status,
    /// Worst relative error (None when not applicable).
    pub error: Option<f64>,
    pub tolerance: Option<f64>,
    pub detail: String,
}

/// One benchmark figure.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub group: String,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuCheckReport {
    /// Whether a usable GPU was found (false: nothing below ran).
    pub available: bool,
    pub message: String,
    pub device: Option<String>,
    pub arch: Option<String>,
    pub driver_version: Option<i32>,
    pub kernel_load_s: Option<f64>,
    pub checks: Vec<CheckRow>,
    pub benches: Vec<BenchRow>,
    pub failed: usize,
    pub pass: bool,
    pub elapsed_s: f64,
    pub json: Option<PathBuf>,
}

impl GpuCheckReport {
    /// 0 all correctness rows passed, 1 some failed, 2 no usable GPU.
    pub fn exit_code(&self) -> i32 {
        if !self.available {
            2
        } else if self.pass {
            0
        } else {
            1
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("gpu-check: {}\n", self.message));
        if !self.available {
            return s;
        }
        s.push_str(&format!("{:<10} {:<58} {:<7} {:>10} {:>9}  detail\n", "group", "check", "status", "error", "tol"));
        for r in &self.checks {
            let st = match r.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skipped => "SKIPPED",
            };
            let e = r.error.map_or_else(|| "-".into(), |e| format!("{e:.2e}"));
            let t = r.tolerance.map_or_else(|| "-".into(), |t| format!("{t:.0e}"));
            s.push_str(&format!("{:<10} {:<58} {:<7} {:>10} {:>9}  {}\n", r.group, r.name, st, e, t, r.detail));
        }
        s.push_str(&format!("\n{:<10} {:<58} {:>12} {:<10} detail\n", "group", "benchmark", "value", "unit"));
        for b in &self.benches {
            s.push_str(&format!("{:<10} {:<58} {:>12.2} {:<10} {}\n", b.group, b.name, b.value, b.unit, b.detail));
        }
        s.push_str(&format!(
            "\n{} correctness rows, {} failed; {:.1} s\n",
            self.checks.iter().filter(|r| r.status != Status::Skipped).count(),
            self.failed,
            self.elapsed_s
        ));
        s
    }
}

pub(super) fn write_json(opts: &GpuCheckOptions, report: &mut GpuCheckReport) -> Result<()> {
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("gpu-check.json");
        report.json = Some(path.clone());
        crate::atomic_write(&path, serde_json::to_string_pretty(report)?.as_bytes())?;
    }
    Ok(())
}
