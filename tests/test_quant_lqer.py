"""LQER asymmetric (pgolf.quant.lqer): the correction lowers a real layer's error, goes to the top-k
residuals, round-trips bit-exactly through the artifact and is counted inside the byte budget."""

import dataclasses

import pytest
import torch

from pgolf.config import QuantConfig
from pgolf.errors import UserError
from pgolf.model.gpt import GPT
from pgolf.quant import artifact
from pgolf.quant.artifact import encode_artifact, read_artifact, read_quantized, write_artifact
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.lqer import asym_dequantize, asym_quantize, lqer_correction
from pgolf.quant.pipeline import export_state, quantize_state
from pgolf.recipes import get_recipe


@pytest.fixture(scope="module")
def tiny_layerwise():
    """The tiny recipe's GPT with trained-looking weights, its calibration Hessians and the LQER config."""
    cfg = get_recipe("tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    hs = collect_hessians(model, [torch.randint(0, cfg.model.vocab_size, (2, 64), generator=g) for _ in range(2)],
                          passthrough_numel=1024)
    qcfg = dataclasses.replace(cfg.quant, passthrough_numel=1024, lqer_top_k=3, codec="zlib")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return state, hs, qcfg


def test_asymmetric_factor_format_is_the_records():
    x = torch.tensor([[-3.0, 1.5, 0.2, 3.0]])
    q, s = asym_quantize(x, 2, 0)
    assert s.item() == pytest.approx(3.0 / 1.5, rel=1e-3) and q.tolist() == [[-2, 1, 0, 1]]  # +max clips to 1
    b = torch.randn(4, 128)
    qb, sb = asym_quantize(b, 4, 64)
    assert sb.shape == (8,) and int(qb.min()) >= -8 and int(qb.max()) <= 7
    assert (asym_dequantize(qb, sb) - b).abs().max() <= sb.float().max() * 1.0 + 1e-6


def test_lqer_lowers_the_error_of_real_layers_and_takes_the_top_k(tiny_layerwise):
    state, hs, qcfg = tiny_layerwise
    plain = quantize_state(state, hs, dataclasses.replace(qcfg, lqer_top_k=0))
    qm = quantize_state(state, hs, qcfg)
    residual = {n: float(torch.linalg.vector_norm(state[n].float() - t.dequantize()))
                for n, t in plain.tensors.items() if t.kind != "passthrough"}
    top = sorted(residual, key=lambda n: -residual[n])[:3]
    assert sorted(qm.meta["lqer"]) == sorted(top)
    for name in top:
        w, h = state[name].float(), hs[name].float()
        before, after = w - plain.tensors[name].dequantize(), w - qm.tensors[name].dequantize()
        assert torch.linalg.vector_norm(after) < 0.99 * torch.linalg.vector_norm(before), name
        assert torch.trace(after @ h @ after.T) < torch.trace(before @ h @ before.T), name  # output error too
        assert qm.tensors[name].info["lqer"]["error_after"] < qm.tensors[name].info["lqer"]["error_before"]
    assert all(qm.tensors[n].lqer is None for n in residual if n not in top)


def test_lqer_artifact_round_trips_bit_exactly(tiny_layerwise, tmp_path):
    state, hs, qcfg = tiny_layerwise
    qm = quantize_state(state, hs, qcfg)
    path = tmp_path / "m.pgq"
    write_artifact(qm, path, codecs=("zlib9",))
    back = read_quantized(path)
    for name in qm.meta["lqer"]:
        for key in ("qa", "sa", "qb", "sb"):
            assert torch.equal(back.tensors[name].lqer[key], qm.tensors[name].lqer[key]), (name, key)
    expected = qm.dequantized_state()
    for name, w in read_artifact(path).items():
        assert torch.equal(w, expected[name]), name
    assert encode_artifact(back, ("zlib9",))[0] == path.read_bytes()  # what was read writes the same bytes
    assert back.tensors[qm.meta["lqer"][0]].info == {}  # info is not stored; the factors are


def test_lqer_bytes_are_inside_the_fitted_budget(tiny_layerwise, tmp_path):
    state, hs, qcfg = tiny_layerwise
    cfg = dataclasses.replace(qcfg, fit_k=True, size_cap=150_000, fit_margin=0.01, fit_to_budget=False)
    report = export_state(state, hs, cfg, tmp_path / "a.pgq", code_bytes=1_000)
    lqer = next(s for s in report["sections"] if s["name"] == "lqer")
    assert lqer["length"] > 0 and report["bytes"]["fits"], report["bytes"]
    without = export_state(state, hs, dataclasses.replace(cfg, lqer_top_k=0), tmp_path / "b.pgq", code_bytes=1_000)
    extra = report["fit_k"]["other_bytes"] - without["fit_k"]["other_bytes"]
    assert 0.8 * lqer["length"] <= extra <= 1.2 * lqer["length"] + 64  # the fit counted the factors' bytes
    assert report["fit_k"]["target_bytes"] < without["fit_k"]["target_bytes"]


def test_version_2_artifacts_still_load_and_unknown_versions_fail_in_one_line(tmp_path, monkeypatch):
    w = {"blocks.0.mlp.fc.weight": torch.randn(32, 16), "gain": torch.ones(4)}
    qm = quantize_state(w, None, QuantConfig(method="rtn", passthrough_numel=16))
    monkeypatch.setattr(artifact, "ARTIFACT_VERSION", 2)
    write_artifact(qm, tmp_path / "v2.pgq", codecs=("zlib9",))
    assert torch.equal(read_artifact(tmp_path / "v2.pgq")["blocks.0.mlp.fc.weight"],
                       qm.tensors["blocks.0.mlp.fc.weight"].dequantize())
    monkeypatch.setattr(artifact, "ARTIFACT_VERSION", 1)
    write_artifact(qm, tmp_path / "v1.pgq", codecs=("zlib9",))
    with pytest.raises(UserError, match=r"v1.pgq: artifact version 1 is not supported") as info:
        read_artifact(tmp_path / "v1.pgq")
    assert "\n" not in str(info.value)


def test_lqer_correction_is_a_plain_product():
    parts = {"qa": torch.tensor([[1], [-2]], dtype=torch.int8), "sa": torch.tensor([0.5], dtype=torch.float16),
             "qb": torch.tensor([[3, -1]], dtype=torch.int8), "sb": torch.tensor([0.25], dtype=torch.float16)}
    assert torch.equal(lqer_correction(parts), torch.tensor([[0.375, -0.125], [-0.75, 0.25]]))


def test_pgolf_quant_explain_lists_every_tensor_with_its_rule_bytes_and_error(tiny_layerwise, tmp_path, capsys):
    import argparse
    import json

    from pgolf.config import config_to_dict
    from pgolf.quant.commands import add_quant_commands
    from pgolf.tensorfile import write_tensors

    state, hs, qcfg = tiny_layerwise
    run = tmp_path / "run"
    run.mkdir()
    write_tensors(run / "model.pgw", state, {})
    write_tensors(run / "hessians.pgw", hs, {})
    (run / "config.json").write_text(json.dumps({"quant": config_to_dict(qcfg)}))
    parser = argparse.ArgumentParser()
    add_quant_commands(parser.add_subparsers())
    args = parser.parse_args(["quant", str(run), "--code-bytes", "0", "--explain", "--json", str(tmp_path / "r.json"),
                              "--set", "quant.overrides=blocks.0.attn.c_k.weight=fp16"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())["explain"]
    assert [r["name"] for r in rows] == list(state) and "bytes by role" in out
    size = (run / "model.pgq").stat().st_size
    assert 0.5 * size < sum(r["bytes"] for r in rows) <= size
    by_name = {r["name"]: r for r in rows}
    assert by_name["blocks.0.attn.c_k.weight"]["source"] == "blocks.0.attn.c_k.weight=fp16"
    assert by_name["blocks.0.attn.c_k.weight"]["storage"] == "fp16"
    assert sum(r["lqer"] for r in rows) == 3
    fc = by_name["blocks.1.mlp.fc.weight"]
    back = read_artifact(run / "model.pgq")["blocks.1.mlp.fc.weight"]
    w = state["blocks.1.mlp.fc.weight"]
    assert fc["rel_error"] == pytest.approx(float((w - back).norm() / w.norm()), rel=1e-5)
    assert fc["hessian_rel_error"] is not None and fc["k"] > 0 and fc["method"] == "gptq"
