"""FP8 matrix multiplies for training (train.fp8): e4m3 operands with row-wise scales, bf16 results.

A linear layer y = x Wᵀ costs three matrix multiplies per step: the forward, the input gradient dx = dy W
and the weight gradient dW = dyᵀ x. With train.fp8 the first two run on the FP8 tensor cores
(torch._scaled_mm); the weight gradient, which sums over all the batch's tokens, stays in bf16.

Each operand is scaled along the dimension that is not summed, so that one large value costs precision in
its own row only:
- forward: x per token (row of x), W per output channel (row of W);
- input gradient: dy per token, W per input channel (column of W).
A row's scale is amax(|row|) / 448, the largest e4m3 value, so the row's largest entry lands on 448 and no
value saturates. The product is rescaled in the matmul's epilogue (scale_a ⊗ scale_b) and written in bf16.

`fp8_linear_reference` is the same arithmetic in plain PyTorch: the operands rounded to e4m3 and back, then
a float32 matmul; the tests check the fast path against it and against the bf16 linear.

Measured: at the record's shapes (K = 512) on an H200 the step was 1.5 % slower with it, the matmuls' saving
(3 ms) outweighed by the scales' amax and casts (5 ms; docs/benchmarks.md, tenth session), so no recipe sets it.
"""

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448.0
MIN_SCALE = 1e-12  # an all-zero row gets this scale (its values round to zero whatever it is)


def to_e4m3_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with q = x / scale in e4m3, row-major, and scale (rows, 1) float32: x ≈ q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).to(E4M3).contiguous(), scale


def scaled_mm_rows(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (N, K)ᵀ with both operands quantized per row (per M and per N), result in out_dtype."""
    aq, sa = to_e4m3_rows(a)
    bq, sb = to_e4m3_rows(b)
    # _scaled_mm takes the second operand column-major: bqᵀ, a view of the row-major (N, K) tensor.
    return torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.reshape(1, -1), out_dtype=out_dtype)


def fp8_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fp8_linear takes x and a weight of this shape: every dimension a multiple of 16, and x in 16 bits
    on CUDA (whose row-wise kernels write 16-bit results only; the CPU's write float32 too)."""
    rows = x.numel() // max(x.size(-1), 1)
    dtypes = (torch.bfloat16, torch.float16) if x.is_cuda else (torch.bfloat16, torch.float16, torch.float32)
    return (x.dtype in dtypes and x.dim() >= 2
            and rows % 16 == 0 and x.size(-1) % 16 == 0 and weight.size(0) % 16 == 0)


class FP8Linear(torch.autograd.Function):
    """x @ weightᵀ with the forward and the input gradient in FP8, the weight gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(x2, weight)
        ctx.in_shape = x.shape
        y = scaled_mm_rows(x2, weight, x.dtype)
        return y.reshape(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.size(-1)).to(x2.dtype)
        dx = scaled_mm_rows(dy2, weight.t(), x2.dtype)  # dy (M, N) @ W (N, K): W's columns are the rows here
        dw = dy2.t().mm(x2).to(weight.dtype)
        return dx.reshape(ctx.in_shape), dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ (no bias) through FP8Linear; weight must already be in x's dtype."""
    return FP8Linear.apply(x, weight)


def round_rows_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x as the fast path sees it: each row scaled to amax 448, rounded to e4m3, scaled back (float32)."""
    q, scale = to_e4m3_rows(x)
    return q.float() * scale


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fast path's forward in plain PyTorch: float32 matmul of the e4m3-rounded operands, in x's dtype."""
    x2 = x.reshape(-1, x.size(-1))
    y = round_rows_e4m3(x2) @ round_rows_e4m3(weight).t()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.size(0))
