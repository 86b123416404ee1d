"""Training throughput of a config: ms/step, tokens/s and MFU of the same step the training loop runs.

The model, optimizers, compilation and step are train/loop.py's own (build_model, broadcast_parameters,
build_optimizers, torch.compile when train.compile, train_step). Warm-up steps run untimed (they carry the
compilation); then each timed step is bracketed by a device synchronize and perf_counter, as the loop's own
step clock does. With a recurrence span the looped passes are on (the steady state after
recur_start_frac) unless `recurrence` is False; QAT stays off (its fake quantizer runs either way).
"""

import math
import statistics
import time
from pathlib import Path

import torch

from pgolf.bench.flops import peak_bf16_flops, training_flops_per_token
from pgolf.bench.profile import OptimizerRange, category_rates, profile_steps
from pgolf.config import RunConfig
from pgolf.data.loader import TrainTokenStream
from pgolf.dist import DistEnv, all_reduce_max_many, cuda_sync
from pgolf.optim.builder import broadcast_parameters, build_optimizers
from pgolf.train.loop import (
    build_model,
    compile_for_training,
    micro_batch_seqs,
    seed_everything,
    train_step,
    uses_recurrence,
)


class RandomTokenStream:
    """TrainTokenStream's next_batch over uniformly random token ids (seeded per rank), for runs without data."""

    def __init__(self, vocab_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.vocab_size, self.world_size = vocab_size, world_size
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def next_batch(self, batch_tokens: int, seq_len: int, grad_accum: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch_tokens // (self.world_size * grad_accum) // seq_len
        chunk = torch.randint(0, self.vocab_size, (rows, seq_len + 1), generator=self.generator)
        return chunk[:, :-1], chunk[:, 1:]


def finite_or_none(value: torch.Tensor | None) -> float | None:
    """A 0-dim tensor as a float, None when absent or not finite (so that the JSON report stays strict)."""
    if value is None:
        return None
    number = float(value.item())
    return number if math.isfinite(number) else None


def bench_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def achieved_mfu(flops_per_s_per_device: float, device_name: str, peak_override: float | None) -> dict:
    """MFU against the device's bf16 dense peak (or the given one); mfu None with a note when unknown."""
    peak = peak_override or peak_bf16_flops(device_name)
    if peak is None:
        return {"peak_flops": None, "mfu": None,
                "mfu_note": f"no bf16 peak known for {device_name!r}; pass --peak-tflops to get MFU"}
    source = "--peak-tflops" if peak_override else f"bf16 dense peak of {device_name}"
    note = f"peak {peak / 1e12:g} TFLOP/s per device ({source})"
    return {"peak_flops": peak, "mfu": flops_per_s_per_device / peak, "mfu_note": note}


def bench_train(cfg: RunConfig, denv: DistEnv, steps: int, warmup: int, train_files: list[Path] | None = None,
                recurrence: bool = True, profile: int = 0,
                peak_flops: float | None = None) -> tuple[dict, dict | None, torch.nn.Module]:
    """Time `steps` training steps after `warmup` untimed ones; returns (result dict, profile dict or None,
    the model). profile > 0 profiles that many more steps afterwards (pgolf.bench.profile)."""
    t, device = cfg.train, denv.device
    seqs_per_micro = micro_batch_seqs(cfg, denv.world_size)
    recurrence = recurrence and uses_recurrence(cfg)
    seed_everything(t.seed)
    model = build_model(cfg, device)
    broadcast_parameters(model)
    if uses_recurrence(cfg):
        model.set_recurrence(recurrence)
    step_model = compile_for_training(model, cfg)
    opt = build_optimizers(model, cfg.optim, denv.rank, denv.world_size)
    if train_files:
        loader = TrainTokenStream(train_files, denv.rank, denv.world_size, vocab_size=cfg.model.vocab_size)
    else:
        loader = RandomTokenStream(cfg.model.vocab_size, denv.rank, denv.world_size, seed=t.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    warmup_start = time.perf_counter()
    for _ in range(warmup):
        train_step(step_model, opt, loader, cfg, device)
    cuda_sync()
    warmup_s = time.perf_counter() - warmup_start
    step_s, loss = [], None
    for _ in range(steps):
        start = time.perf_counter()
        loss = train_step(step_model, opt, loader, cfg, device)
        cuda_sync()
        step_s.append(time.perf_counter() - start)
    step_s = all_reduce_max_many(step_s)  # a step lasts as long as its slowest rank
    # The same number of steps again with one sync at the end, as the training loop runs them (the host
    # issues a step while the GPU still runs the one before): this is the figure tokens/s reports.
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(step_model, opt, loader, cfg, device)
    cuda_sync()
    pipelined_s = all_reduce_max_many([(time.perf_counter() - start) / steps])[0]

    tokens_per_s = t.batch_tokens / pipelined_s
    flops = training_flops_per_token(cfg.model, t.seq_len, recurrence=recurrence)
    flops_per_s_per_device = flops.total * tokens_per_s / denv.world_size
    name = bench_device_name(device)
    result = {
        "steps": steps, "warmup": warmup, "warmup_s": warmup_s, "world_size": denv.world_size,
        "batch_tokens": t.batch_tokens, "seq_len": t.seq_len, "grad_accum": t.grad_accum,
        "micro_batch_seqs": seqs_per_micro, "compile": t.compile, "recurrence": recurrence,
        "data": "train shards" if train_files else "random tokens",
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": [1000.0 * s for s in step_s], "ms_per_step": 1000.0 * pipelined_s,
        "ms_per_step_synced_mean": 1000.0 * statistics.fmean(step_s),
        "ms_per_step_p50": 1000.0 * statistics.median(step_s), "ms_per_step_min": 1000.0 * min(step_s),
        "tokens_per_s": tokens_per_s, "last_loss": finite_or_none(loss),
        "flops": flops.as_dict(), "flops_per_token": flops.total,
        "achieved_flops_per_s_per_device": flops_per_s_per_device,
        **achieved_mfu(flops_per_s_per_device, name, peak_flops),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    report = None
    if profile > 0:
        wrapped = OptimizerRange(opt)
        report = profile_steps(lambda: train_step(step_model, wrapped, loader, cfg, device), profile, device)
        report["tflops_by_category"] = category_rates(report, flops.matmul_flops, flops.attention_flops,
                                                      t.batch_tokens / denv.world_size)
    return result, report, model
