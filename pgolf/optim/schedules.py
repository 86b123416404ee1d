"""Learning-rate and Muon-momentum schedules: pure functions of the training progress.

There is no LR warm-up. The LR scale is 1 until the warmdown, then falls linearly to 0:

- with a wallclock cap (train.wallclock_s > 0), the budget is wallclock_s - calib_reserve_s (training stops
  early to leave the GPTQ calibration reserve). The warmdown covers the last warmdown_frac of the budget
  when warmdown_frac > 0, else the last warmdown_iters steps at the average step time so far
  (elapsed_s / step), as the challenge baseline does; the scale reaches 0 at the end of the budget.
- without a cap, the warmdown covers the last warmdown_iters of max_steps.

train.min_lr > 0 floors the scale there (the frontier record's MIN_LR): max(scale, min_lr), so the warmdown
stops at min_lr x the peak LR and stays there to the end.
"""

from pgolf.config import OptimConfig, TrainConfig
from pgolf.errors import UserError


def lr_scale(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """LR multiplier for the step about to run; step = optimizer steps done, elapsed_s = timed training
    seconds spent on them. At least train.min_lr."""
    if not 0.0 <= cfg.min_lr <= 1.0:
        raise UserError(f"train.min_lr={cfg.min_lr} must be in [0, 1] (a fraction of the peak LR)")
    return max(cfg.min_lr, warmdown_scale(step, elapsed_s, cfg))


def warmdown_scale(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """The LR multiplier without the floor: 1, then linear to 0 over the warmdown."""
    if cfg.wallclock_s <= 0:
        if cfg.warmdown_iters <= 0:
            return 1.0
        remaining_steps = cfg.max_steps - step
        return min(1.0, max(0.0, remaining_steps / cfg.warmdown_iters))
    budget_s = cfg.wallclock_s - cfg.calib_reserve_s
    if budget_s <= 0:
        raise UserError(f"train.calib_reserve_s={cfg.calib_reserve_s} leaves no training time inside "
                        f"train.wallclock_s={cfg.wallclock_s}")
    remaining_s = max(0.0, budget_s - elapsed_s)
    if cfg.warmdown_frac > 0:
        warmdown_s = cfg.warmdown_frac * budget_s
    else:
        warmdown_s = cfg.warmdown_iters * (elapsed_s / max(step, 1))
    if remaining_s >= warmdown_s:
        return 1.0 if remaining_s > 0 else 0.0
    return remaining_s / warmdown_s


def muon_momentum_at(step: int, cfg: OptimConfig) -> float:
    """Linear from muon_momentum_warmup_start to muon_momentum over muon_momentum_warmup_steps."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(1.0, max(0.0, step / cfg.muon_momentum_warmup_steps))
    return (1.0 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
