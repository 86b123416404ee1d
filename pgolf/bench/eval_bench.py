"""Evaluation throughput: tokens/s of pgolf.eval's sliding-window and score-first TTT evaluations.

Each evaluation runs as a run's finish does, through the same PassSpec (pgolf.eval.runner): the uncompiled
model, eval.seq_len (or train.seq_len), the EvalConfig's stride, batch sizes, chunks and epochs, eval.compile
and eval.doc_isolated, windows split over the ranks. The stream is the first
n tokens of the validation shards, or seeded random tokens without data. One short untimed pass first warms
up kernels and allocations (for TTT it covers one adapted chunk). Bytes come from a table of one byte per
token: a benchmark's bpb means nothing, so none is reported. tokens/s = scored target tokens / seconds.
With eval.precompile (the `record` recipe) the passes' graphs are compiled first, as a run's warm-up does
before training ("precompile_s", outside the passes); without it the warm-up stream is too short for "auto"
to compile the bulk scoring shape, so the timed pass compiles it: its seconds include that compile, as an
evaluation's do. Either way "compile_s" says how much of a pass's seconds compiling took (TTT adds its
scoring, first-chunk and other adaptation seconds).
"""

import time
from pathlib import Path

import torch

from pgolf.config import RunConfig
from pgolf.data.bytes import ByteLUT
from pgolf.data.loader import load_val_tokens
from pgolf.data.shards import FILE_AUDIT
from pgolf.dist import DistEnv, cuda_sync
from pgolf.eval.warmup import warm_configured_eval


def uniform_byte_lut(vocab_size: int) -> ByteLUT:
    """Every token one byte, no spaces, no boundaries."""
    return ByteLUT(base_bytes=torch.ones(vocab_size, dtype=torch.int16),
                   has_space=torch.zeros(vocab_size, dtype=torch.bool),
                   is_boundary=torch.zeros(vocab_size, dtype=torch.bool))


def bench_eval_tokens(cfg: RunConfig, n_tokens: int, val_files: list[Path] | None) -> torch.Tensor:
    """The first n_tokens of the validation shards (FILE_AUDIT phase "eval"), or seeded random ids."""
    if val_files:
        with FILE_AUDIT.phase("eval"):
            return load_val_tokens(val_files, vocab_size=cfg.model.vocab_size)[:n_tokens]
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return torch.randint(0, cfg.model.vocab_size, (n_tokens,), generator=generator)


def timed_throughput(run) -> dict:
    """Run one evaluation between device synchronizes; its scored tokens, seconds and tokens/s."""
    cuda_sync()
    start = time.perf_counter()
    res = run()
    cuda_sync()
    seconds = time.perf_counter() - start
    return {"tokens": res["tokens"], "seconds": seconds, "tokens_per_s": res["tokens"] / seconds, "result": res}


def configured_pass(cfg: RunConfig, name: str):
    """The PassSpec `name` of the config's passes (pgolf.eval.runner): the same spec a run's finish scores with,
    eval.compile and eval.doc_isolated included."""
    from pgolf.eval.runner import passes_from_config

    return {spec.name: spec for spec in passes_from_config(cfg)}[name]


def bench_pass(model, cfg: RunConfig, tokens: torch.Tensor, denv: DistEnv, name: str, warm_tokens: int) -> tuple:
    """One untimed short run of the pass, then the timed one: (throughput dict, the pass's result)."""
    from pgolf.eval.runner import run_pass

    spec = configured_pass(cfg, name)
    lut = uniform_byte_lut(cfg.model.vocab_size)
    run_pass(model, tokens[:warm_tokens], lut, spec, denv.rank, denv.world_size)
    out = timed_throughput(lambda: run_pass(model, tokens, lut, spec, denv.rank, denv.world_size))
    return out, out.pop("result")


def bench_sliding(model, cfg: RunConfig, tokens: torch.Tensor, denv: DistEnv) -> dict:
    e = cfg.eval
    seq_len = e.seq_len or cfg.train.seq_len
    out, res = bench_pass(model, cfg, tokens, denv, "sliding", seq_len + e.sliding_stride * e.batch_seqs + 1)
    out.update({"seq_len": seq_len, "stride": e.sliding_stride, "batch_seqs": e.batch_seqs,
                "windows": res["windows"], "compile_s": res["compile_s"]})
    return out


def bench_ttt(model, cfg: RunConfig, tokens: torch.Tensor, denv: DistEnv) -> dict:
    e = cfg.eval
    seq_len = e.seq_len or cfg.train.seq_len
    if e.ttt_mode == "doc_lora":
        out, res = bench_pass(model, cfg, tokens, denv, "ttt", seq_len + 1)
        out.update({"seq_len": seq_len, "mode": e.ttt_mode, "chunk": e.ttt_doc_chunk, "doc_batch": e.ttt_doc_batch})
        out.update({k: res[k] for k in ("documents", "phases", "updates", "score_adapt_s", "global_s")})
        return out
    out, res = bench_pass(model, cfg, tokens, denv, "ttt", e.ttt_chunk_tokens + seq_len + 1)
    out.update({"seq_len": seq_len, "stride": e.ttt_stride or e.sliding_stride or seq_len, "mode": e.ttt_mode,
                "epochs": e.ttt_epochs, "chunk_tokens": e.ttt_chunk_tokens, "chunks": res["chunks"],
                "adapted_chunks": res["adapted_chunks"], "updates": res["updates"]})
    out.update({k: res[k] for k in ("compile_s", "score_s", "adapt_first_chunk_s", "adapt_s")})
    return out


def bench_eval(model, cfg: RunConfig, denv: DistEnv, n_tokens: int, val_files: list[Path] | None = None) -> dict:
    """tokens/s of the sliding and TTT evaluations the config enables (a "skipped" reason for the others)."""
    tokens = bench_eval_tokens(cfg, n_tokens, val_files)
    out = {"stream_tokens": int(tokens.numel()), "data": "val shards" if val_files else "random tokens"}
    if cfg.eval.precompile:
        out["precompile_s"] = warm_configured_eval(model, cfg, denv.rank, denv.world_size)["seconds"]
    if cfg.eval.sliding_stride > 0:
        out["sliding"] = bench_sliding(model, cfg, tokens, denv)
    else:
        out["sliding"] = {"skipped": "eval.sliding_stride=0 (--set eval.sliding_stride=64 to bench it)"}
    if cfg.eval.ttt:
        out["ttt"] = bench_ttt(model, cfg, tokens, denv)
    else:
        out["ttt"] = {"skipped": "eval.ttt=false (--set eval.ttt=true to bench it)"}
    return out
