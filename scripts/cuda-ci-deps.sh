#!/usr/bin/env bash
# Installs what compiling and assembling the CUDA kernels needs on a machine WITHOUT a GPU or a
# CUDA toolkit — libnvrtc (NVRTC), the CUDA headers, ptxas — from NVIDIA's pip wheels, into a
# folder of the repository (default: .cuda-ci/, which is gitignored), then prints the `export`
# lines that make them visible. Use it as:
#
#   eval "$(scripts/cuda-ci-deps.sh)"            # or: scripts/cuda-ci-deps.sh [folder]
#   cargo run --release --bin dalle-mesh -- kernels check --arch sm_90
#
# Everything is pinned to the CUDA 13.0 line: PTX written by a newer NVRTC does not load on the
# 13.0 driver (580) of the GPU machines. nvidia-cuda-nvcc pulls nvidia-cuda-crt and nvidia-nvvm
# unpinned, which would bring 13.x headers from a later release beside 13.0's NVRTC; they are
# pinned too. Re-running is cheap: pip skips what is already there (delete the folder to refresh).
#
# Layout the wheels produce (all under <folder>/nvidia/cu13/):
#   lib/libnvrtc.so.13, lib/libnvrtc-builtins.so.13.0, lib/libcudart.so.13   (LD_LIBRARY_PATH)
#   include/cuda_bf16.h, cuda_fp16.h, crt/…                                  (CUDA_INCLUDE_DIR)
#   bin/ptxas, bin/nvcc, …                                                   (PATH)
# stdout carries only the export lines; progress goes to stderr.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/.cuda-ci}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

packages=(
    "nvidia-cuda-nvrtc==13.0.*"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-nvcc==13.0.*"
    "nvidia-cuda-crt==13.0.*"
    "nvidia-nvvm==13.0.*"
)

python="${PYTHON:-python3}"
echo "cuda-ci-deps: installing ${packages[*]} into $dest" >&2
"$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --upgrade --target "$dest" "${packages[@]}" >&2

cu="$dest/nvidia/cu13"
lib="$cu/lib"
inc="$cu/include"
bin="$cu/bin"
missing=0
for f in "$lib/libnvrtc.so.13" "$inc/cuda_bf16.h" "$bin/ptxas"; do
    if [ ! -e "$f" ]; then
        echo "cuda-ci-deps: expected $f after the install, it is missing (wheel layout changed?)" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 1
chmod +x "$bin"/* 2>/dev/null || true

echo "cuda-ci-deps: ptxas $("$bin/ptxas" --version | tail -n 1)" >&2
echo "export LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export CUDA_INCLUDE_DIR=\"$inc\""
echo "export PATH=\"$bin:\$PATH\""
echo "export PTXAS=\"$bin/ptxas\""
