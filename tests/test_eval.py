"""Eval: window coverage, plain vs sliding vs brute force, the bpb reduction, rank splits, score-first TTT."""

import math

import pytest
import torch
from torch import nn

from pgolf.config import EvalConfig
from pgolf.data.bytes import ByteLUT
from pgolf.errors import UserError
from pgolf.eval.bpb import BpbAccumulator, evaluate_plain
from pgolf.eval.sliding import evaluate_sliding, sliding_windows
from pgolf.eval.toy import EvalToyModel
from pgolf.eval.ttt import NewtonSchulzStep, evaluate_ttt, prepare_ttt_model, ttt_optimizer, ttt_train_chunk
from pgolf.optim.muon import newton_schulz5

VOCAB = 64


def toy_lut(vocab: int = VOCAB) -> ByteLUT:
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(1, 5, (vocab,), generator=gen).to(torch.int16)
    base[0] = 0  # id 0 plays BOS: a zero-byte boundary
    space = torch.rand(vocab, generator=gen) < 0.5
    space[0] = False
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[0] = True
    return ByteLUT(base, space, boundary)


def toy_tokens(n: int, seed: int = 2) -> torch.Tensor:
    tokens = torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    tokens[0] = 0
    tokens[n // 2] = 0  # a second document starts mid-stream
    return tokens


def hand_bytes(tokens: torch.Tensor, lut: ByteLUT, target: int) -> int:
    y, prev = int(tokens[target]), int(tokens[target - 1])
    return int(lut.base_bytes[y]) + int(bool(lut.has_space[y]) and not bool(lut.is_boundary[prev]))


def ttt_cfg(**kw) -> EvalConfig:
    cfg = EvalConfig(batch_seqs=4, sliding_stride=8, ttt=True, ttt_chunk_tokens=64, ttt_epochs=2, ttt_lr=0.05,
                     ttt_momentum=0.9, ttt_batch_seqs=2, ttt_grad_clip=1.0, ttt_lora_rank=4)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 31, 32, 33, 64, 65, 100, 257])
@pytest.mark.parametrize("seq_len,stride", [(1, 1), (4, 1), (8, 3), (8, 8), (16, 5), (32, 7), (32, 32)])
def test_sliding_windows_score_every_target_once(n, seq_len, stride):
    windows = sliding_windows(n, seq_len, stride)
    hits = torch.zeros(max(n - 1, 0), dtype=torch.int64)
    for i, (start, score_from, end) in enumerate(windows):
        assert 0 <= start <= score_from < end <= n - 1
        assert end - start <= seq_len
        hits[score_from:end] += 1
        if i == 0:
            assert start == score_from == 0  # the first window scores all its tokens
        else:
            assert end - score_from <= stride
            assert score_from - start >= min(seq_len, n - 1) - stride  # context kept
    assert bool((hits == 1).all())  # every target exactly once, tail included
    assert (windows[-1][2] if windows else 0) == max(n - 1, 0)


def test_sliding_windows_reject_bad_stride():
    for stride in (0, 9):
        with pytest.raises(UserError):
            sliding_windows(100, 8, stride)


def test_plain_equals_sliding_when_stride_is_seq_len():
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(203)  # 202 targets: 6 windows + a tail
    plain = evaluate_plain(model, tokens, lut, seq_len=32, batch_seqs=4, return_per_token=True)
    slide = evaluate_sliding(model, tokens, lut, seq_len=32, stride=32, batch_seqs=4, return_per_token=True)
    assert plain["tokens"] == slide["tokens"] == 202
    assert plain["bytes"] == slide["bytes"]
    assert torch.allclose(plain["per_token_nll"][1:], slide["per_token_nll"][1:], atol=1e-6)
    assert plain["val_bpb"] == pytest.approx(slide["val_bpb"], rel=1e-7)


def test_sliding_bpb_matches_brute_force():
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(150)
    seq_len, stride = 32, 8
    res = evaluate_sliding(model, tokens, lut, seq_len=seq_len, stride=stride, batch_seqs=3)
    loss, n_bytes = 0.0, 0
    with torch.no_grad():
        for start, score_from, end in sliding_windows(tokens.numel(), seq_len, stride):
            for i in range(score_from, end):  # prediction i: context tokens start..i, target i + 1
                logits = model(tokens[None, start:i + 1])[0, -1]
                loss -= float(torch.log_softmax(logits.double(), -1)[tokens[i + 1]])
                n_bytes += hand_bytes(tokens, lut, i + 1)
    assert res["tokens"] == 149 and res["bytes"] == n_bytes
    assert res["val_loss"] == pytest.approx(loss / 149, rel=1e-5)
    assert res["val_bpb"] == pytest.approx(loss / math.log(2) / n_bytes, rel=1e-5)


def test_bpb_reduction_equals_hand_computation():
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(90)
    res = evaluate_plain(model, tokens, lut, seq_len=16, batch_seqs=2, return_per_token=True)
    nll = res["per_token_nll"][1:]
    n_bytes = sum(hand_bytes(tokens, lut, t) for t in range(1, 90))
    assert res["bytes"] == n_bytes and res["tokens"] == 89
    assert bool((res["per_token_count"][1:] == 1).all()) and int(res["per_token_count"][0]) == 0
    assert res["val_loss"] == pytest.approx(float(nll.sum()) / 89, rel=1e-12)
    bits = float(nll.sum()) / math.log(2)
    assert res["val_bpb"] == pytest.approx(bits / n_bytes, rel=1e-12)
    assert res["val_bpb"] == pytest.approx(res["val_loss"] / math.log(2) * res["tokens"] / res["bytes"], rel=1e-12)
    acc = BpbAccumulator()
    acc.add(torch.tensor(3.0, dtype=torch.float64), 2, 5)
    acc.add(torch.tensor(1.5, dtype=torch.float64), 1, 1)
    out = acc.result()
    assert (out["tokens"], out["bytes"], out["nll_sum"]) == (3, 6, 4.5)
    assert out["val_loss"] == pytest.approx(1.5) and out["val_bpb"] == pytest.approx(4.5 / math.log(2) / 6)


@pytest.mark.parametrize("which", ["plain", "sliding"])
def test_rank_shares_add_up_to_the_single_rank_result(which):
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(181)

    def run(rank, world):
        if which == "plain":
            return evaluate_plain(model, tokens, lut, 16, 2, rank, world, return_per_token=True)
        return evaluate_sliding(model, tokens, lut, 16, 4, 2, rank, world, return_per_token=True)

    whole = run(0, 1)
    parts = [run(r, 3) for r in range(3)]  # no process group: each rank's local sums
    assert sum(p["tokens"] for p in parts) == whole["tokens"] == 180
    assert sum(p["bytes"] for p in parts) == whole["bytes"]
    assert sum(p["val_loss"] * p["tokens"] for p in parts) == pytest.approx(whole["val_loss"] * 180, rel=1e-6)
    assert bool((sum(p["per_token_count"] for p in parts)[1:] == 1).all())


@pytest.mark.parametrize("mode", ["sgd", "muon", "lora"])
def test_ttt_with_zero_lr_equals_sliding(mode):
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(300)
    slide = evaluate_sliding(model, tokens, lut, seq_len=32, stride=8, batch_seqs=4, return_per_token=True)
    ttt = evaluate_ttt(model, tokens, lut, ttt_cfg(ttt_lr=0.0, ttt_mode=mode), seq_len=32, return_per_token=True)
    assert ttt["updates"] > 0
    assert torch.equal(ttt["per_token_nll"][1:], slide["per_token_nll"][1:])
    assert (ttt["tokens"], ttt["bytes"]) == (slide["tokens"], slide["bytes"])
    assert ttt["val_loss"] == pytest.approx(slide["val_loss"], rel=1e-12, abs=0)


@pytest.mark.parametrize("mode", ["sgd", "muon", "lora"])
def test_ttt_adapts_a_copy_score_first(mode):
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(300)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slide = evaluate_sliding(model, tokens, lut, seq_len=32, stride=8, batch_seqs=4, return_per_token=True)
    cfg = ttt_cfg(ttt_mode=mode)
    ttt = evaluate_ttt(model, tokens, lut, cfg, seq_len=32, return_per_token=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert ttt["chunks"] == 5 and ttt["adapted_chunks"] == 4
    assert ttt["updates"] == 4 * cfg.ttt_epochs  # 63 usable tokens -> 1 sequence of 32 -> 1 step per epoch
    # chunk 0 is scored by the unadapted model; later chunks by adapted ones
    first_chunk = slice(1, 64)
    assert torch.equal(ttt["per_token_nll"][first_chunk], slide["per_token_nll"][first_chunk])
    assert not torch.allclose(ttt["per_token_nll"][100:], slide["per_token_nll"][100:])
    kinds = [(ev["event"], ev["chunk"]) for ev in ttt["trace"]]
    assert kinds[:3] == [("score", 0), ("update", 0), ("update", 0)] and kinds[-1] == ("score", 4)


def test_the_muon_ttt_step_orthogonalises_matrices_and_steps_vectors_plainly():
    gen = torch.Generator().manual_seed(4)
    matrix, vector = nn.Parameter(torch.randn(6, 10, generator=gen)), nn.Parameter(torch.randn(10, generator=gen))
    g_matrix, g_vector = torch.randn(6, 10, generator=gen), torch.randn(10, generator=gen)
    before_m, before_v = matrix.detach().clone(), vector.detach().clone()
    matrix.grad, vector.grad = g_matrix.clone(), g_vector.clone()
    opt = ttt_optimizer([matrix, vector], ttt_cfg(ttt_mode="muon", ttt_lr=0.1, ttt_ns_steps=5))
    assert isinstance(opt, NewtonSchulzStep)
    opt.step()
    opt.step()  # no momentum: the second step repeats the first
    assert torch.allclose(matrix.detach(), before_m - 0.2 * newton_schulz5(g_matrix, 5), atol=1e-6)
    assert torch.allclose(vector.detach(), before_v - 0.2 * g_vector, atol=1e-6)
    singular = torch.linalg.svdvals(newton_schulz5(g_matrix, 5))
    assert float(singular.min()) > 0.5 and float(singular.max()) < 1.3  # the update is orthogonalised, not g
    assert isinstance(ttt_optimizer([matrix], ttt_cfg(ttt_mode="sgd")), torch.optim.SGD)


@pytest.mark.parametrize("scope", ["all", "vectors"])
def test_ttt_leaves_the_frozen_blocks_as_they_are(scope):
    from pgolf.model.gpt import GPT
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny().model
    cfg.vocab_size, cfg.num_layers = VOCAB, 3
    torch.manual_seed(0)
    model = GPT(cfg)
    ecfg = ttt_cfg(ttt_mode="muon", ttt_freeze_blocks=2, ttt_freeze_scope=scope)
    work, params = prepare_ttt_model(model, ecfg)
    adapted = {id(p) for p in params}
    for name, p in work.named_parameters():
        frozen = name.startswith(("blocks.0.", "blocks.1.")) and (scope == "all" or p.ndim < 2)
        assert (id(p) in adapted) != frozen and p.requires_grad != frozen, name
    assert any(n.startswith("blocks.1.") and p.ndim == 2 and id(p) in adapted
               for n, p in work.named_parameters()) == (scope == "vectors")
    before = {k: v.clone() for k, v in work.state_dict().items()}
    tokens = toy_tokens(200)
    opt = ttt_optimizer(params, ecfg)
    ttt_train_chunk(work, params, opt, tokens, 0, 65, 32, ecfg, 0, 1, [], 0, 0)
    after = work.state_dict()
    changed = {name for name, _ in work.named_parameters() if not torch.equal(after[name], before[name])}
    assert not any(id(p) not in adapted and name in changed for name, p in work.named_parameters())
    assert "blocks.2.attn.c_q.weight" in changed and "blocks.2.mlp.fc.weight" in changed
    assert ("blocks.1.attn.c_q.weight" in changed) == (scope == "vectors")
    only_blocks = nn.Module()
    only_blocks.blocks = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(UserError, match="ttt_freeze_blocks=1 leaves TTT nothing to adapt"):
        prepare_ttt_model(only_blocks, ttt_cfg(ttt_freeze_blocks=1))


def test_ttt_time_limit_stops_adapting():
    model, lut, tokens = EvalToyModel(VOCAB), toy_lut(), toy_tokens(300)
    slide = evaluate_sliding(model, tokens, lut, seq_len=32, stride=8, batch_seqs=4)
    ttt = evaluate_ttt(model, tokens, lut, ttt_cfg(ttt_time_limit_s=1e-9), seq_len=32)
    assert ttt["updates"] == 0 and ttt["trace"][1]["event"] == "stop_adapting"
    assert ttt["val_loss"] == pytest.approx(slide["val_loss"], rel=1e-12)


def test_ttt_lora_on_the_real_gpt_starts_equal_to_sliding():
    from pgolf.model.gpt import GPT
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny().model
    cfg.vocab_size, cfg.num_layers, cfg.bigram_buckets, cfg.xsa_last_n, cfg.ve_last_n = VOCAB, 2, 32, 1, 1
    torch.manual_seed(0)
    model, lut, tokens = GPT(cfg), toy_lut(), toy_tokens(200)
    slide = evaluate_sliding(model, tokens, lut, seq_len=32, stride=8, batch_seqs=4, return_per_token=True)
    ttt = evaluate_ttt(model, tokens, lut, ttt_cfg(ttt_lr=0.0, ttt_mode="lora"), seq_len=32, return_per_token=True)
    assert ttt["updates"] > 0 and torch.equal(ttt["per_token_nll"][1:], slide["per_token_nll"][1:])
