"""Token streams for training and the validation tokens, read through `read_shard` (so FILE_AUDIT sees them).

`TrainTokenStream` walks the sorted training shards front to back and wraps around forever, as the
challenge's loader, except that one optimizer step's span (global batch + 1 tokens) is shared by all ranks
and micro-steps, each keeping its own rows: the batches do not depend on how the global batch is split into
ranks x micro-steps (the challenge's loader shifts each rank's slice by one token per rank).

`CoprimeShardStream` (data.sampler=coprime) is PR #1176's multi-shard sampler, the training data of #1062:
each global batch is a set of (seq_len + 1)-token windows drawn from several shards at once, each shard
walked block by block with a random phase, a random start and a stride coprime to its block count, so that
every block of a shard is visited once before any repeats. `train_token_stream` picks the class.
"""

import math
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
        if state.get("sampler", "sequential") != "sequential":
            raise UserError(f"loader state was saved by the {state['sampler']} sampler, not the sequential one")
        if list(state.get("files", [])) != names:
            raise UserError(f"loader state was saved over shards {state.get('files')}, not {names}")
        self.file_idx, self.pos, self._tokens = int(state["file_idx"]), int(state["pos"]), None
        self._span, self._span_key, self._micro = None, None, 0


# The #1176 sampler's schedule: each global batch draws from MIX shards (rising linearly from the first to the
# second value over MIX_BATCHES batches), picked without replacement with probability proportional to
# (blocks the shard has left in its walk) ** ALPHA (falling from the first to the second value meanwhile).
COPRIME_MIX = (8, 32)
COPRIME_ALPHA = (0.9, 0.5)
COPRIME_MIX_BATCHES = 1800
FNV64_OFFSET, FNV64_PRIME = 0xCBF29CE484222325, 0x100000001B3


def fnv1a_64(text: str) -> int:
    """The 64-bit FNV-1a hash of text's UTF-8 bytes."""
    h = FNV64_OFFSET
    for byte in text.encode():
        h = ((h ^ byte) * FNV64_PRIME) % 2**64
    return h


class CoprimeShardStream:
    """next_batch / next_doc_batch / state_dict of TrainTokenStream over the #1176 multi-shard sampler.

    Every random choice comes from a generator seeded by (FNV-1a of the shard names, what it is for), so
    the stream is a function of the shard set and two counters per shard: the state is the number of global
    batches drawn and, per shard, its walk's epoch and blocks visited.
    - A shard's walk (epoch e): phase < seq_len, blocks of seq_len tokens from there (each window is a block
      plus the next token), start block and a stride coprime to the block count; a walk that has visited
      every block starts the next epoch (a new phase, start and stride).
    - Global batch b: MIX shards picked (COPRIME_* schedule), the batch's windows split between them as
      evenly as possible, each shard's share its next blocks in walk order.
    - Window w of the batch goes to piece w mod (world_size * grad_accum); micro-step m of rank r is piece
      m * world_size + r, as TrainTokenStream's pieces. A rank reads only its own windows.
    Every shard is opened (memory-mapped and checked) when the stream is built, before the timed loop: the
    first batches touch most of them, and the sequential stream's one-at-a-time opening would stall there.
    """

    def __init__(self, pattern_or_files, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in [0, world_size={world_size})")
        self.files = resolve_shard_files(pattern_or_files)
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self._tokens = [read_shard(p, vocab_size) for p in self.files]
        self.counts = [int(t.size) for t in self._tokens]
        self.seed = fnv1a_64("\n".join(p.name for p in self.files))
        self.seq_len = 0  # fixed by the first batch
        self.batches = 0
        self.epochs = [0] * len(self.files)
        self.visited = [0] * len(self.files)
        self._walks: dict[int, tuple[int, int, int, int]] = {}  # shard -> (phase, blocks, start, stride)
        self._plan = None  # the current step's [(shard, token offset)], until its last micro-step
        self._plan_key = None
        self._micro = 0

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**63, *key])

    def _walk(self, shard: int) -> tuple[int, int, int, int]:
        if shard not in self._walks:
            rng = self._rng(1, shard, self.epochs[shard])
            n, t = self.counts[shard], self.seq_len
            phase = int(rng.integers(0, max(1, min(t, n - t))))
            blocks = (n - phase - 1) // t
            start = int(rng.integers(0, blocks))
            stride = 1
            while blocks > 2:
                stride = int(rng.integers(1, blocks))
                if math.gcd(stride, blocks) == 1:
                    break
            self._walks[shard] = (phase, blocks, start, stride)
        return self._walks[shard]

    def _next_block(self, shard: int) -> int:
        """The token offset of the shard's next window; a finished walk starts the next epoch."""
        phase, blocks, start, stride = self._walk(shard)
        offset = phase + ((start + self.visited[shard] * stride) % blocks) * self.seq_len
        self.visited[shard] += 1
        if self.visited[shard] == blocks:
            self.epochs[shard] += 1
            self.visited[shard] = 0
            self._walks.pop(shard)
        return offset

    def _plan_batch(self, windows: int) -> list[tuple[int, int]]:
        """The global batch's windows: (shard, token offset), grouped by shard."""
        usable = [i for i, n in enumerate(self.counts) if n >= self.seq_len + 1]
        if not usable:
            raise UserError(f"no training shard holds {self.seq_len + 1} tokens: {self.files[0].parent}")
        frac = min(self.batches / COPRIME_MIX_BATCHES, 1.0)
        mix = round(COPRIME_MIX[0] + frac * (COPRIME_MIX[1] - COPRIME_MIX[0]))
        mix = min(mix, len(usable), windows)
        alpha = COPRIME_ALPHA[0] + frac * (COPRIME_ALPHA[1] - COPRIME_ALPHA[0])
        left = np.array([self._walk(i)[1] - self.visited[i] for i in usable], dtype=np.float64)
        weights = left ** alpha
        rng = self._rng(2, self.batches)
        picked = rng.choice(len(usable), size=mix, replace=False, p=weights / weights.sum())
        self.batches += 1
        plan = []
        for j, k in enumerate(sorted(int(p) for p in picked)):
            share = windows // mix + (1 if j < windows % mix else 0)
            plan.extend((usable[k], self._next_block(usable[k])) for _ in range(share))
        return plan

    def _window(self, shard: int, offset: int) -> np.ndarray:
        return np.asarray(self._tokens[shard][offset:offset + self.seq_len + 1], dtype=np.int64)

    def next_batch(self, batch_tokens: int, seq_len: int, grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for one micro-step, of shape (local_tokens // seq_len, seq_len) (class docstring)."""
        pieces = self.world_size * grad_accum
        local_tokens = batch_tokens // pieces
        if local_tokens <= 0 or local_tokens % seq_len:
            raise UserError(f"batch_tokens={batch_tokens} / (world_size={self.world_size} * grad_accum={grad_accum})"
                            f" = {local_tokens} is not a positive multiple of seq_len={seq_len}")
        if self.seq_len and seq_len != self.seq_len:
            raise UserError(f"the coprime sampler walks {self.seq_len}-token blocks; next_batch asked for {seq_len}")
        self.seq_len = seq_len
        if self._micro == 0:
            self._plan = self._plan_batch(batch_tokens // seq_len)
            self._plan_key = (batch_tokens, grad_accum)
        elif self._plan_key != (batch_tokens, grad_accum):
            raise UserError(f"next_batch(batch_tokens={batch_tokens}, grad_accum={grad_accum}) in the middle of a step "
                            f"of (batch_tokens, grad_accum) = {self._plan_key}")
        piece = self._micro * self.world_size + self.rank
        rows = torch.from_numpy(np.stack([self._window(*w) for w in self._plan[piece::pieces]]))
        self._micro = (self._micro + 1) % grad_accum
        if self._micro == 0:
            self._plan = None
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def next_doc_batch(self, batch_tokens: int, seq_len: int,
                       grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self.next_batch(batch_tokens, seq_len, grad_accum)
        return x, y, batch_document_ids(x)

    def state_dict(self) -> dict:
        """Where the stream stands between optimizer steps (UserError in the middle of one)."""
        if self._micro:
            raise UserError(f"loader state asked for after {self._micro} micro-step(s) of an optimizer step")
        return {"files": [p.name for p in self.files], "sampler": "coprime", "seq_len": self.seq_len,
                "batches": self.batches, "epochs": list(self.epochs), "visited": list(self.visited)}

    def load_state_dict(self, state: dict) -> None:
        names = [p.name for p in self.files]
        if list(state.get("files", [])) != names or state.get("sampler") != "coprime":
            raise UserError(f"loader state was saved by a {state.get('sampler', 'sequential')} sampler over shards "
                            f"{state.get('files')}, not the coprime sampler over {names}")
        self.seq_len, self.batches = int(state["seq_len"]), int(state["batches"])
        self.epochs, self.visited = [int(e) for e in state["epochs"]], [int(v) for v in state["visited"]]
        self._walks, self._plan, self._plan_key, self._micro = {}, None, None, 0


def train_token_stream(sampler: str, pattern_or_files, rank: int = 0, world_size: int = 1,
                       vocab_size: int | None = None):
    """The training stream of data.sampler: sequential (TrainTokenStream) or coprime (CoprimeShardStream)."""
    if sampler == "sequential":
        return TrainTokenStream(pattern_or_files, rank, world_size, vocab_size)
    if sampler == "coprime":
        return CoprimeShardStream(pattern_or_files, rank, world_size, vocab_size)
    raise UserError(f"data.sampler={sampler!r} is not one of sequential|coprime")


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
