"""The fast scoring path (pgolf.eval.scoring) against the reference path: the same NLL sum, tokens, bytes, bpb
and per-token scores for plain, sliding (a short tail window included) and score-first TTT, eagerly and
compiled; its batch plan, compile gating and compile fallback; the legality harness on the compiled path."""

import warnings
from collections import Counter

import pytest
import torch
from test_eval import VOCAB, toy_lut, toy_tokens, ttt_cfg
from torch import nn

import pgolf.eval.scoring as scoring
import pgolf.eval.ttt as ttt
from pgolf.config import EvalConfig
from pgolf.errors import UserError
from pgolf.eval.bpb import evaluate_plain, plain_windows
from pgolf.eval.scoring import StaticShapeCompile, check_scorer, compile_min_count, plan_window_batches, scorer_for
from pgolf.eval.sliding import evaluate_sliding, sliding_windows
from pgolf.eval.toy import EvalToyModel
from pgolf.eval.ttt import evaluate_ttt, ttt_step_shape_counts

N_TOKENS, SEQ_LEN, STRIDE, BATCH = 203, 32, 8, 4  # 202 targets: plain 6 windows + 10; sliding's last reads 26


def tiny_gpt():
    from pgolf.model.gpt import GPT
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny().model
    cfg.vocab_size, cfg.num_layers, cfg.bigram_buckets, cfg.xsa_last_n, cfg.ve_last_n = VOCAB, 2, 32, 1, 1
    torch.manual_seed(0)
    return GPT(cfg)


class ForwardOnly(nn.Module):
    """A model with the contract's forward only (no head split): the fast path cuts its full forward."""

    def __init__(self):
        super().__init__()
        self.inner = EvalToyModel(VOCAB)

    def forward(self, x, y=None, reduction="mean"):
        return self.inner(x, y, reduction)


# The slow tests compile many small shapes and models in one process: past Dynamo's default limit of 8
# compiles of one function it would run it eagerly and the compiled path would go untested.
more_recompiles = torch._dynamo.config.patch(recompile_limit=64)
MODELS = {"gpt": tiny_gpt, "toy": lambda: EvalToyModel(VOCAB), "forward-only": ForwardOnly}


def run_method(method: str, model, scorer: str, compile_scope: str = "model") -> dict:
    lut, tokens = toy_lut(), toy_tokens(N_TOKENS)
    if method == "plain":
        return evaluate_plain(model, tokens, lut, SEQ_LEN, BATCH, return_per_token=True, scorer=scorer,
                              compile_scope=compile_scope)
    if method == "sliding":
        return evaluate_sliding(model, tokens, lut, SEQ_LEN, STRIDE, BATCH, return_per_token=True, scorer=scorer,
                                compile_scope=compile_scope)
    cfg = ttt_cfg(ttt_mode="lora", ttt_lr=0.5) if method == "ttt-lora" else ttt_cfg()
    cfg.compile_scope = compile_scope
    return evaluate_ttt(model, tokens, lut, cfg, SEQ_LEN, return_per_token=True, scorer=scorer)


def assert_same_scores(fast: dict, ref: dict, rel: float, atol: float) -> None:
    assert fast["tokens"] == ref["tokens"] == N_TOKENS - 1 and fast["bytes"] == ref["bytes"]
    assert fast["val_loss"] * fast["tokens"] == pytest.approx(ref["val_loss"] * ref["tokens"], rel=rel)
    assert fast["val_bpb"] == pytest.approx(ref["val_bpb"], rel=rel)
    assert torch.equal(fast["per_token_count"], ref["per_token_count"])
    assert torch.allclose(fast["per_token_nll"][1:], ref["per_token_nll"][1:], rtol=0, atol=atol)


def test_the_stream_has_short_tail_windows():
    assert plain_windows(N_TOKENS, SEQ_LEN)[-1] == (192, 192, 202)
    start, score_from, end = sliding_windows(N_TOKENS, SEQ_LEN, STRIDE)[-1]
    assert end - start == 26 and end - score_from == 2


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", ["plain", "sliding", "ttt", "ttt-lora"])
def test_eager_fast_path_equals_the_reference(method, model_name):
    ref = run_method(method, MODELS[model_name](), "reference")
    fast = run_method(method, MODELS[model_name](), "eager")
    assert_same_scores(fast, ref, rel=1e-7, atol=1e-5)
    if method.startswith("ttt"):
        assert fast["updates"] == ref["updates"] > 0 and fast["trace"] == ref["trace"]


@pytest.mark.slow
@more_recompiles
@pytest.mark.parametrize("method", ["plain", "sliding", "ttt", "ttt-lora"])
def test_compiled_fast_path_equals_the_reference(method):
    ref = run_method(method, tiny_gpt(), "reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = run_method(method, tiny_gpt(), "compiled")
    assert_same_scores(fast, ref, rel=1e-6, atol=1e-4)
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    if failed:  # StaticShapeCompile ran the eager function instead, which matched
        pytest.skip(f"torch.compile does not work on this machine: {failed[0]}")
    assert 0 < fast["compile_s"] < fast["seconds"]  # the compiles' first calls, a part of the whole


@pytest.mark.slow
@more_recompiles
@pytest.mark.parametrize("method", ["sliding", "ttt"])
def test_block_wise_compile_equals_the_reference(method, monkeypatch):
    routed = []
    monkeypatch.setattr(scoring, "call_block", lambda *args: routed.append(1) or args[0](*args[1:]))
    ref = run_method(method, tiny_gpt(), "reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = run_method(method, tiny_gpt(), "compiled", compile_scope="blocks")
    assert_same_scores(fast, ref, rel=1e-6, atol=1e-4)
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    if failed:
        pytest.skip(f"torch.compile does not work on this machine: {failed[0]}")
    assert routed  # the blocks went through the compiled call (traced once per compile: its Python body runs then)


@pytest.mark.slow
def test_block_wise_compile_shares_one_graph_between_blocks_of_one_structure(compiled_graphs):
    from pgolf.model.gpt import GPT
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny().model
    cfg.vocab_size, cfg.num_layers, cfg.xsa_last_n, cfg.ve_last_n, cfg.ln_scale = VOCAB, 4, 0, 0, True
    model = GPT(cfg).eval()
    x = toy_tokens(2 * SEQ_LEN + 1)[: 2 * SEQ_LEN].view(2, SEQ_LEN)
    with torch.inference_mode():
        compiled = StaticShapeCompile(scoring.split_tail_nll, {"s"}, "test", scope="blocks")
        nll = compiled("s", model, x, x, 4)
        expected = scoring.split_tail_nll(model, x, x, 4)
    assert torch.allclose(nll, expected, atol=1e-5)
    # layer 0 reads x0 as its x (an alias Dynamo guards on); layers 1-2 differ only in ln_factor, a tensor;
    # layer 3, the last, computes only the 4 positions kept (GPT.forward_hidden's keep)
    assert compiled_graphs == {"call_block": 3}


def test_an_unknown_compile_scope_is_an_error_naming_the_key():
    from pgolf.config import ConfigError, apply_overrides
    from pgolf.recipes import get_recipe

    with pytest.raises(ConfigError, match="eval.compile_scope='whole' is not one of model|blocks"):
        apply_overrides(get_recipe("tiny"), ["eval.compile_scope=whole"])  # before any training or loading
    with pytest.raises(UserError, match="eval.compile_scope='whole'"):
        run_method("sliding", EvalToyModel(VOCAB), "eager", compile_scope="whole")
    with pytest.raises(UserError, match="eval.compile_scope='whole'"):
        run_method("ttt", EvalToyModel(VOCAB), "eager", compile_scope="whole")


def test_batch_plan_keeps_the_stride_except_where_a_window_scores_more():
    windows = sliding_windows(N_TOKENS, SEQ_LEN, STRIDE)
    batches = plan_window_batches(windows, 0, BATCH, STRIDE)
    assert sum(b.rows for b in batches) == len(windows)
    assert (batches[0].length, batches[0].keep) == (32, 32)  # the first window scores all its positions
    assert (batches[-1].length, batches[-1].keep, batches[-1].rows) == (26, 8, 1)  # the short tail window
    assert Counter((b.length, b.keep) for b in batches) == {(32, 32): 1, (32, 8): len(batches) - 2, (26, 8): 1}
    plain = plan_window_batches(plain_windows(N_TOKENS, SEQ_LEN), 0, BATCH, SEQ_LEN)
    assert [(b.rows, b.length, b.keep) for b in plain] == [(4, 32, 32), (2, 32, 32), (1, 10, 10)]


def test_compile_gating_by_mode_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_min_count("auto", cpu, 256) is None and compile_min_count("auto", cuda, 256) == 256
    assert compile_min_count("compiled", cpu, 256) == 1
    assert compile_min_count("eager", cuda, 256) is None and compile_min_count("reference", cuda, 256) is None
    assert scorer_for(EvalConfig()) == "auto" and scorer_for(EvalConfig(compile=False)) == "eager"
    with pytest.raises(UserError, match="scorer"):
        check_scorer("fast")
    with pytest.raises(UserError, match="scorer"):
        evaluate_sliding(EvalToyModel(VOCAB), toy_tokens(50), toy_lut(), SEQ_LEN, STRIDE, BATCH, scorer="fast")


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here\nsecond line")
        return run

    monkeypatch.setattr(scoring.torch, "compile", broken_compile)
    fn = StaticShapeCompile(lambda a, b: a + b, {("x",)}, "adder")
    with pytest.warns(RuntimeWarning, match="adder: torch.compile failed .*no compiler here"):
        assert fn(("x",), 2, 3) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fn(("x",), 4, 3) == 7 and fn(("y",), 1, 1) == 2


def test_first_calls_of_compiled_shapes_are_timed_and_only_they(monkeypatch):
    import time

    calls = []

    def slow_compile(fn, **kwargs):
        def run(*args):
            calls.append(args)
            time.sleep(0.05)
            return fn(*args)
        return run

    monkeypatch.setattr(scoring.torch, "compile", slow_compile)
    fn = StaticShapeCompile(lambda a, b: a + b, {("x",), ("y",)}, "adder")
    assert fn(("x",), 1, 2) == 3 and fn(("x",), 1, 2) == 3 and fn(("eager",), 1, 1) == 2
    assert 0.05 <= fn.first_call_s < 0.1  # x's first call only: its second call and the eager shape are not
    assert fn(("y",), 2, 2) == 4 and 0.1 <= fn.first_call_s < 0.2 and len(calls) == 3


@pytest.mark.parametrize("method", ["sliding", "ttt"])
def test_results_split_their_seconds(method):
    res = run_method(method, EvalToyModel(VOCAB), "eager")
    assert res["compile_s"] == 0.0  # nothing compiled on the eager path
    if method == "ttt":
        parts = [res["score_s"], res["adapt_first_chunk_s"], res["adapt_s"]]
        assert res["adapted_chunks"] >= 2 and all(p > 0 for p in parts)
        assert sum(parts) <= res["seconds"]


def test_the_eval_table_shows_compile_seconds_where_known():
    from pgolf.eval.commands import format_eval_table

    row = {"val_loss": 2.0, "val_bpb": 1.5, "tokens": 10, "bytes": 30, "seconds": 4.0}
    lines = format_eval_table({"plain": row, "sliding": {**row, "compile_s": 2.5}}).splitlines()
    assert lines[0].split()[-2:] == ["seconds", "compile"]
    assert lines[1].split()[-2:] == ["4.0", "-"] and lines[2].split()[-2:] == ["4.0", "2.5"]


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_ttt_step_shape_counts_match_the_steps_taken(monkeypatch, rank, world_size):
    seen = Counter()
    real = ttt.ttt_step_nll_sum

    def counting(model, x, y):
        seen[tuple(x.shape)] += 1
        return real(model, x, y)

    monkeypatch.setattr(ttt, "ttt_step_nll_sum", counting)
    cfg = ttt_cfg(ttt_chunk_tokens=100, ttt_batch_seqs=2)  # 3 sequences of 32 a chunk: steps of 2 and 1
    res = evaluate_ttt(EvalToyModel(VOCAB), toy_tokens(300), toy_lut(), cfg, SEQ_LEN, rank, world_size,
                       scorer="eager")
    assert res["adapted_chunks"] == res["chunks"] - 1 == 2
    assert seen == ttt_step_shape_counts(cfg, SEQ_LEN, res["chunks"], rank, world_size)
    assert sum(seen.values()) <= res["updates"]


def test_gpt_head_split_equals_its_logits():
    model = tiny_gpt().eval()
    x = toy_tokens(40)[None, :33]
    with torch.no_grad():
        assert torch.equal(model.head_logits(model.forward_hidden(x)), model.logits(x))


@pytest.mark.slow
@more_recompiles
def test_legality_checks_pass_and_catch_a_peeking_model_on_the_compiled_path():
    import test_eval_legality as legal

    def sliding(model, tokens, lut, **kw):
        return evaluate_sliding(model, tokens, lut, legal.SEQ_LEN, legal.STRIDE, 4, scorer="compiled", **kw)

    def ttt_sgd(model, tokens, lut, **kw):
        return evaluate_ttt(model, tokens, lut, legal.ttt_cfg("sgd"), legal.SEQ_LEN, scorer="compiled", **kw)

    for fn in (sliding, ttt_sgd):
        res = legal.checks(fn)
        assert all(r.passed for r in res.values()), {k: r.detail for k, r in res.items()}
    peek = legal.checks(sliding, model_fn=lambda: legal.PeekingModel(legal.VOCAB, dim=16, seed=3))
    assert not peek["causality"].passed and "prefix alone" in peek["causality"].detail


def test_the_compiler_is_loaded_in_setup_only_when_the_scorer_compiles(monkeypatch):
    created = []
    monkeypatch.setattr(scoring.torch, "compile", lambda fn, **kw: created.append(fn) or fn)
    assert scoring.load_compiler("eager", torch.device("cuda")) == 0.0
    assert scoring.load_compiler("auto", torch.device("cpu")) == 0.0 and created == []
    assert scoring.load_compiler("auto", torch.device("cuda")) >= 0.0 and len(created) == 1
    assert scoring.load_compiler("compiled", torch.device("cpu")) >= 0.0 and len(created) == 2
