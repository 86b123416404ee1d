"""Keys and values of the positions a GPT has already read, so that a forward can take only the new ones
(GPT.forward_hidden(new_ids, cache=...)): document TTT's cached context (eval.ttt_doc_context=cache).

A forward through a cache reads rows of T new tokens that continue each row's earlier ones. Every virtual
layer's attention takes the new positions' queries against the cached keys and values followed by the new
ones (causal at the bottom right, as the `keep` forward), then stores the new keys and values, detached: a
backward never reaches an earlier forward. The cache keeps a block window: before a forward of T positions it
holds at most `window - T` earlier ones, so that each new position reads at most `window` keys, as a window
of `window` tokens ending with the new ones would (document TTT's chunk window, pgolf.eval.ttt_doc).
RoPE runs at each position's place in its row (`offset`; RoPE is relative, so a query and key read as in a
window of their own, up to the rounding of larger angles), and the features that read earlier tokens see
the last CONTEXT_IDS tokens of the earlier forwards (`last_ids`).

With no earlier forward, and no more positions than `window`, the cached forwards of a row give the same
outputs as one forward of the whole row, up to float rounding (tests/test_kv_cache.py).
"""

import torch

# The embedding's reach back: BigramHash reads the previous token, SmearGate v2 the previous embedding (its
# bigram included), SmearGate the previous smeared one: a position's input depends on 3 tokens before it.
CONTEXT_IDS = 3


class LayerKV:
    """One virtual layer's cached keys and values, (R, S, kv_heads, head_dim) each, or None before any."""

    def __init__(self, window: int):
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the new positions read (at most `window - T` earlier ones, then the T new),
        and the new ones stored, detached, for the next forward."""
        window = self.window
        if self.k is None:
            k, v = k_new, v_new
        else:
            start = max(0, self.k.size(1) - max(0, window - k_new.size(1)))
            k = torch.cat((self.k[:, start:], k_new), dim=1)
            v = torch.cat((self.v[:, start:], v_new), dim=1)
        start = max(0, k.size(1) - (window - 1))  # a later forward of one position or more reads these at most
        self.k, self.v = k[:, start:].detach(), v[:, start:].detach()
        return k, v


class KVCache:
    """The cached context of R rows: one LayerKV per virtual layer, the rows' positions read so far
    (`offset`) and their last CONTEXT_IDS tokens (`last_ids`, (R, <= CONTEXT_IDS))."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"KVCache: window={window} must be at least 1")
        self.window = window
        self.layers: dict[int, LayerKV] = {}
        self.offset = 0
        self.last_ids: torch.Tensor | None = None

    def layer(self, position: int) -> LayerKV:
        """The cache of virtual layer `position` (made on first use)."""
        return self.layers.setdefault(position, LayerKV(self.window))

    def advance(self, input_ids: torch.Tensor) -> None:
        """After a forward of input_ids (R, T): T more positions read, the last CONTEXT_IDS tokens kept."""
        self.offset += input_ids.size(1)
        ids = input_ids if self.last_ids is None else torch.cat((self.last_ids, input_ids), dim=1)
        self.last_ids = ids[:, -CONTEXT_IDS:]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A cache of these rows alone (indices into this one's rows), sharing nothing it could change."""
        out = KVCache(self.window)
        out.offset = self.offset
        out.last_ids = None if self.last_ids is None else self.last_ids.index_select(0, rows)
        for position, kv in self.layers.items():
            new = out.layer(position)
            if kv.k is not None:
                new.k, new.v = kv.k.index_select(0, rows), kv.v.index_select(0, rows)
        return out
