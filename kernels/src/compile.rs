//! NVRTC compilation of a kernel family to PTX, with a probe for libnvrtc and the disk cache.

use crate::cache;
use crate::error::{Error, Result};
use crate::family::{KernelFamily, PRELUDE};
use cudarc::nvrtc::{result, sys};
use std::ffi::{c_char, CString};
use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A GPU architecture: `sm_90` is `Arch { major_minor: 90, suffix: "" }`, `sm_90a` has suffix `a`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major_minor: u32,
    pub suffix: String,
}

impl Arch {
    /// Accepts `sm_90`, `compute_90`, `90`, `sm_90a`, `compute_100f`, …
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        let t = t.strip_prefix("sm_").or_else(|| t.strip_prefix("compute_")).unwrap_or(t);
        let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
        let suffix = &t[digits.len()..];
        if digits.len() < 2 || !matches!(suffix, "" | "a" | "f") {
            return Err(Error::BadArch(s.to_string()));
        }
        let major_minor = digits.parse().map_err(|_| Error::BadArch(s.to_string()))?;
        let arch = Self { major_minor, suffix: suffix.to_string() };
        if major_minor < 80 {
            return Err(Error::ArchTooOld(arch.sm()));
        }
        Ok(arch)
    }
    /// The virtual architecture NVRTC compiles for: `compute_90`.
    pub fn compute(&self) -> String {
        format!("compute_{}{}", self.major_minor, self.suffix)
    }
    /// The real architecture ptxas assembles for: `sm_90`.
    pub fn sm(&self) -> String {
        format!("sm_{}{}", self.major_minor, self.suffix)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sm())
    }
}

/// The PTX of one kernel family for one architecture.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    /// Family name (the module name to load the PTX under).
    pub family: &'static str,
    pub arch: Arch,
    /// The PTX text (no trailing NUL).
    pub ptx: String,
    /// NVRTC's log: warnings on success (empty when clean; empty too when served from the cache).
    pub log: String,
    /// The exact NVRTC options used.
    pub options: Vec<String>,
    /// libnvrtc's (major, minor) version.
    pub nvrtc_version: (i32, i32),
    /// Whether the PTX came from the disk cache.
    pub from_cache: bool,
    /// Where the PTX is cached (None when caching is off or the cache folder is unusable).
    pub cache_path: Option<PathBuf>,
}

/// Whether libnvrtc can be loaded. cudarc panics on first use when it cannot, so every entry to
/// NVRTC goes through this probe first.
pub fn nvrtc_available() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries `libloading::Library::new` on cudarc's candidate names
    // (and drops what it opened); loading libnvrtc runs no initialisation with preconditions.
    let present = *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        let mut names = cudarc::get_lib_name_candidates("nvrtc");
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        let searched = names.join(", ");
        Err(Error::NvrtcMissing { searched })
    }
}

/// libnvrtc's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loadable (probed above); both pointers are valid for writes.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| Error::Nvrtc {
        family: String::new(),
        call: "nvrtcVersion",
        status: format!("{e:?}"),
    })?;
    Ok((major, minor))
}

/// The CUDA headers folder handed to NVRTC as an include path: `$CUDA_INCLUDE_DIR`, else
/// `$CUDA_HOME/include`, else `/usr/local/cuda/include` — the first that exists. The kernels
/// include no header today (see cuda/common.cuh), so None is not an error; the path is passed
/// so that a future `#include <cuda_bf16.h>` resolves against the same toolkit as libnvrtc.
pub fn include_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CUDA_INCLUDE_DIR").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_dir())
}

/// The NVRTC options for `family` on `arch`.
fn options(family: &KernelFamily, arch: &Arch) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={}", arch.compute()),
        "-std=c++17".to_string(),
        // Source line info for profilers (Nsight); changes neither code generation nor speed.
        "-lineinfo".to_string(),
    ];
    if let Some(dir) = include_dir() {
        opts.push(format!("--include-path={}", dir.display()));
    }
    opts.extend(family.defines.iter().map(|d| d.to_string()));
    opts
}

/// The text NVRTC compiles: the prelude, then the family, with `#line` markers so that errors
/// point into the right file.
fn full_source(family: &KernelFamily) -> String {
    format!("#line 1 \"common.cuh\"\n{PRELUDE}\n#line 1 \"{}\"\n{}", family.file, family.source)
}

/// Compiles `family` for `arch` (e.g. `"sm_90"`), serving the PTX from the disk cache when an
/// identical compilation was done before (same source, arch, options and NVRTC version). The cache
/// lives in `$DALLE_MESH_CACHE/kernels`, else `~/.cache/dalle-mesh/kernels`; an unusable cache
/// folder only disables caching.
pub fn compile_ptx(family: &KernelFamily, arch: &str) -> Result<CompiledKernel> {
    compile(family, arch, true)
}

/// As [`compile_ptx`], bypassing the cache (neither read nor written): for checks of the compiler
/// log, which a cached PTX does not carry.
pub fn compile_ptx_uncached(family: &KernelFamily, arch: &str) -> Result<CompiledKernel> {
    compile(family, arch, false)
}

fn compile(family: &KernelFamily, arch: &str, use_cache: bool) -> Result<CompiledKernel> {
    let arch = Arch::parse(arch)?;
    let version = nvrtc_version()?;
    let options = options(family, &arch);
    let source = full_source(family);
    let key = cache::key(&source, &arch.compute(), &options, version);
    let cache_path = use_cache.then(|| cache::path(family.name, &arch, key)).flatten();
    if let Some(ptx) = cache_path.as_deref().and_then(cache::read) {
        return Ok(CompiledKernel {
            family: family.name,
            arch,
            ptx,
            log: String::new(),
            options,
            nvrtc_version: version,
            from_cache: true,
            cache_path,
        });
    }
    let (ptx, log) = nvrtc_compile(family, &arch, &source, &options)?;
    if let Some(p) = cache_path.as_deref() {
        cache::write(p, &ptx);
    }
    Ok(CompiledKernel {
        family: family.name,
        arch,
        ptx,
        log,
        options,
        nvrtc_version: version,
        from_cache: false,
        cache_path,
    })
}

/// Text of a NUL-terminated `c_char` buffer returned by NVRTC.
fn buffer_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Destroys an NVRTC program when dropped, on every path out of [`nvrtc_compile`].
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_program` and is destroyed exactly once, here.
        // A failure to free cannot be acted on; ignoring it leaks one program at worst.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn nvrtc_compile(family: &KernelFamily, arch: &Arch, source: &str, options: &[String]) -> Result<(String, String)> {
    let nvrtc_err = |call: &'static str, e: result::NvrtcError| Error::Nvrtc {
        family: family.name.to_string(),
        call,
        status: format!("{e:?}"),
    };
    let src = CString::new(source).expect("kernel sources contain no NUL byte");
    let name = CString::new(family.file).expect("file names contain no NUL byte");
    // The program may keep pointers to `src` and `name`: both outlive `prog` (dropped first,
    // being declared later).
    let prog =
        Program(result::create_program(&src, Some(name.as_c_str())).map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?);
    // SAFETY: `prog.0` is a live program created above and not yet destroyed.
    let compiled = unsafe { result::compile_program(prog.0, options) };
    // SAFETY: as above; the log exists after a compile attempt, successful or not.
    let log = unsafe { result::get_program_log(prog.0) }.map(|b| buffer_text(&b)).unwrap_or_default();
    if let Err(e) = compiled {
        return Err(Error::Compile {
            family: family.name.to_string(),
            arch: arch.compute(),
            status: format!("{e:?}"),
            log,
        });
    }
    // SAFETY: as above; the program compiled successfully, so it has PTX.
    let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| nvrtc_err("nvrtcGetPTX", e))?;
    Ok((buffer_text(&ptx), log.trim().to_string()))
}

/// `CStr` view for tests of [`buffer_text`].
#[cfg(test)]
fn c_chars(s: &std::ffi::CStr) -> Vec<c_char> {
    s.to_bytes_with_nul().iter().map(|&b| b as c_char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_parsing() {
        let a = Arch::parse("sm_90").unwrap();
        assert_eq!((a.compute(), a.sm()), ("compute_90".to_string(), "sm_90".to_string()));
        assert_eq!(Arch::parse("compute_90a").unwrap().sm(), "sm_90a");
        assert_eq!(Arch::parse("100").unwrap().compute(), "compute_100");
        assert!(matches!(Arch::parse("sm_75"), Err(Error::ArchTooOld(_))));
        assert!(matches!(Arch::parse("hopper"), Err(Error::BadArch(_))));
        assert!(matches!(Arch::parse("sm_90x"), Err(Error::BadArch(_))));
    }

    #[test]
    fn full_source_has_line_markers() {
        let f = KernelFamily { name: "glu", file: "glu.cu", source: "// x\n", kernels: &[], defines: &[] };
        let s = full_source(&f);
        assert!(s.starts_with("#line 1 \"common.cuh\"\n"));
        assert!(s.contains("\n#line 1 \"glu.cu\"\n"));
    }

    #[test]
    fn buffer_text_stops_at_nul() {
        assert_eq!(buffer_text(&c_chars(c"abc")), "abc");
    }
}
