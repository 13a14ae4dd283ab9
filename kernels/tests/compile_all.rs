//! The NVRTC compiler and its PTX cache on a small family of this file (the project's own
//! families are compiled and checked against their typed descriptors by dm-runtime's
//! `every_kernel_family_compiles_and_matches_its_descriptors` and by `dalle-mesh kernels check`).
//!
//! Without libnvrtc the tests print a SKIP line with the reason and pass — unless
//! `DM_KERNELS_REQUIRE_NVRTC=1`, which CI sets after `eval "$(scripts/cuda-ci-deps.sh)"`, so a
//! broken install cannot pass silently. `DM_KERNELS_REQUIRE_PTXAS=1` does the same for ptxas.

use std::io::Write;

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Ok when NVRTC can be used; Err(reason) when the test should skip.
fn nvrtc_or_skip(test: &str) -> Result<(), String> {
    match dm_kernels::nvrtc_available() {
        Ok(()) => Ok(()),
        Err(e) if required("DM_KERNELS_REQUIRE_NVRTC") => panic!("DM_KERNELS_REQUIRE_NVRTC=1 but {e}"),
        Err(e) => {
            // Straight to the stderr handle: libtest captures print!/eprint! of passing tests, and a
            // skip must be visible in the CI log.
            let _ = writeln!(std::io::stderr(), "SKIP {test}: {e}");
            Err(e.to_string())
        }
    }
}

/// A two-kernel family whose unroll factor comes from a define, as the project's families do.
const SCALE: dm_kernels::KernelFamily = dm_kernels::KernelFamily {
    name: "test_scale",
    file: "test_scale.cu",
    source: "// test family: x *= s over n floats, TEST_UNROLL elements a thread\n\
             extern \"C\" __global__ void test_scale_f32(float* x, float s, unsigned long long n) {\n\
             for (unsigned long long i = threadIdx.x; i < n; i += TEST_UNROLL) x[i] *= s; }\n\
             extern \"C\" __global__ void test_first_f32(float* x, int n) { if (n > 0) x[0] = 1.0f; }\n",
    kernels: &[
        dm_kernels::KernelDecl {
            entry: "test_scale_f32",
            params: &[dm_kernels::Param::Ptr, dm_kernels::Param::F32, dm_kernels::Param::U64],
        },
        dm_kernels::KernelDecl { entry: "test_first_f32", params: &[dm_kernels::Param::Ptr, dm_kernels::Param::I32] },
    ],
    defines: &[dm_kernels::Define { name: "TEST_UNROLL", value: 4 }],
};

#[test]
fn compiled_ptx_is_cached_and_names_every_entry_point() {
    if nvrtc_or_skip("compiled_ptx_is_cached_and_names_every_entry_point").is_err() {
        return;
    }
    // A private cache folder, so the test neither depends on nor pollutes the user's cache.
    let dir = std::env::temp_dir().join(format!("dm-kernels-test-cache-{}", std::process::id()));
    std::env::set_var("DALLE_MESH_CACHE", &dir);
    let fam = &SCALE;
    let first = dm_kernels::compile_ptx(fam, "sm_90").expect("compile the test family");
    assert!(!first.from_cache);
    assert!(first.options.iter().any(|o| o == "--gpu-architecture=compute_90"));
    assert!(first.options.iter().all(|o| !o.contains("fast_math") && !o.contains("fast-math")));
    assert!(first.options.iter().any(|o| o == "-DTEST_UNROLL=4"), "{:?}", first.options);
    assert_eq!(dm_kernels::mismatch(fam, Some(&first.ptx)), None);
    let path = first.cache_path.clone().expect("cache path");
    assert!(path.starts_with(dir.join("kernels")), "{}", path.display());
    let second = dm_kernels::compile_ptx(fam, "sm_90").expect("cached compile");
    assert!(second.from_cache);
    assert_eq!(first.ptx, second.ptx);
    // Another architecture is another entry.
    let other = dm_kernels::compile_ptx(fam, "sm_80").expect("compile for sm_80");
    assert!(!other.from_cache && other.cache_path != first.cache_path);
    std::fs::remove_dir_all(&dir).expect("remove the test cache");
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if nvrtc_or_skip("compile_errors_carry_the_nvrtc_log").is_err() {
        return;
    }
    let broken = dm_kernels::KernelFamily {
        name: "broken",
        file: "broken.cu",
        source: "// broken\nextern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n",
        kernels: &[],
        defines: &[],
    };
    let err = dm_kernels::compile_ptx_uncached(&broken, "sm_90").expect_err("must not compile");
    let msg = err.to_string();
    assert!(msg.contains("undefined_name") && msg.contains("broken.cu"), "{msg}");
}
