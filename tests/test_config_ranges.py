"""validate_config: every numeric field inside its range, enum-like strings, and the relations between fields,
each failure one ConfigError line naming the key and the value (issue 27, item 6)."""

import dataclasses

import pytest

from pgolf.cli import main
from pgolf.config import ConfigError, RunConfig, apply_overrides
from pgolf.config_rules import FIELD_CHOICES, FIELD_RANGES, validate_config
from pgolf.recipes import RECIPES, apply_proxy, get_recipe


def numeric_keys(cfg: RunConfig) -> set[str]:
    keys = set()
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if dataclasses.is_dataclass(sub):
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    keys.add(f"{section.name}.{f.name}")
    return keys


def rejects(overrides: list[str], *expected: str) -> str:
    """The one-line ConfigError that overrides on `tiny` raise; each expected text must be in it."""
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_recipe("tiny"), overrides)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, (text, message)
    return message


def test_every_numeric_field_has_a_range_and_every_table_key_exists():
    assert set(FIELD_RANGES) == numeric_keys(RunConfig())
    cfg = RunConfig()
    for key in FIELD_CHOICES:
        section, name = key.split(".")
        assert isinstance(getattr(getattr(cfg, section), name), str), key


def test_the_issue_s_cases_are_one_line_errors_not_tracebacks():
    rejects(["train.seq_len=0"], "train.seq_len=0", ">= 1")
    rejects(["model.num_kv_heads=0"], "model.num_kv_heads=0", ">= 1")
    rejects(["train.max_steps=-5"], "train.max_steps=-5", ">= 1")


def test_the_cli_prints_the_range_error_as_one_line(capsys):
    assert main(["train", "--recipe", "tiny", "--set", "train.seq_len=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pgolf: error: train.seq_len=0 must be >= 1"


def outside(rng) -> list:
    """Values just outside a range (and NaN for floats)."""
    values = []
    if rng.low is not None:
        values.append(rng.low if rng.low_open else rng.low - 1)
    if rng.high is not None:
        values.append(rng.high if rng.high_open else rng.high + 1)
    return values


@pytest.mark.parametrize("key", sorted(FIELD_RANGES))
def test_each_range_rejects_values_outside_and_names_the_key(key):
    rng = FIELD_RANGES[key]
    cfg = get_recipe("tiny")
    section, name = key.split(".")
    typ = type(getattr(getattr(cfg, section), name))
    bad = [typ(v) for v in outside(rng) if typ(v) == v] + ([float("nan")] if typ is float else [])
    assert bad, key
    for value in bad:
        message = rejects([f"{key}={value}"], f"{key}=")
        assert rng.describe() in message


def test_fractions_and_slopes_are_in_unit_interval():
    rejects(["model.mlp_slope=1.5"], "model.mlp_slope=1.5", "in [0, 1]")
    rejects(["model.recur_start_frac=-0.1"], "model.recur_start_frac=-0.1")
    rejects(["train.warmdown_frac=1.2"], "train.warmdown_frac=1.2")
    rejects(["train.ema_decay=1.0"], "train.ema_decay=1.0", "in [0, 1)")
    cfg = apply_overrides(get_recipe("tiny"), ["model.mlp_slope=1.0", "train.warmdown_frac=0.0"])
    assert cfg.model.mlp_slope == 1.0


def test_relations_between_fields():
    rejects(["model.num_heads=3"], "model.model_dim=64", "model.num_heads=3")  # 64 % 3
    rejects(["model.num_kv_heads=3"], "model.num_heads=4", "model.num_kv_heads=3")
    rejects(["model.rope_dims=7"], "model.rope_dims=7", "even")
    rejects(["model.rope_dims=32"], "model.rope_dims=32", "head dim 16")
    rejects(["model.xsa_last_n=5"], "model.xsa_last_n=5", "num_layers=4")
    rejects(["model.ve_last_n=9"], "model.ve_last_n=9")
    rejects(["model.recur_loops=1", "model.recur_first=2", "model.recur_last=4"], "recur_last=4", "4 layers")
    rejects(["model.recur_loops=1", "model.recur_first=3", "model.recur_last=1"], "recur_first=3")
    rejects(["model.recur_loops=1"], "model.recur_first=-1")  # looping with no span
    rejects(["model.parallel_resid_from=4"], "model.parallel_resid_from=4")
    rejects(["train.seq_len=100"], "train.batch_tokens=4096", "train.seq_len=100")
    rejects(["train.grad_accum=64"], "train.grad_accum=64")  # 4096 / 128 = 32 sequences
    rejects(["train.wallclock_s=10", "train.calib_reserve_s=10"], "train.calib_reserve_s=10")
    rejects(["eval.sliding_stride=256"], "eval.sliding_stride=256", "128")
    rejects(["quant.clip=search", "quant.fit_k=true"], "quant.fit_k", "'search'")
    rejects(["model.bos_mask=false", "eval.doc_isolated=true"], "model.bos_mask=false", "BOS position")
    rejects(["model.bos_mask=false", "eval.ttt=true", "eval.ttt_mode=doc_lora"], "eval.ttt_mode=doc_lora")
    rejects(["eval.ttt_freeze_blocks=5"], "eval.ttt_freeze_blocks=5", "num_layers=4")
    rejects(["eval.ttt_mode=lora", "eval.ttt_freeze_blocks=1"], "eval.ttt_freeze_blocks", "'lora'")
    ok = apply_overrides(get_recipe("tiny"), ["model.recur_loops=1", "model.recur_first=1", "model.recur_last=2",
                                              "model.parallel_resid_from=3", "eval.seq_len=256",
                                              "eval.sliding_stride=256"])
    assert ok.model.recur_loops == 1 and ok.eval.sliding_stride == 256


def test_a_whole_head_rope_needs_an_even_head_dim():
    rejects(["model.model_dim=60", "model.num_heads=4", "model.num_kv_heads=2", "model.rope_dims=0"],
            "head", "15")


@pytest.mark.parametrize("key", sorted(FIELD_CHOICES))
def test_enum_like_strings_name_their_values(key):
    message = rejects([f"{key}=bogus"], f"{key}='bogus'", "|".join(FIELD_CHOICES[key]))
    assert message.endswith("|".join(FIELD_CHOICES[key]))


def test_every_recipe_and_its_proxy_validate():
    for name in RECIPES:
        cfg = get_recipe(name)
        validate_config(cfg)
        if cfg.train.batch_tokens % (8 * cfg.train.seq_len) == 0:
            apply_proxy(get_recipe(name), seconds=300)
    for name in ("baseline", "record"):
        apply_proxy(get_recipe(name), seconds=300)
