"""Sliding-window evaluation: every target is scored once, with at least seq_len - stride tokens of context.

A window is (start, score_from, end) in prediction positions (position i predicts token i + 1): the model
reads tokens[start:end] and the window scores positions score_from..end-1, i.e. targets score_from+1..end.
The first window scores all of its positions; each later one scores at most its last `stride`. The windows'
scored ranges tile 0..n-2 exactly, so the tail is never dropped: the last window keeps its start and is cut
short (it scores fewer than `stride` positions, with the same seq_len - stride context as the others). With
stride == seq_len the windows are exactly those of the plain evaluation.

`score_windows` is the reference path; by default the windows go through pgolf.eval.scoring's WindowScorer
(same batches, the head on each window's scored positions only, compiled on CUDA).
"""

import torch

from pgolf.errors import UserError
from pgolf.eval.bpb import (
    BpbAccumulator,
    PerTokenScores,
    check_eval_inputs,
    evaluate_windows,
    score_rows,
)


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The (start, score_from, end) windows that score each of the n_tokens - 1 targets exactly once."""
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise UserError(f"sliding stride={stride} must be in 1..seq_len (seq_len={seq_len})")
    n_pred = n_tokens - 1
    if n_pred < 1:
        return []
    first_end = min(seq_len, n_pred)
    windows = [(0, 0, first_end)]
    pos = first_end
    while pos < n_pred:
        end = min(pos + stride, n_pred)
        windows.append((pos + stride - seq_len, pos, end))
        pos = end
    return windows


def score_windows(model, tokens: torch.Tensor, windows, batch_seqs: int, byte_cum: torch.Tensor,
                  acc: BpbAccumulator, per_token: PerTokenScores | None = None, inspect=None) -> None:
    """Score windows in order, batch_seqs at a time, windows of the same length together; the last batch of
    each length is padded to batch_seqs rows so that shapes stay fixed (compiled models)."""
    i = 0
    while i < len(windows):
        length = windows[i][2] - windows[i][0]
        j = i
        while j < len(windows) and j - i < batch_seqs and windows[j][2] - windows[j][0] == length:
            j += 1
        batch = windows[i:j]
        i = j
        starts = torch.tensor([w[0] for w in batch] + [batch[0][0]] * (batch_seqs - len(batch)))
        offsets = torch.tensor([w[1] - w[0] for w in batch] + [length] * (batch_seqs - len(batch)))
        pos = starts[:, None] + torch.arange(length)[None]
        mask = torch.arange(length)[None] >= offsets[:, None]
        n_bytes = sum(int(byte_cum[w[2]] - byte_cum[w[1]]) for w in batch)
        score_rows(model, tokens[pos], tokens[pos + 1], mask, acc, n_bytes, pos + 1, per_token, inspect)


def evaluate_sliding(model, val_tokens: torch.Tensor, lut, seq_len: int, stride: int, batch_seqs: int,
                     rank: int = 0, world_size: int = 1, return_per_token: bool = False, inspect=None,
                     scorer: str = "auto", compile_scope: str = "model") -> dict:
    """Sliding-window val loss and bpb; windows split across ranks, under inference mode. `scorer` picks the
    path (pgolf.eval.scoring: auto | compiled | eager | reference), `compile_scope` what a compile covers."""
    check_eval_inputs(val_tokens, seq_len, batch_seqs)
    windows = sliding_windows(val_tokens.numel(), seq_len, stride)

    def reference(tokens, lo, hi, byte_cum, acc, per_token):
        score_windows(model, tokens, windows[lo:hi], batch_seqs, byte_cum, acc, per_token, inspect)

    out = evaluate_windows(model, val_tokens, lut, windows, stride, batch_seqs, rank, world_size,
                           return_per_token, inspect, scorer, reference, compile_scope)
    out["windows"] = len(windows)
    return out
