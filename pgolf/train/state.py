"""What a run trains and what moves while it does: the Trainer (model, optimizer, data, averagers), the
TrainState of the timed loop, and their checkpoint (save on every rank, restore on resume)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.config import RunConfig
from pgolf.dist import DistEnv, barrier
from pgolf.errors import UserError
from pgolf.train.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    mark_checkpoint_complete,
    model_tensors,
    restore_rng_state,
    save_checkpoint,
)
from pgolf.train.qat import set_qat_from_config


@dataclass
class TrainState:
    """What moves during the timed loop (and is saved in checkpoints)."""
    step: int = 0
    train_tokens: int = 0
    elapsed_s: float = 0.0  # timed training seconds, all-reduced MAX over ranks
    last_checkpoint_s: float = 0.0
    recurrence_on: bool = False
    qat_on: bool = False
    qat_clip_k: float = 0.0  # the SDClip k QAT trains against (set when it switches on)
    stop_reason: str = ""
    last_loss: float = float("nan")
    step_s_avg: float = 0.0  # running mean of the step time: the loop stops before a step would overrun


@dataclass
class Trainer:
    """The model (step_model: what the training steps call, compiled or the model itself), its optimizers,
    the training data stream and the weight averagers (None when off)."""
    model: torch.nn.Module
    step_model: object
    opt: object
    loader: object
    n_params: int
    ema: object = None
    swa: object = None


def uses_recurrence(cfg: RunConfig) -> bool:
    return cfg.model.recur_loops > 0


def checkpoint_now(run_dir, state: TrainState, parts: Trainer, denv: DistEnv) -> None:
    """Every rank saves its checkpoint file; rank 0 marks the folder complete once all are in place."""
    averagers = {}
    for averager in (parts.ema, parts.swa):
        if averager is not None:
            averagers.update(averager.state_tensors())
    scalars = {"step": state.step, "train_tokens": state.train_tokens, "elapsed_s": state.elapsed_s,
               "recurrence_on": state.recurrence_on, "qat_on": state.qat_on, "qat_clip_k": state.qat_clip_k}
    folder = save_checkpoint(run_dir, state.step, denv.rank, parts.model, parts.opt.state_dict(),
                             parts.loader.state_dict(), averagers, scalars)
    barrier()
    if denv.is_main:
        mark_checkpoint_complete(folder, denv.world_size)
    barrier()


def restore_checkpoint(run_dir, state: TrainState, parts: Trainer, cfg: RunConfig, denv: DistEnv) -> Path:
    """The latest complete checkpoint of run_dir into parts and state (UserError without one)."""
    folder = find_latest_checkpoint(run_dir)
    if folder is None:
        raise UserError(f"--resume {run_dir}: no complete checkpoint in {Path(run_dir) / 'checkpoint'}")
    tensors, meta = load_checkpoint(folder, denv.rank, denv.world_size)
    parts.model.load_state_dict(model_tensors(tensors), strict=False)
    parts.opt.load_state_dict(meta["optimizer"])
    parts.loader.load_state_dict(meta["loader"])
    for averager in (parts.ema, parts.swa):
        if averager is not None:
            averager.load_state_tensors(tensors)
    s = meta["scalars"]
    state.step, state.train_tokens = int(s["step"]), int(s["train_tokens"])
    state.elapsed_s = state.last_checkpoint_s = float(s["elapsed_s"])
    state.recurrence_on, state.qat_on = bool(s["recurrence_on"]), bool(s["qat_on"])
    state.qat_clip_k = float(s.get("qat_clip_k", 0.0))
    if uses_recurrence(cfg):
        parts.model.set_recurrence(state.recurrence_on)
    set_qat_from_config(parts.model, state.qat_on, cfg.quant, state.qat_clip_k or None)
    restore_rng_state(meta["rng"])
    return folder
