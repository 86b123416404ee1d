"""`pgolf quant RUN_DIR --explain`: every tensor's policy rule, stored bytes and quantization error.

The rows come from the artifact's own bytes (decoded again, so the error is the round trip's) and the
policy table (pgolf.quant.policy) under the config that wrote it: role, storage, bits, method, clip and the
SDClip k actually used, LQER or not, the override that set the rule, the tensor's share of the compressed
sections, and its relative error ‖W − Ŵ‖_F / ‖W‖_F (Hessian-weighted tr(E H Eᵀ) / tr(W H Wᵀ) where a
Hessian is known).
"""

import torch

from pgolf.quant.artifact import decode_container, header_rows, tensor_from_entry
from pgolf.quant.policy import policy_table


def relative_errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> tuple[float, float | None]:
    w, e = w.float().cpu(), (w.float().cpu() - w_hat.float().cpu())
    plain = float(torch.linalg.vector_norm(e) / torch.linalg.vector_norm(w).clamp_min(1e-30))
    if h is None or w.ndim != 2:
        return plain, None
    h = h.float().cpu()
    return plain, float(torch.trace(e @ h @ e.T) / torch.trace(w @ h @ w.T).clamp_min(1e-30))


def explain_rows(state: dict, blob: bytes, cfg, hessians: dict | None = None) -> list[dict]:
    """One row per tensor of the artifact `blob`, written from `state` under cfg (QuantConfig)."""
    header, streams = decode_container(blob)
    rules = policy_table(state, cfg)
    matrix_k = header.get("meta", {}).get("matrix_k")
    stored = {r["name"]: r for r in header_rows(header)}
    rows = []
    for entry in header["tensors"]:
        name = entry["name"]
        rule, t = rules[name], tensor_from_entry(entry, streams)
        h = (hessians or {}).get(name)
        err, herr = relative_errors(state[name], t.dequantize(), h)
        rows.append({"name": name, "role": rule.role, "kind": rule.kind, "storage": rule.storage,
                     "bits": rule.bits, "method": rule.method if rule.storage == "int" else "-",
                     "clip": rule.clip if rule.storage == "int" else "-",
                     "k": rule.k_at(matrix_k) if rule.storage == "int" and rule.clip != "none" else None,
                     "lqer": "lqer" in entry, "source": rule.source, "bytes": stored[name]["bytes"],
                     "codec": stored[name]["codec"], "rel_error": err, "hessian_rel_error": herr})
    return rows


def format_explain(rows: list[dict]) -> str:
    """The table `pgolf quant --explain` prints, with totals per role."""
    lines = [f"{'name':<36} {'role':<10} {'store':<5} {'bits':>4} {'method':<5} {'clip':<10} {'k':>6} "
             f"{'lqer':<4} {'bytes':>10} {'rel err':>9} {'H err':>9}  rule"]
    by_role: dict[str, int] = {}
    for r in rows:
        k = f"{r['k']:.2f}" if r["k"] is not None else "-"
        herr = f"{r['hessian_rel_error']:.2e}" if r["hessian_rel_error"] is not None else "-"
        lines.append(f"{r['name']:<36} {r['role']:<10} {r['storage']:<5} {r['bits'] or '-':>4} {r['method']:<5} "
                     f"{r['clip']:<10} {k:>6} {'yes' if r['lqer'] else '':<4} {r['bytes']:>10,} "
                     f"{r['rel_error']:>9.2e} {herr:>9}  {r['source']}")
        by_role[r["role"]] = by_role.get(r["role"], 0) + r["bytes"]
    lines.append("bytes by role: " + ", ".join(f"{k} {v:,}" for k, v in sorted(by_role.items(), key=lambda x: -x[1])))
    return "\n".join(lines)
