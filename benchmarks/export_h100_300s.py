"""The exported single-file script on the "h100-300s" proxy: the same row as h100_300s.py, from train_gpt.py.

    python benchmarks/export_h100_300s.py --data data/wiki-sp1024 --recipe record [--seconds 300] [--set k=v ...]

Generates train_gpt.py with `pgolf export --recipe R --proxy SECONDS` (overrides baked into its defaults),
runs it in a fresh Python process with only DATA_PATH / OUT_DIR / RUN_ID in the environment, and prints the
row of BENCHMARKS.md's table from the run's record.json, with the script's own size as the code bytes. The row
is appended to <run_dir>/benchmark.jsonl, beside the script's copy.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from h100_300s import BENCH_COLUMNS, bench_row, parse_bench_args

from pgolf.cli import main as pgolf_main


def main(argv=None) -> int:
    args = parse_bench_args(argv, __doc__.splitlines()[0])
    name = args.name or f"export-{args.recipe}-{int(args.seconds)}s"
    script = Path(args.out) / f"{name}.train_gpt.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    rc = pgolf_main(["export", "--recipe", args.recipe, "--proxy", str(args.seconds), "--out", str(script)]
                    + [x for kv in args.overrides for x in ("--set", kv)])
    if rc:
        return rc
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "PYTHONUNBUFFERED")
           or k.startswith(("CUDA", "NVIDIA", "LD_"))}
    env.update(DATA_PATH=args.data, OUT_DIR=args.out, RUN_ID=name)
    rc = subprocess.call([sys.executable, str(script)], env=env)
    run_dir = Path(args.out) / name
    record_path = run_dir / "record.json"
    if not record_path.is_file():
        print(f"export_h100_300s: no record.json in {run_dir} (train_gpt.py exited {rc})", file=sys.stderr)
        return rc or 1
    shutil.copy(script, run_dir / "train_gpt.py")
    record = json.loads(record_path.read_text())
    row = bench_row(record) | {"code_bytes": record["bytes"]["code"], "script_bytes": script.stat().st_size}
    with open(run_dir / "benchmark.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(" | ".join(f"{k}={row[k]}" for k in (*BENCH_COLUMNS, "code_bytes", "script_bytes")))
    return rc


if __name__ == "__main__":
    sys.exit(main())
