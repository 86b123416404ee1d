"""Token streams for training and the validation tokens, read through `read_shard` (so FILE_AUDIT sees them).

`TrainTokenStream` walks the sorted training shards front to back and wraps around forever, as the
challenge's loader, except that one micro-step's span (global micro-batch + 1 tokens) is shared by all ranks,
each keeping its own rows: the batches do not depend on the number of ranks (the challenge's loader shifts
each rank's slice by one token per rank).
"""

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import read_shard, resolve_shard_files
from pgolf.errors import UserError


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

        All ranks read the same span of batch_tokens / grad_accum + 1 tokens and rank r keeps rows
        [r * rows, (r + 1) * rows) of its sequences, so the global batch is the same on any number of ranks.
        """
        local_tokens = batch_tokens // (self.world_size * grad_accum)
        if local_tokens <= 0 or local_tokens % seq_len:
            raise UserError(f"batch_tokens={batch_tokens} / (world_size={self.world_size} * grad_accum={grad_accum})"
                            f" = {local_tokens} is not a positive multiple of seq_len={seq_len}")
        micro_tokens = local_tokens * self.world_size
        chunk = torch.from_numpy(self._take(micro_tokens + 1))
        start = self.rank * local_tokens
        x = chunk[start:start + local_tokens]
        y = chunk[start + 1:start + local_tokens + 1]
        return x.reshape(-1, seq_len), y.reshape(-1, seq_len)

    def state_dict(self) -> dict:
        return {"files": [p.name for p in self.files], "file_idx": self.file_idx, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        names = [p.name for p in self.files]
        if list(state.get("files", [])) != names:
            raise UserError(f"loader state was saved over shards {state.get('files')}, not {names}")
        self.file_idx, self.pos, self._tokens = int(state["file_idx"]), int(state["pos"]), None


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
