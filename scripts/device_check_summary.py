"""The one JSON summary of scripts/device-check.sh: every part's exit code, error line and figures.

usage: device_check_summary.py OUT GPUS GPU_CHECK_CODE PRECISION
"""
import json
import os
import sys


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def last_json(text):
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def error_of(log):
    lines = [l for l in log.splitlines() if l.startswith("error")]
    return lines[-1] if lines else None


def exit_code(path):
    text = read(path, "-1").strip()
    return int(text) if text.lstrip("-").isdigit() else -1


def train_part(out, name):
    d = os.path.join(out, name)
    if not os.path.isdir(d):
        return None
    losses = []
    for line in read(os.path.join(d, "run", "metrics.jsonl")).splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if "loss" in v:
            losses.append(v)
    part = {"exit_code": exit_code(os.path.join(d, "exit_code")), "error": error_of(read(os.path.join(d, "stderr.log")))}
    if losses:
        first, last = losses[0], losses[-1]
        part.update(
            first_loss=first["loss"],
            last_loss=last["loss"],
            loss_fell=last["loss"] < first["loss"],
            samples_per_s=last.get("samples_per_s"),
            image_tokens_per_s=last.get("image_tokens_per_s"),
            peak_bytes=last.get("peak_bytes"),
            logged_steps=len(losses),
        )
    summary = last_json(read(os.path.join(d, "summary.json")))
    if summary:
        part["summary"] = summary
    return part


def bench_part(out):
    part = {"exit_code": exit_code(os.path.join(out, "bench_step.exit_code")),
            "error": error_of(read(os.path.join(out, "bench_step.log")))}
    bench = last_json(read(os.path.join(out, "bench_step.json")))
    if bench:
        keys = ["device", "precision", "samples_per_s", "image_tokens_per_s", "gflops_per_s", "peak_gflops_per_s",
                "mfu", "peak_bytes", "planned_bytes", "step_s_median", "loss_first", "loss_last"]
        part.update({k: bench.get(k) for k in keys})
    return part


def main():
    out, gpus, gpu_check_code, precision = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    result = {
        "gpus": gpus,
        "gpu": gpus > 0 and gpu_check_code != 2,
        "precision": precision,
        "train_1gpu": train_part(out, "train_1gpu"),
        "bench_step_1gpu": bench_part(out),
        "train_tp2": train_part(out, "train_tp2"),
        "gpu_check_exit_code": gpu_check_code,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
