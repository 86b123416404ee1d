"""Reading a step's loss without waiting for the steps queued after it.

The timed loop issues step k+1 before it looks at step k: the host queues the next step's kernels while the
GPU still runs the previous ones, so the GPU does not idle while Python launches work (on one H100 the host
needs most of a `record` step to issue it). `LossReadback` copies a step's 0-dim loss into pinned host memory
on the GPU's stream and records an event right behind it; `value()` waits on that event only, not on the
work queued later. On the CPU the loss is already computed when it is returned, and value() just reads it.
"""

import math
from dataclasses import dataclass

import torch


class LossReadback:
    """A step's loss on its way to the host (see the module docstring)."""

    def __init__(self, loss: torch.Tensor):
        loss = loss.detach()
        self.event = None
        if loss.is_cuda:
            self.host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = loss

    def done(self) -> bool:
        """Whether the step that computed the loss has finished on the device (on the CPU it always has)."""
        return self.event is None or self.event.query()

    def value(self) -> float:
        """The loss as a float, once the step that computed it has finished on the device."""
        if self.event is not None:
            self.event.synchronize()
        return float(self.host.item())


@dataclass
class IssuedStep:
    """A step the host has issued and not looked at yet: its number, the tokens trained once it ends, the LR
    scale it ran with, its loss on the way, and the train clock when the host had issued it (`issued_s`).

    A step ends once the host has issued it and the device has run it. When the readback finds the device
    already done, the step ended at `issued_s` (on the CPU always: the step ran while it was issued), not
    when the host got round to looking, which may be a whole step later (see `end_time`)."""
    step: int
    train_tokens: int
    lr_scale: float
    loss: LossReadback
    issued_s: float = 0.0

    def end_time(self, clock, previous_end_s: float) -> tuple[float, float, bool]:
        """(loss, the train clock at the step's end, whether the loss is finite), waiting for the device if it
        still runs the step; never before `previous_end_s`, the end of the step before."""
        already_done = self.loss.done()
        value, finite = self.finite_loss()
        end_s = self.issued_s if already_done else clock()
        return value, max(end_s, previous_end_s), finite

    def finite_loss(self) -> tuple[float, bool]:
        value = self.loss.value()
        return value, math.isfinite(value)
