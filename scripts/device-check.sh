#!/usr/bin/env bash
# Runs `dalle-mesh gpu-check` on a machine with one NVIDIA GPU (CUDA 13.0 toolkit, driver,
# cuBLAS, NCCL from the pip package nvidia-nccl) but without Rust: the release binary is built
# elsewhere and carried along as target/release/dalle-mesh (the binary loads every CUDA library
# at run time, so it needs no CUDA at build time).
#
#   scripts/device-check.sh                # results into $OUT (or ./device-check-out)
#   BIN=path/to/dalle-mesh OUT=dir scripts/device-check.sh
#
# What it sets up:
#   - LD_LIBRARY_PATH: the toolkit's lib64 (libnvrtc, libcublas), the driver's libcuda, and
#     NCCL's lib folder from the pip package — with a `libnccl.so` symlink in a temp folder,
#     because cudarc looks for libnccl.so / libnccl.so.<N> but the wheel ships libnccl.so.2;
#   - CUDA_INCLUDE_DIR / CUDA_HOME for NVRTC, DALLE_MESH_CACHE for the kernel PTX cache;
#   - DALLE_MESH_REQUIRE_NCCL=1, so a missing NCCL fails its row instead of skipping it.
# Then runs gpu-check under `timeout 480`, prints the table (stderr) and the JSON summary, and
# exits with gpu-check's code (0 pass, 1 a check failed, 2 no usable GPU, 124 timeout).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$repo_root/target/release/dalle-mesh}"
OUT="${OUT:-$repo_root/device-check-out}"
mkdir -p "$OUT"

if [ ! -x "$BIN" ]; then
    echo "device-check: no dalle-mesh binary at $BIN (build it with 'cargo build --release -p dalle-mesh' and carry target/release/dalle-mesh)" >&2
    exit 3
fi

# ---- CUDA toolkit ----------------------------------------------------------------------------
cuda_home="${CUDA_HOME:-}"
if [ -z "$cuda_home" ]; then
    if command -v nvcc >/dev/null 2>&1; then
        cuda_home="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
    elif [ -d /usr/local/cuda ]; then
        cuda_home=/usr/local/cuda
    fi
fi
libdirs=()
if [ -n "$cuda_home" ]; then
    export CUDA_HOME="$cuda_home"
    for d in "$cuda_home/include" "$cuda_home/targets/x86_64-linux/include"; do
        if [ -f "$d/cuda_bf16.h" ]; then
            export CUDA_INCLUDE_DIR="$d"
            break
        fi
    done
    for d in "$cuda_home/lib64" "$cuda_home/lib" "$cuda_home/targets/x86_64-linux/lib"; do
        [ -d "$d" ] && libdirs+=("$d")
    done
fi

# ---- NCCL from the pip package ---------------------------------------------------------------
python="${PYTHON:-python3}"
nccl_lib=""
if command -v "$python" >/dev/null 2>&1; then
    nccl_lib="$("$python" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia.nccl as m
    roots = list(m.__path__)
except Exception:
    import site, sys
    roots = [os.path.join(p, "nvidia", "nccl") for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path]
for r in roots:
    for c in glob.glob(os.path.join(r, "lib", "libnccl.so*")):
        print(os.path.dirname(os.path.realpath(c)))
        raise SystemExit
EOF
)"
fi
if [ -z "$nccl_lib" ]; then
    nccl_so="$(ls /usr/lib/x86_64-linux-gnu/libnccl.so* /usr/local/lib/libnccl.so* "$cuda_home"/lib64/libnccl.so* 2>/dev/null | head -n 1 || true)"
    [ -n "$nccl_so" ] && nccl_lib="$(dirname "$nccl_so")"
fi
if [ -n "$nccl_lib" ]; then
    shim="$(mktemp -d /tmp/dm-nccl-shim.XXXXXX)"
    target="$(ls "$nccl_lib"/libnccl.so.2* "$nccl_lib"/libnccl.so* 2>/dev/null | head -n 1)"
    ln -sf "$target" "$shim/libnccl.so"
    libdirs+=("$shim" "$nccl_lib")
    echo "device-check: NCCL from $target" >&2
else
    echo "device-check: NCCL not found (pip package nvidia-nccl-cu13?); its row will fail" >&2
fi

# ---- driver (libcuda.so.1 is normally on the loader path already) ---------------------------
for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/nvidia/lib64; do
    [ -e "$d/libcuda.so.1" ] && libdirs+=("$d")
done

joined="$(IFS=:; echo "${libdirs[*]:-}")"
if [ -n "$joined" ]; then
    export LD_LIBRARY_PATH="${joined}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export DALLE_MESH_CACHE="${DALLE_MESH_CACHE:-/tmp/dalle-mesh-cache}"
export DALLE_MESH_REQUIRE_NCCL=1
export DALLE_MESH_FIXTURES="${DALLE_MESH_FIXTURES:-$repo_root/tests/fixtures}"
export RUST_LOG="${RUST_LOG:-warn}"

echo "device-check: CUDA_HOME=${CUDA_HOME:-unset} CUDA_INCLUDE_DIR=${CUDA_INCLUDE_DIR:-unset}" >&2
echo "device-check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >&2
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
fi

cd "$repo_root"
timeout 480 "$BIN" gpu-check --out "$OUT" 2> >(tee "$OUT/gpu-check.log" >&2)
code=$?
wait
echo "device-check: gpu-check exited $code; table in $OUT/gpu-check.log, JSON in $OUT/gpu-check.json" >&2
exit $code
