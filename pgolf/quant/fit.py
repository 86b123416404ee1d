"""Fill the byte budget: choose the matrices' SDClip k from the entropy of their integer values.

The compressed size of the matrix section follows the order-0 entropy of its values times a codec ratio
(compressed bytes / entropy bytes, measured on a sample of the section). A larger k is a coarser grid
(step k·std/qmax) and fewer bytes, so the best k is the smallest one whose predicted artifact fits. The
entropy is computed from round-to-nearest values; GPTQ's values at the same k have nearly the same
histogram, and the export measures the real bytes afterwards and corrects k once when the guess missed.

Below about k = 3 a clip at k·std cuts the tails and the entropy falls again, so the search never goes under
quant.fit_k_min.
"""

import math

import numpy as np
import torch

from pgolf.errors import UserError
from pgolf.quant.artifact import SAMPLE_BYTES, choose_sections, sample_of
from pgolf.quant.formats import quantize_rows, row_clip_sdclip, row_scales

# Bisection steps on log k (the bracket k_min..K_MAX shrinks to a ratio of about 1.0002).
K_SEARCH_STEPS = 24
K_MAX = 64.0


def value_counts(q: torch.Tensor) -> torch.Tensor:
    """Counts of each int8 value of q (256 bins, value v at index v + 128), int64 on q's device."""
    return torch.bincount(q.flatten().to(torch.int64) + 128, minlength=256)


def entropy_bytes(counts) -> float:
    """Order-0 entropy of a value histogram, in bytes: the size an ideal coder needs for those values."""
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    n = float(c.sum())
    if n == 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(p * torch.log2(p)).sum()) * n / 8.0


def rtn_counts(weights: list[torch.Tensor], bits: int, k: float, ratios=None, floor: str = "tiny") -> torch.Tensor:
    """Value histogram of all `weights` under round-to-nearest with SDClip k (what the section would hold);
    weight i at k · ratios[i] (the policy's per-role share of the fitted k) when ratios are given."""
    total = torch.zeros(256, dtype=torch.int64)
    for i, w in enumerate(weights):
        scale = row_scales(row_clip_sdclip(w, k * (ratios[i] if ratios else 1.0)), bits, floor)
        total += value_counts(quantize_rows(w, scale, bits)).cpu()
    return total


def section_ratios(sections: dict[str, bytes], codecs, compressor=None) -> dict[str, dict]:
    """Codec ratio of each integer section on a sample (compressed bytes / entropy bytes), the method used
    and the whole section's entropy bytes; the samples' searches run as one batch (choose_sections)."""
    samples = {name: sample_of(raw) if len(raw) > SAMPLE_BYTES else raw for name, raw in sections.items()}
    recs = choose_sections([(name, sample, None) for name, sample in samples.items()], codecs, compressor)
    out = {}
    for (name, sample), rec in zip(samples.items(), recs, strict=True):
        ideal = entropy_bytes(np.bincount(np.frombuffer(sample, dtype=np.uint8), minlength=256))
        full = entropy_bytes(np.bincount(np.frombuffer(sections[name], dtype=np.uint8), minlength=256))
        out[name] = {"ratio": len(rec["blob"]) / max(ideal, 1.0), "layout": rec["layout"],
                     "method": rec["method"], "entropy": full}
    return out


def choose_k(weights: list[torch.Tensor], bits: int, target_bytes: float, ratio: float, k_min: float,
             fixed_counts: torch.Tensor | None = None, ratios=None, floor: str = "tiny") -> dict:
    """The smallest k in [k_min, K_MAX] with ratio · entropy(values at k) ≤ target_bytes.

    fixed_counts: values that share the section but do not depend on k (e.g. embeddings at the same bits).
    ratios: each weight's share of k (per-role sigmas); floor: quant.scale_floor.
    Returns {"k", "predicted_bytes", "entropy_bits_per_value"}; UserError when even K_MAX is too big.
    """
    fixed = fixed_counts if fixed_counts is not None else torch.zeros(256, dtype=torch.int64)

    def predicted(k: float) -> tuple[float, torch.Tensor]:
        counts = rtn_counts(weights, bits, k, ratios, floor) + fixed
        return ratio * entropy_bytes(counts), counts

    size, counts = predicted(k_min)
    if size <= target_bytes:
        lo = hi = k_min
    else:
        size, counts = predicted(K_MAX)
        if size > target_bytes:
            raise UserError(f"the matrices need {size:,.0f} B even at SDClip k={K_MAX:g} ({bits}-bit), over "
                            f"the {target_bytes:,.0f} B left for them: lower the bits or the model size")
        lo, hi = k_min, K_MAX
        for _ in range(K_SEARCH_STEPS):
            mid = math.sqrt(lo * hi)
            s, c = predicted(mid)
            if s <= target_bytes:
                hi, size, counts = mid, s, c
            else:
                lo = mid
    n = float(counts.sum())
    return {"k": hi, "predicted_bytes": size, "entropy_bits_per_value": 8.0 * entropy_bytes(counts) / max(n, 1.0)}
