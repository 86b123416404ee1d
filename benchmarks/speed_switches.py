"""Compare the training step of one recipe under several config switches (GPU).

Each variant is one `pgolf bench` run in its own process (a fresh compile, no state shared), with the same
recipe, proxy, steps and warm-up; each writes its JSON next to the others and the script prints one table:
ms/step (steps back to back, as training runs them), the synced per-step mean and min, tokens/s, MFU and the
speed-up over the first variant. Usage:
    python benchmarks/speed_switches.py --recipe record --proxy 300 --out DIR \
        --variant default= --variant bf16=model.residual_dtype=bfloat16 \
        --variant both=model.residual_dtype=bfloat16,model.native_gqa=true [--steps 30] [--profile]
A variant is NAME=OVERRIDES, the overrides comma-separated SECTION.FIELD=VALUE (none for the recipe as is).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=OVERRIDES (OVERRIDES may be empty)")
    return name, [o for o in overrides.split(",") if o]


def bench_command(args, name: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pgolf", "bench", "--recipe", args.recipe, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--eval-tokens", "0", "--json", str(Path(args.out) / f"{name}.json")]
    if args.proxy:
        cmd += ["--proxy", str(args.proxy)]
    if args.profile:
        cmd += ["--profile"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def table(rows: list[tuple[str, list[str], dict]]) -> str:
    base_ms = rows[0][2]["train"]["ms_per_step"]
    lines = ["| variant | overrides | ms/step | synced ms/step (mean, min) | tokens/s | MFU | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, overrides, report in rows:
        t = report["train"]
        mfu = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        lines.append(f"| {name} | {' '.join(overrides) or '(recipe)'} | {t['ms_per_step']:.1f} | "
                     f"{t['ms_per_step_synced_mean']:.1f}, {t['ms_per_step_min']:.1f} | "
                     f"{t['tokens_per_s']:,.0f} | {mfu} | x{base_ms / t['ms_per_step']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="record")
    parser.add_argument("--proxy", type=float, default=300.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", required=True, help="folder for each variant's JSON")
    parser.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (repeatable)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in variants:
        print(f"[speed_switches] {name}: {' '.join(overrides) or '(recipe)'}", flush=True)
        done = subprocess.run(bench_command(args, name, overrides))
        if done.returncode != 0:
            print(f"[speed_switches] {name} failed with exit status {done.returncode}", flush=True)
            continue
        rows.append((name, overrides, json.loads((Path(args.out) / f"{name}.json").read_text())))
    if rows:
        print(table(rows))
    return 0 if len(rows) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
