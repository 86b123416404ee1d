"""Size accounting against the cap (16,000,000 decimal bytes of code + artifact), the compressed
self-extracting code wrapper, and the fit-to-budget step that prunes ±1 values until the artifact fits.
"""

import base64
import copy
import lzma
from pathlib import Path

import torch

from pgolf.errors import UserError

SIZE_CAP = 16_000_000
WRAP_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def size_report(code_bytes: int, artifact_bytes: int, cap: int = SIZE_CAP) -> dict:
    """Exact byte accounting: total = code + artifact, headroom = cap − total (negative when over)."""
    total = int(code_bytes) + int(artifact_bytes)
    return {"code": int(code_bytes), "artifact": int(artifact_bytes), "total": total, "cap": int(cap),
            "headroom": int(cap) - total, "fits": total <= cap}


def format_size_report(report: dict) -> str:
    lines = [f"{'code':<10}{report['code']:>14,} B",
             f"{'artifact':<10}{report['artifact']:>14,} B",
             f"{'total':<10}{report['total']:>14,} B  ({report['total'] / report['cap']:.2%} of the cap)",
             f"{'cap':<10}{report['cap']:>14,} B",
             f"{'headroom':<10}{report['headroom']:>14,} B  {'fits' if report['fits'] else 'OVER THE CAP'}"]
    return "\n".join(lines)


def code_bytes_of(path) -> int:
    """Bytes of a code file as shipped (what the challenge counts)."""
    try:
        return Path(path).stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def wrap_script(source: str) -> str:
    """A two-line script that decompresses `source` (lzma raw, base85) and executes it in its own globals.

    The source is registered in linecache as "<train_gpt>" and compiled under that name, so that
    inspect.getsource works on what it defines (triton.jit needs it) and tracebacks show its lines."""
    packed = base64.b85encode(lzma.compress(source.encode(), format=lzma.FORMAT_RAW, filters=WRAP_FILTERS))
    return ("import lzma as L,base64 as B,linecache as C\n"
            f"S=L.decompress(B.b85decode(\"{packed.decode()}\"),format=L.FORMAT_RAW,"
            f"filters=[{{\"id\":L.FILTER_LZMA2}}]).decode();N=\"<train_gpt>\";"
            f"C.cache[N]=(len(S),None,S.splitlines(True),N);exec(compile(S,N,\"exec\"))\n")


def smallest_code_form(source: str) -> tuple[str, str]:
    """("plain" | "wrapped", text): whichever form of the script has fewer UTF-8 bytes."""
    wrapped = wrap_script(source)
    if len(wrapped.encode()) < len(source.encode()):
        return "wrapped", wrapped
    return "plain", source


def prune_candidates(quantized, hessians: dict | None) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """Every ±1 value of the quantized matrices with its cost: zeroing q[r, j] adds s_r²·H_jj to the
    Hessian-weighted error (H_jj = 1 where no Hessian is known). Returns (costs, name, flat indices) per tensor."""
    out = []
    for name, t in quantized.tensors.items():
        if t.kind == "passthrough":
            continue
        idx = (t.q.abs() == 1).flatten().nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        cols = t.q.shape[1]
        h = hessians.get(name) if hessians else None
        hdiag = h.diagonal().float().cpu() if h is not None else torch.ones(cols)
        s2 = t.scale.float().cpu() ** 2
        out.append((s2[idx // cols] * hdiag[idx % cols], name, idx))
    return out


def pruned_copy(quantized, candidates, chosen: torch.Tensor, owner: torch.Tensor, offsets: list[int]):
    """A copy of `quantized` with the candidates at global positions `chosen` set to 0 (inputs untouched)."""
    pruned = copy.copy(quantized)
    pruned.tensors = dict(quantized.tensors)
    for tid, (_, name, idx) in enumerate(candidates):
        sel = idx[chosen[owner[chosen] == tid] - offsets[tid]]
        if sel.numel() == 0:
            continue
        t = copy.copy(quantized.tensors[name])
        q = t.q.clone().flatten()
        q[sel] = 0
        t.q = q.view_as(t.q)
        pruned.tensors[name] = t
    return pruned


def fit_to_budget(quantized, hessians: dict | None, budget: int, encode) -> tuple[object, dict]:
    """Zero the cheapest ±1 values (by Hessian-weighted error) until encode(qm) ≤ budget bytes.

    Bisection on the count, every other step placed by linear interpolation of the sizes; `encode(qm) -> int`
    gives the artifact size (use fixed codec choices so the size is monotone enough). Stops when the bracket
    is within 1/4096 of the candidates or the fitting size is within 0.05% of the budget. Returns (qm, report).
    """
    before = encode(quantized)
    report = {"bytes_before": before, "budget": budget, "pruned": 0, "steps": 0, "added_error": 0.0}
    if before <= budget:
        report["bytes_after"] = before
        return quantized, report
    candidates = prune_candidates(quantized, hessians)
    if not candidates:
        raise UserError(f"artifact is {before:,} B, over the budget {budget:,} B, and has no ±1 values to prune")
    costs = torch.cat([c for c, _, _ in candidates])
    owner = torch.cat([torch.full((c.numel(),), i) for i, (c, _, _) in enumerate(candidates)])
    offsets = torch.tensor([0] + [c.numel() for c, _, _ in candidates]).cumsum(0)[:-1].tolist()
    order = torch.argsort(costs, stable=True)
    prune = lambda count: pruned_copy(quantized, candidates, order[:count], owner, offsets)
    lo, hi = 0, costs.numel()
    hi_size = encode(prune(hi))
    if hi_size > budget:
        raise UserError(f"artifact is {before:,} B; even pruning all {hi:,} ±1 values gives {hi_size:,} B, "
                        f"over the budget {budget:,} B: lower the bits")
    tol, lo_size = max(1, hi // 4096), before
    while hi - lo > tol and budget - hi_size > budget // 2000:
        step = report["steps"]
        if step % 2 == 0:  # interpolation step (sizes fall about linearly with the count) ...
            guess = lo + round((hi - lo) * (lo_size - budget) / max(lo_size - hi_size, 1))
            mid = min(max(guess, lo + 1), hi - 1)
        else:  # ... alternating with a bisection step, which bounds the number of steps
            mid = (lo + hi) // 2
        size = encode(prune(mid))
        report["steps"] = step + 1
        if size <= budget:
            hi, hi_size = mid, size
        else:
            lo, lo_size = mid, size
    result = prune(hi)
    report.update(pruned=hi, candidates=costs.numel(), bytes_after=hi_size,
                  added_error=float(costs[order[:hi]].sum()))
    return result, report
