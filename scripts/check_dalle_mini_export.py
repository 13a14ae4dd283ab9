#!/usr/bin/env python
"""Checks a `dalle-mesh export --format dalle-mini` folder against dalle-mini itself.

Loads EXPORT with `DalleBart.from_pretrained` and `DalleBartTokenizer.from_pretrained`
(dalle-mini 0.1.5, JAX/Flax on CPU) and checks:
  * every parameter loaded equals the msgpack file's array bit for bit (names, shapes, dtypes);
  * with --batch/--expected (a parity fixture's batch.safetensors / expected.safetensors): the
    logits of `model(input_ids, attention_mask, decoder_input_ids)` against `logits`;
  * with --tokens (a tokens.json): the tokenizer's ids (padding="max_length", truncation);
  * with --resave OUT: `save_pretrained` of the loaded model and tokenizer into OUT, so that
    dalle-mesh can read dalle-mini's own writing back (the round trip ours -> dalle-mini -> ours).
Prints one JSON line; exits 1 if a check fails.

Its environment (about 1.5 minutes to install, ~0.9 GB):
    python3 -m venv /tmp/dm-ref && /tmp/dm-ref/bin/pip install --no-deps -r <reference>/requirements.txt
where <reference>/requirements.txt pins dalle-mini 0.1.5, jax/jaxlib 0.4.13, flax 0.6.11,
transformers 4.25.1, tokenizers 0.13.3 (the project's shared/reference/requirements.txt).
scripts/check_dalle_mini_export.sh runs the whole round trip.
"""
import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402
import jax.experimental  # noqa: E402
import jax.sharding  # noqa: E402

# dalle_mini/model/partitions.py imports jax.experimental.PartitionSpec, which moved; it is only
# used for sharding rules.
if not hasattr(jax.experimental, "PartitionSpec"):
    jax.experimental.PartitionSpec = jax.sharding.PartitionSpec

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from dalle_mini.model import DalleBart, DalleBartTokenizer  # noqa: E402


def raw_arrays(path):
    """Every array of a flax msgpack file, read with plain msgpack (no flax)."""

    def hook(code, payload):
        if code not in (1, 3):
            raise ValueError(f"unexpected ext type {code}")
        shape, dtype, data = msgpack.unpackb(payload, raw=False)
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    with open(path, "rb") as f:
        tree = msgpack.unpackb(f.read(), ext_hook=hook, raw=False)
    return {".".join(k): v for k, v in flatten_dict(tree).items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--batch")
    ap.add_argument("--expected")
    ap.add_argument("--tokens")
    ap.add_argument("--resave")
    ap.add_argument("--logits-tol", type=float, default=1e-5)
    args = ap.parse_args()

    report = {"export": args.export, "checks": {}}
    ok = True
    model = DalleBart.from_pretrained(args.export)
    params = {".".join(k): np.asarray(v) for k, v in flatten_dict(model.params).items()}
    raw = raw_arrays(os.path.join(args.export, "flax_model.msgpack"))
    same_names = sorted(params) == sorted(raw)
    bit_identical = same_names and all(
        params[k].dtype == raw[k].dtype
        and params[k].shape == raw[k].shape
        and params[k].tobytes() == raw[k].tobytes()
        for k in raw
    )
    report["params"] = len(params)
    report["checks"]["from_pretrained_bit_identical_to_file"] = bool(bit_identical)
    ok &= bool(bit_identical)

    tokenizer = DalleBartTokenizer.from_pretrained(args.export)
    report["tokenizer_class"] = type(tokenizer).__name__
    if args.tokens:
        with open(args.tokens) as f:
            tokens = json.load(f)
        enc = tokenizer(tokens["captions"], padding="max_length", truncation=True, max_length=tokens["max_length"])
        same = enc["input_ids"] == tokens["input_ids"] and enc["attention_mask"] == tokens["attention_mask"]
        report["checks"]["tokens_equal"] = bool(same)
        ok &= bool(same)

    if args.batch and args.expected:
        from safetensors.numpy import load_file

        batch = load_file(args.batch)
        expected = load_file(args.expected)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            params=model.params,
            train=False,
        ).logits
        err = float(np.max(np.abs(np.asarray(logits, dtype=np.float64) - expected["logits"])))
        report["logits_max_abs_err"] = err
        report["checks"]["logits_within_tol"] = err <= args.logits_tol
        ok &= err <= args.logits_tol

    if args.resave:
        model.save_pretrained(args.resave, params=model.params)
        tokenizer.save_pretrained(args.resave)
        report["resaved"] = args.resave

    report["pass"] = bool(ok)
    print(json.dumps(report))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
