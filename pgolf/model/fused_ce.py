"""The training loss as one kernel per direction: the logit softcap and the cross-entropy together.

The plain path (`softcapped_ce_reference`, what GPT.forward computes without model.fused_ce) eagerly casts the
head's (N, V) logits to float32, softcaps them into a second float32 (N, V) tensor and hands that to
F.cross_entropy, which keeps a float32 log-softmax of the same size for its backward. At the frontier run's
shapes (98,304 tokens a GPU, V = 8,192) each such copy is 3.2 GB. The kernels read the head's logits in
their own dtype (bf16 under autocast) and keep nothing of size (N, V) but the input and its gradient:

- forward, one program per row: z = C tanh(x / C), computed as C (2 sigmoid(2x / C) - 1), streamed over the
  row in blocks of up to 1,024 columns with a running max and a running sum of exp(z - max); it stores the
  row's loss lse - z[target] and its lse (float32).
- backward, one program per row: recomputes z from x and writes dx = g (softmax(z) - onehot(target)) z'(x),
  with z' = 1 - tanh^2 = 4 s (1 - s) from the same sigmoid s; dx in the logits' dtype.
With model.logit_softcap = 0 (no softcap) z = x and z' = 1.

Both are custom ops (`pgolf::softcap_ce`, `pgolf::softcap_ce_backward`) with fake functions and a registered
backward, so torch.compile keeps them as opaque graph nodes. They run on CUDA when Triton imports; anywhere
else the reference runs. Targets must lie in [0, V) (no ignore index). The scorers keep head_logits and their
own cross-entropy: the kernels serve the training steps (GPT.set_training_kernels).
"""

import torch
import torch.nn.functional as F

from pgolf.model.fused_qk import triton
from pgolf.model.layers import softcap_logits

# `triton` (the module, or None where it is not installed) comes from fused_qk, whose fallback binds it to
# None: a second binding of that name here would clash in the exported single file, one shared namespace
try:
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    pass

CE_MAX_BLOCK = 1024  # columns of a row one loop iteration of a program takes
CE_REDUCTIONS = ("mean", "sum", "none")


def softcapped_ce_reference(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                            reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy of softcap(float32 logits) (..., V) against targets (...), as GPT.forward's plain path;
    "none" gives a float32 loss of targets' shape."""
    capped = softcap_logits(logits.float(), softcap)
    loss = F.cross_entropy(capped.reshape(-1, capped.size(-1)), targets.reshape(-1), reduction=reduction)
    return loss.view_as(targets) if reduction == "none" else loss


def fused_ce_supported(logits: torch.Tensor) -> bool:
    """Whether the Triton kernels take these logits: CUDA and a float dtype."""
    return (triton is not None and logits.is_cuda
            and logits.dtype in (torch.bfloat16, torch.float16, torch.float32))


def softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                             reduction: str = "mean", fused: bool = True) -> torch.Tensor:
    """The cross-entropy of softcap(logits) (..., V) against targets (...): through the kernels when asked
    for and supported, else softcapped_ce_reference. reduction "mean" | "sum" | "none" (targets' shape)."""
    if reduction not in CE_REDUCTIONS:
        raise ValueError(f"softcapped_cross_entropy: reduction={reduction!r} is not one of {CE_REDUCTIONS}")
    if not (fused and fused_ce_supported(logits)):
        return softcapped_ce_reference(logits, targets, softcap, reduction)
    losses, _ = torch.ops.pgolf.softcap_ce(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          float(softcap))
    if reduction == "none":
        return losses.view_as(targets)
    return losses.mean() if reduction == "mean" else losses.sum()


def ce_block_cols(n_cols: int) -> int:
    """The block of columns one loop iteration takes: a power of two, at most CE_MAX_BLOCK."""
    return min(CE_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1)))


if triton is not None:

    @triton.jit
    def ce_capped(x, cap, CAPPED: tl.constexpr):
        """cap * tanh(x / cap) through the sigmoid (tanh(u) = 2 sigmoid(2u) - 1); x itself without a cap."""
        if CAPPED:
            x = cap * (2.0 * tl.sigmoid(x * (2.0 / cap)) - 1.0)
        return x

    @triton.jit
    def ce_row_block(row_ptr, cols, n_cols, cap, CAPPED: tl.constexpr):
        """The softcapped float32 logits of one block of a row; -inf past the row's end."""
        inside = cols < n_cols
        x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        return tl.where(inside, ce_capped(x, cap, CAPPED), float("-inf"))

    @triton.jit
    def softcap_ce_fwd_kernel(x_ptr, target_ptr, loss_ptr, lse_ptr, stride_row, n_cols, cap,
                              CAPPED: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = x_ptr + row * stride_row
        cols = tl.arange(0, BLOCK)
        # the first block starts the running max and sum; every block holds at least one real column
        z = ce_row_block(row_ptr, cols, n_cols, cap, CAPPED)
        run_max = tl.max(z, axis=0)
        run_sum = tl.sum(tl.exp(z - run_max), axis=0)
        for start in range(BLOCK, n_cols, BLOCK):
            z = ce_row_block(row_ptr, start + cols, n_cols, cap, CAPPED)
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        target = tl.load(target_ptr + row)
        z_target = ce_capped(tl.load(row_ptr + target).to(tl.float32), cap, CAPPED)
        tl.store(loss_ptr + row, lse - z_target)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def softcap_ce_bwd_kernel(x_ptr, target_ptr, lse_ptr, grad_ptr, dx_ptr, stride_row, dx_stride_row, n_cols,
                              cap, CAPPED: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = x_ptr + row * stride_row
        dx_row_ptr = dx_ptr + row * dx_stride_row
        lse = tl.load(lse_ptr + row)
        grad = tl.load(grad_ptr + row)
        target = tl.load(target_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            if CAPPED:
                s = tl.sigmoid(x * (2.0 / cap))
                dz = grad * (tl.exp(cap * (2.0 * s - 1.0) - lse) - tl.where(cols == target, 1.0, 0.0))
                dx = dz * (4.0 * s * (1.0 - s))
            else:
                dx = grad * (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0))
            tl.store(dx_row_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def ce_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits with unit column stride and (N,) int64 targets, as the kernels read them."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"softcap_ce: expected (N, V) logits and (N,) targets, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits, targets.to(torch.int64).contiguous()


@torch.library.custom_op("pgolf::softcap_ce", mutates_args=())
def softcap_ce(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per row, float32: the cross-entropy of softcap(logits) and its log-sum-exp."""
    logits, targets = ce_inputs(logits, targets)
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        softcap_ce_fwd_kernel[(n_rows,)](logits, targets, losses, lse, logits.stride(0), n_cols, float(softcap),
                                         CAPPED=softcap > 0, BLOCK=ce_block_cols(n_cols))
    return losses, lse


@softcap_ce.register_fake
def softcap_ce_fake(logits, targets, softcap):
    n_rows = logits.shape[0]
    return logits.new_empty((n_rows,), dtype=torch.float32), logits.new_empty((n_rows,), dtype=torch.float32)


@torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=())
def softcap_ce_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_losses: torch.Tensor,
                        softcap: float) -> torch.Tensor:
    """d(sum of grad_losses x loss)/d logits, in the logits' dtype (contiguous)."""
    logits, targets = ce_inputs(logits, targets)
    n_rows, n_cols = logits.shape
    dx = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows:
        softcap_ce_bwd_kernel[(n_rows,)](logits, targets, lse.contiguous(), grad_losses.float().contiguous(), dx,
                                         logits.stride(0), dx.stride(0), n_cols, float(softcap),
                                         CAPPED=softcap > 0, BLOCK=ce_block_cols(n_cols))
    return dx


@softcap_ce_backward.register_fake
def softcap_ce_backward_fake(logits, targets, lse, grad_losses, softcap):
    return logits.new_empty(logits.shape)


def softcap_ce_setup(ctx, inputs, output):
    logits, targets, softcap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.softcap = float(softcap)


def softcap_ce_grad(ctx, grad_losses, _grad_lse):
    """The loss's gradient only: lse is an auxiliary output (the backward's input), not differentiated."""
    logits, targets, lse = ctx.saved_tensors
    dx = torch.ops.pgolf.softcap_ce_backward(logits, targets, lse, grad_losses, ctx.softcap)
    return dx, None, None


softcap_ce.register_autograd(softcap_ce_grad, setup_context=softcap_ce_setup)
