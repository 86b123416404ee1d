"""Input-side features: SmearGate and SmearGate v2 (both BOS-masked), BigramHash and the shared value embedding.

BOS masking (model.bos_mask, on by default): the smear gates and BigramHash treat position 0 and every BOS
token as a document start, so nothing of one document reaches the next. The seed systems #493, #535 and
#1176/#1062 mask position 0 only; `bos_mask=False` reproduces them (it lets the previous document's last
token into a BOS position's features).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.layers import CastedLinear

SMEAR_BOS_ID = 1  # the SentencePiece BOS id of the challenge tokenizers; documents start with it
BIGRAM_MUL_CUR = 36313
BIGRAM_MUL_PREV = 27191


def document_start_mask(input_ids: torch.Tensor, bos_mask: bool = True) -> torch.Tensor:
    """True where a position has no previous token in its document: position 0 and every BOS token
    (position 0 alone with bos_mask=False, as the seed systems' scripts)."""
    first = torch.arange(input_ids.size(1), device=input_ids.device) == 0
    if not bos_mask:
        return first.expand_as(input_ids)
    return (input_ids == SMEAR_BOS_ID) | first


class SmearGate(nn.Module):
    """x_t <- (1 - s) * x_t + s * x_{t-1} with s = sigmoid(gate) per dimension (gate init 0, so s = 0.5).

    A position with no previous token in its document (position 0 or a BOS token) stays as it is, so
    nothing of one document reaches the next through the smear (with bos_mask=False only position 0).
    """

    def __init__(self, dim: int, bos_mask: bool = True):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        self.bos_mask = bos_mask

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        keep_own = document_start_mask(input_ids, self.bos_mask).unsqueeze(-1)
        s = torch.sigmoid(self.gate).to(x.dtype)
        smeared = x + s * (prev - x)
        return torch.where(keep_own, x, smeared)


class SmearGateV2(nn.Module):
    """The frontier's SmearGate (frontier.md §3.1): e_t <- e_t + g_t * e_{t-1}, g_t = lam * sigmoid(w . e_t[:window]).

    It acts on the raw embedding, before the input RMSNorm, with one input-dependent scalar gate per position
    and a learned magnitude lam. Position 0 and every BOS position keep their own embedding, so nothing of one
    document reaches the next. w (1, window) and lam (1,) start at zero: the identity, lam gets a gradient
    first and w once lam moves. Both are plain parameters (not CastedLinear), so they fall into the scalar
    AdamW group and the artifact keeps them as fp16 passthrough, as in the record.
    """

    def __init__(self, window: int, bos_mask: bool = True):
        super().__init__()
        self.window = window
        self.bos_mask = bos_mask
        self.weight = nn.Parameter(torch.zeros(1, window))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        cur = x[:, 1:]
        gate = torch.sigmoid(F.linear(cur[..., : self.window], self.weight.to(x.dtype)))
        g = self.lam.to(x.dtype) * gate
        smeared = g * x[:, :-1]
        if self.bos_mask:
            smeared = smeared * (input_ids[:, 1:] != SMEAR_BOS_ID).to(x.dtype).unsqueeze(-1)
        return torch.cat((x[:, :1], cur + smeared), dim=1)


def bigram_bucket_ids(input_ids: torch.Tensor, buckets: int, bos_mask: bool = True) -> torch.Tensor:
    """(36313 * t_i XOR 27191 * t_{i-1}) mod (buckets - 1); positions with no previous token get buckets - 1.

    "No previous token" is position 0 and, beyond the reference hash, every BOS position, so that a
    document's features never depend on the document before it; with bos_mask=False position 0 only (the
    reference hash).
    """
    ids = input_ids.long()
    prev = torch.cat((torch.zeros_like(ids[:, :1]), ids[:, :-1]), dim=1)
    hashed = torch.bitwise_xor(BIGRAM_MUL_CUR * ids, BIGRAM_MUL_PREV * prev) % (buckets - 1)
    return torch.where(document_start_mask(input_ids, bos_mask), torch.full_like(hashed, buckets - 1), hashed)


class BigramHash(nn.Module):
    """A hashed bigram embedding added to the token embedding: scale * proj(table[bucket(t_{i-1}, t_i)]).

    The table starts at zero, so the feature starts as a no-op; the projection is not zero-initialized
    (GPT.init_weights gives it the block matrices' init), because a zero table behind a zero projection
    never receives a gradient.
    """

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_mask: bool = True):
        super().__init__()
        if buckets < 2:
            raise ValueError(f"bigram_buckets={buckets} must be at least 2")
        self.buckets = buckets
        self.bos_mask = bos_mask
        self.embed = nn.Embedding(buckets, dim)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))
        nn.init.zeros_(self.embed.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(bigram_bucket_ids(input_ids, self.buckets, self.bos_mask))
        return self.proj(h) * self.scale.to(h.dtype)


class ValueEmbedding(nn.Module):
    """One token table shared by the value-embedding layers: scale * proj(table[t]), of width kv_dim.

    Each layer that uses it multiplies it by its own learnable scale (held by GPT) and adds it to v.
    """

    def __init__(self, vocab_size: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = CastedLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))
        nn.init.normal_(self.embed.weight, std=0.01)
        nn.init.zeros_(self.proj.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.proj(h) * self.scale.to(h.dtype)
