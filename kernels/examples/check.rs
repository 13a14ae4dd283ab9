//! Compiles every kernel family with NVRTC for one architecture and, when `ptxas` is available
//! (on PATH or `$PTXAS`), reports registers, spills and shared memory per entry point.
//!
//! `cargo run -p dm-kernels --example check -- [sm_90 [ptx-dump-folder]]`. Exits 1 on any error or warning
//! (spills included), 0 when everything is clean, and 0 with a SKIP line when libnvrtc is absent.

fn main() {
    let arch = std::env::args().nth(1).unwrap_or_else(|| "sm_90".to_string());
    if let Err(e) = dm_kernels::nvrtc_available() {
        println!("SKIP: {e}");
        return;
    }
    let version = dm_kernels::nvrtc_version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|e| e.to_string());
    let ptxas = dm_kernels::find_ptxas().map_or_else(|| "not found".to_string(), |p| p.display().to_string());
    let include = dm_kernels::include_dir().map_or_else(|| "none".to_string(), |p| p.display().to_string());
    println!("arch {arch}, NVRTC {version}, ptxas {ptxas}, include path {include}");
    if let Some(dir) = std::env::args().nth(2) {
        std::fs::create_dir_all(&dir).expect("create the PTX dump folder");
        for f in dm_kernels::families() {
            match dm_kernels::compile_ptx_uncached(f, &arch) {
                Ok(c) => std::fs::write(format!("{dir}/{}.ptx", f.name), c.ptx).expect("write PTX"),
                Err(e) => println!("{}: {e}", f.name),
            }
        }
    }
    let lines = dm_kernels::check(&arch);
    let mut bad = 0;
    for line in &lines {
        println!("{line}");
        if !line.is_clean() || line.spills() > 0 {
            bad += 1;
        }
    }
    for line in lines.iter().filter(|l| l.error.is_some()) {
        println!("\n--- {} {} ---\n{}", line.family, line.entry_point, line.error.as_deref().unwrap_or(""));
    }
    let kernels = lines.iter().filter(|l| l.entry_point != "*").count();
    println!("{kernels} kernels checked, {bad} line(s) with errors, warnings or spills");
    if bad > 0 {
        std::process::exit(1);
    }
}
