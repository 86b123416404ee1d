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
    # model: the whole step in one graph (a new one per loop state); blocks: each block structure compiled once
    # and reused by every layer and loop state, the embedding, skips and head eager (a shorter warm-up)
    compile_scope: str = "model"
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
    act_order_direction: str = "desc"  # act_order's column order by diag(H): desc (standard) | asc (PR #535)
    gptq_update: str = "cholesky"  # error feedback: cholesky (U of H^-1, standard) | inverse (rows of H^-1: #535)
    calib_batches: int = 32  # training batches (per rank) for the Hessians (32 x 98k tokens: ~5 s on an H100)
    calib_source: str = "train"  # train (fresh training batches) | self (sampled from the model: PR #1427)
    calib_seqs: int = 8  # calib_source=self: sequences of train.seq_len per batch (calib_batches batches per rank)
    calib_temperature: float = 0.8  # calib_source=self: the sampling temperature
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
    ttt_mode: str = "sgd"  # sgd (all weights) | muon (all weights, Newton-Schulz update: PR #1062) | lora | doc_lora
    ttt_chunk_tokens: int = 32_768
    ttt_epochs: int = 3
    ttt_lr: float = 0.002
    ttt_momentum: float = 0.9
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0
    ttt_lora_rank: int = 8
    ttt_ns_steps: int = 5  # ttt_mode=muon: Newton-Schulz iterations of each matrix's update
    ttt_freeze_blocks: int = 0  # ttt_mode=sgd|muon: blocks.0 .. blocks.N-1 are not adapted
    ttt_freeze_scope: str = "all"  # what of those blocks is frozen: all | vectors (their <2-D parameters, as #1062)
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
    ttt_doc_compile: bool = False  # torch.compile the chunk step (dynamic shapes; the eager step is the reference)
    # the context a chunk reads: window (its window of seq_len recomputed through the current adapters, the
    # record's) | cache (the earlier chunks' keys and values as computed then, pgolf.model.kv_cache: no recompute)
    ttt_doc_context: str = "window"
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
    from pgolf.config_rules import validate_config

    validate_config(cfg)
    return cfg


def config_hash(cfg: RunConfig) -> str:
    """A short stable hash of what the run computes (bookkeeping keys left out)."""
    d = config_to_dict(cfg)
    for k in BOOKKEEPING_KEYS:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
