"""Bit-packing of small signed integers: `bits` bits per value, no padding between values.

Each value is written as its low `bits` bits in two's complement, most significant bit first, values one
after the other; the last byte is padded with zero bits. Eight values of b bits take exactly b bytes.
"""

import numpy as np


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack a 1D array of ints in [-2^(bits-1), 2^(bits-1)-1] into bytes."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 2..8")
    v = np.ascontiguousarray(values, dtype=np.int8).reshape(-1)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.size and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"values outside [{lo}, {hi}] cannot be packed in {bits} bits")
    if bits == 8:
        return v.tobytes()
    planes = np.unpackbits(v.view(np.uint8)[:, None], axis=1)  # (n, 8), MSB first
    return np.packbits(planes[:, 8 - bits:].reshape(-1)).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of pack_bits: `count` int8 values."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 2..8")
    if len(data) != packed_nbytes(count, bits):
        raise ValueError(f"{len(data)} bytes cannot hold exactly {count} values of {bits} bits")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.view(np.int8).copy()
    planes = np.unpackbits(raw)[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits:] = planes
    full[:, : 8 - bits] = planes[:, :1]  # sign extension
    return np.packbits(full, axis=1).reshape(-1).view(np.int8)
