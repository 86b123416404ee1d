"""GPTQ with per-row symmetric scales, and round-to-nearest for comparison.

GPTQ quantizes the columns of W one at a time and spreads each column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian H = XᵀX of the layer's inputs, so that the output error
‖(W−Ŵ)X‖² (= tr((W−Ŵ)H(W−Ŵ)ᵀ)) stays small. Rows are independent given their scales, which lets us run
several matrices of one shape, and several clip candidates per row, as one batch.

The solver works on stacks (N, R, C) of matrices with Hessians (N, C, C): `gptq_quantize` is the one-matrix
form, `gptq_quantize_batch` the batched one the pipeline uses. Everything runs on the tensors' device.
"""

import torch

from pgolf.errors import UserError
from pgolf.quant.formats import (
    qmax_for_bits,
    quantize_rows,
    row_clip_percentile,
    row_clip_quantiles,
    row_clip_sdclip,
    row_scales,
)

# clip="search": the SDClip row clip, plus these fractions of the row's max |w|; each row keeps the candidate
# with the lowest Hessian-weighted error (GPTQ) or squared error (RTN).
SEARCH_CLIP_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6)
# Cholesky failures are retried with the damping fraction raised tenfold, this many times at most.
DAMP_RETRIES = 4
# clip="pct_search" without quant.clip_quantiles: the seeds' row-quantile candidates (seed-systems M5).
DEFAULT_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
# quant.act_order_direction: the column order by diag(H), largest first (standard GPTQ) or smallest first (#535).
ACT_ORDER_DIRECTIONS = ("desc", "asc")
# quant.gptq_update: error feedback from the upper factor U of H⁻¹ (standard) or from H⁻¹'s own rows (#535).
GPTQ_UPDATES = ("cholesky", "inverse")


def row_clip_candidates(w: torch.Tensor, clip: str, k: float, quantiles=None) -> torch.Tensor:
    """Row clips (K, R) of a 2D matrix w (R, C) for the clip rule; K = 1 unless clip is search / pct_search."""
    w = w.float()
    if clip == "pct_search":
        return row_clip_quantiles(w, quantiles or DEFAULT_QUANTILES)
    if clip == "sdclip":
        return row_clip_sdclip(w, k).unsqueeze(0)
    if clip == "percentile":
        return row_clip_percentile(w).unsqueeze(0)
    rowmax = w.abs().amax(dim=1)
    if clip == "none":
        return rowmax.unsqueeze(0)
    if clip == "search":
        return torch.stack([row_clip_sdclip(w, k)] + [rowmax * f for f in SEARCH_CLIP_FACTORS])
    raise UserError(f"quant.clip={clip!r} is not sdclip|search|percentile|pct_search|none")


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row Hessian-weighted error e H eᵀ with e = w − ŵ; batched over leading dims. Sum it for the trace."""
    e = (w - w_hat).float()
    return ((e @ h.float()) * e).sum(dim=-1)


def rtn_candidates(w: torch.Tensor, scales: torch.Tensor, bits: int, select: str = "row"):
    """Round-to-nearest at each candidate scale (K, R); keep the lowest squared error per row, or per
    matrix (one candidate for all rows) when select == "matrix". Returns (q int8, scale fp16)."""
    qs = torch.stack([quantize_rows(w, s, bits) for s in scales])
    if len(scales) == 1:
        return qs[0], scales[0]
    err = ((w.float().unsqueeze(0) - qs.float() * scales.float().unsqueeze(-1)) ** 2).sum(dim=-1)
    rows = torch.arange(w.shape[0], device=w.device)
    best = err.argmin(dim=0) if select == "row" else err.sum(dim=1).argmin().expand(w.shape[0])
    return qs[best, rows], scales[best, rows]


def rtn_quantize(w: torch.Tensor, bits: int, clip: str = "sdclip", k: float = 12.85, floor: str = "tiny",
                 quantiles=None, select: str = "row"):
    """Round-to-nearest per row: (q int8, scale fp16). With several clip candidates (search, pct_search)
    each row keeps its lowest squared error (per matrix with select="matrix")."""
    scales = row_scales(row_clip_candidates(w, clip, k, quantiles), bits, floor)
    return rtn_candidates(w, scales, bits, select)


def hinv_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with H⁻¹ = UᵀU, by the reverse-Cholesky route, no explicit inverse.

    With J the flip, J H J = L Lᵀ gives H = V Vᵀ for V = J L J (upper); then H⁻¹ = V⁻ᵀV⁻¹, so U = V⁻¹,
    found by one triangular solve. Batched over leading dims; raises if H is not positive definite.
    """
    lower = torch.linalg.cholesky(h.flip(-2, -1))
    eye = torch.eye(h.shape[-1], device=h.device, dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(lower.flip(-2, -1), eye, upper=True)


def hinv_factor_classic(h: torch.Tensor) -> torch.Tensor:
    """The classic GPTQ route to the same U: Cholesky, cholesky_inverse, then the upper Cholesky of H⁻¹."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def damped_hinv_factor(h: torch.Tensor, damp: float, update: str = "cholesky"):
    """Add damp·mean(diag H) to the diagonal once and factor; where Cholesky fails, retry with 10× the damping.

    Returns (U, damp fractions used per matrix, number of retries). h is (N, C, C). The factor is computed
    in float64 (cheap next to the column sweep, and robust on ill-conditioned H) and returned as float32.
    update="inverse" returns the damped H⁻¹ itself in place of U (quant.gptq_update; PR #535's sweep reads
    its error feedback from the rows of H⁻¹, which skips the Schur-complement updates the factor carries).
    """
    if update not in GPTQ_UPDATES:
        raise UserError(f"quant.gptq_update={update!r} is not {'|'.join(GPTQ_UPDATES)}")
    h = h.double()
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    fracs = torch.full_like(mean_diag, damp)
    eye = torch.eye(h.shape[-1], device=h.device, dtype=h.dtype)
    for attempt in range(DAMP_RETRIES + 1):
        damped = h + (fracs * mean_diag)[:, None, None] * eye
        lower, status = torch.linalg.cholesky_ex(damped.flip(-2, -1))
        bad = status > 0
        if not bool(bad.any()):
            if update == "inverse":  # (J H J)⁻¹ = J H⁻¹ J
                return torch.cholesky_inverse(lower).flip(-2, -1).float(), fracs, attempt
            u = torch.linalg.solve_triangular(lower.flip(-2, -1), eye.expand_as(h), upper=True)
            return u.float(), fracs, attempt
        fracs = torch.where(bad, (fracs * 10).clamp_min(1e-4), fracs)
    raise UserError(f"Hessian is not positive definite even with damping {fracs.max().item():.3g}·mean(diag)")


def gptq_columns(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, qmax: int, block_size: int):
    """The GPTQ sweep: quantize columns in order with error feedback; lazy batch updates between blocks.

    w (N, R, C) fp32 (already permuted), u (N, C, C) the upper inverse factor, scale (N, R) fp32 holding the
    stored fp16 values. Returns the integer values (N, R, C) as fp32.
    """
    w = w.clone()
    q = torch.zeros_like(w)
    ncols = w.shape[-1]
    for i1 in range(0, ncols, block_size):
        i2 = min(i1 + block_size, ncols)
        w1 = w[..., i1:i2].clone()
        u1 = u[:, i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[..., i]
            qcol = torch.clamp(torch.round(col / scale), -qmax, qmax)
            q[..., i1 + i] = qcol
            err = (col - qcol * scale) / u1[:, i, i].unsqueeze(-1)
            w1[..., i + 1:] -= err.unsqueeze(-1) * u1[:, i, i + 1:].unsqueeze(1)
            err1[..., i] = err
        if i2 < ncols:
            w[..., i2:] -= err1 @ u[:, i1:i2, i2:]
    return q


def candidate_scales(w: torch.Tensor, bits: int, clip: str, k: float, floor: str, quantiles, select: str):
    """Row scales (N, K, R) fp16 for GPTQ. pct_search with select="row" fixes each row's scale before GPTQ
    by round-to-nearest MSE (K = 1); every other multi-candidate rule leaves K candidates to GPTQ."""
    n, r, c = w.shape
    clips = row_clip_candidates(w.reshape(n * r, c), clip, k, quantiles)
    scales = row_scales(clips, bits, floor)  # (K, N*R)
    if clip == "pct_search" and select == "row":
        _, best = rtn_candidates(w.reshape(n * r, c), scales, bits, "row")
        return best.reshape(n, 1, r)
    return scales.reshape(-1, n, r).permute(1, 0, 2)


def pick_candidate(q, scales, wp, hp, clip: str, select: str):
    """Keep one of K GPTQ results per row (Hessian-weighted error; clip="search") or per matrix (plain MSE;
    pct_search with select="matrix"). q (N, K, R, C), scales (N, K, R). Returns (q, scale, rows per candidate)."""
    n, ncand, r, c = q.shape
    deq = q * scales.float().unsqueeze(-1)
    if clip == "pct_search":
        err = ((wp.unsqueeze(1) - deq) ** 2).sum(dim=(-1, -2))  # (N, K)
        best = err.argmin(dim=1)[:, None].expand(n, r)
    else:
        best = hessian_error(wp.unsqueeze(1), deq, hp.unsqueeze(1)).argmin(dim=1)  # (N, R)
    q = q.gather(1, best[:, None, :, None].expand(n, 1, r, c)).squeeze(1)
    scale = scales.gather(1, best[:, None, :]).squeeze(1)
    return q, scale, torch.bincount(best.flatten(), minlength=ncand).tolist()


def gptq_quantize_batch(w: torch.Tensor, h: torch.Tensor, bits: int, clip: str = "sdclip", k: float = 12.85,
                        damp: float = 0.01, block_size: int = 128, act_order: bool = True, floor: str = "tiny",
                        quantiles=None, select: str = "row", direction: str = "desc", update: str = "cholesky"):
    """GPTQ of a stack of matrices w (N, R, C) with Hessians h (N, C, C): (q int8 (N,R,C), scale fp16 (N,R), info).

    With act_order the columns run by diag(H) in `direction` (ACT_ORDER_DIRECTIONS); `update` picks the error
    feedback (GPTQ_UPDATES, damped_hinv_factor).

    info: "damp" (fraction used, per matrix), "damp_retries", "dead_columns" (per matrix), and with several
    clip candidates "clip_choice" (rows that chose each candidate).
    """
    w = w.float()
    n, r, c = w.shape
    h = h.to(device=w.device, dtype=torch.float32).clone()
    qmax = qmax_for_bits(bits)
    scales = candidate_scales(w, bits, clip, k, floor, quantiles, select)  # (N, K, R) fp16
    ncand = scales.shape[1]

    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    w = w.masked_fill(dead.unsqueeze(1), 0.0)
    if direction not in ACT_ORDER_DIRECTIONS:
        raise UserError(f"quant.act_order_direction={direction!r} is not {'|'.join(ACT_ORDER_DIRECTIONS)}")
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=direction == "desc", stable=True)
    else:
        perm = torch.arange(c, device=w.device).expand(n, c)
    batch = torch.arange(n, device=w.device)[:, None, None]
    wp = torch.gather(w, 2, perm[:, None, :].expand(n, r, c))
    hp = h[batch, perm[:, :, None], perm[:, None, :]]
    u, fracs, retries = damped_hinv_factor(hp, damp, update)

    w_rep = wp.repeat(1, ncand, 1)  # rows ordered candidate-major: row k*R + i
    s_rep = scales.reshape(n, ncand * r).float()
    q = gptq_columns(w_rep, u, s_rep, qmax, block_size).view(n, ncand, r, c)
    info = {"damp": fracs.tolist(), "damp_retries": retries, "dead_columns": dead.sum(dim=-1).tolist()}
    if ncand > 1:
        q, scale, info["clip_choice"] = pick_candidate(q, scales, wp, hp, clip, select)
    else:
        q, scale = q[:, 0], scales[:, 0]
    inv = torch.argsort(perm, dim=-1)
    q = torch.gather(q, 2, inv[:, None, :].expand(n, r, c))
    return q.to(torch.int8), scale.contiguous(), info


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, clip: str = "sdclip", k: float = 12.85,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = True, **clip_options):
    """GPTQ of one matrix w (R, C) with Hessian h (C, C): (q int8 (R, C), scale fp16 (R,), info dict)."""
    q, scale, info = gptq_quantize_batch(w.unsqueeze(0), h.unsqueeze(0), bits, clip, k, damp, block_size, act_order,
                                         **clip_options)
    info = {key: (v[0] if isinstance(v, list) and key != "clip_choice" else v) for key, v in info.items()}
    return q[0], scale[0], info
