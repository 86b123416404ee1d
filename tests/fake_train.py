"""A stand-in for `pgolf train` used by the experiments tests: it writes a run directory with a synthetic
metrics.jsonl and record.json whose numbers depend on the overrides and the seed.

Run as a script it takes the same arguments as `pgolf train` (--recipe, --set k=v, --name, --out) and
sleeps FAKE_TRAIN_SLEEP seconds first, so a sweep can be killed while it runs.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path


def fake_metrics(overrides: dict, seed: int) -> dict:
    """Loss falls as optim.matrix_lr nears 0.03 and with model.num_layers; seed noise of ~0.002 nats."""
    lr = float(overrides.get("optim.matrix_lr", 0.03))
    layers = int(overrides.get("model.num_layers", 9))
    noise = random.Random(seed * 7919 + layers).gauss(0.0, 0.002)
    loss = 2.10 + 40.0 * (lr - 0.03) ** 2 - 0.01 * (layers - 9) + noise
    bpb = loss / 0.6931 / 1.7
    delta = 0.004 + 0.05 * lr
    return {"prequant_loss": loss, "prequant_bpb": bpb, "roundtrip_loss": loss + delta * 1.18,
            "roundtrip_bpb": bpb + delta, "sliding_loss": loss - 0.03, "sliding_bpb": bpb - 0.03 / 1.18,
            "ttt_loss": None, "ttt_bpb": None, "quant_delta": delta}


def write_fake_run(out, name: str, overrides: dict, seed: int, status: str = "ok", recipe: str = "tiny") -> Path:
    run_dir = Path(out) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = fake_metrics(overrides, seed)
    rng = random.Random(seed)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(0, 201, 10):
            loss = metrics["prequant_loss"] + 4.0 * 2.718 ** (-step / 30) + rng.gauss(0, 0.01)
            f.write(json.dumps({"kind": "train", "step": step, "time_s": step * 0.1, "loss": loss,
                                "lr_scale": 1.0, "tokens": step * 4096, "tok_s": 40960.0}) + "\n")
        f.write(json.dumps({"kind": "val", "step": 200, "time_s": 20.0, "val_loss": metrics["prequant_loss"],
                            "val_bpb": metrics["prequant_bpb"]}) + "\n")
    layers = int(overrides.get("model.num_layers", 9))
    record = {
        "run_id": name, "recipe": recipe, "config": {"overrides": overrides, "seed": seed},
        "config_hash": hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:16], "seed": seed,
        "status": status, "env": {"python": "3.11", "gpu": "fake"},
        "train": {"steps": 200, "ms_per_step": 85.0 + layers, "tokens_per_s": 4.8e6, "train_tokens": 819200,
                  "stop_reason": "max_steps", "params": 1000},
        "metrics": metrics,
        "bytes": {"code": 60_000, "artifact": 14_000_000 + 500_000 * (layers - 9), "cap": 16_000_000,
                  "total": 14_060_000 + 500_000 * (layers - 9)},
        "timings": {"compile_warmup_s": 1.0, "train_loop_s": 20.0, "calibration_s": 0.5, "quantize_s": 0.2,
                    "serialize_s": 0.1, "eval_plain_s": 1.0, "eval_sliding_s": 2.0, "eval_ttt_s": None},
        "compliance": {},
    }
    (run_dir / "record.json").write_text(json.dumps(record))
    return run_dir


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe")
    p.add_argument("--proxy")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    items = dict(s.split("=", 1) for s in args.set)
    seed = int(items.pop("train.seed"))
    (Path(args.out) / args.name).mkdir(parents=True, exist_ok=True)  # a dir exists while the run is going
    time.sleep(float(os.environ.get("FAKE_TRAIN_SLEEP", "0")))
    write_fake_run(args.out, args.name, items, seed, recipe=args.recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
