"""Hessian collection, the tensor policy, the artifact format, size accounting, fit-to-budget, the commands."""

import argparse
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.config import QuantConfig
from pgolf.errors import UserError
from pgolf.quant.artifact import inspect_artifact, read_artifact, read_quantized, write_artifact
from pgolf.quant.commands import add_quant_commands
from pgolf.quant.gptq import gptq_quantize
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.pipeline import export_artifact, quantize_state
from pgolf.quant.policy import tensor_rule
from pgolf.quant.size import code_bytes_of, size_report, smallest_code_form, wrap_script
from pgolf.tensorfile import write_tensors


class TinyLM(nn.Module):
    """Names as in the real model: tok_emb, *attn*/*mlp* linears, final_norm feeding the tied head."""

    def __init__(self, vocab: int = 64, dim: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.tok_emb = nn.Embedding(vocab, dim)
        self.attn_proj = nn.Linear(dim, 48, bias=False)
        self.mlp_proj = nn.Linear(48, dim, bias=False)
        self.small = nn.Linear(dim, 2, bias=False)  # under passthrough_numel: not hooked
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.gain = nn.Parameter(torch.ones(dim))
        for p in (self.tok_emb.weight, self.attn_proj.weight, self.mlp_proj.weight):
            nn.init.normal_(p, std=0.02)  # bell-shaped like trained weights, so the codecs find entropy to save

    def forward(self, input_ids, target_ids=None):
        x = self.tok_emb(input_ids)
        x = x + self.gain * self.mlp_proj(torch.relu(self.attn_proj(x)))
        return F.linear(self.final_norm(x), self.tok_emb.weight)


def tiny_cfg(**kw) -> QuantConfig:
    return QuantConfig(**{"passthrough_numel": 100, "codec": "zlib", "sdclip_k": 4.0, **kw})


def batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def test_collect_hessians_matches_manual():
    model = TinyLM()
    hs = collect_hessians(model, batches(), passthrough_numel=100)
    assert sorted(hs) == ["attn_proj.weight", "mlp_proj.weight", "tok_emb.weight"]
    ids = torch.cat([b.reshape(-1) for b in batches()])
    x = model.tok_emb(ids).detach()
    assert torch.allclose(hs["attn_proj.weight"], x.T @ x / len(ids), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        h_in = torch.relu(model.attn_proj(x))
        y = model.final_norm(x + model.gain * model.mlp_proj(h_in))
    assert torch.allclose(hs["mlp_proj.weight"], h_in.T @ h_in / len(ids), rtol=1e-5, atol=1e-6)
    assert torch.allclose(hs["tok_emb.weight"], y.T @ y / len(ids), rtol=1e-5, atol=1e-5)
    assert not model.tok_emb.weight.requires_grad or model.tok_emb.weight.grad is None
    assert sorted(collect_hessians(model, batches(1), names=["tok_emb.weight"], passthrough_numel=100)) == [
        "tok_emb.weight"]


def tensor_policy(name, t, cfg):
    return tensor_rule(name, tuple(t.shape), t.is_floating_point(), cfg).kind


def test_tensor_policy():
    cfg = QuantConfig()
    assert tensor_policy("blocks.0.attn.c_q.weight", torch.zeros(512, 512), cfg) == "matrix"
    assert tensor_policy("blocks.3.mlp.proj.weight", torch.zeros(512, 1536), cfg) == "matrix"
    assert tensor_policy("tok_emb.weight", torch.zeros(1024, 512), cfg) == "embed"
    assert tensor_policy("bigram.embed.weight", torch.zeros(1536, 128), cfg) == "embed"
    assert tensor_policy("bigram.proj.weight", torch.zeros(512, 128), cfg) == "passthrough"
    assert tensor_policy("blocks.0.attn.q_gain", torch.zeros(8), cfg) == "passthrough"
    assert tensor_policy("blocks.0.attn.big3d", torch.zeros(4, 512, 512), cfg) == "passthrough"
    assert tensor_policy("counter", torch.zeros(512, 512, dtype=torch.int32), cfg) == "passthrough"


def quantized_tiny():
    model = TinyLM()
    hs = collect_hessians(model, batches(), passthrough_numel=100)
    state = dict(model.state_dict())
    state["step"] = torch.tensor(7)
    state["half"] = torch.randn(5, dtype=torch.bfloat16)
    return model, hs, state, quantize_state(state, hs, tiny_cfg())


def test_the_pipeline_runs_the_configured_gptq_sweep():
    model, hs, state, standard = quantized_tiny()
    cfg = tiny_cfg(act_order_direction="asc", gptq_update="inverse")
    variant = quantize_state(state, hs, cfg)
    name = "mlp_proj.weight"
    rule = tensor_rule(name, tuple(state[name].shape), True, cfg)
    q, scale, _ = gptq_quantize(state[name], hs[name], rule.bits, rule.clip, rule.k_at(None), cfg.damp,
                                cfg.block_size, direction="asc", update="inverse")
    assert torch.equal(variant.tensors[name].q, q) and torch.equal(variant.tensors[name].scale, scale)
    assert not torch.equal(standard.tensors[name].q, q)


def test_artifact_round_trip_is_exact(tmp_path):
    model, _, state, qm = quantized_tiny()
    assert {n: t.kind for n, t in qm.tensors.items() if t.kind != "passthrough"} == {
        "tok_emb.weight": "embed", "attn_proj.weight": "matrix", "mlp_proj.weight": "matrix"}
    path = tmp_path / "m.pgq"
    n = write_artifact(qm, path, codecs=("zlib9", "lzma9e"))
    assert n == path.stat().st_size
    got, want = read_artifact(path), qm.dequantized_state()
    assert list(got) == list(state)
    for name in want:
        assert got[name].dtype == state[name].dtype and torch.equal(got[name], want[name]), name
    back = read_quantized(path)
    assert torch.equal(back.tensors["attn_proj.weight"].q, qm.tensors["attn_proj.weight"].q)
    model.load_state_dict({k: v for k, v in got.items() if k not in ("step", "half")})
    rows = inspect_artifact(path)
    assert [r["name"] for r in rows] == list(state)
    assert 0 < sum(r["bytes"] for r in rows) <= n


def test_damaged_artifact_gives_one_line_error(tmp_path):
    _, _, _, qm = quantized_tiny()
    path = tmp_path / "m.pgq"
    write_artifact(qm, path, codecs=("zlib9",))
    data = path.read_bytes()
    bad = tmp_path / "bad.pgq"
    for pos in list(range(0, 24)) + list(range(24, len(data), 37)) + [len(data) - 1]:
        flipped = bytearray(data)
        flipped[pos] ^= 0x41
        bad.write_bytes(bytes(flipped))
        with pytest.raises(UserError) as e:
            read_artifact(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value), pos
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError, match="bad.pgq"):
            read_artifact(bad)


def test_an_intact_artifact_whose_codec_is_not_installed_says_which_package_not_damaged(tmp_path, monkeypatch):
    _, _, _, qm = quantized_tiny()
    path = tmp_path / "m.pgq"
    write_artifact(qm, path, codecs=("brotli11",))
    monkeypatch.setitem(sys.modules, "brotli", None)  # `import brotli` now fails, as where it is not installed
    with pytest.raises(UserError) as e:
        read_artifact(path)
    assert str(path) in str(e.value) and "brotli package" in str(e.value) and "damaged" not in str(e.value)


def test_export_fits_to_budget(tmp_path):
    model, hs, _, _ = quantized_tiny()
    code = 1000
    coarse = {"matrix_bits": 5, "embed_bits": 5, "sdclip_k": 15.0, "sdclip_k_embed": 15.0}  # many ±1 values
    first = export_artifact(model, hs, tiny_cfg(**coarse), tmp_path / "a.pgq", code)
    size = first["bytes"]["artifact"]
    assert first["fit"] is None and first["timings"]["quantize_s"] >= 0
    cfg = tiny_cfg(size_cap=code + size - 12, **coarse)
    second = export_artifact(model, hs, cfg, tmp_path / "b.pgq", code)
    assert second["bytes"]["fits"] and second["bytes"]["total"] <= cfg.size_cap
    assert second["fit"]["pruned"] > 0 and second["fit"]["bytes_after"] == second["bytes"]["artifact"]
    assert (tmp_path / "b.pgq").stat().st_size == second["bytes"]["artifact"]
    diff = {k: (read_artifact(tmp_path / "b.pgq")[k] != read_artifact(tmp_path / "a.pgq")[k]).sum().item()
            for k in ("tok_emb.weight", "attn_proj.weight", "mlp_proj.weight")}
    assert sum(diff.values()) == second["fit"]["pruned"]
    # a cap no pruning can reach: the artifact is still written, and the report says it does not fit and why
    third = export_artifact(model, hs, tiny_cfg(size_cap=code + 100, **coarse), tmp_path / "c.pgq", code)
    assert not third["bytes"]["fits"] and third["fit"]["fitted"] is False
    assert "over the budget" in third["fit"]["reason"]
    assert (tmp_path / "c.pgq").stat().st_size == third["bytes"]["artifact"]


def test_size_accounting_is_exact(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    code = code_bytes_of(script)
    rep = size_report(code, 15_000_000, cap=16_000_000)
    assert code == 12 and rep["total"] == 15_000_012 and rep["headroom"] == 999_988 and rep["fits"]
    assert not size_report(1, 16_000_000)["fits"]


def test_wrapped_script_runs_identically(tmp_path):
    body = "\n".join(f"def f{i}(x):\n    return x * {i} + math.sqrt({i})" for i in range(60))
    funcs = ", ".join(f"f{i}" for i in range(60))
    source = f"import math, sys\n{body}\nprint(__name__, sum(f(2) for f in [{funcs}]))\n"
    kind, text = smallest_code_form(source)
    assert kind == "wrapped" and text == wrap_script(source) and len(text.encode()) < len(source.encode())
    outs = []
    for name, src in (("plain.py", source), ("wrapped.py", text)):
        (tmp_path / name).write_text(src)
        outs.append(subprocess.run([sys.executable, str(tmp_path / name)], capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1] and outs[0].startswith("__main__ ")


def test_quant_and_inspect_commands(tmp_path, capsys):
    model, hs, _, _ = quantized_tiny()
    run = tmp_path / "run"
    run.mkdir()
    write_tensors(run / "model.pgw", model.state_dict(), {})
    write_tensors(run / "hessians.pgw", hs, {})
    (run / "config.json").write_text(json.dumps({"quant": {"codec": "zlib", "passthrough_numel": 100}}))
    parser = argparse.ArgumentParser()
    add_quant_commands(parser.add_subparsers())
    args = parser.parse_args(["quant", str(run), "--code-bytes", "500", "--set", "quant.clip=search"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "model.pgq" in out and "headroom" in out
    sd = read_artifact(run / "model.pgq")
    model.load_state_dict(sd)
    args = parser.parse_args(["artifact", "inspect", str(run / "model.pgq")])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "attn_proj.weight" in table and "totals:" in table
    args = parser.parse_args(["quant", str(tmp_path)])
    with pytest.raises(UserError, match="model.pgw"):
        args.func(args)


@pytest.mark.parametrize("autocast", [False, True])
def test_collect_hessians_shares_one_product_for_q_k_v_on_the_real_model(autocast):
    """Also under bf16 autocast, as calibration runs on the GPU: the products must stay fp32."""
    from pgolf.model.gpt import GPT
    from pgolf.recipes import get_recipe

    cfg = get_recipe("tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # the zero-initialized projections would make every block the identity
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(std=0.1)
    ids = [torch.randint(0, cfg.model.vocab_size, (2, 32)) for _ in range(2)]
    seen = []
    handles = [model.blocks[1].attn.c_q.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone())),
               model.blocks[1].mlp.fc.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hs = collect_hessians(model, ids, passthrough_numel=cfg.quant.passthrough_numel)
    for h in handles:
        h.remove()
    xq = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[0::2]]).float()
    xf = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[1::2]]).float()
    for name in ("c_q", "c_k", "c_v"):
        assert torch.allclose(hs[f"blocks.1.attn.{name}.weight"], xq.T @ xq / len(xq), rtol=1e-5, atol=1e-6)
    assert torch.allclose(hs["blocks.1.mlp.fc.weight"], xf.T @ xf / len(xf), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hs["blocks.1.mlp.fc.weight"], hs["blocks.1.attn.c_q.weight"])
    for name, h in hs.items():
        assert h.dtype == torch.float32, name
