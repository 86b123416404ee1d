"""Document TTT with the cached context (eval.ttt_doc_context=cache): each chunk's own positions alone, reading
the earlier chunks' keys and values from pgolf.model.kv_cache."""

import dataclasses

import pytest
import torch
from test_eval_doc_ttt import doc_spec, doc_stream, lut, small_frontier, tiny_gpt

from pgolf.eval.bpb import score_token_nll
from pgolf.eval.documents import find_documents
from pgolf.eval.legality import run_legality_checks
from pgolf.eval.runner import PassSpec, run_pass

FROZEN = {"ttt_lr": 0.0, "ttt_global_lr": 0.0, "ttt_weight_decay": 0.0}


def test_cached_context_without_learning_equals_scoring_each_document_alone():
    model, tokens = tiny_gpt(bigram_buckets=32, smear_gate_v2=True), doc_stream()
    res = run_pass(model, tokens, lut(), doc_spec(ttt_doc_context="cache", **FROZEN))
    total = 0.0
    with torch.no_grad():
        for s, p in find_documents(tokens):  # every document is shorter than the 64-token window
            total += float(score_token_nll(model, tokens[None, s:s + p], tokens[None, s + 1:s + p + 1]).sum())
    assert res["tokens"] == tokens.numel() - 1 and res["updates"] > 0
    assert res["nll_sum"] == pytest.approx(total, rel=1e-5)


def test_cached_context_equals_the_window_on_the_frontier_blocks_until_it_learns():
    """Loops, lanes, XSA, the gates and SmearGate v2: frozen, the cache gives the window's scores token by token;
    adapting, the scores part (earlier keys as computed then, no gradient through them) and every token is
    still scored once."""
    model, e = small_frontier()
    tokens = doc_stream()

    def scores(**kw):
        spec = PassSpec("ttt", "doc_ttt", 64, eval_cfg=dataclasses.replace(e, **kw))
        return run_pass(model, tokens, lut(), spec, return_per_token=True)

    window, cached = scores(**FROZEN), scores(ttt_doc_context="cache", **FROZEN)
    assert torch.allclose(cached["per_token_nll"][1:], window["per_token_nll"][1:], atol=1e-5)
    learned_window, learned_cache = scores(), scores(ttt_doc_context="cache")
    assert learned_cache["updates"] == learned_window["updates"] > 0 and learned_cache["phases"] == 2
    assert bool((learned_cache["per_token_count"][1:] == 1).all())
    assert learned_cache["nll_sum"] != cached["nll_sum"] and learned_cache["nll_sum"] != learned_window["nll_sum"]


def test_cached_context_on_documents_longer_than_the_window_reads_at_most_the_window():
    """Past the window a chunk reads the last seq_len - chunk cached positions: frozen, the first window of each
    document equals the window pass, later chunks read keys computed with more context than the window's."""
    model, tokens, window = tiny_gpt(), doc_stream(), 16
    cached, windowed = (run_pass(model, tokens, lut(), dataclasses.replace(
        doc_spec(ttt_doc_context=context, **FROZEN), seq_len=window), return_per_token=True)
        for context in ("cache", "window"))
    assert cached["tokens"] == tokens.numel() - 1
    first = torch.zeros(tokens.numel(), dtype=torch.bool)
    for s, p in find_documents(tokens):
        first[s + 1:s + 1 + min(p, window)] = True  # the predictions of each document's first window
    assert torch.allclose(cached["per_token_nll"][first], windowed["per_token_nll"][first], atol=1e-5)
    assert not torch.allclose(cached["per_token_nll"][~first][1:], windowed["per_token_nll"][~first][1:], atol=1e-4)


def test_cached_context_passes_the_legality_harness():
    model, tokens = tiny_gpt(), doc_stream()
    spec = doc_spec(ttt_doc_context="cache")
    results = run_legality_checks(lambda: model, tokens, lut(), lambda m, t, lu, **kw: run_pass(m, t, lu, spec, **kw),
                                  audit_row=None, val_pattern="none_*")
    assert all(r.passed for r in results), [(r.name, r.detail) for r in results]


@pytest.mark.gpu
def test_cached_context_on_cuda_equals_the_window_while_frozen():
    """The CUDA attention kernels with fewer queries than keys (bottom-right causal) under bf16 autocast: frozen,
    the cached pass gives the window pass's scores to bf16 rounding."""
    model, e = small_frontier("cuda")
    tokens = doc_stream()
    window, cached = (run_pass(model, tokens, lut(), PassSpec("ttt", "doc_ttt", 64, eval_cfg=dataclasses.replace(
        e, ttt_doc_context=context, **FROZEN), scorer="eager")) for context in ("window", "cache"))
    assert cached["tokens"] == window["tokens"] == tokens.numel() - 1
    assert cached["nll_sum"] == pytest.approx(window["nll_sum"], rel=2e-3)
