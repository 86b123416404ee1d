"""The generated tail of `train_gpt.py`: a `Hyperparameters` table with one environment variable per field of
the typed config tree (dataclasses.fields; the recipe's values as defaults), read and run by
pgolf/export/script_entry.py.

Env names: the challenge's conventional name where one exists (NUM_LAYERS, MATRIX_LR, ITERATIONS, ...),
else the upper-cased `SECTION_FIELD` (MODEL_XSA_LAST_N, QUANT_MATRIX_BITS, ...). Environment variables are
the export interface only; inside the package the config tree rejects unknown keys.
"""

import dataclasses

from pgolf.config import RunConfig
from pgolf.errors import UserError

# config key -> the env var the challenge's scripts use for it (records.md §1.2 and the later records).
CONVENTIONAL_ENV_NAMES = {
    "name": "RUN_ID",
    "out_dir": "OUT_DIR",
    "data.path": "DATA_PATH",
    "data.tokenizer": "TOKENIZER_PATH",
    "model.vocab_size": "VOCAB_SIZE",
    "model.num_layers": "NUM_LAYERS",
    "model.model_dim": "MODEL_DIM",
    "model.num_heads": "NUM_HEADS",
    "model.num_kv_heads": "NUM_KV_HEADS",
    "model.mlp_mult": "MLP_MULT",
    "model.rope_base": "ROPE_BASE",
    "model.rope_dims": "ROPE_DIMS",
    "model.qk_gain_init": "QK_GAIN_INIT",
    "model.logit_softcap": "LOGIT_SOFTCAP",
    "model.tie_embeddings": "TIE_EMBEDDINGS",
    "model.tied_embed_init_std": "TIED_EMBED_INIT_STD",
    "model.xsa_last_n": "XSA_LAST_N",
    "model.ln_scale": "LN_SCALE",
    "model.bigram_buckets": "BIGRAM_VOCAB_SIZE",
    "model.bigram_dim": "BIGRAM_DIM",
    "model.ve_dim": "VE_DIM",
    "optim.matrix_lr": "MATRIX_LR",
    "optim.scalar_lr": "SCALAR_LR",
    "optim.embed_lr": "EMBED_LR",
    "optim.tied_embed_lr": "TIED_EMBED_LR",
    "optim.head_lr": "HEAD_LR",
    "optim.muon_momentum": "MUON_MOMENTUM",
    "optim.muon_momentum_warmup_start": "MUON_MOMENTUM_WARMUP_START",
    "optim.muon_momentum_warmup_steps": "MUON_MOMENTUM_WARMUP_STEPS",
    "optim.muon_ns_steps": "MUON_BACKEND_STEPS",
    "optim.muon_wd": "MUON_WD",
    "optim.adam_beta1": "BETA1",
    "optim.adam_beta2": "BETA2",
    "optim.adam_eps": "ADAM_EPS",
    "optim.adam_wd": "ADAM_WD",
    "optim.grad_clip": "GRAD_CLIP_NORM",
    "train.seq_len": "TRAIN_SEQ_LEN",
    "train.batch_tokens": "TRAIN_BATCH_TOKENS",
    "train.wallclock_s": "MAX_WALLCLOCK_SECONDS",
    "train.max_steps": "ITERATIONS",
    "train.warmdown_iters": "WARMDOWN_ITERS",
    "train.warmdown_frac": "WARMDOWN_FRAC",
    "train.compile_warmup_steps": "WARMUP_STEPS",
    "train.calib_reserve_s": "GPTQ_RESERVE_SECONDS",
    "train.val_every": "VAL_LOSS_EVERY",
    "train.log_every": "TRAIN_LOG_EVERY",
    "train.seed": "SEED",
    "quant.block_size": "GPTQ_BLOCK_SIZE",
    "eval.sliding_stride": "EVAL_STRIDE",
    "eval.ttt": "TTT_ENABLED",
    "eval.ttt_lr": "TTT_LR",
    "eval.ttt_epochs": "TTT_EPOCHS",
    # the 2026 frontier record's names (shared/reference/frontier.md §4-5; its ADAM_WD is pgolf's scalar_wd)
    "optim.muon_row_normalize": "MUON_ROW_NORMALIZE",
    "optim.embed_wd": "EMBED_WD",
    "optim.scalar_wd": "SCALAR_WD",
    "train.min_lr": "MIN_LR",
    "model.fused_ce": "FUSED_CE_ENABLED",
}
# Top-level RunConfig fields that are not settings of the run.
FIXED_KEYS = ("recipe",)


def config_leaves(cfg, prefix: str = ""):
    """("section.field", value) for every leaf field of the config tree (scalars, tuples of str), in order."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from config_leaves(value, key + ".")
        elif key not in FIXED_KEYS:
            is_str_list = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
            if not (isinstance(value, (bool, int, float, str)) or is_str_list):
                raise UserError(f"config field {key} = {value!r}: the exported script reads only bool, int, "
                                f"float, str and comma-separated str-list fields from environment variables")
            yield key, value


def env_name_for(key: str) -> str:
    return CONVENTIONAL_ENV_NAMES.get(key) or key.replace(".", "_").upper()


def env_table(cfg: RunConfig) -> list[tuple[str, str, object]]:
    """(env var, config key, default) for every field; UserError if two fields would share an env var."""
    table, seen = [], {}
    for key, value in config_leaves(cfg):
        name = env_name_for(key)
        if name in seen:
            raise UserError(f"env var {name} would set both {seen[name]} and {key}")
        seen[name] = key
        table.append((name, key, value))
    return table


def env_prefixes(table) -> tuple[str, ...]:
    """Prefixes whose unknown env vars deserve a warning: each section's and each env name's first word."""
    words = {name.split("_")[0] for name, _, _ in table if "_" in name}
    words |= {key.split(".")[0].upper() for _, key, _ in table if "." in key}
    return tuple(sorted(w + "_" for w in words if len(w) >= 3))


def settings_section(cfg: RunConfig, left_out: list[tuple[str, str, tuple]]) -> str:
    """Python source of the script's tail: the Hyperparameters table of cfg (a ScriptSettings subclass,
    pgolf/export/script_entry.py) and the line that runs it. left_out: (module, mode, terms) of the modules
    the script lacks (pgolf.export.manifest.left_out_conditions)."""
    table = env_table(cfg)
    fields = "".join(f"        ({name!r}, {key!r}, {value!r}),\n" for name, key, value in table)
    missing = "".join(f"        {row!r},\n" for row in left_out)
    return (f"class Hyperparameters(ScriptSettings):\n"
            f"    RECIPE = {cfg.recipe!r}\n"
            f"    FIELDS = (  # (env var, config key, default)\n{fields}    )\n"
            f"    PREFIXES = {env_prefixes(table)!r}\n"
            f"    LEFT_OUT = (\n"
            f"{missing}    )\n\n\n"
            f"if __name__ == \"__main__\":\n"
            f"    sys.exit(script_main(Hyperparameters, __file__))\n")
