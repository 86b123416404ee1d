"""Token streams for training and the validation tokens, read through `read_shard` (so FILE_AUDIT sees them).

`TrainTokenStream` walks the sorted training shards front to back and wraps around forever, as the
challenge's loader, except that one optimizer step's span (global batch + 1 tokens) is shared by all ranks
and micro-steps, each keeping its own rows: the batches do not depend on how the global batch is split into
ranks x micro-steps (the challenge's loader shifts each rank's slice by one token per rank).
"""

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import read_shard, resolve_shard_files
from pgolf.errors import UserError

TRAIN_BOS_ID = 1  # the BOS id of the challenge tokenizers: it opens every document of the shards


def batch_document_ids(x: torch.Tensor, bos_id: int = TRAIN_BOS_ID) -> torch.Tensor:
    """Document ids (B, T) int32 of a batch of rows: per row, the number of BOS tokens up to and including
    each position, so ids are non-decreasing, every BOS opens a new id, and the tokens of a row that starts
    inside a document (before its first BOS) share id 0. Rows are independent: a document that crosses a
    row boundary is two segments, as the record cuts documents longer than its rows (2,048)."""
    return torch.cumsum(x == bos_id, dim=1, dtype=torch.int32)


class TrainTokenStream:
    """Deterministic, rank-disjoint, resumable stream of (x, y) training batches."""

    def __init__(self, pattern_or_files, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in [0, world_size={world_size})")
        self.files = resolve_shard_files(pattern_or_files)
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.file_idx = 0
        self.pos = 0
        self._tokens = None
        self._span = None  # the current step's tokens, until its last micro-step has read them
        self._span_key = None  # (batch_tokens, grad_accum) the span was read for
        self._micro = 0  # micro-steps of the current step already handed out

    def _current(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = read_shard(self.files[self.file_idx], self.vocab_size)
        return self._tokens

    def _take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled, empty_files = 0, 0
        while filled < n:
            tokens = self._current()
            avail = tokens.size - self.pos
            if avail <= 0:
                empty_files = empty_files + 1 if tokens.size == 0 else 0
                if empty_files > len(self.files):
                    raise UserError(f"all training shards are empty: {self.files[0].parent}")
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.pos, self._tokens = 0, None
                continue
            k = min(n - filled, avail)
            out[filled:filled + k] = tokens[self.pos:self.pos + k]
            self.pos += k
            filled += k
        return out

    def next_batch(self, batch_tokens: int, seq_len: int, grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for one micro-step: int64 CPU tensors of shape (local_tokens // seq_len, seq_len).

        The first micro-step of an optimizer step reads a span of batch_tokens + 1 tokens. It is cut into
        world_size * grad_accum pieces of local_tokens; micro-step m of rank r keeps piece m * world_size + r.
        So one rank with grad_accum = N and N ranks with grad_accum = 1 train on the same sequences, step for
        step, and every micro-step's pieces tile one contiguous stretch across the ranks.
        """
        local_tokens = batch_tokens // (self.world_size * grad_accum)
        if local_tokens <= 0 or local_tokens % seq_len:
            raise UserError(f"batch_tokens={batch_tokens} / (world_size={self.world_size} * grad_accum={grad_accum})"
                            f" = {local_tokens} is not a positive multiple of seq_len={seq_len}")
        if self._micro == 0:
            self._span = torch.from_numpy(self._take(batch_tokens + 1))
            self._span_key = (batch_tokens, grad_accum)
        elif self._span_key != (batch_tokens, grad_accum):
            raise UserError(f"next_batch(batch_tokens={batch_tokens}, grad_accum={grad_accum}) in the middle of a step "
                            f"of (batch_tokens, grad_accum) = {self._span_key}")
        start = (self._micro * self.world_size + self.rank) * local_tokens
        x = self._span[start:start + local_tokens]
        y = self._span[start + 1:start + local_tokens + 1]
        self._micro = (self._micro + 1) % grad_accum
        if self._micro == 0:
            self._span = None
        return x.reshape(-1, seq_len), y.reshape(-1, seq_len)

    def next_doc_batch(self, batch_tokens: int, seq_len: int,
                       grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """next_batch's (x, y) and the document ids of x (batch_document_ids), for train.doc_mask. The ids
        come from x alone, so the stream's state, resume and rank split are next_batch's."""
        x, y = self.next_batch(batch_tokens, seq_len, grad_accum)
        return x, y, batch_document_ids(x)

    def state_dict(self) -> dict:
        """Where the stream stands between optimizer steps (UserError in the middle of one)."""
        if self._micro:
            raise UserError(f"loader state asked for after {self._micro} micro-step(s) of an optimizer step")
        return {"files": [p.name for p in self.files], "file_idx": self.file_idx, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        names = [p.name for p in self.files]
        if list(state.get("files", [])) != names:
            raise UserError(f"loader state was saved over shards {state.get('files')}, not {names}")
        self.file_idx, self.pos, self._tokens = int(state["file_idx"]), int(state["pos"]), None
        self._span, self._span_key, self._micro = None, None, 0


def load_val_tokens(pattern_or_files, vocab_size: int | None = None, max_tokens: int = 0) -> torch.Tensor:
    """The validation shards concatenated in sorted order, as one int64 tensor; with max_tokens > 0 only the
    first max_tokens of them (the whole stream when it is shorter)."""
    if max_tokens < 0:
        raise UserError(f"max_tokens={max_tokens} must be >= 0 (0 = every validation token)")
    files = resolve_shard_files(pattern_or_files)
    parts, total = [], 0
    for path in files:
        if max_tokens and total >= max_tokens:
            break
        part = np.asarray(read_shard(Path(path), vocab_size), dtype=np.int64)
        parts.append(part)
        total += part.size
    tokens = np.concatenate(parts)
    return torch.from_numpy(tokens[:max_tokens] if max_tokens else tokens)
