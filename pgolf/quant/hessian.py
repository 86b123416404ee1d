"""Calibration: the input Hessians H = XᵀX / tokens of every quantizable matrix, gathered by forward hooks.

Every nn.Linear (CastedLinear is one) with more than passthrough_numel weights gets a hook on its input. With
tied embeddings the head is F.linear(final_norm(x), tok_emb.weight), so the output of `model.final_norm` is
the embedding's input and is collected under "tok_emb.weight". Matrices that read the same input tensor (q, k
and v) share one product per batch. Sums are fp32 on the model's device; under
torch.distributed they are all-reduced before dividing by the total token count. The caller times this.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn

TIED_EMBED_NAME = "tok_emb.weight"


def hessian_targets(model: nn.Module, passthrough_numel: int = 65_536, names=None) -> dict[str, nn.Module]:
    """{weight name: module whose input (or, for the tied embedding, whose output) feeds that matrix}."""
    targets = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight.numel() > passthrough_numel:
            targets[f"{mod_name}.weight" if mod_name else "weight"] = mod
    tied = getattr(model, "lm_head", None) is None
    if tied and hasattr(model, "final_norm") and hasattr(model, "tok_emb"):
        targets[TIED_EMBED_NAME] = model.final_norm
    if names is not None:
        targets = {k: v for k, v in targets.items() if k in set(names)}
    return targets


@contextlib.contextmanager
def tf32_matmuls():
    """TF32 for fp32 matmuls inside the block: exact for inputs that were bf16 (8 mantissa bits fit in TF32's
    10), with fp32 accumulation, and several times faster than full fp32 on Hopper."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def collect_hessians(model: nn.Module, batches, names=None, passthrough_numel: int = 65_536) -> dict[str, torch.Tensor]:
    """Run model on each input_ids batch (B, T) under no_grad and return {weight name: H (C, C) fp32}."""
    targets = hessian_targets(model, passthrough_numel, names)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in targets}

    last: list = []  # [input tensor, its XᵀX, rows]: consecutive hooks on the same tensor (q, k, v) share it

    def make_hook(name: str, use_output: bool):
        def hook(module, inputs, output):
            x = output if use_output else inputs[0]
            if not last or last[0] is not x:  # identity, not address: `last` keeps x alive meanwhile
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                # The forward runs under bf16 autocast, which would round XᵀX to bf16 (2^-9 relative per
                # entry) and leave H indefinite: Cholesky then fails and GPTQ degrades to heavy damping.
                with torch.autocast(flat.device.type, enabled=False):
                    last[:] = [x, flat.T @ flat, flat.shape[0]]
            _, xtx, rows = last
            if name not in sums:
                sums[name] = torch.zeros_like(xtx)
            sums[name] += xtx
            counts[name] += rows
        return hook

    handles = [mod.register_forward_hook(make_hook(name, name == TIED_EMBED_NAME and not isinstance(mod, nn.Linear)))
               for name, mod in targets.items()]
    try:
        with torch.no_grad(), tf32_matmuls():
            for input_ids in batches:
                model(input_ids.to(device))
                last.clear()
    finally:
        for h in handles:
            h.remove()
    distributed = dist.is_available() and dist.is_initialized()
    out = {}
    for name in targets:
        if name not in sums:
            continue
        total = torch.tensor([float(counts[name])], device=sums[name].device)
        if distributed:
            dist.all_reduce(sums[name])
            dist.all_reduce(total)
        out[name] = sums[name] / total.clamp_min(1.0)
    return out
