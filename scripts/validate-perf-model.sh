#!/usr/bin/env bash
# Validates `plan --time` (the performance model) against measured step times on this machine:
#   scripts/validate-perf-model.sh [OUT]          (default OUT=runs/validate-perf-model)
# The grid is configs/sweep-cpu.yaml's (3 model widths × meshes 1x1, 1x2, 2x1, 2x2 × ZeRO-1 where
# dp > 1; 15 measured points, 3 refused by the plan). To be robust to a shared, loaded machine:
# - the CPU is calibrated in the same run, right before the points (round A's calibration.yaml is
#   copied into round B, so both rounds are predicted from the same rates);
# - the grid runs twice, round B in the reverse order (models and meshes reversed), so slow phases
#   of the machine's load fall on different points in each round;
# - each point records the 1-minute load average when it ended;
# - a point's measured step time is the lower of its two rounds' medians (load only ever adds
#   time), and the table shows both rounds and their loads.
# Prints the Markdown table of docs/scaling.md and the worst error; the rounds' sweeps (tables,
# plots) are in OUT/a and OUT/b.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/validate-perf-model}
BIN=${DALLE_MESH:-target/release/dalle-mesh}
STEPS=${STEPS:-4}
[ -x "$BIN" ] || cargo build --release --bin dalle-mesh
mkdir -p "$OUT"
round() { # name, mesh list, model list
  cat > "$OUT/$1.yaml" <<YAML
base: $PWD/configs/base.yaml
steps: $STEPS
warmup: 1
grid:
  mesh: [$2]
  zero1: [false, true]
  model: [$3]
  batch_per_device: [4]
YAML
}
BASE='{name: base}'
WIDE='{name: wide, d_model: 256, ffn_dim: 512}'
WIDER='{name: wider, d_model: 384, ffn_dim: 768}'
round a "1x1, 1x2, 2x1, 2x2" "$BASE, $WIDE, $WIDER"
round b "2x2, 2x1, 1x2, 1x1" "$WIDER, $WIDE, $BASE"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$BIN" sweep --config "$OUT/a.yaml" --out "$OUT/a" >/dev/null
mkdir -p "$OUT/b"
cp "$OUT/a/calibration.yaml" "$OUT/b/calibration.yaml"
"$BIN" sweep --config "$OUT/b.yaml" --out "$OUT/b" >/dev/null
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(r):
    return {v["id"]: v for v in map(json.loads, open(f"{out}/{r}/results.jsonl")) if v["status"] == "ok"}
a, b = load("a"), load("b")
print("| model | params | mesh tp×dp | ZeRO-1 | step s round A (load) | step s round B (load) | measured s (lower) | predicted s | error | bottleneck |")
print("|---|---|---|---|---|---|---|---|---|---|")
errs = []
for pid, x in a.items():
    y = b.get(pid)
    if y is None:
        continue
    sa, sb = x["step_s"]["median"], y["step_s"]["median"]
    m, p = min(sa, sb), x["predicted_step_s"]
    e = (p - m) / m
    errs.append((abs(e), e, pid))
    print(f"| {x['model']} | {x['params']/1e6:.2f} M | {x['tp']}×{x['dp']} | {'on' if x['zero1'] else 'off'} "
          f"| {sa:.3f} ({x['load_average']:.1f}) | {sb:.3f} ({y['load_average']:.1f}) | {m:.3f} | {p:.3f} "
          f"| {e*100:+.0f} % | {x['bottleneck']} |")
inside = sum(1 for e in errs if e[0] <= 0.2)
worst = max(errs)
print(f"\n{inside}/{len(errs)} points within ±20 %; worst {worst[1]*100:+.0f} % ({worst[2]})")
PY
