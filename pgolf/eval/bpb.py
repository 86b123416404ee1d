"""Validation loss and bits per byte, and the plain (non-overlapping windows) evaluation.

val_loss is the mean NLL in nats over every scored target token; val_bpb = val_loss / ln 2 * tokens / bytes,
i.e. the summed NLL in bits divided by the UTF-8 bytes the scored tokens stand for (pgolf.data.bytes).
Sums are float64 and counts int64, all-reduced across ranks; a result carries the NLL sum (nats) as well.
Positions are "prediction positions": position i predicts token i + 1 from tokens 0..i, so a stream of n
tokens has n - 1 targets.
"""

import math
import time

import torch

from pgolf.data.bytes import ByteSidecar, target_byte_counts
from pgolf.dist import is_dist_active
from pgolf.errors import UserError
from pgolf.eval.scoring import WindowScorer, check_compile_scope, check_scorer, eval_autocast, model_device


class BpbAccumulator:
    """Running float64 NLL sum and int64 token and byte counts, on the scoring device."""

    def __init__(self, device="cpu"):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # tokens, bytes

    def add(self, nll_sum, tokens: int, n_bytes: int) -> None:
        self.loss_sum += nll_sum
        self.counts[0] += int(tokens)
        self.counts[1] += int(n_bytes)

    def all_reduce(self) -> None:
        if is_dist_active():
            torch.distributed.all_reduce(self.loss_sum)
            torch.distributed.all_reduce(self.counts)

    def result(self) -> dict:
        loss_sum = float(self.loss_sum.item())
        tokens, n_bytes = (int(v) for v in self.counts.tolist())
        val_loss = loss_sum / tokens if tokens else float("nan")
        val_bpb = loss_sum / math.log(2.0) / n_bytes if n_bytes else float("nan")
        return {"val_loss": val_loss, "val_bpb": val_bpb, "tokens": tokens, "bytes": n_bytes, "nll_sum": loss_sum}


class PerTokenScores:
    """NLL of each target token (index = the target's position in the stream; NaN = not scored) and how
    many times each was scored, for the legality checks."""

    def __init__(self, n_tokens: int):
        self.nll = torch.full((n_tokens,), float("nan"), dtype=torch.float64)
        self.count = torch.zeros(n_tokens, dtype=torch.int32)

    def record(self, target_pos: torch.Tensor, nll: torch.Tensor) -> None:
        self.nll[target_pos] = nll.detach().double().cpu()
        self.count.index_add_(0, target_pos, torch.ones_like(target_pos, dtype=torch.int32))

    def as_dict(self) -> dict:
        return {"per_token_nll": self.nll, "per_token_count": self.count}


def score_token_nll(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (B, T) as float32, through the model contract's reduction="none" path."""
    with eval_autocast(x.device):
        nll = model(x, y, reduction="none")
    return nll.float()


def check_eval_inputs(val_tokens: torch.Tensor, seq_len: int, batch_seqs: int) -> None:
    if val_tokens.dim() != 1 or val_tokens.numel() < 2:
        raise UserError(f"validation tokens must be a 1-D stream of at least 2 tokens, got shape "
                        f"{tuple(val_tokens.shape)}")
    if seq_len < 1:
        raise UserError(f"eval seq_len={seq_len} must be at least 1")
    if batch_seqs < 1:
        raise UserError(f"eval batch_seqs={batch_seqs} must be at least 1")


def stream_byte_cumsum(val_tokens: torch.Tensor, lut) -> torch.Tensor:
    """cum[i] = bytes of targets 1..i (prediction positions 0..i-1), int64, length n; for range sums. `lut` is a
    ByteLUT or a ByteSidecar (pgolf.data.bytes) of exactly this stream's positions."""
    n = val_tokens.numel()
    if isinstance(lut, ByteSidecar) and lut.token_bytes.numel() != n:
        raise UserError(f"the byte sidecar holds {lut.token_bytes.numel():,} values but the validation stream has "
                        f"{n:,} tokens: they must be cut at the same positions")
    pos = torch.arange(1, n, device=val_tokens.device)
    per_target = target_byte_counts(val_tokens[:-1], val_tokens[1:], lut.to(val_tokens.device), pos).long()
    return torch.cat([torch.zeros(1, dtype=torch.int64), per_target.cpu().cumsum(0)])


def lut_bytes_report(val_tokens: torch.Tensor, lut, windows, nll_sum: float) -> dict:
    """With a ByteSidecar: the tokenizer LUT's bytes over the same scored targets (the windows' score_from+1
    .. end, every rank's) and the bpb they would give, as "lut_bytes" and "lut_bpb"; {} with a ByteLUT."""
    if not isinstance(lut, ByteSidecar) or not windows:
        return {}
    cum = stream_byte_cumsum(val_tokens.cpu().long(), lut.lut)
    table = torch.tensor(windows, dtype=torch.int64).view(-1, 3)
    n_bytes = int((cum[table[:, 2]] - cum[table[:, 1]]).sum())
    return {"lut_bytes": n_bytes, "lut_bpb": nll_sum / math.log(2.0) / n_bytes if n_bytes else float("nan")}


def rank_span(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n_items."""
    return n_items * rank // world_size, n_items * (rank + 1) // world_size


def score_rows(model, x, y, mask, acc: BpbAccumulator, n_bytes: int, target_pos=None, per_token=None,
               inspect=None) -> None:
    """Score one batch: add the masked NLL to acc; record per-token scores (target_pos: CPU (B, T) int64)."""
    device = model_device(model)
    x, y, mask_d = x.to(device), y.to(device), mask.to(device)
    nll = score_token_nll(model, x, y)
    acc.add(torch.where(mask_d, nll.double(), 0.0).sum(), int(mask.sum()), n_bytes)
    if per_token is not None:
        per_token.record(target_pos[mask], nll.cpu()[mask])
    if inspect is not None:
        inspect(model, x, y, nll, mask_d)


def plain_windows(n_tokens: int, seq_len: int) -> list[tuple[int, int, int]]:
    """The plain evaluation's windows as (start, score_from, end): seq_len predictions each, all scored, the
    last one shorter when seq_len does not divide the n_tokens - 1 targets."""
    n_pred = n_tokens - 1
    return [(s, s, min(s + seq_len, n_pred)) for s in range(0, n_pred, seq_len)]


def score_plain_reference(model, tokens: torch.Tensor, seq_len: int, batch_seqs: int, lo: int, hi: int,
                          byte_cum: torch.Tensor, acc: BpbAccumulator, per_token=None, inspect=None) -> None:
    """The reference path of evaluate_plain: windows lo..hi-1, batches gathered on the host, full forwards."""
    n_pred = tokens.numel() - 1
    n_full = n_pred // seq_len
    for b0 in range(lo, min(hi, n_full), batch_seqs):
        rows = min(batch_seqs, min(hi, n_full) - b0)
        pos = (torch.arange(b0, b0 + batch_seqs) * seq_len)[:, None] + torch.arange(seq_len)[None]
        pos = pos.clamp_max(n_pred - 1)  # padding rows past the end point at valid tokens
        mask = (torch.arange(batch_seqs) < rows)[:, None].expand(batch_seqs, seq_len)
        n_bytes = int(byte_cum[(b0 + rows) * seq_len] - byte_cum[b0 * seq_len])
        score_rows(model, tokens[pos], tokens[pos + 1], mask, acc, n_bytes, pos + 1, per_token, inspect)
    if hi > n_full:  # this rank holds the tail window, shorter than seq_len
        pos = torch.arange(n_full * seq_len, n_pred)[None]
        n_bytes = int(byte_cum[n_pred] - byte_cum[n_full * seq_len])
        mask = torch.ones_like(pos, dtype=torch.bool)
        score_rows(model, tokens[pos], tokens[pos + 1], mask, acc, n_bytes, pos + 1, per_token, inspect)


def evaluate_plain(model, val_tokens: torch.Tensor, lut, seq_len: int, batch_seqs: int, rank: int = 0,
                   world_size: int = 1, return_per_token: bool = False, inspect=None, scorer: str = "auto",
                   compile_scope: str = "model") -> dict:
    """Non-overlapping seq_len windows, each with no earlier context; the last partial window is scored too.

    Windows are split across ranks; full windows run batch_seqs at a time, the last batch padded to a fixed
    shape. `inspect(model, x, y, nll, mask)`, if given, sees every scored batch (legality probes). `scorer`
    picks the path (pgolf.eval.scoring: auto | compiled | eager | reference), `compile_scope` what a compile
    covers (model | blocks).
    """
    check_eval_inputs(val_tokens, seq_len, batch_seqs)

    def reference(tokens, lo, hi, byte_cum, acc, per_token):
        score_plain_reference(model, tokens, seq_len, batch_seqs, lo, hi, byte_cum, acc, per_token, inspect)

    return evaluate_windows(model, val_tokens, lut, plain_windows(val_tokens.numel(), seq_len), seq_len,
                            batch_seqs, rank, world_size, return_per_token, inspect, scorer, reference, compile_scope)


def evaluate_windows(model, val_tokens: torch.Tensor, lut, windows, keep: int, batch_seqs: int, rank: int,
                     world_size: int, return_per_token: bool, inspect, scorer: str, reference,
                     compile_scope: str = "model") -> dict:
    """The body shared by the plain and sliding evaluations: this rank's share of `windows` scored under
    inference mode by the fast path (each later window keeps its last `keep` positions) or, for scorer
    "reference", by `reference(tokens, lo, hi, byte_cum, acc, per_token)`; then reduced across ranks."""
    check_scorer(scorer)
    check_compile_scope(compile_scope)
    t0 = time.perf_counter()
    tokens = val_tokens.cpu().long()
    lo, hi = rank_span(len(windows), rank, world_size)
    byte_cum = stream_byte_cumsum(tokens, lut)
    acc = BpbAccumulator(model_device(model))
    per_token = PerTokenScores(tokens.numel()) if return_per_token else None
    was_training = model.training
    model.eval()
    compile_s = 0.0
    with torch.inference_mode():
        if scorer == "reference":
            reference(tokens, lo, hi, byte_cum, acc, per_token)
        else:
            window_scorer = WindowScorer(model, tokens, [windows[lo:hi]], batch_seqs, keep, byte_cum, scorer,
                                         per_token, inspect, compile_scope)
            window_scorer.score_group(0, acc)
            compile_s = window_scorer.forward.first_call_s
    model.train(was_training)
    acc.all_reduce()
    out = acc.result()
    out["seconds"] = time.perf_counter() - t0
    out["compile_s"] = compile_s
    out.update(lut_bytes_report(tokens, lut, windows, out["nll_sum"]))  # after the clock: a report, not scoring
    if per_token is not None:
        out.update(per_token.as_dict())
    return out
