"""Byte orders of a role-grouped integer section (quant.group_by=role): rows, columns, or similar rows first.

A role section holds the int8 values of the tensors of one role (all layers' mlp.fc, say) one after the
other, each row-major. Two reversible reorderings often compress better:
- "T": every tensor column-major (its transpose), so neighbouring bytes are one column of neighbouring rows;
- "ST": every tensor's rows first reordered by a greedy nearest-neighbour chain in L1 distance (start at row
  0, then always the closest unused row), then column-major. The permutations (uint16 per row) lead the
  stream, so the section decodes on its own.
Which order a section uses is measured (pgolf.quant.artifact.choose_section), never assumed.
"""

import numpy as np
import torch

ORDERS = ("", "T", "ST")
# A cheap codec ranks the orders on a sample before the full codec search (see artifact.choose_section).
ORDER_PROBE = "zlib9+none"


def l1_distances(q: np.ndarray) -> np.ndarray:
    """All row-to-row L1 distances of q (R, C), float32 (R, R); on a GPU when there is one, in row blocks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(q.astype(np.float32)).to(device)
    block = max(1, (1 << 26) // max(x.numel(), 1))  # rows per block: about 64 M differences at once
    out = torch.empty(x.shape[0], x.shape[0], dtype=torch.float32, device=device)
    for i in range(0, x.shape[0], block):
        out[i:i + block] = torch.cdist(x[i:i + block], x, p=1)
    return out.cpu().numpy()


def similarity_order(q: np.ndarray) -> np.ndarray:
    """Greedy nearest-neighbour chain over the rows of q (R, C) in L1 distance; returns the row order.

    The distances are computed once (l1_distances); the chain then walks them: each step masks the rows
    used in the current row's distances (one contiguous row, not a column of the whole matrix) and jumps to
    the closest one left (ties: the lowest index)."""
    rows = q.shape[0]
    if rows <= 2:
        return np.arange(rows)
    dist = l1_distances(q)
    order = np.empty(rows, dtype=np.int64)
    used = np.zeros(rows, dtype=bool)
    current = 0
    for i in range(rows):
        order[i] = current
        used[current] = True
        if i < rows - 1:
            current = int(np.argmin(np.where(used, np.inf, dist[current])))
    return order


def similarity_order_reference(q: np.ndarray) -> np.ndarray:
    """The same chain, plainly: each step measures the current row against every unused one."""
    x = q.astype(np.int64)
    used = np.zeros(x.shape[0], dtype=bool)
    order, current = [], 0
    for _ in range(x.shape[0]):
        order.append(current)
        used[current] = True
        dist = np.abs(x - x[current]).sum(axis=1).astype(np.float64)
        dist[used] = np.inf
        current = int(np.argmin(dist))
    return np.array(order, dtype=np.int64)


def reorder(raw: bytes, shapes: list[tuple[int, int]], order: str) -> bytes:
    """The section's bytes in `order` ("" = as stored): perms (ST only) then each tensor's values."""
    if not order:
        return raw
    values = np.frombuffer(raw, dtype=np.int8)
    perms, parts, start = [], [], 0
    for rows, cols in shapes:
        q = values[start:start + rows * cols].reshape(rows, cols)
        start += rows * cols
        if order == "ST":
            perm = similarity_order(q)
            perms.append(perm.astype("<u2").tobytes())
            q = q[perm]
        parts.append(np.ascontiguousarray(q.T).tobytes())
    return b"".join(perms) + b"".join(parts)


def perm_bytes(shapes: list[tuple[int, int]], order: str) -> int:
    return 2 * sum(rows for rows, _ in shapes) if order == "ST" else 0


def restore(data: bytes, shapes: list[tuple[int, int]], order: str) -> bytes:
    """The inverse of reorder: the section's row-major bytes from `data` in `order`."""
    if not order:
        return data
    head = perm_bytes(shapes, order)
    perms = np.frombuffer(data[:head], dtype="<u2") if head else None
    values = np.frombuffer(data[head:], dtype=np.int8)
    parts, start, pstart = [], 0, 0
    for rows, cols in shapes:
        q = values[start:start + rows * cols].reshape(cols, rows).T
        start += rows * cols
        if perms is not None:
            out = np.empty_like(q)
            out[perms[pstart:pstart + rows].astype(np.int64)] = q
            pstart += rows
            q = out
        parts.append(np.ascontiguousarray(q).tobytes())
    return b"".join(parts)


def orders_for(shapes: list[tuple[int, int]] | None) -> tuple[str, ...]:
    """The orders worth trying: all three for a role section (rows fit uint16), none otherwise."""
    if not shapes:
        return ("",)
    return ORDERS if max(rows for rows, _ in shapes) < 65536 else ("", "T")
