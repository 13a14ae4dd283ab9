//! The one error type of this crate.

/// What can go wrong while compiling or checking a kernel family.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libnvrtc could not be loaded (cudarc would panic; we probe first).
    #[error(
        "libnvrtc not found: install the pip package nvidia-cuda-nvrtc==13.0.* and put its nvidia/cu13/lib \
         folder on LD_LIBRARY_PATH (scripts/cuda-ci-deps.sh does both); searched for {searched}"
    )]
    NvrtcMissing { searched: String },
    /// An architecture string that is not `sm_XY`, `compute_XY`, `XY` (optionally with an `a`/`f` suffix).
    #[error("bad GPU architecture {0:?}: expected e.g. \"sm_90\", \"compute_90\", \"90\" or \"sm_90a\"")]
    BadArch(String),
    /// The kernels use bf16 tensor cores, ldmatrix and cp.async.
    #[error("architecture {0} is not supported: dalle-mesh kernels need sm_80 or newer (bf16 mma, cp.async)")]
    ArchTooOld(String),
    /// NVRTC rejected the source; `log` is its full compile log.
    #[error("NVRTC failed to compile {family} for {arch} ({status}):\n{log}")]
    Compile { family: String, arch: String, status: String, log: String },
    /// Any other NVRTC API failure.
    #[error("NVRTC {call} failed for {family}: {status}")]
    Nvrtc { family: String, call: &'static str, status: String },
    /// ptxas could not be run or rejected the PTX.
    #[error("ptxas failed on {family}: {message}")]
    Ptxas { family: String, message: String },
    #[error("no kernel family named {0:?}")]
    UnknownFamily(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
