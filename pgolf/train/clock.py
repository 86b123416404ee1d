"""Wall-clock accounting per named phase, with CUDA synchronisation at every boundary."""

import contextlib
import time

from pgolf.dist import cuda_sync


class PhaseTimer:
    """`with timer.phase("train_loop"): ...` adds the phase's wall seconds to its total.

    `clock` (default time.perf_counter) and `sync` (default: CUDA synchronise) are injectable for tests.
    `elapsed(name)` includes the running part of an open phase, so a loop can read its own budget.
    """

    def __init__(self, clock=time.perf_counter, sync=cuda_sync):
        self.clock = clock
        self.sync = sync
        self.totals: dict[str, float] = {}
        self._open: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        self.start(name)
        try:
            yield self
        finally:
            self.stop(name)

    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"phase {name!r} is already running")
        self.sync()
        self._open[name] = self.clock()

    def stop(self, name: str) -> float:
        self.sync()
        seconds = self.clock() - self._open.pop(name)
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        return seconds

    def is_running(self, name: str) -> bool:
        return name in self._open

    @contextlib.contextmanager
    def paused(self, name: str):
        """Stop `name` (if running) for the block and restart it after: validation, checkpoints."""
        was_running = name in self._open
        if was_running:
            self.stop(name)
        try:
            yield self
        finally:
            if was_running:
                self.start(name)

    def elapsed(self, name: str) -> float:
        """Seconds accumulated in `name`, plus the open interval without a sync (cheap, for progress)."""
        total = self.totals.get(name, 0.0)
        if name in self._open:
            total += self.clock() - self._open[name]
        return total

    def add(self, name: str, seconds: float) -> None:
        """Credit seconds to a phase directly (e.g. train time restored from a checkpoint)."""
        self.totals[name] = self.totals.get(name, 0.0) + float(seconds)

    def receipt(self) -> dict[str, float]:
        return {name: round(self.elapsed(name), 6) for name in sorted(set(self.totals) | set(self._open))}
