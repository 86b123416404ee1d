"""The fused q/k preparation kernels (pgolf.model.fused_qk) against their PyTorch reference.

Without a GPU the Triton kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET), so the
same kernel source is checked on CPU tensors; the GPU tests check it compiled, in bf16, inside the model.
"""

import dataclasses

import pytest
import torch

import pgolf.model.fused_qk as fused_qk
from pgolf.model.fused_qk import qk_prep, qk_prep_reference
from pgolf.model.gpt import GPT
from pgolf.model.layers import Rotary

needs_triton = pytest.mark.skipif(fused_qk.triton is None, reason="the triton package is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_both(x, cos, sin, gain, grad_out):
    """(y, dx, dgain) of the reference and of the kernels, from the same inputs and output gradient."""
    results = []
    for fused in (False, True):
        xi = x.detach().clone().requires_grad_(True)
        gi = None if gain is None else gain.detach().clone().requires_grad_(True)
        y = torch.ops.pgolf.qk_norm_rope(xi, cos, sin, gi)[0] if fused else qk_prep_reference(xi, cos, sin, gi)
        (y.float() * grad_out).sum().backward()
        results.append((y.detach().float(), xi.grad.float(), None if gi is None else gi.grad))
    return results


def tables(t, head_dim, rope_dims):
    return Rotary(head_dim, rope_dims).cos_sin(t, torch.device(DEVICE))


@needs_triton
@pytest.mark.parametrize("rope_dims", [16, 64])
@pytest.mark.parametrize("with_gain", [True, False])
def test_kernels_match_reference_fp32(rope_dims, with_gain):
    # 2 x 37 x 4 rows: not a multiple of the 64 rows a program takes, so the masked tail is exercised
    torch.manual_seed(0)
    b, t, h, d = 2, 37, 4, 64
    x = 3 * torch.randn(b, t, h, d, device=DEVICE)
    cos, sin = tables(t, d, rope_dims)
    gain = torch.rand(h, device=DEVICE) + 0.5 if with_gain else None
    grad_out = torch.randn(b, t, h, d, device=DEVICE)
    (y_ref, dx_ref, dg_ref), (y, dx, dg) = run_both(x, cos, sin, gain, grad_out)
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=2e-6, rtol=1e-5)
    if with_gain:
        torch.testing.assert_close(dg, dg_ref, atol=1e-4, rtol=1e-5)


@needs_triton
def test_kernels_rstd_is_the_rows_inverse_rms():
    x = torch.randn(1, 3, 2, 32, device=DEVICE)
    cos, sin = tables(3, 32, 8)
    _, rstd = torch.ops.pgolf.qk_norm_rope(x, cos, sin, None)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + torch.finfo(torch.float32).eps))


@needs_triton
def test_kernels_take_strided_inputs_and_gradients():
    """x as a view of a wider tensor (a slice of positions, as the scoring cut takes queries), and an
    output gradient laid out (B, H, T, D) as an attention kernel's backward returns it."""
    torch.manual_seed(1)
    b, t, h, d = 2, 20, 4, 64
    wide = torch.randn(b, t + 5, h, d, device=DEVICE)
    assert not wide[:, 5:].is_contiguous()
    cos, sin = tables(t, d, 16)
    gain = torch.rand(h, device=DEVICE) + 0.5
    grad_bhtd = torch.randn(b, h, t, d, device=DEVICE)

    def prepared(fn):
        leaf = wide.detach().clone().requires_grad_(True)
        gi = gain.detach().clone().requires_grad_(True)
        y = fn(leaf[:, 5:], cos, sin, gi)
        y.backward(grad_bhtd.transpose(1, 2))  # a (B, T, H, D) view of (B, H, T, D) memory
        return y.detach(), leaf.grad, gi.grad

    y_ref, dx_ref, dg_ref = prepared(qk_prep_reference)
    y, dx, dg = prepared(lambda *a: torch.ops.pgolf.qk_norm_rope(*a)[0])
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dg, dg_ref, atol=1e-4, rtol=1e-5)


def test_qk_prep_falls_back_to_the_reference_where_unsupported():
    x = torch.randn(1, 4, 2, 16)  # on CPU: the kernels are for CUDA
    cos, sin = Rotary(16, 8).cos_sin(4, torch.device("cpu"))
    assert not fused_qk.fused_qk_supported(x, cos)
    assert torch.equal(qk_prep(x, cos, sin, None, fused=True), qk_prep_reference(x, cos, sin, None))


def test_unfused_attention_is_the_reference_composition(tiny_cfg):
    """model.fused_qk off: the attention's q/k are exactly rms_norm -> RoPE -> gain, as before the flag."""
    torch.manual_seed(0)
    model = GPT(tiny_cfg.model)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        model.blocks[0].attn.q_gain.uniform_(0.5, 2.0)
        before = model(ids)
        model.blocks[0].attn.fused_qk = True  # unsupported on CPU: the same reference runs
        assert torch.equal(model(ids), before)


def plain_and_fused(model_cfg, monkeypatch) -> tuple[GPT, GPT]:
    """Two GPTs with the same weights, fused_qk off and on, the kernels allowed on this device and dtype;
    the q gains and attention projections perturbed (the zero init would hide the attention's gradient)."""
    monkeypatch.setattr(fused_qk, "fused_qk_supported", lambda x, cos: True)
    torch.manual_seed(0)
    plain = GPT(dataclasses.replace(model_cfg, fused_qk=False)).to(DEVICE)
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.q_gain.uniform_(0.5, 2.0)
            block.attn.proj.weight.normal_(0, 0.02)
    fused = GPT(dataclasses.replace(model_cfg, fused_qk=True)).to(DEVICE)
    assert not any(block.attn.fused_qk for block in fused.blocks)  # a GPT is built for evaluation
    fused.set_training_kernels(fp8=False, fused_qk=True)  # what pgolf.train does for its steps
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@needs_triton
def test_model_with_fused_qk_matches_plain(tiny_cfg, monkeypatch):
    """The whole GPT, forward and backward, with every attention's q/k through the kernels (allowed on this
    device and dtype for the test), against the plain model: same logits and gradients to float32 rounding."""
    plain, fused = plain_and_fused(tiny_cfg.model, monkeypatch)
    assert all(block.attn.fused_qk for block in fused.blocks)
    assert not any(block.attn.fused_qk for block in plain.blocks)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (2, 32), device=DEVICE)
    targets = torch.randint(0, tiny_cfg.model.vocab_size, (2, 32), device=DEVICE)
    plain(ids, targets).backward()
    fused(ids, targets).backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert plain.blocks[0].attn.q_gain.grad.abs().sum() > 0


@needs_triton
def test_scoring_cut_with_fused_qk_matches_plain(tiny_cfg, monkeypatch):
    """forward_hidden with `keep` (the scoring forward: the last block's queries on the kept positions, with
    the RoPE tables' tail) through the kernels equals the plain model's."""
    plain, fused = plain_and_fused(tiny_cfg.model, monkeypatch)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (3, 40), device=DEVICE)
    with torch.no_grad():
        for keep in (None, 7):
            torch.testing.assert_close(fused.forward_hidden(ids, keep), plain.forward_hidden(ids, keep),
                                       atol=1e-5, rtol=1e-4)


@needs_triton
def test_fused_ops_trace_through_aot_autograd(monkeypatch):
    """Under torch.compile the kernels are opaque ops: their fake (shape) functions and the registered
    backward must carry the graph through AOTAutograd (backend aot_eager: no Inductor, quick on a CPU)."""
    monkeypatch.setattr(fused_qk, "fused_qk_supported", lambda x, cos: True)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 32, device=DEVICE)
    cos, sin = tables(8, 32, 8)
    gain = torch.rand(4, device=DEVICE) + 0.5
    grad_out = torch.randn(2, 8, 4, 32, device=DEVICE)
    fn = lambda xi, gi: qk_prep(xi, cos, sin, gi, fused=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        xi, gi = x.clone().requires_grad_(True), gain.clone().requires_grad_(True)
        y = f(xi, gi)
        (y * grad_out).sum().backward()
        results.append((y.detach(), xi.grad, gi.grad))
    torch._dynamo.reset()
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_kernels_bf16_against_fp32_reference(compiled):
    """bf16 on the GPU, at the record's head shape, against the float32 reference on the same bf16 inputs:
    the kernels compute in float32 and round once, so their error is no larger than the bf16 reference's
    (which rounds after each step and rounds the gain first); compiled, they run as opaque graph ops."""
    torch.manual_seed(0)
    b, t, h, d = 4, 512, 8, 64
    x = torch.randn(b, t, h, d, device="cuda").bfloat16()
    cos, sin = tables(t, d, 16)
    gain = torch.rand(h, device="cuda") + 1.0
    grad_out = torch.randn(b, t, h, d, device="cuda")
    fn = lambda xi, gi: qk_prep(xi, cos, sin, gi, fused=True)
    if compiled:
        fn = torch.compile(fn, fullgraph=True)

    def grads(f, dtype):
        xi = x.to(dtype).detach().clone().requires_grad_(True)
        gi = gain.clone().requires_grad_(True)
        y = f(xi, gi)
        (y.float() * grad_out).sum().backward()
        return y.float(), xi.grad.float(), gi.grad

    exact = grads(lambda xi, gi: qk_prep_reference(xi, cos, sin, gi), torch.float32)
    plain16 = grads(lambda xi, gi: qk_prep_reference(xi, cos, sin, gi), torch.bfloat16)
    fused16 = grads(fn, torch.bfloat16)
    rms = lambda e: e.pow(2).mean().sqrt().item()
    for name, want, ref16, got in zip(("y", "dx", "dgain"), exact, plain16, fused16, strict=True):
        err, ref_err = rms(got - want), rms(ref16 - want)
        print(f"{name}: rms error fused {err:.3g}, bf16 reference {ref_err:.3g}")
        assert err <= 1.1 * ref_err, f"{name}: fused {err:.3g} against the bf16 reference's {ref_err:.3g}"
