"""From float weights and Hessians to the artifact on disk: the step the trainer calls at the end of a run."""

import time
from pathlib import Path

import torch

from pgolf.errors import UserError
from pgolf.quant.artifact import QuantizedModel, QuantTensor, encode_artifact
from pgolf.quant.codecs import AUTO_CODECS, codec_candidates
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


def quantize_state(state_dict: dict[str, torch.Tensor], hessians: dict | None, cfg) -> QuantizedModel:
    """Quantize a float state dict under cfg (QuantConfig): GPTQ where a Hessian is known and cfg.method is
    "gptq", round-to-nearest otherwise; small / non-2D tensors pass through as fp16. Runs on the Hessians'
    device (the GPU at the end of training)."""
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
                                                 "matrix_bits": cfg.matrix_bits, "embed_bits": cfg.embed_bits})


def quant_warnings(qm: QuantizedModel) -> list[str]:
    """Lines worth logging: damping raised after a Cholesky failure, dead columns."""
    lines = []
    for name, t in qm.tensors.items():
        if t.info.get("damp_retries"):
            lines.append(f"{name}: Cholesky failed; damping raised to {t.info['damp']:.3g}·mean(diag H)")
        if t.info.get("dead_columns"):
            lines.append(f"{name}: {t.info['dead_columns']} dead input columns (zero Hessian diagonal) set to 0")
    return lines


def export_state(state: dict[str, torch.Tensor], hessians: dict | None, cfg, path, code_bytes: int) -> dict:
    """Quantize, fit to the byte budget if asked, compress and write the artifact; returns the export report."""
    cuda = any(t.is_cuda for t in state.values())
    t0 = time.perf_counter()
    qm = quantize_state(state, hessians, cfg)
    if cuda:
        torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    if cfg.codec not in CONFIG_CODECS:
        raise UserError(f"quant.codec={cfg.codec!r} is not one of {sorted(CONFIG_CODECS)}")
    codecs = CONFIG_CODECS[cfg.codec]
    runnable, skipped = codec_candidates([f"{c}+none" for c in codecs])
    if not runnable:
        raise UserError(f"quant.codec={cfg.codec!r} cannot run here: {list(skipped.values())}")
    blob, sections = encode_artifact(qm, codecs)
    fit = None
    budget = cfg.size_cap - int(code_bytes)
    if len(blob) > budget and cfg.fit_to_budget:
        plan = {s["name"]: (s["layout"], s["method"]) for s in sections}
        try:
            qm, fit = fit_to_budget(qm, hessians, budget, lambda m: len(encode_artifact(m, codecs, plan)[0]))
            blob, sections = encode_artifact(qm, codecs, plan)
        except UserError as e:  # cannot fit: keep the artifact, the size report says it is over the cap
            fit = {"fitted": False, "reason": str(e)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    serialize_s = time.perf_counter() - t1

    tensors = [{"name": n, "kind": t.kind, "shape": list(t.shape), "bits": t.bits, **t.info}
               for n, t in qm.tensors.items()]
    return {"bytes": size_report(code_bytes, len(blob), cfg.size_cap), "path": str(path), "tensors": tensors,
            "sections": sections, "skipped_codecs": skipped, "fit": fit, "warnings": quant_warnings(qm),
            "timings": {"quantize_s": quantize_s, "serialize_s": serialize_s}}


def export_artifact(model: torch.nn.Module, hessians: dict | None, cfg, path, code_bytes: int) -> dict:
    """Quantize a trained model's weights and write the artifact (see export_state for the report)."""
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return export_state(state, hessians, cfg, path, code_bytes)
