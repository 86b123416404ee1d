"""Analytic training FLOPs per token of a ModelConfig, and the bf16 peak of known GPUs for MFU.

    flops_per_token = 6 * N + 6 * L * T * d_attn            (causal attention; the default)
                    = 6 * N + 12 * L * T * d_attn           (causal=False: every score of the T x T matrix)

- N: the weights of every matrix multiply one token passes through: per virtual layer the attention's q, k,
  v and output projections and the MLP's two matrices (a looped layer of depth recurrence counts once per
  pass), plus the BigramHash and value-embedding projections (once each) and the head (V x d, counted
  when tied to the embedding too). Embedding lookups are not matmuls and count 0. Each weight costs 2 FLOPs
  in the forward pass and 4 in the backward pass (gradients of the input and of the weight): 6 N.
- L: virtual layers (physical layers plus the recurrence's extra passes), T: train.seq_len, d_attn: query
  heads x head dim = model_dim. Per layer and token the forward pass computes q.k over T keys and the
  weighted sum of T values, 2 * 2 * T * d_attn FLOPs; the backward pass twice that; so 12 T d_attn per layer,
  halved for causal attention, which reads T / 2 keys on average.
- Norms, softmax, activations, rotary, the loss and the optimizer are left out (the MFU convention of
  PaLM, appendix B), and so is the recomputation of scores in FlashAttention's backward pass.
"""

from dataclasses import dataclass

from pgolf.config import ModelConfig
from pgolf.model.gpt import virtual_layer_order

# bf16 dense tensor-core peak, FLOP/s, by substrings of torch.cuda.get_device_name (lower case); first
# match wins, so the specific variants come before the plain names (H100 SXM reads "NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = (
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h200", "nvl"), 835e12),
    (("h100",), 989e12),
    (("h200",), 989e12),
    (("a100",), 312e12),
)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token of one model at one sequence length, and the terms they come from."""
    matmul_params: int  # N
    virtual_layers: int  # L
    seq_len: int  # T
    attn_dim: int  # d_attn
    causal: bool

    @property
    def matmul_flops(self) -> int:
        return 6 * self.matmul_params

    @property
    def attention_flops(self) -> int:
        full = 12 * self.virtual_layers * self.seq_len * self.attn_dim
        return full // 2 if self.causal else full

    @property
    def total(self) -> int:
        return self.matmul_flops + self.attention_flops

    def formula(self) -> str:
        """The count with its terms, e.g. "6 x 214,528 + 6 x 4 x 128 x 64 = 1,483,776"."""
        factor = 6 if self.causal else 12
        kind = "causal" if self.causal else "full"
        return (f"6 x N + {factor} x L x T x d_attn ({kind} attention) = 6 x {self.matmul_params:,} + "
                f"{factor} x {self.virtual_layers} x {self.seq_len} x {self.attn_dim} = {self.total:,}")

    def as_dict(self) -> dict:
        return {"flops_per_token": self.total, "matmul_params": self.matmul_params,
                "virtual_layers": self.virtual_layers, "seq_len": self.seq_len, "attn_dim": self.attn_dim,
                "causal": self.causal, "matmul_flops": self.matmul_flops,
                "attention_flops": self.attention_flops, "formula": self.formula()}


def block_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one Block's matrices: q, k, v, attention output, MLP fc and proj."""
    d = cfg.model_dim
    kv_dim = cfg.num_kv_heads * (d // cfg.num_heads)
    hidden = round(cfg.mlp_mult * d)
    return d * d + 2 * d * kv_dim + d * d + 2 * d * hidden


def matmul_params_per_token(cfg: ModelConfig, recurrence: bool = True) -> int:
    """N: the matmul weights one token passes through in a forward pass (see the module docstring)."""
    d = cfg.model_dim
    kv_dim = cfg.num_kv_heads * (d // cfg.num_heads)
    n_layers = len(virtual_layer_order(cfg, recurrence))
    n = n_layers * block_matmul_params(cfg) + cfg.vocab_size * d
    if cfg.bigram_buckets > 0:
        n += cfg.bigram_dim * d
    if cfg.ve_last_n > 0:
        n += cfg.ve_dim * kv_dim
    return n


def training_flops_per_token(cfg: ModelConfig, seq_len: int, recurrence: bool = True,
                             causal: bool = True) -> FlopCount:
    """Forward + backward FLOPs per training token at seq_len; `recurrence` counts the looped passes."""
    return FlopCount(matmul_params=matmul_params_per_token(cfg, recurrence),
                     virtual_layers=len(virtual_layer_order(cfg, recurrence)), seq_len=seq_len,
                     attn_dim=cfg.model_dim, causal=causal)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU named like torch.cuda.get_device_name; None when unknown."""
    name = device_name.lower()
    for parts, peak in PEAK_BF16_FLOPS:
        if all(p in name for p in parts):
            return peak
    return None
