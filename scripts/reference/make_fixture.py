#!/usr/bin/env python
"""Build a reference fixture for a tiny DalleBart (dalle-mini 0.1.5, JAX/Flax, CPU).

Writes to --out:
  weights.safetensors   initial parameters, fp32, Flax names flattened with '.'
                        (Dense kernels are [in, out], i.e. y = x @ kernel)
  config.json           DalleBartConfig as dalle-mini serialises it
  batch.safetensors     int32: input_ids, attention_mask, labels, decoder_input_ids
  expected.safetensors  fp32: logits [B, image_length, image_vocab_size+1], loss [],
                        grad.<name> for every parameter,
                        adamw1.<name> parameters after one optax.adamw step
  fixture.json          seed, hyper-parameters, versions, fp64 cross-check numbers

With --dtype bfloat16 the model computes as dalle-mini's `--dtype bfloat16` does (fp32 weights,
Flax casts activations and kernels to bf16 inside every layer; the loss is taken over the bf16
logits as train.py does); expected.safetensors then also holds `loss_f32`, the same loss computed
in fp32 over the bf16 logits, and fixture.json["bf16_vs_fp32"] records how far the whole bf16
computation lands from the fp32 one on the same weights and batch: the scale that tolerances of a
bf16-mixed implementation must be derived from.

Copied from the project's design notes (shared/reference/make_fixture.py) and extended with
--dtype for issue 11 (bf16-mixed precision).

Usage:
  python make_fixture.py --seed 0 --config cfg.json --out out_dir [--batch-size 3] [--dtype bfloat16]
  (--config may also be an inline JSON string; keys are DalleBartConfig fields
   and override the tiny defaults below.)
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

# Everything written is computed with x64 DISABLED (plain fp32 JAX, as in training).
# The fp64 cross-check runs in a child process (--fp64-worker) with x64 enabled,
# because enabling x64 changes optax's scalar arithmetic by ~1 ulp.
FP64_WORKER = "--fp64-worker" in sys.argv
if FP64_WORKER:
    jax.config.update("jax_enable_x64", True)

import jax.experimental  # noqa: E402
import jax.sharding  # noqa: E402

# dalle_mini/model/partitions.py does `from jax.experimental import PartitionSpec`,
# which no longer exists in any jax that still has wheels on PyPI (>=0.4.13).
# It is only used for sharding rules, never in the model math.
if not hasattr(jax.experimental, "PartitionSpec"):
    jax.experimental.PartitionSpec = jax.sharding.PartitionSpec

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.core.frozen_dict import freeze, unfreeze  # noqa: E402
from flax.training.common_utils import onehot  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from dalle_mini.model import DalleBart, DalleBartConfig  # noqa: E402

TINY_DEFAULTS = dict(
    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_vocab_size=100, image_vocab_size=128,
    image_length=16, max_text_length=16, init_std=0.02,
)
FORCED = dict(
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    gradient_checkpointing=False,  # remat: no effect on the math
)

ADAMW = dict(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def load_config_arg(arg):
    if arg is None:
        return {}
    if os.path.isfile(arg):
        with open(arg) as f:
            return json.load(f)
    return json.loads(arg)


def shift_tokens_right(input_ids, decoder_start_token_id):
    """Verbatim logic of dalle_mini.data.shift_tokens_right (BOS prepended, last label dropped)."""
    shifted = np.zeros(input_ids.shape, dtype=input_ids.dtype)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted


def loss_fn(logits, labels):
    """Verbatim loss of dalle-mini tools/train/train.py."""
    loss = optax.softmax_cross_entropy(logits, onehot(labels, logits.shape[-1]))
    return loss.mean()


def make_batch(rng, config, batch_size):
    T = config.max_text_length
    V = config.encoder_vocab_size
    L = config.image_length
    # BART tokenizer conventions: <s>=0, <pad>=1, </s>=2; padding="max_length"
    input_ids = np.full((batch_size, T), 1, dtype=np.int32)
    attention_mask = np.zeros((batch_size, T), dtype=np.int32)
    for b in range(batch_size):
        n = T if b == 0 else int(rng.integers(2, T + 1))  # row 0 unpadded, others padded
        ids = rng.integers(3, V, size=n).astype(np.int32)
        ids[0] = 0
        ids[n - 1] = 2
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
    labels = rng.integers(0, config.image_vocab_size, size=(batch_size, L)).astype(np.int32)
    decoder_input_ids = shift_tokens_right(labels, config.decoder_start_token_id).astype(np.int32)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        decoder_input_ids=decoder_input_ids,
    )


def perturb(flat, rng, scale):
    """Make every parameter matter: LN scales 1+N(0,s), LN/Dense biases N(0,s)."""
    out = {}
    for k, v in flat.items():
        v = np.asarray(v, dtype=np.float32)
        if scale > 0 and k[-1] == "scale":
            v = v + scale * rng.standard_normal(v.shape).astype(np.float32)
        elif scale > 0 and k[-1] in ("bias", "head_scale"):
            v = v + scale * rng.standard_normal(v.shape).astype(np.float32)
        out[k] = v
    return out


def run(model, params, batch, dtype, cast_params=True):
    if cast_params:  # fp64 check: the whole computation in dtype; bf16: weights stay fp32, as in train.py
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)

    def compute_loss(p):
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            params=p,
            train=False,  # deterministic; dropout rates are 0 anyway
        )[0]
        return loss_fn(logits, batch["labels"]), logits

    (loss, logits), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    return loss, logits, grads


def gaps(loss, logits, grads, loss16, logits16, grads16):
    """How far the bf16 computation is from the fp32 one (same weights, same batch)."""
    l32 = np.asarray(logits, np.float64)
    l16 = np.asarray(logits16.astype(jnp.float32), np.float64)
    g32 = {".".join(k): np.asarray(v, np.float64) for k, v in flatten_dict(unfreeze(grads)).items()}
    g16 = {".".join(k): np.asarray(v, np.float64) for k, v in flatten_dict(unfreeze(grads16)).items()}
    gmax = max(float(np.abs(v).max()) for v in g32.values())
    rel = {k: float(np.abs(g16[k] - v).max()) / max(float(np.abs(v).max()), 1e-3 * gmax) for k, v in g32.items()}
    return dict(
        loss_fp32=float(loss),
        loss_abs_diff=abs(float(loss16) - float(loss)),
        logits_max_abs_diff=float(np.abs(l16 - l32).max()),
        logits_max_abs=float(np.abs(l32).max()),
        grad_worst_rel=max(rel.values()),
        grad_worst_rel_param=max(rel, key=rel.get),
        grad_median_rel=float(np.median(list(rel.values()))),
    )


def fp64_worker(out):
    """Recompute loss/logits/grads in float64 from the written files; record the gaps."""
    from safetensors.numpy import load_file

    with open(os.path.join(out, "config.json")) as f:
        config = DalleBartConfig(**json.load(f))
    w = load_file(os.path.join(out, "weights.safetensors"))
    batch = {k: jnp.asarray(v) for k, v in load_file(os.path.join(out, "batch.safetensors")).items()}
    exp = load_file(os.path.join(out, "expected.safetensors"))
    params = freeze(unflatten_dict({tuple(k.split(".")): v for k, v in w.items()}))
    model64 = DalleBart(config, dtype=jnp.float64, _do_init=False)
    loss64, logits64, grads64 = run(model64, params, batch, jnp.float64)
    assert logits64.dtype == jnp.float64
    g64 = {".".join(k): np.asarray(v) for k, v in flatten_dict(unfreeze(grads64)).items()}
    # relative to max(|tensor|max, 1e-3*global max): some grads are analytically zero
    # (e.g. k_proj.bias when use_bias=True: softmax is shift invariant) and are pure fp32 noise.
    gmax = max(float(np.abs(v).max()) for v in g64.values())
    abs_err = {k: float(np.abs(exp["grad." + k].astype(np.float64) - v).max()) for k, v in g64.items()}
    rel = {k: abs_err[k] / max(float(np.abs(v).max()), 1e-3 * gmax) for k, v in g64.items()}
    # AdamW step 1 in float64 from the fp64 grads: how far a *correct* implementation whose
    # grads carry only rounding noise can land from adamw1 (sensitivity of g/(|g|+eps)).
    ad = 0.0
    for k, v in g64.items():
        p0 = w[k].astype(np.float64)
        new = p0 - ADAMW["learning_rate"] * (v / (np.abs(v) + ADAMW["eps"]) + ADAMW["weight_decay"] * p0)
        ad = max(ad, float(np.abs(new - exp["adamw1." + k]).max()))
    check = dict(
        adamw1_max_abs_diff_using_fp64_grads=ad,
        loss_fp64=float(loss64),
        loss_abs_diff=abs(float(exp["loss"]) - float(loss64)),
        logits_max_abs_diff=float(np.abs(exp["logits"].astype(np.float64) - np.asarray(logits64)).max()),
        logits_max_abs=float(np.abs(np.asarray(logits64)).max()),
        grad_worst_abs_diff=max(abs_err.values()),
        grad_global_max_abs=gmax,
        grad_worst_rel=max(rel.values()),
        grad_worst_rel_param=max(rel, key=rel.get),
    )
    path = os.path.join(out, "fixture.json")
    with open(path) as f:
        info = json.load(f)
    info["fp64_check"] = check
    with open(path, "w") as f:
        json.dump(info, f, indent=2)


def main():
    if FP64_WORKER:
        return fp64_worker(sys.argv[sys.argv.index("--fp64-worker") + 1])
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--config", default=None, help="JSON file or inline JSON")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--perturb", type=float, default=0.1,
                    help="std of noise added to LayerNorm scale/bias (0 = keep Flax init)")
    ap.add_argument("--no-fp64-check", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="computation dtype of the model (dalle-mini's --dtype); weights stay fp32")
    args = ap.parse_args()

    user = load_config_arg(args.config)
    cfg_kwargs = {**TINY_DEFAULTS, **user, **FORCED}
    cfg_kwargs.setdefault("use_scan", False)
    config = DalleBartConfig(**cfg_kwargs)

    # ---- model + weights (fp32) -------------------------------------------------
    model = DalleBart(config, seed=args.seed, dtype=jnp.float32)
    flat = flatten_dict(unfreeze(model.params))
    rng = np.random.default_rng(args.seed)
    flat = perturb(flat, rng, args.perturb)
    params32 = freeze(unflatten_dict(flat))

    batch = make_batch(rng, config, args.batch_size)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    loss, logits, grads = run(model, params32, jbatch, jnp.float32)
    assert logits.dtype == jnp.float32 and loss.dtype == jnp.float32
    bf16_vs_fp32 = None
    if args.dtype == "bfloat16":
        model_bf16 = DalleBart(config, dtype=jnp.bfloat16, _do_init=False)
        loss16, logits16, grads16 = run(model_bf16, params32, jbatch, jnp.bfloat16, cast_params=False)
        assert logits16.dtype == jnp.bfloat16  # the loss: optax promotes with the fp32 one-hot labels
        loss_f32 = loss_fn(logits16.astype(jnp.float32), jbatch["labels"])
        bf16_vs_fp32 = gaps(loss, logits, grads, loss16, logits16, grads16)
        bf16_vs_fp32["loss_f32_over_bf16_logits_abs_diff"] = abs(float(loss_f32) - float(loss))
        loss, logits, grads = loss16, logits16, grads16

    # ---- one AdamW step, exactly as train.py builds it for --optim adam ----------
    tx = optax.adamw(**ADAMW)
    opt_state = tx.init(params32)
    updates, _ = tx.update(grads, opt_state, params32)  # bf16 run: grads are fp32 (of fp32 weights)
    params_new = optax.apply_updates(params32, updates)

    # ---- write ------------------------------------------------------------------
    os.makedirs(args.out, exist_ok=True)
    name = lambda k: ".".join(k)  # noqa: E731
    w = {name(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
    cfg_json = config.to_json_string(use_diff=False)
    meta = {"format": "dallebart-fixture-v1", "config": cfg_json}
    save_file(w, os.path.join(args.out, "weights.safetensors"), metadata=meta)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        f.write(cfg_json)
    save_file({k: np.ascontiguousarray(v, dtype=np.int32) for k, v in batch.items()},
              os.path.join(args.out, "batch.safetensors"))

    exp = {
        "logits": np.ascontiguousarray(np.asarray(logits, dtype=np.float32)),
        "loss": np.asarray(loss, dtype=np.float32).reshape(()),
    }
    if bf16_vs_fp32 is not None:
        exp["loss_f32"] = np.asarray(loss_f32, dtype=np.float32).reshape(())
    for k, v in flatten_dict(unfreeze(grads)).items():
        exp["grad." + name(k)] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    for k, v in flatten_dict(unfreeze(params_new)).items():
        exp["adamw1." + name(k)] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    save_file(exp, os.path.join(args.out, "expected.safetensors"))

    import flax
    import transformers
    import dalle_mini

    info = dict(
        seed=args.seed,
        batch_size=args.batch_size,
        perturb=args.perturb,
        user_config=user,
        loss=float(loss),
        loss_definition="mean over batch*image_length of optax.softmax_cross_entropy(logits, onehot(labels, image_vocab_size+1)); no masking",
        decoder_input_ids="[decoder_start_token_id(=image_vocab_size), labels[:, :-1]]",
        decoder_attention_mask="all ones (not passed, model default)",
        position_ids="arange(len) for encoder and decoder (model default), independent of attention_mask",
        optimizer=dict(name="optax.adamw", **ADAMW, mask="none: decay on every parameter",
                       formula="p1 = p - lr*(m_hat/(sqrt(v_hat)+eps) + wd*p), m_hat=g, v_hat=g^2 at step 1"),
        weights_layout="Dense kernels are [in_features, out_features] (y = x @ kernel)",
        n_params=int(sum(v.size for v in w.values())),
        fp64_check={},
        dtype=args.dtype,
        bf16_vs_fp32=bf16_vs_fp32,
        versions=dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
                      transformers=transformers.__version__, dalle_mini=dalle_mini.__version__,
                      numpy=np.__version__, python=sys.version.split()[0]),
    )
    g = np.concatenate([np.abs(v).ravel() for k, v in exp.items() if k.startswith("grad.")])
    info["grad_stats"] = dict(
        exact_zero=int((g == 0).sum()),
        nonzero_below_1em6=int(((g > 0) & (g < 1e-6)).sum()),
        nonzero_below_1em7=int(((g > 0) & (g < 1e-7)).sum()),
        total=int(g.size),
        note="at AdamW step 1 the update is lr*g/(|g|+eps)+lr*wd*p, i.e. ~lr*sign(g): "
             "entries with |g| comparable to eps=1e-8 make adamw1 sensitive to tiny grad errors",
    )
    with open(os.path.join(args.out, "fixture.json"), "w") as f:
        json.dump(info, f, indent=2)

    check = {}
    if not args.no_fp64_check and args.dtype == "float32":
        import subprocess
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--fp64-worker", args.out],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            raise SystemExit("fp64 cross-check failed")
        with open(os.path.join(args.out, "fixture.json")) as f:
            check = json.load(f)["fp64_check"]

    for fn in os.listdir(args.out):  # safetensors writes 0600; make fixtures shareable
        os.chmod(os.path.join(args.out, fn), 0o644)
    sizes = {fn: os.path.getsize(os.path.join(args.out, fn)) for fn in sorted(os.listdir(args.out))}
    print(json.dumps(dict(out=args.out, loss=float(loss), n_params=info["n_params"],
                          fp64_check=check, sizes=sizes), indent=2))


if __name__ == "__main__":
    main()
