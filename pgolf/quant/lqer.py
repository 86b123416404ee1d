"""LQER (asymmetric): a low-rank correction of the quantization residual on the tensors that lose most.

After every tensor is quantized, E = W − Ŵ (fp32) is formed for the tensors whose policy rule allows it;
the quant.lqer_top_k with the largest ‖E‖_F get a rank-r thin-SVD correction A·B, A = U_r·diag(S_r)
(rows × r) and B = V_rᵀ (r × cols). A is stored at quant.lqer_a_bits with one scale for the whole factor,
B at quant.lqer_b_bits with one scale per quant.lqer_group consecutive values of row-major B (one scale
for all of B when its size is not a multiple of the group). Both use the asymmetric integer range
[−2^(b−1), 2^(b−1) − 1] with scale max|x| / (2^(b−1) − ½), so the positive extreme clips slightly (the
04-27 record's int2 / int4 packing, shared/reference/frontier.md §6.2). The reader adds (q_A s_A)(q_B s_B)
to the dequantized weight. The factors live in the artifact's "lqer" section, so the size fit counts them.
"""

import torch


def asym_quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 shaped like x, fp16 scales (groups,)): groups of `group` consecutive values, or one group."""
    flat = x.float().reshape(-1)
    if group <= 0 or flat.numel() % group:
        group = flat.numel()
    g = flat.view(-1, group)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    scale = (g.abs().amax(dim=1) / (high + 0.5)).clamp_min(2.0 ** -24).to(torch.float16)
    q = torch.clamp(torch.round(g / scale.float().unsqueeze(1)), low, high).to(torch.int8)
    return q.view_as(x), scale


def asym_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    flat = q.float().reshape(scale.numel(), -1) * scale.float().unsqueeze(1)
    return flat.view(q.shape)


def lqer_factors(residual: torch.Tensor, rank: int, a_bits: int, b_bits: int, group: int) -> dict:
    """The stored factors of a rank-`rank` correction of `residual` (R, C): {"qa", "sa", "qb", "sb"} on CPU."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    r = min(rank, s.numel())
    a = u[:, :r] * s[:r]
    b = vh[:r]
    qa, sa = asym_quantize(a, a_bits, 0)
    qb, sb = asym_quantize(b, b_bits, group)
    return {"qa": qa.cpu(), "sa": sa.cpu(), "qb": qb.cpu(), "sb": sb.cpu(), "a_bits": a_bits, "b_bits": b_bits}


def lqer_correction(parts: dict) -> torch.Tensor:
    """(q_A s_A)(q_B s_B), fp32 on CPU: what the reader adds to the dequantized weight."""
    return asym_dequantize(parts["qa"], parts["sa"]) @ asym_dequantize(parts["qb"], parts["sb"])


def apply_lqer(tensors: dict, state: dict, rules: dict, cfg) -> list[str]:
    """Give the cfg.lqer_top_k eligible tensors with the largest ‖W − Ŵ‖_F a correction, in place.

    tensors: {name: QuantTensor} as quantized; state: the float weights; rules: the policy's rules. Each
    chosen tensor's info gets "lqer": its residual norm before and after. Returns the chosen names."""
    if cfg.lqer_top_k <= 0:
        return []
    norms = {}
    for name, t in tensors.items():
        if rules[name].lqer and t.kind != "passthrough" and len(t.shape) == 2:
            w = state[name].detach().float()
            norms[name] = float(torch.linalg.vector_norm(w - t.dequantize().float().to(w.device)))
    chosen = sorted(norms, key=lambda n: -norms[n])[:cfg.lqer_top_k]
    for name in chosen:
        t = tensors[name]
        w = state[name].detach().float()
        residual = w - t.dequantize().float().to(w.device)
        t.lqer = lqer_factors(residual, cfg.lqer_rank, cfg.lqer_a_bits, cfg.lqer_b_bits, cfg.lqer_group)
        after = float(torch.linalg.vector_norm(residual - lqer_correction(t.lqer).to(w.device)))
        t.info["lqer"] = {"rank": int(t.lqer["qb"].shape[0]), "error_before": norms[name], "error_after": after}
    return chosen
