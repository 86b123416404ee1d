"""Per-row symmetric integer formats, shared by export quantization and QAT.

A row r of a matrix W is stored as integers q[r, :] in [-qmax, qmax] (qmax = 2^(bits-1) - 1) and one fp16
scale s[r]; it reads back as q * s. The scale comes from a row clip c[r] as s = c / qmax. QAT's fake
quantizer calls exactly the same functions, so what training sees is what export writes.
"""

import torch


def qmax_for_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 2..8")
    return (1 << (bits - 1)) - 1


def row_clip_sdclip(w: torch.Tensor, k) -> torch.Tensor:
    """SDClip: each row's clip is k standard deviations of the row (fp32); k is a float or a 0-dim tensor.

    The clip is not capped at the row's max |w|: k sets the grid step k·std/qmax, so a large k (the
    records' 12.85 at int6) is a coarse grid whose values use far fewer than 2^bits levels and compress
    well, and a small k clips the tails. That step, not the nominal bit width, decides the bytes.
    """
    w = w.float()
    return k * w.std(dim=1, unbiased=False)


def row_clip_percentile(w: torch.Tensor, q: float = 0.9999984) -> torch.Tensor:
    """The naive baseline's clip: the q-quantile of |w| per row."""
    return torch.quantile(w.float().abs(), q, dim=1)


def row_scales(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 per-row scales from row clips; a zero row gets the smallest positive step so it reads back as 0."""
    qmax = qmax_for_bits(bits)
    scale = (clip.float() / qmax).clamp_min(1.0 / (qmax * 1024))
    return scale.to(torch.float16)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round W / s to the nearest integer in [-qmax, qmax] (int8). `scale` is the stored fp16 scale."""
    qmax = qmax_for_bits(bits)
    s = scale.float().unsqueeze(1)
    return torch.clamp(torch.round(w.float() / s), -qmax, qmax).to(torch.int8)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(1)


def fake_quantize_rows(w: torch.Tensor, bits: int, clip_k) -> torch.Tensor:
    """What export gives for W under round-to-nearest with SDClip scales: dequantize(quantize(W)).

    Used by QAT through a straight-through estimator; equal, element for element, to the export path's
    round-to-nearest result with the same bits and k.
    """
    scale = row_scales(row_clip_sdclip(w.detach(), clip_k), bits)
    return dequantize_rows(quantize_rows(w, scale, bits), scale).to(w.dtype)


# Name parts that mark an attention or MLP matrix (stored with matrix_bits); any other large 2D float
# tensor (token embedding, BigramHash and value-embedding tables, an untied head) gets embed_bits.
MATRIX_NAME_PARTS = ("attn", "mlp")


def tensor_policy(name: str, tensor: torch.Tensor, cfg) -> str:
    """How the artifact stores one state-dict tensor: "matrix", "embed" or "passthrough".

    Passthrough tensors (non-float, not 2D, or at most cfg.passthrough_numel elements: gains, scales,
    gates, small projections) are stored as they are, floats as fp16. Control tensors stay fp16 as in the
    records: they are a few tens of thousands of values, and fp32 would cost bytes without a measured gain.
    """
    if not tensor.is_floating_point() or tensor.ndim != 2 or tensor.numel() <= cfg.passthrough_numel:
        return "passthrough"
    if any(part in name for part in MATRIX_NAME_PARTS):
        return "matrix"
    return "embed"


def policy_bits(kind: str, cfg) -> int:
    """Bits of a "matrix" or "embed" tensor under cfg (QuantConfig)."""
    return cfg.matrix_bits if kind == "matrix" else cfg.embed_bits


def policy_clip_k(kind: str, cfg) -> float:
    """SDClip k of a "matrix" or "embed" tensor under cfg (QuantConfig)."""
    return cfg.sdclip_k if kind == "matrix" else cfg.sdclip_k_embed
