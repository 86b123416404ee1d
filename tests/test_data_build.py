"""Building shards from JSONL, the stdlib corpus, tokenizer training, and the FineWeb downloader (offline)."""

import hashlib
import json
import time

import numpy as np
import pytest
import sentencepiece as spm
from conftest import TOKENIZER_1024, WIKI_DIR

from pgolf.data.build import build_split_shards
from pgolf.data.corpus import iter_documents
from pgolf.data.fineweb import download_fineweb, plan_fineweb_files
from pgolf.data.shards import ShardError, read_shard, write_shard
from pgolf.data.stdlib_corpus import write_stdlib_corpus
from pgolf.data.tokenizer import train_tokenizer_from_docs
from pgolf.errors import UserError


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    docs, size = write_stdlib_corpus(folder / "stdlib.jsonl", max_bytes=400_000)
    assert docs > 20 and 300_000 < size <= 400_000
    model = train_tokenizer_from_docs([folder / "stdlib.jsonl"], 512, folder / "tok512.model")
    return folder / "stdlib.jsonl", model


def test_stdlib_corpus_full_is_deterministic(tmp_path):
    a = write_stdlib_corpus(tmp_path / "a.jsonl")
    b = write_stdlib_corpus(tmp_path / "b.jsonl")
    assert a == b and a[1] >= 2_000_000
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    texts = [json.loads(line)["text"] for line in (tmp_path / "a.jsonl").open()]
    assert any(t.startswith("Help topic ") for t in texts) and any(t.startswith("Module ") for t in texts)
    # shuffled: the near-identical codec modules do not come in one long run
    codec = [i for i, t in enumerate(texts) if t.startswith("Module encodings.")]
    assert len(codec) > 20 and max(b - a for a, b in zip(codec, codec[1:], strict=False)) > 5


def test_build_matches_direct_encoding(small_corpus, tmp_path):
    corpus, model = small_corpus
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = list(iter_documents([corpus]))
    manifest = build_split_shards([corpus], model, 7, tmp_path / "out", workers=2, shard_tokens=50_000,
                                  progress=False)
    expect_val = np.concatenate([[1, *ids] for ids in sp.encode(docs[:7])])
    expect_train = np.concatenate([[1, *ids] for ids in sp.encode(docs[7:])])
    val_files = sorted((tmp_path / "out").glob("fineweb_val_*.bin"))
    train_files = sorted((tmp_path / "out").glob("fineweb_train_*.bin"))
    assert len(train_files) == -(-expect_train.size // 50_000) > 1
    assert all(read_shard(p).size == 50_000 for p in train_files[:-1])  # full shards, documents straddle
    assert np.array_equal(np.concatenate([read_shard(p) for p in val_files]), expect_val)
    assert np.array_equal(np.concatenate([read_shard(p) for p in train_files]), expect_train)
    assert manifest["splits"]["val"] == {"docs": 7, "tokens": expect_val.size, "files": len(val_files)}
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((tmp_path / "out" / entry["name"]).read_bytes()).hexdigest()
    assert (tmp_path / "out" / "tok512.model").read_bytes() == model.read_bytes()
    # one worker gives the same bytes
    build_split_shards([corpus], model, 7, tmp_path / "one", workers=1, shard_tokens=50_000, progress=False)
    for p in val_files + train_files:
        assert (tmp_path / "one" / p.name).read_bytes() == p.read_bytes()


def test_build_refuses_too_few_docs(small_corpus, tmp_path):
    corpus, model = small_corpus
    with pytest.raises(UserError, match="--val-docs asks for 100000"):
        build_split_shards([corpus], model, 100_000, tmp_path, workers=1, progress=False)


@pytest.mark.slow
@pytest.mark.shared
def test_wiki_sp1024_split_reproduces_published_hashes(tmp_path):
    """The standard local split of shared/data/wiki/SOURCE.md, byte for byte (about 90 s on 2 cores)."""
    start = time.time()
    manifest = build_split_shards([WIKI_DIR / "docs_000.jsonl.xz", WIKI_DIR / "docs_001.jsonl.xz"], TOKENIZER_1024,
                                  500, tmp_path, progress=False)
    got = {f["name"]: (f["sha256"], f["tokens"]) for f in manifest["files"]}
    assert got == {
        "fineweb_val_000000.bin": ("5e1dc6857dd4b47692e2af94fcebcacc029868a0e41627b7bc49c2fe1c9b94b0", 3_230_325),
        "fineweb_train_000000.bin": ("9d211fa922e74e3a581b1eb6fe1c5ab123bad61610490c3b67a638734759d59f", 77_767_107),
    }
    print(f"wiki split built in {time.time() - start:.1f} s")


FAKE_MANIFEST = {
    "datasets": [
        {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}},
        {"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192", "stats": {"files_train": 2, "files_val": 1}},
    ],
    "tokenizers": [
        {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        {"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"},
    ],
}


class FakeHub:
    """Stands in for hf_hub_download: serves the fake manifest, small shards and tokenizer bytes; counts calls."""

    def __init__(self, corrupt=()):
        self.calls, self.corrupt = [], set(corrupt)

    def __call__(self, remote_path, destination):
        self.calls.append(remote_path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if remote_path.endswith("manifest.json"):
            destination.write_text(json.dumps(FAKE_MANIFEST))
        elif remote_path.endswith(".bin"):
            write_shard(destination, np.arange(64, dtype=np.uint16))
            if remote_path in self.corrupt:
                destination.write_bytes(destination.read_bytes()[:-2])
        else:
            destination.write_bytes(b"tokenizer " + remote_path.encode())


def test_fineweb_plan_layout():
    plan = plan_fineweb_files(FAKE_MANIFEST, "sp1024", 2)
    assert plan == [
        ("shard", "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
         "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"),
        ("shard", "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
         "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"),
        ("shard", "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
         "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"),
        ("tokenizer", "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.model"),
        ("tokenizer", "tokenizers/fineweb_1024_bpe.vocab", "tokenizers/fineweb_1024_bpe.vocab"),
    ]
    with pytest.raises(UserError, match="has 2 training shards"):
        plan_fineweb_files(FAKE_MANIFEST, "sp8192", 5)
    with pytest.raises(UserError, match="unknown variant"):
        plan_fineweb_files(FAKE_MANIFEST, "sp4096", 1)


def test_fineweb_download_resumes_and_verifies(tmp_path):
    hub = FakeHub()
    paths = download_fineweb("sp8192", 2, tmp_path, fetch=hub, log=lambda s: None)
    assert hub.calls[0] == "datasets/manifest.json" and len(hub.calls) == 1 + 3 + 1
    assert hub.calls[1] == "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin"
    assert all(p.is_file() for p in paths)
    # resume: a truncated shard is fetched again, complete files are skipped
    broken = tmp_path / "datasets/fineweb10B_sp8192/fineweb_train_000001.bin"
    broken.write_bytes(broken.read_bytes()[:-4])
    hub2 = FakeHub()
    download_fineweb("sp8192", 2, tmp_path, fetch=hub2, log=lambda s: None)
    assert hub2.calls == ["datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin"]
    assert read_shard(broken).size == 64
    # a download that arrives truncated is an error naming the file, and is not left behind
    bad = "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin"
    (tmp_path / bad[len("datasets/"):]).unlink()
    with pytest.raises(ShardError, match="fineweb_train_000000.bin: truncated"):
        download_fineweb("sp8192", 2, tmp_path, fetch=FakeHub(corrupt=[bad]), log=lambda s: None)
    assert not (tmp_path / bad[len("datasets/"):]).exists()


def test_fineweb_no_network_is_one_line_error(tmp_path, monkeypatch, capsys):
    import pgolf.cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what no network looks like to huggingface_hub, without a network call
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(pgolf.cli, "COMMAND_MODULES", [("pgolf.data.commands", "add_data_commands")])
    rc = pgolf.cli.main(["data", "fineweb", "--variant", "sp1024", "--train-shards", "1", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "manifest.json" in err and "Traceback" not in err


def test_fineweb_unreachable_hub_fails_fast_in_one_line(tmp_path, monkeypatch, capsys):
    import socket

    import pgolf.cli

    def refuse(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(pgolf.cli, "COMMAND_MODULES", [("pgolf.data.commands", "add_data_commands")])
    rc = pgolf.cli.main(["data", "fineweb", "--variant", "sp1024", "--train-shards", "1", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot reach the Hugging Face hub" in err
    assert not (tmp_path / "d").exists()  # nothing half-written
