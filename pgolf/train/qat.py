"""Late QAT: switch fake quantization on in every CastedLinear once the LR scale drops low enough.

The switch is each CastedLinear's `qat_on` buffer (a 0./1. tensor), filled in place: a torch.compile'd model
reads the tensor at run time, so the change takes effect without a recompile. (The records' class-level
Python flag was constant-folded by the compiler and the STE branch never ran.)
"""

import torch
from torch import nn

from pgolf.model.layers import CastedLinear


def casted_linears(model: nn.Module) -> list[CastedLinear]:
    """The model's CastedLinear layers (the ones that can fake-quantize)."""
    return [m for m in model.modules() if isinstance(m, CastedLinear)]


@torch.no_grad()
def set_qat(model: nn.Module, on: bool, bits: int | None = None, clip_k: float | None = None) -> int:
    """Fill every CastedLinear's qat_on with 1./0.; set qat_bits / qat_clip_k when given. Returns the count.

    A model with its own `set_qat` (GPT: the block matrices, the ones export quantizes at matrix_bits) decides
    which layers take part; any other module gets every CastedLinear.
    """
    if hasattr(model, "set_qat"):
        model.set_qat(on, bits=bits, clip_k=clip_k)
        return sum(1 for m in casted_linears(model) if bool(m.qat_on.item()) == bool(on))
    layers = casted_linears(model)
    for m in layers:
        m.configure_qat(on, bits, clip_k)
    return len(layers)


def qat_rules(model: nn.Module, quant_cfg) -> dict:
    """{CastedLinear: its weight's quantization rule} for the layers the policy lets QAT cover (rule.qat)."""
    from pgolf.quant.policy import tensor_rule

    model = getattr(model, "_orig_mod", model)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear):
            key = f"{name}.weight" if name else "weight"
            rule = tensor_rule(key, tuple(m.weight.shape), True, quant_cfg)
            if rule.qat:
                out[m] = rule
    return out


@torch.no_grad()
def set_qat_from_config(model: nn.Module, on: bool, quant_cfg, clip_k: float | None = None) -> int:
    """Fake-quantize exactly the layers the export quantizes as fitted matrices, each with its rule's bits,
    SDClip k (clip_k is the fitted matrix k: each role keeps its ratio to it) and scale floor; every other
    CastedLinear off. Returns the number switched on (or that would be, when on is False)."""
    rules = qat_rules(model, quant_cfg)
    for m in casted_linears(model):
        rule = rules.get(m)
        if rule is None:
            m.configure_qat(False)
            continue
        m.configure_qat(on, rule.bits, rule.k_at(clip_k))
        m.qat_scale_floor = quant_cfg.scale_floor
    return len(rules)


def qat_clip_k(model: nn.Module, quant_cfg, code_bytes: int | None) -> float:
    """The SDClip k QAT trains against: with quant.fit_k, a quick estimate of the k the export will choose
    for the current weights (zlib for the small sections, the matrices at their plain entropy; about a
    second on the GPU, inside the timed loop: the export's own search compresses with the real codecs and
    takes several). The export searches again on the final weights; the run record keeps both k."""
    if not quant_cfg.fit_k:
        return quant_cfg.sdclip_k
    from pgolf.quant.pipeline import search_matrix_k

    state = {k: v.detach() for k, v in model.state_dict().items()}
    budget = quant_cfg.size_cap - int(code_bytes or 0)
    return float(search_matrix_k(state, quant_cfg, budget, ("zlib9",), ratio=1.0)["k"])


def qat_due(lr_scale: float, train_cfg) -> bool:
    """Late QAT is on once the LR scale is below train.qat_start_scale (> 0)."""
    return train_cfg.qat_start_scale > 0 and lr_scale < train_cfg.qat_start_scale
