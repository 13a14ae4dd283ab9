//! The generic description of a kernel family: one `.cu` file compiled as one NVRTC program (one
//! PTX module), its entry points with their parameter lists, and the compile-time constants it
//! receives as `-D` defines. The families themselves are declared next to their ops, in
//! `runtime/src/ops/<family>/kernels.rs`, and listed once in `dm_runtime::kernel_families()`.

use std::fmt;

/// Helpers shared by every family (bf16 conversion, warp/block reductions, grid-stride helpers).
/// [`crate::compile_ptx`] prepends it to each family's source; it holds no kernel.
pub const PRELUDE: &str = include_str!("../cuda/common.cuh");

/// The C type of one kernel parameter, as it appears in the PTX `.entry` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    /// A device pointer `T*` (`.u64`).
    Ptr,
    /// `unsigned long long` element counts (`.u64`).
    U64,
    /// `int` (`.u32`).
    I32,
    /// `float` (`.f32`).
    F32,
}

impl Param {
    /// The PTX parameter type NVRTC emits for it.
    pub fn ptx_type(self) -> &'static str {
        match self {
            Param::Ptr | Param::U64 => "u64",
            Param::I32 => "u32",
            Param::F32 => "f32",
        }
    }
}

/// One `extern "C" __global__` entry point and its parameter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelDecl {
    pub entry: &'static str,
    pub params: &'static [Param],
}

/// A compile-time constant of a family, passed to NVRTC as `-D<name>=<value>`; the `.cu` file uses
/// the macro and never defines it, so the number is written once, in Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Define {
    pub name: &'static str,
    pub value: i64,
}

impl Define {
    /// A define for a size-like constant (tile sizes, thread counts).
    pub const fn new(name: &'static str, value: usize) -> Self {
        Self { name, value: value as i64 }
    }
}

impl fmt::Display for Define {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-D{}={}", self.name, self.value)
    }
}

/// One `.cu` file: a family of kernels compiled together as one NVRTC program (one PTX module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFamily {
    /// Short name, also the module name the backend loads the PTX under (e.g. `"matmul"`).
    pub name: &'static str,
    /// File name of the source (used in NVRTC's `#line` markers and error messages).
    pub file: &'static str,
    /// The CUDA C source (without [`PRELUDE`]).
    pub source: &'static str,
    /// Every `extern "C" __global__` function of the file, in source order.
    pub kernels: &'static [KernelDecl],
    /// The constants the source expects as `-D` defines. No family uses `--use_fast_math`: every
    /// kernel must match the CPU reference to a few ulp in the fp32 parity mode.
    pub defines: &'static [Define],
}

impl KernelFamily {
    /// The entry-point names, in source order.
    pub fn entry_points(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kernels.iter().map(|k| k.entry)
    }
}

/// The `extern "C" __global__` function names declared in `source`, in order.
pub fn declared_entry_points(source: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(pos) = rest.find(MARK) {
        rest = &rest[pos + MARK.len()..];
        // Skip an optional `__launch_bounds__(...)` between `void` and the name.
        let mut tail = rest.trim_start();
        if let Some(after) = tail.strip_prefix("__launch_bounds__(") {
            tail = after.split_once(')').map_or("", |(_, t)| t).trim_start();
        }
        let name: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        names.push(name);
    }
    names
}

/// The PTX parameter types (`u64`, `u32`, `f32`, …) of `.entry <entry>(` in `ptx`, or None when the
/// entry is missing.
pub fn ptx_entry_params(ptx: &str, entry: &str) -> Option<Vec<String>> {
    let start = ptx.find(&format!(".entry {entry}("))?;
    let end = start + ptx[start..].find(')')?;
    let types = ptx[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".param ."))
        .map(|t| t.chars().take_while(char::is_ascii_alphanumeric).collect::<String>())
        .map(|t| match t.as_str() {
            "b64" | "s64" => "u64".to_string(),
            "b32" | "s32" => "u32".to_string(),
            _ => t,
        })
        .collect();
    Some(types)
}

/// Why `family`'s declarations disagree with its source or its PTX, if they do: every declared
/// entry point must be in the source in order, and (with `ptx`) its `.entry` parameter list must
/// have the declared types.
pub fn mismatch(family: &KernelFamily, ptx: Option<&str>) -> Option<String> {
    let declared = declared_entry_points(family.source);
    let listed: Vec<&str> = family.entry_points().collect();
    if declared != listed {
        return Some(format!("{}: the source declares {declared:?}, the descriptors list {listed:?}", family.file));
    }
    let ptx = ptx?;
    for k in family.kernels {
        let want: Vec<&str> = k.params.iter().map(|p| p.ptx_type()).collect();
        match ptx_entry_params(ptx, k.entry) {
            None => return Some(format!("{}: entry point {} is missing from the PTX", family.name, k.entry)),
            Some(got) if got != want => {
                return Some(format!(
                    "{}/{}: PTX parameters {got:?}, the typed descriptor says {want:?}",
                    family.name, k.entry
                ))
            }
            Some(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE: KernelFamily = KernelFamily {
        name: "fake",
        file: "fake.cu",
        source: "// fake\nextern \"C\" __global__ void __launch_bounds__(256) a(float* x, int n) {}\n\
                 extern \"C\" __global__ void b(float s) {}\n",
        kernels: &[
            KernelDecl { entry: "a", params: &[Param::Ptr, Param::I32] },
            KernelDecl { entry: "b", params: &[Param::F32] },
        ],
        defines: &[Define { name: "FAKE_TILE", value: 64 }],
    };

    #[test]
    fn source_entry_points_and_ptx_params_are_compared() {
        assert_eq!(declared_entry_points(FAKE.source), ["a", "b"]);
        let ptx = ".visible .entry a(\n .param .u64 a_param_0,\n .param .u32 a_param_1\n)\n\
                   .visible .entry b(\n .param .f32 b_param_0\n)\n";
        assert_eq!(mismatch(&FAKE, Some(ptx)), None);
        let wrong = ptx.replace(".u32 a_param_1", ".f32 a_param_1");
        assert!(mismatch(&FAKE, Some(&wrong)).unwrap().contains("fake/a"));
        let missing = KernelFamily { kernels: &FAKE.kernels[..1], ..FAKE };
        assert!(mismatch(&missing, None).unwrap().contains("fake.cu"));
        assert_eq!(FAKE.defines[0].to_string(), "-DFAKE_TILE=64");
    }

    #[test]
    fn the_prelude_holds_no_kernel() {
        assert!(!PRELUDE.contains("__global__ void"));
    }
}
