"""Document-isolated scoring, the per-document LoRA TTT with phased global SGD, and the one evaluation runner."""

import dataclasses

import pytest
import torch

from pgolf.config import EvalConfig
from pgolf.config_rules import validate_config
from pgolf.data.bytes import ByteLUT
from pgolf.errors import UserError
from pgolf.eval.bpb import score_token_nll
from pgolf.eval.doc_lora import BatchedLora, LoraRowModel, parse_lora_targets
from pgolf.eval.documents import DocIsolated, find_documents
from pgolf.eval.legality import run_legality_checks, scored_before, trace_violations
from pgolf.eval.runner import PassSpec, passes_from_config, run_pass, run_passes
from pgolf.eval.ttt import evaluate_ttt
from pgolf.eval.ttt_doc import (
    DocTttState,
    batch_chunks,
    chunk_batch,
    chunk_keep,
    doc_batches,
    phase_points,
    prefix_doc_count,
)
from pgolf.model.gpt import GPT
from pgolf.recipes import get_recipe, recipe_tiny

VOCAB, BOS = 32, 1
BOS_AT = (0, 30, 41, 90, 150, 175, 200)


def tiny_gpt(**model_fields) -> GPT:
    cfg = recipe_tiny().model
    cfg.vocab_size, cfg.num_layers, cfg.bigram_buckets, cfg.xsa_last_n, cfg.ve_last_n = VOCAB, 2, 0, 1, 0
    for key, value in model_fields.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised projections would hide the attention (and the document mask)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def lut() -> ByteLUT:
    return ByteLUT((torch.arange(VOCAB) % 4 + 1).to(torch.int16), torch.arange(VOCAB) % 3 == 0,
                   torch.zeros(VOCAB, dtype=torch.bool))


def doc_stream(n: int = 240) -> torch.Tensor:
    tokens = torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(2))
    tokens[[p for p in BOS_AT if p < n]] = BOS
    return tokens


def doc_cfg(**kw) -> EvalConfig:
    base = {"batch_seqs": 4, "ttt": True, "ttt_mode": "doc_lora", "ttt_doc_chunk": 8, "ttt_doc_batch": 2,
            "ttt_lora_rank": 4, "ttt_lora_alpha": 4.0, "ttt_lr": 0.01, "ttt_prefix_frac": 0.5, "ttt_phases": 2,
            "ttt_global_chunk_tokens": 64, "ttt_global_lr": 0.01}
    return EvalConfig(**{**base, **kw})


def doc_spec(**kw) -> PassSpec:
    return PassSpec("ttt", "doc_ttt", 64, eval_cfg=doc_cfg(**kw))


def test_documents_predict_every_target_once_and_the_queue_runs_longest_first():
    tokens = doc_stream()
    docs = find_documents(tokens)
    covered = torch.zeros(tokens.numel(), dtype=torch.int32)
    for s, p in docs:
        covered[s + 1:s + p + 1] += 1
        assert tokens[s] == BOS and (s + p == tokens.numel() - 1 or tokens[s + p] == BOS)
    assert covered[0] == 0 and bool((covered[1:] == 1).all())
    queue = doc_batches(docs, 3)
    assert sorted(i for b in queue for i in b) == list(range(len(docs)))
    longest = [max(docs[i][1] for i in b) for b in queue]
    assert longest == sorted(longest, reverse=True)
    assert prefix_doc_count(0.05, 50_000) == 2500
    assert phase_points([[0, 1], [2, 3], [4, 5], [6]], 6, 3) == {0: [2], 1: [4], 2: [6]}
    assert phase_points([[0, 1, 2, 3]], 4, 2) == {}  # nothing left to score after the last batch
    # a prefix inside the first batch (the proxy's 25 of 500 documents, batches of 64): every phase still runs
    assert phase_points([list(range(64)), list(range(64, 128))], 25, 3) == {0: [8, 16, 25]}


@pytest.mark.parametrize("features", ["smear_gate", "smear_gate_v2"])
def test_doc_isolated_scoring_gives_a_later_document_no_context_from_the_earlier(features):
    model, tokens = tiny_gpt(bigram_buckets=32, ve_last_n=1, smear_gate=features == "smear_gate",
                             smear_gate_v2=features == "smear_gate_v2"), doc_stream()
    x, y = tokens[None, 20:41], tokens[None, 21:42]  # crosses the BOS at 30; the one at 41 is its last target
    with torch.no_grad():
        masked = score_token_nll(DocIsolated(model), x, y)[0]
        alone = score_token_nll(model, x[:, 10:], y[:, 10:])[0]  # the second document alone
        dense = score_token_nll(model, x, y)[0]
    assert torch.allclose(masked[10:], alone, atol=1e-5)
    assert not torch.allclose(dense[10:], alone, atol=1e-3)  # the stream's context did matter
    plain = run_pass(model, tokens, lut(), PassSpec("plain", "plain", 32, batch_seqs=4, doc_isolated=True))
    assert plain["tokens"] == tokens.numel() - 1


def test_batched_lora_starts_at_the_base_and_keeps_documents_apart():
    model = tiny_gpt()
    x = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(x, x, reduction="none")
    lora = BatchedLora(model, 3, 2, 2.0, parse_lora_targets("q,k,v,o,mlp,head"))
    lora.attach()
    try:
        with torch.no_grad():
            assert torch.allclose(model(x, x, reduction="none"), base, atol=1e-6)  # B = 0
            for p in lora.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            batched = model(x, x, reduction="none")
            for r in range(3):  # row r through slot r alone equals row r of the batch
                assert torch.allclose(LoraRowModel(lora, r)(x[r:r + 1], x[r:r + 1], reduction="none")[0],
                                      batched[r], atol=1e-5)
            assert not torch.allclose(batched, base, atol=1e-4)
    finally:
        lora.detach()
    assert "head_projection" not in model.__dict__
    with pytest.raises(UserError, match="ttt_lora_targets"):
        parse_lora_targets("q,x")


def test_doc_ttt_without_learning_equals_scoring_each_document_alone():
    model, tokens = tiny_gpt(), doc_stream()
    res = run_pass(model, tokens, lut(), doc_spec(ttt_lr=0.0, ttt_global_lr=0.0, ttt_weight_decay=0.0),
                   return_per_token=True)
    assert res["documents"] == len(BOS_AT) and res["phases"] == 2 and res["updates"] > 0
    total = 0.0
    with torch.no_grad():
        for s, p in find_documents(tokens):  # every document is shorter than the 64-token window
            total += float(score_token_nll(model, tokens[None, s:s + p], tokens[None, s + 1:s + p + 1]).sum())
    assert res["nll_sum"] == pytest.approx(total, rel=1e-5)
    learned = run_pass(model, tokens, lut(), doc_spec())
    assert learned["tokens"] == res["tokens"] == tokens.numel() - 1 and learned["nll_sum"] != res["nll_sum"]


def test_chunk_windows_score_only_their_last_chunk_positions():
    """chunk_keep's claim, on every chunk of a batch of documents longer and shorter than the window: no
    scored position lies before the stacked windows' last min(chunk, width) columns."""
    tokens = torch.zeros(4000, dtype=torch.long)
    docs = [(0, 700), (701, 5), (707, 130), (838, 129), (968, 47), (1016, 1900), (2917, 1001)]
    for chunk, window in ((8, 64), (48, 2048), (48, 100), (7, 20)):
        st = DocTttState(None, tokens, None, doc_cfg(ttt_doc_chunk=chunk), window, None, None, None, None, None)
        for c, active in batch_chunks(docs, chunk):
            x, _, mask, _, spans = chunk_batch(st, [docs[j] for j in active], c)
            keep = chunk_keep(st, x.size(1))
            assert not mask[:, :x.size(1) - keep].any(), (chunk, window, c)
            assert int(mask.sum()) == sum(e - lo for lo, e in spans)


def test_doc_ttt_on_documents_longer_than_the_window_slides_inside_each_and_cut_equals_full_forward():
    model, tokens, window = tiny_gpt(), doc_stream(), 16
    frozen = run_pass(model, tokens, lut(), dataclasses.replace(
        doc_spec(ttt_lr=0.0, ttt_global_lr=0.0, ttt_weight_decay=0.0), seq_len=window))
    total, chunk = 0.0, 8
    with torch.no_grad():  # chunk c of a document: predictions [cC, e) from its own window doc[e - 16 : e]
        for s, p in find_documents(tokens):
            for lo in range(0, p, chunk):
                e = min(lo + chunk, p)
                w0 = max(0, e - window)
                nll = score_token_nll(model, tokens[None, s + w0:s + e], tokens[None, s + w0 + 1:s + e + 1])
                total += float(nll[0, lo - w0:].sum())
    assert frozen["nll_sum"] == pytest.approx(total, rel=1e-5)
    cut = run_pass(model, tokens, lut(), dataclasses.replace(doc_spec(), seq_len=window), return_per_token=True)
    full = run_pass(model, tokens, lut(), dataclasses.replace(doc_spec(), seq_len=window, scorer="reference"),
                    return_per_token=True)
    assert cut["updates"] == full["updates"] > 0 and cut["nll_sum"] != frozen["nll_sum"]
    assert torch.allclose(cut["per_token_nll"][1:], full["per_token_nll"][1:], atol=1e-4)
    assert cut["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-5)


def small_frontier(device: str = "cpu") -> tuple[GPT, EvalConfig]:
    """The frontier's looped layers, parallel lanes, XSA, gates and SmearGate v2 at toy width, loops on, and its
    evaluation with doc_cfg's TTT sizes."""
    cfg = get_recipe("frontier")
    m = cfg.model
    m.num_layers, m.model_dim, m.vocab_size, m.num_heads, m.num_kv_heads = 5, 64, VOCAB, 4, 2
    m.recur_first, m.recur_last, m.parallel_lanes_from, m.xsa_last_n = 1, 2, 3, 5
    m.residual_dtype, m.fused_qk, m.fused_ce = "float32", False, False
    torch.manual_seed(0)
    model = GPT(m).eval()
    model.recurrence_active = True
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    e = dataclasses.replace(cfg.eval, **{k: v for k, v in dataclasses.asdict(doc_cfg()).items()
                                          if k.startswith("ttt_") and k != "ttt_lora_targets"})
    return model.to(device), e


def test_doc_ttt_cut_equals_full_forward_on_the_frontier_blocks():
    """The cut forward through the frontier's looped layers, parallel lanes, XSA, gates and SmearGate v2."""
    model, e = small_frontier()
    tokens = doc_stream()
    cut, full = (run_pass(model, tokens, lut(), PassSpec("ttt", "doc_ttt", 32, eval_cfg=e, scorer=scorer),
                          return_per_token=True) for scorer in ("eager", "reference"))
    assert cut["updates"] == full["updates"] > 0 and cut["phases"] == 2
    assert torch.allclose(cut["per_token_nll"][1:], full["per_token_nll"][1:], atol=1e-5)


def test_doc_ttt_passes_the_legality_harness():
    model, tokens = tiny_gpt(), doc_stream()
    results = run_legality_checks(lambda: model, tokens, lut(), lambda m, t, lu, **kw: run_pass(m, t, lu, doc_spec(),
                                                                                                **kw),
                                  audit_row=None, val_pattern="none_*")
    assert all(r.passed for r in results), [(r.name, r.detail) for r in results]


def test_span_traces_catch_an_update_before_its_score_and_flips_follow_the_score_order():
    trace = [{"event": "score", "step": 0, "updates": 0, "spans": [[1, 8], [21, 28]]},
             {"event": "update", "step": 0, "updates": 1, "spans": [[1, 8], [21, 30]]}]
    counts, problems = trace_violations(trace, 40)
    assert problems and "token 29" in problems[0]
    base = {"per_token_nll": torch.zeros(10), "per_token_score_step": torch.tensor([-1, 2, 2, 0, 0, 1, 1, 1, 0, 0])}
    # a flip of token 6 (scored at step 1) must leave targets 3, 4 (step 0) and 5 (step 1) alone, not 1, 2
    assert scored_before(base, 6).tolist() == [False, False, False, True, True, True] + [False] * 4


def test_runner_passes_follow_the_config():
    cfg = get_recipe("frontier")
    specs = passes_from_config(cfg)
    assert [(s.name, s.kind, s.doc_isolated) for s in specs] == [("plain", "plain", True), ("ttt", "doc_ttt", True)]
    cfg.eval.compile = False  # every pass, the bench's included, then scores eagerly
    cfg.eval.sliding_stride = 64
    assert {s.scorer for s in passes_from_config(cfg)} == {"eager"}
    assert [s.name for s in passes_from_config(cfg, final_eval=False)] == ["plain"]
    for bad in ({"ttt_lora_targets": "q,z"}, {"ttt_stride": 5000}):
        broken = get_recipe("frontier")
        broken.eval = dataclasses.replace(broken.eval, **bad)
        with pytest.raises(UserError):
            validate_config(broken)


def test_ttt_stride_makes_ttt_the_only_strided_pass():
    model, tokens = tiny_gpt(), doc_stream(140)
    e = EvalConfig(batch_seqs=4, sliding_stride=8, ttt=True, ttt_chunk_tokens=40, ttt_epochs=1, ttt_lr=0.01,
                   ttt_batch_seqs=2)
    by_sliding = evaluate_ttt(model, tokens, lut(), e, 32)
    by_ttt_stride = evaluate_ttt(model, tokens, lut(), dataclasses.replace(e, sliding_stride=0, ttt_stride=8), 32)
    assert by_ttt_stride["nll_sum"] == pytest.approx(by_sliding["nll_sum"], rel=1e-9)
    cfg = recipe_tiny()
    cfg.eval = dataclasses.replace(e, sliding_stride=0, ttt_stride=8)
    run = run_passes(model, tokens, lut(), passes_from_config(cfg))
    assert list(run.results) == ["plain", "ttt"] and set(run.timings) == {"eval_plain_s", "eval_ttt_s"}


def test_the_harness_fails_doc_ttt_that_rescores_a_chunk_after_adapting_on_it(monkeypatch):
    import pgolf.eval.ttt_doc as ttt_doc

    real = ttt_doc.doc_chunk_step

    def rescoring(st, lora, opt, docs, slots, c, n_chunks, cache=None):  # planted: score, adapt, score again
        real(st, lora, opt, docs, slots, c, n_chunks)
        real(st, lora, opt, docs, slots, c, [0] * len(n_chunks))

    monkeypatch.setattr(ttt_doc, "doc_chunk_step", rescoring)
    model, tokens = tiny_gpt(), doc_stream()
    results = {r.name: r for r in run_legality_checks(lambda: model, tokens, lut(),
                                                      lambda m, t, lu, **kw: run_pass(m, t, lu, doc_spec(), **kw),
                                                      audit_row=None, val_pattern="none_*")}
    assert not results["score_before_update"].passed and "scored 2 times" in results["score_before_update"].detail


def test_compiled_doc_ttt_step_equals_the_eager_one_with_one_dynamic_graph(monkeypatch):
    """eval.ttt_doc_compile: the chunk steps after each batch's first run through one graph, dynamic in rows
    and width (a lone row doubled, gradients on), and give the eager pass's scores and updates. The CPU test
    compiles with aot_eager (Dynamo and AOTAutograd's graphs, not Inductor's code, which takes ~2 min here)."""
    from torch._dynamo.utils import counters

    import pgolf.eval.scoring as scoring

    compile_fn = torch.compile
    monkeypatch.setattr(scoring.torch, "compile", lambda fn, **kw: compile_fn(fn, **{**kw, "backend": "aot_eager"}))
    scoring.reset_shared_compiles()
    torch._dynamo.reset()
    counters.clear()
    model, tokens = tiny_gpt(), doc_stream()
    eager = run_pass(model, tokens, lut(), doc_spec(), return_per_token=True)
    spec = dataclasses.replace(doc_spec(ttt_doc_compile=True), scorer="compiled")
    compiled = run_pass(model, tokens, lut(), spec, return_per_token=True)
    scoring.reset_shared_compiles()
    assert counters["stats"]["unique_graphs"] == 1 and compiled["compile_s"] > 0
    assert compiled["updates"] == eager["updates"] > 0 and compiled["phases"] == eager["phases"] == 2
    assert compiled["nll_sum"] == pytest.approx(eager["nll_sum"], rel=1e-6)
    assert torch.allclose(compiled["per_token_nll"][1:], eager["per_token_nll"][1:], atol=1e-5)


def test_redrawn_adapters_equal_a_new_set_of_the_same_seed():
    model = tiny_gpt()
    lora = BatchedLora(model, 2, 3, 3.0, parse_lora_targets("q,v,mlp,head"), seed=0)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(1.0)
    lora.reset(False, torch.Generator().manual_seed(5))
    fresh = BatchedLora(model, 2, 3, 3.0, parse_lora_targets("q,v,mlp,head"), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(lora.parameters(), fresh.parameters(), strict=True))


def test_doc_ttt_past_its_time_limit_scores_every_token_without_adapting():
    model, tokens = tiny_gpt(), doc_stream()
    limited = run_pass(model, tokens, lut(), doc_spec(ttt_time_limit_s=1e-9))
    unadapted = run_pass(model, tokens, lut(), doc_spec(ttt_phases=0, ttt_lr=0.0, ttt_weight_decay=0.0))
    assert limited["updates"] == limited["phases"] == 0 and limited["tokens"] == tokens.numel() - 1
    assert limited["nll_sum"] == pytest.approx(unadapted["nll_sum"], rel=1e-9)


def test_the_runner_logs_each_pass_and_doc_ttt_progress(monkeypatch):
    import pgolf.eval.ttt_doc as ttt_doc

    monkeypatch.setattr(ttt_doc, "PROGRESS_EVERY_S", 0.0)
    lines = []
    run = run_passes(tiny_gpt(), doc_stream(), lut(), [doc_spec()], log=lines.append)
    steps = [line for line in lines if line.startswith("doc TTT: step ")]
    assert lines[0].startswith("eval pass ttt (doc_ttt, 240 tokens)")
    assert steps[-1].startswith(f"doc TTT: step {len(steps)}/{len(steps)}, ") and "documents, bpb so far" in steps[-1]
    assert lines[-1].startswith(f"eval pass ttt: val_bpb {run.results['ttt'].val_bpb:.5f} in ")


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_doc_ttt_on_cuda_matches_the_eager_pass_on_the_frontier_blocks(scope):
    """eval.ttt_doc_compile with Inductor on CUDA, both compile scopes, against the eager step (bf16 autocast
    in both: the scores agree to rounding, and every update runs)."""
    model, e = small_frontier("cuda")
    tokens = doc_stream()
    eager = run_pass(model, tokens, lut(), PassSpec("ttt", "doc_ttt", 32, eval_cfg=e, scorer="eager"))
    spec = PassSpec("ttt", "doc_ttt", 32, eval_cfg=dataclasses.replace(e, ttt_doc_compile=True, compile_scope=scope),
                    scorer="compiled", compile_scope=scope)
    compiled = run_pass(model, tokens, lut(), spec)
    assert compiled["compile_s"] > 0 and compiled["updates"] == eager["updates"] > 0
    assert compiled["nll_sum"] == pytest.approx(eager["nll_sum"], rel=2e-3)
