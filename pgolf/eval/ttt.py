"""Score-first test-time training (TTT): adapt a copy of the model only on validation tokens already scored.

The stream is cut into chunks of ttt_chunk_tokens; each sliding window belongs to the chunk that holds the
first target it scores. For each chunk in order: (1) score its windows without gradients, (2) unless it is
the last chunk, train on the chunk's tokens (only tokens whose targets have all been scored by now) for
ttt_epochs epochs, lr = ttt_lr * 0.5 (1 + cos(pi c / (N - 1))). Mode "sgd" adapts every weight of a deep copy by
SGD with momentum; mode "muon" (PR #1062) adapts the same weights by NewtonSchulzStep (each matrix's gradient
orthogonalised, no momentum); both leave the first ttt_freeze_blocks blocks (or only their vectors) as they
are. Mode "lora" adds zero-initialised low-rank adapters to every nn.Linear and adapts only those. The event
trace (score / update, with the update count and the token range) lets
pgolf.eval.legality prove that every token was scored once, before any update that used it.

Scoring goes through pgolf.eval.scoring (the scorer mode of eval.compile, or the `scorer` argument): the stream
on the device, the head on scored positions only, the scoring forward compiled on CUDA. The adaptation step's
forward and backward are compiled too where enough steps share one shape to repay the compile
(TTT_COMPILE_MIN_STEPS); a short last chunk's steps run eagerly.
"""

import copy
import math
import re
import time
from collections import Counter

import torch
from torch import nn

from pgolf.dist import all_reduce_max, is_dist_active
from pgolf.errors import UserError
from pgolf.eval.bpb import (
    BpbAccumulator,
    PerTokenScores,
    check_eval_inputs,
    lut_bytes_report,
    rank_span,
    stream_byte_cumsum,
)
from pgolf.eval.receipts import SecondsSplit
from pgolf.eval.scoring import (
    StaticShapeCompile,
    WindowScorer,
    check_compile_scope,
    check_scorer,
    compile_min_count,
    eval_autocast,
    model_device,
    scorer_for,
    signatures_to_compile,
)
from pgolf.eval.sliding import score_windows, sliding_windows
from pgolf.optim.muon import newton_schulz5

# On one H100 (docs/benchmarks.md) a cold compile of the record model's forward and backward took 57 s, and a
# step of 16 x 2048 tokens then took 33 ms instead of 89 ms eagerly: ~1,000 steps repay it. The default 3
# epochs over the 98 adapted chunks of wiki-sp1024 make 294 (eager); FineWeb's 1,892 make 5,676 (compiled).
TTT_COMPILE_MIN_STEPS = 1024
BLOCK_PARAM = re.compile(r"(?:^|\.)blocks\.(\d+)\.")  # a parameter of block N, under any wrapper's prefix


class TttLoraAdapter(nn.Module):
    """delta(x) = (x A^T) B^T with B = 0 at the start, so the adapted model begins equal to the base."""

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.to(x.dtype).t()) @ self.b.to(x.dtype).t()


def attach_lora_adapters(model: nn.Module, rank: int) -> tuple[list[nn.Parameter], list]:
    """Hook a TttLoraAdapter onto every nn.Linear (CastedLinear included); return (adapter params, hooks)."""
    if rank < 1:
        raise UserError(f"eval.ttt_lora_rank={rank} must be at least 1")
    gen = torch.Generator().manual_seed(0)
    params, hooks = [], []
    for module in list(model.modules()):
        if not isinstance(module, nn.Linear):
            continue
        adapter = TttLoraAdapter(module.in_features, module.out_features, rank, gen).to(module.weight.device)
        params.extend(adapter.parameters())
        hooks.append(module.register_forward_hook(
            lambda mod, args, out, adapter=adapter: out + adapter(args[0]).to(out.dtype)))
    if not params:
        raise UserError("eval.ttt_mode=lora: the model has no nn.Linear to attach adapters to")
    return params, hooks


class NewtonSchulzStep(torch.optim.Optimizer):
    """TTT's update in eval.ttt_mode=muon (PR #1062): p -= lr * newton_schulz5(grad, ns_steps) for a parameter
    of two or more dims, p -= lr * grad for the others; no momentum, no shape scale, no weight decay."""

    def __init__(self, params, lr: float, ns_steps: int):
        super().__init__(params, {"lr": lr, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad if p.ndim < 2 else newton_schulz5(p.grad, group["ns_steps"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])


def ttt_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The stream TTT's optimizer: NewtonSchulzStep in mode muon, SGD with ttt_momentum otherwise."""
    if cfg.ttt_mode == "muon":
        return NewtonSchulzStep(params, cfg.ttt_lr, cfg.ttt_ns_steps)
    return torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)


def ttt_frozen(name: str, param: nn.Parameter, cfg) -> bool:
    """Whether mode sgd / muon leaves this parameter as it is: it lies in blocks.0 .. blocks.{ttt_freeze_blocks-1}
    (and, with ttt_freeze_scope=vectors, has fewer than two dims)."""
    block = BLOCK_PARAM.search(name)
    in_frozen_block = block is not None and int(block.group(1)) < cfg.ttt_freeze_blocks
    return in_frozen_block and (cfg.ttt_freeze_scope == "all" or param.ndim < 2)


def ttt_sum_grads(params: list[nn.Parameter]) -> None:
    """Sum the adapted parameters' grads over ranks (one flat buffer); no-op on one process."""
    if not is_dist_active():
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def ttt_chunk_windows(windows, chunk_tokens: int, n_chunks: int) -> list[list[tuple[int, int, int]]]:
    """Windows grouped by the chunk that holds the first target they score (target = score_from + 1)."""
    groups = [[] for _ in range(n_chunks)]
    for w in windows:
        groups[min((w[1] + 1) // chunk_tokens, n_chunks - 1)].append(w)
    return groups


def ttt_window_stride(cfg, seq_len: int) -> int:
    """The stride of TTT's scoring windows: eval.ttt_stride, else eval.sliding_stride, else seq_len (so that with
    sliding_stride=0 and ttt_stride=64 the TTT pass is the only strided scoring pass)."""
    return cfg.ttt_stride or cfg.sliding_stride or seq_len


def ttt_lr_at(chunk: int, n_chunks: int, base_lr: float) -> float:
    if n_chunks <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (n_chunks - 1)))


def ttt_step_nll_sum(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed NLL of one adaptation batch, through the model's training forward."""
    return model(x, y, reduction="none").float().sum()


def ttt_step_shape_counts(cfg, seq_len: int, n_chunks: int, rank: int, world_size: int) -> Counter:
    """{(rows, length): steps} of this rank's adaptation steps on full chunks over a whole run (a short last
    chunk's steps are not counted: they run eagerly)."""
    usable = cfg.ttt_chunk_tokens - 1
    length = min(seq_len, usable)
    shapes = Counter()
    if length < 1:
        return shapes
    n_seqs = usable // length
    for a in range(0, n_seqs, cfg.ttt_batch_seqs):
        r0, r1 = rank_span(min(a + cfg.ttt_batch_seqs, n_seqs) - a, rank, world_size)
        if r1 > r0:
            shapes[(r1 - r0, length)] += (n_chunks - 1) * cfg.ttt_epochs
    return shapes


def ttt_train_chunk(model, params, opt, tokens, lo: int, hi: int, seq_len: int, cfg, rank: int,
                    world_size: int, trace: list, chunk: int, updates: int, step=None) -> int:
    """ttt_epochs epochs over non-overlapping sequences of tokens[lo:hi]; returns the new update count.

    tokens may live on the host or on the model's device; step((rows, length), model, x, y), if given, is
    the summed NLL of a batch (a StaticShapeCompile of ttt_step_nll_sum), else ttt_step_nll_sum eagerly."""
    length = min(seq_len, hi - lo - 1)
    if length < 1:
        return updates
    n_seqs = (hi - lo - 1) // length
    device = model_device(model)
    cols = torch.arange(length, device=tokens.device)
    model.train()
    for _ in range(cfg.ttt_epochs):
        for a in range(0, n_seqs, cfg.ttt_batch_seqs):
            b = min(a + cfg.ttt_batch_seqs, n_seqs)
            r0, r1 = rank_span(b - a, rank, world_size)
            opt.zero_grad(set_to_none=False)
            if r1 > r0:
                pos = lo + (torch.arange(a + r0, a + r1, device=tokens.device) * length)[:, None] + cols
                x, y = tokens[pos].to(device), tokens[pos + 1].to(device)
                with eval_autocast(device):
                    if step is None:
                        nll_sum = ttt_step_nll_sum(model, x, y)
                    else:
                        nll_sum = step((r1 - r0, length), model, x, y)
                # the mean over all ranks' tokens of this step, once the grads are summed over ranks
                (nll_sum / ((b - a) * length)).backward()
            ttt_sum_grads(params)
            if cfg.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            opt.step()
            updates += 1
            trace.append({"event": "update", "chunk": chunk, "updates": updates,
                          "first": lo + a * length, "last": lo + b * length})
    return updates


def prepare_ttt_model(model, cfg) -> tuple[nn.Module, list[nn.Parameter]]:
    """A deep copy of the model and the parameters TTT adapts on it (the weights outside the frozen blocks, or
    LoRA adapters)."""
    work = copy.deepcopy(model)
    if cfg.ttt_mode in ("sgd", "muon"):
        params = []
        for name, p in work.named_parameters():
            p.requires_grad_(not ttt_frozen(name, p, cfg))
            if p.requires_grad:
                params.append(p)
        if not params:
            raise UserError(f"eval.ttt_freeze_blocks={cfg.ttt_freeze_blocks} leaves TTT nothing to adapt")
    elif cfg.ttt_mode == "lora":
        for p in work.parameters():
            p.requires_grad_(False)
        params, _ = attach_lora_adapters(work, cfg.ttt_lora_rank)
    else:
        raise UserError(f"eval.ttt_mode={cfg.ttt_mode!r} is not sgd|muon|lora")
    for p in params:
        p.grad = torch.zeros_like(p)
    return work, params


def ttt_step_compile(cfg, seq_len: int, n_chunks: int, scorer: str, device, rank: int,
                     world_size: int) -> StaticShapeCompile:
    """The adaptation step's summed NLL, compiled for the step shapes that occur often enough to repay a
    compile, or that this process has compiled already (pgolf.eval.warmup)."""
    min_count = compile_min_count(scorer, device, TTT_COMPILE_MIN_STEPS)
    shapes = ttt_step_shape_counts(cfg, seq_len, n_chunks, rank, world_size)
    compiled = signatures_to_compile(ttt_step_nll_sum, cfg.compile_scope, shapes, min_count)
    return StaticShapeCompile(ttt_step_nll_sum, compiled, "TTT step", cfg.compile_scope)


def ttt_chunk_scorer(work, tokens, parts: list, cfg, stride: int, byte_cum, scorer: str, per_token, inspect):
    """(score, forward): score(c, acc) scores this rank's windows of chunk c (parts[c]) through the reference
    or the fast path; forward is the fast path's StaticShapeCompile (None on the reference path)."""
    if scorer == "reference":
        return (lambda c, acc: score_windows(work, tokens, parts[c], cfg.batch_seqs, byte_cum, acc, per_token,
                                             inspect)), None
    window_scorer = WindowScorer(work, tokens, parts, cfg.batch_seqs, stride, byte_cum, scorer, per_token, inspect,
                                 cfg.compile_scope)
    return window_scorer.score_group, window_scorer.forward


def ttt_time_split(timer: SecondsSplit, score_forward) -> dict:
    """Where this rank's TTT seconds went: scoring ("score_s"; of it "compile_s", the first call of each
    compiled scoring shape, as in the plain and sliding results), the adaptation of the first adapted chunk
    (which compiles the step's forward and backward) and that of the other chunks."""
    split = {name: timer.elapsed(name) for name in ("score_s", "adapt_first_chunk_s", "adapt_s")}
    split["compile_s"] = score_forward.first_call_s if score_forward is not None else 0.0
    return split


def evaluate_ttt(model, val_tokens: torch.Tensor, lut, cfg, seq_len: int, rank: int = 0, world_size: int = 1,
                 return_per_token: bool = False, inspect=None, scorer: str | None = None) -> dict:
    """Score-first TTT over sliding windows (stride ttt_window_stride); `cfg` is an
    EvalConfig. The result adds "chunks", "updates", "adapted_chunks" and the event "trace". `scorer`
    (pgolf.eval.scoring's modes) overrides the one eval.compile picks; "reference" also adapts eagerly."""
    check_eval_inputs(val_tokens, seq_len, cfg.batch_seqs)
    if cfg.ttt_chunk_tokens < 1:
        raise UserError(f"eval.ttt_chunk_tokens={cfg.ttt_chunk_tokens} must be at least 1")
    scorer = check_scorer(scorer or scorer_for(cfg))
    check_compile_scope(cfg.compile_scope)
    t0 = time.perf_counter()
    tokens = val_tokens.cpu().long()
    n = tokens.numel()
    stride = ttt_window_stride(cfg, seq_len)
    windows = sliding_windows(n, seq_len, stride)
    n_chunks = max(1, math.ceil(n / cfg.ttt_chunk_tokens))
    groups = ttt_chunk_windows(windows, cfg.ttt_chunk_tokens, n_chunks)
    parts = [group[slice(*rank_span(len(group), rank, world_size))] for group in groups]
    byte_cum = stream_byte_cumsum(tokens, lut)
    work, params = prepare_ttt_model(model, cfg)
    device = model_device(work)
    stream = tokens if scorer == "reference" else tokens.to(device)
    per_token = PerTokenScores(n) if return_per_token else None
    score_chunk, score_forward = ttt_chunk_scorer(work, stream, parts, cfg, stride, byte_cum, scorer, per_token,
                                                  inspect)
    step = None if scorer == "reference" else ttt_step_compile(cfg, seq_len, n_chunks, scorer, device, rank,
                                                                world_size)
    opt = ttt_optimizer(params, cfg)
    acc = BpbAccumulator(device)
    trace, updates, adapted, scored_upto, adapting = [], 0, 0, 0, True
    timer = SecondsSplit()
    for c, group in enumerate(groups):
        work.eval()
        with timer.phase("score_s"), torch.inference_mode():  # as evaluate_sliding's scoring
            score_chunk(c, acc)
        if group:
            scored_upto = group[-1][2]  # the last target scored so far
            trace.append({"event": "score", "chunk": c, "updates": updates,
                          "first": group[0][1] + 1, "last": scored_upto})
        if c == n_chunks - 1:
            break
        if adapting and cfg.ttt_time_limit_s > 0:  # the scoring phase's end synchronised: the clock sees its work
            adapting = all_reduce_max(time.perf_counter() - t0) <= cfg.ttt_time_limit_s
            if not adapting:
                trace.append({"event": "stop_adapting", "chunk": c, "updates": updates})
        if not adapting:
            continue
        for g in opt.param_groups:
            g["lr"] = ttt_lr_at(c, n_chunks, cfg.ttt_lr)
        chunk_lo = c * cfg.ttt_chunk_tokens
        chunk_hi = min((c + 1) * cfg.ttt_chunk_tokens, scored_upto + 1)
        before = updates
        with timer.phase("adapt_first_chunk_s" if adapted == 0 else "adapt_s"):
            updates = ttt_train_chunk(work, params, opt, stream, chunk_lo, chunk_hi, seq_len, cfg, rank,
                                      world_size, trace, c, updates, step)
        adapted += updates > before
    acc.all_reduce()
    out = acc.result()
    out.update({"seconds": time.perf_counter() - t0, "chunks": n_chunks, "updates": updates,
                "adapted_chunks": adapted, "trace": trace})
    out.update(ttt_time_split(timer, score_forward))
    out.update(lut_bytes_report(tokens, lut, windows, out["nll_sum"]))
    if per_token is not None:
        out.update(per_token.as_dict())
    return out
