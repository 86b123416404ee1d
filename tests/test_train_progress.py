"""The progress line's speed is each step's own duration, the last step's too (issue 27, item 9: the last line
showed 115,948.6k tok/s at 0.0 ms/step, the gap between two looks at steps that had both already run)."""

import re

import pytest
import torch

from pgolf.train import loop
from pgolf.train.loop import train_run
from pgolf.train.pipeline import IssuedStep, LossReadback
from tests.conftest import TOKENIZER_1024, write_wiki_shards

STEP_S = 0.25


@pytest.mark.shared
def test_every_progress_line_shows_the_step_s_own_time(tmp_path, monkeypatch, capsys):
    """A clock that moves only while a step computes: every step takes STEP_S, so every line says so."""
    from pgolf.recipes import recipe_tiny

    data = write_wiki_shards(tmp_path, 1_500, 40_000)
    now = {"t": 0.0}
    real_step = loop.train_step

    def timed_step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        now["t"] += STEP_S
        return loss

    monkeypatch.setattr(loop, "train_step", timed_step)
    cfg = recipe_tiny()
    cfg.data.path, cfg.data.tokenizer, cfg.out_dir, cfg.name = str(data), str(TOKENIZER_1024), str(tmp_path), "p"
    cfg.model.num_layers, cfg.model.xsa_last_n = 2, 1
    cfg.train.seq_len, cfg.train.batch_tokens, cfg.train.max_steps, cfg.train.log_every = 64, 1024, 5, 1
    cfg.quant.enabled, cfg.eval.sliding_stride, cfg.eval.ttt = False, 0, False
    record = train_run(cfg, clock=lambda: now["t"], final_eval=False)
    lines = re.findall(r"step +(\d+) +loss \S+ +([\d.]+)k tok/s +([\d.]+) ms/step", capsys.readouterr().out)
    assert [int(step) for step, _, _ in lines] == [1, 2, 3, 4, 5]
    for step, tok_s, ms in lines:
        assert float(ms) == 1000 * STEP_S and float(tok_s) == pytest.approx(1.024 / STEP_S, abs=0.05), step
    assert record["train"]["ms_per_step"] == pytest.approx(1000 * STEP_S)


def test_a_step_ends_when_issued_if_the_device_was_done_else_when_waited_for(monkeypatch):
    done = IssuedStep(3, 300, 1.0, LossReadback(torch.tensor(2.0)), issued_s=4.0)
    assert done.end_time(lambda: 9.0, previous_end_s=3.5) == (2.0, 4.0, True)  # CPU: ran while issued
    assert done.end_time(lambda: 9.0, previous_end_s=4.5)[1] == 4.5  # never before the step before it
    running = IssuedStep(4, 400, 1.0, LossReadback(torch.tensor(float("nan"))), issued_s=4.0)
    monkeypatch.setattr(running.loss, "done", lambda: False)  # a device still at work when the host looks
    value, end_s, finite = running.end_time(lambda: 9.0, previous_end_s=4.0)
    assert end_s == 9.0 and not finite
