"""FP8 training matmuls (train.fp8, pgolf.model.fp8) against their plain PyTorch reference and the bf16 linear.

torch._scaled_mm runs on the CPU too, so these tests run the fast path's own code; the GPU test runs it on
the FP8 tensor cores, compiled.
"""

import pytest
import torch
import torch.nn.functional as F

import pgolf.model.layers as layers
from pgolf.model.fp8 import (
    E4M3_MAX,
    fp8_linear,
    fp8_linear_reference,
    fp8_supported,
    round_rows_e4m3,
    to_e4m3_rows,
)
from pgolf.model.gpt import GPT
from pgolf.model.layers import CastedLinear


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def operands(m=64, k=128, n=96, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[3] *= 50.0  # an outlier row: with per-row scales it costs precision in its own row only
    w = torch.randn(n, k, generator=g) * 0.05
    return x.to(device, dtype), w.to(device, dtype)


def test_e4m3_rows_puts_each_row_max_on_448_and_round_trips():
    x, _ = operands()
    x[5] = 0.0
    q, scale = to_e4m3_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and scale.shape == (x.size(0), 1)
    peaks = q.float().abs().amax(dim=1)
    assert torch.all(peaks[torch.arange(x.size(0)) != 5] == E4M3_MAX)
    assert torch.all(q[5].float() == 0) and torch.isfinite(scale).all()
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: every value within half a step (1/16 relative) of its row's grid
    assert torch.all((back - x).abs() <= x.abs() / 16 + scale * 2.0 ** -9)
    q_t, _ = to_e4m3_rows(x.t())  # a transposed view comes back row-major
    assert q_t.is_contiguous() and q_t.shape == (x.size(1), x.size(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_reference_and_is_close_to_the_plain_linear(dtype):
    x, w = operands(dtype=dtype)
    y = fp8_linear(x, w)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), fp8_linear_reference(x, w).float(), atol=1e-4, rtol=1e-2)
    plain = x.float() @ w.float().t()
    err = rel_rms(y, plain)
    assert 5e-3 < err < 0.06  # FP8 rounding really happened (bf16 alone is ~3e-3), and it is only that
    # the outlier row did not spoil the others: their error is that of rows without outliers
    others = torch.arange(x.size(0)) != 3
    assert rel_rms(y[others], plain[others]) < 0.06


def test_backward_input_gradient_in_fp8_weight_gradient_exact():
    x, w = operands(dtype=torch.bfloat16)
    dy = torch.randn(x.size(0), w.size(0), generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fp8_linear(xi, wi).backward(dy)
    # dx = dy W with dy rounded per token and W per input channel (its columns)
    ref_dx = round_rows_e4m3(dy) @ round_rows_e4m3(w.t()).t()
    torch.testing.assert_close(xi.grad.float(), ref_dx, atol=1e-3, rtol=1e-2)
    assert rel_rms(xi.grad, dy.float() @ w.float()) < 0.06
    # the weight gradient is the plain bf16 matmul, bit for bit
    assert torch.equal(wi.grad, dy.t().mm(x))


def test_three_dim_input_keeps_its_shape_and_gradient_shape():
    x, w = operands(m=2 * 32, dtype=torch.bfloat16)
    x3 = x.reshape(2, 32, -1).requires_grad_(True)
    y = fp8_linear(x3, w)
    assert y.shape == (2, 32, w.size(0))
    y.sum().backward()
    assert x3.grad.shape == x3.shape


def test_supported_shapes_and_dtypes():
    x, w = operands(dtype=torch.bfloat16)
    assert fp8_supported(x, w)
    assert not fp8_supported(x[:, :120], w[:, :120])  # K not a multiple of 16
    assert not fp8_supported(x[:60], w)  # token count not a multiple of 16
    assert not fp8_supported(x, w[:90])  # N not a multiple of 16
    assert not fp8_supported(x.double(), w.double())


def count_fp8_calls(monkeypatch) -> list:
    calls = []

    def counting(x, weight):
        calls.append(tuple(x.shape))
        return fp8_linear(x, weight)

    monkeypatch.setattr(layers, "fp8_linear", counting)
    return calls


def test_casted_linear_uses_fp8_only_with_gradients_on(monkeypatch):
    calls = count_fp8_calls(monkeypatch)
    lin = CastedLinear(128, 96)
    x, _ = operands(dtype=torch.float32)
    plain = F.linear(x, lin.weight)
    lin.fp8 = True
    with torch.no_grad():  # validation, calibration, scoring: the plain matmul, exactly
        assert torch.equal(lin(x), plain)
    assert calls == []
    y = lin(x)
    assert calls == [tuple(x.shape)] and not torch.equal(y, plain) and rel_rms(y, plain) < 0.06
    lin.fp8 = False
    assert torch.equal(lin(x), plain)
    odd = CastedLinear(120, 96)
    odd.fp8 = True
    odd(torch.randn(64, 120))  # K = 120: not taken, plain
    assert len(calls) == 1


def test_gpt_training_kernels_switch_the_block_matrices_and_training_stays_close(tiny_cfg, monkeypatch):
    torch.manual_seed(0)
    plain = GPT(tiny_cfg.model)
    with torch.no_grad():  # the zero-initialized output projections would hide the blocks' gradients
        for block in plain.blocks:
            block.attn.proj.weight.normal_(0, 0.02)
            block.mlp.proj.weight.normal_(0, 0.02)
    fp8 = GPT(tiny_cfg.model)
    fp8.load_state_dict(plain.state_dict())
    fp8.set_training_kernels(fp8=True, fused_qk=False)
    block_linears = [m for m in fp8.blocks.modules() if isinstance(m, CastedLinear)]
    assert block_linears and all(m.fp8 for m in block_linears)
    calls = count_fp8_calls(monkeypatch)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (2, 64))
    targets = torch.randint(0, tiny_cfg.model.vocab_size, (2, 64))
    loss_plain, loss_fp8 = plain(ids, targets), fp8(ids, targets)
    assert len(calls) == len(block_linears)
    assert abs(loss_fp8.item() - loss_plain.item()) < 0.02 * loss_plain.item()
    loss_plain.backward()
    loss_fp8.backward()
    for (name, p), q in zip(plain.named_parameters(), fp8.parameters(), strict=True):
        if p.grad is not None and p.grad.norm() > 0:
            assert rel_rms(q.grad, p.grad) < 0.2, name
    fp8.set_training_kernels(fp8=False, fused_qk=False)
    assert not any(m.fp8 for m in block_linears)


@pytest.mark.gpu
def test_fp8_linear_on_the_gpu_compiled_matches_reference():
    """On the FP8 tensor cores, eager and compiled, forward and input gradient: as close to the reference as
    the CPU path, and the weight gradient equal to the bf16 matmul."""
    x, w = operands(m=4096, k=512, n=1536, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(fp8_linear)
    for fn in (fp8_linear, compiled):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xi, wi)
        y.backward(dy)
        assert rel_rms(y, fp8_linear_reference(x, w)) < 5e-3
        ref_dx = round_rows_e4m3(dy) @ round_rows_e4m3(w.t()).t()
        assert rel_rms(xi.grad, ref_dx) < 5e-3
        assert rel_rms(wi.grad, dy.t().mm(x)) < 1e-2
