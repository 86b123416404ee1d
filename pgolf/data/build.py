"""Tokenize a JSONL corpus into the challenge's train/val shards.

Each document is encoded alone with SentencePiece and prefixed with BOS (id 1), with no EOS, exactly as the
challenge's FineWeb shards. The first `val_docs` documents (over the files in the order given) form the
validation split, the rest the training split. Tokens of a split are streamed into shards of
`shard_tokens` tokens (documents may straddle two shards; the last shard of a split is shorter), named
fineweb_val_000000.bin, fineweb_train_000000.bin, .... Encoding runs in worker processes, order preserved.
The tokenizer .model is copied beside the shards and a manifest.json records files, counts and hashes.

With caseops=True (`pgolf data build --caseops`, a CaseOps tokenizer) each document is rewritten by
pgolf.data.caseops.caseops_encode before tokenizing, and the val split gets its per-token byte sidecar,
fineweb_val_bytes_NNNNNN.bin beside each fineweb_val_NNNNNN.bin (same header, one uint16 per token: the
original text's UTF-8 bytes the token stands for; BOS and case operators 0). The manifest records
"text_transform" ("identity" without --caseops) and, under "byte_sidecar", the sidecar files with their
sha256 and the byte total.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np

from pgolf.data.caseops import CASEOPS_TRANSFORM, caseops_encode, caseops_encode_document, is_caseops_tokenizer
from pgolf.data.corpus import iter_documents
from pgolf.data.shards import write_shard
from pgolf.errors import UserError
from pgolf.fileio import atomic_write_text

BUILD_BOS_ID = 1
BUILD_SHARD_TOKENS = 10**8
BUILD_BATCH_DOCS = 64  # documents per worker task

_WORKER_SP = None


def shard_file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_sentencepiece(model_path):
    """Load a SentencePiece model, or raise UserError naming the file."""
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer model not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None


def _init_encode_worker(model_path: str) -> None:
    global _WORKER_SP
    _WORKER_SP = load_sentencepiece(model_path)


def encode_documents(sp, texts: list[str]) -> np.ndarray:
    """BOS + ids of each text, concatenated, as uint16."""
    pieces = []
    for ids in sp.encode(texts):
        pieces.append(np.array([BUILD_BOS_ID, *ids], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def encode_caseops_documents(sp, texts: list[str], with_bytes: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """BOS + ids of each CaseOps-transformed text, concatenated (uint16); with_bytes: the byte sidecar of
    those tokens too (BOS 0), else None."""
    if not with_bytes:
        return encode_documents(sp, [caseops_encode(t) for t in texts]), None
    tokens, counts = [], []
    for text in texts:
        ids, n_bytes = caseops_encode_document(sp, text)
        tokens.append(np.array([BUILD_BOS_ID, *ids], dtype=np.uint16))
        counts.append(np.concatenate([[0], n_bytes]).astype(np.uint16))
    if not tokens:
        return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint16)
    return np.concatenate(tokens), np.concatenate(counts)


def encode_batch(sp, split: str, texts: list[str], caseops: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, val byte sidecar or None) of one batch of documents."""
    if caseops:
        return encode_caseops_documents(sp, texts, with_bytes=split == "val")
    return encode_documents(sp, texts), None


def _encode_batch_in_worker(task: tuple[str, list[str], bool]) -> tuple[str, int, tuple]:
    split, texts, caseops = task
    return split, len(texts), encode_batch(_WORKER_SP, split, texts, caseops)


def split_batches(docs, val_docs: int, batch_docs: int = BUILD_BATCH_DOCS):
    """Yield (split, [texts]) batches in document order; no batch crosses the val/train boundary."""
    batch, split = [], "val" if val_docs > 0 else "train"
    for i, text in enumerate(docs):
        current = "val" if i < val_docs else "train"
        if current != split or len(batch) >= batch_docs:
            if batch:
                yield split, batch
            batch, split = [], current
        batch.append(text)
    if batch:
        yield split, batch


class ShardStreamWriter:
    """Fills fixed-size shards from a stream of token arrays; `close()` writes the last partial shard."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.files: list[dict] = []
        self.docs = 0
        self.tokens = 0
        self.byte_total = 0  # the sum of the values written (a byte sidecar's bytes)

    def add(self, tokens: np.ndarray, docs: int) -> None:
        self.docs += docs
        self.tokens += tokens.size
        self.byte_total += int(tokens.sum(dtype=np.int64))
        pos = 0
        while pos < tokens.size:
            take = min(self.shard_tokens - self.fill, tokens.size - pos)
            self.buffer[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"fineweb_{self.split}_{len(self.files):06d}.bin"
        path = self.out_dir / name
        write_shard(path, self.buffer[:self.fill])
        self.files.append({"name": name, "split": self.split, "tokens": int(self.fill),
                           "sha256": shard_file_sha256(path)})
        self.fill = 0

    def close(self) -> None:
        self.flush()


def _encoded_batches(batches, model_path: Path, pool, caseops: bool):
    if pool is None:
        sp = load_sentencepiece(model_path)
        for split, texts in batches:
            yield split, len(texts), encode_batch(sp, split, texts, caseops)
        return
    tasks = ((split, texts, caseops) for split, texts in batches)
    yield from pool.imap(_encode_batch_in_worker, tasks, chunksize=4)


def check_build_tokenizer(sp, tokenizer_path: Path, caseops: bool) -> None:
    """A CaseOps build needs a CaseOps tokenizer, and a CaseOps tokenizer a CaseOps build."""
    if caseops and not is_caseops_tokenizer(sp):
        raise UserError(f"{tokenizer_path}: --caseops needs a CaseOps tokenizer (pieces U+E001..U+E004), this has none")
    if not caseops and is_caseops_tokenizer(sp):
        raise UserError(f"{tokenizer_path}: a CaseOps tokenizer; pass --caseops (its text must be transformed, "
                        "and its val split needs the byte sidecar)")


def _start_pool(stack: contextlib.ExitStack, model_path: Path, workers: int):
    if workers <= 1:
        return None
    # fork: works from scripts without a __main__ guard; the parent holds no threads at this point
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    return stack.enter_context(ctx.Pool(workers, initializer=_init_encode_worker, initargs=(str(model_path),)))


def build_split_shards(doc_files, tokenizer_path, val_docs: int, out_dir, workers: int | None = None,
                       shard_tokens: int = BUILD_SHARD_TOKENS, progress: bool = True, caseops: bool = False) -> dict:
    """Build val + train shards from JSONL documents; return the manifest (also written to manifest.json)."""
    doc_files = [Path(p) for p in doc_files]
    tokenizer_path, out_dir = Path(tokenizer_path), Path(out_dir)
    if not doc_files:
        raise UserError("no document files given")
    if val_docs < 0:
        raise UserError(f"val_docs={val_docs} must be >= 0")
    sp = load_sentencepiece(tokenizer_path)
    vocab = sp.get_piece_size()
    if vocab > 65536:
        raise UserError(f"{tokenizer_path}: vocab size {vocab} does not fit the uint16 shard format")
    check_build_tokenizer(sp, tokenizer_path, caseops)
    workers = workers or os.cpu_count() or 1
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"val": ShardStreamWriter(out_dir, "val", shard_tokens),
               "train": ShardStreamWriter(out_dir, "train", shard_tokens)}
    sidecar = ShardStreamWriter(out_dir, "val_bytes", shard_tokens) if caseops else None
    batches = split_batches(iter_documents(doc_files), val_docs)
    with contextlib.ExitStack() as stack:
        pool = _start_pool(stack, tokenizer_path, workers)  # before the progress bar, so no child inherits it
        bar = None
        if progress:
            from tqdm import tqdm

            bar = stack.enter_context(tqdm(unit="doc", desc="tokenizing", dynamic_ncols=True, mininterval=1.0))
        for split, n_docs, (tokens, n_bytes) in _encoded_batches(batches, tokenizer_path, pool, caseops):
            writers[split].add(tokens, n_docs)
            if n_bytes is not None:
                sidecar.add(n_bytes, n_docs)
            if bar is not None:
                bar.update(n_docs)
                bar.set_postfix_str(f"{writers['val'].tokens + writers['train'].tokens:,} tok", refresh=False)
    for w in [*writers.values(), sidecar] if sidecar else writers.values():
        w.close()
    if writers["val"].docs < val_docs:
        raise UserError(f"only {writers['val'].docs} documents in the corpus; --val-docs asks for {val_docs}")
    shutil.copyfile(tokenizer_path, out_dir / tokenizer_path.name)
    manifest = {
        "format": "challenge-shards-v1",
        "bos_id": BUILD_BOS_ID,
        "append_eos": False,
        "shard_tokens": shard_tokens,
        "tokenizer": {"file": tokenizer_path.name, "sha256": shard_file_sha256(tokenizer_path),
                      "vocab_size": vocab},
        "sources": [{"file": p.name, "sha256": shard_file_sha256(p)} for p in doc_files],
        "splits": {s: {"docs": w.docs, "tokens": w.tokens, "files": len(w.files)} for s, w in writers.items()},
        "files": writers["val"].files + writers["train"].files,
        "text_transform": CASEOPS_TRANSFORM if caseops else "identity",
    }
    if sidecar is not None:
        manifest["byte_sidecar"] = {"dtype": "uint16", "per": "val token", "files": sidecar.files,
                                    "bytes": int(sidecar.byte_total)}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest
