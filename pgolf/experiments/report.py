"""Reports from the results database and run records: report.md with an ablation table, plus PNG figures.

Everything here reads record.json / metrics.jsonl (through the database), never text logs. The challenge
rule is judged on the latest evaluation stage that every run of the sweep has (ttt, sliding, roundtrip,
then pre-quant loss). A second table gives every metric as mean ± std with its own Welch and paired (same
seed) tests against the baseline, and states how many validation tokens the runs scored.
"""

import json
import math
from pathlib import Path

from pgolf.errors import UserError
from pgolf.experiments.plots import (
    plot_bytes,
    plot_loss_curves,
    plot_metrics_vs_arm,
    plot_paired_deltas,
    plot_quant_delta,
    plot_run_curves,
)
from pgolf.experiments.results import arm_label, query_runs, read_run_record
from pgolf.experiments.stats import (
    CHALLENGE_ALPHA,
    CHALLENGE_MARGIN_NATS,
    challenge_rule,
    mean_ci,
    paired_ttest,
    sample_std,
    welch_ttest,
)

BPB_METRICS = ["prequant_bpb", "roundtrip_bpb", "sliding_bpb", "ttt_bpb"]
SCORE_STAGES = ["ttt", "sliding", "roundtrip", "prequant"]


def read_metrics_jsonl(run_dir) -> list[dict]:
    """The run's metrics.jsonl as a list of dicts; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def group_arms(rows: list[dict]) -> list[dict]:
    """Group ok runs by their swept overrides: [{"label", "overrides", "rows"}] in database order."""
    arms: dict[str, dict] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        key = row["overrides_json"] or "{}"
        arms.setdefault(key, {"label": arm_label(row["overrides"]), "overrides": row["overrides"], "rows": []})
        arms[key]["rows"].append(row)
    return sorted(arms.values(), key=lambda a: [(k, _sort_value(v)) for k, v in sorted(a["overrides"].items())])


def _sort_value(value):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def score_stage(rows: list[dict]) -> str:
    """The latest evaluation stage whose loss every row has."""
    for stage in SCORE_STAGES:
        if rows and all(r.get(f"{stage}_loss") is not None for r in rows):
            return stage
    raise UserError("no evaluation stage has a val_loss in every ok run; nothing to compare")


def _values(arm: dict, key: str) -> list[float]:
    return [r[key] for r in arm["rows"] if r.get(key) is not None]


def _stat(arm: dict, key: str) -> tuple[float, float]:
    vals = _values(arm, key)
    return mean_ci(vals) if vals else (math.nan, math.nan)


def _swept_axis(arms: list[dict]) -> tuple[str | None, bool]:
    """The single swept key that varies across arms, and whether all its values are numbers."""
    keys = sorted({k for a in arms for k in a["overrides"]})
    varying = [k for k in keys if len({json.dumps(a["overrides"].get(k)) for a in arms}) > 1]
    if len(varying) != 1:
        return None, False
    key = varying[0]
    numeric = all(isinstance(a["overrides"].get(key), (int, float)) and not isinstance(a["overrides"].get(key), bool)
                  for a in arms)
    return key, numeric


def _mean_curve(run_dirs: list[str]) -> dict | None:
    """Mean and std of the train loss over seeds, on the steps that every seed logged."""
    per_run = []
    for d in run_dirs:
        pts = {m["step"]: m["loss"] for m in read_metrics_jsonl(d) if m.get("kind") == "train" and "loss" in m}
        if pts:
            per_run.append(pts)
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    mean = [sum(p[s] for p in per_run) / len(per_run) for s in steps]
    std = [sample_std([p[s] for p in per_run]) for s in steps]
    return {"steps": steps, "mean": mean, "std": std, "n": len(per_run)}


def _fmt(mean: float, ci: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def _marks(p: float) -> str:
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


def comparison_rows(arms: list[dict], base: dict, stage: str) -> list[dict]:
    """Per arm: Δ loss / Δ bpb vs the baseline, Welch two-sided p, and the challenge rule."""
    loss_key, bpb_key = f"{stage}_loss", f"{stage}_bpb"
    out = []
    base_loss, base_bpb = _values(base, loss_key), _values(base, bpb_key)
    for arm in arms:
        row = {"arm": arm, "d_loss": math.nan, "d_bpb": math.nan, "p": math.nan, "rule": None}
        loss, bpb = _values(arm, loss_key), _values(arm, bpb_key)
        if arm is not base and loss and base_loss:
            row["d_loss"] = sum(loss) / len(loss) - sum(base_loss) / len(base_loss)
            if bpb and base_bpb:
                row["d_bpb"] = sum(bpb) / len(bpb) - sum(base_bpb) / len(base_bpb)
            if len(loss) >= 2 and len(base_loss) >= 2:
                row["p"] = welch_ttest(loss, base_loss).p_two_sided
                row["rule"] = challenge_rule(loss, base_loss)
        out.append(row)
    return out


def _mean_std(arm: dict, key: str, digits: int = 4) -> str:
    vals = _values(arm, key)
    if not vals:
        return "-"
    return _fmt(sum(vals) / len(vals), sample_std(vals) if len(vals) >= 2 else math.nan, digits)


def _paired_values(arm: dict, base: dict, key: str) -> tuple[list[float], list[float]]:
    """The metric of the arm's and the baseline's runs of each seed both have (sorted by seed)."""
    mine = {r["seed"]: r[key] for r in arm["rows"] if r.get(key) is not None}
    theirs = {r["seed"]: r[key] for r in base["rows"] if r.get(key) is not None}
    seeds = sorted(set(mine) & set(theirs))
    return [mine[s] for s in seeds], [theirs[s] for s in seeds]


def _delta_cell(arm: dict, base: dict, key: str) -> str:
    """Δ of the means, the two-sided Welch p, and the paired p over the seeds both arms ran (runs of one
    seed form a pair)."""
    a, b = _values(arm, key), _values(base, key)
    if not a or not b:
        return "-"
    cell = f"{sum(a) / len(a) - sum(b) / len(b):+.4f}"
    if len(a) < 2 or len(b) < 2:
        return cell + " (n < 2)"
    p = welch_ttest(a, b).p_two_sided
    cell += f" (Welch p={p:.2g}{_marks(p)}"
    pa, pb = _paired_values(arm, base, key)
    if len(pa) >= 2:
        pp = paired_ttest(pa, pb).p_two_sided
        cell += f"; paired p={pp:.2g}{_marks(pp)}"
    return cell + ")"


def _per_metric_tables(arms: list[dict], base: dict) -> list[str]:
    """Mean ± sample std of every bpb metric and quant_delta per arm, then each arm's Δ from the baseline
    with the two-sided Welch and paired p of that metric alone (no correction for the number of tests)."""
    metrics = [m for m in BPB_METRICS if any(_values(a, m) for a in arms)] + ["quant_delta"]
    head = " | ".join(metrics)
    lines = ["## Per metric: mean ± std over seeds, and Δ from the baseline", "",
             "Sample standard deviation (n − 1) over the seeds of each arm.", "",
             f"| arm | n | {head} |", "|" + "---|" * (len(metrics) + 2)]
    for arm in arms:
        cells = [_mean_std(arm, m) for m in metrics]
        label = arm["label"] + (" (baseline)" if arm is base else "")
        lines.append(f"| {label} | {len(arm['rows'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Δ = arm mean − baseline mean (**{base['label']}**), each metric tested on its own, two-sided "
                  "(* p<0.05, ** p<0.01; no correction for the number of tests): Welch's t-test treats the arms "
                  "as independent samples; the paired t-test compares runs of the same seed (the same "
                  "initial weights where the swept setting leaves the parameter shapes alone), which removes the "
                  "seed-to-seed spread the arms share.", "",
              f"| arm | {' | '.join('Δ ' + m for m in metrics)} |", "|" + "---|" * (len(metrics) + 1)]
    for arm in arms:
        if arm is not base:
            lines.append(f"| {arm['label']} | " + " | ".join(_delta_cell(arm, base, m) for m in metrics) + " |")
    return lines


def _validation_scope(rows: list[dict]) -> str:
    """One sentence on the validation tokens the runs scored (from their records), or "" when unknown."""
    scopes = {(r.get("val_tokens"), r.get("val_split_tokens")) for r in rows}
    if not scopes or any(n is None or split is None for n, split in scopes):
        return ""
    if len(scopes) > 1:
        shown = ", ".join(f"{n:,} of {split:,}" for n, split in sorted(scopes))
        return (f"**Validation tokens differ between runs** ({shown}): their scores are not comparable "
                "with one another.")
    n, split = scopes.pop()
    if n < split:
        return (f"**Validation subset:** every run scored the first {n:,} of the {split:,} validation tokens "
                "(`eval.val_tokens`); these bpb are not comparable with whole-split scores.")
    return f"Every run scored the whole validation split ({split:,} tokens)."


def _table(arms: list[dict], base: dict, stage: str) -> list[str]:
    metrics = [m for m in BPB_METRICS if any(_values(a, m) for a in arms)]
    head = ["arm", "n"] + metrics + ["quant_delta", f"{stage}_loss", "Δ loss (nats)", "Δ bpb", "p (Welch)",
                                     "rule p", "passes rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for comp in comparison_rows(arms, base, stage):
        arm = comp["arm"]
        label = arm["label"] + (" (baseline)" if arm is base else "")
        cells = [label, str(len(arm["rows"]))]
        cells += [_fmt(*_stat(arm, m)) for m in metrics]
        cells += [_fmt(*_stat(arm, "quant_delta")), _fmt(*_stat(arm, f"{stage}_loss"))]
        if arm is base:
            cells += ["-"] * 5
        else:
            rule = comp["rule"]
            cells += [f"{comp['d_loss']:+.4f}{_marks(comp['p'])}" if not math.isnan(comp["d_loss"]) else "-",
                      f"{comp['d_bpb']:+.4f}" if not math.isnan(comp["d_bpb"]) else "-",
                      f"{comp['p']:.3g}" if not math.isnan(comp["p"]) else "-",
                      f"{rule.p:.3g}" if rule else "-",
                      ("yes" if rule.passes else "no") if rule else "n < 2"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(db, out_dir, sweep: str | None = None, baseline: str | None = None) -> Path:
    """Write report.md and its figures into out_dir; returns the path of report.md."""
    rows = query_runs(db, sweep=sweep)
    arms = group_arms(rows)
    if not arms:
        raise UserError(f"{db}: no finished (status ok) runs" + (f" in sweep {sweep!r}" if sweep else ""))
    labels = [a["label"] for a in arms]
    if baseline is not None and baseline not in labels:
        raise UserError(f"baseline arm {baseline!r} not found; arms: {labels}")
    base = arms[labels.index(baseline if baseline is not None else ("base" if "base" in labels else labels[0]))]
    stage = score_stage([r for a in arms for r in a["rows"]])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _write_figures(arms, base, out)
    failed = [r for r in rows if r["status"] != "ok"]
    title = f"Sweep report: {sweep}" if sweep else "Results report"
    lines = [f"# {title}", "",
             f"{sum(len(a['rows']) for a in arms)} finished runs in {len(arms)} arms"
             + (f"; {len(failed)} runs not ok ({', '.join(sorted({r['status'] for r in failed}))})" if failed else "")
             + f". Recipe(s): {', '.join(sorted({r['recipe'] or '?' for a in arms for r in a['rows']}))}.", "",
             f"Baseline arm: **{base['label']}**. Metrics are mean ± 95% CI (t-distribution) over seeds. "
             f"Δ and p compare `{stage}_loss` with the baseline (Welch's t-test, two-sided; * p<0.05, ** p<0.01). "
             f"The challenge rule: an improvement of ≥ {CHALLENGE_MARGIN_NATS} nats at p < {CHALLENGE_ALPHA}, "
             "one-sided Welch test.", ""]
    scope = _validation_scope([r for a in arms for r in a["rows"]])
    lines += [scope, ""] if scope else []
    lines += _table(arms, base, stage)
    lines += ["", "## Speed and size", "", "| arm | steps | ms/step | tokens/s | bytes total |",
              "|---|---|---|---|---|"]
    for arm in arms:
        cells = [_fmt(*_stat(arm, "steps"), digits=0), _fmt(*_stat(arm, "ms_per_step"), 1),
                 _fmt(*_stat(arm, "tokens_per_s"), 0), _fmt(*_stat(arm, "bytes_total"), 0)]
        lines.append(f"| {arm['label']} | " + " | ".join(cells) + " |")
    lines += [""] + _per_metric_tables(arms, base)
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    lines += ["", "## Runs", "", "| run | arm | seed | status | config hash |", "|---|---|---|---|---|"]
    lines += [f"| {r['run_id']} | {arm_label(r['overrides'])} | {r['seed']} | {r['status']} | {r['config_hash']} |"
              for r in rows]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _paired_summary(arms: list[dict], base: dict, metrics: list[str], key: str | None) -> list[dict] | None:
    """Per non-baseline arm and metric: the same-seed differences from the baseline and their mean ± 95% CI;
    None unless every arm shares at least 2 seeds with the baseline."""
    summary = []
    for arm in arms:
        if arm is base:
            continue
        s: dict = {"label": arm["label"], "x": arm["overrides"].get(key) if key else None}
        for m in metrics:
            a, b = _paired_values(arm, base, m)
            if len(a) < 2:
                return None
            diffs = [x - y for x, y in zip(a, b, strict=True)]
            mean, ci = mean_ci(diffs)
            s[m] = {"diffs": diffs, "mean": mean, "ci": ci}
        summary.append(s)
    if key:
        summary.sort(key=lambda s: s["x"])
    return summary or None


def _write_figures(arms: list[dict], base: dict, out: Path) -> list[str]:
    written = []
    curves = {a["label"]: c for a in arms if (c := _mean_curve([r["run_dir"] for r in a["rows"]]))}
    if curves:
        written.append(plot_loss_curves(curves, out / "loss_curves.png").name)
    key, numeric = _swept_axis(arms)
    metrics = [m for m in BPB_METRICS[:3] if all(_values(a, m) for a in arms)]
    summary = []
    for a in arms:
        s = {"label": a["label"], "x": a["overrides"].get(key) if numeric else None}
        for m in metrics + ["quant_delta"]:
            s[m] = _stat(a, m)
        for b in ("bytes_code", "bytes_artifact", "bytes_total"):
            vals = _values(a, b)
            s[b] = sum(vals) / len(vals) if vals else 0
        summary.append(s)
    if numeric:
        summary.sort(key=lambda s: s["x"])
    if metrics:
        written.append(plot_metrics_vs_arm(summary, metrics, out / "metrics_vs_arm.png", xlabel=key).name)
        paired_metrics = metrics + (["quant_delta"] if all(_values(a, "quant_delta") for a in arms) else [])
        paired = _paired_summary(arms, base, paired_metrics, key if numeric else None)
        if paired:
            written.append(plot_paired_deltas(paired, paired_metrics, out / "paired_deltas.png", base["label"],
                                              xlabel=key if numeric else None).name)
    if all(_values(a, "quant_delta") for a in arms):
        written.append(plot_quant_delta(summary, out / "quant_delta.png", xlabel=key if numeric else None).name)
    if all(_values(a, "bytes_total") for a in arms):
        cap = next((r["bytes_cap"] for a in arms for r in a["rows"] if r.get("bytes_cap")), 16_000_000)
        written.append(plot_bytes(summary, out / "bytes.png", cap=cap).name)
    return written


FINAL_STAGE_LABELS = {"roundtrip": "quantized", "sliding": "quantized, sliding window", "ttt": "quantized, TTT"}


def plot_single_run(run_dir: Path, record: dict, path: Path) -> bool:
    """One run's train and validation losses from its metrics.jsonl records, and the record's scored stages
    at the last step; False when the run logged no loss."""
    lines = read_metrics_jsonl(run_dir)
    train = [(m["step"], m["loss"]) for m in lines if m.get("kind") == "train" and "loss" in m]
    val = sorted({m["step"]: m["val_loss"] for m in lines if m.get("kind") == "val" and "val_loss" in m}.items())
    if not train and not val:
        return False
    last = max([s for s, _ in train + val])
    metrics = record.get("metrics") or {}
    finals = {label: (last, metrics[f"{stage}_loss"]) for stage, label in FINAL_STAGE_LABELS.items()
              if metrics.get(f"{stage}_loss") is not None}
    plot_run_curves({"steps": [s for s, _ in train], "loss": [v for _, v in train]},
                    {"steps": [s for s, _ in val], "loss": [v for _, v in val]}, finals, path,
                    title=f"Run {record.get('run_id') or run_dir.name}: loss")
    return True


def report_single_run(run_dir, out_dir) -> Path:
    """A short report.md and the loss curve of one run (for `pgolf demo`); returns the report's path."""
    run_dir, out = Path(run_dir), Path(out_dir)
    record = read_run_record(run_dir / "record.json")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run {record.get('run_id') or run_dir.name}", "",
             f"Recipe `{record.get('recipe')}`, seed {record.get('seed')}, status **{record.get('status')}**.", ""]
    metrics = record.get("metrics") or {}
    lines += ["| stage | val_loss (nats) | val_bpb |", "|---|---|---|"]
    for stage in reversed(SCORE_STAGES):
        loss, bpb = metrics.get(f"{stage}_loss"), metrics.get(f"{stage}_bpb")
        if loss is not None or bpb is not None:
            cells = ["-" if v is None else f"{v:.4f}" for v in (loss, bpb)]
            lines.append(f"| {stage} | {cells[0]} | {cells[1]} |")
    train, size = record.get("train") or {}, record.get("bytes") or {}
    if metrics.get("quant_delta") is not None:
        lines += ["", f"Quantization delta: {metrics['quant_delta']:+.4f} bpb."]
    if train:
        lines += ["", f"Steps: {train.get('steps')}, {train.get('ms_per_step') or 0:.1f} ms/step, "
                      f"{train.get('tokens_per_s') or 0:,.0f} tokens/s, stopped by {train.get('stop_reason')}."]
    if size.get("total") is not None:
        cap = size.get("cap") or 16_000_000
        verdict = "fits" if size["total"] <= cap else "does NOT fit"
        lines += ["", f"Bytes: code {size.get('code'):,} + artifact {size.get('artifact'):,} = {size['total']:,}"
                      f" ({verdict} the {cap:,} cap)."]
    if plot_single_run(run_dir, record, out / "loss_curve.png"):
        lines += ["", "![loss curve](loss_curve.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
