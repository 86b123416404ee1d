"""A tiny causal language model that follows the model contract, for the eval tests and harness self-checks.

`model(x)` gives float32 logits (B, T, V); `model(x, y, reduction="none")` the per-token NLL (B, T).
One causal self-attention layer and an MLP, all matrices `nn.Linear`, so that LoRA adapters attach to it.
Like pgolf.model.gpt.GPT it offers the head split `forward_hidden` / `head_logits` of pgolf.eval.scoring.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class EvalToyModel(nn.Module):
    def __init__(self, vocab_size: int = 64, dim: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(2 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            self.tok_emb.weight.mul_(math.sqrt(dim))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(x)
        b, t, d = h.shape
        q, k, v = self.qkv(F.rms_norm(h, (d,))).split(d, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return h + self.out(F.relu(self.fc(F.rms_norm(h, (d,)))).square())

    def forward_hidden(self, input_ids: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        h = self.hidden(input_ids)
        return h if keep is None else h[:, h.size(1) - keep:]

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(F.rms_norm(hidden, (hidden.shape[-1],))).float()

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor | None = None, reduction: str = "mean"):
        logits = self.head_logits(self.forward_hidden(input_ids))
        if target_ids is None:
            return logits
        nll = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction=reduction)
        return nll.view(target_ids.shape) if reduction == "none" else nll
