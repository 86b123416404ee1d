"""Filling the byte budget by the matrices' SDClip k (pgolf/quant/fit.py and the export around it)."""

import math

import pytest
import torch

from pgolf.config import QuantConfig
from pgolf.errors import UserError
from pgolf.model.layers import CastedLinear
from pgolf.quant.artifact import read_quantized
from pgolf.quant.fit import choose_k, entropy_bytes, rtn_counts, value_counts
from pgolf.quant.formats import fake_quantize_rows, quantize_rows, row_clip_sdclip, row_scales
from pgolf.quant.pipeline import export_state
from pgolf.train.qat import set_qat


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g)) \
        + 0.02 * torch.randn(rows, cols, generator=g) ** 3


def test_entropy_bytes_by_hand():
    counts = torch.zeros(256, dtype=torch.int64)
    counts[128], counts[129], counts[127] = 50, 25, 25  # p = 1/2, 1/4, 1/4 -> 1.5 bits per value
    assert entropy_bytes(counts) == pytest.approx(100 * 1.5 / 8)
    assert entropy_bytes(torch.zeros(256)) == 0.0
    q = torch.tensor([[-3, 0, 0, 5]], dtype=torch.int8)
    c = value_counts(q)
    assert c[128 - 3] == 1 and c[128] == 2 and c[128 + 5] == 1 and int(c.sum()) == 4


def test_sdclip_is_not_capped_at_the_row_max():
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # std 1, max 1
    assert row_clip_sdclip(w, 12.85).item() == pytest.approx(12.85)
    q = quantize_rows(w, row_scales(row_clip_sdclip(w, 12.85), 6), 6)
    assert q.abs().max().item() == round(31 / 12.85)  # a coarse grid, far from the ±31 ends


def test_choose_k_is_the_smallest_k_that_fits():
    weights = [heavy_tailed(64, 96, s) for s in range(4)]
    ratio = 1.05

    def predicted(k):
        return ratio * entropy_bytes(rtn_counts(weights, 6, k))

    sizes = [predicted(k) for k in (4.0, 8.0, 16.0, 32.0)]
    assert sizes == sorted(sizes, reverse=True)  # coarser grids take fewer bytes
    target = 0.5 * (sizes[1] + sizes[2])
    choice = choose_k(weights, 6, target, ratio, k_min=4.0)
    assert 8.0 < choice["k"] < 16.0
    assert choice["predicted_bytes"] <= target < predicted(choice["k"] * 0.995)
    assert choose_k(weights, 6, 10 * sizes[0], ratio, k_min=4.0)["k"] == 4.0  # room to spare: the finest grid
    with pytest.raises(UserError, match="lower the bits"):
        choose_k(weights, 6, 10.0, ratio, k_min=4.0)


def test_export_fills_the_budget(tmp_path):
    state = {f"blocks.{i}.mlp.fc.weight": heavy_tailed(128, 192, i) for i in range(4)}
    state["tok_emb.weight"] = heavy_tailed(64, 32, 9)
    state["blocks.0.attn_scale"] = torch.ones(32)
    cfg = QuantConfig(method="rtn", codec="zlib", passthrough_numel=100, fit_k=True, fit_margin=0.01,
                      size_cap=70_000, fit_to_budget=False)
    report = export_state(state, None, cfg, tmp_path / "a.pgq", code_bytes=5_000)
    budget = cfg.size_cap - 5_000
    size = report["bytes"]["artifact"]
    assert size <= budget and size >= budget * (1 - 3 * cfg.fit_margin), (size, budget, report["fit_k"])
    k = report["matrix_k"]
    assert k == report["fit_k"]["k"] and k > cfg.fit_k_min
    qm = read_quantized(tmp_path / "a.pgq")
    assert qm.meta["matrix_k"] == pytest.approx(k)
    w = state["blocks.1.mlp.fc.weight"]
    expected = quantize_rows(w, row_scales(row_clip_sdclip(w, k), 6), 6)
    assert torch.equal(qm.tensors["blocks.1.mlp.fc.weight"].q, expected)  # the export used the chosen k
    # a bigger budget takes a finer grid
    bigger = export_state(state, None, QuantConfig(**{**cfg.__dict__, "size_cap": 80_000}), tmp_path / "b.pgq", 5_000)
    assert bigger["matrix_k"] < k and bigger["bytes"]["artifact"] > size


def test_qat_clip_k_is_a_runtime_buffer():
    torch.manual_seed(0)
    layer = CastedLinear(16, 8)
    x = torch.randn(3, 16)
    set_qat(layer, True, bits=6, clip_k=12.85)
    coarse = layer(x)
    set_qat(layer, True, bits=6, clip_k=4.0)
    fine = layer(x)
    w4 = fake_quantize_rows(layer.weight.detach(), 6, 4.0)
    assert torch.allclose(fine, x @ w4.T) and not torch.allclose(coarse, fine)
    assert isinstance(layer.qat_clip_k, torch.Tensor) and math.isclose(layer.qat_clip_k.item(), 4.0)
