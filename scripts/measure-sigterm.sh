#!/usr/bin/env bash
# Time from SIGTERM to exit of the default run (`dalle-mesh train`, built-in config): starts it in
# a scratch folder, waits until metrics.jsonl has LINES lines (one per 10 steps), sends SIGTERM,
# and prints one JSON line: seconds to exit, exit code, the step it stopped at.
# Usage: scripts/measure-sigterm.sh [BIN] [LINES]
set -euo pipefail
bin=${1:-target/release/dalle-mesh}
lines=${2:-3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
RUST_LOG=warn "$bin" train --out "$dir/run" >"$dir/summary.json" 2>"$dir/stderr" &
pid=$!
until [ -f "$dir/run/metrics.jsonl" ] && [ "$(wc -l <"$dir/run/metrics.jsonl")" -ge "$lines" ]; do
  kill -0 "$pid" 2>/dev/null || { echo "the run ended early:" >&2; cat "$dir/stderr" >&2; exit 1; }
  sleep 0.05
done
start=$(date +%s.%N)
kill -TERM "$pid"
set +e
wait "$pid"
code=$?
set -e
end=$(date +%s.%N)
step=$(sed -n 's/.*"steps":\([0-9]*\).*/\1/p' "$dir/summary.json")
printf '{"sigterm_to_exit_s": %.3f, "exit_code": %d, "stopped_at_step": %s}\n' \
  "$(echo "$end - $start" | bc)" "$code" "${step:-null}"
