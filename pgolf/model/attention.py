"""Causal grouped-query attention: the kernel choice, a plain reference, XSA and value embeddings.

Tensors are in the (B, T, H, D) layout of FlashAttention-3 throughout; k and v carry Hkv heads and query
head h reads KV head h // (H // Hkv), the same grouping as repeat_interleave, FA3 and SDPA's enable_gqa.
"""

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf.errors import UserError
from pgolf.model.fused_qk import qk_prep
from pgolf.model.layers import CastedLinear

SDPA_BACKENDS = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "fa3": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def load_fa3_func():
    """FlashAttention-3's flash_attn_func if the `flash_attn_interface` package imports, else None."""
    try:
        module = importlib.import_module("flash_attn_interface")
    except ImportError:
        return None
    return getattr(module, "flash_attn_func", None)


def tail_causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """(tq, tk) bool, True where query i may read key j: the queries are the last tq of the tk positions
    (causal aligned at the bottom right, as FlashAttention's causal=True with fewer queries than keys)."""
    rows = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= rows


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention in fp32: softmax(QK^T / sqrt(D) + causal mask) V, with k, v expanded per group.
    q may hold only the last of k's positions (tail_causal_mask)."""
    group = q.size(2) // k.size(2)
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~tail_causal_mask(q.size(1), k.size(1), q.device), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends: list,
                   native_gqa: bool = False) -> torch.Tensor:
    """Causal SDPA restricted to `backends` (tried in that order).

    The flash and math kernels take K/V with fewer heads than Q (enable_gqa). For lists with cuDNN or the
    efficient kernel the KV heads are expanded with repeat_interleave, which every kernel accepts, unless
    `native_gqa` asks SDPA to take the unexpanded K/V there too: recent cuDNN kernels read them as they are
    (no expanded copy written in the forward, none reduced in the backward); where the first backend of the
    list refuses them, SDPA falls through to the next that takes them (flash), so measure before keeping it.

    With fewer queries than keys (the last block of a scoring forward, GPT.forward_hidden's `keep`) the
    queries are the last positions: an explicit tail_causal_mask, which the flash kernel does not take (SDPA
    then runs cuDNN or the efficient kernel; the work is keep/T of a full attention).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    tail = q.size(1) != k.size(1)
    if tail:
        backends = [b for b in backends if b != SDPBackend.FLASH_ATTENTION] or [SDPBackend.MATH]
    native_gqa = native_gqa or all(b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH) for b in backends)
    group = q.size(2) // k.size(2)
    if group > 1 and not native_gqa:
        kt = kt.repeat_interleave(group, dim=1)
        vt = vt.repeat_interleave(group, dim=1)
    causal = {"attn_mask": tail_causal_mask(q.size(1), k.size(1), q.device)} if tail else {"is_causal": True}
    with sdpa_kernel(backends, set_priority=True):
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=native_gqa and group > 1, **causal)
    return out.transpose(1, 2)


def xsa_project_out(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exclusive self-attention: remove from each head's output its component along its own unit value vector."""
    b, t, h, d = y.shape
    hkv = v.size(2)
    y_g = y.reshape(b, t, hkv, h // hkv, d)
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)
    y_g = y_g - (y_g * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y_g.reshape(b, t, h, d)


class CausalSelfAttention(nn.Module):
    """GQA with q/k RMSNorm, (partial) RoPE and a learnable per-head q gain; optional XSA. With fused_qk the
    norm, RoPE and gain run as one Triton kernel per direction on CUDA (pgolf.model.fused_qk)."""

    def __init__(self, model_dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float,
                 attention: str = "auto", xsa: bool = False, native_gqa: bool = False, fused_qk: bool = False,
                 gate_window: int = 0, gate_scale: float = 0.5):
        super().__init__()
        if attention not in SDPA_BACKENDS:
            raise UserError(f"model.attention={attention!r} is not one of {'|'.join(SDPA_BACKENDS)}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = model_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(model_dim, model_dim)
        self.c_k = CastedLinear(model_dim, kv_dim)
        self.c_v = CastedLinear(model_dim, kv_dim)
        self.proj = CastedLinear(model_dim, model_dim)
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        self.xsa = xsa
        self.backend = attention
        self.fa3_func = load_fa3_func() if attention in ("auto", "fa3") else None
        if attention == "fa3" and self.fa3_func is None:
            raise UserError("model.attention='fa3' but the flash_attn_interface package does not import")
        self.sdpa_backends = SDPA_BACKENDS[attention]
        self.native_gqa = native_gqa
        self.fused_qk = fused_qk
        # model.sparse_attn_gate (gate_window > 0): (H, window), zero-init, so every head starts at 0.5
        self.gate_window = gate_window
        self.gate_scale = float(gate_scale)
        self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, gate_window)) if gate_window > 0 else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fast causal attention for this device and dtype; (B, T, H, D) in and out (q may hold only the
        last of the T positions: FA3's causal=True aligns at the bottom right, SDPA gets a mask)."""
        if not q.is_cuda:
            return sdpa_attention(q, k, v, SDPA_BACKENDS["math"])
        if self.fa3_func is not None and q.dtype in (torch.bfloat16, torch.float16):
            out = self.fa3_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out
        return sdpa_attention(q, k, v, self.sdpa_backends, self.native_gqa)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ve: torch.Tensor | None = None, keep: int | None = None, doc_mask=None, cache=None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with `keep`, the output of the last `keep` positions only (B, keep, D):
        their queries read the keys and values of every position. doc_mask (pgolf.model.doc_attention's
        doc_attention_mask, train.doc_mask): each token reads only its own document's earlier tokens.
        cache (pgolf.model.kv_cache.LayerKV): x holds new positions only; their queries also read the cached
        keys and values of the earlier ones (cos and sin are the new positions' rows)."""
        b, t, _ = x.shape
        tq = t if keep is None else keep
        q = self.c_q(x[:, t - tq:]).view(b, tq, self.num_heads, self.head_dim)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.c_v(x)
        if ve is not None:
            v = v + ve.to(v.dtype)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q = qk_prep(q, cos[t - tq:], sin[t - tq:], self.q_gain, self.fused_qk).to(v.dtype)
        k = qk_prep(k, cos, sin, None, self.fused_qk).to(v.dtype)
        v_own = v[:, t - tq:]
        if cache is not None:
            k, v = cache.extend(k, v)
        if doc_mask is None:
            y = self.attend(q, k, v)
        else:  # imported here: the exported script carries the module only with train.doc_mask
            from pgolf.model.doc_attention import doc_masked_attention

            y = doc_masked_attention(q, k, v, doc_mask)
        if self.xsa:
            y = xsa_project_out(y, v_own)
        if self.attn_gate_w is not None:
            y = self.gate_heads(y, x[:, t - tq:])
        return self.proj(y.reshape(b, tq, -1))

    def gate_heads(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The sparse output gate (frontier.md §3.2): head h of y_t times sigmoid(scale * W_h . x_t[:window]),
        x the attention's input at the query positions (the block's normed input). Applied in forward, after
        XSA, so that every path through the attention (training, scoring with keep, fused q/k, TTT) has it."""
        logits = F.linear(x[..., : self.gate_window], self.attn_gate_w.to(x.dtype))
        g = torch.sigmoid(self.gate_scale * logits)
        return y * g.to(y.dtype).unsqueeze(-1)
