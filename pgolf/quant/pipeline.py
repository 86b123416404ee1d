"""From float weights and Hessians to the artifact on disk: the step the trainer calls at the end of a run."""

import dataclasses
import json
import time

import torch

from pgolf.dist import cuda_sync
from pgolf.errors import UserError
from pgolf.fileio import atomic_write_bytes
from pgolf.quant.artifact import QuantizedModel, QuantTensor, choose_section, encode_artifact, section_streams
from pgolf.quant.codecs import AUTO_CODECS, codec_candidates
from pgolf.quant.fit import choose_k, entropy_bytes, section_ratio, value_counts
from pgolf.quant.formats import policy_bits, policy_clip_k, tensor_policy
from pgolf.quant.gptq import gptq_quantize_batch, rtn_quantize
from pgolf.quant.size import fit_to_budget, size_report

# quant.codec values → the codec methods tried.
CONFIG_CODECS = {"auto": AUTO_CODECS, "zlib": ("zlib9",), "lzma": ("lzma9e",), "zstd": ("zstd22",),
                 "brotli": ("brotli11",)}
# Same-shape matrices go through GPTQ together, at most this many at once (bounds the memory).
GPTQ_BATCH = 16


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def quantize_state(state_dict: dict[str, torch.Tensor], hessians: dict | None, cfg,
                   matrix_k: float | None = None) -> QuantizedModel:
    """Quantize a float state dict under cfg (QuantConfig): GPTQ where a Hessian is known and cfg.method is
    "gptq", round-to-nearest otherwise; small / non-2D tensors pass through as fp16. matrix_k replaces
    cfg.sdclip_k for the attention / MLP matrices. Runs on the Hessians' device (the GPU after training)."""
    hessians = hessians or {}
    out: dict[str, QuantTensor] = {}
    jobs: dict[tuple, list[str]] = {}
    for name, t in state_dict.items():
        t = t.detach()
        kind = tensor_policy(name, t, cfg)
        if kind == "passthrough":
            data = t.to(torch.float16) if t.is_floating_point() else t
            out[name] = QuantTensor(kind, tuple(t.shape), dtype_name(t), data=data.cpu())
            continue
        bits, k = policy_bits(kind, cfg), policy_clip_k(kind, cfg)
        if kind == "matrix" and matrix_k is not None:
            k = float(matrix_k)
        if cfg.method == "gptq" and name in hessians:
            jobs.setdefault((kind, tuple(t.shape), bits, k), []).append(name)
            continue
        q, scale = rtn_quantize(t, bits, cfg.clip, k)
        out[name] = QuantTensor(kind, tuple(t.shape), dtype_name(t), bits, q.cpu(), scale.cpu(),
                                info={"method": "rtn"})
    for (kind, shape, bits, k), names in jobs.items():
        for i in range(0, len(names), GPTQ_BATCH):
            group = names[i:i + GPTQ_BATCH]
            h = torch.stack([hessians[n].float() for n in group])
            w = torch.stack([state_dict[n].detach().float().to(h.device) for n in group])
            if h.shape[-1] != shape[1]:
                raise UserError(f"Hessian of {group[0]} is {tuple(h.shape[1:])}, weight is {shape}")
            q, scale, info = gptq_quantize_batch(w, h, bits, cfg.clip, k, cfg.damp, cfg.block_size, cfg.act_order)
            for j, n in enumerate(group):
                out[n] = QuantTensor(kind, shape, dtype_name(state_dict[n]), bits, q[j].cpu(), scale[j].cpu(),
                                     info={"method": "gptq", "damp": info["damp"][j],
                                           "damp_retries": info["damp_retries"],
                                           "dead_columns": info["dead_columns"][j]})
    ordered = {name: out[name] for name in state_dict}
    return QuantizedModel(tensors=ordered, meta={"method": cfg.method, "clip": cfg.clip,
                                                 "matrix_bits": cfg.matrix_bits, "embed_bits": cfg.embed_bits,
                                                 "matrix_k": float(cfg.sdclip_k if matrix_k is None else matrix_k)})


def quant_warnings(qm: QuantizedModel) -> list[str]:
    """Lines worth logging: damping raised after a Cholesky failure, dead columns."""
    lines = []
    for name, t in qm.tensors.items():
        if t.info.get("damp_retries"):
            lines.append(f"{name}: Cholesky failed; damping raised to {t.info['damp']:.3g}·mean(diag H)")
        if t.info.get("dead_columns"):
            lines.append(f"{name}: {t.info['dead_columns']} dead input columns (zero Hessian diagonal) set to 0")
    return lines


def matrix_section(cfg) -> str:
    return f"q{cfg.matrix_bits}"


def section_value_counts(qm: QuantizedModel, bits: int, matrices: bool = True) -> torch.Tensor:
    """Histogram of the integer values stored at `bits` (they share one section), matrices included or not."""
    total = torch.zeros(256, dtype=torch.int64)
    for t in qm.tensors.values():
        if t.kind != "passthrough" and t.bits == bits and (matrices or t.kind != "matrix"):
            total += value_counts(t.q).cpu()
    return total


def search_matrix_k(state: dict[str, torch.Tensor], cfg, budget: int, codecs, ratio: float | None = None) -> dict:
    """The smallest SDClip k for the matrices whose predicted artifact fits `budget` bytes (see quant/fit.py).

    Everything but the matrix section is quantized (round-to-nearest), compressed and counted exactly; the
    matrix section is predicted as ratio × entropy. Unless `ratio` is given it is measured on a sample of
    the section quantized at a first guess of k (the entropy alone), since the ratio moves with k."""
    section = matrix_section(cfg)
    rtn_cfg = dataclasses.replace(cfg, method="rtn", clip="sdclip")
    qm0 = quantize_state(state, None, rtn_cfg)
    streams, table = section_streams(qm0)
    other = sum(len(choose_section(name, raw, codecs)["blob"]) for name, raw in streams.items() if name != section)
    header = len(json.dumps(table, separators=(",", ":"))) + 200 * (len(streams) + 1)
    matrices = [state[n].detach().float() for n, t in qm0.tensors.items() if t.kind == "matrix"]
    fixed = section_value_counts(qm0, cfg.matrix_bits, matrices=False)
    target = budget - cfg.fit_margin * cfg.size_cap - other - header
    if target <= 0:
        raise UserError(f"the non-matrix tensors alone take {other + header:,} B of the {budget:,} B budget")
    if ratio is None:
        guess = choose_k(matrices, cfg.matrix_bits, target, 1.0, cfg.fit_k_min, fixed)["k"]
        at_guess = section_streams(quantize_state(state, None, rtn_cfg, matrix_k=guess))[0][section]
        codec = section_ratio(section, at_guess, codecs)
    else:
        codec = {"ratio": ratio, "layout": None, "method": None}
    choice = choose_k(matrices, cfg.matrix_bits, target, codec["ratio"], cfg.fit_k_min, fixed)
    return {**choice, "ratio": codec["ratio"], "layout": codec["layout"], "method": codec["method"],
            "other_bytes": other, "target_bytes": target}


def export_state(state: dict[str, torch.Tensor], hessians: dict | None, cfg, path, code_bytes: int) -> dict:
    """Quantize, fit to the byte budget if asked, compress and write the artifact (atomically, whether it
    fits or not); returns the export report (encode_state's)."""
    report, blob = encode_state(state, hessians, cfg, code_bytes)
    atomic_write_bytes(path, blob)
    return {**report, "path": str(path)}


def encode_state(state: dict[str, torch.Tensor], hessians: dict | None, cfg, code_bytes: int) -> tuple[dict, bytes]:
    """(the export report, the artifact's bytes): quantize, fit to the byte budget if asked, compress.

    With cfg.fit_k the matrices' SDClip k is searched so that the artifact fills the budget less the margin;
    when the real size is over the budget, or under it by more than three margins, k is searched once more
    with the codec ratio measured on the real section. Pruning ±1 values (cfg.fit_to_budget) is the last
    resort when it is still over."""
    if cfg.codec not in CONFIG_CODECS:
        raise UserError(f"quant.codec={cfg.codec!r} is not one of {sorted(CONFIG_CODECS)}")
    codecs = CONFIG_CODECS[cfg.codec]
    runnable, skipped = codec_candidates([f"{c}+none" for c in codecs])
    if not runnable:
        raise UserError(f"quant.codec={cfg.codec!r} cannot run here: {list(skipped.values())}")
    budget = cfg.size_cap - int(code_bytes)
    timings = {"quantize_s": 0.0, "serialize_s": 0.0, "fit_k_s": 0.0}

    def timed_call(key, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        cuda_sync()
        timings[key] += time.perf_counter() - t0
        return out

    fit_k, plan, matrix_k = None, None, None
    if cfg.fit_k:
        fit_k = timed_call("fit_k_s", search_matrix_k, state, cfg, budget, codecs)
        matrix_k, plan = fit_k["k"], {matrix_section(cfg): (fit_k["layout"], fit_k["method"])}
    qm = timed_call("quantize_s", quantize_state, state, hessians, cfg, matrix_k)
    blob, sections = timed_call("serialize_s", encode_artifact, qm, codecs, plan)
    if fit_k is not None:
        fit_k["bytes"] = len(blob)
        slack = cfg.fit_margin * cfg.size_cap
        if len(blob) > budget or budget - len(blob) > 3 * slack:  # the prediction missed: once more, measured
            measured = section_bytes(sections, matrix_section(cfg))
            ratio = measured / max(entropy_bytes(section_value_counts(qm, cfg.matrix_bits)), 1.0)
            second = timed_call("fit_k_s", search_matrix_k, state, cfg, budget, codecs, ratio)
            qm = timed_call("quantize_s", quantize_state, state, hessians, cfg, second["k"])
            blob, sections = timed_call("serialize_s", encode_artifact, qm, codecs, plan)
            fit_k = {**second, "layout": fit_k["layout"], "method": fit_k["method"], "first_try": fit_k,
                     "bytes": len(blob)}
    fit = None
    if len(blob) > budget and cfg.fit_to_budget:
        plan = {s["name"]: (s["layout"], s["method"]) for s in sections}
        try:
            qm, fit = fit_to_budget(qm, hessians, budget, lambda m: len(encode_artifact(m, codecs, plan)[0]))
            blob, sections = encode_artifact(qm, codecs, plan)
        except UserError as e:  # cannot fit: keep the artifact, the size report says it is over the cap
            fit = {"fitted": False, "reason": str(e)}
    tensors = [{"name": n, "kind": t.kind, "shape": list(t.shape), "bits": t.bits, **t.info}
               for n, t in qm.tensors.items()]
    return {"bytes": size_report(code_bytes, len(blob), cfg.size_cap), "path": None, "tensors": tensors,
            "sections": sections, "skipped_codecs": skipped, "fit": fit, "fit_k": fit_k,
            "matrix_k": qm.meta["matrix_k"], "warnings": quant_warnings(qm), "timings": timings}, blob


def section_bytes(sections: list[dict], name: str) -> int:
    return next(s["length"] for s in sections if s["name"] == name)


def export_artifact(model: torch.nn.Module, hessians: dict | None, cfg, path, code_bytes: int) -> dict:
    """Quantize a trained model's weights and write the artifact (see export_state for the report)."""
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return export_state(state, hessians, cfg, path, code_bytes)
