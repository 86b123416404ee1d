"""CaseOps data: the lossless-caps transform and its inverse, the CaseOps shards with their val byte sidecar,
and every scorer counting bytes with the sidecar (never the LUT)."""

import importlib.util
import itertools
import json
import re
import shutil
import sys
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SHARED, TOKENIZER_1024, WIKI_DIR

from pgolf.config import EvalConfig
from pgolf.data.build import build_split_shards
from pgolf.data.bytes import ByteLUT, ByteSidecar, build_byte_luts
from pgolf.data.caseops import (
    CASEOPS_ALLCAPS,
    CASEOPS_CAPNEXT,
    CASEOPS_ESC,
    CASEOPS_TITLE,
    CaseOpsError,
    caseops_decode,
    caseops_encode,
    caseops_encode_document,
)
from pgolf.data.corpus import iter_documents
from pgolf.data.loader import load_val_tokens
from pgolf.data.shards import list_shards, read_shard, write_shard
from pgolf.data.sidecar import load_val_byte_source, load_val_bytes
from pgolf.data.sidecar_verify import verify_val_sidecar
from pgolf.errors import UserError
from pgolf.eval.bpb import evaluate_plain
from pgolf.eval.legality import run_legality_checks
from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.toy import EvalToyModel
from pgolf.eval.ttt import evaluate_ttt
from pgolf.train.finish import val_byte_denominators

TOKENIZER_CASEOPS = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
ANCHORS = SHARED / "anchors" / "frontier"
T, A, C, E = CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC
# strings the wiki text may lack: operators in the input, mixed case, what the normaliser drops or folds
EDGE_TEXTS = ["The NASA Launch", "iPhone McDonald's I a A AB aB Ab ABc aBC xY", f"{T}x{E}{E} {C}A{A}", "É\u00c9ABC",
              "\ufeff  Hello\u00e9  \n\n world\u3000x\u2460 \uff21 e\u0301 \x00a\x07b",
              "\u200bc\t\td\r\n\u00a0q \U0001F600z  ",
              "ﬁA™ ½ \u212a", "", "   ", "Z"]


def wiki_docs(n: int) -> list[str]:
    return list(itertools.islice(iter_documents([WIKI_DIR / "docs_000.jsonl.xz"]), n))


def record_module(name: str):
    """The record's script (the oracle), imported from the anchors folder inside the test only."""
    if str(ANCHORS) not in sys.path:
        sys.path.insert(0, str(ANCHORS))
    spec = importlib.util.spec_from_file_location(f"anchor_{name}", ANCHORS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transform_examples_and_malformed_text():
    assert caseops_encode("The NASA Launch") == f"{T}the {A}nasa {T}launch"
    assert caseops_encode("iPhone McDonald's I") == f"i{C}phone {T}mc{C}donald's {T}i"
    assert caseops_encode("ABc aBC É") == f"{T}a{C}bc a{C}b{C}c É"
    assert caseops_encode(f"a{T}b{E}") == f"a{E}{T}b{E}{E}"
    for text in EDGE_TEXTS:
        assert caseops_decode(caseops_encode(text)) == text
    for bad in [f"ab{T}", f"a{T}b", f"{C}{C}a", f"{T} a", f"{A}{T}a", f"x{E}"]:
        with pytest.raises(CaseOpsError):
            caseops_decode(bad)


@pytest.mark.shared
def test_transform_equals_the_record_and_inverts_on_wiki_text():
    lossless_caps = record_module("lossless_caps")
    texts = wiki_docs(80) + EDGE_TEXTS
    assert sum(len(t) for t in texts) > 500_000 and any(re.search("[A-Z]{2}", t) for t in texts)
    for text in texts:
        encoded = caseops_encode(text)
        assert encoded == lossless_caps.encode_lossless_caps_v2(text)
        assert caseops_decode(encoded) == text
        assert lossless_caps.decode_lossless_caps_v2(encoded) == text


@pytest.mark.shared
def test_sidecar_equals_the_record_builders_and_sums_to_utf8():
    builder = record_module("build_caseops")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_CASEOPS))
    for text in wiki_docs(30) + [t for t in EDGE_TEXTS if t.strip()]:
        ids, n_bytes = caseops_encode_document(sp, text)
        tokens, sidecar = builder.val_doc(sp, text)
        assert ids == tokens[1:].tolist() and n_bytes.tolist() == sidecar[1:].tolist()
        assert ids == sp.encode(caseops_encode(text)) and int(n_bytes.sum()) == len(text.encode("utf-8"))


def normaliser_fold(text: str) -> str:
    """What the CaseOps tokenizer's normaliser keeps of a text (pgolf.data.caseops docstring), for wiki text:
    NFKC, C0/C1 controls but NUL and U+0085 dropped, whitespace runs one space, no leading/trailing space."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub("[\x01-\x08\x0b\x0e-\x1f\x7f-\x84\x86-\x9f]", "", text)
    text = re.sub("[ \t\n\r\f\u00a0\u2009\u2028\u3000\u200b\u200c\ufeff]+", " ", text)
    return text.strip(" ")


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """CaseOps shards of the first 40 wiki documents (30 val), in shards of 2,000 tokens."""
    folder = tmp_path_factory.mktemp("caseops")
    docs = wiki_docs(40)
    source = folder / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    out = folder / "data"
    manifest = build_split_shards([source], TOKENIZER_CASEOPS, 30, out, workers=2, shard_tokens=2_000,
                                  progress=False, caseops=True)
    return {"docs": docs, "source": source, "out": out, "manifest": manifest}


@pytest.mark.shared
def test_build_writes_tokens_sidecar_and_manifest(caseops_data, tmp_path):
    out, docs, manifest = caseops_data["out"], caseops_data["docs"], caseops_data["manifest"]
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_CASEOPS))
    val_files = list_shards(out, "fineweb_val_*.bin")
    assert len(val_files) > 2 and not any("_bytes_" in p.name for p in val_files)
    tokens = load_val_tokens(val_files).numpy()
    values = load_val_bytes(val_files).numpy()
    expect = np.concatenate([[1, *sp.encode(caseops_encode(t))] for t in docs[:30]])
    assert np.array_equal(tokens, expect) and values.size == tokens.size
    train = np.concatenate([read_shard(p) for p in list_shards(out, "fineweb_train_*.bin")])
    assert np.array_equal(train, np.concatenate([[1, *sp.encode(caseops_encode(t))] for t in docs[30:]]))
    starts = np.flatnonzero(tokens == 1)
    assert starts.size == 30 and (values[starts] == 0).all()
    sums = np.add.reduceat(values.astype(np.int64), starts)
    assert sums.tolist() == [len(t.encode("utf-8")) for t in docs[:30]]  # document by document
    assert (values[np.isin(tokens, [4, 5, 6])] == 0).all()  # operators stand for no byte (none escaped here)
    assert manifest["text_transform"] == "lossless_caps_caseops_v1"
    side = manifest["byte_sidecar"]
    assert side["bytes"] == sum(len(t.encode("utf-8")) for t in docs[:30])
    assert [f["name"] for f in side["files"]] == [p.name.replace("_val_", "_val_bytes_") for p in val_files]
    for f, shard in zip(side["files"], val_files, strict=True):
        assert read_shard(out / f["name"]).size == read_shard(shard).size
    # ids decode, through the inverse, to the original text as the normaliser folds it
    for i, text in enumerate(docs[:30]):
        ids = tokens[starts[i] + 1:starts[i + 1] if i + 1 < 30 else None].tolist()
        assert caseops_decode(sp.decode(ids)) == normaliser_fold(text)
    assert sum(normaliser_fold(t) != t for t in docs[:30]) > 20  # the fold is real: ids alone lose the text
    report = verify_val_sidecar(out, [caseops_data["source"]])
    assert report["docs"] == report["docs_checked"] == 30 and report["bytes"] == side["bytes"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    first = bad / side["files"][0]["name"]
    shifted = read_shard(first).copy()
    shifted[5], shifted[6] = shifted[5] + 1, shifted[6] - 1  # same total, moved between two tokens
    write_shard(first, shifted)
    with pytest.raises(UserError, match="sha256 differs"):
        verify_val_sidecar(bad, [caseops_data["source"]])


@pytest.mark.shared
def test_build_refuses_mismatched_tokenizer(caseops_data, tmp_path):
    with pytest.raises(UserError, match="needs a CaseOps tokenizer"):
        build_split_shards([caseops_data["source"]], TOKENIZER_1024, 5, tmp_path, workers=1, progress=False,
                           caseops=True)
    with pytest.raises(UserError, match="pass --caseops"):
        build_split_shards([caseops_data["source"]], TOKENIZER_CASEOPS, 5, tmp_path, workers=1, progress=False)


@pytest.mark.shared
def test_caseops_data_without_sidecar_is_refused(caseops_data, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_CASEOPS))
    folder = tmp_path / "nosidecar"
    shutil.copytree(caseops_data["out"], folder)
    for p in folder.glob("fineweb_val_bytes_*.bin"):
        p.unlink()
    val_files = list_shards(folder, "fineweb_val_*.bin")
    tokens = load_val_tokens(val_files)
    with pytest.raises(UserError, match="text_transform=lossless_caps_caseops_v1.*refusing the byte LUT"):
        load_val_byte_source(val_files, tokens, sp, 8192)
    with pytest.raises(UserError, match="no byte sidecar"):
        verify_val_sidecar(folder)
    with pytest.raises(UserError, match="no byte sidecar"):
        load_val_bytes(val_files)
    (folder / "manifest.json").unlink()  # the tokenizer alone says CaseOps too
    with pytest.raises(UserError, match="CaseOps operator pieces"):
        load_val_byte_source(val_files, tokens, sp, 8192)


def small_eval_cfg() -> EvalConfig:
    return EvalConfig(batch_seqs=4, sliding_stride=64, ttt=True, ttt_chunk_tokens=768, ttt_epochs=1, ttt_lr=0.01,
                      ttt_momentum=0.9, ttt_batch_seqs=4, ttt_grad_clip=1.0, ttt_mode="lora", ttt_lora_rank=2)


@pytest.mark.shared
def test_scorers_divide_by_the_sidecar(caseops_data):
    val_files = list_shards(caseops_data["out"], "fineweb_val_*.bin")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_CASEOPS))
    n = 2_000 + 300  # a cut (eval.val_tokens) past the first shard's end
    tokens = load_val_tokens(val_files, max_tokens=n)
    source = load_val_byte_source(val_files, tokens, sp, 8192)
    assert isinstance(source, ByteSidecar) and source.token_bytes.numel() == n
    assert torch.equal(source.token_bytes, load_val_bytes(val_files).narrow(0, 0, n))
    sidecar_sum = int(source.token_bytes[1:].sum())
    lut = build_byte_luts(sp, 8192)
    lut_sum = int(evaluate_plain(EvalToyModel(8192, 16), tokens, lut, 128, 4, scorer="reference")["bytes"])
    assert lut_sum != sidecar_sum
    model = EvalToyModel(8192, 16)
    cfg = small_eval_cfg()
    results = {"plain": evaluate_plain(model, tokens, source, 128, 4, scorer="eager"),
               "plain_ref": evaluate_plain(model, tokens, source, 128, 4, scorer="reference"),
               "sliding": evaluate_sliding(model, tokens, source, 128, 64, 4, scorer="eager"),
               "ttt": evaluate_ttt(model, tokens, source, cfg, 128, scorer="eager")}
    for name, r in results.items():
        assert r["tokens"] == n - 1 and r["bytes"] == sidecar_sum, name
        assert r["lut_bytes"] == lut_sum, name
        assert r["val_bpb"] == pytest.approx(r["nll_sum"] / np.log(2) / sidecar_sum, rel=1e-12)
    assert results["ttt"]["updates"] > 0 and results["ttt"]["chunks"] == 3
    # the run record's two denominators (pgolf.train.finish)
    assert val_byte_denominators(tokens, source) == {"bytes_source": "sidecar", "val_bytes": sidecar_sum,
                                                     "val_lut_bytes": lut_sum}
    assert val_byte_denominators(tokens, lut) == {"bytes_source": "lut", "val_bytes": lut_sum}
    # per token: every path scores each target once and charges it the sidecar's value at its position
    with pytest.raises(UserError, match="cut at the same positions"):
        evaluate_plain(model, tokens[:-1], source, 128, 4)


@pytest.mark.shared
def test_legality_harness_checks_the_sidecar_denominator(caseops_data):
    val_files = list_shards(caseops_data["out"], "fineweb_val_*.bin")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_CASEOPS))
    tokens = load_val_tokens(val_files, max_tokens=97)
    real = load_val_byte_source(val_files, tokens, sp, 8192)
    # the real sidecar over ids folded into a 64-token vocabulary (BOS stays 1), so the probes stay cheap
    small_lut = ByteLUT(torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool),
                        torch.zeros(64, dtype=torch.bool))
    source, tokens = ByteSidecar(real.token_bytes, small_lut), tokens % 64
    model = EvalToyModel(64, 16)

    def honest(m, t, lu, **kw):
        return evaluate_plain(m, t, lu, 16, 4, scorer="eager", **kw)

    def lut_fallback(m, t, lu, **kw):  # a scorer that ignores the sidecar it was given
        return evaluate_plain(m, t, lu.lut, 16, 4, scorer="eager", **kw)

    for fn, passed in [(honest, True), (lut_fallback, False)]:
        results = {r.name: r for r in run_legality_checks(lambda: model, tokens, source, fn, max_probes=1)}
        assert results["byte_denominator"].passed is passed, results["byte_denominator"].detail
        assert results["causality"].passed and results["normalization"].passed
