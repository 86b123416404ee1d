"""The live progress line of rank 0, and optional TensorBoard / Weights & Biases metric sinks."""

import sys

from pgolf.errors import UserError


class ProgressLine:
    """One terminal line rewritten with \\r when stdout is a TTY; plain lines every `every` steps otherwise."""

    def __init__(self, enabled: bool, every: int, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.every = max(1, every)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._dirty = False

    def update(self, step: int, loss: float, tok_s: float, ms_step: float, time_left_s: float | None) -> None:
        if not self.enabled or (not self.tty and step % self.every):
            return
        left = "-" if time_left_s is None else f"{max(time_left_s, 0.0):6.1f}s"
        text = f"step {step:6d}  loss {loss:.4f}  {tok_s / 1e3:8.1f}k tok/s  {ms_step:7.1f} ms/step  left {left}"
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self._dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A plain line that does not get overwritten."""
        if not self.enabled:
            return
        self.end()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False


def tensorboard_sink(log_dir):
    """A metrics sink writing scalars to TensorBoard; UserError when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    writer = SummaryWriter(str(log_dir))

    def sink(line: dict) -> None:
        step = line.get("step", 0)
        for key, value in line.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                writer.add_scalar(f"{line['kind']}/{key}", value, step)
        writer.flush()
    return sink


def wandb_sink(project: str, run_name: str, config: dict):
    """A metrics sink logging to Weights & Biases; UserError when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package (pip install wandb)") from None
    run = wandb.init(project=project, name=run_name, config=config)

    def sink(line: dict) -> None:
        values = {f"{line['kind']}/{k}": v for k, v in line.items()
                  if k not in ("kind", "step") and isinstance(v, (int, float))}
        run.log(values, step=line.get("step"))
    return sink
