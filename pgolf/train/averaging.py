"""Weight averaging: an EMA of every parameter (every step) and SWA (a running mean late in training).

Both keep fp32 shadows on the model's device. `swap_in(model)` copies the averaged weights into the model,
so what is evaluated and exported afterwards really is the averaged model (the records accumulated SWA but
never loaded it; here the one that is configured is the one that is used, EMA taking precedence).
"""

import torch
from torch import nn


class EMAWeights:
    """shadow = decay * shadow + (1 - decay) * param, after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters(), strict=True):
            s.copy_(p.detach().float())

    def averaged(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        load_averaged(model, self.averaged())

    def state_tensors(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        return {prefix + n: s for n, s in zip(self.names, self.shadow, strict=True)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "ema.") -> None:
        for n, s in zip(self.names, self.shadow, strict=True):
            s.copy_(tensors[prefix + n])


class SWAWeights:
    """Running mean of the weights taken every `every` steps once the LR scale is below `start_scale`."""

    def __init__(self, model: nn.Module, every: int, start_scale: float):
        if every <= 0:
            raise ValueError(f"SWA every={every} must be positive")
        self.every = every
        self.start_scale = start_scale
        self.count = 0
        self.names = [n for n, _ in model.named_parameters()]
        self.mean = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]

    def due(self, step: int, lr_scale: float) -> bool:
        return lr_scale < self.start_scale and step % self.every == 0

    @torch.no_grad()
    def maybe_update(self, model: nn.Module, step: int, lr_scale: float) -> bool:
        if not self.due(step, lr_scale):
            return False
        self.count += 1
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.mean, params, 1.0 / self.count)
        return True

    def averaged(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.mean, strict=True))

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        if self.count == 0:
            return  # nothing averaged (the run ended before the SWA window): keep the live weights
        load_averaged(model, self.averaged())

    def state_tensors(self, prefix: str = "swa.") -> dict[str, torch.Tensor]:
        out = {prefix + n: m for n, m in zip(self.names, self.mean, strict=True)}
        out[prefix + "__count__"] = torch.tensor(self.count, dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "swa.") -> None:
        for n, m in zip(self.names, self.mean, strict=True):
            m.copy_(tensors[prefix + n])
        self.count = int(tensors[prefix + "__count__"])


@torch.no_grad()
def load_averaged(model: nn.Module, averaged: dict[str, torch.Tensor]) -> None:
    """Copy averaged fp32 weights into the model's parameters (cast to each parameter's dtype)."""
    for name, p in model.named_parameters():
        p.copy_(averaged[name].to(dtype=p.dtype, device=p.device))


def build_averagers(model: nn.Module, train_cfg) -> tuple[EMAWeights | None, SWAWeights | None]:
    ema = EMAWeights(model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
    swa = SWAWeights(model, train_cfg.swa_every, train_cfg.swa_start_scale) if train_cfg.swa_every > 0 else None
    return ema, swa


def swap_in_averaged(model: nn.Module, ema: EMAWeights | None, swa: SWAWeights | None) -> str:
    """Load the configured average into the model; returns which one ("ema", "swa" or "none")."""
    if ema is not None:
        ema.swap_in(model)
        return "ema"
    if swa is not None and swa.count > 0:
        swa.swap_in(model)
        return "swa"
    return "none"
