"""Steps per second of a training run, as its step events and the panel's ETA show it.

A window of about WINDOW_SECONDS of steps: long enough to smooth one slow step, short enough to follow a change
(a resume with another batch size). Time spent waiting on purpose (paused, or saving a checkpoint someone asked
for) is left out; demos, validation and the regular checkpoints stay in, since every run pays for them. The clock is
monotonic (a wall clock set back would make the rate huge or negative) and injectable, so tests need no sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

WINDOW_SECONDS = 5.0


class StepRate:
    """rate = steps in the window / its seconds, the window restarting every WINDOW_SECONDS."""

    def __init__(self, step: int, clock: Callable[[], float] | None = None):
        self.clock = clock or time.monotonic
        self.start_time, self.start_step = self.clock(), step

    @contextmanager
    def left_out(self) -> Iterator[None]:
        """Time spent inside is not training (a pause): the window's start moves forward by it."""
        began = self.clock()
        try:
            yield
        finally:
            self.start_time += max(0.0, self.clock() - began)

    def after_step(self, step: int) -> float:
        """Steps per second up to `step`, just trained."""
        now = self.clock()
        rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
        if now - self.start_time > WINDOW_SECONDS:
            self.start_time, self.start_step = now, step
        return rate


__all__ = ["StepRate", "WINDOW_SECONDS"]
