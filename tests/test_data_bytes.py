"""Byte LUTs for bpb, checked against an oracle: the UTF-8 length of the decoded text of each document.

For a BOS-led document, the bytes its tokens stand for must add up to len(sp.decode(ids).encode()), for
every document and in total, on real text (the shared wiki corpus) and on hand-made text with non-ASCII
and characters outside the vocabulary (byte fallback), with both challenge tokenizers and one trained here.
"""

import itertools

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import TOKENIZER_1024, TOKENIZER_8192, WIKI_DIR

from pgolf.data.bytes import build_byte_luts, target_byte_counts
from pgolf.data.corpus import iter_documents
from pgolf.data.tokenizer import train_sentencepiece_bpe
from pgolf.errors import UserError

HANDMADE = [
    "Plain ASCII: the quick brown fox jumps over the lazy dog 1234567890.",
    "Zürich, São Paulo, Kraków, Ærøskøbing — naïve café façade; “quotes” and ‘apostrophes’…",
    "Ωμέγα and Ελληνικά, русский текст, עברית, العربية, हिन्दी, தமிழ், ქართული.",
    "漢字かな交じり文, 한국어 문장, 中文句子。 Emoji: 😀🚀🧪 flags 🇫🇷 and ZWJ 👩‍🔬.",
    "Whitespace:\tleading tab,  double  spaces,\n\nblank lines,   trailing   \n  indented line",
    "Compatibility forms: ﬁ ligature, ① circled, ＦＵＬＬＷＩＤＴＨ, x² and ½, e\u0301 combining.",
    "Rare symbols: ᚠᛇᚻ runes, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math, ⠃⠗⠁⠊⠇⠇⠑ braille, ꙮ, 𓂀 hieroglyph.",
    "Numbers 3.14159, 2,718,281 and 1e-9; code: x = f(y) + 0x1F; path C:\\tmp\\a_b-c.txt",
]


def per_doc_lut_bytes(lut, all_ids) -> list[int]:
    """LUT bytes of each document, with the documents packed BOS-led into one stream as in training/eval."""
    stream = torch.from_numpy(np.concatenate([np.array([1, *ids], dtype=np.int64) for ids in all_ids]))
    counts = torch.cat([torch.zeros(1, dtype=torch.int32), target_byte_counts(stream[:-1], stream[1:], lut)])
    doc_of_token = torch.repeat_interleave(torch.arange(len(all_ids)), torch.tensor([len(i) + 1 for i in all_ids]))
    return torch.zeros(len(all_ids), dtype=torch.int64).index_add_(0, doc_of_token, counts.long()).tolist()


def decoded_bytes(sp, all_ids) -> list[int]:
    return [len(text.encode("utf-8")) for text in sp.decode(all_ids)]


def assert_oracle(sp, docs, vocab_size=None):
    """Every document and the total match the decoded text's byte length."""
    lut = build_byte_luts(sp, vocab_size or sp.get_piece_size())
    all_ids = sp.encode(docs)
    per_doc, oracle = per_doc_lut_bytes(lut, all_ids), decoded_bytes(sp, all_ids)
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(per_doc, oracle, strict=True)) if a != b]
    assert not mismatches, f"documents whose byte count differs (doc, lut, decoded): {mismatches[:5]}"
    assert sum(per_doc) == sum(oracle) and sum(oracle) > 0
    return all_ids


@pytest.fixture(scope="module")
def wiki_docs():
    return list(itertools.islice(iter_documents([WIKI_DIR / "docs_000.jsonl.xz"]), 300))


@pytest.fixture(scope="module")
def trained_sp(wiki_docs, tmp_path_factory):
    path = train_sentencepiece_bpe(wiki_docs, 512, tmp_path_factory.mktemp("tok") / "wiki512.model")
    return spm.SentencePieceProcessor(model_file=str(path))


def count_byte_pieces(sp, all_ids) -> int:
    return sum(sp.is_byte(i) for ids in all_ids for i in ids)


@pytest.mark.shared
def test_sp8192_wiki_and_handmade(wiki_docs):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_8192))
    assert_oracle(sp, wiki_docs)
    ids = assert_oracle(sp, HANDMADE)
    assert count_byte_pieces(sp, ids) > 20  # byte fallback really happened


@pytest.mark.shared
def test_trained_tokenizer_wiki_and_handmade(wiki_docs, trained_sp):
    assert_oracle(trained_sp, wiki_docs)
    ids = assert_oracle(trained_sp, HANDMADE)
    assert count_byte_pieces(trained_sp, ids) > 50


@pytest.mark.shared
def test_sp1024_unk_free_documents(wiki_docs):
    """The shared sp1024 has no byte fallback: text it cannot encode becomes <unk>, which bpb counts as 0 bytes
    (a boundary, as the challenge's LUT). The oracle holds exactly on every <unk>-free document; on the others
    the count is below the decoded length, which includes the " ⁇ " stand-ins."""
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_1024))
    assert not any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    docs = wiki_docs + HANDMADE
    encoded = sp.encode(docs)
    clean = [d for d, ids in zip(docs, encoded, strict=True) if sp.unk_id() not in ids]
    assert len(clean) >= 50
    assert_oracle(sp, clean)
    with_unk = [ids for ids in encoded if sp.unk_id() in ids]
    lut = build_byte_luts(sp, 1024)
    pairs = zip(per_doc_lut_bytes(lut, with_unk), decoded_bytes(sp, with_unk), strict=True)
    assert all(a < b for a, b in pairs)


@pytest.mark.shared
def test_rules_on_single_pieces(trained_sp):
    sp = trained_sp
    lut = build_byte_luts(sp, sp.get_piece_size() + 10)
    assert lut.base_bytes.dtype == torch.int16 and lut.has_space.dtype == torch.bool
    n = sp.get_piece_size()
    assert lut.is_boundary[n:].all() and (lut.base_bytes[n:] == 0).all()
    for special in (0, 1, 2, 3):
        assert lut.is_boundary[special] and lut.base_bytes[special] == 0
    byte_ids = [i for i in range(n) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and (lut.base_bytes[byte_ids] == 1).all()
    space = sp.piece_to_id("\u2581")
    word = next(i for i in range(n) if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) == 3)
    prev = torch.tensor([1, 1, word, word, space])
    tgt = torch.tensor([space, word, space, word, word])
    base = len(sp.id_to_piece(word)[1:].encode())
    # after BOS the space is not counted; after a word it is; a lone "▁" is the space itself
    assert target_byte_counts(prev, tgt, lut).tolist() == [0, base, 1, base + 1, base + 1]
    with pytest.raises(UserError, match="smaller than"):
        build_byte_luts(sp, n - 1)


@pytest.mark.shared
def test_tokenizer_without_space_piece_is_refused(wiki_docs, tmp_path):
    """Trained on text with no whitespace, the vocabulary has no "▁": spaces would fall back to the 3 UTF-8
    bytes of "▁" and bpb would be wrong, so the LUT builder refuses it."""
    squashed = ["".join(d.split()) for d in wiki_docs[:50]]
    path = train_sentencepiece_bpe(squashed, 400, tmp_path / "nospace.model")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.piece_to_id("\u2581") == sp.unk_id()
    with pytest.raises(UserError, match="no standalone") as e:
        build_byte_luts(sp, sp.get_piece_size())
    assert "\n" not in str(e.value)
