"""Compile the evaluation's graphs before its timed passes, on random tokens (eval.precompile).

A cold compile is a large part of a short evaluation: on one H100 the record model's block-wise scoring forward
took 22 s to compile and the TTT step's forward and backward about 57 s whole (docs/benchmarks.md), against 28 s
of sliding-window scoring. `warm_eval_compiles` runs each signature the passes will compile in bulk once,
through the process's shared compiled callables (pgolf.eval.scoring.shared_compile), on a copy of the model
and on tokens drawn from a seeded generator: no validation file is opened and nothing of the model changes.
The passes then find those signatures compiled (scoring.WARM_SIGNATURES) and compile them even where too few
calls would repay a cold compile (TTT's 294 steps on wiki-sp1024).

`pgolf train` runs it in the untimed warm-up beside the training step's compile, before any training token is
read, and records its seconds as the phase "compile_warmup_eval"; `pgolf eval` runs it in its setup and
reports it there. Either way the time is shown, never hidden in another figure.
"""

import copy
import dataclasses
import time

import torch

from pgolf.dist import cuda_sync
from pgolf.eval.documents import doc_isolated
from pgolf.eval.scoring import (
    StaticShapeCompile,
    check_scorer,
    compile_min_count,
    eval_autocast,
    model_device,
    scorer_for,
    scoring_function,
)
from pgolf.eval.ttt import prepare_ttt_model, ttt_step_nll_sum, ttt_step_shape_counts, ttt_window_stride

WARMUP_SEED = 0


def nothing_compiled() -> dict:
    return {"seconds": 0.0, "scoring": [], "ttt_step": []}


def eval_compile_plan(cfg, seq_len: int, rank: int = 0, world_size: int = 1) -> dict:
    """The signatures the evaluations of `cfg` (an EvalConfig) run in bulk, from the config alone:
    "scoring": (length, keep) of the scoring forward: whole windows (the plain pass; the first window of the
    sliding and TTT passes) and, with a stride, the sliding windows; "ttt_step": (rows, length) of TTT's
    steps over full chunks (a short last chunk runs eagerly)."""
    # document TTT compiles its one dynamic graph in its pass (eval.ttt_doc_compile), counted in its seconds
    stream_ttt = cfg.ttt and cfg.ttt_mode != "doc_lora"
    scoring = {(seq_len, seq_len)}
    for on, stride in ((cfg.sliding_stride > 0, cfg.sliding_stride), (stream_ttt, ttt_window_stride(cfg, seq_len))):
        if on and stride < seq_len:
            scoring.add((seq_len, stride))
    # the shapes of a full chunk's steps do not depend on the number of chunks: any count above 1 gives them
    steps = set(ttt_step_shape_counts(cfg, seq_len, 2, rank, world_size)) if stream_ttt else set()
    return {"scoring": sorted(scoring), "ttt_step": sorted(steps)}


def random_batch(shape: tuple, vocab_size: int, generator: torch.Generator, device) -> tuple:
    """Inputs and targets as the passes give them: two fresh row-major tensors (Dynamo guards on whether
    they alias, and on strides, a size-1 dimension's too)."""
    return tuple(torch.randint(vocab_size, shape, generator=generator).to(device) for _ in range(2))


def warm_eval_compiles(model, cfg, seq_len: int, vocab_size: int, rank: int = 0, world_size: int = 1,
                       scorer: str | None = None) -> dict:
    """Compile the plan's signatures (eval_compile_plan) on copies of `model`; {"seconds", "scoring",
    "ttt_step"}: what was compiled. Nothing happens where the scorer (eval.compile's, or `scorer`) does not
    compile on the model's device. The callers run it when eval.precompile is on."""
    scorer = check_scorer(scorer or scorer_for(cfg))
    device = model_device(model)
    if compile_min_count(scorer, device, 1) is None:
        return nothing_compiled()
    t0 = time.perf_counter()
    plan = eval_compile_plan(cfg, seq_len, rank, world_size)
    gen = torch.Generator().manual_seed(WARMUP_SEED)
    probe = doc_isolated(copy.deepcopy(model).eval(), cfg.doc_isolated)  # the function the passes score with
    forward = StaticShapeCompile(scoring_function(probe), plan["scoring"], "scoring forward", cfg.compile_scope)
    with torch.inference_mode():
        for length, keep in plan["scoring"]:
            x, y = random_batch((cfg.batch_seqs, length), vocab_size, gen, device)
            with eval_autocast(device):
                forward((length, keep), probe, x, y, keep)
    del probe
    if plan["ttt_step"]:
        work, _ = prepare_ttt_model(model, cfg)
        work.train()
        step = StaticShapeCompile(ttt_step_nll_sum, plan["ttt_step"], "TTT step", cfg.compile_scope)
        for rows, length in plan["ttt_step"]:
            x, y = random_batch((rows, length), vocab_size, gen, device)
            with eval_autocast(device):
                loss = step((rows, length), work, x, y)
            loss.backward()  # compiles the backward graph too
        del work
    cuda_sync()
    return {"seconds": time.perf_counter() - t0, **plan}


def warm_configured_eval(model, cfg, rank: int = 0, world_size: int = 1, final_eval: bool = True) -> dict:
    """warm_eval_compiles for the evaluations a RunConfig runs, when its eval.precompile is on (else nothing,
    {"seconds": 0.0, ...}); final_eval=False: a run that ends without its sliding and TTT passes."""
    e = cfg.eval if final_eval else dataclasses.replace(cfg.eval, sliding_stride=0, ttt=False)
    if not e.precompile:
        return nothing_compiled()
    return warm_eval_compiles(model, e, e.seq_len or cfg.train.seq_len, cfg.model.vocab_size, rank, world_size)
