"""The evaluation warm-up of a frontier-style run (eval.precompile, document-isolated scoring, compile scope
"model", depth recurrence, EMA) compiles the graphs its finish runs: after it, the pre-quant plain pass on the
averaged training model and the round-trip pass on its dequantized copy compile nothing new.

On one H100 the warm-up compiled the loop-less model of the reset trainer while the timed loop ends with the
loops on (model.recur_start_frac): Dynamo's guard on recurrence_active failed and the pre-quant pass paid a
cold compile of ~49 s inside its timed phase, then the round trip reused that graph."""

import copy

import pytest
import torch
from test_frontier_recipe import SHRINK

import pgolf.eval.scoring as scoring
import pgolf.eval.warmup as warmup
from pgolf.config import apply_overrides
from pgolf.data.bytes import ByteLUT, ByteSidecar
from pgolf.data.loader import TRAIN_BOS_ID
from pgolf.dist import DistEnv
from pgolf.recipes import get_recipe
from pgolf.train import loop
from pgolf.train.averaging import build_averagers, swap_in_averaged
from pgolf.train.clock import PhaseTimer
from pgolf.train.finish import evaluate_prequant

VOCAB = 512
SEQ_LEN = 128  # SHRINK's train.seq_len
# 9 whole windows (batches of 4, 4 and a padded 1) and a tail window of 60 targets
N_TOKENS = 9 * SEQ_LEN + 61


def frontier_cfg():
    """The frontier recipe at CPU size (test_frontier_recipe's SHRINK), with its evaluation warm-up on."""
    cfg = apply_overrides(get_recipe("frontier"), SHRINK + [f"model.vocab_size={VOCAB}", "eval.precompile=true"])
    assert cfg.eval.doc_isolated and cfg.eval.compile_scope == "model" and cfg.model.recur_loops > 0
    assert cfg.train.ema_decay > 0
    return cfg


def caseops_like_val_data() -> dict:
    """A stream of documents opening at BOS, with a byte sidecar (CaseOps val data), as finish's val cache."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, VOCAB, (N_TOKENS,), generator=gen)
    tokens[torch.rand(N_TOKENS, generator=gen) < 1 / 40] = TRAIN_BOS_ID
    tokens[0] = TRAIN_BOS_ID
    token_bytes = torch.randint(1, 6, (N_TOKENS,), generator=gen, dtype=torch.int32)
    token_bytes[tokens == TRAIN_BOS_ID] = 0
    boundary = torch.zeros(VOCAB, dtype=torch.bool)
    boundary[TRAIN_BOS_ID] = True
    lut = ByteLUT(torch.randint(1, 5, (VOCAB,), generator=gen).to(torch.int16), torch.rand(VOCAB, generator=gen) < 0.5,
                  boundary)
    return {"tokens": tokens, "lut": ByteSidecar(token_bytes, lut), "split_tokens": N_TOKENS}


def train_like_the_timed_loop(model, cfg) -> str:
    """What the timed loop leaves the finish: other weights, the loops on past recur_start_frac, the EMA
    swapped in, then the training-only kernels off (finish_trained_run)."""
    ema, swa = build_averagers(model, cfg.train)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    ema.update(model)
    model.set_recurrence(True)
    averaged = swap_in_averaged(model, ema, swa)
    loop.set_training_kernels(model, cfg, False)
    return averaged


@pytest.mark.slow
def test_the_finish_s_plain_passes_compile_nothing_after_the_eval_warm_up(compiled_graphs, monkeypatch):
    def compile_min_count(scorer, device, auto_min):  # "auto" compiles as on CUDA: warm signatures only here
        return {"compiled": 1, "auto": 10**9}.get(scorer)

    for module in (scoring, warmup):
        monkeypatch.setattr(module, "compile_min_count", compile_min_count)
    cfg, denv = frontier_cfg(), DistEnv()
    torch.manual_seed(0)
    model = loop.build_model(cfg, torch.device("cpu"))
    warm = loop.precompile_evaluation(model, cfg, False, denv, PhaseTimer())
    assert warm["scoring"] == [(SEQ_LEN, SEQ_LEN)] and not model.recurrence_active  # the trainer's state is back
    in_warm_up = dict(compiled_graphs)
    assert in_warm_up.get("full_tail_nll")  # DocIsolated has no head split: the model contract's forward
    assert train_like_the_timed_loop(model, cfg) == "ema"
    cache = caseops_like_val_data()
    prequant = evaluate_prequant(model, cfg, None, None, denv, cache)
    assert dict(compiled_graphs) == in_warm_up, "the pre-quant pass compiled"
    dequantized = copy.deepcopy(model)  # quantize_and_roundtrip: a copy holding the round-tripped weights
    with torch.no_grad():
        for p in dequantized.parameters():
            p.copy_(p.half().float())
    roundtrip = evaluate_prequant(dequantized, cfg, None, None, denv, cache)
    assert dict(compiled_graphs) == in_warm_up, "the round-trip pass compiled"
    assert prequant["tokens"] == roundtrip["tokens"] == N_TOKENS - 1
    assert prequant["compile_s"] > 0  # the warm signature ran compiled, not eagerly
