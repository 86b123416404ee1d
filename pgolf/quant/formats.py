"""Per-row symmetric integer formats, shared by export quantization and QAT (which tensor gets which format
is pgolf.quant.policy's decision).

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
    """The naive baseline's clip: the q-quantile of |w| per row (linear interpolation)."""
    return torch.quantile(w.float().abs(), q, dim=1)


def row_clip_quantiles(w: torch.Tensor, quantiles) -> torch.Tensor:
    """Candidate row clips (K, R): the q-quantile of |w| per row for each q (quant.clip=pct_search)."""
    qs = torch.tensor([float(q) for q in quantiles], dtype=torch.float32, device=w.device)
    return torch.quantile(w.float().abs(), qs, dim=1)


def scale_floor_value(qmax: int, floor: str = "tiny") -> float:
    """The smallest row scale (quant.scale_floor): "tiny" 1/(qmax·1024), so a zero row reads back as 0;
    "inv_qmax" 1/qmax, the seeds' floor (a row whose clip is below 1 keeps a grid step of 1/qmax)."""
    if floor == "tiny":
        return 1.0 / (qmax * 1024)
    if floor == "inv_qmax":
        return 1.0 / qmax
    raise ValueError(f"quant.scale_floor={floor!r} is not tiny|inv_qmax")


def row_scales(clip: torch.Tensor, bits: int, floor: str = "tiny") -> torch.Tensor:
    """fp16 per-row scales from row clips, at least the scale floor."""
    qmax = qmax_for_bits(bits)
    scale = (clip.float() / qmax).clamp_min(scale_floor_value(qmax, floor))
    return scale.to(torch.float16)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round W / s to the nearest integer in [-qmax, qmax] (int8). `scale` is the stored fp16 scale."""
    qmax = qmax_for_bits(bits)
    s = scale.float().unsqueeze(1)
    return torch.clamp(torch.round(w.float() / s), -qmax, qmax).to(torch.int8)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().unsqueeze(1)


def fake_quantize_rows(w: torch.Tensor, bits: int, clip_k, floor: str = "tiny") -> torch.Tensor:
    """What export gives for W under round-to-nearest with SDClip scales: dequantize(quantize(W)).

    Used by QAT through a straight-through estimator; equal, element for element, to the export path's
    round-to-nearest result with the same bits and k.
    """
    scale = row_scales(row_clip_sdclip(w.detach(), clip_k), bits, floor)
    return dequantize_rows(quantize_rows(w, scale, bits), scale).to(w.dtype)
