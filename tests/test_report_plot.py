"""The single-run figure (pgolf demo's report) plots the per-batch train loss, its running mean, the validation
losses and the record's scored stages, each labelled (issue 27, item 11)."""

import json

from pgolf.experiments import report
from pgolf.experiments.plots import running_mean
from pgolf.experiments.report import report_single_run
from tests.fake_train import write_fake_run


def test_running_mean_is_the_mean_of_the_last_window_values():
    assert running_mean([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert running_mean([1.0, 2.0], 5) == [1.0, 1.5]


def test_the_run_figure_gets_train_validation_and_scored_stages_from_the_records(tmp_path, monkeypatch):
    run = write_fake_run(tmp_path, "demo_s1", {}, 1)
    with open(run / "metrics.jsonl", "a") as f:  # a validation during training (train.val_every)
        f.write(json.dumps({"kind": "val", "step": 100, "time_s": 10.0, "val_loss": 4.5, "val_bpb": 2.5}) + "\n")
    record = json.loads((run / "record.json").read_text())
    seen = {}
    real = report.plot_run_curves

    def spy(train, val, finals, path, title):
        seen.update(train=train, val=val, finals=finals)
        return real(train, val, finals, path, title)

    monkeypatch.setattr(report, "plot_run_curves", spy)
    text = report_single_run(run, tmp_path / "rep").read_text()
    assert "![loss curve](loss_curve.png)" in text
    assert seen["train"]["steps"] == list(range(0, 201, 10)) and len(seen["train"]["loss"]) == 21
    m = record["metrics"]
    assert seen["val"] == {"steps": [100, 200], "loss": [4.5, m["prequant_loss"]]}
    expected = {"quantized": (200, m["roundtrip_loss"]), "quantized, sliding window": (200, m["sliding_loss"])}
    if m.get("ttt_loss") is not None:
        expected["quantized, TTT"] = (200, m["ttt_loss"])
    assert seen["finals"] == expected  # the record's numbers, unchanged
    assert (tmp_path / "rep" / "loss_curve.png").stat().st_size > 5000


def test_the_demo_validates_during_training():
    from pgolf.demo import demo_config

    cfg = demo_config("data", "out", 300, [])
    assert cfg.train.val_every == 50
