"""The one typed configuration tree of a pgolf run.

Every knob of a run lives in a dataclass below; named recipes (pgolf/recipes.py) are plain functions that
build a RunConfig. Overrides come as "section.field=value" strings and are checked against the tree: an
unknown key is an error that lists the valid ones. Environment variables appear only in the exported
submission script, never here.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from pgolf.errors import UserError


class ConfigError(UserError):
    """A configuration key or value that does not fit the tree."""


@dataclass
class DataConfig:
    path: str = "data/wiki-sp1024"  # folder with fineweb_train_*.bin / fineweb_val_*.bin
    tokenizer: str = ""  # SentencePiece .model; "" = the single *.model file inside `path`
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    # training windows: sequential (the shards front to back) | coprime (PR #1176's multi-shard sampler:
    # random phase and coprime block stride per shard, an annealed shard mix per batch; pgolf.data.loader)
    sampler: str = "sequential"


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4  # GQA: num_heads must be a multiple
    mlp_mult: float = 2.0  # hidden = mlp_mult * model_dim
    mlp_slope: float = 0.0  # MLP activation LeakyReLU(slope)^2; 0.0 is relu^2
    rope_base: float = 10000.0
    rope_dims: int = 0  # partial RoPE: rotate only the first rope_dims of each head; 0 = whole head
    qk_gain_init: float = 1.5  # per-head learnable gain on q after QK RMSNorm
    logit_softcap: float = 30.0  # softcap * tanh(logits / softcap); 0 = off
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    xsa_last_n: int = 0  # exclusive self-attention on the last N layers
    ln_scale: bool = False  # scale each block's normed input by 1/sqrt(layer+1)
    smear_gate: bool = False  # blend each position with the previous token's embedding (BOS-masked)
    bigram_buckets: int = 0  # BigramHash table size; 0 = off
    bigram_dim: int = 128
    ve_last_n: int = 0  # value embeddings added to v in the last N layers; 0 = off
    ve_dim: int = 128
    unet_skips: bool = True  # encoder half pushes skips, decoder half pops them
    skip_gates: bool = False  # sigmoid-gated skip merge instead of additive
    recur_first: int = -1  # depth recurrence: first physical layer of the looped span; -1 = off
    recur_last: int = -1  # last physical layer of the looped span (inclusive)
    recur_loops: int = 0  # extra passes over the span
    recur_start_frac: float = 0.0  # training time fraction at which looping switches on
    parallel_resid_from: int = -1  # parallel attention+MLP residual from this layer on; -1 = off
    ortho_init: bool = False  # orthogonal init of the block matrices
    attention: str = "auto"  # auto | fa3 | cudnn | flash | efficient | math
    native_gqa: bool = False  # SDPA reads K/V with their own head count (enable_gqa), none expanded; see attention.py
    residual_dtype: str = "float32"  # float32 | bfloat16: the dtype of the embedding output and residual stream
    # q/k RMSNorm + RoPE + q gain as one Triton kernel per direction on CUDA (fused_qk.py), in the training
    # steps only: evaluation runs the plain path, faster there (GPT.set_training_kernels)
    fused_qk: bool = False
    # the frontier's model changes (shared/reference/frontier.md §3), each off by default
    smear_gate_v2: bool = False  # SmearGate v2: e_t += lam*sigmoid(w.e_t[:gate_window])*e_{t-1} before the input norm
    sparse_attn_gate: bool = False  # per-head output gate sigmoid(scale * W_h . n_t[:gate_window]) after XSA
    sparse_attn_gate_scale: float = 0.5  # the sparse gate's logit scale
    gate_window: int = 12  # leading input dims read by smear_gate_v2 and sparse_attn_gate
    parallel_lanes_from: int = -1  # two-lane parallel residual (attention and MLP lanes) from this layer on; -1 = off
    # the training loss as one Triton kernel per direction on CUDA (fused_ce.py): softcap + cross-entropy on
    # the head's bf16 logits, never materialised in float32; training steps only (GPT.set_training_kernels)
    fused_ce: bool = False
    # the seed systems' variants (shared/reference/seed-systems.md), each pgolf's behaviour by default
    embed_param_dtype: str = "float32"  # float32 | bfloat16: master weights of tok_emb, bigram and VE tables
    bos_mask: bool = True  # smear gates and BigramHash treat every BOS as a document start; False: position 0 only
    aux_proj_init: str = "pgolf"  # pgolf | ortho | ortho_scaled: init of the bigram and VE projections


@dataclass
class OptimConfig:
    matrix_lr: float = 0.04  # Muon, block matrices
    scalar_lr: float = 0.04  # AdamW, gains / scales / gates
    embed_lr: float = 0.6  # AdamW, untied input embedding
    tied_embed_lr: float = 0.05  # AdamW, tied embedding
    head_lr: float = 0.008  # AdamW, untied head
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_ns_steps: int = 5
    muon_wd: float = 0.0  # decoupled: p *= 1 - lr * wd
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.0
    grad_clip: float = 0.0  # global norm; 0 = off
    # the 2026 frontier's optimizer (shared/reference/frontier.md §4; pgolf.optim)
    muon_row_normalize: bool = False  # MuonEq-R: each row of Muon's update divided by its L2 norm before NS
    muon_polar_express: bool = False  # Newton-Schulz with the per-iteration Polar Express coefficients
    embed_wd: float = -1.0  # AdamW weight decay of the embed group (token, bigram, VE tables); < 0 = adam_wd
    scalar_wd: float = 0.0  # AdamW weight decay of the scalar group (gains, scales, gates, skip weights)
    aux_proj_group: str = "matrix"  # matrix (Muon) | scalar (AdamW, scalar_lr / scalar_wd): bigram and VE projections
    clip_scope: str = "global"  # global: the averaged grads' norm | local: each rank clips its own before averaging


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_tokens: int = 524_288  # global batch per optimizer step, independent of the GPU count
    grad_accum: int = 1  # micro-steps per optimizer step on each rank
    wallclock_s: float = 600.0  # timed training budget (calibration reserve included); 0 = no cap
    max_steps: int = 20_000
    warmdown_iters: int = 1200  # LR decays linearly to 0 over the last warmdown_iters * avg step time
    warmdown_frac: float = 0.0  # if > 0: warm down over this fraction of the wallclock instead
    compile_warmup_steps: int = 20  # untimed steps that prime compile; model, optimizer, data then reset
    compile: bool = True
    compile_mode: str = "default"  # torch.compile's mode, one of COMPILE_MODES
    # Inductor's mix-order reduction fuses a row reduction (RMSNorm backward) with column sums (the per-channel
    # scales' grads); with the record's shapes its kernel ran 10x under bandwidth on an H100 (benchmarks.md)
    mix_order_reduction: bool = True
    # the block matrices' forward and input-gradient matmuls in FP8 e4m3 with row-wise scales while training
    # (pgolf.model.fp8); weight gradients stay bf16, and validation, calibration, export and scoring run plain
    fp8: bool = False
    ema_decay: float = 0.0  # 0 = off; else the EMA weights are the ones evaluated and exported
    swa_every: int = 0  # 0 = off; average every N steps once the LR scale is below swa_start_scale
    swa_start_scale: float = 0.2
    qat_start_scale: float = 0.0  # 0 = off; fake-quant on once the LR scale drops below this
    calib_reserve_s: float = 0.0  # seconds kept inside the wallclock for GPTQ Hessians; measured
    val_every: int = 0  # 0 = validate only at the end
    log_every: int = 50
    seed: int = 1337
    checkpoint_every_s: float = 0.0  # 0 = no periodic checkpoints
    device: str = "auto"  # auto | cpu | cuda
    min_lr: float = 0.0  # the warmdown's floor, a fraction of the peak LR (the frontier's MIN_LR, 0.1)
    # document-masked attention in training: each token reads only its own document (BOS-opened, cut at row
    # ends) through flex attention with a per-batch BlockMask (pgolf.model.doc_attention); eval stays dense
    doc_mask: bool = False


@dataclass
class QuantConfig:
    enabled: bool = True
    method: str = "gptq"  # gptq | rtn
    matrix_bits: int = 6  # attention and MLP matrices
    embed_bits: int = 8  # token embedding and other large tensors
    clip: str = "sdclip"  # sdclip | search | percentile | none
    sdclip_k: float = 12.85  # row clip = k * std(row), matrices (grid step k * std / qmax)
    fit_k: bool = False  # choose the matrices' k so that the artifact fills the cap (quant/fit.py)
    fit_k_min: float = 4.0  # the search's lowest k (below ~3 the clip cuts the tails)
    fit_margin: float = 0.004  # fraction of size_cap kept free for the size prediction's error (~0.3%)
    sdclip_k_embed: float = 20.0
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128
    act_order: bool = True
    calib_batches: int = 32  # training batches (per rank) for the Hessians (32 x 98k tokens: ~5 s on an H100)
    passthrough_numel: int = 65_536  # tensors this small are stored as fp16
    codec: str = "auto"  # auto | zlib | lzma | zstd | brotli (auto = smallest)
    size_cap: int = 16_000_000  # decimal bytes, code + artifact
    fit_to_budget: bool = True
    # Per-role SDClip sigmas (pgolf.quant.policy); 0 = quant.sdclip_k. With fit_k the fitted k keeps their ratios.
    sdclip_k_attn: float = 0.0
    sdclip_k_mlp: float = 0.0
    gate_bits: int = 0  # attention output gates as int rows (row-max scales, no GPTQ); 0 = fp16 passthrough
    # Per-tensor policy by name: "glob=spec[+spec]" items, later ones win; spec: fp16 rtn gptq matrix embed
    # lqer nolqer bits2..bits8 (pgolf.quant.policy).
    overrides: tuple = ()
    scale_floor: str = "tiny"  # tiny (1/(qmax*1024)) | inv_qmax (1/qmax): the smallest row scale
    clip_quantiles: str = "0.999,0.9995,0.9999,0.99999,1.0"  # quant.clip=pct_search's row-quantile candidates
    clip_select: str = "row"  # pct_search: per row by RTN MSE before GPTQ | per matrix by the GPTQ result's MSE
    lqer_top_k: int = 0  # LQER: low-rank correction of the quantization residual on the top-k tensors by |E|
    lqer_rank: int = 4
    lqer_a_bits: int = 2  # A (rows x rank): one scale for the whole factor
    lqer_b_bits: int = 4  # B (rank x cols): one scale per lqer_group consecutive values
    lqer_group: int = 64
    group_by: str = "bits"  # artifact sections: bits (one per width) | role (one per role, rows reordered)


@dataclass
class EvalConfig:
    seq_len: int = 0  # 0 = train.seq_len
    batch_seqs: int = 32
    val_tokens: int = 0  # score only the first N validation tokens (every pass, TTT too); 0 = the whole split
    compile: bool = True  # torch.compile the scoring forward (and TTT's step) on CUDA; pgolf.eval.scoring
    compile_scope: str = "model"  # model (one graph) | blocks (the blocks only, one graph per block structure)
    precompile: bool = False  # compile the passes' graphs before them, on random tokens (pgolf.eval.warmup)
    sliding_stride: int = 64  # 0 = no sliding-window pass
    ttt: bool = False  # score-first test-time training
    ttt_mode: str = "sgd"  # sgd (all weights) | lora
    ttt_chunk_tokens: int = 32_768
    ttt_epochs: int = 3
    ttt_lr: float = 0.002
    ttt_momentum: float = 0.9
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0
    ttt_lora_rank: int = 8
    ttt_time_limit_s: float = 0.0  # 0 = none; past it the remaining chunks are scored without adapting
    ttt_stride: int = 0  # stream TTT window stride; 0 = sliding_stride or seq_len (sliding_stride=0: TTT alone scores)
    doc_isolated: bool = False  # plain / sliding passes: document-masked attention, no context crosses a BOS
    # ttt_mode=doc_lora (pgolf.eval.ttt_doc): per-document LoRA, score-first on chunks, phased global SGD
    ttt_doc_chunk: int = 48  # predictions per chunk of a document
    ttt_doc_batch: int = 64  # documents adapted side by side (one adapter slot each)
    ttt_lora_alpha: float = 144.0  # adapter scale alpha / ttt_lora_rank
    ttt_lora_targets: str = "q,k,v,o,mlp,head"  # comma list of EVAL_LORA_TARGETS
    ttt_warm_a: bool = True  # keep each slot's A from its previous document (B and AdamW state reset)
    ttt_adam_beta2: float = 0.99  # the adapters' AdamW (beta1 0, eps 1e-10, lr ttt_lr)
    ttt_weight_decay: float = 0.5  # the adapters' decoupled weight decay
    ttt_phases: int = 3  # global SGD phases over the scored prefix; 0 = none
    ttt_prefix_frac: float = 0.05  # the prefix, a fraction of the documents in queue order (record: 2500 / 50000)
    ttt_global_lr: float = 0.001  # global SGD, cosine over its chunks
    ttt_global_momentum: float = 0.9
    ttt_global_chunk_tokens: int = 32_768  # tokens per global SGD step
    time_budget_s: float = 600.0


@dataclass
class RunConfig:
    recipe: str = ""
    name: str = ""  # run directory name; "" = recipe + timestamp
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Fields that name a run or where it goes; they do not change what is computed.
BOOKKEEPING_KEYS = ("name", "out_dir", "recipe")


def config_to_dict(cfg) -> dict:
    """The config as plain JSON values (list fields as lists, as they read back from a file)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in items})


def config_from_dict(d: dict, cls=RunConfig):
    """Build a config from a (possibly partial) dict; unknown keys raise ConfigError."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {cls.__name__}; valid: {sorted(known)}")
    defaults = cls()
    kwargs = {}
    for name, value in d.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = config_from_dict(value, type(default))
        else:
            kwargs[name] = coerce_value(f"{cls.__name__}.{name}", value, type(default))
    return cls(**kwargs)


def coerce_value(key: str, value, typ):
    """Convert a string or JSON value to the field's type, or raise ConfigError naming the key."""
    if typ is tuple:  # a list of strings: a JSON list, or one comma-separated string
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text.replace("_", ""))
        if typ is float:
            return float(text.replace("_", ""))
        if typ is str:
            return text
    except ValueError:
        pass
    raise ConfigError(f"{key}: cannot read {value!r} as {typ.__name__}")


def add_override_argument(parser, what: str = "config override") -> None:
    """The repeatable `--set section.field=value` option of every command that takes a config (args.overrides)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help=f"{what}, e.g. --set train.seed=42 (repeatable; unknown keys are errors)")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply "section.field=value" overrides in place and return cfg."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        target = cfg
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(target)]
            if part not in names:
                where = ".".join(parts[:i]) or "the run config"
                raise ConfigError(f"unknown key {key!r}: {part!r} is not in {where}; valid: {names}")
            if i < len(parts) - 1:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[:i + 1])} has no fields")
        current = getattr(target, parts[-1])
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"override {key!r} names a section; name one of its fields")
        setattr(target, parts[-1], coerce_value(key, value, type(current)))
    validate_config(cfg)
    return cfg


def config_hash(cfg: RunConfig) -> str:
    """A short stable hash of what the run computes (bookkeeping keys left out)."""
    d = config_to_dict(cfg)
    for k in BOOKKEEPING_KEYS:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# torch.compile's modes: "max-autotune*" tune GEMM / Triton templates (and may fuse epilogues) at a longer
# compile; "reduce-overhead" and "max-autotune" also capture CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
# What an evaluation's torch.compile covers (pgolf.eval.scoring): the whole scoring function, or the blocks only.
EVAL_COMPILE_SCOPES = ("model", "blocks")


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
    "train.device": ("auto", "cpu", "cuda"),
    "quant.method": ("gptq", "rtn"),
    "quant.clip": ("sdclip", "search", "percentile", "pct_search", "none"),
    "quant.scale_floor": ("tiny", "inv_qmax"),
    "quant.clip_select": ("row", "matrix"),
    "quant.group_by": ("bits", "role"),
    "quant.codec": ("auto", "zlib", "lzma", "zstd", "brotli"),
    "eval.ttt_mode": ("sgd", "lora", "doc_lora"),
    "eval.compile_scope": EVAL_COMPILE_SCOPES,
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
    "quant.calib_batches": RANGE_NON_NEGATIVE, "quant.passthrough_numel": RANGE_NON_NEGATIVE,
    "quant.size_cap": RANGE_AT_LEAST_ONE, "quant.sdclip_k_attn": RANGE_NON_NEGATIVE,
    "quant.sdclip_k_mlp": RANGE_NON_NEGATIVE, "quant.gate_bits": FieldRange(0, 8),
    "quant.lqer_top_k": RANGE_NON_NEGATIVE, "quant.lqer_rank": RANGE_AT_LEAST_ONE,
    "quant.lqer_a_bits": FieldRange(2, 8), "quant.lqer_b_bits": FieldRange(2, 8),
    "quant.lqer_group": RANGE_AT_LEAST_ONE,
    "eval.seq_len": RANGE_NON_NEGATIVE, "eval.batch_seqs": RANGE_AT_LEAST_ONE, "eval.val_tokens": RANGE_NON_NEGATIVE,
    "eval.sliding_stride": RANGE_NON_NEGATIVE, "eval.ttt_chunk_tokens": RANGE_AT_LEAST_ONE,
    "eval.ttt_epochs": RANGE_AT_LEAST_ONE, "eval.ttt_lr": RANGE_NON_NEGATIVE, "eval.ttt_momentum": RANGE_DECAY,
    "eval.ttt_batch_seqs": RANGE_AT_LEAST_ONE, "eval.ttt_grad_clip": RANGE_NON_NEGATIVE,
    "eval.ttt_lora_rank": RANGE_AT_LEAST_ONE, "eval.ttt_time_limit_s": RANGE_NON_NEGATIVE,
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
        (bool(lora_targets) and set(lora_targets) <= set(EVAL_LORA_TARGETS),
         f"eval.ttt_lora_targets={e.ttt_lora_targets!r} must be a comma list of {','.join(EVAL_LORA_TARGETS)}"),
    ]
