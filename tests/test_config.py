import pytest

from pgolf.config import ConfigError, apply_overrides, config_from_dict, config_hash, config_to_dict
from pgolf.recipes import RECIPES, apply_proxy, get_recipe, recipe_config


def test_override_sets_typed_value():
    cfg = apply_overrides(get_recipe("record"), ["model.mlp_slope=0.3", "train.compile=false", "train.seed=7"])
    assert cfg.model.mlp_slope == 0.3 and cfg.train.compile is False and cfg.train.seed == 7


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match="mlp_slope"):
        apply_overrides(get_recipe("record"), ["model.mlp_slop=0.3"])
    with pytest.raises(ConfigError, match="valid"):
        apply_overrides(get_recipe("record"), ["modle.mlp_slope=0.3"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="train.seed"):
        apply_overrides(get_recipe("tiny"), ["train.seed=abc"])
    with pytest.raises(ConfigError, match="mlp_slope"):
        apply_overrides(get_recipe("tiny"), ["model.mlp_slope=1.5"])


def test_dict_roundtrip_and_unknown_keys():
    for name in RECIPES:
        cfg = get_recipe(name)
        assert config_from_dict(config_to_dict(cfg)) == cfg
    d = config_to_dict(get_recipe("tiny"))
    d["model"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        config_from_dict(d)


def test_hash_ignores_bookkeeping_but_not_settings():
    a, b = get_recipe("record"), get_recipe("record")
    b.name = "other"
    assert config_hash(a) == config_hash(b)
    b.model.mlp_slope = 0.7
    assert config_hash(a) != config_hash(b)


def test_proxy_shrinks_batch_and_warmdown():
    cfg = apply_proxy(get_recipe("record"), seconds=300)
    assert cfg.train.batch_tokens == 98_304 and cfg.train.warmdown_iters == 1750 and cfg.train.wallclock_s == 300
    base = apply_proxy(get_recipe("baseline"), seconds=300)
    assert base.train.batch_tokens == 65_536 and base.train.warmdown_iters == 600


def test_eval_val_tokens_is_checked():
    cfg = apply_overrides(get_recipe("tiny"), ["eval.val_tokens=250_000"])
    assert cfg.eval.val_tokens == 250_000 and get_recipe("record").eval.val_tokens == 0  # 0 = the whole split
    for bad in ("-5", "1"):
        with pytest.raises(ConfigError, match="eval.val_tokens"):
            apply_overrides(get_recipe("tiny"), [f"eval.val_tokens={bad}"])


def test_recipe_config_applies_the_proxy_and_refuses_a_non_positive_one():
    assert recipe_config("record", 300) == apply_proxy(get_recipe("record"), seconds=300)
    assert recipe_config("record") == get_recipe("record")
    for bad in (0.0, -5.0):
        with pytest.raises(ConfigError, match="--proxy"):
            recipe_config("record", bad)
