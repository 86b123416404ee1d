"""The GPT and its techniques: one test per flag, causality, the BOS mask, QAT, attention paths, param groups."""

import dataclasses
import zlib

import pytest
import torch
import torch.nn.functional as F

from pgolf.model.attention import SDPA_BACKENDS, reference_attention, sdpa_attention
from pgolf.model.features import SMEAR_BOS_ID
from pgolf.model.gpt import GPT, BlockMLP, leaky_relu_squared, virtual_layer_order
from pgolf.model.layers import CastedLinear
from pgolf.quant.formats import fake_quantize_rows
from pgolf.recipes import recipe_record, recipe_tiny

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny matmuls run fastest on one thread, and far faster when the 2 cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain_cfg(**changes):
    """A tiny model with every technique off (the flags are then switched on one at a time)."""
    cfg = dataclasses.replace(
        recipe_tiny().model, vocab_size=VOCAB, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2,
        mlp_slope=0.0, rope_dims=0, xsa_last_n=0, ln_scale=False, smear_gate=False, bigram_buckets=0,
        ve_last_n=0, unet_skips=False, skip_gates=False, parallel_resid_from=-1, ortho_init=False,
        recur_first=-1, recur_last=-1, recur_loops=0, bigram_dim=8, ve_dim=8, attention="math")
    return dataclasses.replace(cfg, **changes)


def record_like_cfg():
    """recipe_tiny's model with the remaining techniques on too: skip gates, recurrence, parallel residuals."""
    return dataclasses.replace(recipe_tiny().model, vocab_size=VOCAB, skip_gates=True, recur_first=1,
                               recur_last=2, recur_loops=1, parallel_resid_from=2, attention="math")


@torch.no_grad()
def perturb(model: GPT, scale: float = 0.05) -> GPT:
    """Add noise seeded by each parameter's name, so zero-initialized parts do something and two models
    with the same parameter names get the same noise."""
    for name, p in model.named_parameters():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def build(cfg, seed=0, recurrence=False):
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.set_recurrence(recurrence)
    return model


def tokens(batch=2, seq=24, seed=1):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Flags that add or rewire computation: the second model takes the first one's shared weights.
STRUCTURAL = {
    "mlp_slope": {"mlp_slope": 0.5},
    "rope_dims": {"rope_dims": 4},
    "rope_base": {"rope_base": 100.0},
    "logit_softcap": {"logit_softcap": 5.0},
    "tie_embeddings": {"tie_embeddings": False},
    "xsa_last_n": {"xsa_last_n": 2},
    "ln_scale": {"ln_scale": True},
    "smear_gate": {"smear_gate": True},
    "bigram_buckets": {"bigram_buckets": 32},
    "ve_last_n": {"ve_last_n": 2},
    "unet_skips": {"unet_skips": True},
    "parallel_resid_from": {"parallel_resid_from": 2},
    "recurrence": {"recur_first": 1, "recur_last": 2, "recur_loops": 1},
}
# Flags that only change the initialization: same seed, no weight copy.
INIT_ONLY = {
    "ortho_init": {"ortho_init": True},
    "qk_gain_init": {"qk_gain_init": 3.0},
    "tied_embed_init_std": {"tied_embed_init_std": 0.05},
}


@pytest.mark.parametrize("flag", sorted(STRUCTURAL) + ["skip_gates"])
def test_each_structural_flag_changes_the_forward(flag):
    base = plain_cfg(unet_skips=True) if flag == "skip_gates" else plain_cfg()
    changes = {"skip_gates": True} if flag == "skip_gates" else STRUCTURAL[flag]
    a = build(base, recurrence=True)
    twin = build(base, seed=5, recurrence=True)
    b = build(dataclasses.replace(base, **changes), seed=5, recurrence=True)
    shared = {k: v for k, v in a.state_dict().items() if k in b.state_dict() and b.state_dict()[k].shape == v.shape}
    for model in (twin, b):
        model.load_state_dict(shared, strict=False)
    for model in (a, twin, b):  # shared weights get the same noise; the flag's own weights their own
        perturb(model)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(a(x), twin(x))  # the comparison can tell equal models apart from different ones
        assert not torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.parametrize("flag", sorted(INIT_ONLY))
def test_each_init_flag_changes_the_forward(flag):
    a = perturb(build(plain_cfg()))
    b = perturb(build(plain_cfg(**INIT_ONLY[flag])))
    with torch.no_grad():
        assert not torch.allclose(a(tokens()), b(tokens()), atol=1e-6)


@pytest.mark.parametrize("recurrence", [False, True])
def test_causal_for_the_record_like_config(recurrence):
    model = perturb(build(record_like_cfg(), recurrence=recurrence)).eval()
    x = tokens(batch=1, seq=20)
    x[0, 0] = SMEAR_BOS_ID
    with torch.no_grad():
        base = model(x)
        for t in (1, 7, 19):
            y = x.clone()
            y[0, t] = (y[0, t] + 5) % VOCAB
            out = model(y)
            assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
            assert not torch.allclose(out[:, t], base[:, t])


def test_recurrence_runs_the_span_again_and_keeps_skips_consistent():
    cfg = record_like_cfg()
    assert virtual_layer_order(cfg, True) == [0, 1, 2, 1, 2, 3]
    model = perturb(build(cfg))
    assert model.skip_weights.shape[0] == 3
    with torch.no_grad():
        off = model(tokens())
        model.set_recurrence(True)
        assert not torch.allclose(model(tokens()), off)


def test_smeargate_bos_mask_blocks_the_previous_document():
    model = perturb(build(plain_cfg(smear_gate=True, bigram_buckets=32)))
    x = tokens(batch=1, seq=16)
    bos = 9
    x[0, bos] = SMEAR_BOS_ID
    y = x.clone()
    y[0, :bos] = (y[0, :bos] + 3) % VOCAB
    y[0, :bos][y[0, :bos] == SMEAR_BOS_ID] = 2
    with torch.no_grad():
        ex, ey = model.embed_inputs(x), model.embed_inputs(y)
        assert torch.equal(ex[:, bos:], ey[:, bos:])
        # Without the BOS the same position does take from the token before it.
        x[0, bos] = y[0, bos] = 5
        assert not torch.allclose(model.embed_inputs(x)[:, bos], model.embed_inputs(y)[:, bos])


def test_mlp_slope_zero_is_relu_squared_and_slope_is_read_at_runtime():
    torch.manual_seed(0)
    mlp = BlockMLP(16, 48, slope=0.0)
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.proj(F.relu(mlp.fc(x)).square()))
        mlp.set_slope(0.5)
        expected = mlp.proj(F.leaky_relu(mlp.fc(x), 0.5).square())
        assert torch.equal(mlp(x), expected)
        assert not torch.allclose(expected, mlp.proj(F.relu(mlp.fc(x)).square()))
    assert "slope" not in mlp.state_dict()  # the config holds it, not the artifact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slope", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_leaky_relu_squared_equals_the_functional_form_bit_for_bit(slope, dtype):
    h = torch.randn(257, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    h[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    assert torch.equal(leaky_relu_squared(h, torch.tensor(slope)), F.leaky_relu(h, slope).square())


def test_one_compiled_mlp_serves_every_slope():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch.manual_seed(0)
    mlp = BlockMLP(16, 48, slope=0.5)
    x = torch.randn(4, 16)
    compiled = torch.compile(mlp, backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        for slope in (0.5, 0.0, 0.3, 0.9):
            mlp.set_slope(slope)
            assert torch.equal(compiled(x), mlp.proj(F.leaky_relu(mlp.fc(x), slope).square())), slope
    assert len(compiles) == 1


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_reference_attention_agrees_with_the_fast_path_on_cpu(heads, kv_heads):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 17, heads, 16, generator=gen)
    k = torch.randn(2, 17, kv_heads, 16, generator=gen)
    v = torch.randn(2, 17, kv_heads, 16, generator=gen)
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(sdpa_attention(q, k, v, SDPA_BACKENDS["math"]), ref, atol=1e-5, rtol=1e-5)
    model = build(plain_cfg(attention="auto"))
    torch.testing.assert_close(model.blocks[0].attn.attend(q, k, v), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref[:, 1:], reference_attention(q, k, v.flip(1))[:, 1:])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_attention_with_fewer_queries_than_keys_reads_them_as_the_last_positions(kv_heads):
    """The last block of a scoring forward (forward_hidden's keep): q holds the last tq of the tk positions;
    each reads the keys up to its own position (bottom-right causal), the same rows as a full attention's."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 17, 4, 16, generator=gen)
    k = torch.randn(2, 17, kv_heads, 16, generator=gen)
    v = torch.randn(2, 17, kv_heads, 16, generator=gen)
    full = reference_attention(q, k, v)
    model = build(plain_cfg(attention="auto"))
    for tq in (1, 5, 16):
        expected = full[:, 17 - tq:]
        torch.testing.assert_close(reference_attention(q[:, 17 - tq:], k, v), expected, atol=1e-6, rtol=1e-6)
        fast = sdpa_attention(q[:, 17 - tq:], k, v, SDPA_BACKENDS["math"])
        torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.blocks[0].attn.attend(q[:, 17 - tq:], k, v), expected, atol=1e-5,
                                   rtol=1e-5)
    # the first of 5 queries sits at position 12: it must not see keys 13..16
    assert not torch.allclose(full[:, 12:13], reference_attention(q[:, 12:13], k[:, :12], v[:, :12]))


@pytest.mark.parametrize("recurrence", [False, True])
@pytest.mark.parametrize("keep", [1, 5, 15, 16, 40])
def test_forward_hidden_with_keep_equals_the_full_forwards_last_positions(keep, recurrence):
    """keep cuts the last block to the positions kept (XSA, value embeddings, skips, parallel residuals and
    recurrence on in this config); the result is the full forward's, also through routed blocks."""
    model = perturb(build(record_like_cfg(), recurrence=recurrence)).eval()
    x = tokens()  # (2, 24)
    full = model.forward_hidden(x)
    want = full[:, max(0, x.size(1) - keep):]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_hidden(x, keep), want, atol=2e-5, rtol=2e-5)
        with model.routed_blocks(lambda block, *args: block(*args)):
            torch.testing.assert_close(model.forward_hidden(x, keep), want, atol=2e-5, rtol=2e-5)
    if keep < x.size(1):
        assert model.forward_hidden(x, keep).shape == (2, keep, model.cfg.model_dim)
    with pytest.raises(ValueError, match="keep=0"):
        model.forward_hidden(x, 0)


def test_block_with_keep_skips_the_work_of_the_positions_it_drops():
    """Not a copy of the full block cut afterwards: its MLP sees only the kept rows."""
    model = build(plain_cfg()).eval()
    block, x = model.blocks[-1], torch.randn(2, 16, 32)
    cos, sin = model.rotary.cos_sin(16, x.device)
    rows = []
    hook = block.mlp.fc.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    try:
        block(x, x, cos, sin, None, 3)
    finally:
        hook.remove()
    assert rows == [3]


@pytest.mark.parametrize("native_gqa", [False, True])
def test_native_gqa_hands_sdpa_the_unexpanded_kv(monkeypatch, native_gqa):
    """With a cuDNN-first list, K/V reach SDPA expanded to the query heads unless model.native_gqa."""
    seen = {}

    def recording_sdpa(q, k, v, is_causal, enable_gqa):  # (B, H, T, D), as SDPA takes them
        seen.update(k_heads=k.size(1), v_heads=v.size(1), enable_gqa=enable_gqa)
        return reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 9, h, 8, generator=gen) for h in (6, 2, 2))
    monkeypatch.setattr("pgolf.model.attention.F.scaled_dot_product_attention", recording_sdpa)
    out = sdpa_attention(q, k, v, SDPA_BACKENDS["cudnn"], native_gqa=native_gqa)
    assert seen == ({"k_heads": 2, "v_heads": 2, "enable_gqa": True} if native_gqa
                    else {"k_heads": 6, "v_heads": 6, "enable_gqa": False})
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    model = build(plain_cfg(native_gqa=native_gqa))
    assert all(block.attn.native_gqa is native_gqa for block in model.blocks)


def test_native_gqa_refuses_the_efficient_kernel():
    from pgolf.config import ConfigError, apply_overrides
    from pgolf.recipes import get_recipe

    with pytest.raises(ConfigError, match="model.native_gqa needs .* model.attention=efficient has none"):
        apply_overrides(get_recipe("tiny"), ["model.native_gqa=true", "model.attention=efficient"])


def test_bf16_residual_stream_stays_bf16_through_every_block():
    """model.residual_dtype=bfloat16: every block (all techniques on, recurrence too) returns bf16, the logits
    and loss stay float32 and close to the float32 stream's, and every parameter still gets a float32 grad."""
    cfg = record_like_cfg()
    ref = perturb(build(cfg, recurrence=True))
    model = build(dataclasses.replace(cfg, residual_dtype="bfloat16"), recurrence=True)
    model.load_state_dict(ref.state_dict())
    dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    x, y = tokens(), tokens(seed=2)
    loss = model(x, y)
    assert dtypes and set(dtypes) == {torch.bfloat16} and len(dtypes) > cfg.num_layers  # the loop ran too
    assert model.logits(x).dtype == loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref(x, y), atol=2e-2, rtol=0)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert grads["tok_emb.weight"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ln_scale_factor_is_the_python_float_product_bit_for_bit(dtype):
    """Block.ln_factor is a tensor (so one compiled block serves every layer); the product must still be
    exactly norm(x) * 1/sqrt(layer+1) as a Python float, the form the records and our old artifacts used."""
    model = build(plain_cfg(ln_scale=True, num_layers=3))
    x = torch.randn(2, 8, 32).to(dtype)
    for layer, block in enumerate(model.blocks):
        expected = block.norm(x) * (1.0 / (layer + 1) ** 0.5)
        got = block.normed(x)
        assert got.dtype == dtype and torch.equal(got, expected), layer
    assert "blocks.0.ln_factor" not in model.state_dict()  # the config holds it; artifacts stay unchanged


def test_routed_blocks_sends_every_virtual_layer_through_the_call_and_restores_it():
    cfg = record_like_cfg()
    model = perturb(build(cfg, recurrence=True))
    x = tokens()
    expected = model.logits(x)
    seen = []

    def call(block, *args):
        seen.append(block)
        return block(*args)

    with model.routed_blocks(call):
        torch.testing.assert_close(model.logits(x), expected, atol=0, rtol=0)
    assert seen == [model.blocks[i] for i in virtual_layer_order(cfg, recurrence=True)]
    assert model.block_call is None
    with pytest.raises(RuntimeError, match="planted"), model.routed_blocks(call):
        raise RuntimeError("planted")
    assert model.block_call is None


def test_residual_dtype_is_validated():
    from pgolf.config import ConfigError, apply_overrides
    from pgolf.recipes import get_recipe

    with pytest.raises(ConfigError, match=r"model.residual_dtype='float16' is not one of float32\|bfloat16"):
        apply_overrides(get_recipe("tiny"), ["model.residual_dtype=float16"])


def test_param_groups_complete_and_disjoint():
    cfg = dataclasses.replace(record_like_cfg(), tie_embeddings=False)
    model = build(cfg)
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["head"] == [model.head.weight]
    matrix, embed = {id(p) for p in groups["matrix"]}, {id(p) for p in groups["embed"]}
    assert id(model.bigram.proj.weight) in matrix and id(model.value_embed.proj.weight) in matrix
    assert {id(model.tok_emb.weight), id(model.bigram.embed.weight), id(model.value_embed.embed.weight)} == embed
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert sum(p.numel() for g in groups.values() for p in g) == model.num_params()


def test_record_parameter_count_matches_the_reference_script():
    cfg = recipe_record().model
    assert (cfg.vocab_size, cfg.bigram_buckets, cfg.bigram_dim) == (1024, 1536, 128)
    count = GPT(cfg).num_params()
    assert abs(count - 26_928_220) <= 0.002 * 26_928_220, count


def test_qat_forward_is_fake_quantized_with_straight_through_gradient():
    torch.manual_seed(0)
    lin = CastedLinear(32, 8)
    x = torch.randn(5, 32)
    plain = lin(x)
    assert torch.equal(plain, F.linear(x, lin.weight))
    lin.configure_qat(True)
    out = lin(x)
    assert torch.equal(out, F.linear(x, fake_quantize_rows(lin.weight.detach(), 6, 12.85)))
    assert not torch.equal(out, plain)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(lin.weight.grad, grad_out.t() @ x)


def test_an_eager_forward_without_qat_skips_the_fake_quantization(monkeypatch):
    """QAT off, an eager CastedLinear uses its weight as it is (the value the compiled graph's torch.where
    picks) without computing the fake-quantized one; on, it computes it each call."""
    import pgolf.model.layers as layers

    calls = []
    real = layers.fake_quantize_rows
    monkeypatch.setattr(layers, "fake_quantize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin, x = CastedLinear(16, 8), torch.randn(3, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight)) and calls == []
    lin.configure_qat(True)
    lin(x)
    lin.configure_qat(False)
    lin(x)
    assert calls == [1]


def test_toggling_qat_does_not_recompile():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    model = perturb(build(plain_cfg()))
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    x = tokens()
    with torch.no_grad():
        before = compiled(x)
        model.set_qat(True)
        after = compiled(x)
    assert len(compiles) == 1
    assert not torch.allclose(before, after)
    torch._dynamo.reset()


def test_loss_decreases_with_adamw_on_the_tiny_recipe():
    cfg = dataclasses.replace(recipe_tiny().model, attention="math")
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    per_token = model(x, y, reduction="none")
    assert per_token.shape == x.shape
    torch.testing.assert_close(per_token.mean(), model(x, y))


@pytest.mark.gpu
@pytest.mark.parametrize("attention, native_gqa", [("auto", False), ("cudnn", False), ("flash", False),
                                                   ("efficient", False), ("auto", True), ("cudnn", True)])
def test_cuda_fast_attention_agrees_with_reference_in_bf16(attention, native_gqa):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    model = build(plain_cfg(model_dim=512, num_heads=8, num_kv_heads=4, attention=attention,
                            native_gqa=native_gqa)).cuda()
    out = model.blocks[0].attn.attend(q, k, v)
    torch.testing.assert_close(out.float(), reference_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", "cudnn", "efficient", "flash"])
def test_cuda_attention_of_the_last_positions_agrees_with_reference_in_bf16(attention):
    """The kept queries of a scoring forward's last block (64 of 2,048, as sliding s64) on each backend."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(4, 64, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(4, 2048, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(4, 2048, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    model = build(plain_cfg(model_dim=512, num_heads=8, num_kv_heads=4, attention=attention)).cuda()
    out = model.blocks[0].attn.attend(q, k, v)
    torch.testing.assert_close(out.float(), reference_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_compiled_mlp_agrees_with_the_functional_reference_for_every_slope():
    """The inductor-fused LeakyReLU(s)^2 MLP under bf16 autocast, one compile for all slopes, against
    F.leaky_relu in the same dtype."""
    torch.manual_seed(0)
    mlp = BlockMLP(512, 1536, slope=0.5).cuda()
    torch.nn.init.normal_(mlp.proj.weight, std=0.02)
    x = torch.randn(8, 256, 512, device="cuda")
    compiled = torch.compile(mlp, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for slope in (0.5, 0.0, 0.3, 0.9):
            mlp.set_slope(slope)
            expected = mlp.proj(F.leaky_relu(mlp.fc(x), slope).square())
            torch.testing.assert_close(compiled(x).float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
def test_cuda_compiled_bf16_residual_step_agrees_with_the_float32_stream():
    """The compiled forward+backward under bf16 autocast with model.residual_dtype=bfloat16 (one graph), against
    the float32 stream with the same weights."""
    cfg = dataclasses.replace(record_like_cfg(), model_dim=128, num_heads=4, num_kv_heads=2, attention="auto")
    ref = perturb(build(cfg)).cuda()
    model = build(dataclasses.replace(cfg, residual_dtype="bfloat16")).cuda()
    model.load_state_dict(ref.state_dict())
    x, y = tokens(batch=4, seq=256).cuda(), tokens(batch=4, seq=256, seed=2).cuda()
    losses = []
    for m in (ref, model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(m, fullgraph=True)(x, y)
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], atol=3e-2, rtol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
