"""Documents of the validation stream, and document-isolated scoring (eval.doc_isolated).

A document opens at a BOS token (pgolf.data.loader.TRAIN_BOS_ID; the stream's first token opens one too when it
is not a BOS). Document d is (start, preds): it predicts from positions start .. start + preds - 1, i.e. the
targets start + 1 .. start + preds, which include the next document's BOS (the record's convention: the model
learns to end a document). The documents together predict every target 1 .. n - 1 of the stream exactly once.

`DocIsolated` wraps a model so that every forward it runs is document-masked (pgolf.model.doc_attention, built
from the batch's own BOS tokens): a window that spans a BOS scores the later document without any context from
the earlier one. The input features cross no BOS either: the smear gates and BigramHash treat a BOS as a
document start under model.bos_mask, which pgolf.config_rules requires of document-isolated scoring. The plain
and sliding passes score through it unchanged (the fast path takes it as a model without a head split; the
legality probes see the same masked scorer).
"""

import torch
from torch import nn

from pgolf.data.loader import TRAIN_BOS_ID, batch_document_ids


def find_documents(tokens: torch.Tensor, bos_id: int = TRAIN_BOS_ID) -> list[tuple[int, int]]:
    """[(start, preds), ...] of a 1-D stream, in stream order (module docstring); empty for fewer than 2 tokens."""
    n = int(tokens.numel())
    if n < 2:
        return []
    starts = (tokens.cpu() == bos_id).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [n - 1]
    return [(s, e - s) for s, e in zip(starts, ends, strict=True) if e > s]


class DocIsolated(nn.Module):
    """model(x, y, reduction) with document ids from x's BOS tokens: no attention crosses a BOS in a row."""

    def __init__(self, model: nn.Module, bos_id: int = TRAIN_BOS_ID):
        super().__init__()
        self.inner, self.bos_id = model, bos_id

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor | None = None, reduction: str = "mean"):
        doc_ids = batch_document_ids(input_ids, self.bos_id)
        return self.inner(input_ids, target_ids, reduction=reduction, doc_ids=doc_ids)


def doc_isolated(model: nn.Module, on: bool, bos_id: int = TRAIN_BOS_ID) -> nn.Module:
    """The model wrapped in DocIsolated when `on`, else itself."""
    return DocIsolated(model, bos_id) if on else model
