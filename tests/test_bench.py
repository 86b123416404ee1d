"""`pgolf bench`: the FLOP formula against a hand count and torch's FLOP counter, the CLI end to end on CPU
(random tokens and real shards), the profile's rows and categories, and one-line errors."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from pgolf.bench.flops import matmul_params_per_token, peak_bf16_flops, training_flops_per_token
from pgolf.bench.profile import (
    BENCH_OPTIMIZER_RANGE,
    BENCH_STEP_RANGE,
    category_rates,
    device_time_rows,
    format_profile,
    kernel_category,
)
from pgolf.bench.train_bench import achieved_mfu
from pgolf.cli import main
from pgolf.config import apply_overrides, config_hash
from pgolf.data.shards import write_shard
from pgolf.model.gpt import GPT
from pgolf.recipes import get_recipe

RECURRENCE = ["model.recur_first=1", "model.recur_last=2", "model.recur_loops=1"]


def strict_json(path) -> dict:
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---- the FLOP count

def test_flops_per_token_of_tiny_equals_a_hand_count():
    m = get_recipe("tiny").model  # 4 layers, d 64, 4 heads / 2 KV heads of 16, MLP 3x, vocab 1024, tied
    block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 192  # q, k, v, out; fc, proj
    head = 1024 * 64  # tied: the embedding matrix is also the head's
    bigram, value_embed = 16 * 64, 16 * 32
    n = 4 * block + head + bigram + value_embed
    assert n == 214_528 and matmul_params_per_token(m) == n
    count = training_flops_per_token(m, seq_len=128)
    assert count.attention_flops == 6 * 4 * 128 * 64  # 12 L T d_attn, halved for causal attention
    assert count.total == 6 * n + 6 * 4 * 128 * 64 == 1_483_776
    assert "6 x 214,528 + 6 x 4 x 128 x 64 = 1,483,776" in count.formula()

    cfg = apply_overrides(get_recipe("tiny"), RECURRENCE)  # layers 1..2 run twice: 6 virtual layers
    looped = training_flops_per_token(cfg.model, seq_len=128)
    assert looped.virtual_layers == 6 and looped.matmul_params == n + 2 * block
    assert training_flops_per_token(cfg.model, seq_len=128, recurrence=False).total == count.total


@pytest.mark.parametrize("overrides, recurrence", [([], False), (RECURRENCE, True),
                                                   (["model.tie_embeddings=false"], False)])
def test_flops_per_token_equal_torch_flop_counter_on_forward_and_backward(overrides, recurrence):
    """Exact agreement, no tolerance needed: FlopCounterMode counts only matrix products (mm, bmm), the terms
    of the formula; on the CPU the attention runs SDPA's math backend, which multiplies the full T x T score
    matrix and masks it afterwards, so the counter sees the causal=False count (12 L T d_attn), and the
    causal count is that with the attention term halved."""
    cfg = apply_overrides(get_recipe("tiny"), overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.set_recurrence(recurrence)
    batch, seq_len = 2, 64
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    full = training_flops_per_token(cfg.model, seq_len, recurrence=recurrence, causal=False)
    assert counter.get_total_flops() == full.total * batch * seq_len
    causal = training_flops_per_token(cfg.model, seq_len, recurrence=recurrence)
    assert causal.total == full.total - full.attention_flops // 2


def test_peak_flops_by_device_name_and_mfu_without_one():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("cpu") is None
    unknown = achieved_mfu(1e9, "cpu", None)
    assert unknown["mfu"] is None and "--peak-tflops" in unknown["mfu_note"]
    assert achieved_mfu(494.5e12, "NVIDIA H100 80GB HBM3", None)["mfu"] == pytest.approx(0.5)


# ---- the CLI end to end on CPU

def test_bench_cli_on_random_tokens_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    args = ["bench", "--recipe", "tiny", "--steps", "2", "--warmup", "1", "--eval-tokens", "1024",
            "--peak-tflops", "1", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "ms/step" in text and "tokens/s" in text and "1,483,776" in text and "MFU" in text
    report = strict_json(out)
    assert report["recipe"] == "tiny" and report["config_hash"] == config_hash(get_recipe("tiny"))
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    train = report["train"]
    assert train["steps"] == 2 and len(train["step_ms"]) == 2 and train["data"] == "random tokens"
    assert train["ms_per_step"] > 0 and train["ms_per_step_p50"] > 0 and train["tokens_per_s"] > 0
    assert train["tokens_per_s"] == pytest.approx(4096 / (train["ms_per_step"] / 1000))
    assert train["flops_per_token"] == 1_483_776
    assert train["mfu"] == pytest.approx(train["flops_per_token"] * train["tokens_per_s"] / 1e12)
    for kind in ("sliding", "ttt"):
        assert report["eval"][kind]["tokens"] == 1023 and report["eval"][kind]["tokens_per_s"] > 0
    assert report["eval"]["precompile_s"] == 0.0  # tiny (as record) precompiles; on a CPU nothing compiles
    assert report["profile"] is None


def test_bench_cli_on_shards_with_profile(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(0, 1024, 20_000).astype(np.uint16))
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, 1024, 3_000).astype(np.uint16))
    out = tmp_path / "bench.json"
    assert main(["bench", "--recipe", "tiny", "--data", str(tmp_path), "--steps", "1", "--warmup", "1",
                 "--eval-tokens", "0", "--profile", "--profile-steps", "2", "--json", str(out)]) == 0
    assert "profile: 2 steps" in capsys.readouterr().out
    report = strict_json(out)
    assert report["train"]["data"] == "train shards" and report["eval"] is None
    assert report["train"]["mfu"] is None and "cpu" in report["train"]["mfu_note"]
    profile = report["profile"]
    assert profile["kind"].startswith("cpu") and len(profile["rows"]) > 15  # every row kept, 15 printed
    assert "top 15" in format_profile(profile)
    categories = {c["category"]: c["pct_of_step"] for c in profile["categories"]}
    assert {"gemm", "attention", "optimizer"} <= set(categories)
    assert sum(categories.values()) == pytest.approx(profile["busy_pct"])
    assert any(r["name"] == "aten::mm" and r["category"] == "gemm" for r in profile["rows"])
    gemm_ms = next(c["ms_per_step"] for c in profile["categories"] if c["category"] == "gemm")
    want = report["train"]["flops"]["matmul_flops"] * report["train"]["batch_tokens"] / (gemm_ms / 1000) / 1e12
    assert profile["tflops_by_category"]["gemm"] == pytest.approx(want)
    assert "TFLOP/s" in format_profile(profile)


@pytest.mark.parametrize("extra, named", [
    (["--steps", "0"], "--steps 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--eval-tokens", "1"], "--eval-tokens 1"),
    (["--set", "train.bogus=1"], "train.bogus"),
    (["--data", "/nonexistent/pgolf-bench"], "/nonexistent/pgolf-bench"),
])
def test_bad_values_are_one_line_errors(extra, named, capsys):
    assert main(["bench", "--recipe", "tiny", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgolf: error:") and "\n" not in err and named in err


# ---- the profile's categories

def test_kernel_categories_of_typical_kernel_names():
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "gemm",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128": "attention",
        "triton_poi_fused__to_copy_add_mul_rms_norm_0": "elementwise+reduction (triton)",
        "triton_red_fused__log_softmax_tanh_1": "elementwise+reduction (triton)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": (
            "elementwise+reduction (eager)"),
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
        "Memcpy HtoD (Pageable -> Device)": "memcpy",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*)": "attention",
        "qk_norm_rope_bwd_kernel": "elementwise+reduction (pgolf)",
        "some_custom_kernel": "other",
    }
    for name, category in cases.items():
        assert kernel_category(name) == category, name
    in_optimizer = ["aten::mm", BENCH_OPTIMIZER_RANGE, BENCH_STEP_RANGE]
    assert kernel_category("sm90_xmma_gemm_bf16", in_optimizer) == "optimizer"
    assert kernel_category("ncclDevKernel_ReduceScatter_Sum_bf16", in_optimizer) == "communication"
    assert kernel_category("void at::native::direct_copy_kernel_cuda",
                           ["aten::copy_", "aten::repeat_interleave", "aten::scaled_dot_product_attention"]) == \
        "attention"


def test_category_rates_at_the_analytic_terms():
    """The H200 profile of `record` (docs/benchmarks.md, ninth session): 23.38 ms of gemm for 6 N = 6 x
    26,574,848 FLOPs a token over 98,304 tokens is 670 TFLOP/s; a category the profile lacks is left out."""
    report = {"categories": [{"category": "gemm", "ms_per_step": 23.38},
                             {"category": "elementwise+reduction (triton)", "ms_per_step": 26.5}]}
    rates = category_rates(report, 6 * 26_574_848, 6 * 11 * 2048 * 512, 98_304)
    assert rates == {"gemm": pytest.approx(670.4, abs=0.1)}


def test_device_rows_follow_the_launching_operator():
    def host(id_, name, parent=None):
        return SimpleNamespace(id=id_, name=name, cpu_parent=parent, device_type=DeviceType.CPU, is_async=False)

    def kernel(name, launcher_id, us, annotation=False, start=0.0):
        return SimpleNamespace(name=name, linked_correlation_id=launcher_id, device_type=DeviceType.CUDA,
                               is_user_annotation=annotation, is_async=False,
                               time_range=SimpleNamespace(elapsed_us=lambda: us, start=start, end=start + us))

    step = host(1, BENCH_STEP_RANGE)
    opt = host(2, BENCH_OPTIMIZER_RANGE, step)
    events = [step, opt, host(3, "aten::mm", opt), host(4, "aten::mm", step),
              kernel("sm90_xmma_gemm", 3, 5.0), kernel("sm90_xmma_gemm", 4, 7.0),
              kernel(BENCH_STEP_RANGE, 0, 100.0, annotation=True), kernel("triton_poi_fused_0", 99, 1.0)]
    assert device_time_rows(events) == [("sm90_xmma_gemm", "optimizer", 5.0), ("sm90_xmma_gemm", "gemm", 7.0),
                                        ("triton_poi_fused_0", "elementwise+reduction (triton)", 1.0)]


def test_device_rows_inside_the_optimizer_span_count_as_optimizer_without_a_link():
    def kernel(name, us, start, annotation=False):
        return SimpleNamespace(name=name, linked_correlation_id=-1, device_type=DeviceType.CUDA,
                               is_user_annotation=annotation, is_async=False,
                               time_range=SimpleNamespace(elapsed_us=lambda: us, start=start, end=start + us))

    events = [kernel(BENCH_OPTIMIZER_RANGE, 50.0, 100.0, annotation=True),
              kernel("sm90_xmma_gemm", 5.0, 90.0), kernel("sm90_xmma_gemm", 5.0, 120.0),
              kernel("ncclDevKernel_AllGather", 5.0, 130.0), kernel("triton_poi_fused_0", 1.0, 150.0)]
    assert [category for _, category, _ in device_time_rows(events)] == [
        "gemm", "optimizer", "communication", "elementwise+reduction (triton)"]
