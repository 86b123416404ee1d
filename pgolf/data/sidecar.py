"""The per-token byte sidecar of the validation shards: its files, loading it aligned to the val tokens, and
choosing the evaluations' byte source (pgolf.data.sidecar_verify checks a built folder).

Val shard `fineweb_val_NNNNNN.bin` has the sidecar `fineweb_val_bytes_NNNNNN.bin`: the same header, one uint16
per token of that shard, the UTF-8 bytes of the original text the token stands for (BOS 0; pgolf.data.caseops).
Sidecars are read through `read_shard`, so FILE_AUDIT records them as the val files they are.

Data is CaseOps when the folder's manifest.json says `text_transform` is not "identity", or when the tokenizer
has the CaseOps operator pieces. Such data is scored with its sidecar only: without one, loading refuses,
since the tokenizer's byte LUT counts each case operator as 3 bytes (bpb about 0.09 too low).
"""

from pathlib import Path

import numpy as np
import torch

from pgolf.data.bytes import ByteSidecar, build_byte_luts
from pgolf.data.caseops import is_caseops_tokenizer
from pgolf.data.manifest import read_data_manifest
from pgolf.data.shards import read_shard, shard_token_count
from pgolf.errors import UserError

SIDECAR_IDENTITY = "identity"


def sidecar_path(shard_path) -> Path:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (beside it)."""
    path = Path(shard_path)
    head, sep, index = path.stem.rpartition("_")
    if not sep:
        raise UserError(f"{path}: shard name has no _NNNNNN index to name its byte sidecar")
    return path.with_name(f"{head}_bytes_{index}{path.suffix}")


def val_sidecar_files(val_files) -> list[Path] | None:
    """The sidecar of every val shard, or None when there is none; UserError when only some have one."""
    paths = [sidecar_path(p) for p in val_files]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = paths[present.index(False)]
        raise UserError(f"{missing}: byte sidecar missing (other val shards have theirs)")
    return paths


def data_text_transform(folder) -> str:
    """The text transform the folder's manifest records ("identity" without a manifest or the key)."""
    manifest = read_data_manifest(folder) or {}
    return str(manifest.get("text_transform") or SIDECAR_IDENTITY)


def load_val_bytes(val_files, max_tokens: int = 0) -> torch.Tensor:
    """The val shards' sidecars concatenated in the same order, int32, cut exactly as
    pgolf.data.loader.load_val_tokens(val_files, max_tokens=max_tokens) cuts the tokens."""
    files = sorted(Path(p) for p in val_files)
    sidecars = val_sidecar_files(files)
    if sidecars is None:
        raise UserError(f"{sidecar_path(files[0])}: no byte sidecar beside the val shards")
    parts, total = [], 0
    for shard, side in zip(files, sidecars, strict=True):
        if max_tokens and total >= max_tokens:
            break
        values = read_shard(side)
        if values.size != shard_token_count(shard):
            raise UserError(f"{side}: {values.size:,} byte counts for the {shard_token_count(shard):,} tokens of "
                            f"{shard.name}")
        parts.append(np.asarray(values, dtype=np.int32))
        total += values.size
    values = np.concatenate(parts)
    return torch.from_numpy(values[:max_tokens] if max_tokens else values)


def caseops_reason(folder, sp) -> str:
    """Why the data counts as CaseOps ("" when it does not)."""
    transform = data_text_transform(folder)
    if transform != SIDECAR_IDENTITY:
        return f"manifest.json says text_transform={transform}"
    if is_caseops_tokenizer(sp):
        return "its tokenizer has the CaseOps operator pieces"
    return ""


def load_val_byte_source(val_files, val_tokens: torch.Tensor, sp, vocab_size: int, bos_id: int = 1):
    """What the evaluations count bytes with: a ByteSidecar of exactly val_tokens' positions when the val
    shards have sidecars, else the tokenizer's ByteLUT; UserError for CaseOps data without sidecars."""
    files = sorted(Path(p) for p in val_files)
    lut = build_byte_luts(sp, vocab_size)
    if val_sidecar_files(files) is None:
        reason = caseops_reason(files[0].parent, sp)
        if reason:
            raise UserError(f"{files[0].parent}: CaseOps data ({reason}) but no byte sidecar "
                            f"{sidecar_path(files[0]).name}; refusing the byte LUT (it counts each case operator "
                            "as 3 bytes): rebuild with `pgolf data build --caseops`")
        return lut
    values = load_val_bytes(files, max_tokens=val_tokens.numel())
    if values.numel() != val_tokens.numel():
        raise UserError(f"{files[0].parent}: {values.numel():,} sidecar values for {val_tokens.numel():,} val tokens")
    bad = (val_tokens == bos_id) & (values != 0)
    if bool(bad.any()):
        where = int(bad.nonzero()[0])
        raise UserError(f"{sidecar_path(files[0]).name}: a BOS at stream position {where} counts {int(values[where])} "
                        "bytes (a BOS stands for none): the sidecar is not aligned with the tokens")
    return ByteSidecar(values, lut)


def document_byte_sums(tokens: np.ndarray, values: np.ndarray, bos_id: int = 1) -> np.ndarray:
    """Each document's sidecar sum, documents starting at each BOS (int64)."""
    starts = np.flatnonzero(tokens == bos_id)
    return np.add.reduceat(values.astype(np.int64), starts) if starts.size else np.zeros(0, dtype=np.int64)

