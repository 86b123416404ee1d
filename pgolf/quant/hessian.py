"""Calibration: the input Hessians H = XᵀX / tokens of every quantizable matrix, gathered by forward hooks.

Every nn.Linear (CastedLinear is one) with more than passthrough_numel weights gets a hook on its input. With
tied embeddings the head is F.linear(final_norm(x), tok_emb.weight), so the output of `model.final_norm` is
the embedding's input and is collected under "tok_emb.weight". Matrices that read the same input tensor (q, k
and v) share one product per batch. Sums are fp32 on the model's device; under
torch.distributed they are all-reduced before dividing by the total token count. The caller times this.

The inputs are fresh training batches, or (quant.calib_source=self, PR #1427) sequences sampled from the model
itself by `generate_calibration`, which reads no file.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from pgolf.errors import UserError

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


def next_token_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits (B, V) of the next token after each row: the head on the last position only where the
    model offers the head split (pgolf.model.gpt.GPT), else its full logits' last position."""
    if hasattr(model, "forward_hidden") and hasattr(model, "head_logits"):
        return model.head_logits(model.forward_hidden(input_ids, keep=1))[:, -1].float()
    return model(input_ids)[:, -1].float()


def generate_calibration(model: nn.Module, batches: int, seqs: int, seq_len: int, temperature: float,
                         seed: int) -> list[torch.Tensor]:
    """`batches` batches (seqs, seq_len) of token ids sampled from the model (quant.calib_source=self): each row
    from a uniformly random first token, then one token at a time from softmax(logits / temperature), with a
    generator seeded by `seed` on the model's device. There is no KV cache: step t runs the whole prefix, so a
    batch costs about seq_len / 2 forwards of seq_len tokens. The caller times it (it is calibration)."""
    if temperature <= 0:
        raise UserError(f"quant.calib_temperature={temperature} must be above 0")
    device = next(model.parameters()).device
    vocab = model.tok_emb.weight.shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for _ in range(batches):
                x = torch.randint(0, vocab, (seqs, 1), device=device, generator=gen)
                for _ in range(seq_len - 1):
                    probs = torch.softmax(next_token_logits(model, x) / temperature, dim=-1)
                    x = torch.cat((x, torch.multinomial(probs, 1, generator=gen)), dim=1)
                out.append(x)
    finally:
        model.train(was_training)
    return out
