"""The fused softcapped cross-entropy (pgolf.model.fused_ce) against its PyTorch reference.

Without a GPU the Triton kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET), so the
same kernel source is checked on CPU tensors; the GPU tests check it compiled, in bf16, alone and in the GPT.
"""

import dataclasses

import pytest
import torch

import pgolf.model.fused_ce as fused_ce
from pgolf.model.fused_ce import softcapped_ce_reference, softcapped_cross_entropy
from pgolf.model.gpt import GPT
from pgolf.model.layers import softcap_logits

needs_triton = pytest.mark.skipif(fused_ce.triton is None, reason="the triton package is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def op_and_reference(logits, targets, softcap, grad_out):
    """(loss, dlogits) per row of the op and of the reference, from the same inputs and loss gradient."""
    results = []
    for fused in (True, False):
        x = logits.detach().clone().requires_grad_(True)
        if fused:
            loss = torch.ops.pgolf.softcap_ce(x, targets, softcap)[0]
        else:
            loss = softcapped_ce_reference(x, targets, softcap, reduction="none")
        (loss * grad_out).sum().backward()
        results.append((loss.detach(), x.grad))
    return results


@needs_triton
@pytest.mark.parametrize("softcap,vocab", [(30.0, 2500), (30.0, 64), (5.0, 1024), (0.0, 700)])
def test_op_matches_reference_fp32(softcap, vocab):
    # 2500 columns: three blocks of 1024, the last one masked; logits far past the cap (std 20 against 5)
    torch.manual_seed(0)
    n = 37
    logits = 20 * torch.randn(n, vocab, device=DEVICE)
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    grad_out = torch.randn(n, device=DEVICE)
    (loss, dx), (loss_ref, dx_ref) = op_and_reference(logits, targets, softcap, grad_out)
    torch.testing.assert_close(loss, loss_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=2e-6, rtol=1e-4)
    assert dx.abs().sum() > 0 and dx.dtype == logits.dtype


@needs_triton
def test_op_lse_is_the_softcapped_logsumexp():
    logits = 10 * torch.randn(5, 300, device=DEVICE)
    targets = torch.randint(0, 300, (5,), device=DEVICE)
    losses, lse = torch.ops.pgolf.softcap_ce(logits, targets, 30.0)
    capped = softcap_logits(logits, 30.0)
    torch.testing.assert_close(lse, torch.logsumexp(capped, dim=-1))
    torch.testing.assert_close(losses, lse - capped.gather(1, targets[:, None])[:, 0])


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_wrapper_reductions_match_reference(reduction, monkeypatch):
    """softcapped_cross_entropy on (B, T, V) logits with the kernels allowed here: the mean's gradient
    reaches the backward kernel as a stride-0 expand, the "none" loss keeps the targets' shape."""
    monkeypatch.setattr(fused_ce, "fused_ce_supported", lambda logits: True)
    torch.manual_seed(1)
    logits = 8 * torch.randn(2, 9, 130, device=DEVICE)
    targets = torch.randint(0, 130, (2, 9), device=DEVICE)
    outs = []
    for fn in (softcapped_cross_entropy, softcapped_ce_reference):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets, 30.0, reduction)
        (loss if reduction != "none" else loss.square()).sum().backward()
        outs.append((loss.detach(), x.grad))
    assert outs[0][0].shape == outs[1][0].shape == ((2, 9) if reduction == "none" else ())
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        softcapped_cross_entropy(logits, targets, 30.0, "max")


@needs_triton
def test_op_takes_a_strided_row_view():
    """Logits whose rows are a slice of a wider buffer (row stride > V): the op reads them in place."""
    wide = 6 * torch.randn(11, 200, device=DEVICE)
    logits = wide[:, 20:170]
    assert logits.stride(0) == 200 and not logits.is_contiguous()
    targets = torch.randint(0, 150, (11,), device=DEVICE)
    grad_out = torch.rand(11, device=DEVICE)
    (loss, dx), (loss_ref, dx_ref) = op_and_reference(logits, targets, 30.0, grad_out)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-6, rtol=1e-4)


def test_fallback_is_the_plain_path_bit_for_bit(tiny_cfg):
    """On CPU the kernels are unsupported: with model.fused_ce on, the GPT computes exactly the plain loss."""
    x = 5 * torch.randn(3, 4, 50)
    t = torch.randint(0, 50, (3, 4))
    assert not fused_ce.fused_ce_supported(x)
    assert torch.equal(softcapped_cross_entropy(x, t, 30.0), softcapped_ce_reference(x, t, 30.0))
    torch.manual_seed(0)
    model = GPT(tiny_cfg.model)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (2, 16))
    targets = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        plain = model(ids, targets), model(ids, targets, reduction="none")
        model.set_training_kernels(fp8=False, fused_qk=False, fused_ce=True)
        assert model.fused_ce
        fused = model(ids, targets), model(ids, targets, reduction="none")
        assert torch.equal(model(ids), model.logits(ids))  # without targets: the logits, as before
    assert torch.equal(plain[0], fused[0]) and torch.equal(plain[1], fused[1])


def plain_and_fused(model_cfg, monkeypatch) -> tuple[GPT, GPT]:
    """Two GPTs with the same weights, the second with fused_ce on and the kernels allowed on this device."""
    monkeypatch.setattr(fused_ce, "fused_ce_supported", lambda logits: True)
    torch.manual_seed(0)
    plain = GPT(model_cfg).to(DEVICE)
    with torch.no_grad():
        plain.tok_emb.weight.normal_(0, 0.5)  # logits large enough that the softcap bends them
    fused = GPT(dataclasses.replace(model_cfg, fused_ce=True)).to(DEVICE)
    assert not fused.fused_ce  # a GPT is built for evaluation
    fused.set_training_kernels(fp8=False, fused_qk=False, fused_ce=True)  # what pgolf.train does
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@needs_triton
def test_model_with_fused_ce_matches_plain(tiny_cfg, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg.model, logit_softcap=3.0)
    plain, fused = plain_and_fused(cfg, monkeypatch)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    targets = torch.randint(0, cfg.vocab_size, (2, 24), device=DEVICE)
    loss_plain, loss_fused = plain(ids, targets), fused(ids, targets)
    torch.testing.assert_close(loss_fused, loss_plain, atol=1e-5, rtol=1e-5)
    loss_plain.backward()
    loss_fused.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert plain.tok_emb.weight.grad.abs().sum() > 0


@needs_triton
def test_fused_ops_trace_through_aot_autograd():
    """Under torch.compile the kernels are opaque ops: their fake functions and registered backward carry
    the graph through AOTAutograd (backend aot_eager: no Inductor, quick on a CPU)."""
    torch.manual_seed(0)
    logits = 6 * torch.randn(13, 90, device=DEVICE)
    targets = torch.randint(0, 90, (13,), device=DEVICE)
    fn = lambda x: torch.ops.pgolf.softcap_ce(x, targets, 30.0)[0].mean()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        x = logits.clone().requires_grad_(True)
        loss = f(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch._dynamo.reset()
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_kernels_bf16_against_fp32_reference(compiled):
    """bf16 logits at the frontier's head shape (V = 8192, a block of rows), against the float32 reference on
    the same bf16 inputs: the loss to float32 accumulation, the gradient no further from it than the bf16
    plain path's (both round once to bf16); compiled, the ops run as opaque graph nodes."""
    torch.manual_seed(0)
    n, v = 4096, 8192
    logits = (15 * torch.randn(n, v, device="cuda")).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda")
    fused = lambda x: softcapped_cross_entropy(x, targets, 30.0)
    if compiled:
        fused = torch.compile(fused, fullgraph=True)

    def run(fn, dtype):
        x = logits.to(dtype).detach().clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        return loss.detach().float(), x.grad.float()

    exact = run(lambda x: softcapped_ce_reference(x, targets, 30.0), torch.float32)
    plain16 = run(lambda x: softcapped_ce_reference(x, targets, 30.0), torch.bfloat16)
    fused16 = run(fused, torch.bfloat16)
    assert abs(fused16[0].item() - exact[0].item()) < 1e-4 * abs(exact[0].item()) + 1e-5
    rms = lambda e: e.pow(2).mean().sqrt().item()
    err, ref_err = rms(fused16[1] - exact[1]), rms(plain16[1] - exact[1])
    print(f"dlogits: rms error fused {err:.3g}, bf16 plain path {ref_err:.3g}")
    assert err <= 1.1 * ref_err + 1e-12


@pytest.mark.gpu
def test_gpu_compiled_model_with_fused_ce_matches_plain(tiny_cfg):
    """The tiny GPT torch.compile'd under bf16 autocast, as pgolf.train runs it: loss and gradients with the
    fused loss against the plain loss (same weights, same bf16 logits; the two round dlogits to bf16 apart,
    so each parameter's gradient is compared by its norm)."""
    torch.manual_seed(0)
    plain = GPT(tiny_cfg.model).cuda()
    fused = GPT(dataclasses.replace(tiny_cfg.model, fused_ce=True)).cuda()
    fused.load_state_dict(plain.state_dict())
    fused.set_training_kernels(fp8=False, fused_qk=False, fused_ce=True)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (4, 128), device="cuda")
    targets = torch.randint(0, tiny_cfg.model.vocab_size, (4, 128), device="cuda")
    losses = []
    for model in (plain, fused):
        step = torch.compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(ids, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        if p.grad is not None:
            diff = (q.grad - p.grad).norm().item()
            assert diff <= 0.02 * p.grad.norm().item() + 1e-6, (name, diff, p.grad.norm().item())
    assert plain.tok_emb.weight.grad.norm() > 0


def test_trainer_switches_fused_ce_for_its_steps_only(tiny_cfg):
    from pgolf.train.loop import build_model, set_training_kernels

    tiny_cfg.model.fused_ce = True
    model = build_model(tiny_cfg, torch.device("cpu"))
    assert model.fused_ce  # on for the training steps
    set_training_kernels(model, tiny_cfg, False)
    assert not model.fused_ce  # off for calibration, evaluation and export
    tiny_cfg.model.fused_ce = False
    assert not build_model(tiny_cfg, torch.device("cpu")).fused_ce
