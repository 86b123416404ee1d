"""Assemble a challenge submission folder, records/<date>_<name>/, from a recipe and its finished runs.

The folder holds what a PR to openai/parameter-golf adds (records.md §5.1): train_gpt.py (generated; its size
on disk is bytes_code), submission.json (the challenge's fields plus per-seed results, spread, hardware and a
compliance block, §5.4), README.md (results table and statistics), requirements.txt, and logs/<run>/ with
each run's record, metrics, config and environment fingerprint. Results come from run records only.
"""

import importlib.metadata
import json
import math
import shutil
import time
from pathlib import Path

from pgolf.config import RunConfig, config_to_dict
from pgolf.errors import UserError
from pgolf.experiments.results import query_runs, read_run_record
from pgolf.experiments.stats import (
    CHALLENGE_ALPHA,
    CHALLENGE_MARGIN_NATS,
    challenge_rule,
    mean_ci,
    sample_mean,
    sample_std,
)
from pgolf.export.amalgamate import export_script

# Score stages, best first: the submission's val_loss / val_bpb is the first one every run computed.
SUBMISSION_SCORE_STAGES = ("ttt", "sliding", "roundtrip", "prequant")
# Config keys that may differ between the shipped script's defaults and the runs it reports.
FREE_KEYS = ("name", "out_dir", "recipe", "data.path", "data.tokenizer", "train.seed")
STAGE_WORDS = {"ttt": "score-first TTT", "sliding": "the sliding-window eval",
               "roundtrip": "the quantization round trip", "prequant": "training, before quantization"}
RUN_FILES = ("record.json", "metrics.jsonl", "config.json", "env.json")
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_runs(run_dirs=(), db=None, sweep=None) -> list[tuple[Path, dict]]:
    """(run dir, record) of each run named directly or found in the results database (sweep filter)."""
    dirs = [Path(d) for d in run_dirs]
    if db is not None:
        rows = query_runs(db, sweep=sweep)
        if not rows:
            raise UserError(f"{db}: no runs" + (f" in sweep {sweep!r}" if sweep else ""))
        dirs += [Path(r["run_dir"]) for r in rows]
    if not dirs:
        raise UserError("no runs given: pass --runs RUN_DIR ... or --db FILE [--sweep NAME]")
    runs = [(d, read_run_record(d / "record.json")) for d in dict.fromkeys(dirs)]
    bad = [f"{d} ({r.get('status')})" for d, r in runs if r.get("status") != "ok"]
    if bad:
        raise UserError(f"runs that did not finish ok cannot be reported: {', '.join(bad)}")
    return runs


def check_runs_match(cfg: RunConfig, runs) -> None:
    """The runs must be of the config the script ships (up to the seed and the data location)."""
    want = flat_config(config_to_dict(cfg))
    for run_dir, record in runs:
        have = flat_config(record.get("config") or {})
        diff = sorted(k for k in want if k not in FREE_KEYS and have.get(k) != want[k])
        if diff:
            shown = ", ".join(f"{k}: run {have.get(k)!r} vs script {want[k]!r}" for k in diff[:6])
            raise UserError(f"{run_dir}: run config differs from the exported one ({shown})")
    seeds = [r["seed"] for _, r in runs]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"two runs share a seed ({sorted(seeds)}); report each seed once")


def submission_score_stage(runs) -> str:
    for stage in SUBMISSION_SCORE_STAGES:
        if all(r["metrics"].get(f"{stage}_bpb") is not None for _, r in runs):
            return stage
    raise UserError("the runs have no val_bpb in common (no prequant / roundtrip / sliding / ttt metric)")


def seed_result(record: dict, stage: str) -> dict:
    m, t, b = record["metrics"], record["train"], record["bytes"]
    return {"val_loss": m[f"{stage}_loss"], "val_bpb": m[f"{stage}_bpb"], "artifact_bytes": b.get("artifact"),
            "steps": t.get("steps"), "step_avg_ms": t.get("ms_per_step")}


def hardware_of(env: dict) -> str:
    if env.get("gpu_count"):
        return f"{env['gpu_count']}x {env.get('gpu_name')}"
    return f"CPU ({env.get('platform') or 'unknown'})"


def max_or_none(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def compliance_block(cfg: RunConfig, runs, bytes_total) -> dict:
    comp = [r.get("compliance") or {} for _, r in runs]
    train_s = max_or_none(c.get("train_plus_calibration_s") for c in comp)
    eval_s = max_or_none(c.get("eval_s") for c in comp)
    legality = {}
    for c in comp:
        for check, verdict in (c.get("legality") or {}).items():
            passed = verdict if isinstance(verdict, bool) else str(verdict).upper().startswith("PASS")
            legality[check] = legality.get(check, True) and passed
    return {"train_under_600s": None if train_s is None else train_s <= TRAIN_LIMIT_S,
            "train_plus_calibration_s_max": train_s,
            "eval_under_600s": None if eval_s is None else eval_s <= EVAL_LIMIT_S, "eval_s_max": eval_s,
            "artifact_under_16mb": None if bytes_total is None else bytes_total <= cfg.quant.size_cap,
            "score_first_ttt": True if cfg.eval.ttt else None, "three_seeds": len(runs) >= 3,
            "legality": legality or None}


def comparison_block(runs, baseline_runs, stage: str) -> dict:
    """The challenge's significance rule (records.md §5.1) of the runs' val_loss against a baseline's."""
    base_stage = submission_score_stage(baseline_runs)
    tokenizers = {(r.get("env") or {}).get("tokenizer", {}).get("sha256") for _, r in runs + baseline_runs}
    new = [r["metrics"][f"{stage}_loss"] for _, r in runs]
    base = [r["metrics"][f"{base_stage}_loss"] for _, r in baseline_runs]
    rule = challenge_rule(new, base)
    return {"baseline_runs": [str(d) for d, _ in baseline_runs], "baseline_stage": base_stage,
            "baseline_val_loss": sample_mean(base), "delta_nats": -rule.improvement, "t_statistic": rule.t,
            "welch_df": rule.df, "p_value": rule.p, "margin_nats": CHALLENGE_MARGIN_NATS, "alpha": CHALLENGE_ALPHA,
            "passes": rule.passes, "same_tokenizer": len(tokenizers) == 1}


def requirement_lines(packages: list[str], torch_version: str | None) -> list[str]:
    """Pinned requirements: torch at the runs' version, the others at the versions installed here."""
    lines = []
    for pkg in packages:
        version = torch_version if pkg == "torch" and torch_version else None
        if version is None:
            try:
                version = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                version = None
        lines.append(f"{pkg}=={version.split('+')[0]}" if version else pkg)
    return lines


def fmt_number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def stat_line(label: str, values: list[float]) -> str:
    mean, half = mean_ci(values)
    ci = "n/a" if math.isnan(half) else f"±{half:.5f}"
    return f"| {label} | {mean:.5f} | {sample_std(values):.5f} | {ci} | {min(values):.5f} | {max(values):.5f} |"


def comparison_lines(comp: dict | None) -> list[str]:
    if not comp:
        return []
    verdict = "passes" if comp["passes"] else "does not pass"
    lines = ["## Against the baseline", "",
             f"{len(comp['baseline_runs'])} baseline runs, mean val_loss {comp['baseline_val_loss']:.5f} "
             f"(stage `{comp['baseline_stage']}`). Delta {comp['delta_nats']:+.5f} nats; one-sided Welch t = "
             f"{comp['t_statistic']:.3f}, df = {comp['welch_df']:.1f}, p = {comp['p_value']:.2e} for an "
             f"improvement of at least {comp['margin_nats']} nats: {verdict} the challenge rule "
             f"(p < {comp['alpha']})."]
    if not comp["same_tokenizer"]:
        lines.append("The runs use different tokenizers: per-token nats are not comparable; compare val_bpb.")
    return lines + [""]


def readme_text(sub: dict, cfg: RunConfig, stage: str, export: dict) -> str:
    seeds = sub["seed_results"]
    rows = [f"| {s} | {r['val_loss']:.5f} | {r['val_bpb']:.5f} | {r['artifact_bytes']} | {r['steps']} | "
            f"{fmt_number(r['step_avg_ms'], '.1f')} |" for s, r in seeds.items()]
    losses = [r["val_loss"] for r in seeds.values()]
    bpbs = [r["val_bpb"] for r in seeds.values()]
    lines = [
        f"# {sub['name']}", "", *([sub["blurb"], ""] if sub["blurb"] else []),
        f"Recipe `{cfg.recipe}`; score stage `{stage}` (val_bpb after {STAGE_WORDS[stage]}).",
        f"Hardware: {sub['hardware']}; PyTorch {sub['pytorch_version']}.", "",
        "## Results", "",
        "| seed | val_loss | val_bpb | artifact bytes | steps | step avg ms |", "|---|---|---|---|---|---|",
        *rows, "",
        f"## Statistics ({len(losses)} seeds; CI = 95% two-sided Student t)", "",
        "| metric | mean | std | 95% CI | min | max |", "|---|---|---|---|---|---|",
        stat_line("val_loss", losses), stat_line("val_bpb", bpbs), "", *comparison_lines(sub.get("comparison")),
        "## Size", "",
        f"- train_gpt.py: {sub['bytes_code']:,} B ({export['form']} form; plain {export['plain_bytes']:,} B, "
        f"compressed {export['compressed_bytes']:,} B)",
        f"- bytes_total (max over seeds of code + artifact): {fmt_number(sub['bytes_total'], ',')} B of "
        f"{cfg.quant.size_cap:,}",
        "", "## Compliance", "",
        *[f"- {k}: {v}" for k, v in sub["compliance"].items()], "",
        "## Reproduce", "",
        "```", "pip install -r requirements.txt",
        "DATA_PATH=<shard folder> TOKENIZER_PATH=<.model> SEED=<seed> \\",
        "  torchrun --standalone --nproc_per_node=8 train_gpt.py   # once per seed above", "```", "",
        "Every setting is an environment variable (see `Hyperparameters.FIELDS` in train_gpt.py); the logs/ "
        "folder holds each run's record.json, metrics.jsonl, config.json and env.json.", ""]
    return "\n".join(lines)


def write_submission(cfg: RunConfig, out_dir, runs, author: str = "", github_id: str = "", name: str = "",
                     blurb: str = "", compressed="auto", strip_docstrings: bool = True,
                     strip_comments: bool = True, baseline_runs=()) -> dict:
    """Write the submission folder for cfg and its runs [(run dir, record)]; returns submission.json's dict.
    With baseline_runs, submission.json and README.md carry the challenge's significance test against them."""
    check_runs_match(cfg, runs)
    runs = sorted(runs, key=lambda item: item[1]["seed"])
    stage = submission_score_stage(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export = export_script(cfg, out / "train_gpt.py", compressed=compressed, strip_docstrings=strip_docstrings,
                           strip_comments=strip_comments)
    code_bytes = export["bytes"]
    seed_results = {str(r["seed"]): seed_result(r, stage) for _, r in runs}
    artifacts = [s["artifact_bytes"] for s in seed_results.values()]
    bytes_total = code_bytes + max(artifacts) if all(a is not None for a in artifacts) else None
    losses = [s["val_loss"] for s in seed_results.values()]
    bpbs = [s["val_bpb"] for s in seed_results.values()]
    env = runs[0][1].get("env") or {}
    sub = {
        "author": author, "github_id": github_id, "name": name or cfg.recipe, "blurb": blurb,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "val_loss": sample_mean(losses), "val_bpb": sample_mean(bpbs),
        "bytes_total": bytes_total, "bytes_code": code_bytes,
        "seeds": [r["seed"] for _, r in runs], "seed_results": seed_results,
        "val_loss_std": sample_std(losses), "val_bpb_std": sample_std(bpbs),
        "score_stage": stage, "artifact_bytes_max": max_or_none(artifacts),
        "hardware": hardware_of(env), "pytorch_version": env.get("torch"), "cuda_version": env.get("cuda"),
        "compliance": compliance_block(cfg, runs, bytes_total),
    }
    if baseline_runs:
        sub["comparison"] = comparison_block(runs, list(baseline_runs), stage)
    (out / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme_text(sub, cfg, stage, export), encoding="utf-8")
    reqs = requirement_lines(export["packages"]["required"], env.get("torch"))
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n", encoding="utf-8")
    for run_dir, record in runs:
        dest = out / "logs" / f"seed{record['seed']}_{Path(run_dir).name}"
        dest.mkdir(parents=True, exist_ok=True)
        for fname in RUN_FILES + tuple(p.name for p in Path(run_dir).glob("*.log")):
            if (Path(run_dir) / fname).is_file():
                shutil.copyfile(Path(run_dir) / fname, dest / fname)
    return sub
