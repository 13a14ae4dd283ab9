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
# Then, within DEVICE_CHECK_BUDGET_S (default 470 s, under 8 minutes in all):
#   1. a real training run on one GPU: `train --device cuda --precision $PRECISION` (default
#      bf16-mixed), the mini preset on the built-in synthetic set (256 codes), 50 steps; the loss
#      must fall (last logged loss < first);
#   2. `bench step --device cuda --preset mini` on one GPU: samples/s, image tokens/s, TFLOP/s,
#      MFU against the GPU's dense bf16 peak, peak memory against the plan;
#   3. with two or more GPUs, the same training run on tp=2 (one process driving both, NCCL);
#   4. gpu-check with the time that is left;
# and prints ONE JSON summary on stdout (scripts/device_check_summary.py: every part's exit code,
# error line and figures; also $OUT/device-check.json). Without a usable GPU every part exits 2
# with the driver's reason, the summary says `"gpu": false`, and the script exits 2. Exit code:
# gpu-check's (0 pass, 1 a check failed, 2 no usable GPU, 124 timeout), else 1 when a training
# part failed or its loss did not fall. The training paths are untested on GPUs until this
# script has run on one.
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
budget="${DEVICE_CHECK_BUDGET_S:-470}"
started=$(date +%s)
left() { echo $(( budget - ($(date +%s) - started) )); }
PRECISION="${PRECISION:-bf16-mixed}"
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)"
fi

# A mini run on the synthetic set: 50 steps of 8 captions, loss logged every 5 steps; one
# checkpoint and one sample at the end (as every run does).
train_config() { # $1 = tp
    cat <<YAML
device: cuda
precision: $PRECISION
model: {preset: mini}
data: {synthetic: {train_rows: 2000, eval_rows: 64, image_length: 256, seed: 0}, max_text_length: 64}
optimizer: {learning_rate: 1.0e-3, warmup_steps: 5}
training: {steps: 50, batch_size: 8, log_every: 5, eval_every: 0, save_every: 0, keep_checkpoints: 1,
           sample_prompts: ["a red square"]}
mesh: {tp: $1, dp: 1}
YAML
}

run_train() { # $1 = name, $2 = tp, $3 = seconds
    local dir="$OUT/$1"
    rm -rf "$dir" && mkdir -p "$dir"
    train_config "$2" > "$dir/run.yaml"
    timeout "$3" "$BIN" train --config "$dir/run.yaml" --out "$dir/run" > "$dir/summary.json" 2> "$dir/stderr.log"
    echo $? > "$dir/exit_code"
    echo "device-check: $1 exited $(cat "$dir/exit_code") (log $dir/stderr.log)" >&2
}

run_train train_1gpu 1 150
timeout 60 "$BIN" bench step --device cuda --precision "$PRECISION" --preset mini --batch 8 --steps 10 --warmup 2 \
    > "$OUT/bench_step.json" 2> "$OUT/bench_step.log"
echo $? > "$OUT/bench_step.exit_code"
if [ "$gpus" -ge 2 ]; then
    run_train train_tp2 2 110
else
    echo "device-check: $gpus GPU(s): no tp=2 run" >&2
fi

gpu_check_s=$(left)
[ "$gpu_check_s" -lt 30 ] && gpu_check_s=30
timeout "$gpu_check_s" "$BIN" gpu-check --out "$OUT" > "$OUT/gpu-check.stdout.json" 2> >(tee "$OUT/gpu-check.log" >&2)
code=$?
wait
echo "device-check: gpu-check exited $code after at most ${gpu_check_s}s; table in $OUT/gpu-check.log" >&2

# ---- one JSON summary ------------------------------------------------------------------------
summary="$("$python" "$repo_root/scripts/device_check_summary.py" "$OUT" "$gpus" "$code" "$PRECISION")"
echo "$summary" | tee "$OUT/device-check.json"
if [ "$code" -ne 0 ]; then
    exit "$code"
fi
for part in train_1gpu train_tp2; do
    [ -d "$OUT/$part" ] || continue
    [ "$(cat "$OUT/$part/exit_code")" = 0 ] || exit 1
    echo "$summary" | "$python" -c "import json,sys; p=json.load(sys.stdin)['$part']; sys.exit(0 if p.get('loss_fell') else 1)" || exit 1
done
exit 0
