#!/usr/bin/env bash
# The round trip ours -> dalle-mini -> ours against dalle-mini itself:
#  1. the dalle-mini interop fixture -> ours (dalle-mesh export --format dalle-mesh);
#  2. ours -> dalle-mini (dalle-mesh export --format dalle-mini), checked by
#     scripts/check_dalle_mini_export.py: DalleBart.from_pretrained loads it bit for bit, its logits
#     match the fixture's, DalleBartTokenizer.from_pretrained gives tokens.json's ids; dalle-mini
#     re-saves it (save_pretrained);
#  3. dalle-mini's re-save -> ours, whose weights.safetensors must equal step 1's bit for bit.
# Usage: scripts/check_dalle_mini_export.sh [PYTHON]   (PYTHON: the reference venv's python,
# default /tmp/dm-ref/bin/python; see the .py file for how to make it). Needs a built dalle-mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-/tmp/dm-ref/bin/python}
BIN=./target/release/dalle-mesh
FX=tests/fixtures/interop/dallebart-hf
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN" export "$FX" --format dalle-mesh --out "$WORK/ours"
"$BIN" export "$WORK/ours" --format dalle-mini --out "$WORK/dalle-mini"
"$PY" scripts/check_dalle_mini_export.py "$WORK/dalle-mini" --batch "$FX/batch.safetensors" \
    --expected "$FX/expected.safetensors" --tokens "$FX/tokens.json" --resave "$WORK/resaved"
"$BIN" export "$WORK/resaved" --format dalle-mesh --out "$WORK/back"
"$PY" - "$WORK/ours/weights.safetensors" "$WORK/back/weights.safetensors" <<'PY'
import json, sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
same = sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
print(json.dumps({"round_trip_bit_identical": same, "tensors": len(a)}))
sys.exit(0 if same else 1)
PY
