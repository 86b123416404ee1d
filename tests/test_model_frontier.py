"""The frontier's model changes (shared/reference/frontier.md §3): SmearGate v2, the sparse attention output
gate and two-lane parallel residuals; each flag on and off, BOS masking, causality, keep, training."""

import dataclasses

import pytest
import torch

import pgolf.model.fused_qk as fused_qk
from pgolf.config import ConfigError, QuantConfig, apply_overrides
from pgolf.errors import UserError
from pgolf.model.features import SMEAR_BOS_ID, SmearGateV2
from pgolf.model.gpt import GPT, virtual_layer_order
from pgolf.optim.builder import build_optimizers
from pgolf.quant.policy import tensor_rule
from pgolf.recipes import get_recipe, recipe_record, recipe_tiny
from tests.test_model import perturb

VOCAB = 64
FLAGS = {
    "smear_gate_v2": {"smear_gate_v2": True},
    "sparse_attn_gate": {"sparse_attn_gate": True},
    "parallel_lanes_from": {"parallel_lanes_from": 3},
}
ALL_ON = {"smear_gate_v2": True, "sparse_attn_gate": True, "parallel_lanes_from": 3}


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frontier_cfg(**changes):
    """A tiny model shaped like the frontier's: U-Net skips with gates, XSA, LN scale, partial RoPE, a looped
    span (physical 1..2, twice more) ahead of the lane blocks, SmearGate v1 / bigram / VE off."""
    cfg = dataclasses.replace(
        recipe_tiny().model, vocab_size=VOCAB, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2,
        mlp_mult=4.0, mlp_slope=0.5, rope_dims=4, xsa_last_n=5, ln_scale=True, smear_gate=False,
        bigram_buckets=0, ve_last_n=0, unet_skips=True, skip_gates=True, recur_first=1, recur_last=2,
        recur_loops=2, parallel_resid_from=-1, ortho_init=True, attention="math", gate_window=6)
    return dataclasses.replace(cfg, **changes)


@torch.no_grad()
def build(cfg, seed=0, recurrence=True):
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.set_recurrence(recurrence)
    return model


def tokens(batch=2, seq=24, seed=1):
    x = torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = SMEAR_BOS_ID
    x[0, 11] = SMEAR_BOS_ID  # a second document in row 0
    return x


def test_frontier_order_puts_the_lane_blocks_in_the_decoder_tail():
    cfg = frontier_cfg(**ALL_ON)
    assert virtual_layer_order(cfg, True) == [0, 1, 2, 1, 2, 1, 2, 3, 4]  # encoder: the first 4
    assert [b.lanes for b in build(cfg).blocks] == [False, False, False, True, True]


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_each_flag_changes_the_forward(flag):
    base = frontier_cfg()
    a, twin = build(base), build(base, seed=5)
    b = build(dataclasses.replace(base, **FLAGS[flag]), seed=5)
    shared = {k: v for k, v in a.state_dict().items() if k in b.state_dict()}
    for model in (twin, b):
        model.load_state_dict(shared, strict=False)
    for model in (a, twin, b):
        perturb(model)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(a(x), twin(x))
        assert not torch.allclose(a(x), b(x), atol=1e-6)


def test_flags_off_leave_the_model_as_it_was():
    """Off, the frontier's fields add no parameter and their values change nothing, bit for bit."""
    base = frontier_cfg()
    other = dataclasses.replace(base, gate_window=3, sparse_attn_gate_scale=2.0)
    a, b = perturb(build(base)), perturb(build(other))
    names = list(a.state_dict())
    assert names == list(b.state_dict())
    assert not [n for n in names if "attn_gate_w" in n or "lane_" in n or "smear_v2" in n]
    x = tokens()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_smear_gate_v2_is_the_identity_at_init_bit_for_bit():
    off, on = build(frontier_cfg()), build(frontier_cfg(smear_gate_v2=True))
    on.load_state_dict(off.state_dict(), strict=False)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(on.embed_inputs(x), off.embed_inputs(x))
        on.smear_v2.lam.fill_(0.5)
        assert not torch.equal(on.embed_inputs(x), off.embed_inputs(x))


def test_smear_gate_v2_formula_and_bos_mask():
    """e_t + lam * sigmoid(w . e_t[:window]) * e_{t-1} for t >= 1, except at BOS; changing anything before a
    BOS changes nothing at or after it."""
    torch.manual_seed(0)
    smear = SmearGateV2(window=5)
    with torch.no_grad():
        smear.weight.normal_()
        smear.lam.fill_(0.7)
    ids = tokens(batch=1, seq=16)
    e = torch.randn(1, 16, 8)
    out = smear(e, ids)
    for t in range(16):
        expected = e[0, t].clone()
        if t > 0 and ids[0, t] != SMEAR_BOS_ID:
            expected = expected + 0.7 * torch.sigmoid(smear.weight[0] @ e[0, t, :5]) * e[0, t - 1]
        torch.testing.assert_close(out[0, t], expected, atol=1e-6, rtol=1e-6)
    e2 = e.clone()
    e2[:, :11] = torch.randn(1, 11, 8)
    assert torch.equal(smear(e2, ids)[:, 11:], out[:, 11:])
    assert not torch.allclose(smear(e2, ids)[:, 1:11], out[:, 1:11])


def test_smear_gate_v2_in_the_model_keeps_documents_apart():
    """The model's embedding stage: tokens before a BOS do not reach it or anything after it."""
    model = perturb(build(frontier_cfg(smear_gate_v2=True)))
    x = tokens(batch=1)
    y = x.clone()
    y[0, 1:11] = (y[0, 1:11] + 3) % (VOCAB - 2) + 2
    with torch.no_grad():
        ex, ey = model.embed_inputs(x), model.embed_inputs(y)
        assert torch.equal(ex[:, 11:], ey[:, 11:])
        x[0, 11] = y[0, 11] = 5  # without the BOS position 11 does read position 10
        assert not torch.allclose(model.embed_inputs(x)[:, 11], model.embed_inputs(y)[:, 11])


def test_sparse_gate_at_init_halves_the_heads_exactly():
    """Zero-init W gives g = 0.5 on every head: the gated model equals the ungated one with attn_scale
    doubled, bit for bit (scaling by a power of two is exact through the projection)."""
    off, on = perturb(build(frontier_cfg())), build(frontier_cfg(sparse_attn_gate=True))
    on.load_state_dict(off.state_dict(), strict=False)
    with torch.no_grad():
        for block in on.blocks:
            assert torch.equal(block.attn.attn_gate_w, torch.zeros(4, 6))
            block.attn_scale.mul_(2.0)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(on(x), off(x))


def test_sparse_gate_reads_the_first_window_dims_of_the_attention_input():
    """g_{t,h} = sigmoid(scale * W_h . n_t[:window]) multiplies head h: dims past the window do not move g."""
    torch.manual_seed(0)
    attn = build(frontier_cfg(sparse_attn_gate=True)).blocks[0].attn
    with torch.no_grad():
        attn.attn_gate_w.normal_()
    y, n = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 32)
    gated = attn.gate_heads(y, n)
    g = torch.sigmoid(0.5 * torch.einsum("btw,hw->bth", n[..., :6], attn.attn_gate_w))
    torch.testing.assert_close(gated, y * g[..., None], atol=1e-6, rtol=1e-6)
    n2 = n.clone()
    n2[..., 6:] = torch.randn(2, 7, 26)
    assert torch.equal(attn.gate_heads(y, n2), gated)


def test_lane_block_reads_attention_from_lane0_and_the_mlp_from_lane1():
    model = perturb(build(frontier_cfg(parallel_lanes_from=3)))
    block = model.blocks[3]
    lane0, lane1, x0 = torch.randn(3, 2, 10, 32).unbind(0)
    cos, sin = model.rotary.cos_sin(10, lane0.device)
    seen = {}
    hooks = [block.attn.c_k.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", a[0])),
             block.mlp.fc.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", a[0]))]
    try:
        with torch.no_grad():
            out0, out1 = block((lane0, lane1), x0, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    mix = block.resid_mix.detach()
    assert torch.equal(seen["attn"], block.normed(mix[0] * lane0 + mix[1] * x0))
    assert torch.equal(seen["mlp"], block.normed(lane1))
    with torch.no_grad():  # lane_post[1, 0] = 0: the MLP no longer writes lane 0, lane 1 is untouched
        block.lane_post[1, 0] = 0.0
        new0, new1 = block((lane0, lane1), x0, cos, sin)
    assert not torch.allclose(new0, out0) and torch.equal(new1, out1)


def test_lanes_start_from_the_stream_and_end_as_their_mean():
    """With the lane blocks' carries and routes set to make lane 1 an exact copy of lane 0, and that of a
    one-lane parallel residual reading one input, the model equals model.parallel_resid_from, bit for bit."""
    one = perturb(build(frontier_cfg(parallel_resid_from=3)))
    two = build(frontier_cfg(parallel_lanes_from=3))
    two.load_state_dict(one.state_dict(), strict=False)
    with torch.no_grad():
        for block in two.blocks[3:]:
            block.lane_resid.fill_(1.0)
            block.lane_post.fill_(1.0)
            block.resid_mix[0].fill_(1.0)
            block.resid_mix[1].fill_(0.0)
        for block in one.blocks[3:]:
            block.resid_mix[0].fill_(1.0)
            block.resid_mix[1].fill_(0.0)
    x = tokens()
    with torch.no_grad():
        # the skip merges into lane 0 only: equal lanes need the skips out of the lane blocks' way
        one.skip_weights[:].fill_(0.0)
        two.skip_weights[:].fill_(0.0)
        one.skip_gates[:].fill_(30.0)
        two.skip_gates[:].fill_(30.0)
        assert torch.equal(two(x), one(x))
        two.blocks[4].lane_post[0, 1] = 0.5
        assert not torch.allclose(two(x), one(x), atol=1e-5)


def test_the_skip_due_at_the_first_lane_block_merges_into_lane0_only():
    """Order [0, 1, 2, 1 | 2, 1, 2, 3, 4]: decoder position 3 (physical 3, the first lane block) pops the skip
    of virtual position 0; lane 0 gets it through skip weight and gate 3, lane 1 is the plain stream."""
    model = perturb(build(frontier_cfg(parallel_lanes_from=3)))
    outputs, inputs = [], []

    def call(block, x, *args):
        inputs.append(x)
        outputs.append(block(x, *args))
        return outputs[-1]

    with torch.no_grad(), model.routed_blocks(call):
        model.forward_hidden(tokens())
        lanes, stream, skip = inputs[7], outputs[6], outputs[0]
        merged = torch.lerp(model.skip_weights[3] * skip, stream, torch.sigmoid(model.skip_gates[3]))
    assert isinstance(lanes, tuple) and torch.equal(lanes[1], stream) and torch.equal(lanes[0], merged)
    assert inputs[8] is outputs[7]  # no skip left for the last block


@pytest.mark.parametrize("recurrence", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_causal_with_every_frontier_flag_on(recurrence, fused, monkeypatch):
    if fused:  # the fused q/k kernels through Triton's interpreter (conftest), as in test_fused_qk
        if fused_qk.triton is None:
            pytest.skip("the triton package is not installed")
        monkeypatch.setattr(fused_qk, "fused_qk_supported", lambda x, cos: True)
    model = perturb(build(frontier_cfg(**ALL_ON), recurrence=recurrence)).eval()
    model.set_training_kernels(fp8=False, fused_qk=fused)
    x = tokens(batch=1, seq=20)
    with torch.no_grad():
        base = model(x)
        for t in (1, 7, 12, 19):
            y = x.clone()
            y[0, t] = (y[0, t] + 5) % (VOCAB - 2) + 2
            out = model(y)
            assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
            assert not torch.allclose(out[:, t], base[:, t])


def test_fused_qk_path_applies_the_gate(monkeypatch):
    """The fused q/k kernels (interpreted on CPU) with the gate on equal the plain path with it, and the
    gate still changes the output there."""
    if fused_qk.triton is None:
        pytest.skip("the triton package is not installed")
    monkeypatch.setattr(fused_qk, "fused_qk_supported", lambda x, cos: True)
    plain = perturb(build(frontier_cfg(**ALL_ON)))
    fused = build(frontier_cfg(**ALL_ON))
    fused.load_state_dict(plain.state_dict())
    fused.set_training_kernels(fp8=False, fused_qk=True)
    x = tokens()
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-4)
        for block in fused.blocks:
            block.attn.attn_gate_w.zero_()
        assert not torch.allclose(fused(x), want, atol=1e-4)


@pytest.mark.parametrize("recurrence", [False, True])
@pytest.mark.parametrize("keep", [1, 5, 24])
def test_forward_hidden_with_keep_equals_the_full_forward_with_every_flag_on(keep, recurrence):
    model = perturb(build(frontier_cfg(**ALL_ON), recurrence=recurrence)).eval()
    x = tokens()
    with torch.no_grad():
        want = model.forward_hidden(x)[:, x.size(1) - keep:]
        torch.testing.assert_close(model.forward_hidden(x, keep), want, atol=2e-5, rtol=2e-5)
        seen = []

        def call(block, *args):  # the scorers' routed blocks: lane pairs go through the same call
            seen.append(block)
            return block(*args)

        with model.routed_blocks(call):
            torch.testing.assert_close(model.forward_hidden(x, keep), want, atol=2e-5, rtol=2e-5)
    assert seen == [model.blocks[i] for i in virtual_layer_order(model.cfg, recurrence)]
    assert model.forward_hidden(x, keep).shape == (2, keep, 32)


def test_new_parameters_are_scalar_adamw_and_fp16_passthrough():
    model = build(frontier_cfg(**ALL_ON))
    groups = model.param_groups()
    scalar = {id(p) for p in groups["scalar"]}
    qcfg = QuantConfig()
    new = {n: p for n, p in model.named_parameters() if "attn_gate_w" in n or "lane_" in n or "smear_v2" in n}
    assert len(new) == 5 + 2 + 2 * 2  # a gate per block, w and lam, two lane blocks' carries and routes
    for name, p in new.items():
        assert id(p) in scalar, name
        assert tensor_rule(name, tuple(p.shape), True, qcfg).kind == "passthrough", name
    assert model.blocks[0].attn.attn_gate_w.shape == (4, 6) and model.smear_v2.weight.shape == (1, 6)


def test_frontier_parameter_count_matches_the_record():
    """The 04-27 record's 11L 512d stack: 35,945,671 parameters in its log, where the lane factors exist for
    all 11 layers (66 values); pgolf holds them on the 3 lane blocks only (18)."""
    cfg = dataclasses.replace(
        recipe_record().model, vocab_size=8192, mlp_mult=4.0, xsa_last_n=11, smear_gate=False,
        bigram_buckets=0, ve_last_n=0, skip_gates=True, recur_first=3, recur_last=5, recur_loops=2,
        smear_gate_v2=True, sparse_attn_gate=True, parallel_lanes_from=8)
    assert len(virtual_layer_order(cfg, True)) == 17
    assert GPT(cfg).num_params() == 35_945_671 - 66 + 18


def test_a_few_training_steps_with_every_flag_on_lower_the_loss():
    """Muon + AdamW as pgolf.train builds them; every gate gets a gradient and moves."""
    cfg = frontier_cfg(**ALL_ON)
    model = build(cfg)
    opt = build_optimizers(model, recipe_tiny().optim)
    x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    x[:, 0] = SMEAR_BOS_ID
    y = torch.roll(x, -1, dims=1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(12):
        loss = model(x, y)
        loss.backward()
        opt.step(1.0)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for name, p in model.named_parameters():
        if "attn_gate_w" in name or "lane_" in name or "smear_v2" in name:
            assert not torch.equal(p.detach(), start[name]), f"{name} never moved"


@pytest.mark.slow
def test_block_scope_training_equals_eager_and_loop_states_share_its_graphs(compiled_graphs):
    """train.compile_scope="blocks": a document-masked training step through the compiled blocks gives the
    eager loss and gradients, and switching the loops on (more virtual layers) compiles no new graph."""
    import copy

    from pgolf.data.loader import batch_document_ids
    from pgolf.train.loop import compile_for_training

    run = get_recipe("tiny")
    run.model = frontier_cfg(**ALL_ON, ve_last_n=2)
    run.train.compile, run.train.compile_scope, run.train.mix_order_reduction = True, "blocks", True
    model = build(run.model, recurrence=False)
    eager = copy.deepcopy(model)
    step = compile_for_training(model, run)
    x = tokens(seq=32)
    y, doc = torch.roll(x, -1, dims=1), batch_document_ids(x)
    graphs = []
    for loops in (False, True):
        model.set_recurrence(loops)
        eager.set_recurrence(loops)
        loss, ref = step(x, y, doc_ids=doc), eager(x, y, doc_ids=doc)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        grads = dict(eager.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
        model.zero_grad()
        eager.zero_grad()
        graphs.append(dict(compiled_graphs))
    assert set(graphs[0]) == {"call_block"} and graphs[0]["call_block"] >= 2  # the blocks, nothing else
    assert graphs[1] == graphs[0]  # 9 virtual layers instead of 5, the same graphs


def test_config_checks_for_the_frontier_fields():
    for override, message in (
        (["model.gate_window=0"], "model.gate_window=0 must be >= 1"),
        (["model.gate_window=600"], "model.gate_window=600 must be at most model.model_dim"),
        (["model.smear_gate=true", "model.smear_gate_v2=true"], "choose one"),
        (["model.parallel_lanes_from=9"], "parallel_lanes_from=9 must be -1"),
        (["model.parallel_lanes_from=2", "model.parallel_resid_from=2"], "choose one parallel residual"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(get_recipe("tiny"), override)


def test_lane_blocks_must_be_the_decoder_tail():
    with pytest.raises(UserError, match="lane blocks must run last"):
        GPT(frontier_cfg(parallel_lanes_from=2))  # layer 2 is looped, and layer 1 runs after it
    with pytest.raises(UserError, match="in the decoder"):
        GPT(frontier_cfg(parallel_lanes_from=0, recur_loops=0))
    GPT(frontier_cfg(parallel_lanes_from=0, recur_loops=0, unet_skips=False))  # no skips: any tail


def test_artifact_keeps_the_gates_as_fp16_and_pgolf_eval_loads_it_looped(tmp_path):
    """Through the real export (matrices rtn-quantized, passthrough small): the gates and lane factors come
    back as their fp16 values, and pgolf eval's loader switches the loops on (training ends with them on)."""
    from pgolf.eval.commands import eval_load_model
    from pgolf.quant.artifact import write_artifact
    from pgolf.quant.pipeline import quantize_state

    cfg = get_recipe("tiny")
    cfg.model = frontier_cfg(**ALL_ON)
    model = perturb(build(cfg.model, recurrence=False))
    qcfg = dataclasses.replace(QuantConfig(), method="rtn", passthrough_numel=256)
    qm = quantize_state(model.state_dict(), None, qcfg)
    assert qm.tensors["blocks.0.attn.c_q.weight"].kind == "matrix"
    path = tmp_path / "model.pgq"
    write_artifact(qm, path)
    loaded = eval_load_model(path, cfg, torch.device("cpu"))
    assert loaded.recurrence_active
    for name, p in model.named_parameters():
        if "attn_gate_w" in name or "lane_" in name or "smear_v2" in name:
            got = dict(loaded.named_parameters())[name]
            assert qm.tensors[name].kind == "passthrough" and got.dtype == torch.float32, name
            assert torch.equal(got, p.detach().half().float()), name
