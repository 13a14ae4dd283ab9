//! Compile-and-assemble check of every kernel: NVRTC to PTX, then (when `ptxas` is available)
//! PTX to SASS for the real architecture with `-v`, whose report gives registers, spills and
//! shared memory per entry point.

use crate::compile::{compile_ptx_uncached, Arch};
use crate::family::{mismatch, KernelFamily};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `ptxas -v` reports for one entry point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtxasReport {
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_bytes: u32,
    /// Static shared memory (dynamic shared memory is set per call and is not included).
    pub smem_bytes: u32,
    pub barriers: u32,
    /// ptxas warnings naming this function.
    pub warnings: Vec<String>,
}

/// One line of the check: one entry point of one family, or (entry point `*`) a family-level
/// message such as NVRTC warnings or a failure that concerns the whole file.
#[derive(Debug, Clone)]
pub struct CheckLine {
    pub family: &'static str,
    pub entry_point: String,
    /// None when the entry point compiled (and assembled, when ptxas ran) cleanly enough to load.
    pub error: Option<String>,
    /// NVRTC or ptxas warnings (a clean kernel has none).
    pub warnings: Vec<String>,
    /// None when ptxas was not available (or the family failed to compile).
    pub ptxas: Option<PtxasReport>,
}

impl CheckLine {
    /// Compiled (and assembled) without error or warning.
    pub fn is_clean(&self) -> bool {
        self.error.is_none() && self.warnings.is_empty()
    }
    pub fn spills(&self) -> u32 {
        self.ptxas.as_ref().map_or(0, |r| r.spill_store_bytes + r.spill_load_bytes)
    }
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (&self.error, self.warnings.is_empty()) {
            (Some(_), _) => "ERROR",
            (None, false) => "warn",
            (None, true) => "ok",
        };
        write!(f, "{:<14} {:<32} {:<5}", self.family, self.entry_point, status)?;
        match &self.ptxas {
            Some(r) => write!(
                f,
                " regs {:>3}  spill {:>4}/{:<4} B  stack {:>4} B  smem {:>6} B",
                r.registers, r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes, r.smem_bytes
            )?,
            None if self.error.is_none() && self.entry_point != "*" => write!(f, " (ptxas not run)")?,
            None => {}
        }
        if let Some(e) = &self.error {
            write!(f, "  {}", e.lines().next().unwrap_or(""))?;
        }
        for w in &self.warnings {
            write!(f, "\n    warning: {w}")?;
        }
        Ok(())
    }
}

/// The ptxas to use: `$PTXAS`, else `ptxas` on PATH, else `$CUDA_HOME/bin/ptxas`.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PTXAS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join("ptxas")).collect::<Vec<_>>())
        .unwrap_or_default();
    let cuda_home = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin").join("ptxas"));
    on_path.into_iter().chain(cuda_home).find(|p| p.is_file())
}

/// Compiles every family of `families` for `arch` (uncached, so NVRTC warnings are seen), compares
/// each entry point's PTX parameter list with its typed descriptor and, when `ptxas` is found,
/// assembles it and reports each entry point. Never panics: every failure is a line.
pub fn check(arch: &str, families: &[KernelFamily]) -> Vec<CheckLine> {
    let ptxas = find_ptxas();
    let mut lines = Vec::new();
    for fam in families {
        check_family(fam, arch, ptxas.as_deref(), &mut lines);
    }
    lines
}

fn family_line(fam: &KernelFamily, error: Option<String>, warnings: Vec<String>) -> CheckLine {
    CheckLine { family: fam.name, entry_point: "*".to_string(), error, warnings, ptxas: None }
}

fn check_family(fam: &KernelFamily, arch: &str, ptxas: Option<&Path>, lines: &mut Vec<CheckLine>) {
    let compiled = match compile_ptx_uncached(fam, arch) {
        Ok(c) => c,
        Err(e) => {
            lines.push(family_line(fam, Some(e.to_string()), Vec::new()));
            return;
        }
    };
    if let Some(e) = mismatch(fam, Some(&compiled.ptx)) {
        lines.push(family_line(fam, Some(e), Vec::new()));
    }
    if !compiled.log.is_empty() {
        let warnings = compiled.log.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
        lines.push(family_line(fam, None, warnings));
    }
    let reports = match ptxas {
        None => None,
        Some(exe) => match run_ptxas(exe, fam, &compiled.arch, &compiled.ptx) {
            Ok((reports, global_warnings)) => {
                if !global_warnings.is_empty() {
                    lines.push(family_line(fam, None, global_warnings));
                }
                Some(reports)
            }
            Err(e) => {
                lines.push(family_line(fam, Some(e), Vec::new()));
                None
            }
        },
    };
    for entry in fam.entry_points() {
        let in_ptx = compiled.ptx.contains(&format!(".entry {entry}("));
        let report = reports.as_ref().and_then(|r| r.get(entry)).cloned();
        let error = if !in_ptx {
            Some(format!("entry point {entry} is missing from the PTX"))
        } else if reports.is_some() && report.is_none() {
            Some(format!("ptxas reported nothing for {entry}"))
        } else {
            None
        };
        let warnings = report.as_ref().map(|r| r.warnings.clone()).unwrap_or_default();
        lines.push(CheckLine { family: fam.name, entry_point: entry.to_string(), error, warnings, ptxas: report });
    }
}

type Reports = (BTreeMap<String, PtxasReport>, Vec<String>);

/// Assembles `ptx` with `ptxas -v` for `arch`; returns per-function reports and the warnings that
/// name no function.
fn run_ptxas(exe: &Path, fam: &KernelFamily, arch: &Arch, ptx: &str) -> Result<Reports, String> {
    let dir = std::env::temp_dir().join(format!("dm-kernels-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ptx_path = dir.join(format!("{}-{}.ptx", fam.name, arch.sm()));
    let cubin_path = ptx_path.with_extension("cubin");
    std::fs::write(&ptx_path, ptx).map_err(|e| format!("cannot write {}: {e}", ptx_path.display()))?;
    let output = Command::new(exe)
        .arg(format!("-arch={}", arch.sm()))
        .args(["-v", "--warn-on-spills", "-o"])
        .arg(&cubin_path)
        .arg(&ptx_path)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let _ = std::fs::remove_file(&ptx_path);
    let _ = std::fs::remove_file(&cubin_path);
    let _ = std::fs::remove_dir(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(format!("{} exited with {}: {}", exe.display(), output.status, text.trim()));
    }
    Ok(parse_ptxas(&text))
}

/// The number just before `unit` in `line` (`"Used 12 registers"` → 12 for unit `"registers"`).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let pos = line.find(unit)?;
    line[..pos].split_whitespace().next_back()?.parse().ok()
}

/// Parses the `ptxas -v` report into per-function entries plus warnings that name no function.
pub(crate) fn parse_ptxas(text: &str) -> Reports {
    let mut reports: BTreeMap<String, PtxasReport> = BTreeMap::new();
    let mut global_warnings = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().map(str::to_string);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = Some(rest.trim().to_string());
        }
        if line.contains("warning") {
            continue; // second pass, once every function name is known
        }
        let Some(name) = current.clone() else { continue };
        let r = reports.entry(name).or_default();
        if let Some(v) = number_before(line, "bytes stack frame") {
            r.stack_bytes = v;
        }
        if let Some(v) = number_before(line, "bytes spill stores") {
            r.spill_store_bytes = v;
        }
        if let Some(v) = number_before(line, "bytes spill loads") {
            r.spill_load_bytes = v;
        }
        if let Some(v) = number_before(line, "registers") {
            r.registers = v;
        }
        if let Some(v) = number_before(line, "barriers") {
            r.barriers = v;
        }
        if let Some(v) = number_before(line, "bytes smem") {
            r.smem_bytes = v;
        }
    }
    // ptxas prints warnings on stderr, which may come before or after the report on stdout.
    for line in text.lines().filter(|l| l.contains("warning")) {
        let named = reports.keys().find(|name| line.contains(&format!("'{name}'"))).cloned();
        match named {
            Some(name) => reports.entry(name).or_default().warnings.push(line.trim().to_string()),
            None => global_warnings.push(line.trim().to_string()),
        }
    }
    (reports, global_warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_report() {
        let text = "ptxas warning : Registers are spilled to local memory in function 'matmul_f32_nn', 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'matmul_f32_nn' for 'sm_90'\n\
ptxas info    : Function properties for matmul_f32_nn\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 49152 bytes smem, 416 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'fill_f32' for 'sm_90'\n\
ptxas info    : Function properties for fill_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 10 registers, 380 bytes cmem[0]\n\
ptxas warning : something global\n";
        let (r, global) = parse_ptxas(text);
        let m = &r["matmul_f32_nn"];
        assert_eq!((m.registers, m.spill_store_bytes, m.spill_load_bytes, m.stack_bytes), (168, 4, 12, 8));
        assert_eq!((m.smem_bytes, m.barriers, m.warnings.len()), (49152, 1, 1));
        let f = &r["fill_f32"];
        assert_eq!((f.registers, f.smem_bytes, f.warnings.len()), (10, 0, 0));
        assert_eq!(global, vec!["ptxas warning : something global".to_string()]);
    }

    #[test]
    fn check_line_prints_on_one_line() {
        let line = CheckLine {
            family: "glu",
            entry_point: "gelu_glu_forward_f32".into(),
            error: None,
            warnings: vec![],
            ptxas: Some(PtxasReport { registers: 12, ..Default::default() }),
        };
        let s = line.to_string();
        assert!(s.contains("ok") && s.contains("regs  12") && !s.contains('\n'), "{s}");
    }
}
