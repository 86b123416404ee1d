"""The "h100-300s" proxy (shared/BENCHMARKS.md) of a recipe on one GPU, with one result row.

    python benchmarks/h100_300s.py --data data/wiki-sp1024 --recipe record [--seconds 300] [--set k=v ...]

Runs `pgolf train --proxy SECONDS` in this process (compile and warm-up untimed, as in the challenge), then
prints the row of BENCHMARKS.md's table from the run's record.json and appends it to
<run_dir>/benchmark.jsonl.
"""

import argparse
import json
import sys
from pathlib import Path

from pgolf.cli import main as pgolf_main

BENCH_COLUMNS = ("params", "batch_tokens", "steps", "ms_per_step", "train_tok_s", "prequant_bpb", "roundtrip_bpb",
                 "sliding_bpb", "final_bpb", "artifact_bytes", "total_bytes")
FINAL_ORDER = ("ttt_bpb", "sliding_bpb", "roundtrip_bpb")  # the last scored pass the run has is its final score


def final_bpb(metrics: dict) -> float | None:
    return next((metrics[k] for k in FINAL_ORDER if metrics.get(k) is not None), None)


def bench_row(record: dict) -> dict:
    t, m, b = record["train"], record["metrics"], record["bytes"]
    return {"run_id": record["run_id"], "recipe": record["recipe"], "device": record["env"].get("gpu_name"),
            "params": t["params"], "batch_tokens": record["config"]["train"]["batch_tokens"], "steps": t["steps"],
            "ms_per_step": t["ms_per_step"], "train_tok_s": t["tokens_per_s"], "prequant_bpb": m["prequant_bpb"],
            "roundtrip_bpb": m["roundtrip_bpb"], "sliding_bpb": m["sliding_bpb"], "final_bpb": final_bpb(m),
            "artifact_bytes": b["artifact"], "total_bytes": b["total"], "status": record["status"]}


def parse_bench_args(argv, description: str) -> argparse.Namespace:
    """The arguments every proxy benchmark takes: data, recipe, seconds, run name and folder, overrides."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--name", default="")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_bench_args(argv, __doc__.splitlines()[0])
    name = args.name or f"bench-{args.recipe}-{int(args.seconds)}s"
    cmd = ["train", "--recipe", args.recipe, "--data", args.data, "--proxy", str(args.seconds), "--name", name,
           "--out", args.out] + [x for kv in args.overrides for x in ("--set", kv)]
    rc = pgolf_main(cmd)
    run_dir = Path(args.out) / name
    record_path = run_dir / "record.json"
    if not record_path.is_file():
        print(f"h100_300s: no record.json in {run_dir} (pgolf train exited {rc})", file=sys.stderr)
        return rc or 1
    row = bench_row(json.loads(record_path.read_text()))
    with open(run_dir / "benchmark.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(" | ".join(f"{k}={row[k]}" for k in BENCH_COLUMNS))
    return rc


if __name__ == "__main__":
    sys.exit(main())
