"""Compiling the evaluation before its passes (pgolf.eval.warmup, eval.precompile): the plan names the bulk
signatures the passes run, the passes then compile nothing that the warm-up compiled (also for a copy of the
model with other weights), their scores are unchanged, and a warm signature is compiled where a cold one of
the same count would not be."""

import dataclasses
from collections import Counter

import pytest
import torch
from test_eval import VOCAB, toy_lut, toy_tokens, ttt_cfg

import pgolf.eval.scoring as scoring
from pgolf.eval.bpb import evaluate_plain
from pgolf.eval.scoring import WARM_SIGNATURES, signatures_to_compile
from pgolf.eval.sliding import evaluate_sliding, sliding_windows
from pgolf.eval.ttt import evaluate_ttt, ttt_step_nll_sum, ttt_step_shape_counts
from pgolf.eval.warmup import eval_compile_plan, warm_eval_compiles

SEQ_LEN = 32
N_TOKENS = 193  # 192 targets: 6 whole plain windows; sliding s8: the first window, then 20 of 32 keeping 8


def tiny_gpt(seed: int):
    from pgolf.model.gpt import GPT
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny().model
    cfg.vocab_size, cfg.num_layers, cfg.bigram_buckets, cfg.xsa_last_n, cfg.ve_last_n = VOCAB, 3, 32, 1, 1
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # the zero-initialised projections too, so that every part of the model matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model


def eval_cfg(scope: str):
    return ttt_cfg(compile_scope=scope, precompile=True)


def run_passes(model, cfg, scorer: str) -> dict:
    lut, tokens = toy_lut(), toy_tokens(N_TOKENS)
    return {
        "plain": evaluate_plain(model, tokens, lut, SEQ_LEN, cfg.batch_seqs, scorer=scorer,
                                compile_scope=cfg.compile_scope),
        "sliding": evaluate_sliding(model, tokens, lut, SEQ_LEN, cfg.sliding_stride, cfg.batch_seqs, scorer=scorer,
                                    compile_scope=cfg.compile_scope),
        "ttt": evaluate_ttt(model, tokens, lut, cfg, SEQ_LEN, scorer=scorer),
    }


def test_the_plan_is_the_bulk_signatures_of_the_passes():
    cfg = ttt_cfg()
    plan = eval_compile_plan(cfg, SEQ_LEN)
    assert plan["scoring"] == [(SEQ_LEN, cfg.sliding_stride), (SEQ_LEN, SEQ_LEN)]
    assert plan["ttt_step"] == sorted(ttt_step_shape_counts(cfg, SEQ_LEN, 5, 0, 1))
    # every window of the stream but the first batch's keeps `stride`: the plan's bulk signature
    batches = scoring.plan_window_batches(sliding_windows(N_TOKENS, SEQ_LEN, cfg.sliding_stride), 0,
                                          cfg.batch_seqs, cfg.sliding_stride)
    assert {(b.length, b.keep) for b in batches} == set(plan["scoring"])
    # no sliding, no TTT: only the plain windows; a stride of seq_len is plain windows too
    assert eval_compile_plan(dataclasses.replace(cfg, sliding_stride=0, ttt=False), SEQ_LEN) == \
        {"scoring": [(SEQ_LEN, SEQ_LEN)], "ttt_step": []}
    assert eval_compile_plan(dataclasses.replace(cfg, sliding_stride=SEQ_LEN), SEQ_LEN)["scoring"] == \
        [(SEQ_LEN, SEQ_LEN)]
    # the record's settings: sliding s64 and TTT over chunks of 32,768 = 15 sequences of 2,048 a step
    record = dataclasses.replace(cfg, batch_seqs=32, sliding_stride=64, ttt_chunk_tokens=32_768, ttt_batch_seqs=32)
    assert eval_compile_plan(record, 2048) == {"scoring": [(2048, 64), (2048, 2048)], "ttt_step": [(15, 2048)]}
    assert eval_compile_plan(record, 2048, rank=1, world_size=8)["ttt_step"] == [(2, 2048)]


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_passes_after_the_warm_up_compile_nothing_new_and_score_the_same(compiled_graphs, scope):
    cfg = eval_cfg(scope)
    warm = warm_eval_compiles(tiny_gpt(0), cfg, SEQ_LEN, VOCAB, scorer="compiled")
    assert warm["scoring"] == eval_compile_plan(cfg, SEQ_LEN)["scoring"] and warm["ttt_step"]
    compiled_in_warm_up = dict(compiled_graphs)
    assert compiled_in_warm_up.get("ttt_step_nll_sum" if scope == "model" else "call_block")
    other = tiny_gpt(1)  # the same structure, other weights: the warm-up's graphs must serve it
    eager = run_passes(other, cfg, "eager")
    fast = run_passes(other, cfg, "compiled")
    assert dict(compiled_graphs) == compiled_in_warm_up
    for name in fast:
        assert fast[name]["val_bpb"] == pytest.approx(eager[name]["val_bpb"], rel=1e-5), name
        assert fast[name]["tokens"] == eager[name]["tokens"] == N_TOKENS - 1


def test_the_warm_up_reads_no_file_and_leaves_the_model_as_it_was(compiled_graphs):
    from pgolf.data.shards import FILE_AUDIT

    model = tiny_gpt(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opened = list(FILE_AUDIT.opened())
    warm_eval_compiles(model, eval_cfg("blocks"), SEQ_LEN, VOCAB, scorer="compiled")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert FILE_AUDIT.opened() == opened


def test_nothing_is_compiled_where_the_scorer_does_not_compile(compiled_graphs):
    cfg = eval_cfg("model")
    assert warm_eval_compiles(tiny_gpt(0), cfg, SEQ_LEN, VOCAB)["seconds"] == 0.0  # "auto" on a CPU
    assert warm_eval_compiles(tiny_gpt(0), cfg, SEQ_LEN, VOCAB, scorer="eager")["scoring"] == []
    assert not compiled_graphs


def test_a_warm_signature_is_compiled_below_the_count_that_repays_a_cold_compile():
    counts = Counter({"bulk": 2000, "rare": 3, "warm": 3})
    assert signatures_to_compile(ttt_step_nll_sum, "model", counts, 1024) == {"bulk"}
    WARM_SIGNATURES.add((ttt_step_nll_sum, "model", "warm"))
    assert signatures_to_compile(ttt_step_nll_sum, "model", counts, 1024) == {"bulk", "warm"}
    assert signatures_to_compile(ttt_step_nll_sum, "blocks", counts, 1024) == {"bulk"}  # another scope
    assert signatures_to_compile(ttt_step_nll_sum, "model", counts, None) == set()  # a scorer that never compiles



def test_a_run_config_compiles_before_its_passes_only_with_eval_precompile(compiled_graphs, monkeypatch):
    from pgolf.eval import warmup
    from pgolf.eval.warmup import warm_configured_eval
    from pgolf.recipes import recipe_tiny

    monkeypatch.setattr(warmup, "compile_min_count", lambda scorer, device, auto_min: 1)  # as "auto" on CUDA
    cfg = recipe_tiny()
    cfg.model = tiny_gpt(0).cfg
    cfg.train.seq_len, cfg.eval.batch_seqs, cfg.eval.sliding_stride, cfg.eval.ttt_chunk_tokens = SEQ_LEN, 4, 8, 64
    cfg.eval.precompile = False
    assert warm_configured_eval(tiny_gpt(0), cfg)["seconds"] == 0.0 and not compiled_graphs
    cfg.eval.precompile = True
    warm = warm_configured_eval(tiny_gpt(0), cfg)
    assert warm["scoring"] == [(SEQ_LEN, 8), (SEQ_LEN, SEQ_LEN)] and warm["ttt_step"] == [(1, SEQ_LEN)]
    assert compiled_graphs
    plain_only = warm_configured_eval(tiny_gpt(0), cfg, final_eval=False)
    assert plain_only["scoring"] == [(SEQ_LEN, SEQ_LEN)] and plain_only["ttt_step"] == []
