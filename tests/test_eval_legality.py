"""The legality harness: each check fails its planted violation and passes the real eval methods.

The illegal variants (a peeking model, an unnormalized scorer, train-then-score TTT, rescoring, a training
that reads the val shard) live only here.
"""

import torch
from torch import nn

from pgolf.config import EvalConfig
from pgolf.data.bytes import ByteLUT
from pgolf.data.shards import FileAudit, read_shard, write_shard
from pgolf.eval.bpb import BpbAccumulator, PerTokenScores, stream_byte_cumsum
from pgolf.eval.legality import CheckResult, check_val_not_opened, format_check_table, run_legality_checks
from pgolf.eval.sliding import evaluate_sliding, score_windows, sliding_windows
from pgolf.eval.toy import EvalToyModel
from pgolf.eval.ttt import evaluate_ttt, prepare_ttt_model, ttt_chunk_windows, ttt_train_chunk

VOCAB = 32
SEQ_LEN, STRIDE = 16, 4


def toy_lut() -> ByteLUT:
    base = (torch.arange(VOCAB) % 4 + 1).to(torch.int16)
    space = torch.arange(VOCAB) % 3 == 0
    boundary = torch.zeros(VOCAB, dtype=torch.bool)
    base[0], boundary[0] = 0, True
    return ByteLUT(base, space, boundary)


def stream(n: int = 120) -> torch.Tensor:
    tokens = torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(5))
    tokens[0] = 0
    return tokens


def make_model():
    return EvalToyModel(VOCAB, dim=16, seed=3)


def ttt_cfg(mode: str = "sgd") -> EvalConfig:
    return EvalConfig(batch_seqs=4, sliding_stride=STRIDE, ttt=True, ttt_mode=mode, ttt_chunk_tokens=40,
                      ttt_epochs=2, ttt_lr=0.1, ttt_batch_seqs=2, ttt_lora_rank=2)


def sliding_fn(model, tokens, lut, **kw):
    return evaluate_sliding(model, tokens, lut, SEQ_LEN, STRIDE, 4, **kw)


def ttt_fn(mode):
    return lambda model, tokens, lut, **kw: evaluate_ttt(model, tokens, lut, ttt_cfg(mode), SEQ_LEN, **kw)


def checks(eval_fn, model_fn=make_model, audit=None, flips=None) -> dict[str, CheckResult]:
    results = run_legality_checks(model_fn, stream(), toy_lut(), eval_fn, audit=audit or FileAudit(),
                                  flip_positions=flips)
    return {r.name: r for r in results}


# ---- planted violations -------------------------------------------------------------------------------

class PeekingModel(EvalToyModel):
    """Mixes the next input token's embedding into each position: p_t sees x_t (C1 violation)."""

    def hidden(self, x):
        nxt = torch.cat([x[:, 1:], x[:, :1]], dim=1)
        return super().hidden(x) + self.tok_emb(nxt)


class HalfNllModel(nn.Module):
    """Reports half the NLL: exp(-score) over the vocabulary sums to more than 1 (C2 violation)."""

    def __init__(self):
        super().__init__()
        self.inner = make_model()

    def forward(self, x, y=None, reduction="mean"):
        out = self.inner(x, y, reduction)
        return out if y is None else 0.5 * out


def train_then_score_ttt(model, tokens, lut, return_per_token=False, inspect=None):
    """Adapts on each chunk *before* scoring it (C3 violation), built from the real TTT pieces."""
    cfg = ttt_cfg()
    tokens = tokens.long()
    n = tokens.numel()
    n_chunks = -(-n // cfg.ttt_chunk_tokens)
    groups = ttt_chunk_windows(sliding_windows(n, SEQ_LEN, STRIDE), cfg.ttt_chunk_tokens, n_chunks)
    work, params = prepare_ttt_model(model, cfg)
    opt = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    acc, per_token, trace, updates = BpbAccumulator(), PerTokenScores(n), [], 0
    for c, group in enumerate(groups):
        lo, hi = c * cfg.ttt_chunk_tokens, min((c + 1) * cfg.ttt_chunk_tokens, n)
        updates = ttt_train_chunk(work, params, opt, tokens, lo, hi, SEQ_LEN, cfg, 0, 1, trace, c, updates)
        with torch.no_grad():
            score_windows(work, tokens, group, cfg.batch_seqs, stream_byte_cumsum(tokens, lut), acc, per_token,
                          inspect)
        trace.append({"event": "score", "chunk": c, "updates": updates, "first": group[0][1] + 1,
                      "last": group[-1][2]})
    return {**acc.result(), **per_token.as_dict(), "trace": trace}


def rescoring_sliding(model, tokens, lut, return_per_token=False, inspect=None):
    """Scores the stream twice (C4 violation: each token must be scored once)."""
    first = sliding_fn(model, tokens, lut, return_per_token=True, inspect=inspect)
    second = sliding_fn(model, tokens, lut, return_per_token=True)
    return {**second, "per_token_count": first["per_token_count"] + second["per_token_count"]}


# ---- tests ----------------------------------------------------------------------------------------------

def test_real_methods_pass_every_check():
    from pgolf.eval.bpb import evaluate_plain

    methods = {
        "plain": lambda model, tokens, lut, **kw: evaluate_plain(model, tokens, lut, SEQ_LEN, 4, **kw),
        "sliding": sliding_fn, "ttt-sgd": ttt_fn("sgd"), "ttt-lora": ttt_fn("lora"),
    }
    for name, fn in methods.items():
        res = checks(fn)
        assert all(r.passed for r in res.values()), (name, format_check_table(list(res.values())))
    assert "updates, each after" in checks(ttt_fn("sgd"))["score_before_update"].detail


def test_causality_catches_a_peeking_model():
    peek = lambda: PeekingModel(VOCAB, dim=16, seed=3)  # noqa: E731
    res = checks(sliding_fn, model_fn=peek)
    assert not res["causality"].passed and "prefix alone" in res["causality"].detail
    assert res["score_before_update"].passed  # the other checks do not blame it


def test_train_then_score_ttt_fails_causality_and_score_before_update():
    res = checks(train_then_score_ttt)
    assert not res["causality"].passed
    assert not res["score_before_update"].passed and "before it was scored" in res["score_before_update"].detail


def test_normalization_catches_an_unnormalized_scorer():
    res = checks(sliding_fn, model_fn=HalfNllModel, flips=[60])
    assert not res["normalization"].passed and res["causality"].passed
    assert checks(ttt_fn("sgd"), model_fn=HalfNllModel, flips=[60])["normalization"].passed is False


def test_exactly_once_catches_rescoring():
    res = checks(rescoring_sliding, flips=[60])
    assert not res["score_before_update"].passed and "scored 2 times" in res["score_before_update"].detail


def test_val_read_during_training_is_caught(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", stream(64).numpy())
    write_shard(tmp_path / "fineweb_val_000000.bin", stream(64).numpy())
    audit = FileAudit()
    import pgolf.data.shards as shards

    real = shards.FILE_AUDIT
    shards.FILE_AUDIT = audit  # read_shard records into the module's audit object
    try:
        with audit.phase("train"):
            read_shard(tmp_path / "fineweb_train_000000.bin")
        with audit.phase("eval"):
            read_shard(tmp_path / "fineweb_val_000000.bin")
        clean = check_val_not_opened(audit, "fineweb_val_*.bin")
        with audit.phase("calibration"):
            read_shard(tmp_path / "fineweb_val_000000.bin")
        dirty = checks(sliding_fn, audit=audit, flips=[60])["no_val_in_training"]
    finally:
        shards.FILE_AUDIT = real
    assert clean.passed and "1 file opens" in clean.detail
    assert not dirty.passed and "calibration" in dirty.detail


def test_check_table_says_pass_and_fail():
    table = format_check_table([CheckResult("causality", True, "ok"), CheckResult("normalization", False, "bad")])
    lines = table.splitlines()
    assert "PASS" in lines[1] and "FAIL" in lines[2] and "bad" in lines[2]
