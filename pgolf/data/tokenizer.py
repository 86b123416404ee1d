"""Train a SentencePiece BPE tokenizer with the challenge's settings.

Fixed, as the challenge's tokenizers: model_type=bpe, byte_fallback (characters outside the vocabulary
become <0xNN> byte pieces, never <unk>), split_digits, nmt_nfkc normalization, no dummy prefix,
pad/bos/eos/unk = 0/1/2/3, hard_vocab_limit off (a small corpus may not fill the vocabulary).

Our choices: the training "sentences" are the documents' non-blank lines (paragraphs), because nmt_nfkc
turns newlines into spaces anyway and SentencePiece skips sentences longer than max_sentence_length;
paragraphs longer than TOKENIZER_MAX_SENTENCE_BYTES are cut into pieces of that size. At most
TOKENIZER_INPUT_SENTENCES paragraphs are sampled (SentencePiece's seeded shuffle), enough to fit
a 8192 vocabulary while training in minutes. character_coverage 0.9995 keeps rare characters
(a few per 10,000) out of the vocabulary: byte fallback encodes them losslessly.
"""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pgolf.data.corpus import iter_documents
from pgolf.errors import UserError

TOKENIZER_MAX_SENTENCE_BYTES = 8192
TOKENIZER_INPUT_SENTENCES = 2_000_000
TOKENIZER_CHAR_COVERAGE = 0.9995


def tokenizer_sentences(texts: Iterable[str], max_docs: int | None = None) -> Iterator[str]:
    """Paragraphs of the documents, cut to at most TOKENIZER_MAX_SENTENCE_BYTES characters."""
    step = TOKENIZER_MAX_SENTENCE_BYTES // 4  # 4 bytes is the widest UTF-8 character
    for i, text in enumerate(texts):
        if max_docs is not None and i >= max_docs:
            return
        for line in text.split("\n"):
            line = line.strip()
            for start in range(0, len(line), step):
                yield line[start:start + step]


def sentencepiece_bpe_options(vocab_size: int, **overrides) -> dict:
    """The trainer options (challenge settings + our sampling choices); overrides win."""
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        character_coverage=TOKENIZER_CHAR_COVERAGE,
        input_sentence_size=TOKENIZER_INPUT_SENTENCES,
        shuffle_input_sentence=True,
        max_sentence_length=TOKENIZER_MAX_SENTENCE_BYTES,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    options.update(overrides)
    return options


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int, out_model, max_docs: int | None = None,
                            **overrides) -> Path:
    """Train on the given document texts and write the .model file (atomically); return its path."""
    import io

    import sentencepiece as spm

    out_model = Path(out_model)
    if vocab_size < 8:
        raise UserError(f"vocab_size={vocab_size} is too small for a tokenizer")
    model = io.BytesIO()
    sentences = tokenizer_sentences(texts, max_docs)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model,
                                       **sentencepiece_bpe_options(vocab_size, **overrides))
    except RuntimeError as e:
        raise UserError(f"SentencePiece training failed for {out_model}: {str(e).splitlines()[0]}") from None
    out_model.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_model.with_name(f".{out_model.name}.tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_model)
    return out_model


def train_tokenizer_from_docs(doc_files, vocab_size: int, out_model, max_docs: int | None = None,
                              **overrides) -> Path:
    """Train on the "text" of JSONL documents (plain or compressed), in file order."""
    return train_sentencepiece_bpe(iter_documents(doc_files), vocab_size, out_model, max_docs, **overrides)


def resolve_tokenizer_path(data_cfg) -> Path:
    """The tokenizer of a DataConfig: `tokenizer` when set, else the single *.model file inside `path`."""
    if data_cfg.tokenizer:
        tokenizer = Path(data_cfg.tokenizer)
        if not tokenizer.is_file():
            raise UserError(f"data.tokenizer={str(tokenizer)!r} does not exist")
        return tokenizer
    folder = Path(data_cfg.path)
    models = sorted(folder.glob("*.model"))
    if len(models) != 1:
        raise UserError(f"{folder}: expected exactly one *.model tokenizer, found {len(models)}; "
                        f"set data.tokenizer (or pass --tokenizer)")
    return models[0]
