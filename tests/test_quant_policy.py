"""The one quantization policy (pgolf.quant.policy): every parameter of every recipe gets one rule, QAT's
fake quantizer and the export agree on every rule, and the policy's rows (per-role sigmas, int gates,
overrides, scale floor, percentile-candidate clips) do what they say."""

import dataclasses

import pytest
import torch

from pgolf.config import ConfigError, QuantConfig, apply_overrides
from pgolf.model.gpt import GPT
from pgolf.model.layers import CastedLinear
from pgolf.quant.formats import fake_quantize_rows, qmax_for_bits, row_scales
from pgolf.quant.gptq import gptq_quantize_batch, rtn_quantize
from pgolf.quant.pipeline import quantize_state
from pgolf.quant.policy import ROLE_FAMILY, policy_table, tensor_rule
from pgolf.recipes import RECIPES, get_recipe
from pgolf.train.qat import set_qat_from_config

KINDS = {"matrix", "embed", "gate", "passthrough"}


def small_model_cfg(cfg):
    """The recipe's model at a width a CPU test can build (every flag and depth kept)."""
    m = cfg.model
    return dataclasses.replace(m, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=96,
                               rope_dims=min(m.rope_dims, 16), bigram_dim=min(m.bigram_dim, 16),
                               ve_dim=min(m.ve_dim, 16), gate_window=min(m.gate_window, 12))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_parameter_of_every_recipe_gets_exactly_one_rule(recipe):
    cfg = get_recipe(recipe)
    with torch.device("meta"):
        model = GPT(cfg.model)
    state = model.state_dict()
    rules = policy_table(state, cfg.quant)
    assert list(rules) == list(state)
    for name, rule in rules.items():
        assert rule.kind in KINDS and rule.role in ROLE_FAMILY, (name, rule)
        assert (rule.storage == "int") == (rule.kind != "passthrough"), (name, rule)
        if rule.storage == "int":
            assert rule.bits in range(2, 9) and rule.method in ("gptq", "rtn"), (name, rule)
        if rule.qat:  # QAT covers only matrices the export stores at the fitted matrix width
            assert rule.kind == "matrix" and rule.bits == cfg.quant.matrix_bits, (name, rule)


def test_frontier_rows_are_the_records():
    cfg = get_recipe("frontier")
    with torch.device("meta"):
        state = GPT(cfg.model).state_dict()
    rules = policy_table(state, cfg.quant)
    emb, fc, q, gate = (rules[n] for n in ("tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight",
                                             "blocks.0.attn.attn_gate_w"))
    assert (emb.bits, emb.method, emb.clip_k) == (7, "gptq", 14.0)
    assert (fc.bits, fc.clip_k, q.clip_k) == (6, 11.5, 13.0)
    assert fc.k_at(12.85 * 2) == pytest.approx(23.0) and q.k_at(12.85 * 2) == pytest.approx(26.0)
    assert (gate.kind, gate.bits, gate.method, gate.clip) == ("gate", 8, "rtn", "none")
    assert rules["smear_v2.weight"].kind == "passthrough"  # 12 values: below the gate rule's 32
    assert rules["skip_gates"].kind == "passthrough" and rules["blocks.0.attn.q_gain"].storage == "fp16"
    assert cfg.quant.lqer_top_k == 3 and cfg.quant.lqer_rank == 4


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_training_fake_quant_and_export_agree_for_every_rule(recipe):
    """Every layer QAT fake-quantizes sees exactly the weight the round-to-nearest export writes for it;
    the layers it leaves alone are the ones the export does not store as fitted matrices."""
    cfg = get_recipe(recipe)
    torch.manual_seed(0)
    model = GPT(small_model_cfg(cfg))
    qcfg = dataclasses.replace(cfg.quant, method="rtn", passthrough_numel=1024, lqer_top_k=0)
    count = set_qat_from_config(model, True, qcfg, clip_k=9.0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    rules = policy_table(state, qcfg)
    if qcfg.clip != "sdclip":  # QAT needs the SDClip rule (a config relation); the table still marks coverage
        return
    qm = quantize_state(state, None, qcfg, matrix_k=9.0)
    covered = set()
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear) and m.qat_on.item() > 0.5:
            key = f"{name}.weight"
            covered.add(key)
            with torch.no_grad():
                assert torch.equal(m.effective_weight(), qm.tensors[key].dequantize()), key
    assert count == len(covered) > 0
    assert covered == {n for n, r in rules.items() if r.qat}


def test_overrides_change_single_tensors_and_bad_items_fail_in_one_line():
    cfg = dataclasses.replace(QuantConfig(), overrides=("tok_emb.weight=rtn", "blocks.1.*=fp16",
                                                        "bigram.embed.weight=bits6", "blocks.0.attn.q_gain=embed"))
    assert tensor_rule("tok_emb.weight", (64, 32), True, cfg).method == "rtn"
    fp16 = tensor_rule("blocks.1.mlp.fc.weight", (1024, 512), True, cfg)
    assert (fp16.kind, fp16.storage, fp16.qat, fp16.source) == ("passthrough", "fp16", False, "blocks.1.*=fp16")
    assert tensor_rule("bigram.embed.weight", (2048, 128), True, cfg).bits == 6
    assert tensor_rule("blocks.0.attn.q_gain", (8,), True, cfg).storage == "int"
    assert tensor_rule("blocks.0.mlp.fc.weight", (1024, 512), True, cfg).source == "table"
    w = {"tok_emb.weight": torch.randn(300, 32), "blocks.1.mlp.fc.weight": torch.randn(300, 32)}
    hs = {"tok_emb.weight": torch.eye(32)}
    qm = quantize_state(w, hs, dataclasses.replace(cfg, passthrough_numel=16))
    assert qm.tensors["tok_emb.weight"].info["method"] == "rtn"  # rtn although a Hessian is known
    assert qm.tensors["blocks.1.mlp.fc.weight"].kind == "passthrough"
    run = get_recipe("tiny")
    with pytest.raises(ConfigError, match=r"spec 'bits9' is not one of") as info:
        apply_overrides(run, ["quant.overrides=tok_emb.weight=bits9"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(get_recipe("tiny"), ["quant.overrides=tok_emb.weight"])
    parsed = apply_overrides(get_recipe("tiny"), ["quant.overrides=a=rtn,b*=fp16"]).quant.overrides
    assert parsed == ("a=rtn", "b*=fp16")


def test_scale_floor_inv_qmax_reaches_export_and_qat():
    w = torch.cat([torch.randn(3, 64) * 1e-4, torch.randn(3, 64)])
    clip = w.std(dim=1) * 12.85
    tiny, floor = row_scales(clip, 6, "tiny"), row_scales(clip, 6, "inv_qmax")
    qmax = qmax_for_bits(6)
    assert torch.all(floor[:3].float() == torch.tensor(1.0 / qmax).half().float())
    assert torch.all(tiny[:3] < floor[:3]) and torch.equal(tiny[3:], floor[3:])
    q, scale = rtn_quantize(w, 6, "sdclip", 12.85, floor="inv_qmax")
    assert torch.equal(fake_quantize_rows(w, 6, 12.85, "inv_qmax"), q.float() * scale.float().unsqueeze(1))
    layer = CastedLinear(64, 128)
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    set_qat_from_config(torch.nn.ModuleDict({"blocks": torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict(
        {"fc": layer})})}), True, dataclasses.replace(QuantConfig(), scale_floor="inv_qmax", passthrough_numel=16))
    assert layer.qat_scale_floor == "inv_qmax" and layer.qat_on.item() == 1.0


def test_pct_search_picks_the_lowest_error_candidate_per_row_and_per_matrix():
    torch.manual_seed(1)
    w = torch.randn(16, 48) * torch.rand(16, 1)
    w[:, 0] *= 30  # outliers make the candidates differ
    quantiles = (0.9, 0.99, 1.0)
    q, s = rtn_quantize(w, 4, "pct_search", 0.0, quantiles=quantiles)
    err = ((w - q.float() * s.float().unsqueeze(1)) ** 2).sum(dim=1)
    for qq in quantiles:
        clip = torch.quantile(w.abs(), qq, dim=1)
        s1 = row_scales(clip, 4)
        q1 = torch.clamp(torch.round(w / s1.float().unsqueeze(1)), -7, 7)
        assert torch.all(err <= ((w - q1 * s1.float().unsqueeze(1)) ** 2).sum(dim=1) + 1e-6)
    h = torch.eye(48).expand(2, 48, 48)
    ws = torch.stack([w, w.flip(0)])
    qg, sg, info = gptq_quantize_batch(ws, h, 4, "pct_search", 0.0, quantiles=quantiles, select="matrix")
    assert sum(info["clip_choice"]) == 2 * 16 and max(info["clip_choice"]) % 16 == 0  # whole matrices
    qr, sr, _ = gptq_quantize_batch(ws, h, 4, "pct_search", 0.0, quantiles=quantiles, select="row")
    assert torch.equal(qr[0], q) and torch.equal(sr[0], s)  # identity Hessian: GPTQ is RTN at the fixed scales


def test_int8_gates_round_trip_through_the_export():
    cfg = dataclasses.replace(QuantConfig(), gate_bits=8, method="rtn")
    gate = torch.randn(8, 12)
    qm = quantize_state({"blocks.0.attn.attn_gate_w": gate}, None, cfg)
    t = qm.tensors["blocks.0.attn.attn_gate_w"]
    assert (t.kind, t.bits) == ("gate", 8)
    assert torch.allclose(t.scale.float(), gate.abs().amax(dim=1) / 127, rtol=1e-3)
    assert (t.dequantize() - gate).abs().max() <= t.scale.float().max() / 2 + 1e-6
