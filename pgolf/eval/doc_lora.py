"""Batched per-document LoRA adapters for document TTT (eval.ttt_mode=doc_lora; frontier.md §8.4).

Every adapted linear map W gets, per document slot b of a batch, delta_b(x) = (x A_b^T) B_b^T * alpha / rank with
A (slots, rank, in) uniform in +-1/sqrt(in) and B (slots, out, rank) zero, so each document starts from the
unadapted model. The batch of a forward is matched to the slots element-wise through `rows` (the slots of the
batch's rows: the active documents, or one slot for a legality probe). Since AdamW is element-wise and the loss a
sum over documents, one optimizer trains each document's slice on that document's loss alone.

Targets (eval.ttt_lora_targets): q, k, v, o (attention c_q, c_k, c_v, proj), mlp (the MLP's fc and proj) and head
(final-normed hidden -> logits, added before the softcap). pgolf adapts each linear map where the record adds its
O and MLP adapters parallel to the whole attention / MLP; a looped layer shares one adapter across its passes.
"""

import math

import torch
from torch import nn

from pgolf.config_rules import EVAL_LORA_TARGETS
from pgolf.errors import UserError
from pgolf.eval.scoring import cached_nll

MODULE_TARGETS = {"attn.c_q": "q", "attn.c_k": "k", "attn.c_v": "v", "attn.proj": "o", "mlp.fc": "mlp",
                  "mlp.proj": "mlp"}


def parse_lora_targets(text: str) -> tuple[str, ...]:
    """"q,k,v,o,mlp,head" -> the tuple; a clear error for an unknown or empty list."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in EVAL_LORA_TARGETS]
    if bad or not names:
        raise UserError(f"eval.ttt_lora_targets={text!r}: give a comma list of {','.join(EVAL_LORA_TARGETS)}")
    return names


class SlotAdapter(nn.Module):
    """A (slots, rank, in) and B (slots, out, rank) of one linear map."""

    def __init__(self, slots: int, in_features: int, out_features: int, rank: int, generator, device):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        a = (torch.rand(slots, rank, in_features, generator=generator) * 2 - 1) * bound
        self.a = nn.Parameter(a.to(device))
        self.b = nn.Parameter(torch.zeros(slots, out_features, rank, device=device))

    def delta(self, x: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """x (R, T, in) -> (R, T, out) for the slots `rows` (R of them, or one broadcast over the batch)."""
        a, b = self.a[rows].to(x.dtype), self.b[rows].to(x.dtype)
        return torch.matmul(torch.matmul(x, a.transpose(1, 2)), b.transpose(1, 2)) * scale


class BatchedLora:
    """The adapters of one model for `slots` documents; attach() hooks them in, detach() takes them out."""

    def __init__(self, model: nn.Module, slots: int, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0):
        if rank < 1:
            raise UserError(f"eval.ttt_lora_rank={rank} must be at least 1")
        gen = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        self.model, self.slots, self.scale = model, slots, alpha / rank
        self.rows = torch.arange(slots, device=device)
        self.adapters: list[tuple[nn.Module, SlotAdapter]] = []
        for name, module in model.named_modules():
            kind = next((t for suffix, t in MODULE_TARGETS.items() if name.endswith(suffix)), None)
            if kind in targets and isinstance(module, nn.Linear):
                self.adapters.append((module, SlotAdapter(slots, module.in_features, module.out_features, rank, gen,
                                                          device)))
        self.head = None
        if "head" in targets and callable(getattr(model, "head_projection", None)):
            dim, vocab = model.cfg.model_dim, model.cfg.vocab_size
            self.head = SlotAdapter(slots, dim, vocab, rank, gen, device)
        if not self.adapters and self.head is None:
            raise UserError(f"eval.ttt_lora_targets={','.join(targets)}: the model has no such linear map")
        self.hooks = []
        self.active = True  # False: the hooks add nothing (the global phases train the base model alone)

    def parameters(self) -> list[nn.Parameter]:
        mods = [ad for _, ad in self.adapters] + ([self.head] if self.head is not None else [])
        return [p for m in mods for p in m.parameters()]

    def attach(self) -> None:
        for module, adapter in self.adapters:
            self.hooks.append(module.register_forward_hook(
                lambda mod, args, out, ad=adapter: self.add_delta(ad, args[0], out)))
        if self.head is not None:
            base = type(self.model).head_projection.__get__(self.model)
            norm = self.model.final_norm

            def head_projection(hidden):
                return self.add_delta(self.head, norm(hidden), base(hidden))

            self.model.head_projection = head_projection  # an instance attribute over the class's method

    def add_delta(self, adapter: SlotAdapter, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + adapter.delta(x, self.rows, self.scale).to(out.dtype) if self.active else out

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.model.__dict__.pop("head_projection", None)

    @torch.no_grad()
    def reset(self, warm_a: bool, generator: torch.Generator) -> None:
        """B <- 0 (each slot starts from the unadapted model); A kept when warm_a, else drawn afresh, in place
        (a compiled step's guards on the tensors still hold): with a generator seeded s, as a new
        BatchedLora(..., seed=s) draws them."""
        for _, ad in self.adapters + ([(None, self.head)] if self.head is not None else []):
            ad.b.zero_()
            if not warm_a:
                bound = 1.0 / math.sqrt(ad.a.size(-1))
                ad.a.copy_((torch.rand(ad.a.shape, generator=generator) * 2 - 1) * bound)


class LoraRowModel(nn.Module):
    """The adapted model as the document in one slot sees it: model(x, y, reduction) on any batch, every row
    through slot `row`'s adapters (the legality probes rescore one scored position this way); with `cache`
    (a one-row pgolf.model.kv_cache.KVCache, left unchanged) every row continues that row's context."""

    def __init__(self, lora: BatchedLora, row: int, cache=None):
        super().__init__()
        self.inner, self.lora, self.row, self.cache = lora.model, lora, row, cache

    def forward(self, input_ids, target_ids=None, reduction: str = "mean"):
        saved = self.lora.rows
        self.lora.rows = torch.tensor([self.row], device=saved.device)
        try:
            if self.cache is None:
                return self.inner(input_ids, target_ids, reduction=reduction)
            cache = self.cache.select(torch.zeros(input_ids.size(0), dtype=torch.long, device=input_ids.device))
            nll = cached_nll(self.inner, input_ids, target_ids, cache)
            return nll if reduction == "none" else nll.mean()
        finally:
            self.lora.rows = saved
