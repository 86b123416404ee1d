"""Sweep specs, run naming, resumption, and a sweep killed with SIGKILL then restarted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgolf.errors import UserError
from pgolf.experiments.results import query_runs
from pgolf.experiments.sweep import (
    check_run_config,
    expand_sweep,
    load_sweep_spec,
    run_sweep,
    sweep_spec_from_dict,
    train_command,
)

REPO = Path(__file__).resolve().parents[1]
FAKE_TRAIN = Path(__file__).with_name("fake_train.py")


def _spec(tmp_path, **extra):
    raw = {"name": "lr", "recipe": "tiny", "out": str(tmp_path / "runs"), "seeds": [1, 2],
           "set": {"train.max_steps": 50}, "grid": {"optim.matrix_lr": [0.02, 0.04], "model.num_layers": [4, 5]},
           "command": [sys.executable, str(FAKE_TRAIN)]}
    raw.update(extra)
    return raw


def test_expand_grid_names_and_overrides(tmp_path):
    runs = expand_sweep(sweep_spec_from_dict(_spec(tmp_path)))
    assert len(runs) == 2 * 2 * 2
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[0] == "matrix_lr=0.02_num_layers=4_s1"
    assert runs[0].set_args() == ["train.max_steps=50", "optim.matrix_lr=0.02", "model.num_layers=4", "train.seed=1"]
    # stable: expanding again gives the same names in the same order
    assert [r.name for r in expand_sweep(sweep_spec_from_dict(_spec(tmp_path)))] == names


def test_explicit_runs_and_key_collisions(tmp_path):
    raw = _spec(tmp_path, grid=None, runs=[{}, {"model.ve_dim": 32}, {"model.bigram_dim": 32, "model.ve_dim": 8}])
    names = [r.name for r in expand_sweep(sweep_spec_from_dict(raw))]
    assert names[:2] == ["base_s1", "base_s2"]
    assert "ve_dim=32_s1" in names and "bigram_dim=32_ve_dim=8_s2" in names
    raw = _spec(tmp_path, grid={"model.model_dim": [64], "optim.model_dim": [1]})
    with pytest.raises(UserError):  # optim has no model_dim: checked against the config tree
        expand_sweep(sweep_spec_from_dict(raw))


@pytest.mark.parametrize("bad", [{"seeds": []}, {"seeds": [1, 1]}, {"gird": {}}, {"runs": [{"a": 1}]},
                                 {"grid": {"optim.matrix_lr": []}}, {"set": {"train.seed": 3}},
                                 {"grid": {"optim.matrix_lr": ["fast"]}}])
def test_bad_specs_raise_user_error(tmp_path, bad):
    raw = _spec(tmp_path, **bad)
    with pytest.raises(UserError):
        expand_sweep(sweep_spec_from_dict(raw))


def test_toml_spec_and_train_command(tmp_path):
    path = tmp_path / "abl.toml"
    path.write_text('recipe = "tiny"\nout = "x/abl"\nseeds = [7]\nproxy_seconds = 300\n'
                    '[grid]\n"train.ema_decay" = [0.0, 0.997]\n')
    spec = load_sweep_spec(path)
    assert spec.name == "abl" and spec.db == Path("x/abl/results.sqlite")
    runs = expand_sweep(spec)
    argv = train_command(runs[1], spec.out)
    assert argv[1:4] == ["-m", "pgolf", "train"]
    assert argv[argv.index("--proxy") + 1] == "300"
    assert ["--set", "train.ema_decay=0.997", "--set", "train.seed=7"] == argv[-8:-4]
    assert argv[-4:] == ["--name", "ema_decay=0.997_s7", "--out", "x/abl"]


def test_run_sweep_skips_finished_and_restarts_stale(tmp_path):
    spec = sweep_spec_from_dict(_spec(tmp_path, seeds=[1]))
    first = run_sweep(spec, log=lambda *_: None)
    assert first == {"skipped": 0, "ran": 4, "failed": 0}
    rows = query_runs(spec.db, sweep="lr")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["overrides"] in ({"optim.matrix_lr": 0.02, "model.num_layers": 4},
                                    {"model.num_layers": 4, "optim.matrix_lr": 0.02})
    # break one run: torn record -> must be moved aside and run again
    victim = spec.out / "matrix_lr=0.04_num_layers=5_s1"
    (victim / "record.json").write_text('{"status": "o')
    second = run_sweep(spec, log=lambda *_: None)
    assert second == {"skipped": 3, "ran": 1, "failed": 0}
    assert len(list((spec.out / "_stale").iterdir())) == 1
    assert len(query_runs(spec.db)) == 4


def test_run_sweep_parallel_slots_set_cuda_visible_devices(tmp_path):
    script = tmp_path / "envtrain.py"
    script.write_text(
        "import os, sys, subprocess\n"
        "a = sys.argv[1:]; out, name = a[a.index('--out') + 1], a[a.index('--name') + 1]\n"
        f"subprocess.run([sys.executable, {str(FAKE_TRAIN)!r}] + a, check=True)\n"
        "open(os.path.join(out, name, 'gpu.txt'), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', ''))\n")
    spec = sweep_spec_from_dict(_spec(tmp_path, command=[sys.executable, str(script)]))
    counts = run_sweep(spec, gpus=["0", "1"], log=lambda *_: None)
    assert counts["ran"] == 8
    gpus = [(spec.out / r.name / "gpu.txt").read_text() for r in expand_sweep(spec)]
    assert set(gpus) == {"0", "1"}


def test_failed_run_is_reported_not_finished(tmp_path):
    spec = sweep_spec_from_dict(_spec(tmp_path, seeds=[1], grid={"optim.matrix_lr": [0.02]},
                                      command=[sys.executable, "-c", "import sys; sys.exit(3)"]))
    assert run_sweep(spec, log=lambda *_: None) == {"skipped": 0, "ran": 0, "failed": 1}
    assert query_runs(spec.db) == []


def test_sigkill_mid_sweep_then_resume_loses_and_duplicates_nothing(tmp_path):
    spec_path = tmp_path / "kill.json"
    raw = _spec(tmp_path, seeds=[1, 2, 3], grid={"optim.matrix_lr": [0.02, 0.03, 0.04]})
    spec_path.write_text(json.dumps(raw))
    env = dict(os.environ, FAKE_TRAIN_SLEEP="0.15", PYTHONPATH=str(REPO))
    driver = ("import sys; from pgolf.experiments.sweep import load_sweep_spec, run_sweep; "
              "run_sweep(load_sweep_spec(sys.argv[1]))")
    cmd = [sys.executable, "-c", driver, str(spec_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(raw["out"])
    deadline = time.time() + 30
    while time.time() < deadline:  # kill once a few runs are done, the sweep mid-way
        done = [d for d in out.glob("*_s*") if (d / "record.json").exists()]
        if len(done) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {d.name: (d / "record.json").stat().st_mtime_ns
                       for d in out.glob("*_s*") if (d / "record.json").exists()}
    assert 3 <= len(finished_before) < 9, "the sweep should have been killed mid-way"
    time.sleep(0.3)  # an orphaned child would write its record by now
    result = subprocess.run(cmd, env=dict(env, FAKE_TRAIN_SLEEP="0"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = [r.name for r in expand_sweep(sweep_spec_from_dict(raw))]
    rows = query_runs(out / "results.sqlite")
    assert sorted(r["run_id"] for r in rows) == sorted(names)  # each run exactly once in the DB
    on_disk = sorted(d.name for d in out.glob("*_s*") if not d.name.startswith("_"))
    assert on_disk == sorted(names)  # and exactly once on disk
    assert all(r["status"] == "ok" and r["sweep"] == "lr" for r in rows)
    for name, mtime in finished_before.items():  # runs that had finished were kept, not rerun
        assert (out / name / "record.json").stat().st_mtime_ns == mtime


def test_the_repository_sweep_specs_expand():
    specs = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.toml"))
    assert specs, "the repository ships sweep specs"
    for path in specs:
        runs = expand_sweep(load_sweep_spec(path))
        assert len({r.name for r in runs}) == len(runs) > 0


@pytest.mark.parametrize("spec_path", sorted((Path(__file__).parent.parent / "sweeps").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_sweep_specs_expand_into_valid_run_configs(spec_path):
    runs = expand_sweep(load_sweep_spec(spec_path))
    assert runs and len({r.name for r in runs}) == len(runs)
    for run in runs:
        check_run_config(run)
