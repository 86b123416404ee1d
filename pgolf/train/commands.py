"""`pgolf train`: one run from a recipe (single process, or under torchrun for N processes)."""

from pathlib import Path

from pgolf.config import add_override_argument, apply_overrides
from pgolf.dist import dist_env_from_environ
from pgolf.errors import UserError
from pgolf.recipes import add_proxy_argument, recipe_config
from pgolf.train.loop import train_run
from pgolf.train.progress import tensorboard_sink, wandb_sink
from pgolf.train.rundir import load_run_config


def add_train_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a recipe under the wallclock, then quantize and evaluate",
                              description="Train a recipe and write runs/<name>/ (config, env, metrics, "
                                          "checkpoints, weights, artifact, record.json). Multi-GPU: "
                                          "torchrun --nproc_per_node=N -m pgolf train ...")
    p.add_argument("--recipe", help="recipe name (`pgolf recipes` lists them); not needed with --resume")
    p.add_argument("--data", help="folder with the train/val shards (and the tokenizer unless --tokenizer)")
    p.add_argument("--tokenizer", help="SentencePiece .model file")
    p.add_argument("--wallclock", type=float, help="timed training budget in seconds (train.wallclock_s)")
    add_proxy_argument(p)
    add_override_argument(p)
    p.add_argument("--name", help="run directory name (default: recipe-timestamp)")
    p.add_argument("--out", help="folder that holds run directories (default: runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="let --name (or --resume) replace a run that already holds files, a finished one too")
    p.add_argument("--no-quant", action="store_true", help="skip quantization and the artifact")
    p.add_argument("--no-eval", action="store_true", help="skip the sliding-window and TTT evaluations")
    p.add_argument("--tensorboard", metavar="DIR", help="also log metrics to TensorBoard in DIR")
    p.add_argument("--wandb", metavar="PROJECT", help="also log metrics to Weights & Biases PROJECT")
    p.set_defaults(func=cmd_train)


def build_train_config(args):
    """The RunConfig a `pgolf train` invocation asks for (recipe, proxy, flags, then --set overrides)."""
    if args.resume:
        cfg = load_run_config(args.resume)
        if args.overrides:
            raise UserError("--set cannot change a resumed run; its config.json is fixed")
        if args.no_quant:
            cfg.quant.enabled = False
        return cfg
    if not args.recipe:
        raise UserError("pgolf train needs --recipe (or --resume RUN_DIR)")
    cfg = recipe_config(args.recipe, args.proxy)
    if args.wallclock is not None:
        cfg.train.wallclock_s = args.wallclock
    if args.data:
        cfg.data.path = args.data
    if args.tokenizer:
        cfg.data.tokenizer = args.tokenizer
    if args.name:
        cfg.name = args.name
    if args.out:
        cfg.out_dir = args.out
    if args.no_quant:
        cfg.quant.enabled = False
    return apply_overrides(cfg, args.overrides)


def cmd_train(args) -> int:
    cfg = build_train_config(args)
    sinks = []
    is_rank0 = dist_env_from_environ()[0] == 0  # only rank 0 logs
    if is_rank0 and args.tensorboard:
        sinks.append(tensorboard_sink(Path(args.tensorboard)))
    if is_rank0 and args.wandb:
        sinks.append(wandb_sink(args.wandb, cfg.name or cfg.recipe, {"recipe": cfg.recipe}))
    record = train_run(cfg, resume=args.resume, sinks=sinks, final_eval=not args.no_eval, overwrite=args.overwrite)
    status = record.get("status")
    if status != "ok":
        print(f"pgolf: run ended with status {status!r} ({record['train'].get('stop_reason')})")
        return 1
    return 0
