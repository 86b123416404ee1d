"""Units of the training concern: clock, averaging, QAT switch, checkpoint files, run log, dist env."""

import json

import pytest
import torch
from torch import nn

from pgolf.dist import all_reduce_max, dist_env_from_environ
from pgolf.errors import UserError
from pgolf.model.layers import CastedLinear
from pgolf.quant.formats import dequantize_rows, quantize_rows, row_clip_sdclip, row_scales
from pgolf.runlog import RUNLOG_HASH_CACHE, MetricsWriter, file_sha256, read_metrics, write_record
from pgolf.runrecord import RECORD_SCHEMA, RunRecord
from pgolf.tensorfile import read_tensors, write_tensors
from pgolf.train.averaging import EMAWeights, SWAWeights, swap_in_averaged
from pgolf.train.checkpoint import (
    find_latest_checkpoint,
    flatten_state,
    load_checkpoint,
    mark_checkpoint_complete,
    save_checkpoint,
    unflatten_state,
)
from pgolf.train.clock import PhaseTimer
from pgolf.train.pipeline import IssuedStep, LossReadback
from pgolf.train.qat import qat_due, set_qat


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_phase_timer_accumulates_and_pauses():
    clock = FakeClock()
    syncs = []
    timer = PhaseTimer(clock=clock, sync=lambda: syncs.append(1))
    with timer.phase("train_loop"):
        clock.t += 2.0
        with timer.paused("train_loop"):
            clock.t += 100.0  # validation: not counted
        clock.t += 3.0
        assert timer.elapsed("train_loop") == pytest.approx(5.0)
    with timer.phase("train_loop"):
        clock.t += 1.5
    with timer.phase("calibration"):
        clock.t += 0.25
    assert timer.receipt() == {"calibration": 0.25, "train_loop": 6.5}
    assert len(syncs) >= 8  # a sync at every boundary
    with pytest.raises(RuntimeError):
        with timer.phase("x"):
            timer.start("x")


def tiny_module(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def test_ema_matches_formula_and_swap_in_exports_the_shadow(tmp_path):
    model = tiny_module()
    ema = EMAWeights(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1 + i)
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n, s in ema.averaged().items():
        torch.testing.assert_close(s, expected[n])
    assert swap_in_averaged(model, ema, None) == "ema"
    write_tensors(tmp_path / "model.pgw", dict(model.state_dict()), {})
    exported, _ = read_tensors(tmp_path / "model.pgw")
    for n, s in ema.averaged().items():
        assert torch.equal(exported[n], s)


def test_swa_running_mean_only_below_start_scale():
    model = tiny_module()
    swa = SWAWeights(model, every=2, start_scale=0.5)
    taken = []
    for step, scale in [(2, 0.9), (3, 0.4), (4, 0.4), (6, 0.3), (8, 0.1)]:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        if swa.maybe_update(model, step, scale):
            taken.append(step)
    assert taken == [4, 6, 8]
    for m in swa.mean:
        torch.testing.assert_close(m, torch.full_like(m, 6.0))
    assert swap_in_averaged(model, None, swa) == "swa"
    assert all(torch.equal(p, torch.full_like(p, 6.0)) for p in model.parameters())


def test_qat_toggle_changes_compiled_output_and_equals_quant_roundtrip():
    torch.manual_seed(0)
    lin = CastedLinear(16, 8, bias=False)
    x = torch.randn(5, 16)
    compiled = torch.compile(lin, backend="inductor")
    set_qat(lin, False, bits=5, clip_k=3.0)
    off = compiled(x)
    torch.testing.assert_close(off, x @ lin.weight.T)
    assert set_qat(lin, True, bits=5, clip_k=3.0) == 1
    on = compiled(x)
    w = lin.weight.detach()
    scale = row_scales(row_clip_sdclip(w, 3.0), 5)
    w_q = dequantize_rows(quantize_rows(w, scale, 5), scale)
    assert (on - off).abs().max() > 1e-2  # the compiled graph really switched to the fake-quantized weight
    torch.testing.assert_close(on, x @ w_q.T, atol=1e-3, rtol=0)  # inductor reorders the matmul a little
    torch.testing.assert_close(lin(x), x @ w_q.T, atol=0, rtol=0)  # eager: exactly quantize -> dequantize
    set_qat(lin, False)
    torch.testing.assert_close(compiled(x), off)


def test_qat_due_threshold(tiny_cfg):
    t = tiny_cfg.train
    t.qat_start_scale = 0.15
    assert qat_due(0.1, t) and not qat_due(0.2, t)
    t.qat_start_scale = 0.0
    assert not qat_due(0.0, t)


def test_flatten_state_round_trip():
    state = {"a": torch.arange(3), 4: {"b": [1.5, torch.ones(2, 2)], "c": (None, "x")}, "flag": True}
    tensors = {}
    skel = flatten_state(state, "s", tensors)
    json.dumps(skel)
    back = unflatten_state(json.loads(json.dumps(skel)), tensors)
    assert back["flag"] is True and back[4]["c"] == (None, "x") and back[4]["b"][0] == 1.5
    assert torch.equal(back[4]["b"][1], torch.ones(2, 2))
    assert torch.equal(back["a"], torch.arange(3))


def test_checkpoint_save_load_and_latest(tmp_path):
    model = tiny_module()
    assert find_latest_checkpoint(tmp_path) is None
    opt_state = {"lr_scale": 0.5, "adamw/exp_avg/0.weight": torch.randn(3, 4)}
    for step in (3, 7):
        folder = save_checkpoint(tmp_path, step, 0, model, opt_state, {"file_idx": 0, "pos": step},
                                 {"ema.x": torch.ones(2)}, {"step": step, "elapsed_s": 1.25})
        mark_checkpoint_complete(folder, world_size=1)
    save_checkpoint(tmp_path, 9, 0, model, opt_state, {}, {}, {"step": 9})  # never marked complete
    latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "step_0000007"
    tensors, meta = load_checkpoint(latest, rank=0, world_size=1)
    assert meta["scalars"] == {"step": 7, "elapsed_s": 1.25} and meta["loader"]["pos"] == 7
    assert torch.equal(meta["optimizer"]["adamw/exp_avg/0.weight"], opt_state["adamw/exp_avg/0.weight"])
    assert torch.equal(tensors["model.0.weight"], model[0].weight.detach())
    with pytest.raises(UserError, match="ranks"):
        load_checkpoint(latest, rank=0, world_size=2)


def test_metrics_writer_record_and_hash_cache(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w.write("train", step=1, loss=2.5)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"kind": "train", "step": 1, "loss": 2.5}]
    w.write("val", step=2, val_bpb=1.25)
    w.close()
    assert [m["kind"] for m in read_metrics(tmp_path / "metrics.jsonl")] == ["train", "val"]
    off = MetricsWriter(tmp_path / "other.jsonl", enabled=False)
    off.write("train", step=1)
    assert not (tmp_path / "other.jsonl").exists()
    write_record(tmp_path, {"status": "ok"})  # a dict goes through the schema: every field, in order
    written = json.loads((tmp_path / "record.json").read_text())
    assert written["status"] == "ok" and written["schema"] == RECORD_SCHEMA and list(written) == RunRecord().keys()
    f = tmp_path / "blob.bin"
    f.write_bytes(b"abc")
    h = file_sha256(f)
    assert h == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert any(k[0] == str(f.resolve()) for k in RUNLOG_HASH_CACHE)


def test_dist_env_from_environ():
    assert dist_env_from_environ({}) == (0, 0, 1)
    assert dist_env_from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == (3, 1, 4)
    with pytest.raises(UserError):
        dist_env_from_environ({"RANK": "4", "WORLD_SIZE": "4"})
    assert all_reduce_max(2.5) == 2.5


@pytest.mark.parametrize("mode, mix, kwargs", [
    ("default", True, {}),
    ("default", False, {"options": {"triton.mix_order_reduction": False}}),
    ("max-autotune-no-cudagraphs", True, {"options": {"max_autotune": True, "coordinate_descent_tuning": True}}),
    ("reduce-overhead", False, {"options": {"triton.cudagraphs": True, "triton.mix_order_reduction": False}}),
])
def test_compile_mode_and_inductor_options_reach_torch_compile(monkeypatch, mode, mix, kwargs):
    from pgolf.config import apply_overrides
    from pgolf.recipes import get_recipe
    from pgolf.train.loop import compile_for_training

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or ("compiled", model))
    model = nn.Linear(2, 2)
    cfg = apply_overrides(get_recipe("tiny"), ["train.compile=true", f"train.compile_mode={mode}",
                                               f"train.mix_order_reduction={str(mix).lower()}"])
    assert compile_for_training(model, cfg) == ("compiled", model) and calls == [kwargs]
    cfg.train.compile = False
    assert compile_for_training(model, cfg) is model and len(calls) == 1


def test_unknown_compile_mode_is_one_line_naming_it():
    from pgolf.config import ConfigError, apply_overrides
    from pgolf.recipes import get_recipe

    with pytest.raises(ConfigError, match=r"^train.compile_mode='fast' is not one of default\|max-autotune") as e:
        apply_overrides(get_recipe("tiny"), ["train.compile_mode=fast"])
    assert "\n" not in str(e.value)


# ---- reading a step's loss while the next one runs

def test_loss_readback_on_cpu_reads_the_value_and_flags_non_finite():
    issued = IssuedStep(step=3, train_tokens=300, lr_scale=0.5, loss=LossReadback(torch.tensor(2.5)))
    assert issued.finite_loss() == (2.5, True)
    assert IssuedStep(4, 400, 0.5, LossReadback(torch.tensor(float("nan")))).finite_loss()[1] is False


@pytest.mark.gpu
def test_loss_readback_waits_for_its_step_only():
    loss = torch.full((), 1.25, device="cuda") * 2
    readback = LossReadback(loss)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued behind the loss
    assert readback.value() == 2.5
    assert not torch.cuda.current_stream().query()  # the later work is still running
    torch.cuda.synchronize()
