"""A pickle-free file of named tensors plus JSON metadata (float weights, checkpoints).

Layout: 8-byte magic b"PGTENS01", 8-byte little-endian header length n, n bytes of UTF-8 JSON
{"meta": {...}, "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}, then the raw tensor bytes,
each tensor C-contiguous and little-endian, at its offset from the end of the header. Loading never executes
anything from the file.
"""

import json
import struct
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import UserError

TENSORFILE_MAGIC = b"PGTENS01"
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
    """Write tensors and metadata to path (atomically, via a temporary file); returns the file size."""
    entries, blobs, offset = [], [], 0
    for name, t in tensors.items():
        dtype_name = str(t.dtype).removeprefix("torch.")
        if dtype_name not in TENSORFILE_DTYPES:
            raise UserError(f"tensor {name!r}: dtype {dtype_name} cannot be stored")
        blob = tensor_to_bytes(t)
        entries.append({"name": name, "dtype": dtype_name, "shape": list(t.shape), "offset": offset,
                        "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"meta": meta or {}, "tensors": entries}).encode()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(TENSORFILE_MAGIC + struct.pack("<Q", len(header)) + header)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)
    return path.stat().st_size


def read_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by write_tensors; a damaged file raises UserError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < 16 or data[:8] != TENSORFILE_MAGIC:
        raise UserError(f"{path}: not a pgolf tensor file (bad magic)")
    (n,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: damaged header") from None
    base = 16 + n
    tensors = {}
    for e in header["tensors"]:
        start, end = base + e["offset"], base + e["offset"] + e["nbytes"]
        if end > len(data) or e["dtype"] not in TENSORFILE_DTYPES:
            raise UserError(f"{path}: truncated or damaged at tensor {e['name']!r}")
        tensors[e["name"]] = tensor_from_bytes(data[start:end], e["dtype"], e["shape"])
    return tensors, header["meta"]
