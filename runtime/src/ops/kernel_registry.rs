//! The one list of CUDA kernel families: each is declared next to its op, in
//! `runtime/src/ops/<family>/kernels.rs` (source, typed entry points, `-D` constants), and named
//! here once. The CUDA backend loads modules by these names, `dalle-mesh kernels check` compiles
//! every family of this list, and the PTX cache keys on each family's source and defines.

use dm_kernels::KernelFamily;

static FAMILIES: &[KernelFamily] = &[
    super::matmul::kernels::FAMILY,
    super::attention::kernels::F32_FAMILY,
    super::attention::kernels::TC_FAMILY,
    super::cross_entropy::kernels::FAMILY,
    super::layernorm::kernels::FAMILY,
    super::gelu_glu::kernels::FAMILY,
    super::embedding::kernels::FAMILY,
    super::adamw::kernels::FAMILY,
    super::elementwise::kernels::FAMILY,
];

/// Every kernel family of the CUDA backend.
pub fn kernel_families() -> &'static [KernelFamily] {
    FAMILIES
}

/// The family called `name`, if any.
pub fn kernel_family(name: &str) -> Option<&'static KernelFamily> {
    FAMILIES.iter().find(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn descriptors_match_the_sources_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for f in kernel_families() {
            assert_eq!(dm_kernels::mismatch(f, None), None);
            assert!(f.source.starts_with("// "), "{} must open with its description comment", f.file);
            assert!(f.file.ends_with(".cu") && f.file.starts_with(f.name), "{}", f.file);
            for e in f.entry_points() {
                assert!(seen.insert(e), "entry point {e} defined twice");
            }
            for d in f.defines {
                assert!(!f.source.contains(&format!("#define {}", d.name)), "{}: {} is a -D define", f.file, d.name);
                assert!(f.source.contains(d.name), "{}: define {} is unused", f.file, d.name);
            }
        }
        assert!(kernel_family("layernorm").is_some() && kernel_family("nope").is_none());
    }

    /// Every family compiles with NVRTC for sm_90 (the H100/H200 the project trains on), the PTX
    /// `.entry` parameter list of every kernel equals its typed descriptor, and, with ptxas
    /// available, every kernel assembles without a warning or a register spill. Needs libnvrtc
    /// (`scripts/cuda-ci-deps.sh`): prints SKIP and passes without it, unless
    /// `DM_KERNELS_REQUIRE_NVRTC=1` (and `DM_KERNELS_REQUIRE_PTXAS=1` for ptxas), as CI sets.
    #[test]
    fn every_kernel_family_compiles_and_matches_its_descriptors() {
        let required = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
        if let Err(e) = dm_kernels::nvrtc_available() {
            assert!(!required("DM_KERNELS_REQUIRE_NVRTC"), "DM_KERNELS_REQUIRE_NVRTC=1 but {e}");
            // Straight to the stderr handle: libtest captures eprint! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIP every_kernel_family_compiles_and_matches_its_descriptors: {e}");
            return;
        }
        let ptxas = dm_kernels::find_ptxas();
        assert!(
            ptxas.is_some() || !required("DM_KERNELS_REQUIRE_PTXAS"),
            "DM_KERNELS_REQUIRE_PTXAS=1 but ptxas is not on PATH or $PTXAS"
        );
        let lines = dm_kernels::check("sm_90", kernel_families());
        let bad: Vec<String> = lines
            .iter()
            .filter(|l| !l.is_clean() || l.spills() > 0)
            .map(|l| {
                format!("{} {}: {}", l.family, l.entry_point, l.error.clone().unwrap_or_else(|| l.warnings.join("; ")))
            })
            .collect();
        assert!(bad.is_empty(), "kernels with errors, warnings or spills:\n{}", bad.join("\n"));
        let expected: usize = kernel_families().iter().map(|f| f.kernels.len()).sum();
        let checked: Vec<_> = lines.iter().filter(|l| l.entry_point != "*").collect();
        assert_eq!(checked.len(), expected);
        if ptxas.is_some() {
            assert!(checked.iter().all(|l| l.ptxas.is_some()));
        }
    }
}
