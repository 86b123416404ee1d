"""`pgolf bench --recipe R`: training ms/step, tokens/s and MFU, and sliding / TTT evaluation tokens/s.

One process, or torchrun's N (the step then is the global batch over N ranks; MFU is per device). The
config comes as `pgolf train` builds it: recipe, --proxy, --data, then --set overrides. A table goes to
stdout and, with --json OUT, everything to a JSON file.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf.bench.eval_bench import bench_eval
from pgolf.bench.profile import format_profile
from pgolf.bench.train_bench import bench_device_name, bench_train
from pgolf.config import RunConfig, add_override_argument, apply_overrides, config_hash, config_to_dict
from pgolf.data.shards import list_shards
from pgolf.dist import destroy_distributed, dist_env_from_environ, init_distributed, is_dist_active
from pgolf.errors import UserError
from pgolf.recipes import add_proxy_argument, recipe_config
from pgolf.runlog import write_json_atomic
from pgolf.train.loop import set_training_kernels


@dataclass
class BenchOptions:
    """What to measure, beyond the config (the CLI's options, checked)."""
    steps: int = 20
    warmup: int = 3
    use_data: bool = False  # batches and eval tokens from cfg.data.path's shards, else random tokens
    eval_tokens: int = 262_144  # 0 = no evaluation bench
    profile_steps: int = 0  # 0 = no profile
    peak_flops: float | None = None  # per device; None = known by GPU name
    recurrence: bool = True
    overrides: list[str] = field(default_factory=list)
    proxy_s: float | None = None


def add_bench_commands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="training ms/step, tokens/s and MFU; sliding and TTT eval tokens/s",
                              description="Benchmark a recipe's training step (ms/step, tokens/s, MFU with the "
                                          "FLOP count it uses) and its sliding-window and TTT evaluations "
                                          "(tokens/s). Without --data the tokens are random.")
    p.add_argument("--recipe", required=True, help="recipe name (baseline, record, tiny)")
    add_override_argument(p)
    add_proxy_argument(p)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them, compilation included "
                                                         "(default 3)")
    p.add_argument("--data", help="folder with train/val shards (default: random tokens of the vocabulary)")
    p.add_argument("--eval-tokens", type=int, default=262_144,
                   help="tokens of the stream the evaluations score (default 262144; 0 skips them)")
    p.add_argument("--profile", action="store_true", help="also profile a few steps: top kernels by category")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (default 3)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak per device for MFU (default: known by GPU name)")
    p.add_argument("--no-recurrence", action="store_true", help="bench with depth recurrence's loops off")
    p.add_argument("--json", metavar="OUT", help="write everything measured to this JSON file")
    p.set_defaults(func=cmd_bench)


def bench_options_from_args(args) -> BenchOptions:
    """The checked options of a `pgolf bench` invocation (a one-line UserError for a value out of range)."""
    checks = [
        (args.steps >= 1, f"--steps {args.steps}: must be at least 1"),
        (args.warmup >= 0, f"--warmup {args.warmup}: must be at least 0"),
        (args.eval_tokens == 0 or args.eval_tokens >= 2, f"--eval-tokens {args.eval_tokens}: must be 0 or >= 2"),
        (args.profile_steps >= 1, f"--profile-steps {args.profile_steps}: must be at least 1"),
        (args.peak_tflops is None or args.peak_tflops > 0, f"--peak-tflops {args.peak_tflops}: must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return BenchOptions(steps=args.steps, warmup=args.warmup, use_data=bool(args.data),
                        eval_tokens=args.eval_tokens, profile_steps=args.profile_steps if args.profile else 0,
                        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
                        recurrence=not args.no_recurrence, overrides=list(args.overrides), proxy_s=args.proxy)


def build_bench_config(args) -> RunConfig:
    """The RunConfig to bench: recipe, proxy, --data, then --set overrides (as `pgolf train` builds it)."""
    cfg = recipe_config(args.recipe, args.proxy)
    if args.data:
        cfg.data.path = args.data
    return apply_overrides(cfg, args.overrides)


def bench_data_files(cfg: RunConfig, use_data: bool, need_val: bool) -> tuple[list[Path] | None, list[Path] | None]:
    """Train and val shards of cfg.data when --data was given (val only if the evaluations run)."""
    if not use_data:
        return None, None
    folder = Path(cfg.data.path)
    if not folder.is_dir():
        raise UserError(f"--data {str(folder)!r} is not a folder")
    train_files = list_shards(folder, cfg.data.train_pattern)
    val_files = list_shards(folder, cfg.data.val_pattern) if need_val else None
    return train_files, val_files


def run_bench(cfg: RunConfig, opts: BenchOptions) -> dict:
    """Train bench (+ profile), then eval bench; the whole report as a dict (every rank returns it)."""
    train_files, val_files = bench_data_files(cfg, opts.use_data, opts.eval_tokens > 0)
    owned = not is_dist_active()
    denv = init_distributed(cfg.train.device)
    try:
        train, profile, model = bench_train(cfg, denv, opts.steps, opts.warmup, train_files,
                                            recurrence=opts.recurrence, profile=opts.profile_steps,
                                            peak_flops=opts.peak_flops)
        set_training_kernels(model, cfg, False)  # evaluated as a run's finish does
        evals = bench_eval(model, cfg, denv, opts.eval_tokens, val_files) if opts.eval_tokens > 0 else None
    finally:
        if owned:
            destroy_distributed()
    return {"recipe": cfg.recipe, "config_hash": config_hash(cfg), "overrides": opts.overrides,
            "proxy_s": opts.proxy_s, "device": bench_device_name(denv.device), "device_type": denv.device.type,
            "world_size": denv.world_size, "torch": torch.__version__, "cuda": torch.version.cuda,
            "train": train, "eval": evals, "profile": profile, "config": config_to_dict(cfg)}


def format_bench_report(report: dict) -> str:
    """The human table of a bench report."""
    t, proxy = report["train"], report["proxy_s"]
    lines = [f"pgolf bench: recipe {report['recipe']}" + (f" (proxy {proxy:g} s)" if proxy else "")
             + f"  config {report['config_hash']}  {report['device']} x{report['world_size']}"
             f"  torch {report['torch']}",
             f"train: {t['batch_tokens']:,} tokens/step ({t['micro_batch_seqs']} x {t['seq_len']} per micro-step, "
             f"grad_accum {t['grad_accum']}), compile {'on' if t['compile'] else 'off'}, recurrence "
             f"{'on' if t['recurrence'] else 'off'}, {t['data']}; {t['steps']} steps after {t['warmup']} "
             f"warm-up ({t['warmup_s']:.1f} s)",
             f"  {'ms/step':<14} {t['ms_per_step']:.2f} (steps back to back, one sync at the end)",
             f"  {'synced steps':<14} mean {t['ms_per_step_synced_mean']:.2f}   p50 {t['ms_per_step_p50']:.2f}   "
             f"min {t['ms_per_step_min']:.2f} ms (a sync after each)",
             f"  {'tokens/s':<14} {t['tokens_per_s']:,.0f}",
             f"  {'FLOPs/token':<14} {t['flops']['formula']}",
             f"  {'FLOP/s':<14} {t['achieved_flops_per_s_per_device'] / 1e12:.3f} TFLOP/s per device"]
    if t["mfu"] is not None:
        lines.append(f"  {'MFU':<14} {100.0 * t['mfu']:.1f}%  ({t['mfu_note']})")
    else:
        lines.append(f"  {'MFU':<14} n/a  ({t['mfu_note']})")
    if t["peak_memory_gib"] is not None:
        lines.append(f"  {'peak memory':<14} {t['peak_memory_gib']:.2f} GiB")
    if report["eval"] is not None:
        lines.extend(format_eval_bench(report["eval"]))
    if report["profile"] is not None:
        lines.append(format_profile(report["profile"]))
    return "\n".join(lines)


def format_eval_bench(evals: dict) -> list[str]:
    lines = [f"eval: {evals['stream_tokens']:,} tokens ({evals['data']})"]
    if "precompile_s" in evals:
        lines[0] += f"; the passes' graphs compiled first in {evals['precompile_s']:.1f} s (eval.precompile)"
    for kind in ("sliding", "ttt"):
        r = evals[kind]
        if "skipped" in r:
            lines.append(f"  {kind:<14} skipped: {r['skipped']}")
            continue
        detail = f"seq {r['seq_len']}, stride {r['stride']}; compile {r['compile_s']:.1f} s"
        if kind == "ttt":
            detail += (f"; scoring {r['score_s']:.1f} s, adapting {r['adapt_first_chunk_s']:.1f} s (first chunk) "
                       f"+ {r['adapt_s']:.1f} s; {r['mode']}, {r['epochs']} epochs, {r['adapted_chunks']} of "
                       f"{r['chunks']} chunks of {r['chunk_tokens']:,} adapted")
        lines.append(f"  {kind:<14} {r['tokens_per_s']:,.0f} tokens/s  ({r['tokens']:,} tokens in "
                     f"{r['seconds']:.2f} s; {detail})")
    return lines


def cmd_bench(args) -> int:
    opts = bench_options_from_args(args)
    cfg = build_bench_config(args)
    report = run_bench(cfg, opts)
    if dist_env_from_environ()[0] != 0:  # under torchrun only rank 0 reports
        return 0
    print(format_bench_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0
