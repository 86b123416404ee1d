"""A pickle-free file of named tensors plus JSON metadata (float weights, checkpoints).

Layout: 8-byte magic b"PGTENS02", 8-byte little-endian header length n, 4-byte little-endian CRC-32 of the
header, n bytes of UTF-8 JSON {"meta": {...}, "data_bytes", "tensors": [{"name", "dtype", "shape", "offset",
"nbytes", "crc32"}, ...]}, then the raw tensor bytes, each tensor C-contiguous and little-endian, at its offset
from the end of the header. Reading checks the header's CRC, the file's length and every tensor's CRC, so a
flipped or missing byte is an error naming the file, never a silently different model. Files are written
atomically (pgolf.fileio). Loading never executes anything from the file.

Files of the first version (b"PGTENS01": no CRC field, no data_bytes) are still read, unverified.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import UserError
from pgolf.fileio import atomic_write

TENSORFILE_MAGIC = b"PGTENS02"
TENSORFILE_MAGIC_V1 = b"PGTENS01"  # unchecksummed files of earlier pgolf versions: read, unverified
TENSORFILE_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def tensor_from_bytes(buf: bytes, dtype_name: str, shape: list[int]) -> torch.Tensor:
    dtype = TENSORFILE_DTYPES[dtype_name]
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(buf, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(buf, dtype=np_dtype).copy()).reshape(shape)


def write_tensors(path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> int:
    """Write tensors and metadata to path (atomically: OutputError naming path when it cannot be written);
    returns the file size."""
    entries, blobs, offset = [], [], 0
    for name, t in tensors.items():
        dtype_name = str(t.dtype).removeprefix("torch.")
        if dtype_name not in TENSORFILE_DTYPES:
            raise UserError(f"tensor {name!r}: dtype {dtype_name} cannot be stored")
        blob = tensor_to_bytes(t)
        entries.append({"name": name, "dtype": dtype_name, "shape": list(t.shape), "offset": offset,
                        "nbytes": len(blob), "crc32": zlib.crc32(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"meta": meta or {}, "data_bytes": offset, "tensors": entries}).encode()

    def write(f):
        f.write(TENSORFILE_MAGIC + struct.pack("<QI", len(header), zlib.crc32(header)) + header)
        for blob in blobs:
            f.write(blob)

    atomic_write(path, write)
    return 20 + len(header) + offset


def tensorfile_header(path: Path, data: bytes) -> tuple[dict, int, bool]:
    """(header, offset of the tensor bytes, checksummed) of a tensor file's bytes; UserError naming path."""
    magic = data[:8]
    if magic not in (TENSORFILE_MAGIC, TENSORFILE_MAGIC_V1) or len(data) < 16:
        raise UserError(f"{path}: not a pgolf tensor file (bad magic)")
    checked = magic == TENSORFILE_MAGIC
    (n,) = struct.unpack("<Q", data[8:16])
    start = 20 if checked else 16
    raw = data[start:start + n]
    if len(raw) < n:
        raise UserError(f"{path}: truncated in the header")
    if checked and zlib.crc32(raw) != struct.unpack("<I", data[16:20])[0]:
        raise UserError(f"{path}: damaged header (checksum mismatch)")
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: damaged header") from None
    base = start + n
    if checked and len(data) != base + header["data_bytes"]:
        what = "truncated" if len(data) < base + header["data_bytes"] else "damaged (extra bytes at the end)"
        raise UserError(f"{path}: {what}: {len(data):,} bytes, the header says {base + header['data_bytes']:,}")
    return header, base, checked


def read_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by write_tensors; a damaged file (checksum, length) raises UserError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    header, base, checked = tensorfile_header(path, data)
    tensors, view = {}, memoryview(data)
    for e in header["tensors"]:
        start, end = base + e["offset"], base + e["offset"] + e["nbytes"]
        if end > len(data) or e["dtype"] not in TENSORFILE_DTYPES:
            raise UserError(f"{path}: truncated or damaged at tensor {e['name']!r}")
        blob = view[start:end]
        if checked and zlib.crc32(blob) != e["crc32"]:
            raise UserError(f"{path}: damaged: tensor {e['name']!r} fails its checksum")
        tensors[e["name"]] = tensor_from_bytes(blob, e["dtype"], e["shape"])
    return tensors, header["meta"]
