"""`pgolf eval ARTIFACT --data DIR` (plain, sliding and TTT bpb of a saved model) and `pgolf check` (the
legality harness's PASS/FAIL table; exit 1 on any FAIL).

ARTIFACT is a quantized model.pgq or float weights model.pgw; a RUN_DIR stands for its model.pgq (or
model.pgw). The model is built from the run's config.json (beside the artifact, or --config), a --recipe,
and --set overrides. Under torchrun, `pgolf eval` splits the evaluations across the ranks.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from pgolf.config import RunConfig, add_override_argument, apply_overrides, config_from_dict, config_hash
from pgolf.errors import UserError
from pgolf.fileio import OutputError, atomic_write_text


def eval_resolve_artifact(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.pgq", "model.pgw"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: run directory holds neither model.pgq nor model.pgw")
    if not path.is_file():
        raise UserError(f"{path}: artifact not found")
    return path


def eval_load_config(artifact: Path, recipe: str, config_path: str, overrides: list[str], data: str,
                     eval_recipe: str = "") -> RunConfig:
    """RunConfig from --recipe, --config, or the config.json beside the artifact; then --eval-recipe (that
    recipe's eval settings, e.g. to score an older run the way its recipe scores now), --data and --set."""
    if recipe and config_path:
        raise UserError("give --recipe or --config, not both")
    if recipe:
        from pgolf.recipes import get_recipe

        cfg = get_recipe(recipe)
    else:
        path = Path(config_path) if config_path else artifact.parent / "config.json"
        if not path.is_file():
            raise UserError(f"{path}: config not found; pass --config RUN_DIR/config.json or --recipe NAME")
        try:
            cfg = config_from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"{path}: not valid JSON") from None
    if eval_recipe:
        from pgolf.recipes import get_recipe

        cfg.eval = get_recipe(eval_recipe).eval
    if data:
        cfg.data.path = data
    return apply_overrides(cfg, overrides)


def eval_load_model(artifact: Path, cfg: RunConfig, device: torch.device):
    """The GPT of cfg.model with the artifact's weights (dequantized for .pgq), in eval mode on device."""
    from pgolf.model.gpt import GPT

    if artifact.suffix == ".pgq":
        from pgolf.quant.artifact import read_artifact

        state = read_artifact(artifact)
    else:
        from pgolf.tensorfile import read_tensors

        state = read_tensors(artifact)[0]
    model = GPT(cfg.model)
    model.set_recurrence(cfg.model.recur_loops > 0)  # training ends with the loops on (model.recur_start_frac)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "mismatch"
        raise UserError(f"{artifact}: weights do not fit the configured model ({first})") from None
    return model.to(device).eval()


def eval_load_data(cfg: RunConfig, max_tokens: int):
    """Validation tokens (FILE_AUDIT phase "eval"), their byte source (the val byte sidecar where the data
    has one, else the byte LUT: pgolf.data.sidecar.load_val_byte_source), and the data check (the tokenizer
    against the shards' manifest.json: DataManifestError on a mismatch, a note when there is no manifest)."""
    from pgolf.data.build import load_sentencepiece
    from pgolf.data.loader import load_val_tokens
    from pgolf.data.manifest import check_data_manifest
    from pgolf.data.shards import FILE_AUDIT, list_shards
    from pgolf.data.sidecar import load_val_byte_source
    from pgolf.data.tokenizer import resolve_tokenizer_path

    folder = Path(cfg.data.path)
    if not folder.is_dir():
        raise UserError(f"data folder {str(folder)!r} does not exist")
    val_files = list_shards(folder, cfg.data.val_pattern)
    tokenizer = resolve_tokenizer_path(cfg.data)
    data_check = check_data_manifest(folder, tokenizer)
    sp = load_sentencepiece(tokenizer)
    with FILE_AUDIT.phase("eval"):
        tokens = load_val_tokens(val_files, vocab_size=cfg.model.vocab_size, max_tokens=max_tokens)
        source = load_val_byte_source(val_files, tokens, sp, cfg.model.vocab_size)
    return tokens, source, data_check


def eval_device(cfg: RunConfig) -> torch.device:
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def evaluate_configured(model, val_tokens, lut, cfg: RunConfig, rank: int = 0, world_size: int = 1) -> dict:
    """The passes cfg asks for (pgolf.eval.runner.passes_from_config), through the runner; {name: result}."""
    from pgolf.eval.runner import passes_from_config, run_passes

    return run_passes(model, val_tokens, lut, passes_from_config(cfg), rank, world_size).as_dict()


def format_eval_table(results: dict) -> str:
    """One line per method; "compile" is the part of its seconds spent in the first call of each compiled
    scoring shape (pgolf.eval.scoring.StaticShapeCompile), "-" where the result does not say."""
    lines = [f"{'method':<8}  {'val_loss':>9}  {'val_bpb':>9}  {'tokens':>11}  {'bytes':>12}  {'seconds':>8}  "
             f"{'compile':>8}"]
    for name, r in results.items():
        compile_s = f"{r['compile_s']:8.1f}" if "compile_s" in r else f"{'-':>8}"
        lines.append(f"{name:<8}  {r['val_loss']:9.5f}  {r['val_bpb']:9.5f}  {r['tokens']:11,}  {r['bytes']:12,}  "
                     f"{r['seconds']:8.1f}  {compile_s}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    """Evaluate on one process, or under torchrun on N ranks that split the windows and TTT's batches; rank
    0 prints the table and writes eval.json."""
    from pgolf.dist import destroy_distributed, init_distributed, is_dist_active

    artifact = eval_resolve_artifact(Path(args.artifact))
    cfg = eval_load_config(artifact, args.recipe, args.config, args.overrides, args.data, args.eval_recipe)
    owned = not is_dist_active()
    denv = init_distributed(eval_device(cfg).type)
    try:
        return eval_and_report(args, artifact, cfg, denv)
    finally:
        if owned:
            destroy_distributed()


def eval_receipt(setup: dict, run) -> dict:
    """Every second of the evaluation: the setup (artifact read, decompressed and dequantized; compiler import;
    the compile warm-up on random tokens) and every pass, with the total of all of them."""
    rows = {f"setup_{k}": v for k, v in setup.items()}
    rows.update(run.timings)
    rows["total_s"] = sum(rows.values())
    return rows


def format_eval_receipt(receipt: dict) -> str:
    names = {"setup_load_s": "setup: read + decompress + dequantize the artifact",
             "setup_compiler_import_s": "setup: compiler import", "setup_compile_warmup_s":
             "setup: compile warm-up (random tokens)", "total_s": "= the whole evaluation"}
    lines = ["receipt (seconds)"]
    for k, v in receipt.items():
        label = names.get(k, f"pass: {k[len('eval_'):-2]}" if k.startswith("eval_") else k)
        lines.append(f"  {label:<52} {v:8.1f}")
    return "\n".join(lines)


def eval_and_report(args, artifact: Path, cfg: RunConfig, denv) -> int:
    from pgolf.eval.runner import eval_log, passes_from_config, run_passes
    from pgolf.eval.scoring import load_compiler, scorer_for
    from pgolf.eval.warmup import warm_configured_eval

    tokens, lut, data_check = eval_load_data(cfg, args.max_tokens or cfg.eval.val_tokens)
    if data_check["note"] and denv.is_main:
        print(f"warning: {data_check['note']}")
    t_load = time.perf_counter()
    model = eval_load_model(artifact, cfg, denv.device)
    setup = {"load_s": time.perf_counter() - t_load,
             "compiler_import_s": load_compiler(scorer_for(cfg.eval), denv.device)}
    warm = warm_configured_eval(model, cfg, denv.rank, denv.world_size)
    setup["compile_warmup_s"] = warm["seconds"]
    t0 = time.perf_counter()
    run = run_passes(model, tokens, lut, passes_from_config(cfg), denv.rank, denv.world_size,
                     log=eval_log if denv.is_main else None)
    if not denv.is_main:
        return 0
    results = run.as_dict()
    receipt = eval_receipt(setup, run)
    print(format_eval_table(results))
    print(format_eval_receipt(receipt))
    if warm["seconds"]:
        print(f"setup: compiled before the passes (eval.precompile): scoring {warm['scoring']}, "
              f"TTT step {warm['ttt_step']}")
    report = {"artifact": str(artifact), "config_hash": config_hash(cfg), "val_tokens": int(tokens.numel()),
              "world_size": denv.world_size, "results": results, "setup_compiler_import_s": setup["compiler_import_s"],
              "setup_compile_warmup_s": warm["seconds"], "setup_load_s": setup["load_s"],
              "timings": run.timings, "receipt": receipt,
              "seconds": time.perf_counter() - t0, "data_manifest": data_check}
    out = Path(args.out) if args.out else artifact.parent / "eval.json"
    try:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    except OutputError as e:  # the table above is the result: say where it could not go, and keep it on stdout
        print(json.dumps(report))
        raise OutputError(f"{e}; the results are printed above (the last line is eval.json's content)") from None
    print(f"wrote {out}")
    return 0


def check_audit_for(target: Path):
    """(the run's recorded file audit, or None when RUN_DIR/file_audit.json is missing; the run directory)."""
    from pgolf.eval.legality import FILE_AUDIT_NAME, read_file_audit

    run_dir = target if target.is_dir() else target.parent
    path = run_dir / FILE_AUDIT_NAME
    return (read_file_audit(path) if path.is_file() else None), run_dir


def check_passes(cfg: RunConfig, seq_len: int, n_tokens: int) -> dict:
    """{name: PassSpec} of the configured passes, cut to the check's short stream: seq_len, strides within it,
    a few TTT chunks inside the stream (so that adaptation happens between scored chunks), no time limit, and
    for document TTT a prefix of half the documents (so that the global phases run too)."""
    from pgolf.eval.runner import passes_from_config

    e = cfg.eval
    ttt_cfg = dataclasses.replace(e, ttt_chunk_tokens=max(seq_len, math.ceil(n_tokens / 4)), ttt_time_limit_s=0.0,
                                  ttt_prefix_frac=max(e.ttt_prefix_frac, 0.5))
    specs = {}
    for spec in passes_from_config(cfg):
        stride = min(spec.stride, seq_len) or (seq_len if spec.kind == "ttt" else 0)
        specs[spec.name] = dataclasses.replace(spec, seq_len=seq_len, stride=stride,
                                               eval_cfg=ttt_cfg if spec.eval_cfg is not None else None)
    return specs


def cmd_check(args) -> int:
    from pgolf.eval.legality import check_run_audit, format_check_table, run_legality_checks
    from pgolf.eval.runner import run_pass

    target = Path(args.artifact)
    artifact = eval_resolve_artifact(target)
    cfg = eval_load_config(artifact, args.recipe, args.config, args.overrides, args.data, args.eval_recipe)
    seq_len = args.seq_len or cfg.eval.seq_len or cfg.train.seq_len
    n_tokens = args.tokens or 4 * seq_len + 1
    tokens, lut, data_check = eval_load_data(cfg, n_tokens)
    if data_check["note"]:
        print(f"warning: {data_check['note']}")
    state_model = eval_load_model(artifact, cfg, eval_device(cfg))

    def make_model():
        return state_model  # every pass evaluates it read-only (TTT adapts a deep copy)

    specs = check_passes(cfg, seq_len, tokens.numel())
    if args.method != "all":
        if args.method not in specs:
            raise UserError(f"--method {args.method}: not configured (eval.sliding_stride / eval.ttt)")
        specs = {args.method: specs[args.method]}
    audit, run_dir = check_audit_for(target)
    audit_row = check_run_audit(audit, cfg.data.val_pattern, run_dir)  # the training's reads, not this process's
    failed = 0
    for name, spec in specs.items():
        def eval_fn(m, t, lu, spec=spec, **kw):
            return run_pass(m, t, lu, spec, **kw)

        results = run_legality_checks(make_model, tokens, lut, eval_fn, audit_row=audit_row)
        print(f"== {name} ({spec.kind}, {tokens.numel()} val tokens, seq_len {seq_len})")
        print(format_check_table(results))
        failed += sum(not r.passed for r in results)
    print(f"{'FAIL' if failed else 'PASS'}: {failed} failed check(s)")
    return 1 if failed else 0


def add_eval_shared_args(p) -> None:
    p.add_argument("--data", default="", help="folder with the val shards and tokenizer (default: data.path)")
    p.add_argument("--recipe", default="", help="build the model from this recipe instead of a config.json")
    p.add_argument("--config", default="", help="RUN_DIR/config.json (default: the one beside the artifact)")
    p.add_argument("--eval-recipe", default="", help="take the eval.* settings of this recipe (before --set)")
    add_override_argument(p)


def add_eval_commands(subparsers) -> None:
    p = subparsers.add_parser("eval", help="val_loss / val_bpb of a saved model: plain, sliding, TTT as configured",
                              description="Evaluate a saved model and write eval.json. On N ranks (torchrun "
                                          "--nproc_per_node=N -m pgolf eval ...) the ranks split the windows "
                                          "and TTT's batches; the sums are all-reduced.")
    p.add_argument("artifact", help="model.pgq, model.pgw, or a run directory")
    add_eval_shared_args(p)
    p.add_argument("--max-tokens", type=int, default=0,
                   help="score only the first N val tokens (default: the config's eval.val_tokens; 0 there = all)")
    p.add_argument("--out", default="", help="where to write eval.json (default: beside the artifact)")
    p.set_defaults(func=cmd_eval)

    c = subparsers.add_parser("check", help="legality checks (causality, normalization, score-before-update, "
                                            "no val in training): PASS/FAIL table, exit 1 on any FAIL")
    c.add_argument("artifact", help="model.pgq, model.pgw, or a run directory")
    add_eval_shared_args(c)
    c.add_argument("--tokens", type=int, default=0, help="val tokens to check on (default 4 * seq_len + 1)")
    c.add_argument("--seq-len", type=int, default=0, help="eval sequence length for the check (default: config)")
    c.add_argument("--method", default="all", choices=["all", "plain", "sliding", "ttt"],
                   help="check one eval method (default: every configured one)")
    c.set_defaults(func=cmd_check)
