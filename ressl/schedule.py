"""Every schedule of a run, each a pure function of the step: learning rate, EMA momentum, InfoNCE weight.

Pure functions, no scheduler state: a resumed run needs only its step, and a run resumed with a longer
schedule continues at the value the new schedule has at that step (the cosine re-spread over the new
total, as if the run had been planned that long).

- lr (ReSSL paper, Sec. 4): SGD at ``lr * batch / 256`` (the linear scaling rule of Goyal et al., 2017),
  a linear warm-up, then a cosine to 0 over the rest of the run.
- EMA momentum: constant (the paper) or BYOL's cosine from ``base`` to 1.
- InfoNCE weight (TPAMI warm-up): 1 for the first epochs, then a linear blend into the relation loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

__all__ = ["LR_REFERENCE_BATCH", "Schedule", "infonce_weight", "lr_factor", "momentum_at", "scaled_lr"]

# The paper states the learning rate per 256 images (linear scaling rule).
LR_REFERENCE_BATCH = 256


def scaled_lr(lr: float, batch_size: int) -> float:
    """The optimiser's peak learning rate: ``lr`` is per 256 images, ``batch_size`` the global batch."""
    return lr * batch_size / LR_REFERENCE_BATCH


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up from
    ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then cosine from 1 to 0 at ``total_steps``
    (and 0 past it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def momentum_at(step: int, total_steps: int, base: float, schedule: str) -> float:
    """EMA momentum at optimiser step ``step`` of ``total_steps``.

    ``constant`` returns ``base``; ``cosine`` rises from ``base`` at step 0 to 1 at the last step
    (BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``).
    """
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"momentum base must be in [0, 1], got {base}")
    if schedule == "constant":
        return base
    if schedule == "cosine":
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0 for the cosine momentum schedule, got {total_steps}")
        frac = min(max(step / total_steps, 0.0), 1.0)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0
    raise ValueError(f"momentum schedule must be 'constant' or 'cosine', got {schedule!r}")


def infonce_weight(epoch: float, warmup_epochs: int, blend_epochs: int) -> float:
    """Weight of InfoNCE against the relation loss at fractional ``epoch`` (TPAMI warm-up).

    1 for the first ``warmup_epochs``, then falls linearly to 0 over ``blend_epochs`` (a hard switch
    when that is 0), then stays 0.
    """
    if warmup_epochs < 0 or blend_epochs < 0:
        raise ValueError(f"warm-up and blend epochs must be >= 0, got {warmup_epochs} and {blend_epochs}")
    if epoch < warmup_epochs:
        return 1.0
    if epoch < warmup_epochs + blend_epochs:
        return 1.0 - (epoch - warmup_epochs) / blend_epochs
    return 0.0


@dataclass(frozen=True)
class Schedule:
    """The three schedules of one training run, read by the loop once per step.

    Attributes:
        peak_lr: optimiser lr after warm-up (already scaled by the global batch).
        warmup_steps, total_steps: lr warm-up length and run length, in optimiser steps.
        steps_per_epoch: optimiser steps in one epoch (the InfoNCE weight counts epochs).
        momentum, momentum_schedule: EMA base momentum and ``constant`` / ``cosine``.
        warmup_infonce_epochs, infonce_blend_epochs: the TPAMI InfoNCE warm-up and its blend.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int
    momentum: float
    momentum_schedule: str
    warmup_infonce_epochs: int
    infonce_blend_epochs: int

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int, total_steps: int) -> Schedule:
        """The schedules of ``cfg`` for a run of ``total_steps`` steps of ``steps_per_epoch`` an epoch."""
        return cls(peak_lr=scaled_lr(cfg.lr, cfg.batch_size), warmup_steps=cfg.warmup_epochs * steps_per_epoch,
                   total_steps=total_steps, steps_per_epoch=steps_per_epoch, momentum=cfg.momentum,
                   momentum_schedule=cfg.momentum_schedule, warmup_infonce_epochs=cfg.warmup_infonce_epochs,
                   infonce_blend_epochs=cfg.infonce_blend_epochs)

    def lr(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        return self.peak_lr * lr_factor(step, self.warmup_steps, self.total_steps)

    def ema_momentum(self, step: int) -> float:
        """EMA momentum of the teacher update after optimiser step ``step``."""
        return momentum_at(step, self.total_steps, self.momentum, self.momentum_schedule)

    def infonce(self, epoch: int, batch: int) -> float:
        """InfoNCE weight for batch ``batch`` of epoch ``epoch`` (both 0-based)."""
        return infonce_weight(epoch + batch / self.steps_per_epoch, self.warmup_infonce_epochs,
                              self.infonce_blend_epochs)
