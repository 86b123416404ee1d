"""What a valid configuration is: the allowed values of the choice fields, the range of every numeric field,
and the relations between fields (pgolf.config holds the tree itself). validate_config checks all three and
raises ConfigError naming the field."""

from dataclasses import dataclass

from pgolf.config import ConfigError, RunConfig
from pgolf.errors import UserError

# torch.compile's modes: "max-autotune*" tune GEMM / Triton templates (and may fuse epilogues) at a longer
# compile; "reduce-overhead" and "max-autotune" also capture CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
# What a torch.compile covers (train.compile_scope, eval.compile_scope; pgolf.eval.scoring.compile_blocks_only):
# the whole step or scoring function, or the blocks only.
COMPILE_SCOPES = ("model", "blocks")


# What eval.ttt_mode=doc_lora adapts (pgolf.eval.doc_lora): attention q, k, v, o; the MLP; the LM head.
EVAL_LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")
ATTENTION_KERNELS = ("auto", "fa3", "cudnn", "flash", "efficient", "math")
# The string fields that take one of a fixed set of values (quant.codec's names are pgolf.quant.pipeline's).
FIELD_CHOICES = {
    "model.attention": ATTENTION_KERNELS,
    "model.residual_dtype": ("float32", "bfloat16"),
    "model.embed_param_dtype": ("float32", "bfloat16"),
    "model.aux_proj_init": ("pgolf", "ortho", "ortho_scaled"),
    "optim.aux_proj_group": ("matrix", "scalar"),
    "optim.clip_scope": ("global", "local"),
    "data.sampler": ("sequential", "coprime"),
    "train.compile_mode": COMPILE_MODES,
    "train.compile_scope": COMPILE_SCOPES,
    "train.device": ("auto", "cpu", "cuda"),
    "quant.method": ("gptq", "rtn"),
    "quant.clip": ("sdclip", "search", "percentile", "pct_search", "none"),
    "quant.scale_floor": ("tiny", "inv_qmax"),
    "quant.clip_select": ("row", "matrix"),
    "quant.act_order_direction": ("desc", "asc"),
    "quant.calib_source": ("train", "self"),
    "quant.gptq_update": ("cholesky", "inverse"),
    "quant.group_by": ("bits", "role"),
    "quant.codec": ("auto", "zlib", "lzma", "zstd", "brotli"),
    "eval.ttt_mode": ("sgd", "muon", "lora", "doc_lora"),
    "eval.ttt_freeze_scope": ("all", "vectors"),
    "eval.ttt_doc_context": ("window", "cache"),
    "eval.compile_scope": COMPILE_SCOPES,
}


@dataclass(frozen=True)
class FieldRange:
    """An interval for a numeric field: low..high (None = unbounded), each end included unless marked open."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if value != value:  # NaN
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


RANGE_POSITIVE = FieldRange(0, low_open=True)
RANGE_NON_NEGATIVE = FieldRange(0)
RANGE_AT_LEAST_ONE = FieldRange(1)
RANGE_OFF_OR_INDEX = FieldRange(-1)  # -1 = off, else a layer index
RANGE_FRACTION = FieldRange(0, 1)
RANGE_DECAY = FieldRange(0, 1, high_open=True)  # momenta, betas, EMA decay: 1 would never move
RANGE_BITS = FieldRange(5, 8)

# The range of every int and float field of the tree (tests/test_config_ranges.py checks that none is missing).
FIELD_RANGES = {
    "model.vocab_size": RANGE_AT_LEAST_ONE, "model.num_layers": RANGE_AT_LEAST_ONE,
    "model.model_dim": RANGE_AT_LEAST_ONE, "model.num_heads": RANGE_AT_LEAST_ONE,
    "model.num_kv_heads": RANGE_AT_LEAST_ONE, "model.mlp_mult": RANGE_POSITIVE, "model.mlp_slope": RANGE_FRACTION,
    "model.rope_base": RANGE_POSITIVE, "model.rope_dims": RANGE_NON_NEGATIVE, "model.qk_gain_init": RANGE_POSITIVE,
    "model.logit_softcap": RANGE_NON_NEGATIVE, "model.tied_embed_init_std": RANGE_NON_NEGATIVE,
    "model.xsa_last_n": RANGE_NON_NEGATIVE, "model.bigram_buckets": RANGE_NON_NEGATIVE,
    "model.bigram_dim": RANGE_AT_LEAST_ONE, "model.ve_last_n": RANGE_NON_NEGATIVE, "model.ve_dim": RANGE_AT_LEAST_ONE,
    "model.recur_first": RANGE_OFF_OR_INDEX, "model.recur_last": RANGE_OFF_OR_INDEX,
    "model.recur_loops": RANGE_NON_NEGATIVE, "model.recur_start_frac": RANGE_FRACTION,
    "model.parallel_resid_from": RANGE_OFF_OR_INDEX,
    "model.sparse_attn_gate_scale": RANGE_POSITIVE, "model.gate_window": RANGE_AT_LEAST_ONE,
    "model.parallel_lanes_from": RANGE_OFF_OR_INDEX,
    "optim.matrix_lr": RANGE_NON_NEGATIVE, "optim.scalar_lr": RANGE_NON_NEGATIVE,
    "optim.embed_lr": RANGE_NON_NEGATIVE, "optim.tied_embed_lr": RANGE_NON_NEGATIVE,
    "optim.head_lr": RANGE_NON_NEGATIVE, "optim.muon_momentum": RANGE_DECAY,
    "optim.muon_momentum_warmup_start": RANGE_DECAY, "optim.muon_momentum_warmup_steps": RANGE_NON_NEGATIVE,
    "optim.muon_ns_steps": RANGE_AT_LEAST_ONE, "optim.muon_wd": RANGE_NON_NEGATIVE, "optim.adam_eps": RANGE_POSITIVE,
    "optim.adam_beta1": RANGE_DECAY, "optim.adam_beta2": RANGE_DECAY, "optim.adam_wd": RANGE_NON_NEGATIVE,
    "optim.grad_clip": RANGE_NON_NEGATIVE, "optim.embed_wd": FieldRange(-1), "optim.scalar_wd": RANGE_NON_NEGATIVE,
    "train.seq_len": RANGE_AT_LEAST_ONE, "train.batch_tokens": RANGE_AT_LEAST_ONE,
    "train.grad_accum": RANGE_AT_LEAST_ONE, "train.wallclock_s": RANGE_NON_NEGATIVE,
    "train.max_steps": RANGE_AT_LEAST_ONE, "train.warmdown_iters": RANGE_NON_NEGATIVE,
    "train.warmdown_frac": RANGE_FRACTION, "train.compile_warmup_steps": RANGE_NON_NEGATIVE,
    "train.ema_decay": RANGE_DECAY, "train.swa_every": RANGE_NON_NEGATIVE, "train.swa_start_scale": RANGE_FRACTION,
    "train.qat_start_scale": RANGE_FRACTION, "train.calib_reserve_s": RANGE_NON_NEGATIVE,
    "train.val_every": RANGE_NON_NEGATIVE, "train.log_every": RANGE_NON_NEGATIVE, "train.seed": RANGE_NON_NEGATIVE,
    "train.checkpoint_every_s": RANGE_NON_NEGATIVE, "train.min_lr": RANGE_FRACTION,
    "quant.matrix_bits": RANGE_BITS, "quant.embed_bits": RANGE_BITS, "quant.sdclip_k": RANGE_POSITIVE,
    "quant.fit_k_min": FieldRange(0, 64, low_open=True, high_open=True),
    "quant.fit_margin": FieldRange(0, 0.1, high_open=True), "quant.sdclip_k_embed": RANGE_POSITIVE,
    "quant.damp": RANGE_NON_NEGATIVE, "quant.block_size": RANGE_AT_LEAST_ONE,
    "quant.calib_batches": RANGE_NON_NEGATIVE, "quant.calib_seqs": RANGE_AT_LEAST_ONE,
    "quant.calib_temperature": RANGE_POSITIVE, "quant.passthrough_numel": RANGE_NON_NEGATIVE,
    "quant.size_cap": RANGE_AT_LEAST_ONE, "quant.sdclip_k_attn": RANGE_NON_NEGATIVE,
    "quant.sdclip_k_mlp": RANGE_NON_NEGATIVE, "quant.gate_bits": FieldRange(0, 8),
    "quant.lqer_top_k": RANGE_NON_NEGATIVE, "quant.lqer_rank": RANGE_AT_LEAST_ONE,
    "quant.lqer_a_bits": FieldRange(2, 8), "quant.lqer_b_bits": FieldRange(2, 8),
    "quant.lqer_group": RANGE_AT_LEAST_ONE,
    "eval.seq_len": RANGE_NON_NEGATIVE, "eval.batch_seqs": RANGE_AT_LEAST_ONE, "eval.val_tokens": RANGE_NON_NEGATIVE,
    "eval.sliding_stride": RANGE_NON_NEGATIVE, "eval.ttt_chunk_tokens": RANGE_AT_LEAST_ONE,
    "eval.ttt_epochs": RANGE_AT_LEAST_ONE, "eval.ttt_lr": RANGE_NON_NEGATIVE, "eval.ttt_momentum": RANGE_DECAY,
    "eval.ttt_batch_seqs": RANGE_AT_LEAST_ONE, "eval.ttt_grad_clip": RANGE_NON_NEGATIVE,
    "eval.ttt_lora_rank": RANGE_AT_LEAST_ONE, "eval.ttt_ns_steps": RANGE_AT_LEAST_ONE,
    "eval.ttt_freeze_blocks": RANGE_NON_NEGATIVE, "eval.ttt_time_limit_s": RANGE_NON_NEGATIVE,
    "eval.time_budget_s": RANGE_NON_NEGATIVE,
    "eval.ttt_stride": RANGE_NON_NEGATIVE, "eval.ttt_doc_chunk": RANGE_AT_LEAST_ONE,
    "eval.ttt_doc_batch": RANGE_AT_LEAST_ONE, "eval.ttt_lora_alpha": RANGE_POSITIVE,
    "eval.ttt_adam_beta2": RANGE_DECAY, "eval.ttt_weight_decay": RANGE_NON_NEGATIVE,
    "eval.ttt_phases": RANGE_NON_NEGATIVE, "eval.ttt_prefix_frac": RANGE_FRACTION,
    "eval.ttt_global_lr": RANGE_NON_NEGATIVE, "eval.ttt_global_momentum": RANGE_DECAY,
    "eval.ttt_global_chunk_tokens": RANGE_AT_LEAST_ONE,
}


def config_value(cfg: RunConfig, key: str):
    """The value at a dotted key such as "model.num_heads"."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate_config(cfg: RunConfig) -> None:
    """Every numeric field inside its range, every enum-like string one of its values, then the relations
    between fields (checked only once the ranges hold, so that none of them divides by zero)."""
    for key, rng in FIELD_RANGES.items():
        value = config_value(cfg, key)
        if not rng.holds(value):
            raise ConfigError(f"{key}={value!r} must be {rng.describe()}")
    for key, choices in FIELD_CHOICES.items():
        value = config_value(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {'|'.join(choices)}")
    for ok, message in config_relations(cfg):
        if not ok:
            raise ConfigError(message)


def quantiles_ok(text: str) -> bool:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return False
    return bool(values) and all(0 < v <= 1 for v in values)


def overrides_error(q) -> str | None:
    """The first malformed quant.overrides item's message, or None."""
    from pgolf.quant.policy import check_overrides

    try:
        check_overrides(q)
    except UserError as e:
        return str(e)
    return None


def config_relations(cfg: RunConfig) -> list[tuple[bool, str]]:
    """(holds, message) for each relation between fields; the fields are already inside their ranges."""
    m, t, q, e = cfg.model, cfg.train, cfg.quant, cfg.eval
    head_dim = m.model_dim // m.num_heads
    eval_seq = e.seq_len or t.seq_len
    lora_targets = [x.strip() for x in e.ttt_lora_targets.split(",") if x.strip()]
    return [
        (m.model_dim % m.num_heads == 0,
         f"model.model_dim={m.model_dim} must be a multiple of model.num_heads={m.num_heads}"),
        (m.num_heads % m.num_kv_heads == 0,
         f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"),
        (m.rope_dims % 2 == 0 and m.rope_dims <= head_dim,
         f"model.rope_dims={m.rope_dims} must be even and at most the head dim {head_dim}"),
        (m.rope_dims > 0 or head_dim % 2 == 0,
         f"model.rope_dims=0 rotates the whole head, whose dim {head_dim} must then be even"),
        (m.xsa_last_n <= m.num_layers, f"model.xsa_last_n={m.xsa_last_n} exceeds model.num_layers={m.num_layers}"),
        (m.ve_last_n <= m.num_layers, f"model.ve_last_n={m.ve_last_n} exceeds model.num_layers={m.num_layers}"),
        (m.recur_loops == 0 or 0 <= m.recur_first <= m.recur_last < m.num_layers,
         f"model.recur_first={m.recur_first}..recur_last={m.recur_last} must be a span inside the "
         f"{m.num_layers} layers when model.recur_loops={m.recur_loops} > 0"),
        (m.parallel_resid_from < m.num_layers,
         f"model.parallel_resid_from={m.parallel_resid_from} must be below model.num_layers={m.num_layers}"),
        (not (m.native_gqa and m.attention == "efficient"),
         "model.native_gqa needs a kernel that reads unexpanded K/V: model.attention=efficient has none"),
        (m.gate_window <= m.model_dim, f"model.gate_window={m.gate_window} must be at most model.model_dim"),
        (not (m.smear_gate and m.smear_gate_v2), "model.smear_gate and model.smear_gate_v2: choose one"),
        (m.parallel_lanes_from < m.num_layers,
         f"model.parallel_lanes_from={m.parallel_lanes_from} must be -1 (off) or a layer index"),
        (m.parallel_lanes_from < 0 or m.parallel_resid_from < 0,
         "model.parallel_lanes_from and model.parallel_resid_from: choose one parallel residual"),
        (t.batch_tokens % t.seq_len == 0,
         f"train.batch_tokens={t.batch_tokens} must be a multiple of train.seq_len={t.seq_len}"),
        (t.batch_tokens % (t.seq_len * t.grad_accum) == 0,
         f"train.batch_tokens={t.batch_tokens} does not split into train.grad_accum={t.grad_accum} "
         f"micro-steps of whole {t.seq_len}-token sequences"),
        (t.wallclock_s == 0 or t.calib_reserve_s < t.wallclock_s,
         f"train.calib_reserve_s={t.calib_reserve_s} must be below train.wallclock_s={t.wallclock_s}"),
        (e.sliding_stride <= eval_seq,
         f"eval.sliding_stride={e.sliding_stride} exceeds the evaluation's sequence length {eval_seq}"),
        (not q.fit_k or q.clip == "sdclip", f"quant.fit_k needs quant.clip=sdclip, not {q.clip!r}"),
        (t.qat_start_scale == 0 or q.clip == "sdclip",
         f"train.qat_start_scale > 0 needs quant.clip=sdclip (the fake quantizer's clip), not {q.clip!r}"),
        (q.gate_bits == 0 or q.gate_bits >= 2, f"quant.gate_bits={q.gate_bits} must be 0 (fp16) or 2..8"),
        (quantiles_ok(q.clip_quantiles),
         f"quant.clip_quantiles={q.clip_quantiles!r} must be comma-separated quantiles in (0, 1]"),
        (overrides_error(q) is None, overrides_error(q) or ""),
        (e.val_tokens == 0 or e.val_tokens >= 2,
         f"eval.val_tokens={e.val_tokens} must be 0 (the whole validation split) or at least 2"),
        (e.ttt_stride <= eval_seq,
         f"eval.ttt_stride={e.ttt_stride} exceeds the evaluation's sequence length {eval_seq}"),
        (m.bos_mask or not (e.doc_isolated or (e.ttt and e.ttt_mode == "doc_lora")),
         "eval.doc_isolated / eval.ttt_mode=doc_lora score each document alone, but model.bos_mask=false lets the "
         "smear gate and BigramHash carry the previous document's last token into a BOS position: set "
         "model.bos_mask=true"),
        (e.ttt_freeze_blocks <= m.num_layers,
         f"eval.ttt_freeze_blocks={e.ttt_freeze_blocks} exceeds model.num_layers={m.num_layers}"),
        (e.ttt_freeze_blocks == 0 or e.ttt_mode in ("sgd", "muon"),
         f"eval.ttt_freeze_blocks applies to eval.ttt_mode=sgd|muon (the modes that adapt the blocks' weights), "
         f"not {e.ttt_mode!r}"),
        (bool(lora_targets) and set(lora_targets) <= set(EVAL_LORA_TARGETS),
         f"eval.ttt_lora_targets={e.ttt_lora_targets!r} must be a comma list of {','.join(EVAL_LORA_TARGETS)}"),
    ]
