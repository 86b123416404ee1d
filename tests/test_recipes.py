"""The named recipes (the seed systems of issue 26 among them): each builds and validates, a shrunken copy of
each trains two steps through the real train path and is quantized and scored as configured, and
`pgolf recipes` lists them and shows one against `record` field by field."""

import json
import math

import pytest

from pgolf.cli import main
from pgolf.config import config_to_dict
from pgolf.config_rules import validate_config
from pgolf.recipe_commands import flat_recipe_config, recipe_differences
from pgolf.recipes import RECIPES, get_recipe
from pgolf.train.loop import train_run
from tests.conftest import TOKENIZER_1024, write_wiki_shards

SEED_RECIPES = {"pr493": 493, "pr535": 535, "pr1062": 1062, "pr1427": 1427, "pr1948": 1948}


@pytest.fixture(scope="module")
def wiki_data(tmp_path_factory):
    return write_wiki_shards(tmp_path_factory.mktemp("wiki"), 1_500, 60_000)


def shrunk(name: str, data, out):
    """The recipe at CPU scale, as `tiny` shrinks `record`: what the recipe switches on or off stays so."""
    cfg = get_recipe(name)
    m, t, q, e = cfg.model, cfg.train, cfg.quant, cfg.eval
    m.xsa_last_n = 4 if m.xsa_last_n == m.num_layers else min(m.xsa_last_n, 2)
    if m.recur_loops:  # layers 1..2 looped: virtual order 0 1 2 1 2 1 2 3, the lane block 3 the decoder's tail
        m.recur_first, m.recur_last = 1, 2
    if m.parallel_lanes_from >= 0:
        m.parallel_lanes_from = 3
    m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads = 4, 64, 4, 2
    m.vocab_size = 1024  # the sp1024 wiki shards (pr1948 trains on CaseOps SP8192: tests/test_frontier_recipe.py)
    m.rope_dims = min(m.rope_dims, 8)
    m.ve_last_n, m.ve_dim = min(m.ve_last_n, 1), 16
    if m.bigram_buckets:
        m.bigram_buckets, m.bigram_dim = 256, 16
    m.residual_dtype = "float32"
    t.seq_len, t.batch_tokens, t.grad_accum, t.max_steps, t.log_every = 64, 1024, 1, 2, 1
    t.wallclock_s, t.calib_reserve_s, t.compile, t.compile_warmup_steps, t.device = 0.0, 0.0, False, 0, "cpu"
    q.calib_batches = min(q.calib_batches, 1)
    q.passthrough_numel = min(q.passthrough_numel, 1024)  # so that the small matrices are quantized
    e.val_tokens, e.batch_seqs, e.precompile = 600, 8, False
    e.sliding_stride = min(e.sliding_stride, 32)
    e.ttt_chunk_tokens, e.ttt_epochs, e.ttt_batch_seqs = 256, 1, 4
    cfg.data.path, cfg.data.tokenizer = str(data), str(TOKENIZER_1024)
    cfg.out_dir, cfg.name = str(out), name
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_builds_and_validates(name):
    cfg = get_recipe(name)
    validate_config(cfg)
    assert cfg.recipe == name


@pytest.mark.shared
@pytest.mark.parametrize("name", ["baseline", *SEED_RECIPES])  # record and tiny train in tests/test_train_loop.py
def test_a_shrunken_copy_trains_two_steps_and_is_quantized_and_scored(name, wiki_data, tmp_path):
    cfg = shrunk(name, wiki_data, tmp_path)
    record = train_run(cfg)
    assert record["status"] == "ok" and record["train"]["steps"] == 2
    assert record["train"]["stop_reason"] == "max_steps"
    saved = json.loads((tmp_path / name / "config.json").read_text())
    assert saved["recipe"] == name and saved["quant"] == config_to_dict(cfg)["quant"]
    metrics = record["metrics"]
    assert math.isfinite(metrics["roundtrip_bpb"]) and 0 < record["bytes"]["total"] <= cfg.quant.size_cap
    assert (metrics.get("sliding_bpb") is not None) == (cfg.eval.sliding_stride > 0)
    assert (metrics.get("ttt_bpb") is not None) == cfg.eval.ttt


def test_seed_recipes_cite_their_pr_and_say_what_differs():
    for name, pr in SEED_RECIPES.items():
        doc = RECIPES[name].__doc__
        assert doc.splitlines()[0].startswith(f"PR #{pr}:"), name
        assert "Missing in pgolf:" in doc, name
    assert "SLOT" in RECIPES["pr1062"].__doc__  # left out on purpose: illegal
    text = {name: " ".join(RECIPES[name].__doc__.split()) for name in SEED_RECIPES}
    assert "after the 600 s timer" in text["pr535"] and "after the timer" in text["pr1427"]
    for name in ("pr1062", "pr535", "pr493"):  # pgolf scores each target once
        assert "repeated scoring of the last sliding windows" in text[name], name


def test_seed_recipes_carry_the_pr_settings():
    """A few settings per PR, from shared/reference/seed-systems.md, on the base recipe it names."""
    assert dict((key, (ref, value)) for key, ref, value in recipe_differences("pr1062")) == {
        "model.mlp_slope": (0.5, 0.9), "model.qk_gain_init": (1.5, 5.0), "model.xsa_last_n": (4, 11),
        "model.bigram_buckets": (1536, 2816), "model.bigram_dim": (128, 112), "model.rope_base": (10000.0, 22081.79),
        "train.qat_start_scale": (0.15, 0.0), "train.calib_reserve_s": (7.0, 10.0),
        "quant.clip": ("sdclip", "pct_search"),
        "quant.overrides": ([], ["tok_emb.weight=rtn"]), "quant.scale_floor": ("tiny", "inv_qmax"),
        "quant.clip_select": ("row", "matrix"), "eval.sliding_stride": (64, 0), "eval.ttt_stride": (0, 64),
        "quant.fit_k": (True, False), "quant.damp": (0.01, 0.02), "quant.calib_batches": (32, 8),
        "quant.codec": ("auto", "lzma"), "eval.ttt_lr": (0.005, 0.002), "eval.ttt_momentum": (0.9, 0.0),
        "data.sampler": ("sequential", "coprime"), "model.embed_param_dtype": ("float32", "bfloat16"),
        "model.bos_mask": (True, False), "model.aux_proj_init": ("pgolf", "ortho"),
        "optim.aux_proj_group": ("matrix", "scalar"), "optim.clip_scope": ("global", "local"),
        "optim.scalar_wd": (0.0, 0.04), "eval.ttt_mode": ("sgd", "muon"), "eval.ttt_freeze_blocks": (0, 2),
        "eval.ttt_freeze_scope": ("all", "vectors")}
    pr535, pr493 = get_recipe("pr535"), get_recipe("pr493")
    assert not pr535.eval.ttt and pr535.quant.codec == "zstd" and pr535.train.seed == 7
    assert (pr535.quant.act_order_direction, pr535.quant.gptq_update) == ("asc", "inverse")
    assert pr493.quant.method == "rtn" and pr493.quant.clip == "none" and pr493.train.batch_tokens == 524_288
    assert pr493.model.ve_last_n == 0 and not pr493.model.ln_scale and pr493.train.warmdown_iters == 4500
    for cfg in (pr535, pr493):  # the #414 lineage: bf16 tables, scalar WD, no BOS mask, scaled .proj init
        m = cfg.model
        assert (m.embed_param_dtype, m.bos_mask, m.aux_proj_init) == ("bfloat16", False, "ortho_scaled")
        assert cfg.optim.scalar_wd == 0.04 and cfg.data.sampler == "sequential"
    assert dict((key, (ref, value)) for key, ref, value in recipe_differences("pr1948", "frontier")) == {
        "model.mlp_slope": (0.5, 0.3), "model.embed_param_dtype": ("float32", "bfloat16"),
        "optim.clip_scope": ("global", "local"), "train.warmdown_frac": (0.85, 0.75),
        "train.calib_reserve_s": (7.0, 16.0), "train.seed": (1337, 1334), "quant.sdclip_k_embed": (14.0, 15.0),
        "quant.codec": ("auto", "brotli"), "quant.sdclip_k_mlp": (11.5, 12.0), "quant.fit_k": (True, False),
        "quant.lqer_top_k": (3, 1), "eval.ttt_lora_rank": (80, 96),
        "eval.ttt_lora_targets": ("q,k,v,o,mlp,head", "k,mlp,o"),
        "eval.ttt_adam_beta2": (0.99, 0.999), "eval.ttt_doc_batch": (64, 16), "eval.ttt_weight_decay": (0.5, 1.0)}
    assert dict((key, (ref, value)) for key, ref, value in recipe_differences("pr1427", "baseline")) == {
        "model.num_layers": (9, 11), "model.mlp_slope": (0.0, 0.75), "model.rope_dims": (0, 16),
        "model.xsa_last_n": (0, 4), "model.residual_dtype": ("float32", "bfloat16"),
        "model.embed_param_dtype": ("float32", "bfloat16"),
        "train.calib_reserve_s": (0.0, 3.0), "quant.method": ("rtn", "gptq"), "quant.matrix_bits": (8, 6),
        "quant.clip": ("percentile", "pct_search"), "quant.clip_select": ("row", "matrix"),
        "quant.overrides": ([], ["tok_emb.weight=rtn"]), "quant.scale_floor": ("tiny", "inv_qmax"),
        "quant.damp": (0.01, 0.02), "quant.calib_batches": (32, 1),
        "quant.codec": ("zlib", "lzma")}

def test_recipes_lists_every_recipe_with_its_provenance(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(RECIPES)
    for line, (name, fn) in zip(lines, RECIPES.items(), strict=True):
        assert line.endswith(fn.__doc__.strip().splitlines()[0]), name


def test_recipes_name_prints_the_config_and_the_differences_from_record(capsys):
    assert main(["recipes", "pr535"]) == 0
    out = capsys.readouterr().out
    config_part, diff_part = out.split("\ndifferences from record")
    for key, value in flat_recipe_config("pr535").items():
        assert f"  {key} = {json.dumps(value)}\n" in config_part + "\n", key
    rows = [line.split() for line in diff_part.splitlines()[1:] if line.strip()]
    assert rows[0] == ["key", "record", "pr535"]
    assert rows[1:] == [[key, json.dumps(ref), json.dumps(value)] for key, ref, value in recipe_differences("pr535")]
    assert ["eval.ttt", "true", "false"] in rows and ["model.bigram_buckets", "1536", "2048"] in rows
    assert main(["recipes", "record"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("differences from record (0):\n  none")


def test_recipes_unknown_name_is_one_line_listing_the_valid_ones(capsys):
    assert main(["recipes", "pr9999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pr9999" in err
    for name in RECIPES:
        assert name in err
