"""Shard format, file audit, corpus reading and the `pgolf data verify` command."""

import gzip
import json
import lzma

import numpy as np
import pytest
import zstandard

from pgolf.data.corpus import iter_documents
from pgolf.data.shards import (
    FILE_AUDIT,
    HEADER_BYTES,
    ShardError,
    list_shards,
    read_shard,
    shard_token_count,
    write_shard,
)
from pgolf.errors import UserError


def test_write_read_roundtrip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1024, size=5000).astype(np.uint16)
    path = tmp_path / "s.bin"
    assert write_shard(path, tokens) == HEADER_BYTES + 2 * 5000
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, 5000]
    assert shard_token_count(path) == 5000
    got = read_shard(path, vocab_size=1024)
    assert isinstance(got, np.memmap) and np.array_equal(got, tokens)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def _bad(tmp_path, mutate):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))
    return path


@pytest.mark.parametrize("mutate, fault", [
    (lambda d: d[:-10], "truncated"),
    (lambda d: d + b"\0\0", "size mismatch"),
    (lambda d: d[:100], "truncated"),
    (lambda d: np.int32(12345).tobytes() + d[4:], "wrong magic"),
    (lambda d: d[:4] + np.int32(7).tobytes() + d[8:], "version 7"),
])
def test_bad_shards_raise_one_line_error_naming_file(tmp_path, mutate, fault):
    path = _bad(tmp_path, mutate)
    with pytest.raises(ShardError) as e:
        read_shard(path)
    msg = str(e.value)
    assert str(path) in msg and fault in msg and "\n" not in msg
    assert isinstance(e.value, UserError)


def test_vocab_check(tmp_path):
    path = tmp_path / "v.bin"
    write_shard(path, np.array([1, 5, 2000, 3], dtype=np.uint16))
    assert read_shard(path, vocab_size=2001).size == 4
    with pytest.raises(ShardError, match=r"token id 2000 >= vocab_size 1024 \(first bad at position 2\)"):
        read_shard(path, vocab_size=1024)


def test_write_refuses_out_of_range(tmp_path):
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([70000]))


def test_list_shards_sorted_and_missing(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.zeros(3, dtype=np.uint16))
    names = [p.name for p in list_shards(tmp_path, "fineweb_train_*.bin")]
    assert names == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    with pytest.raises(ShardError, match=r"fineweb_val_\*\.bin.*" + tmp_path.name):
        list_shards(tmp_path, "fineweb_val_*.bin")


def test_file_audit_records_phase(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    write_shard(a, np.zeros(4, dtype=np.uint16))
    write_shard(b, np.zeros(4, dtype=np.uint16))
    FILE_AUDIT.clear()
    read_shard(a)
    with FILE_AUDIT.phase("train"):
        read_shard(b)
        with FILE_AUDIT.phase("calibration"):
            read_shard(a)
        read_shard(b)
    assert FILE_AUDIT.opened("other") == [str(a.resolve())]
    assert FILE_AUDIT.opened("train") == [str(b.resolve())] * 2
    assert FILE_AUDIT.opened("calibration") == [str(a.resolve())]
    assert len(FILE_AUDIT.opened()) == 4 and FILE_AUDIT.current_phase == "other"


def _write_jsonl(path, lines):
    data = "".join(line + "\n" for line in lines).encode()
    if path.name.endswith(".xz"):
        data = lzma.compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.xz", ".jsonl.gz", ".jsonl.zst"])
def test_corpus_formats_in_order(tmp_path, suffix):
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    _write_jsonl(a, [json.dumps({"text": "héllo\nworld", "id": 1}), "", json.dumps({"text": "two"})])
    _write_jsonl(b, [json.dumps({"text": "three"})])
    assert list(iter_documents([b, a])) == ["three", "héllo\nworld", "two"]


def test_corpus_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [json.dumps({"text": "ok"}), "{not json"])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: bad JSON"):
        list(iter_documents([bad]))
    notext = tmp_path / "notext.jsonl"
    _write_jsonl(notext, [json.dumps({"title": "x"})])
    with pytest.raises(UserError, match=r"notext\.jsonl:1: .*\"text\""):
        list(iter_documents([notext]))


@pytest.fixture
def data_cli(monkeypatch):
    """pgolf.cli.main with only the data commands registered (other concerns may not exist yet)."""
    import pgolf.cli

    monkeypatch.setattr(pgolf.cli, "COMMAND_MODULES", [("pgolf.data.commands", "add_data_commands")])
    return pgolf.cli.main


def test_cli_verify_good_shards(tmp_path, data_cli, capsys):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10, dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(20, dtype=np.uint16))
    assert data_cli(["data", "verify", str(tmp_path), "--vocab-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "fineweb_val_000000.bin" in out and "20 tokens" in out and "ok: 30 tokens" in out
    assert data_cli(["data", "verify", str(tmp_path), "--vocab-size", "15"]) == 2


@pytest.mark.parametrize("mutate, fault", [(lambda d: d[:-3], "truncated"),
                                           (lambda d: b"\x01\x02\x03\x04" + d[4:], "wrong magic")])
def test_cli_verify_bad_shard_one_line(tmp_path, data_cli, capsys, mutate, fault):
    path = _bad(tmp_path, mutate)
    assert data_cli(["data", "verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and fault in err and "Traceback" not in err
