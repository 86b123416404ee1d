"""Document-masked causal attention (train.doc_mask): token i reads token j iff j <= i and both lie in the
same document of their row. Built on torch.nn.attention.flex_attention; no attention kernel of our own.

Documents are given per position as ids of shape (B, T), non-decreasing along each row (pgolf.data.loader's
`batch_document_ids`: a running count of the BOS tokens, so a row that starts inside a document gives that
partial document its own id). The BlockMask is built from them once per batch (GPT.forward) at tile level,
with tensor ops only (O(B (T/tile)^2), no (T, T) mask), and always eagerly: `doc_block_mask` is kept out of
every torch.compile graph (torch.compiler.disable), and the compiled graph takes the finished BlockMask as
input with fixed shapes, so one compile still serves every batch. Traced into the training graph instead,
Inductor's code for it (torch 2.11, one H200) gave non-finite gradients at the second step of the frontier
recipe, where the same graphs under aot_eager or with the mask built eagerly trained (benchmarks/nan_probe.py,
docs/benchmarks.md, 2026-12-04). Tiles that lie inside one document and strictly below the
diagonal are "full" (no mask evaluated there); tiles that may mix documents or hold the diagonal are
"partial" and run the mask per position; the rest are skipped.

On CUDA flex_attention must run compiled (the eager path materializes the scores): inside the compiled
training step it is; outside one, `doc_flex_attention` calls a compiled copy. On CPU it runs eagerly, and
only without gradients (torch 2.13's flex attention has no CPU backward): there, with gradients on (CPU
training, tests), `doc_attention_mask` gives a dense (B, 1, T, T) boolean mask instead and SDPA runs with it.
`doc_reference_attention` is the same attention in plain fp32 with an explicit (T, T) mask.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

DOC_MASK_TILE = 128  # flex attention's default sparse block size


def padded_length(seq_len: int) -> int:
    """seq_len rounded up to whole tiles: flex attention's compiled kernels need tiles of DOC_MASK_TILE (a
    tile of 16, the gcd of a 1,808-token tail window and 128, fails to lower on CUDA), so a row of any other
    length is padded at its end, the padding one document of its own that no real token reads (causal)."""
    return -(-seq_len // DOC_MASK_TILE) * DOC_MASK_TILE


def ordered_blocks(take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, nk) bool -> counts (B, 1, nq) int32 and kv tile indices (B, 1, nq, nk) int32, those taken
    first in ascending order (the layout BlockMask.from_kv_blocks reads)."""
    counts = take.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(take.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.unsqueeze(1).contiguous(), order.unsqueeze(1).contiguous()


@torch.compiler.disable
def doc_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The causal same-document BlockMask of (B, T) document ids (non-decreasing along each row), over
    padded_length(T) positions (doc_flex_attention pads q, k, v to it)."""
    b, real = doc_ids.shape
    t, tile = padded_length(real), DOC_MASK_TILE
    n = t // tile
    doc = doc_ids.to(torch.int32)
    if t > real:  # the padding: one more document after each row's last
        doc = torch.cat([doc, (doc[:, -1:] + 1).expand(b, t - real)], dim=1)
    tiles = doc.view(b, n, tile)
    first, last = tiles[:, :, 0], tiles[:, :, -1]  # (B, n): the id range of each tile
    qi = torch.arange(n, device=doc.device)[:, None]
    ki = torch.arange(n, device=doc.device)[None, :]
    # some same-document pair in (q tile, kv tile) iff their id ranges meet; causal: kv tile <= q tile
    meet = (first[:, None, :] <= last[:, :, None]) & (last[:, None, :] >= first[:, :, None])
    needed = meet & (ki <= qi)
    single = first == last
    full = single[:, :, None] & single[:, None, :] & (first[:, :, None] == first[:, None, :]) & (ki < qi)
    kv_num, kv_idx = ordered_blocks(needed & ~full)
    full_num, full_idx = ordered_blocks(full)

    def same_doc_causal(bi, hi, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[bi, q_idx] == doc[bi, kv_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=same_doc_causal, seq_lengths=(t, t))


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process (static shapes), for CUDA calls outside a compiled graph."""
    return torch.compile(flex_attention, dynamic=False)


def doc_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """Document-masked causal GQA through flex_attention; (B, T, H, D) / (B, T, Hkv, D) in, (B, T, H, D) out."""
    flex = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        flex = compiled_flex_attention()
    t = q.size(1)
    pad = block_mask.seq_lengths[0] - t
    if pad:  # the mask covers whole tiles (padded_length)
        q, k, v = (F.pad(a, (0, 0, 0, 0, 0, pad)) for a in (q, k, v))
    out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
               enable_gqa=k.size(2) != q.size(2))
    return out.transpose(1, 2)[:, :t]


def doc_attention_mask(doc_ids: torch.Tensor) -> BlockMask | torch.Tensor:
    """What the blocks' attention takes for (B, T) document ids: a BlockMask where flex attention runs (CUDA,
    or CPU without gradients), else the dense (B, 1, T, T) bool mask, True where query i may read key j."""
    if doc_ids.is_cuda or not torch.is_grad_enabled():
        return doc_block_mask(doc_ids)
    return dense_doc_mask(doc_ids)


def dense_doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may read key j: j <= i and the same document id."""
    t = doc_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)


def doc_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: BlockMask | torch.Tensor) -> torch.Tensor:
    """Document-masked causal attention with a mask from doc_attention_mask; (B, T, H, D) layout."""
    if isinstance(mask, BlockMask):
        return doc_flex_attention(q, k, v, mask)
    group = q.size(2) // k.size(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=group > 1)
    return out.transpose(1, 2)


def doc_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The same attention in plain fp32: softmax(QK^T / sqrt(D) masked to j <= i, same document) V, with the KV
    heads expanded per group; (B, T, H, D) in and out, in q's dtype."""
    group = q.size(2) // k.size(2)
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    t = q.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    allowed = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)
