"""The export's batched compression (pgolf.quant.codecs.Compressor, pgolf.quant.artifact.choose_sections): the
same bytes as the plain section-by-section search, each distinct stream compressed once, in parallel."""

import dataclasses

import numpy as np
import pytest
import torch

import pgolf.quant.artifact as artifact
import pgolf.quant.codecs as codecs
from pgolf.config import QuantConfig
from pgolf.errors import UserError
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import (
    SECTION_FILTERS,
    best_orders,
    choose_sections,
    read_quantized,
    section_layouts,
    section_shapes,
    section_streams,
)
from pgolf.quant.codecs import AUTO_CODECS, CHUNK_BYTES, Compressor, compress_with, join_pieces, stream_pieces
from pgolf.quant.fit import entropy_bytes, section_ratios
from pgolf.quant.grouping import ORDER_PROBE, orders_for, reorder
from pgolf.quant.pipeline import encode_state, quantize_state
from pgolf.recipes import recipe_tiny
from pgolf.recipes_frontier import frontier_quant


def int_stream(n: int, seed: int, spread: float = 6.0) -> bytes:
    g = np.random.default_rng(seed)
    return np.clip(np.round(g.standard_t(4, n) * spread), -31, 31).astype(np.int8).tobytes()


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """The tiny recipe's GPT with trained-looking weights: Student-t values, a scale per row."""
    torch.manual_seed(0)
    model = GPT(recipe_tiny().model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                t = torch.distributions.StudentT(4.0).sample(p.shape)
                p.copy_(0.02 * t * (0.5 + torch.rand(p.shape[0], 1)))
    return {k: v.detach() for k, v in model.state_dict().items()}


def frontier_like(**changes) -> QuantConfig:
    q = QuantConfig()
    frontier_quant(q)
    q.method, q.fit_k, q.passthrough_numel = "rtn", False, 512
    return dataclasses.replace(q, **changes)


def plain_choice(section: str, raw: bytes, codecs, shapes=None) -> tuple[str, str, bytes]:
    """The search choose_sections batches, one section and one compression at a time: (layout, method, blob)."""
    order = ""
    if shapes and len(orders_for(shapes)) > 1:
        probe = lambda d: artifact.sample_of(d) if len(d) > artifact.SAMPLE_ABOVE_BYTES else d
        sizes = {o: len(compress_with(ORDER_PROBE, probe(reorder(raw, shapes, o)))) for o in orders_for(shapes)}
        order = min(sizes, key=sizes.get)
    options = [(layout, data, f"{c}+{f}") for layout, data in section_layouts(section, raw, shapes, (order,)).items()
               for c in codecs for f in SECTION_FILTERS[layout.partition(".")[0]]]
    if len(raw) > artifact.SAMPLE_ABOVE_BYTES and len(options) > 1:
        sizes = [len(compress_with(m, artifact.sample_of(d))) for _, d, m in options]
        ranked = sorted(range(len(options)), key=sizes.__getitem__)
        close = sizes[ranked[1]] <= artifact.SAMPLE_CLOSE * sizes[ranked[0]]
        options = [options[i] for i in ranked[:2 if close else 1]]
    best = None
    for layout, data, method in options:
        blob = compress_with(method, data)
        if best is None or len(blob) < len(best[2]):
            best = (layout, method, blob)
    return best


@pytest.mark.parametrize("method", ["zlib9+none", "lzma6+shuf2", "brotli11+none", "zstd22+shuf6"])
def test_compressor_gives_compress_with_bytes_in_order(method):
    jobs = [(method, int_stream(n, i)) for i, n in enumerate((1, 5_000, 70_001))]
    jobs.append(("zlib9+none", int_stream(CHUNK_BYTES + 12_345, 9)))  # two chunks
    jobs.append(jobs[1])  # the same job twice in one batch
    comp = Compressor(workers=4)
    assert comp.compress(jobs) == [compress_with(m, d) for m, d in jobs]
    batch = comp.batches[0]
    assert batch["jobs"] == 5 and batch["hits"] == 1 and len(batch["pieces"]) == 5  # the long one: 2 pieces
    assert all(cpu >= 0 for _, _, _, cpu in batch["pieces"])


def test_stream_pieces_and_join_pieces_frame_long_streams_only():
    data = int_stream(CHUNK_BYTES + 1, 1)
    codec, pieces = stream_pieces("zlib9+shuf2", data)
    assert codec == "zlib9" and [len(p) for p in pieces] == [CHUNK_BYTES, 1]
    assert stream_pieces("zlib9+none", b"abc") == ("zlib9", [b"abc"])
    assert join_pieces([b"xy"], 10) == b"xy"
    assert join_pieces([b"xy", b"z"], CHUNK_BYTES + 1) == b"\x02\x00\x00\x00xy\x01\x00\x00\x00z"


def test_compressor_keeps_results_by_content_and_plain_form_recompresses():
    jobs = [("lzma9e+none", int_stream(20_000, 2)), ("zlib9+none", int_stream(20_000, 3))]
    comp = Compressor()
    first = comp.compress(jobs)
    again = comp.compress([jobs[1], jobs[0], ("lzma9e+none", jobs[1][1])])
    assert again[:2] == first[::-1] and comp.batches[1]["hits"] == 2 and len(comp.batches[1]["pieces"]) == 1
    plain = Compressor(workers=1, cache=False)
    assert plain.compress(jobs) == first and plain.compress(jobs) == first
    assert plain.batches[1]["hits"] == 0 and plain.workers == 1


def test_batches_queued_together_give_their_bytes_and_raise_a_codec_error(monkeypatch):
    long, short = ("brotli11+none", int_stream(300_000, 7)), ("zlib9+none", int_stream(1_000, 8))
    comp = Compressor(workers=2)
    first = comp.start([long])
    second = comp.start([short], urgent=True)
    assert second() == [compress_with(*short)] and first() == [compress_with(*long)]
    assert comp.start([])() == [] and len(comp.batches) == 2
    comp.compress([("zlib9+none", b"x")])
    assert comp.batches[1]["urgent"] and comp.batches[2]["after"] == [1, 0]  # waited for: second, then first

    def broken(codec, data):
        raise RuntimeError(f"{codec} broke")

    monkeypatch.setattr(codecs, "codec_compress", broken)
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="zlib9 broke"):
            Compressor(workers).compress([("zlib9+none", b"new bytes")])


def test_choose_sections_picks_what_the_plain_search_picks(tiny_state, monkeypatch):
    monkeypatch.setattr(artifact, "SAMPLE_ABOVE_BYTES", 40_000)  # the embedding (65 kB) is ranked on samples
    monkeypatch.setattr(artifact, "SAMPLE_BYTES", 16_000)
    qm = quantize_state(tiny_state, None, frontier_like())
    streams, table = section_streams(qm)
    shapes = section_shapes(table)
    items = [(name, raw, shapes.get(name)) for name, raw in streams.items()]
    assert any(len(raw) > 40_000 for _, raw, _ in items) and any(s for _, _, s in items)
    recs = choose_sections(items, AUTO_CODECS, Compressor(workers=3))
    for (name, raw, shape), rec in zip(items, recs, strict=True):
        assert (rec["layout"], rec["method"], rec["blob"]) == plain_choice(name, raw, AUTO_CODECS, shape), name
        assert rec["values"] == len(raw)


def test_best_orders_takes_the_first_smallest_probe():
    raw = np.tile(np.arange(-8, 8, dtype=np.int8), 64).tobytes()  # 64 equal rows of 16: "T" runs compress best
    (order, data), (plain, same) = best_orders([("q6.mlp_fc", raw, [(64, 16)]), ("fp16", raw, None)], Compressor())
    sizes = {o: len(compress_with(ORDER_PROBE, reorder(raw, [(64, 16)], o))) for o in ("", "T", "ST")}
    assert order == min(sizes, key=sizes.get) and data == reorder(raw, [(64, 16)], order)
    assert (plain, same) == ("", raw)


def test_choose_sections_keeps_a_planned_choice_and_refuses_no_codec():
    raw = int_stream(30_000, 4)
    (rec,) = choose_sections([("q6", raw, None)], ("zlib9",), plan={"q6": ("packed6", "lzma9e+shuf6")})
    assert (rec["layout"], rec["method"]) == ("packed6", "lzma9e+shuf6")
    assert rec["blob"] == compress_with("lzma9e+shuf6", section_layouts("q6", raw)["packed6"])
    with pytest.raises(UserError, match="no compression method"):
        choose_sections([("q6", raw, None)], ())


def test_section_ratios_measure_samples_in_one_batch():
    sections = {"q6.a": int_stream(1_500_000, 5), "q6.b": int_stream(50_000, 6, spread=2.0)}
    comp = Compressor()
    ratios = section_ratios(sections, ("zlib9",), comp)
    assert len(comp.batches) == 1  # no byte orders to probe; every sample's options at once
    sample = artifact.sample_of(sections["q6.a"])
    ideal = entropy_bytes(np.bincount(np.frombuffer(sample, dtype=np.uint8), minlength=256))
    layout, method, blob = plain_choice("q6.a", sample, ("zlib9",))
    assert ratios["q6.a"]["ratio"] == len(blob) / ideal
    assert (ratios["q6.a"]["layout"], ratios["q6.a"]["method"]) == (layout, method)
    assert ratios["q6.b"]["entropy"] < ratios["q6.a"]["entropy"]


@pytest.mark.parametrize("group_by", ["role", "bits"])
def test_export_bytes_equal_the_serial_uncached_export(tiny_state, group_by, tmp_path):
    cfg = frontier_like(group_by=group_by, fit_k=True, size_cap=200_000, fit_margin=0.01)
    fast = Compressor()
    report, blob = encode_state(tiny_state, None, cfg, 20_000, fast)
    plain_report, plain = encode_state(tiny_state, None, cfg, 20_000, Compressor(workers=1, cache=False))
    assert blob == plain and report["fit_k"]["k"] == plain_report["fit_k"]["k"]
    assert {b["stage"] for b in fast.batches} >= {"fit_k_s", "serialize_s"}
    path = tmp_path / "m.pgq"
    path.write_bytes(blob)
    back = read_quantized(path)
    assert all(torch.equal(back.tensors[n].q, t.q) for n, t in quantize_state(
        tiny_state, None, cfg, report["matrix_k"]).tensors.items() if t.q is not None)
