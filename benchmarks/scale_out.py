"""The same training run on one GPU and on N GPUs, and the same evaluation on one rank and on N (issue 9).

    python3 benchmarks/scale_out.py --recipe record --nproc 2 --steps 300 --data /tmp/wiki-sp1024 --out $OUT/scale

One config: the recipe with the global batch of N of the challenge's 8 GPUs (recipe batch * N / 8; for record
786,432 * 2 / 8 = 196,608 tokens), a step-based schedule over --steps (train.wallclock_s=0; the warmdown a share
of the run), the recipe's seed, a train-loss line every step and a validation every --val-every steps, all
evaluations on the first --val-tokens validation tokens. Two runs of it, through the real command line:

- A: one process (CUDA_VISIBLE_DEVICES=0) with train.grad_accum=N, so that its micro-batch is each rank's in B,
  and N times the calibration batches (they count per rank); it quantizes as B does (late QAT's clip depends
  on the script's bytes) but skips the sliding and TTT passes;
- B: torchrun --standalone --nproc_per_node=N -m pgolf train, train.grad_accum=1, evaluated in full (torchrun
  is called as `python -m torch.distributed.run`, through this interpreter).

The loader hands both layouts the same sequences step for step (pgolf.data.loader), so the curves differ only
by float reduction order. Then `pgolf eval` scores B's artifact on one rank and on N ranks, both eagerly
(eval.compile=false: the compile threshold counts batches per rank, and would put the two sides on different
paths), and the NLL sums, token and byte counts are compared. Everything is read from metrics.jsonl,
record.json and eval.json; OUT/scale_out.json gets every number and command, and the Markdown table for
docs/benchmarks.md is printed. On a CPU (gloo): --device cpu --recipe tiny --steps 4.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from pgolf.config import apply_overrides
from pgolf.errors import UserError
from pgolf.recipes import recipe_config
from pgolf.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]
CHALLENGE_GPUS = 8
# The record makes ~7,185 steps in its 600 s on 8 H100s, the last 3,500 of them in warmdown (records.md).
WALLCLOCK_WARMDOWN_FRAC = 0.5
THROUGHPUT_TARGET = 1.9  # issue 9: N-GPU tokens/s >= 1.9 x one GPU's (for N = 2)
# Keys the script sets itself; --set may not touch them.
OWNED_KEYS = ("train.batch_tokens", "train.grad_accum", "train.wallclock_s", "train.max_steps",
              "train.warmdown_iters", "train.val_every", "train.log_every", "train.device", "eval.val_tokens")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe")
    ap.add_argument("--nproc", type=int, default=2, help="GPUs (processes) of run B (default 2)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of both runs (default 300)")
    ap.add_argument("--data", help="folder with the shards and the tokenizer")
    ap.add_argument("--out", help="folder for the two run directories, eval JSONs, scale_out.json")
    ap.add_argument("--batch-tokens", type=int, default=0,
                    help="global batch per step (default: the recipe's batch * nproc / 8, which must split into "
                         "8 GPUs' shares of whole sequences; give it for recipes whose batch does not)")
    ap.add_argument("--warmdown-frac", type=float, default=None,
                    help="share of the steps in warmdown (default: the recipe's own share when it is step-based, "
                         f"e.g. tiny 60 of 200; {WALLCLOCK_WARMDOWN_FRAC} for a wallclock recipe, about record's)")
    ap.add_argument("--val-every", type=int, default=50, help="validation every K steps (0 = only at the end)")
    ap.add_argument("--val-tokens", type=int, default=1_000_000, help="validation tokens every evaluation scores")
    ap.add_argument("--skip-steps", type=int, default=20,
                    help="steps left out of the throughput (default 20; at most half the run)")
    ap.add_argument("--tail-steps", type=int, default=50, help="steps of the smoothed end-of-run loss (default 50)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"],
                    help="train.device of both runs (default: the recipe's); cpu runs gloo processes")
    ap.add_argument("--replot", metavar="JSON",
                    help="only redraw the figure of an existing scale_out.json (beside it); runs nothing")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="extra config override for both runs (repeatable; not the keys the script sets)")
    return ap.parse_args(argv)


def check_args(args) -> None:
    missing = [flag for flag in ("recipe", "data", "out") if not getattr(args, flag)]
    if missing:
        raise UserError(f"--{missing[0]} is required (unless --replot)")
    checks = [(args.nproc >= 2, f"--nproc {args.nproc}: must be at least 2"),
              (args.steps >= 2, f"--steps {args.steps}: must be at least 2"),
              (args.batch_tokens >= 0, f"--batch-tokens {args.batch_tokens}: must be positive (or 0: derived)"),
              (args.warmdown_frac is None or 0.0 <= args.warmdown_frac <= 1.0,
               f"--warmdown-frac {args.warmdown_frac}: must be in [0, 1]"),
              (args.val_every >= 0, f"--val-every {args.val_every}: must be >= 0"),
              (args.val_tokens >= 2, f"--val-tokens {args.val_tokens}: must be at least 2"),
              (args.skip_steps >= 0 and args.tail_steps >= 1, "--skip-steps must be >= 0 and --tail-steps >= 1"),
              (Path(args.data).is_dir(), f"--data {args.data}: not a folder")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    owned = [kv for kv in args.overrides if kv.split("=", 1)[0].strip() in OWNED_KEYS]
    if owned:
        raise UserError(f"--set {owned[0]}: the script sets {owned[0].split('=', 1)[0]} itself (see --help)")


def scaled_batch(train_cfg, nproc: int, batch_tokens: int) -> int:
    """The global batch of the runs: --batch-tokens, else what nproc of the challenge's 8 GPUs process."""
    if batch_tokens:
        return batch_tokens
    share = CHALLENGE_GPUS * train_cfg.seq_len
    if train_cfg.batch_tokens % share:
        raise UserError(f"train.batch_tokens={train_cfg.batch_tokens} does not split into {CHALLENGE_GPUS} GPUs' "
                        f"shares of whole {train_cfg.seq_len}-token sequences; pass --batch-tokens")
    return train_cfg.batch_tokens // CHALLENGE_GPUS * nproc


def warmdown_share(train_cfg, frac: float | None) -> float:
    if frac is not None:
        return frac
    if train_cfg.wallclock_s > 0:
        return WALLCLOCK_WARMDOWN_FRAC
    return train_cfg.warmdown_iters / max(train_cfg.max_steps, 1)


def run_overrides(args) -> dict[str, list[str]]:
    """Each run's overrides: the user's --set, then the ones both runs share, then the layout's own. Run A takes
    N micro-steps a step and N times the calibration batches (quant.calib_batches counts each rank's), so that
    its steps and its GPTQ Hessians see the same sequences as B's N ranks. Checked by building the configs."""
    cfg = apply_overrides(recipe_config(args.recipe), args.overrides)
    batch = scaled_batch(cfg.train, args.nproc, args.batch_tokens)
    if batch % (args.nproc * cfg.train.seq_len):
        raise UserError(f"global batch {batch} does not split into {args.nproc} ranks of whole "
                        f"{cfg.train.seq_len}-token sequences")
    shared = [f"train.batch_tokens={batch}", "train.wallclock_s=0", f"train.max_steps={args.steps}",
              f"train.warmdown_iters={round(warmdown_share(cfg.train, args.warmdown_frac) * args.steps)}",
              f"train.val_every={args.val_every}", "train.log_every=1", f"eval.val_tokens={args.val_tokens}"]
    if args.device:
        shared.append(f"train.device={args.device}")
    own = {"a": [f"train.grad_accum={args.nproc}", f"quant.calib_batches={cfg.quant.calib_batches * args.nproc}"],
           "b": ["train.grad_accum=1"]}
    for extra in own.values():
        apply_overrides(recipe_config(args.recipe), args.overrides + shared + extra)
    return {k: args.overrides + shared + extra for k, extra in own.items()}


def set_flags(overrides: list[str]) -> list[str]:
    return [x for kv in overrides for x in ("--set", kv)]


def pgolf_command(nproc: int) -> list[str]:
    """`python -m pgolf` on one process, or under torchrun (torch.distributed.run) on nproc."""
    if nproc == 1:
        return [sys.executable, "-m", "pgolf"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "pgolf"]


def train_command(args, overrides: list[str], name: str, nproc: int) -> list[str]:
    """`pgolf train` of one layout; the single process skips the sliding and TTT passes (--no-eval)."""
    cmd = pgolf_command(nproc) + ["train", "--recipe", args.recipe, "--data", args.data, "--name", name,
                                  "--out", str(Path(args.out))] + set_flags(overrides)
    return cmd + (["--no-eval"] if nproc == 1 else [])


def eval_command(args, artifact: Path, out: Path, nproc: int) -> list[str]:
    return pgolf_command(nproc) + ["eval", str(artifact), "--data", args.data, "--max-tokens", str(args.val_tokens),
                                   "--set", "eval.compile=false", "--out", str(out)]


def child_env(single_gpu: bool) -> dict:
    """The environment of a child: this checkout first on PYTHONPATH; the first GPU only for the single-process
    commands (this process never touches CUDA itself)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if single_gpu:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def run_command(cmd: list[str], single_gpu: bool) -> None:
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=child_env(single_gpu)).returncode
    if rc != 0:
        raise UserError(f"exit status {rc}: {' '.join(cmd)}")


# ---- reading the runs -----------------------------------------------------------------------------------------

def read_run(run_dir: Path) -> dict:
    """A run's metrics lines by kind and its record (the structured files; no log parsing)."""
    record_path = run_dir / "record.json"
    if not record_path.is_file():
        raise UserError(f"{run_dir}: no record.json")
    record = json.loads(record_path.read_text())
    if record.get("status") != "ok":
        raise UserError(f"{run_dir}: run status {record.get('status')!r}")
    lines = read_metrics(run_dir / "metrics.jsonl")
    train = {m["step"]: m for m in lines if m["kind"] == "train"}
    # the periodic validations; the one at the last step is the pre-quant score of the averaged weights
    val = {m["step"]: m["val_loss"] for m in lines if m["kind"] == "val" and m["step"] < record["train"]["steps"]}
    return {"record": record, "train": train, "val": val}


def curve_agreement(a: dict[int, float], b: dict[int, float], tail: int) -> dict:
    """How two per-step curves differ over their common steps: max / mean |a - b|, and the mean of each over
    the last `tail` common steps."""
    steps = sorted(set(a) & set(b))
    if not steps:
        raise UserError("the two runs have no train-loss step in common")
    diffs = [abs(a[s] - b[s]) for s in steps]
    worst = max(range(len(steps)), key=diffs.__getitem__)
    last = steps[-tail:]
    tail_a, tail_b = (sum(c[s] for s in last) / len(last) for c in (a, b))
    return {"steps": len(steps), "max_abs_diff": diffs[worst], "max_abs_diff_step": steps[worst],
            "mean_abs_diff": sum(diffs) / len(diffs), "tail_steps": len(last), "tail_mean_a": tail_a,
            "tail_mean_b": tail_b, "tail_mean_diff": tail_b - tail_a}


def steady_throughput(train: dict[int, dict], skip: int) -> dict:
    """ms/step and tokens/s from the end of step `skip` (at most half the run) to the last step, on the
    training loop's own clock (validation pauses it)."""
    at = {0: (0.0, 0), **{s: (m["time_s"], m["tokens"]) for s, m in train.items()}}
    last = max(at)
    first = min(skip, last // 2)
    if first not in at:
        raise UserError(f"step {first} has no train line in metrics.jsonl (train.log_every=1 writes every step)")
    seconds, tokens = at[last][0] - at[first][0], at[last][1] - at[first][1]
    if seconds <= 0 or last == first:
        raise UserError(f"no timed steps between step {first} and step {last}")
    return {"from_step": first, "to_step": last, "ms_per_step": 1000.0 * seconds / (last - first),
            "tokens_per_s": tokens / seconds}


def train_summary(run: dict, gpus: int, skip: int) -> dict:
    r = run["record"]
    speed = steady_throughput(run["train"], skip)
    speed["tokens_per_s_per_gpu"] = speed["tokens_per_s"] / gpus
    return {"run_id": r["run_id"], "gpus": gpus, "grad_accum": r["config"]["train"]["grad_accum"],
            "steps": r["train"]["steps"], "steady": speed, "prequant_loss": r["metrics"]["prequant_loss"],
            "roundtrip_loss": r["metrics"]["roundtrip_loss"], "code_bytes": r["bytes"]["code"],
            "qat_clip_k": r["train"].get("qat_clip_k"),
            "loss": {s: m["loss"] for s, m in sorted(run["train"].items())}, "val_loss": run["val"]}


def compare_train(a: dict, b: dict, nproc: int, args) -> dict:
    """Both runs' summaries, their curves' agreement, and B's throughput against A's."""
    sa, sb = train_summary(a, 1, args.skip_steps), train_summary(b, nproc, args.skip_steps)
    ratio = sb["steady"]["tokens_per_s"] / sa["steady"]["tokens_per_s"]
    val_steps = sorted(set(a["val"]) & set(b["val"]))
    return {"a": sa, "b": sb, "loss_agreement": curve_agreement(sa["loss"], sb["loss"], args.tail_steps),
            "val_loss_diff": {s: b["val"][s] - a["val"][s] for s in val_steps},
            "throughput_ratio": ratio, "scaling_efficiency": ratio / nproc}


def compare_eval(one: dict, many: dict) -> dict:
    """Per evaluation method: both sides' numbers and their differences (counts must be equal)."""
    out = {}
    for name in sorted(set(one["results"]) & set(many["results"])):
        r1, rn = one["results"][name], many["results"][name]
        diff = rn["nll_sum"] - r1["nll_sum"]
        out[name] = {"one": {k: r1[k] for k in ("nll_sum", "tokens", "bytes", "val_bpb", "seconds")},
                     "many": {k: rn[k] for k in ("nll_sum", "tokens", "bytes", "val_bpb", "seconds")},
                     "nll_sum_abs_diff": abs(diff), "nll_sum_rel_diff": abs(diff) / max(abs(r1["nll_sum"]), 1e-300),
                     "val_bpb_abs_diff": abs(rn["val_bpb"] - r1["val_bpb"]),
                     "counts_equal": (r1["tokens"], r1["bytes"]) == (rn["tokens"], rn["bytes"])}
    return out


# ---- the report -------------------------------------------------------------------------------------------------

def device_name(record: dict) -> str:
    """What a run trained on: the GPU's name (torch.cuda.get_device_name, from its env.json) or the CPU."""
    gpu = record["env"].get("gpu_name")
    if gpu and record["config"]["train"]["device"] != "cpu":
        return gpu
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def optional(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    n, t, e = report["nproc"], report["train"], report["eval"]
    a, b, agree = t["a"], t["b"], t["loss_agreement"]
    unit, units = ("process", "processes") if report["device"].startswith("cpu") else ("GPU", "GPUs")
    rows = [f"| {report['recipe']}, {report['steps']} steps, batch {report['batch_tokens']:,} | 1 {unit} "
            f"(grad_accum {a['grad_accum']}) | {n} {units} | difference |", "|---|---|---|---|",
            f"| train loss, mean of the last {agree['tail_steps']} steps | {agree['tail_mean_a']:.5f} | "
            f"{agree['tail_mean_b']:.5f} | {agree['tail_mean_diff']:+.2e} |",
            f"| train loss, max / mean abs diff over {agree['steps']} steps | | | {agree['max_abs_diff']:.2e} "
            f"(step {agree['max_abs_diff_step']}) / {agree['mean_abs_diff']:.2e} |"]
    for step, diff in t["val_loss_diff"].items():
        rows.append(f"| val loss, step {step} | {a['val_loss'][step]:.5f} | {b['val_loss'][step]:.5f} | {diff:+.2e} |")
    for key, label in (("prequant_loss", "pre-quant val loss (averaged weights)"),
                       ("roundtrip_loss", "round-trip val loss")):
        if a[key] is not None and b[key] is not None:
            rows.append(f"| {label} | {a[key]:.5f} | {b[key]:.5f} | {b[key] - a[key]:+.2e} |")
    sa, sb = a["steady"], b["steady"]
    rows += [f"| ms/step (steps {sa['from_step']}-{sa['to_step']}) | {sa['ms_per_step']:.1f} | "
             f"{sb['ms_per_step']:.1f} | |",
             f"| tokens/s | {sa['tokens_per_s']:,.0f} | {sb['tokens_per_s']:,.0f} | x{t['throughput_ratio']:.3f} "
             f"(target x{THROUGHPUT_TARGET}) |",
             f"| tokens/s per {unit} | {sa['tokens_per_s_per_gpu']:,.0f} | {sb['tokens_per_s_per_gpu']:,.0f} | "
             f"efficiency {t['scaling_efficiency']:.3f} |",
             f"| script bytes; late QAT's clip k | {a['code_bytes']}; {optional(a['qat_clip_k'], '.4f')} | "
             f"{b['code_bytes']}; {optional(b['qat_clip_k'], '.4f')} | |", "",
             f"| eval of the {n}-{unit} run's artifact, {report['val_tokens']:,} tokens | 1 rank | {n} ranks | "
             "abs diff | rel diff |", "|---|---|---|---|---|"]
    for name, c in e.items():
        one, many = c["one"], c["many"]
        rows += [f"| {name} NLL sum (nats) | {one['nll_sum']:.6f} | {many['nll_sum']:.6f} | "
                 f"{c['nll_sum_abs_diff']:.2e} | {c['nll_sum_rel_diff']:.2e} |",
                 f"| {name} tokens / bytes | {one['tokens']:,} / {one['bytes']:,} | {many['tokens']:,} / "
                 f"{many['bytes']:,} | {'equal' if c['counts_equal'] else 'DIFFERENT'} | |",
                 f"| {name} val_bpb, seconds | {one['val_bpb']:.6f}, {one['seconds']:.1f} s | {many['val_bpb']:.6f}, "
                 f"{many['seconds']:.1f} s | {c['val_bpb_abs_diff']:.2e} | |"]
    return "\n".join(rows)


def plot_curves(report: dict, path: Path) -> Path:
    """Two panels: both runs' train loss per step with their validation points, and the per-step difference
    N GPUs minus 1 GPU, so a reader sees at once whether the curves agree and how far they drift."""
    from pgolf.experiments.plots import PLOT_STYLE, pyplot

    plt = pyplot()
    t, n = report["train"], report["nproc"]
    runs = {f"1 GPU, grad_accum {t['a']['grad_accum']}": t["a"], f"{n} GPUs": t["b"]}
    by_step = {label: ({int(s): v for s, v in run["loss"].items()}, {int(s): v for s, v in run["val_loss"].items()})
               for label, run in runs.items()}  # JSON keys are strings
    with plt.rc_context(PLOT_STYLE):
        fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.2))
        for label, (train, val) in by_step.items():
            line, = ax_loss.plot(sorted(train), [train[s] for s in sorted(train)], lw=1.2, label=f"{label}: train")
            ax_loss.plot(sorted(val), [val[s] for s in sorted(val)], "o", color=line.get_color(),
                         label=f"{label}: val")
        ax_loss.set(title=f"{report['recipe']}: loss per step, batch {report['batch_tokens']:,} tokens",
                    xlabel="optimizer step", ylabel="loss (nats/token)")
        ax_loss.legend()
        (a, _), (b, _) = by_step.values()
        steps = sorted(set(a) & set(b))
        ax_diff.plot(steps, [b[s] - a[s] for s in steps], lw=1.0, color="tab:gray")
        ax_diff.axhline(0.0, color="black", lw=0.8)
        ax_diff.set(title=f"train loss, {n} GPUs minus 1 GPU", xlabel="optimizer step", ylabel="difference (nats)")
        fig.suptitle(f"{report['device']}, {report['date'][:10]}: {n}-GPU throughput x{t['throughput_ratio']:.3f} "
                     "of one GPU")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return path


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = run_overrides(args)
    names = {"a": f"a-1proc-accum{args.nproc}", "b": f"b-{args.nproc}proc"}
    taken = [name for name in names.values() if (out / name).exists()]
    if taken:  # a run directory's metrics.jsonl is appended to: an old run's lines would mix with the new
        raise UserError(f"--out {out}: already holds {taken[0]}; give an empty or new folder")
    commands = {"train_a": train_command(args, overrides["a"], names["a"], 1),
                "train_b": train_command(args, overrides["b"], names["b"], args.nproc)}
    artifact = out / names["b"]  # its model.pgq (model.pgw with quant.enabled=false)
    commands["eval_1"] = eval_command(args, artifact, out / "eval-1rank.json", 1)
    commands["eval_n"] = eval_command(args, artifact, out / f"eval-{args.nproc}rank.json", args.nproc)
    for key, cmd in commands.items():
        run_command(cmd, single_gpu=key in ("train_a", "eval_1"))
    runs = {k: read_run(out / name) for k, name in names.items()}
    evals = [json.loads((out / f"eval-{k}rank.json").read_text()) for k in (1, args.nproc)]
    record = runs["b"]["record"]
    cfg = record["config"]
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(record),
            "torch": record["env"]["torch"], "recipe": args.recipe, "nproc": args.nproc, "steps": args.steps,
            "batch_tokens": cfg["train"]["batch_tokens"], "seq_len": cfg["train"]["seq_len"],
            "warmdown_iters": cfg["train"]["warmdown_iters"], "seed": cfg["train"]["seed"],
            "val_every": args.val_every, "val_tokens": args.val_tokens, "overrides": overrides,
            "commands": {k: " ".join(v) for k, v in commands.items()},
            "train": compare_train(runs["a"], runs["b"], args.nproc, args), "eval": compare_eval(*evals)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.replot:
            path = Path(args.replot)
            if not path.is_file():
                raise UserError(f"--replot {path}: no such file")
            print(f"wrote {plot_curves(json.loads(path.read_text()), path.with_suffix('.png'))}")
            return 0
        check_args(args)
        report = run_all(args)
    except UserError as e:
        print(f"scale_out: error: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) / "scale_out.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"wrote {path} and {plot_curves(report, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
