"""The challenge's token shard format, read and written, plus an audit of which shards a run opened.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16. `read_shard` memory-maps and validates a shard; every
path it opens is recorded in `FILE_AUDIT` with the current phase, so that a legality check can prove that
no validation shard was read during training or calibration.
"""

import contextlib
import glob
import os
import threading
from pathlib import Path

import numpy as np

from pgolf.errors import UserError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKEN_DTYPE = np.dtype("<u2")
# A per-token byte sidecar (fineweb_val_bytes_000000.bin, pgolf.data.sidecar) has the shard format but holds
# byte counts, not tokens: globs for shards skip names with this mark (fineweb_val_*.bin matches them).
BYTE_SIDECAR_MARK = "_bytes_"


class ShardError(UserError):
    """A shard file that is missing, truncated, or not in the challenge format."""


class FileAudit:
    """Records (phase, path) for every shard opened; the phase is set with `with FILE_AUDIT.phase(name):`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._phases = ["other"]
        self._records: list[tuple[str, str]] = []

    @property
    def current_phase(self) -> str:
        return self._phases[-1]

    @contextlib.contextmanager
    def phase(self, name: str):
        with self._lock:
            self._phases.append(str(name))
        try:
            yield self
        finally:
            with self._lock:
                self._phases.pop()

    def record(self, path) -> None:
        with self._lock:
            self._records.append((self._phases[-1], str(Path(path).resolve())))

    def opened(self, phase: str | None = None) -> list[str]:
        """Resolved paths opened in `phase` (all phases when None), in opening order."""
        with self._lock:
            return [p for ph, p in self._records if phase is None or ph == phase]

    def records(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


FILE_AUDIT = FileAudit()


def shard_header(path) -> tuple[int, int]:
    """Validate the header and size of a shard; return (token_count, file_size)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes is smaller than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"{path}: wrong magic {int(header[0])} (expected {SHARD_MAGIC}); not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    count = int(header[2])
    if count < 0:
        raise ShardError(f"{path}: negative token count {count} in the header")
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        what = "truncated" if size < expected else "size mismatch"
        raise ShardError(f"{path}: {what}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count, size


def shard_token_count(path) -> int:
    """Number of tokens in a shard, from its (validated) header."""
    return shard_header(path)[0]


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a validated shard's tokens (uint16); with vocab_size, check every id is below it."""
    count, _ = shard_header(path)
    FILE_AUDIT.record(path)
    if count == 0:
        return np.zeros(0, dtype=SHARD_TOKEN_DTYPE)
    tokens = np.memmap(path, dtype=SHARD_TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise ShardError(f"{path}: token id {top} >= vocab_size {vocab_size} (first bad at position {where})")
    return tokens


def write_shard(path, tokens) -> int:
    """Write tokens (values 0..65535) as a shard, atomically (temp file + rename); return the byte size."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"{path}: tokens must be a 1-D array, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ShardError(f"{path}: token ids must fit uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype(SHARD_TOKEN_DTYPE, copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return HEADER_BYTES + 2 * arr.size


def is_byte_sidecar(path) -> bool:
    """Whether a file name is that of a per-token byte sidecar rather than a token shard."""
    return BYTE_SIDECAR_MARK in Path(path).name


def list_shards(folder, pattern: str) -> list[Path]:
    """Shards in `folder` matching the glob `pattern`, sorted by name; none is an error."""
    folder = Path(folder)
    found = sorted(p for p in folder.glob(pattern) if p.is_file() and not is_byte_sidecar(p))
    if not found:
        raise ShardError(f"no shard matches {pattern!r} in {folder}")
    return found


def resolve_shard_files(pattern_or_files) -> list[Path]:
    """A glob pattern (str or Path, may include folders) or an explicit list of files -> sorted list of paths."""
    if isinstance(pattern_or_files, (str, os.PathLike)):
        text = str(pattern_or_files)
        if Path(text).is_file():
            return [Path(text)]
        found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file() and not is_byte_sidecar(p))
        if not found:
            raise ShardError(f"no shard matches {text!r}")
        return found
    files = sorted(Path(p) for p in pattern_or_files)
    if not files:
        raise ShardError("empty list of shard files")
    return files
