"""Score-first test-time training (TTT): adapt a copy of the model only on validation tokens already scored.

The stream is cut into chunks of ttt_chunk_tokens; each sliding window belongs to the chunk that holds the
first target it scores. For each chunk in order: (1) score its windows without gradients, (2) unless it is
the last chunk, train on the chunk's tokens (only tokens whose targets have all been scored by now) for
ttt_epochs epochs of SGD with momentum, lr = ttt_lr * 0.5 (1 + cos(pi c / (N - 1))). Mode "sgd" adapts every
weight of a deep copy; mode "lora" adds zero-initialised low-rank adapters to every nn.Linear and adapts only
those. The event trace (score / update, with the update count and the token range) lets
pgolf.eval.legality prove that every token was scored once, before any update that used it.
"""

import copy
import math
import time

import torch
from torch import nn

from pgolf.dist import all_reduce_max, is_dist_active
from pgolf.errors import UserError
from pgolf.eval.bpb import (
    BpbAccumulator,
    PerTokenScores,
    check_eval_inputs,
    eval_autocast,
    model_device,
    rank_span,
    stream_byte_cumsum,
)
from pgolf.eval.sliding import score_windows, sliding_windows


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


def ttt_lr_at(chunk: int, n_chunks: int, base_lr: float) -> float:
    if n_chunks <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (n_chunks - 1)))


def ttt_train_chunk(model, params, opt, tokens, lo: int, hi: int, seq_len: int, cfg, rank: int,
                    world_size: int, trace: list, chunk: int, updates: int) -> int:
    """ttt_epochs epochs over non-overlapping sequences of tokens[lo:hi]; returns the new update count."""
    length = min(seq_len, hi - lo - 1)
    if length < 1:
        return updates
    n_seqs = (hi - lo - 1) // length
    device = model_device(model)
    model.train()
    for _ in range(cfg.ttt_epochs):
        for a in range(0, n_seqs, cfg.ttt_batch_seqs):
            b = min(a + cfg.ttt_batch_seqs, n_seqs)
            r0, r1 = rank_span(b - a, rank, world_size)
            pos = lo + (torch.arange(a + r0, a + r1) * length)[:, None] + torch.arange(length)[None]
            opt.zero_grad(set_to_none=False)
            if r1 > r0:
                x, y = tokens[pos].to(device), tokens[pos + 1].to(device)
                with eval_autocast(device):
                    nll = model(x, y, reduction="none")
                # the mean over all ranks' tokens of this step, once the grads are summed over ranks
                (nll.float().sum() / ((b - a) * length)).backward()
            ttt_sum_grads(params)
            if cfg.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            opt.step()
            updates += 1
            trace.append({"event": "update", "chunk": chunk, "updates": updates,
                          "first": lo + a * length, "last": lo + b * length})
    return updates


def prepare_ttt_model(model, cfg) -> tuple[nn.Module, list[nn.Parameter]]:
    """A deep copy of the model and the parameters TTT adapts on it (all weights, or LoRA adapters)."""
    work = copy.deepcopy(model)
    if cfg.ttt_mode == "sgd":
        params = list(work.parameters())
        for p in params:
            p.requires_grad_(True)
    elif cfg.ttt_mode == "lora":
        for p in work.parameters():
            p.requires_grad_(False)
        params, _ = attach_lora_adapters(work, cfg.ttt_lora_rank)
    else:
        raise UserError(f"eval.ttt_mode={cfg.ttt_mode!r} is not sgd|lora")
    for p in params:
        p.grad = torch.zeros_like(p)
    return work, params


def evaluate_ttt(model, val_tokens: torch.Tensor, lut, cfg, seq_len: int, rank: int = 0, world_size: int = 1,
                 return_per_token: bool = False, inspect=None) -> dict:
    """Score-first TTT over sliding windows (stride cfg.sliding_stride, or seq_len when 0); `cfg` is an
    EvalConfig. The result adds "chunks", "updates", "adapted_chunks" and the event "trace"."""
    check_eval_inputs(val_tokens, seq_len, cfg.batch_seqs)
    if cfg.ttt_chunk_tokens < 1:
        raise UserError(f"eval.ttt_chunk_tokens={cfg.ttt_chunk_tokens} must be at least 1")
    t0 = time.perf_counter()
    tokens = val_tokens.cpu().long()
    n = tokens.numel()
    windows = sliding_windows(n, seq_len, cfg.sliding_stride or seq_len)
    n_chunks = max(1, math.ceil(n / cfg.ttt_chunk_tokens))
    groups = ttt_chunk_windows(windows, cfg.ttt_chunk_tokens, n_chunks)
    byte_cum = stream_byte_cumsum(tokens, lut)
    work, params = prepare_ttt_model(model, cfg)
    opt = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    acc = BpbAccumulator(model_device(work))
    per_token = PerTokenScores(n) if return_per_token else None
    trace, updates, adapted, scored_upto, adapting = [], 0, 0, 0, True
    for c, group in enumerate(groups):
        lo, hi = rank_span(len(group), rank, world_size)
        work.eval()
        with torch.no_grad():
            score_windows(work, tokens, group[lo:hi], cfg.batch_seqs, byte_cum, acc, per_token, inspect)
        if group:
            scored_upto = group[-1][2]  # the last target scored so far
            trace.append({"event": "score", "chunk": c, "updates": updates,
                          "first": group[0][1] + 1, "last": scored_upto})
        if c == n_chunks - 1:
            break
        if adapting and cfg.ttt_time_limit_s > 0:
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
        updates = ttt_train_chunk(work, params, opt, tokens, chunk_lo, chunk_hi, seq_len, cfg, rank, world_size,
                                  trace, c, updates)
        adapted += updates > before
    acc.all_reduce()
    out = acc.result()
    out.update({"seconds": time.perf_counter() - t0, "chunks": n_chunks, "updates": updates,
                "adapted_chunks": adapted, "trace": trace})
    if per_token is not None:
        out.update(per_token.as_dict())
    return out
