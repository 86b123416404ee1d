"""train_run end to end on real text (wiki docs, the 1024 tokenizer): learning, wallclock stop, warm-up reset,
NaN stop, kill + resume, and 2 gloo processes against 1."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pgolf.model.gpt import GPT
from pgolf.runlog import read_metrics
from pgolf.train import loop
from pgolf.train.loop import train_run
from tests.conftest import TOKENIZER_1024, write_wiki_shards

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def wiki_data(tmp_path_factory):
    """A small train shard and val shard of real Wikipedia text, built here (nothing copied into the repo)."""
    return write_wiki_shards(tmp_path_factory.mktemp("wiki"), 1_500, 140_000)


def small_cfg(data, out, name, **train):
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny()
    cfg.data.path, cfg.data.tokenizer = str(data), str(TOKENIZER_1024)
    cfg.out_dir, cfg.name = str(out), name
    cfg.model.num_layers, cfg.model.xsa_last_n = 2, 1
    cfg.train.seq_len, cfg.train.batch_tokens = 64, 1024
    cfg.train.max_steps, cfg.train.warmdown_iters, cfg.train.log_every = 12, 4, 1
    cfg.train.ema_decay = 0.0
    cfg.train.qat_start_scale = 0.0
    cfg.quant.enabled = False
    cfg.eval.sliding_stride, cfg.eval.ttt, cfg.eval.batch_seqs = 0, False, 16
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def train_losses(run_dir) -> dict[int, float]:
    """step -> loss of the metrics file (a resumed step overwrites the earlier line)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"}


def test_tiny_learns_on_real_text_and_writes_the_run_dir(wiki_data, tmp_path):
    cfg = small_cfg(wiki_data, tmp_path, "learn", max_steps=60, batch_tokens=1024, warmdown_iters=15,
                    ema_decay=0.9, qat_start_scale=0.15)
    cfg.quant.enabled, cfg.quant.calib_batches = True, 2
    record = train_run(cfg, final_eval=False)
    run = tmp_path / "learn"
    losses = train_losses(run)
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(56, 61)])
    assert last < first - 1.0, (first, last)
    assert record["status"] == "ok" and record["train"]["steps"] == 60
    assert record["train"]["stop_reason"] == "max_steps" and record["train"]["averaged"] == "ema"
    for name in ("config.json", "env.json", "metrics.jsonl", "record.json", "model.pgw", "hessians.pgw"):
        assert (run / name).is_file(), name
    assert record["metrics"]["prequant_bpb"] is not None and record["metrics"]["prequant_bpb"] < 4.0
    assert record["env"]["train_shards"][0]["tokens"] > 100_000
    events = [m["what"] for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "event"]
    assert "qat_on" in events
    assert record["compliance"]["train_plus_calibration_s"] >= record["timings"]["train_loop_s"]


def test_wallclock_stop_with_fake_clock(wiki_data, tmp_path):
    state = {"t": 0.0}

    def clock():
        state["t"] += 0.5
        return state["t"]

    cfg = small_cfg(wiki_data, tmp_path, "clock", max_steps=1000, wallclock_s=12.0, calib_reserve_s=2.0)
    record = train_run(cfg, clock=clock, final_eval=False)
    assert record["train"]["stop_reason"] == "wallclock"
    assert 2 <= record["train"]["steps"] < 1000
    trained_s = record["train"]["ms_per_step"] * record["train"]["steps"] / 1000.0  # the clock at the stop
    assert 10.0 - 3.0 < trained_s <= 10.0  # stops before the step that would end past wallclock - reserve
    assert record["timings"]["train_loop_s"] >= trained_s


def test_warmup_does_not_leak_into_the_run(wiki_data, tmp_path):
    plain = train_run(small_cfg(wiki_data, tmp_path, "nowarm", max_steps=3), final_eval=False)
    warm = train_run(small_cfg(wiki_data, tmp_path, "warm", max_steps=3, compile_warmup_steps=3), final_eval=False)
    a, b = train_losses(tmp_path / "nowarm"), train_losses(tmp_path / "warm")
    assert a[1] == pytest.approx(b[1], abs=1e-6) and a[3] == pytest.approx(b[3], abs=1e-5)
    assert warm["timings"]["compile_warmup_s"] > 0 and plain["timings"]["compile_warmup_s"] is None


@pytest.mark.parametrize("final_eval,scope", [(True, "model"), (True, "blocks"), (False, "model")])
def test_eval_precompile_in_the_warm_up_leaves_the_run_s_evaluations_nothing_to_compile(wiki_data, tmp_path,
                                                                                         monkeypatch, final_eval,
                                                                                         scope, compiled_graphs):
    """The GPU path simulated on the CPU: the "auto" scorer compiles here as on CUDA (a signature from 10**9
    calls, or once warm), through a backend that counts graphs. The warm-up runs before any file is opened;
    afterwards the pre-quant, round-trip, sliding and TTT passes (on other model objects) compile nothing."""
    import pgolf.eval.scoring as scoring
    import pgolf.eval.ttt as ttt
    import pgolf.eval.warmup as warmup
    from pgolf.data.shards import FILE_AUDIT

    def compile_min_count(scorer, device, auto_min):
        return {"compiled": 1, "auto": 10**9}.get(scorer)

    for module in (scoring, ttt, warmup):
        monkeypatch.setattr(module, "compile_min_count", compile_min_count)
    graphs = compiled_graphs
    calls, real_warm_up = [], warmup.warm_eval_compiles

    def recording_warm_up(*args, **kwargs):
        out = real_warm_up(*args, **kwargs)
        calls.append({"opened": list(FILE_AUDIT.opened()), "plan": out, "graphs": dict(graphs)})
        return out

    monkeypatch.setattr(warmup, "warm_eval_compiles", recording_warm_up)
    FILE_AUDIT.clear()
    cfg = small_cfg(wiki_data, tmp_path, "precompile", max_steps=3)
    cfg.train.compile = False  # the training step eager: every graph counted is the evaluation's
    cfg.quant.enabled, cfg.quant.calib_batches = True, 2
    cfg.eval.precompile, cfg.eval.sliding_stride, cfg.eval.ttt = True, 16, True
    cfg.eval.ttt_chunk_tokens, cfg.eval.ttt_epochs, cfg.eval.compile_scope = 256, 1, scope
    record = train_run(cfg, final_eval=final_eval)
    assert len(calls) == 1 and calls[0]["opened"] == []
    plan = calls[0]["plan"]
    if final_eval:  # whole and sliding windows; TTT's chunks of 256 targets: 3 sequences of 64 a step
        assert plan["scoring"] == [(64, 16), (64, 64)] and plan["ttt_step"] == [(3, 64)]
        assert record["metrics"]["sliding_bpb"] and record["metrics"]["ttt_bpb"]
    else:  # without the final evaluation only the plain pass's graphs
        assert plan["scoring"] == [(64, 64)] and plan["ttt_step"] == []
    assert calls[0]["graphs"] and dict(graphs) == calls[0]["graphs"]
    assert record["timings"]["compile_warmup_eval_s"] > 0 and record["metrics"]["roundtrip_bpb"]


def test_nan_loss_stops_with_status_nan(wiki_data, tmp_path, monkeypatch):
    build = loop.build_model

    class NanAfter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x, y=None, reduction="mean"):
            self.calls += 1
            out = self.inner(x, y, reduction)
            return out * float("nan") if self.calls >= 3 else out

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    monkeypatch.setattr(loop, "build_model", lambda cfg, device: NanAfter(build(cfg, device)))
    record = train_run(small_cfg(wiki_data, tmp_path, "nan", max_steps=10), final_eval=False)
    # step 3 is the first non-finite one; the loop had already issued step 4 when it read step 3's loss
    assert record["status"] == "nan" and record["train"]["steps"] == 4
    nan_events = [m for m in read_metrics(tmp_path / "nan" / "metrics.jsonl") if m.get("what") == "nan"]
    assert [m["step"] for m in nan_events] == [3]
    saved = (tmp_path / "nan" / "record.json").read_text()
    assert '"status": "nan"' in saved
    assert len(train_losses(tmp_path / "nan")) == 2  # the finite steps' metrics are kept


def test_kill_and_resume_continues_the_same_run(wiki_data, tmp_path):
    state = {"t": 0.0}

    def clock():
        state["t"] += 1.0
        return state["t"]

    # constant LR (no warmdown), so a run cut at step 5 is the first half of the 10-step run
    full_cfg = small_cfg(wiki_data, tmp_path, "full", max_steps=10, warmdown_iters=0, ema_decay=0.8)
    full_record = train_run(full_cfg, clock=clock, final_eval=False)
    part_cfg = small_cfg(wiki_data, tmp_path, "part", max_steps=5, warmdown_iters=0, ema_decay=0.8,
                         checkpoint_every_s=1.0)
    train_run(part_cfg, clock=clock, final_eval=False)
    (tmp_path / "part" / "record.json").unlink()
    k = int(sorted((tmp_path / "part" / "checkpoint").glob("step_*"))[-1].name.split("_")[1])
    assert k == 4
    part_cfg.train.max_steps = 10
    record = train_run(part_cfg, resume=str(tmp_path / "part"), clock=clock, final_eval=False)
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert record["train"]["steps"] == 10
    for step in range(k + 1, 11):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-5), step
    # the EMA shadow came back too: the evaluated (averaged) model is the same
    assert record["metrics"]["prequant_bpb"] == pytest.approx(full_record["metrics"]["prequant_bpb"], abs=1e-5)


def test_eval_val_tokens_cuts_every_evaluation(wiki_data, tmp_path):
    from pgolf.data.loader import load_val_tokens
    from pgolf.dist import DistEnv
    from pgolf.eval.bpb import evaluate_plain
    from pgolf.model.gpt import GPT
    from pgolf.train.finish import evaluate_prequant, load_val_data

    cfg = small_cfg(wiki_data, tmp_path, "cut")
    cfg.eval.val_tokens = 700
    val_files = [wiki_data / "fineweb_val_000000.bin"]
    cache: dict = {}
    tokens, lut = load_val_data(cfg, val_files, TOKENIZER_1024, cache)
    full = load_val_tokens(val_files)
    assert tokens.numel() == 700 and cache["split_tokens"] == full.numel() == 1_500
    assert torch.equal(tokens, full[:700])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    res = evaluate_prequant(model, cfg, val_files, TOKENIZER_1024, DistEnv(), cache)
    assert res["tokens"] == 699  # a stream of n tokens has n - 1 targets
    prefix = evaluate_plain(model, full[:700], lut, cfg.train.seq_len, cfg.eval.batch_seqs)
    assert res["val_bpb"] == pytest.approx(prefix["val_bpb"], rel=1e-6)

    # end to end: pre-quant and sliding both score the prefix, and the record says so
    cfg.train.max_steps, cfg.eval.sliding_stride = 3, 32
    cut = train_run(cfg)
    whole_cfg = small_cfg(wiki_data, tmp_path, "whole", max_steps=3)  # the same training, the whole split
    whole_cfg.eval.sliding_stride = 32
    whole = train_run(whole_cfg)
    scope = ("val_tokens", "val_split_tokens", "val_subset")
    assert [cut.eval[k] for k in scope] == [700, 1_500, True] and cut.eval.bytes_source is None
    assert [whole.eval[k] for k in scope] == [1_500, 1_500, False]
    for key in ("prequant_bpb", "sliding_bpb"):
        assert cut["metrics"][key] != pytest.approx(whole["metrics"][key], rel=1e-4), key


def test_training_kernels_run_in_the_steps_and_nowhere_after(wiki_data, tmp_path, monkeypatch):
    """train.fp8 and model.fused_qk: every step's block matrices go through the FP8 matmul and every
    attention asks for the fused q/k kernels; the validation in the loop (no_grad) runs the plain matmuls,
    and the model handed to finish_run (evaluation, export) has both off."""
    import pgolf.model.attention as attention
    import pgolf.model.layers as layers
    from pgolf.model.layers import CastedLinear

    calls, real_fp8 = [], layers.fp8_linear
    monkeypatch.setattr(layers, "fp8_linear", lambda x, w: calls.append(x.shape) or real_fp8(x, w))
    qk_asks, real_qk = [], attention.qk_prep
    monkeypatch.setattr(attention, "qk_prep", lambda *a: qk_asks.append(a[-1]) or real_qk(*a))
    at_finish, real_finish = {}, loop.finish_run

    def finish_spy(cfg, model, *args, **kwargs):
        at_finish["calls"], at_finish["qk_asks"] = len(calls), list(qk_asks)
        at_finish["fp8"] = [m.fp8 for m in model.modules() if isinstance(m, CastedLinear)]
        at_finish["fused_qk"] = [block.attn.fused_qk for block in model.blocks]
        return real_finish(cfg, model, *args, **kwargs)

    monkeypatch.setattr(loop, "finish_run", finish_spy)
    cfg = small_cfg(wiki_data, tmp_path, "kernels", max_steps=4, fp8=True, val_every=2)
    assert cfg.model.fused_qk  # the tiny recipe keeps the record's flag (on a CPU the reference path runs)
    record = train_run(cfg)
    blocks = [m for m in GPT(cfg.model).blocks.modules() if isinstance(m, CastedLinear)]
    assert record["train"]["steps"] == 4 and np.isfinite(record["metrics"]["prequant_bpb"])
    assert at_finish["calls"] == 4 * len(blocks) == len(calls)  # the steps' forwards only
    assert at_finish["fp8"] and not any(at_finish["fp8"])
    assert at_finish["fused_qk"] and not any(at_finish["fused_qk"])
    steps_asks = 4 * 2 * cfg.model.num_layers  # q and k of every layer, every step
    assert len(qk_asks) > steps_asks and all(qk_asks[:steps_asks])
    assert not qk_asks[-1] and not any(qk_asks[len(at_finish["qk_asks"]):])  # the evaluations after the loop


def test_eval_precompile_sees_the_evaluation_s_kernels_and_training_gets_its_own_back(monkeypatch):
    """The warm-up compiles the graphs the evaluation will run: with the training-only kernels off."""
    import pgolf.eval.warmup as warmup
    from pgolf.dist import DistEnv
    from pgolf.recipes import recipe_tiny
    from pgolf.train.clock import PhaseTimer

    cfg = recipe_tiny()
    cfg.train.fp8 = True
    model = loop.build_model(cfg, torch.device("cpu"))
    seen = {}

    def spy(model, cfg, rank, world_size, final_eval):
        seen["fused_qk"] = [block.attn.fused_qk for block in model.blocks]
        seen["fp8"] = [block.mlp.fc.fp8 for block in model.blocks]
        return warmup.nothing_compiled()

    monkeypatch.setattr(warmup, "warm_configured_eval", spy)
    loop.precompile_evaluation(model, cfg, True, DistEnv(), PhaseTimer())
    assert seen["fused_qk"] and not any(seen["fused_qk"]) and not any(seen["fp8"])
    assert all(block.attn.fused_qk and block.mlp.fc.fp8 for block in model.blocks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, cfg, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    record = train_run(cfg, final_eval=False)
    if rank == 0:
        out.put(record["train"]["steps"])


def test_two_gloo_processes_match_one(wiki_data, tmp_path):
    cfg1 = small_cfg(wiki_data, tmp_path, "one", max_steps=4)
    train_run(cfg1, final_eval=False)
    cfg2 = small_cfg(wiki_data, tmp_path, "two", max_steps=4)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, cfg2, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert out.get(timeout=5) == 4
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    # same init, same sequences in every step's global batch (pgolf.data.loader): the curves differ only by
    # float reduction order (about 5e-7 here)
    for step in range(1, 5):
        assert two[step] == pytest.approx(one[step], abs=1e-5), (step, one, two)
