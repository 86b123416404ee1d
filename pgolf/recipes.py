"""Named recipes: plain functions that return a RunConfig.

`baseline` is the challenge's naive baseline, `record` the stack of the FineWeb 1.1194 record (PR #549)
as it was run, `tiny` a CPU configuration for tests and the demo. `proxy` shrinks an 8-GPU recipe to the
one-GPU "h100-300s" protocol of shared/BENCHMARKS.md.
"""

from pgolf.config import ConfigError, RunConfig, validate_config


def recipe_baseline() -> RunConfig:
    """The naive baseline: 9L 512d, 8H/4KV, MLP 2x relu^2, seq 1024, batch 524,288, int8 + zlib."""
    cfg = RunConfig(recipe="baseline")
    cfg.quant.method = "rtn"
    cfg.quant.matrix_bits = 8
    cfg.quant.embed_bits = 8
    cfg.quant.clip = "percentile"
    cfg.quant.codec = "zlib"
    cfg.eval.sliding_stride = 0
    return cfg


def recipe_record() -> RunConfig:
    """The FineWeb 1.1194 record (LeakyReLU^2 + legal TTT + parallel Muon), hyperparameters as run."""
    cfg = RunConfig(recipe="record")
    m = cfg.model
    m.num_layers = 11
    m.mlp_mult = 3.0
    m.mlp_slope = 0.5
    m.xsa_last_n = 4
    m.rope_dims = 16
    m.ln_scale = True
    m.smear_gate = True
    m.bigram_buckets = 1536
    m.bigram_dim = 128
    m.ve_last_n = 2
    m.ve_dim = 128
    m.ortho_init = True
    m.residual_dtype = "bfloat16"  # as the records' scripts run the stream; x1.11 step speed on an H100
    m.fused_qk = True  # q/k norm + RoPE + gain as Triton kernels in training: x1.078 step speed on an H200
    o = cfg.optim
    o.matrix_lr = 0.025
    o.scalar_lr = 0.025
    o.tied_embed_lr = 0.035
    o.muon_momentum = 0.99
    o.muon_momentum_warmup_start = 0.92
    o.muon_momentum_warmup_steps = 1500
    o.muon_wd = 0.04
    o.adam_wd = 0.04
    o.grad_clip = 0.3
    t = cfg.train
    t.seq_len = 2048
    t.batch_tokens = 786_432
    t.warmdown_iters = 3500
    t.ema_decay = 0.997
    t.qat_start_scale = 0.15
    t.mix_order_reduction = False  # x1.04 step speed on an H100 (docs/benchmarks.md)
    t.calib_reserve_s = 7.0  # Hessians of 32 batches took 4.5 and 5.3 s on an H100 (docs/benchmarks.md)
    cfg.quant.method = "gptq"
    cfg.quant.clip = "sdclip"
    cfg.quant.fit_k = True
    cfg.eval.sliding_stride = 64
    cfg.eval.ttt = True
    cfg.eval.ttt_lr = 0.005  # wiki-sp1024 val: 1.10717 vs 0.002's 1.10732 (docs/benchmarks.md)
    # the eval's compiles in the untimed warm-up, before training; with them paid there, the whole model
    # compiled scores fastest: sliding + TTT 57.3 s against 66.1 s for block-wise on an H200 (docs/benchmarks.md)
    cfg.eval.precompile = True
    cfg.eval.compile_scope = "model"
    return cfg


def recipe_tiny() -> RunConfig:
    """A model that trains in seconds on a CPU: for tests and `pgolf demo`."""
    cfg = recipe_record()
    cfg.recipe = "tiny"
    m = cfg.model
    m.num_layers = 4
    m.model_dim = 64
    m.num_heads = 4
    m.num_kv_heads = 2
    m.rope_dims = 8
    m.xsa_last_n = 2
    m.ve_last_n = 1
    m.ve_dim = 16
    m.bigram_buckets = 256
    m.bigram_dim = 16
    m.residual_dtype = "float32"  # bfloat16 elementwise work is slow on a CPU
    t = cfg.train
    t.seq_len = 128
    t.batch_tokens = 4096
    t.wallclock_s = 0.0
    t.max_steps = 200
    t.warmdown_iters = 60
    t.compile = False
    t.compile_warmup_steps = 0
    t.calib_reserve_s = 0.0
    t.log_every = 20
    t.device = "cpu"
    cfg.quant.calib_batches = 4
    cfg.quant.passthrough_numel = 1024  # so the tiny matrices go through GPTQ as the real ones do
    cfg.eval.batch_seqs = 8
    cfg.eval.sliding_stride = 32
    cfg.eval.ttt_chunk_tokens = 2048
    cfg.eval.ttt_epochs = 1
    cfg.eval.ttt_batch_seqs = 8
    return cfg


RECIPES = {"baseline": recipe_baseline, "record": recipe_record, "tiny": recipe_tiny}


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {sorted(RECIPES)}")
    cfg = RECIPES[name]()
    validate_config(cfg)
    return cfg


def add_proxy_argument(parser) -> None:
    """The `--proxy SECONDS` option of the commands that build a recipe's config (train, bench, export)."""
    parser.add_argument("--proxy", type=float, metavar="SECONDS",
                        help="the one-GPU proxy of the 8-GPU recipe over SECONDS (BENCHMARKS.md h100-300s): "
                             "a GPU's share of the batch, the warmdown scaled to the wallclock")


def recipe_config(name: str, proxy_s: float | None = None) -> RunConfig:
    """A recipe's config, as its one-GPU proxy over proxy_s seconds when given; what commands start from
    before their own flags and --set overrides."""
    cfg = get_recipe(name)
    if proxy_s is not None:
        if not proxy_s > 0:
            raise ConfigError(f"--proxy {proxy_s}: must be positive seconds")
        apply_proxy(cfg, seconds=proxy_s)
    return cfg


def apply_proxy(cfg: RunConfig, seconds: float = 300.0, shrink: int = 8) -> RunConfig:
    """The one-GPU proxy of an 8-GPU recipe (BENCHMARKS.md "h100-300s").

    The global batch becomes what one GPU of the eight processes per step, with no gradient accumulation,
    and the warmdown keeps the same share of the run: half its step count for half the wallclock.
    """
    t = cfg.train
    if t.batch_tokens % (shrink * t.seq_len):
        raise ConfigError(f"train.batch_tokens={t.batch_tokens} does not split into {shrink} parts of whole sequences")
    t.batch_tokens //= shrink
    t.grad_accum = 1
    if t.wallclock_s:
        t.warmdown_iters = round(t.warmdown_iters * seconds / t.wallclock_s)
    t.wallclock_s = seconds
    validate_config(cfg)
    return cfg
