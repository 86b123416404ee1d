"""Statistics against scipy, the results database, reports and the experiments CLI."""

import argparse
import csv
import json
import math

import pytest
from fake_train import write_fake_run
from scipy import stats as sps

from pgolf.errors import UserError
from pgolf.experiments.commands import add_experiments_commands
from pgolf.experiments.report import report_single_run, write_report
from pgolf.experiments.results import export_csv, ingest_record, query_runs
from pgolf.experiments.stats import (
    betainc_regularized,
    challenge_rule,
    mean_ci,
    paired_ttest,
    sample_std,
    seeds_needed,
    student_t_ppf,
    student_t_sf,
    welch_ttest,
)

BASE = [1.1230, 1.1241, 1.1225]
NEW = [1.1172, 1.1160, 1.1181, 1.1169]


@pytest.mark.parametrize("df", [1.0, 2.0, 3.7, 12.0, 150.0])
def test_t_distribution_matches_scipy(df):
    for t in (-6.0, -1.3, 0.0, 0.4, 2.5, 30.0):
        assert student_t_sf(t, df) == pytest.approx(sps.t.sf(t, df), abs=1e-9)
    for q in (0.0005, 0.05, 0.4, 0.9, 0.995):
        assert student_t_ppf(q, df) == pytest.approx(sps.t.ppf(q, df), abs=1e-6)
    for x in (0.01, 0.5, 0.93):
        from scipy.special import betainc

        assert betainc_regularized(df / 2, 0.5, x) == pytest.approx(betainc(df / 2, 0.5, x), abs=1e-10)


def test_mean_ci_and_welch_match_scipy():
    m, half = mean_ci(BASE)
    lo, hi = sps.t.interval(0.95, len(BASE) - 1, loc=sps.tmean(BASE), scale=sps.sem(BASE))
    assert m == pytest.approx((lo + hi) / 2, abs=1e-12) and half == pytest.approx((hi - lo) / 2, abs=1e-9)
    assert sample_std(BASE) == pytest.approx(sps.tstd(BASE), abs=1e-12)
    w = welch_ttest(NEW, BASE)
    ref = sps.ttest_ind(NEW, BASE, equal_var=False)
    assert w.t == pytest.approx(ref.statistic, abs=1e-6)
    assert w.p_two_sided == pytest.approx(ref.pvalue, abs=1e-6)
    assert w.p_less == pytest.approx(sps.ttest_ind(NEW, BASE, equal_var=False, alternative="less").pvalue, abs=1e-6)
    assert w.p_greater == pytest.approx(sps.ttest_ind(NEW, BASE, equal_var=False, alternative="greater").pvalue,
                                        abs=1e-6)
    assert math.isnan(mean_ci([1.0])[1])


def test_paired_ttest_matches_scipy():
    a, b = NEW[:3], BASE
    res = paired_ttest(a, b)
    ref = sps.ttest_rel(a, b)
    assert res.t == pytest.approx(ref.statistic, rel=1e-9) and res.p_two_sided == pytest.approx(ref.pvalue, rel=1e-7)
    assert res.diff == pytest.approx(sum(a) / 3 - sum(b) / 3) and res.df == 2
    assert paired_ttest([1.0, 2.0], [1.0, 2.0]).p_two_sided == 1.0  # no difference at all
    with pytest.raises(UserError):
        paired_ttest([1.0, 2.0], [1.0])


def test_challenge_rule_is_shifted_one_sided_welch():
    rule = challenge_rule(NEW, BASE)
    ref = sps.ttest_ind([x + 0.005 for x in NEW], BASE, equal_var=False, alternative="less")
    assert rule.p == pytest.approx(ref.pvalue, abs=1e-6)
    assert rule.improvement == pytest.approx(sum(BASE) / 3 - sum(NEW) / 4)
    assert rule.passes == (ref.pvalue < 0.01)
    # an improvement below the 0.005 margin never passes, however tight the seeds
    assert not challenge_rule([1.0 - 0.004 + e for e in (0, 1e-5, 2e-5)], [1.0, 1.00001, 1.00002]).passes
    assert challenge_rule([0.99 + e for e in (0, 1e-4, 2e-4)], [1.0, 1.0001, 1.0002]).passes


def test_seeds_needed_monotone_and_consistent():
    n = seeds_needed(0.002, 0.001)
    assert n >= 2
    assert seeds_needed(0.001, 0.001) > n  # a smaller effect needs more seeds
    assert seeds_needed(0.002, 0.002) > n  # noisier seeds need more
    # the returned n reaches the power by the same shifted-t formula; n-1 does not
    def power(k):
        df = 2 * k - 2
        return sps.t.sf(sps.t.ppf(0.99, df) - 0.002 / (0.001 * math.sqrt(2 / k)), df)
    assert power(n) >= 0.8 and (n == 2 or power(n - 1) < 0.8)
    with pytest.raises(UserError):
        seeds_needed(-0.1, 0.001)


def _populate(tmp_path, seeds=(1, 2, 3), lrs=(0.02, 0.03, 0.04)):
    db = tmp_path / "r.sqlite"
    for lr in lrs:
        for s in seeds:
            d = write_fake_run(tmp_path / "runs", f"lr{lr}_s{s}", {"optim.matrix_lr": lr}, s)
            ingest_record(db, d / "record.json", sweep="lr", overrides={"optim.matrix_lr": lr})
    return db


def test_ingest_is_idempotent_and_query_export(tmp_path):
    db = _populate(tmp_path)
    ingest_record(db, tmp_path / "runs" / "lr0.02_s1" / "record.json", sweep="lr")  # again: no duplicate
    rows = query_runs(db, sweep="lr")
    assert len(rows) == 9
    one = query_runs(db, where="seed = ? AND roundtrip_bpb > prequant_bpb", params=(2,))
    assert len(one) == 3 and all(r["seed"] == 2 for r in one)
    r = one[0]
    assert r["overrides"] == {"optim.matrix_lr": 0.02} and r["config"]["seed"] == 2 and r["env"]["gpu"] == "fake"
    assert r["bytes_total"] == 14_060_000 and r["train_loop_s"] == 20.0 and r["eval_ttt_s"] is None
    n = export_csv(db, tmp_path / "out.csv")
    lines = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert n == 9 and len(lines) == 9 and float(lines[0]["prequant_bpb"]) == pytest.approx(rows[0]["prequant_bpb"])
    with pytest.raises(UserError):
        query_runs(db, where="no_such_column = 1")
    with pytest.raises(UserError):
        ingest_record(db, tmp_path / "missing" / "record.json")


def test_rerun_in_same_dir_replaces_row(tmp_path):
    db = tmp_path / "r.sqlite"
    d = write_fake_run(tmp_path, "x_s1", {}, 1, status="failed")
    ingest_record(db, d)
    rec = json.loads((d / "record.json").read_text())
    rec.update(run_id="x_s1-retry", status="ok")
    (d / "record.json").write_text(json.dumps(rec))
    ingest_record(db, d)
    rows = query_runs(db)
    assert [(r["run_id"], r["status"]) for r in rows] == [("x_s1-retry", "ok")]


def test_write_report_table_and_figures(tmp_path):
    db = _populate(tmp_path)
    out = tmp_path / "report"
    path = write_report(db, out, sweep="lr", baseline="matrix_lr=0.02")
    text = path.read_text()
    for png in ("loss_curves.png", "metrics_vs_arm.png", "paired_deltas.png", "quant_delta.png", "bytes.png"):
        assert (out / png).stat().st_size > 5000 and f"]({png})" in text
    table = [line for line in text.split("## Speed")[0].splitlines() if line.startswith("| matrix_lr=")]
    assert len(table) == 3 and "(baseline)" in table[0]
    # lr 0.03 is better than 0.02 by 40*(0.01)^2 = 0.004 nats: significant, but under the 0.005 margin
    cells = [c.strip() for c in table[1].split("|")]
    assert cells[-2] == "no" and cells[-6].startswith("-0.00")
    assert "sliding_loss" in text  # the judged stage is the latest one every run has
    per_metric = text.split("## Per metric")[1].split("## Figures")[0]
    rows = [line for line in per_metric.splitlines() if line.startswith("| matrix_lr=")]
    assert len(rows) == 3 + 2 and rows[0].count(" ± ") == 4  # 3 bpb metrics + quant_delta; 2 Δ rows
    assert "(Welch p=" in rows[3] and "; paired p=" in rows[3]  # the seeds 1, 2, 3 of every arm pair up
    assert "Validation" not in text  # the fake records say nothing of their val tokens
    with pytest.raises(UserError):
        write_report(db, out, baseline="nope")


def test_report_states_the_validation_subset_and_old_databases_gain_columns(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)  # a database from before the val_tokens columns
    con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, sweep TEXT, run_dir TEXT, status TEXT)")
    con.close()
    for s in (1, 2):
        d = write_fake_run(tmp_path / "runs", f"sub_s{s}", {}, s)
        record = json.loads((d / "record.json").read_text())
        record["eval"] = {"val_tokens": 250_000, "val_split_tokens": 3_230_325, "val_subset": True}
        (d / "record.json").write_text(json.dumps(record))
        ingest_record(db, d)
    assert [r["val_tokens"] for r in query_runs(db)] == [250_000, 250_000]
    text = write_report(db, tmp_path / "rep").read_text()
    assert "first 250,000 of the 3,230,325 validation tokens" in text


def test_report_single_run(tmp_path):
    d = write_fake_run(tmp_path, "demo_s1", {}, 1)
    path = report_single_run(d, tmp_path / "rep")
    text = path.read_text()
    assert "| sliding |" in text and "fits the 16,000,000 cap" in text
    assert (tmp_path / "rep" / "loss_curve.png").stat().st_size > 5000


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_experiments_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_results_report_and_dry_run(tmp_path, capsys):
    db = _populate(tmp_path, seeds=(1, 2), lrs=(0.02, 0.04))
    assert _cli(["results", "--db", str(db), "--sweep", "lr", "--csv", str(tmp_path / "a.csv")]) == 0
    shown = capsys.readouterr().out
    assert "lr0.04_s2" in shown and "wrote 4 rows" in shown
    assert _cli(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists()
    capsys.readouterr()
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"recipe": "tiny", "out": str(tmp_path / "o"), "seeds": [1, 2],
                                "grid": {"model.num_layers": [3, 4]}}))
    assert _cli(["sweep", str(spec), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("num_layers=3_s1: ")
    with pytest.raises(UserError):
        _cli(["results", "--db", str(tmp_path / "none.sqlite")])
