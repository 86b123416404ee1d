"""Small building blocks of the GPT: the casted (QAT-capable) linear layer, RMSNorm, rotary embedding, softcap."""

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.fp8 import fp8_linear, fp8_supported
from pgolf.quant.formats import fake_quantize_rows


class CastedLinear(nn.Linear):
    """A linear layer whose fp32 weight is cast to the input's dtype at the matmul.

    Quantization-aware training: while the buffer `qat_on` is 1, the forward pass sees the weight as export
    would write it (`fake_quantize_rows(w, qat_bits, qat_clip_k)`), and the gradient passes straight through
    to the fp32 weight. The switch is a tensor, chosen with torch.where, so toggling it neither recompiles
    a compiled model nor lets the compiler fold the QAT branch away; the SDClip k is a buffer too, so the
    trainer can set it when QAT starts (to the k the export will use) without a recompile. The fake-quantized
    weight is therefore computed on every call, also while QAT is off (a few elementwise passes over it).

    FP8 (train.fp8, set by the trainer through `fp8`): while gradients are on, the matmul runs through
    pgolf.model.fp8 in the autocast dtype (forward and input gradient in e4m3); under no_grad (validation,
    calibration, scoring) and for operands it does not take, the plain matmul runs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 qat_bits: int = 6, qat_clip_k: float = 12.85):
        super().__init__(in_features, out_features, bias=bias)
        self.qat_bits = qat_bits
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)
        self.qat_enabled = False  # qat_on's value, readable without a device sync (eager forwards skip fake quant)
        self.register_buffer("qat_clip_k", torch.tensor(float(qat_clip_k)), persistent=False)
        self.fp8 = False
        self.qat_scale_floor = "tiny"  # quant.scale_floor, set with the rest by pgolf.train.qat

    @torch.no_grad()
    def configure_qat(self, on: bool, bits: int | None = None, clip_k: float | None = None) -> None:
        """Switch fake quantization on or off in place (no recompile); set bits / clip_k when given."""
        self.qat_on.fill_(1.0 if on else 0.0)
        self.qat_enabled = bool(on)
        if bits is not None:
            self.qat_bits = int(bits)
        if clip_k is not None:
            self.qat_clip_k.fill_(float(clip_k))

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: plain, or fake-quantized with a straight-through gradient.

        A compiled forward computes both and picks by the qat_on buffer (switching QAT compiles nothing); an
        eager one with QAT off returns the weight at once, the same value without the fake quantization's
        dozen kernels a call (scoring and document TTT run eagerly, a matrix per call)."""
        w = self.weight
        if not torch.compiler.is_compiling() and not self.qat_enabled:  # compiling: no guard on the flag
            return w
        fake = fake_quantize_rows(w.detach(), self.qat_bits, self.qat_clip_k, self.qat_scale_floor)
        # fake + (w - w.detach()) equals `fake` exactly in value and has d/dw = identity.
        ste = fake + (w - w.detach())
        return torch.where(self.qat_on > 0.5, ste, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 and self.bias is None and torch.is_grad_enabled():
            if torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
            if fp8_supported(x, self.weight):
                return fp8_linear(x, self.effective_weight().to(x.dtype))
        w = self.effective_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with no learnable weight."""

    def __init__(self, eps: float | None = None):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=self.eps)


class Rotary(nn.Module):
    """Rotary position embedding on the first `rope_dims` of each head (0 = the whole head); no NTK scaling."""

    def __init__(self, head_dim: int, rope_dims: int = 0, base: float = 10000.0):
        super().__init__()
        self.rope_dims = rope_dims if rope_dims > 0 else head_dim
        exponents = torch.arange(0, self.rope_dims, 2, dtype=torch.float32) / self.rope_dims
        self.register_buffer("inv_freq", 1.0 / (base ** exponents), persistent=False)

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of shape (seq_len, rope_dims // 2), fp32."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the tables (T, R/2); dimensions past R pass through unchanged."""
    rot = 2 * cos.size(-1)
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : rot // 2], x[..., rot // 2: rot]
    rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    if rot == x.size(-1):
        return rotated
    return torch.cat((rotated, x[..., rot:]), dim=-1)


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap); cap <= 0 leaves the logits as they are."""
    if cap <= 0:
        return logits
    return cap * torch.tanh(logits / cap)
