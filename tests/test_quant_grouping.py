"""Compression by tensor group (quant.group_by=role, pgolf.quant.grouping): each byte order is reversible,
the order is chosen by measured bytes, and a role-grouped artifact round-trips exactly."""

import dataclasses

import numpy as np
import pytest
import torch

from pgolf.config import QuantConfig
from pgolf.quant.artifact import choose_section, read_quantized, write_artifact
from pgolf.quant.codecs import compress_with
from pgolf.quant.grouping import reorder, restore, similarity_order, similarity_order_reference
from pgolf.quant.pipeline import quantize_state


def clustered(rows: int, cols: int, seed: int) -> np.ndarray:
    """int8 rows drawn around a few centres, shuffled: a similarity order puts the centres back together."""
    g = np.random.default_rng(seed)
    centres = g.integers(-20, 20, size=(4, cols))
    q = centres[g.integers(0, 4, size=rows)] + g.integers(-1, 2, size=(rows, cols))
    return q.astype(np.int8)


@pytest.mark.parametrize("order", ["", "T", "ST"])
def test_every_byte_order_restores_the_section(order):
    shapes = [(12, 5), (7, 9), (1, 4)]
    raw = b"".join(clustered(r, c, i).tobytes() for i, (r, c) in enumerate(shapes))
    assert restore(reorder(raw, shapes, order), shapes, order) == raw


def test_similarity_order_is_a_permutation_that_chains_near_rows():
    q = clustered(40, 16, 3)
    perm = similarity_order(q)
    assert sorted(perm.tolist()) == list(range(40)) and perm[0] == 0
    assert np.array_equal(perm, similarity_order_reference(q))
    wide = np.random.default_rng(5).integers(-3, 4, size=(50, 7)).astype(np.int8)  # many ties
    assert np.array_equal(similarity_order(wide), similarity_order_reference(wide))
    steps = np.abs(np.diff(q[perm].astype(np.int64), axis=0)).sum()
    assert steps < np.abs(np.diff(q.astype(np.int64), axis=0)).sum()


def test_the_order_is_chosen_by_measured_bytes():
    shapes = [(64, 32), (64, 32)]
    raw = b"".join(clustered(r, c, i).tobytes() for i, (r, c) in enumerate(shapes))
    rec = choose_section("q6.mlp_fc", raw, ("zlib9",), shapes)
    sizes = {o: len(compress_with("zlib9+none", reorder(raw, shapes, o))) for o in ("", "T", "ST")}
    assert rec["layout"].partition(".")[2] == min(sizes, key=sizes.get)
    assert sizes["ST"] < sizes[""]  # the clustered rows compress better next to each other


def test_role_grouped_artifact_round_trips_and_names_its_sections(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(48, 16, generator=g) for i in range(2)}
    state["blocks.0.attn.c_q.weight"] = torch.randn(16, 16, generator=g)
    state["tok_emb.weight"] = torch.randn(40, 16, generator=g)
    cfg = dataclasses.replace(QuantConfig(), method="rtn", passthrough_numel=64, group_by="role", lqer_top_k=1)
    qm = quantize_state(state, None, cfg)
    write_artifact(qm, tmp_path / "m.pgq", codecs=("zlib9", "lzma9e"))
    back = read_quantized(tmp_path / "m.pgq")
    for name, t in qm.tensors.items():
        assert torch.equal(back.tensors[name].q, t.q) and torch.equal(back.tensors[name].scale, t.scale), name
    from pgolf.quant.artifact import parse_artifact

    names = {s["name"] for s in parse_artifact(tmp_path / "m.pgq")[0]["sections"]}
    assert {"q6.mlp_fc", "q6.attn_q", "q8.embedding", "lqer"} <= names
