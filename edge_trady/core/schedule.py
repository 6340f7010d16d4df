"""Learning-rate schedule: linear warm-up, then cosine decay to 0 (METHOD.md), per step."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """``base_lr`` reached after ``warmup_steps`` (linear from ``base_lr / warmup_steps``), then
    cosine decay to 0 at ``total_steps``."""

    base_lr: float
    total_steps: int
    warmup_steps: int

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict:
        return asdict(self)


def default_warmup_epochs(epochs: int) -> int:
    """The paper's 5 warm-up epochs for long runs, scaled down (10 %) for short ones."""
    return min(5, epochs // 10)


def make_schedule(base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int | None) -> CosineSchedule:
    warmup = default_warmup_epochs(epochs) if warmup_epochs is None else warmup_epochs
    return CosineSchedule(base_lr, epochs * steps_per_epoch, warmup * steps_per_epoch)
