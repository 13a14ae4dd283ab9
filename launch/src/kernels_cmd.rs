//! `dalle-mesh kernels check [--arch sm_90]`: compiles every CUDA kernel family with NVRTC for
//! one architecture (no GPU needed) and, when `ptxas` is found (`$PTXAS`, PATH, `$CUDA_HOME/bin`),
//! assembles it and reports registers, spills and shared memory per entry point.

use anyhow::Result;
use serde::Serialize;

/// What `kernels check` found.
#[derive(Debug, Clone, Serialize)]
pub struct KernelsCheckReport {
    pub arch: String,
    /// NVRTC's version, or why it is unavailable.
    pub nvrtc: String,
    pub ptxas: Option<String>,
    /// Entry points checked.
    pub kernels: usize,
    /// Lines with an error (a kernel that failed to compile or assemble).
    pub errors: usize,
    /// Lines with warnings or register spills (reported, not failures).
    pub warnings: usize,
    /// False when NVRTC is missing: nothing was compiled.
    pub nvrtc_available: bool,
    pub pass: bool,
}

impl KernelsCheckReport {
    /// 0 when every kernel compiled, 1 when one failed, 2 when NVRTC is missing.
    pub fn exit_code(&self) -> i32 {
        if !self.nvrtc_available {
            2
        } else if self.pass {
            0
        } else {
            1
        }
    }
}

/// Runs the check for `arch` (e.g. `sm_90`), printing one line per kernel on stderr.
pub fn run(arch: &str) -> Result<KernelsCheckReport> {
    let ptxas = dm_kernels::find_ptxas().map(|p| p.display().to_string());
    if let Err(e) = dm_kernels::nvrtc_available() {
        eprintln!("kernels check: {e}");
        return Ok(KernelsCheckReport {
            arch: arch.to_string(),
            nvrtc: e.to_string(),
            ptxas,
            kernels: 0,
            errors: 0,
            warnings: 0,
            nvrtc_available: false,
            pass: false,
        });
    }
    let nvrtc = dm_kernels::nvrtc_version().map_or_else(|e| e.to_string(), |(a, b)| format!("{a}.{b}"));
    eprintln!("kernels check: arch {arch}, NVRTC {nvrtc}, ptxas {}", ptxas.as_deref().unwrap_or("not found"));
    let lines = dm_kernels::check(arch, dm_runtime::ops::kernel_registry::kernel_families());
    let (mut errors, mut warnings) = (0, 0);
    for line in &lines {
        eprintln!("{line}");
        if line.error.is_some() {
            errors += 1;
        } else if !line.is_clean() || line.spills() > 0 {
            warnings += 1;
        }
    }
    for line in lines.iter().filter(|l| l.error.is_some()) {
        eprintln!("\n--- {} {} ---\n{}", line.family, line.entry_point, line.error.as_deref().unwrap_or(""));
    }
    let kernels = lines.iter().filter(|l| l.entry_point != "*").count();
    eprintln!("{kernels} kernels checked: {errors} error line(s), {warnings} warning/spill line(s)");
    Ok(KernelsCheckReport {
        arch: arch.to_string(),
        nvrtc,
        ptxas,
        kernels,
        errors,
        warnings,
        nvrtc_available: true,
        pass: errors == 0 && kernels > 0,
    })
}
