"""From float weights and Hessians to the artifact on disk: the step the trainer calls at the end of a run."""

import dataclasses
import json
import time

import torch

from pgolf.dist import cuda_sync
from pgolf.errors import UserError
from pgolf.fileio import atomic_write_bytes
from pgolf.quant.artifact import (
    QuantizedModel,
    QuantTensor,
    choose_sections,
    encode_artifact,
    section_bits,
    section_streams,
)
from pgolf.quant.codecs import AUTO_CODECS, Compressor, codec_candidates
from pgolf.quant.fit import choose_k, entropy_bytes, section_ratios, value_counts
from pgolf.quant.gptq import gptq_quantize_batch, rtn_quantize
from pgolf.quant.lqer import apply_lqer
from pgolf.quant.policy import policy_table
from pgolf.quant.size import fit_to_budget, size_report

# quant.codec values → the codec methods tried.
CONFIG_CODECS = {"auto": AUTO_CODECS, "zlib": ("zlib9",), "lzma": ("lzma9e",), "zstd": ("zstd22",),
                 "brotli": ("brotli11",)}
# Same-shape matrices go through GPTQ together, at most this many at once (bounds the memory).
GPTQ_BATCH = 16


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def quantize_state(state_dict: dict[str, torch.Tensor], hessians: dict | None, cfg,
                   matrix_k: float | None = None, with_lqer: bool = True) -> QuantizedModel:
    """Quantize a float state dict under cfg (QuantConfig) as the policy (pgolf.quant.policy) says: GPTQ
    where its rule says so and a Hessian is known, round-to-nearest otherwise, fp16 / raw passthrough; then
    LQER on the top-k residuals (unless with_lqer is False). matrix_k replaces quant.sdclip_k for the fitted
    rows (their role ratios kept). Runs on the Hessians' device (the GPU after training)."""
    hessians = hessians or {}
    rules = policy_table(state_dict, cfg)
    out: dict[str, QuantTensor] = {}
    jobs: dict[tuple, list[str]] = {}
    for name, t in state_dict.items():
        t, rule = t.detach(), rules[name]
        if rule.storage != "int":
            data = t.to(torch.float16) if rule.storage == "fp16" else t
            out[name] = QuantTensor("passthrough", tuple(t.shape), dtype_name(t), data=data.cpu(), group=rule.group)
            continue
        k = rule.k_at(matrix_k)
        if rule.method == "gptq" and name in hessians:
            jobs.setdefault((rule.kind, rule.group, tuple(t.shape), rule.bits, rule.clip, k), []).append(name)
            continue
        q, scale = rtn_quantize(t, rule.bits, rule.clip, k, **clip_options(cfg))
        out[name] = QuantTensor(rule.kind, tuple(t.shape), dtype_name(t), rule.bits, q.cpu(), scale.cpu(),
                                info={"method": "rtn"}, group=rule.group)
    for key, names in jobs.items():
        out.update(gptq_job(key, names, state_dict, hessians, cfg))
    ordered = {name: out[name] for name in state_dict}
    chosen = apply_lqer(ordered, state_dict, rules, cfg) if with_lqer else []
    return QuantizedModel(tensors=ordered, meta={"method": cfg.method, "clip": cfg.clip,
                                                 "matrix_bits": cfg.matrix_bits, "embed_bits": cfg.embed_bits,
                                                 "matrix_k": float(cfg.sdclip_k if matrix_k is None else matrix_k),
                                                 "group_by": cfg.group_by, "lqer": chosen})


def clip_options(cfg) -> dict:
    """The clip settings every quantizer call takes besides the rule's clip and k."""
    return {"floor": cfg.scale_floor, "quantiles": [float(v) for v in cfg.clip_quantiles.split(",")],
            "select": cfg.clip_select}


def gptq_job(key: tuple, names: list[str], state_dict: dict, hessians: dict, cfg) -> dict[str, QuantTensor]:
    """GPTQ of same-shape matrices with one rule, GPTQ_BATCH at a time."""
    kind, group, shape, bits, clip, k = key
    out = {}
    for i in range(0, len(names), GPTQ_BATCH):
        batch = names[i:i + GPTQ_BATCH]
        h = torch.stack([hessians[n].float() for n in batch])
        w = torch.stack([state_dict[n].detach().float().to(h.device) for n in batch])
        if h.shape[-1] != shape[1]:
            raise UserError(f"Hessian of {batch[0]} is {tuple(h.shape[1:])}, weight is {shape}")
        q, scale, info = gptq_quantize_batch(w, h, bits, clip, k, cfg.damp, cfg.block_size, cfg.act_order,
                                             direction=cfg.act_order_direction, update=cfg.gptq_update,
                                             **clip_options(cfg))
        for j, n in enumerate(batch):
            out[n] = QuantTensor(kind, shape, dtype_name(state_dict[n]), bits, q[j].cpu(), scale[j].cpu(),
                                 info={"method": "gptq", "damp": info["damp"][j],
                                       "damp_retries": info["damp_retries"],
                                       "dead_columns": info["dead_columns"][j]}, group=group)
    return out


def quant_warnings(qm: QuantizedModel) -> list[str]:
    """Lines worth logging: damping raised after a Cholesky failure, dead columns."""
    lines = []
    for name, t in qm.tensors.items():
        if t.info.get("damp_retries"):
            lines.append(f"{name}: Cholesky failed; damping raised to {t.info['damp']:.3g}·mean(diag H)")
        if t.info.get("dead_columns"):
            lines.append(f"{name}: {t.info['dead_columns']} dead input columns (zero Hessian diagonal) set to 0")
    return lines


def is_fit_section(section: str, cfg) -> bool:
    """Whether a section holds the integer values at quant.matrix_bits (the fitted matrices' sections)."""
    return section.startswith("q") and section_bits(section) == cfg.matrix_bits


def fitted_names(qm: QuantizedModel, rules: dict) -> list[str]:
    return [n for n, t in qm.tensors.items() if t.kind != "passthrough" and rules[n].fit_ratio > 0]


def section_value_counts(qm: QuantizedModel, bits: int, skip=()) -> torch.Tensor:
    """Histogram of the integer values stored at `bits`, the tensors named in `skip` left out."""
    total = torch.zeros(256, dtype=torch.int64)
    for name, t in qm.tensors.items():
        if t.kind != "passthrough" and t.bits == bits and name not in skip:
            total += value_counts(t.q).cpu()
    return total


def fit_sections_ratio(qm: QuantizedModel, cfg, codecs, compressor: Compressor | None = None) -> dict:
    """Codec ratio (compressed / entropy bytes) over the matrix-bits sections of qm, and each one's choice."""
    streams, _ = section_streams(qm)
    compressed, ideal, plan = 0.0, 0.0, {}
    fit = {name: raw for name, raw in streams.items() if is_fit_section(name, cfg)}
    for name, rec in section_ratios(fit, codecs, compressor).items():
        compressed += rec["ratio"] * rec["entropy"]
        ideal += rec["entropy"]
        plan[name] = (rec["layout"], rec["method"])
    # role sections choose their byte order on the full stream at export, so they take no plan from a sample
    return {"ratio": compressed / max(ideal, 1.0), "plan": plan if cfg.group_by == "bits" else None}


def search_matrix_k(state: dict[str, torch.Tensor], cfg, budget: int, codecs, ratio: float | None = None,
                    compressor: Compressor | None = None) -> dict:
    """The smallest SDClip k for the fitted matrices whose predicted artifact fits `budget` bytes (quant/fit.py).

    Everything but the matrix-bits sections is quantized (round-to-nearest), compressed and counted exactly
    (the LQER factors too); those sections are predicted as ratio × entropy, each matrix at its role's
    share of k. Unless `ratio` is given it is measured on a sample of the sections quantized at a first
    guess of k (the entropy alone), since the ratio moves with k. `compressor`: the export's (its results
    kept for the export's own sections)."""
    compressor = compressor or Compressor()
    rtn_cfg = dataclasses.replace(cfg, method="rtn", clip="sdclip")
    rules = policy_table(state, rtn_cfg)
    qm0 = quantize_state(state, None, rtn_cfg)
    streams, table = section_streams(qm0)
    items = [(name, raw, None) for name, raw in streams.items() if not is_fit_section(name, cfg)]
    other = sum(len(rec["blob"]) for rec in choose_sections(items, codecs, compressor))
    header = len(json.dumps(table, separators=(",", ":"))) + 200 * (len(streams) + 1)
    names = fitted_names(qm0, rules)
    matrices = [state[n].detach().float() for n in names]
    ratios = [rules[n].fit_ratio for n in names]
    fixed = section_value_counts(qm0, cfg.matrix_bits, skip=set(names))
    target = budget - cfg.fit_margin * cfg.size_cap - other - header
    if target <= 0:
        raise UserError(f"the non-matrix tensors alone take {other + header:,} B of the {budget:,} B budget")
    fit_args = (cfg.matrix_bits, target)
    options = {"fixed_counts": fixed, "ratios": ratios, "floor": cfg.scale_floor}
    if ratio is None:
        guess = choose_k(matrices, *fit_args, 1.0, cfg.fit_k_min, **options)["k"]
        codec = fit_sections_ratio(quantize_state(state, None, rtn_cfg, guess, with_lqer=False), cfg, codecs,
                                   compressor)
    else:
        codec = {"ratio": ratio, "plan": None}
    choice = choose_k(matrices, *fit_args, codec["ratio"], cfg.fit_k_min, **options)
    return {**choice, "ratio": codec["ratio"], "plan": codec["plan"], "other_bytes": other, "target_bytes": target}


def export_state(state: dict[str, torch.Tensor], hessians: dict | None, cfg, path, code_bytes: int) -> dict:
    """Quantize, fit to the byte budget if asked, compress and write the artifact (atomically, whether it
    fits or not); returns the export report (encode_state's)."""
    report, blob = encode_state(state, hessians, cfg, code_bytes)
    atomic_write_bytes(path, blob)
    return {**report, "path": str(path)}


def encode_state(state: dict[str, torch.Tensor], hessians: dict | None, cfg, code_bytes: int,
                 compressor: Compressor | None = None) -> tuple[dict, bytes]:
    """(the export report, the artifact's bytes): quantize, fit to the byte budget if asked, compress.

    With cfg.fit_k the matrices' SDClip k is searched so that the artifact fills the budget less the margin;
    when the real size is over the budget, or under it by more than three margins, k is searched once more
    with the codec ratio measured on the real section. Pruning ±1 values (cfg.fit_to_budget) is the last
    resort when it is still over. One Compressor (`compressor`, else a new one) runs every compression, in
    parallel, and compresses the same bytes once."""
    if cfg.codec not in CONFIG_CODECS:
        raise UserError(f"quant.codec={cfg.codec!r} is not one of {sorted(CONFIG_CODECS)}")
    codecs = CONFIG_CODECS[cfg.codec]
    runnable, skipped = codec_candidates([f"{c}+none" for c in codecs])
    if not runnable:
        raise UserError(f"quant.codec={cfg.codec!r} cannot run here: {list(skipped.values())}")
    budget = cfg.size_cap - int(code_bytes)
    comp = compressor or Compressor()
    timings = {"quantize_s": 0.0, "serialize_s": 0.0, "fit_k_s": 0.0}

    def timed_call(key, fn, *args, **kwargs):
        comp.stage = key
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        cuda_sync()
        timings[key] += time.perf_counter() - t0
        return out

    fit_k, plan, matrix_k = None, None, None
    if cfg.fit_k:
        fit_k = timed_call("fit_k_s", search_matrix_k, state, cfg, budget, codecs, compressor=comp)
        matrix_k, plan = fit_k["k"], fit_k.pop("plan")
    qm = timed_call("quantize_s", quantize_state, state, hessians, cfg, matrix_k)
    blob, sections = timed_call("serialize_s", encode_artifact, qm, codecs, plan, comp)
    if fit_k is not None:
        fit_k["bytes"] = len(blob)
        slack = cfg.fit_margin * cfg.size_cap
        if len(blob) > budget or budget - len(blob) > 3 * slack:  # the prediction missed: once more, measured
            measured = sum(s["length"] for s in sections if is_fit_section(s["name"], cfg))
            ratio = measured / max(entropy_bytes(section_value_counts(qm, cfg.matrix_bits)), 1.0)
            second = timed_call("fit_k_s", search_matrix_k, state, cfg, budget, codecs, ratio, comp)
            second.pop("plan")
            qm = timed_call("quantize_s", quantize_state, state, hessians, cfg, second["k"])
            blob, sections = timed_call("serialize_s", encode_artifact, qm, codecs, plan, comp)
            fit_k = {**second, "plan": plan, "first_try": fit_k, "bytes": len(blob)}
    fit = None
    if len(blob) > budget and cfg.fit_to_budget:
        plan = {s["name"]: (s["layout"], s["method"]) for s in sections}
        try:
            qm, fit = fit_to_budget(qm, hessians, budget, lambda m: len(encode_artifact(m, codecs, plan, comp)[0]))
            blob, sections = encode_artifact(qm, codecs, plan, comp)
        except UserError as e:  # cannot fit: keep the artifact, the size report says it is over the cap
            fit = {"fitted": False, "reason": str(e)}
    rules = policy_table(state, cfg)
    tensors = [{"name": n, "kind": t.kind, "shape": list(t.shape), "bits": t.bits, "rule": rules[n].as_dict(),
                **t.info} for n, t in qm.tensors.items()]
    return {"bytes": size_report(code_bytes, len(blob), cfg.size_cap), "path": None, "tensors": tensors,
            "sections": sections, "skipped_codecs": skipped, "fit": fit, "fit_k": fit_k,
            "matrix_k": qm.meta["matrix_k"], "warnings": quant_warnings(qm), "timings": timings}, blob


def export_artifact(model: torch.nn.Module, hessians: dict | None, cfg, path, code_bytes: int) -> dict:
    """Quantize a trained model's weights and write the artifact (see export_state for the report)."""
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return export_state(state, hessians, cfg, path, code_bytes)
