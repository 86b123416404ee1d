"""`pgolf data verify` of a data folder's val byte sidecar (pgolf.data.sidecar): its alignment with the val
tokens, the manifest's records, and each document's byte sum against its source text."""

from pathlib import Path

import numpy as np

from pgolf.data.build import shard_file_sha256
from pgolf.data.corpus import iter_documents
from pgolf.data.loader import load_val_tokens
from pgolf.data.manifest import read_data_manifest
from pgolf.data.shards import list_shards
from pgolf.data.sidecar import (
    SIDECAR_IDENTITY,
    document_byte_sums,
    load_val_bytes,
    val_sidecar_files,
)
from pgolf.errors import UserError


def check_manifest_sidecar(folder: Path, manifest: dict, total: int) -> None:
    """The sidecar files' sha256 and byte total against those manifest.json records."""
    entry = manifest.get("byte_sidecar") or {}
    for f in entry.get("files", []):
        if shard_file_sha256(folder / f["name"]) != f["sha256"]:
            raise UserError(f"{folder / f['name']}: sha256 differs from the one manifest.json records")
    if "bytes" in entry and int(entry["bytes"]) != total:
        raise UserError(f"{folder}: the sidecar sums to {total:,} bytes, manifest.json records {int(entry['bytes']):,}")


def verify_val_sidecar(folder, doc_files=None, bos_id: int = 1) -> dict | None:
    """Check a data folder's val byte sidecar: one value per val token, the stream starting with BOS, every
    BOS counting 0, the manifest's document count, sha256s and byte total; with doc_files (the JSONL sources,
    in the build's order) each document's sum equals its text's UTF-8 length (0 for a document the tokenizer
kept nothing of: whitespace only). None when the folder has no
    sidecar and is not CaseOps; UserError on the first failed check."""
    folder = Path(folder)
    manifest = read_data_manifest(folder) or {}
    transform = str(manifest.get("text_transform") or SIDECAR_IDENTITY)
    val_files = list_shards(folder, "fineweb_val_*.bin")
    if val_sidecar_files(val_files) is None:
        if transform != SIDECAR_IDENTITY:
            raise UserError(f"{folder}: text_transform={transform} but no byte sidecar beside the val shards")
        return None
    tokens = load_val_tokens(val_files).numpy()
    values = load_val_bytes(val_files).numpy()
    if tokens.size and tokens[0] != bos_id:
        raise UserError(f"{val_files[0]}: the val stream does not start with BOS ({bos_id})")
    if bool((values[tokens == bos_id] != 0).any()):
        raise UserError(f"{folder}: a BOS counts bytes in the sidecar (not aligned with the tokens)")
    sums = document_byte_sums(tokens, values, bos_id)
    want_docs = (manifest.get("splits") or {}).get("val", {}).get("docs")
    if want_docs is not None and int(want_docs) != sums.size:
        raise UserError(f"{folder}: {sums.size:,} BOS in the val stream, manifest.json records {want_docs:,} documents")
    total = int(values.sum(dtype=np.int64))
    check_manifest_sidecar(folder, manifest, total)
    checked = 0
    if doc_files:
        starts = np.flatnonzero(tokens == bos_id)
        empty = np.diff(np.append(starts, tokens.size)) == 1  # BOS alone: the tokenizer kept nothing of the text
        for i, text in enumerate(iter_documents(doc_files)):
            if i >= sums.size:
                break
            if int(sums[i]) != (0 if empty[i] else len(text.encode("utf-8"))):
                raise UserError(f"{folder}: val document {i} counts {int(sums[i]):,} sidecar bytes, its text has "
                                f"{len(text.encode('utf-8')):,} UTF-8 bytes")
            checked += 1
        if checked < sums.size:
            raise UserError(f"{folder}: the sources hold {checked} documents, the val split {sums.size}")
    return {"tokens": int(tokens.size), "docs": int(sums.size), "bytes": total, "docs_checked": checked,
            "text_transform": transform}
