"""Bit-packing and the codecs: exact round-trips, choice of the smallest, missing libraries reported."""

import sys

import numpy as np
import pytest

from pgolf.errors import UserError
from pgolf.quant.codecs import (
    CODEC_NAMES,
    FILTER_NAMES,
    codec_candidates,
    compress_best,
    compress_with,
    decompress_with,
    filter_apply,
    filter_invert,
)
from pgolf.quant.pack import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 13, 1001])
def test_pack_unpack_exact(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=count).astype(np.int8)
    blob = pack_bits(values, bits)
    assert len(blob) == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert np.array_equal(unpack_bits(blob, bits, count), values)


def test_pack_rejects_out_of_range_and_wrong_length():
    with pytest.raises(ValueError):
        pack_bits(np.array([32], dtype=np.int8), 6)
    with pytest.raises(ValueError):
        unpack_bits(b"\x00\x00", 6, 4)


def sample_stream(n: int) -> bytes:
    rng = np.random.default_rng(n)
    return np.clip(np.round(rng.normal(0, 6, n)), -31, 31).astype(np.int8).tobytes()


@pytest.mark.parametrize("filt", FILTER_NAMES)
@pytest.mark.parametrize("n", [0, 1, 13, 4099])
def test_filters_invert(filt, n):
    data = sample_stream(n)
    assert filter_invert(filt, filter_apply(filt, data), n) == data


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("filt", ["none", "shuf2", "shuf3", "bitplane"])
def test_every_codec_round_trips(codec, filt):
    method = f"{codec}+{filt}"
    if codec_candidates([method])[1]:
        pytest.skip(codec_candidates([method])[1][method])
    for n in (0, 5, 3001):
        data = sample_stream(n)
        assert decompress_with(method, compress_with(method, data), n) == data


def test_compress_best_picks_smallest():
    data = sample_stream(20_000)
    methods = ["zlib9+none", "lzma9e+none", "raw+none"]
    name, blob = compress_best(data, methods)
    sizes = {m: len(compress_with(m, data)) for m in methods}
    assert len(blob) == min(sizes.values()) and sizes[name] == len(blob)
    assert decompress_with(name, blob, len(data)) == data


def test_missing_library_is_skipped_with_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)  # makes `import brotli` raise ImportError
    ok, skipped = codec_candidates(["brotli11+none", "zlib9+none"])
    assert ok == ["zlib9+none"] and "brotli" in skipped["brotli11+none"]
    name, _ = compress_best(sample_stream(100), ["brotli11+none", "zlib9+none"])
    assert name == "zlib9+none"
    with pytest.raises(UserError, match="no compression method"):
        compress_best(b"abc", ["brotli11+none"])
    with pytest.raises(UserError, match="unknown compression method"):
        compress_with("gzip+none", b"abc")


@pytest.mark.parametrize("method", ["zlib9+none", "lzma6+shuf2", "zlib9+bitplane"])
def test_long_streams_round_trip_through_chunks(method):
    from pgolf.quant.codecs import CHUNK_BYTES, CHUNK_LEN

    n = 2 * CHUNK_BYTES + 12_345  # three chunks, the last one short
    data = np.random.default_rng(0).integers(-3, 4, n).astype(np.int8).tobytes()
    blob = compress_with(method, data)
    (first,) = CHUNK_LEN.unpack_from(blob, 0)
    assert 0 < first < len(blob)  # framed: the first chunk's length leads
    assert decompress_with(method, blob, n) == data
    with pytest.raises(UserError, match="runs past the end"):
        decompress_with(method, blob[:-1], n)
