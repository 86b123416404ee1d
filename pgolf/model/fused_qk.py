"""The attention's query/key preparation as one kernel: per-head RMSNorm, partial RoPE and the q gain.

The plain path (`qk_prep_reference`, what CausalSelfAttention runs without model.fused_qk) is three PyTorch
steps: F.rms_norm over each head, apply_rotary, and the per-head gain, each rounded to the input's dtype.
torch.compile fuses them, but on an H100/H200 its backward kernels for them ran at a sixth of the memory
bandwidth (4.8 ms of a 77.5 ms `record` step for the queries alone, docs/benchmarks.md): one Triton kernel
per direction instead reads each row of 64 values once, computes in float32 and rounds once at the end.

Layout: x is (B, T, H, D) with unit stride along D (any strides elsewhere); cos and sin are the (T, R/2)
float32 tables of Rotary.cos_sin; dimensions past R pass through. The gain is one float32 value per head
(queries) or None (keys). The kernels run on CUDA when Triton imports; everywhere else the reference runs.
They serve the training steps only (GPT.set_training_kernels): in the record's evaluation they made the
scoring forwards and TTT's steps about 20 % slower on an H200 (docs/benchmarks.md, tenth session).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from pgolf.model.layers import apply_rotary

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

ROWS_PER_PROGRAM = 64


def qk_prep_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      gain: torch.Tensor | None) -> torch.Tensor:
    """rms_norm over D, then RoPE on the first 2 * cos.size(-1) dimensions, then x gain[h]; in x's dtype."""
    y = apply_rotary(F.rms_norm(x, (x.size(-1),)), cos, sin)
    if gain is not None:
        y = y * gain.to(y.dtype)[:, None]
    return y


def fused_qk_supported(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the Triton kernels take this input: CUDA, 16-bit floats, D a power of two with unit stride."""
    d = x.size(-1)
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.stride(-1) == 1 and d >= 16 and d & (d - 1) == 0 and 2 * cos.size(-1) <= d
            and cos.size(-1) >= 1)


def qk_prep(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor | None,
            fused: bool) -> torch.Tensor:
    """The prepared queries or keys: the fused kernels when asked for and supported, else the reference."""
    if fused and fused_qk_supported(x, cos):
        y, _ = torch.ops.pgolf.qk_norm_rope(x, cos.float().contiguous(), sin.float().contiguous(),
                                           None if gain is None else gain.float())
        return y
    return qk_prep_reference(x, cos, sin, gain)


if triton is not None:

    @triton.jit
    def qk_rows(pid, n_rows, T, H, ROWS: tl.constexpr):
        """The rows (b, t, h flattened) of one program: their index, validity, batch, position and head."""
        rows = pid * ROWS + tl.arange(0, ROWS)
        bt = rows // H
        return rows, rows < n_rows, bt // T, bt % T, rows % H

    @triton.jit
    def row_offsets(batch, pos, head, sb, st, sh):
        """Where each row starts in a tensor of strides (sb, st, sh) over (B, T, H)."""
        return batch.to(tl.int64) * sb + pos.to(tl.int64) * st + head.to(tl.int64) * sh

    @triton.jit
    def rope_tables(cos_ptr, sin_ptr, pos, valid, D: tl.constexpr, HALF: tl.constexpr):
        """Per element: the column, its RoPE partner, cos, and sin signed for the partner (+ for the first
        half of the rotated dims, - for the second, 0 and cos 1 past them): y = x cos + x[partner] sin."""
        cols = tl.arange(0, D)
        rotated = cols < 2 * HALF
        partner = tl.where(cols < HALF, cols + HALF, tl.where(rotated, cols - HALF, cols))
        table = pos[:, None] * HALF + tl.where(rotated, cols % HALF, 0)[None, :]
        inside = valid[:, None] & rotated[None, :]
        c = tl.load(cos_ptr + table, mask=inside, other=1.0)
        s = tl.load(sin_ptr + table, mask=inside, other=0.0)
        s = tl.where((cols < HALF)[None, :], s, -s)
        return cols, partner, c, s

    @triton.jit
    def qk_norm_rope_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, y_ptr, rstd_ptr,
                                n_rows, T, H, sxb, sxt, sxh, eps,
                                D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr,
                                ROWS: tl.constexpr):
        rows, valid, batch, pos, head = qk_rows(tl.program_id(0), n_rows, T, H, ROWS)
        offsets = row_offsets(batch, pos, head, sxb, sxt, sxh)
        cols, partner, c, s = rope_tables(cos_ptr, sin_ptr, pos, valid, D, HALF)
        mask = valid[:, None]
        x = tl.load(x_ptr + offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + offsets[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        y = (x * c + xp * s) * rstd[:, None]
        if HAS_GAIN:
            y = y * tl.load(gain_ptr + head, mask=valid, other=0.0)[:, None]
        out = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=valid)

    @triton.jit
    def qk_norm_rope_bwd_kernel(dy_ptr, x_ptr, rstd_ptr, cos_ptr, sin_ptr, gain_ptr, dx_ptr, dgain_ptr,
                                n_rows, T, H, sdb, sdt, sdh, sxb, sxt, sxh,
                                D: tl.constexpr, HALF: tl.constexpr, HAS_GAIN: tl.constexpr,
                                ROWS: tl.constexpr):
        rows, valid, batch, pos, head = qk_rows(tl.program_id(0), n_rows, T, H, ROWS)
        x_offsets = row_offsets(batch, pos, head, sxb, sxt, sxh)
        dy_offsets = row_offsets(batch, pos, head, sdb, sdt, sdh)
        cols, partner, c, s = rope_tables(cos_ptr, sin_ptr, pos, valid, D, HALF)
        mask = valid[:, None]
        dy = tl.load(dy_ptr + dy_offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dyp = tl.load(dy_ptr + dy_offsets[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + x_offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=valid, other=0.0)
        if HAS_GAIN:
            xp = tl.load(x_ptr + x_offsets[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            rotated = (x * c + xp * s) * rstd[:, None]
            tl.store(dgain_ptr + rows, tl.sum(dy * rotated, axis=1), mask=valid)
            g = tl.load(gain_ptr + head, mask=valid, other=0.0)[:, None]
            dy = dy * g
            dyp = dyp * g
        dn = dy * c - dyp * s  # the rotation's transpose
        n = x * rstd[:, None]
        dx = (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None]) * rstd[:, None]
        out = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def launch_grid(n_rows: int) -> tuple[int]:
    return (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)


# The custom ops' signatures say Optional[...]: torch.library reads their schema from the annotations, and
# that spelling is the one run on the device's torch (2.11); torch 2.13 parses X | None as well.
@torch.library.custom_op("pgolf::qk_norm_rope", mutates_args=())
def qk_norm_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 gain: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045
    """(y, rstd): y as qk_prep_reference in x's dtype (contiguous), rstd the float32 1/rms of each row."""
    b, t, h, d = x.shape
    y = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    rstd = torch.empty((b, t, h), dtype=torch.float32, device=x.device)
    n_rows = b * t * h
    if n_rows:
        qk_norm_rope_fwd_kernel[launch_grid(n_rows)](
            x, cos, sin, x if gain is None else gain, y, rstd, n_rows, t, h,
            x.stride(0), x.stride(1), x.stride(2), torch.finfo(torch.float32).eps,
            D=d, HALF=cos.size(-1), HAS_GAIN=gain is not None, ROWS=ROWS_PER_PROGRAM)
    return y, rstd


@qk_norm_rope.register_fake
def qk_norm_rope_fake(x, cos, sin, gain):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pgolf::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, gain: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045
    """(dx, dgain): dgain per head (float32; empty without a gain)."""
    b, t, h, d = x.shape
    dx = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    n_rows = b * t * h
    row_dgain = torch.empty(n_rows if gain is not None else 0, dtype=torch.float32, device=x.device)
    if n_rows:
        qk_norm_rope_bwd_kernel[launch_grid(n_rows)](
            dy, x, rstd, cos, sin, x if gain is None else gain, dx, row_dgain, n_rows, t, h,
            dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
            D=d, HALF=cos.size(-1), HAS_GAIN=gain is not None, ROWS=ROWS_PER_PROGRAM)
    dgain = row_dgain.view(-1, h).sum(0) if gain is not None else row_dgain
    return dx, dgain


@qk_norm_rope_backward.register_fake
def qk_norm_rope_backward_fake(dy, x, rstd, cos, sin, gain):
    return x.new_empty(x.shape), x.new_empty((x.size(2) if gain is not None else 0,), dtype=torch.float32)


def qk_norm_rope_setup(ctx, inputs, output):
    x, cos, sin, gain = inputs
    ctx.save_for_backward(x, output[1], cos, sin, gain)  # gain may be None


def qk_norm_rope_grad(ctx, dy, _drstd):
    x, rstd, cos, sin, gain = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, dgain = torch.ops.pgolf.qk_norm_rope_backward(dy, x, rstd, cos, sin, gain)
    return dx, None, None, None if gain is None else dgain


qk_norm_rope.register_autograd(qk_norm_rope_grad, setup_context=qk_norm_rope_setup)
