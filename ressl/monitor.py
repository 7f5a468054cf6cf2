"""Collapse monitor: says when the relation loss is stuck and when a run ends with collapsed embeddings.

The relation loss compares the student's and the teacher's similarity distributions over the queue.
While the teacher's keys are nearly identical (a random network, or embeddings that collapsed onto one
direction), the teacher's distribution is uniform and the loss sits at log K, its value for a uniform
target, with no signal to learn from (ReSSL, NeurIPS 2021, sec. 3; the TPAMI version starts with an
InfoNCE warm-up for this reason). The state shows in two logged numbers: ``loss_rel`` near log K and
``key_std`` (the per-dimension std of the unit teacher keys, about 1/sqrt(D) when they are spread over
D dimensions) near 0.

The monitor reads only the values the training loop already logs every ``log_every`` steps, so it adds
no host-device synchronisation to a step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["COLLAPSED_FRACTION", "LOSS_TOLERANCE", "SPREAD_FRACTION", "STRETCH_FRACTION", "CollapseMonitor"]

# Fractions of the spread value 1/sqrt(D) of key_std. Measured on the demo (D=128): its keys sit at 0.56 of
# it before training and at 0.69-0.9 after the InfoNCE warm-up; with the relation loss alone at 0.14-0.23
# on the plateau; 24 images trained for 24 steps end near 0.18 (their keys narrowing, the kNN still fine);
# an lr of 1e6 drives them to 0.01 within 6 steps.
# Below SPREAD_FRACTION, together with the relation loss at log K, a run is on the plateau (warned once).
SPREAD_FRACTION = 0.25
# Below COLLAPSED_FRACTION at the end, the keys are nearly identical whatever the loss: the run ended collapsed.
COLLAPSED_FRACTION = 0.1
# The relation loss counts as "at log K" within this relative distance of it.
LOSS_TOLERANCE = 0.01
# A plateau is reported once it has lasted this fraction of the schedule (and at least two log intervals).
STRETCH_FRACTION = 0.1


@dataclass
class CollapseMonitor:
    """Watches logged ``(loss_rel, key_std)`` rows; warns once about a plateau, and judges the end state.

    Args:
        queue_size: K; the relation loss of a uniform teacher target is log K.
        proj_dim: D, the key dimension; spread keys have ``key_std`` about 1/sqrt(D).
        total_steps: the schedule length (a plateau must last ``STRETCH_FRACTION`` of it).
        log_every: steps between logged rows.
        warmup_infonce_epochs: the configured TPAMI warm-up, for the advice.
    """

    queue_size: int
    proj_dim: int
    total_steps: int
    log_every: int
    warmup_infonce_epochs: int = 0
    plateau_start: int | None = None  # first logged step of the current plateau
    plateau: dict[str, Any] | None = field(default=None)  # the reported plateau: steps and values
    last_key_std: float | None = None
    last_step: int | None = None

    @property
    def log_k(self) -> float:
        return math.log(self.queue_size)

    @property
    def spread(self) -> float:
        return 1.0 / math.sqrt(self.proj_dim)

    @property
    def stretch(self) -> int:
        return max(2 * self.log_every, math.ceil(STRETCH_FRACTION * self.total_steps))

    def keys_collapsed(self, key_std: float, fraction: float = SPREAD_FRACTION) -> bool:
        return key_std < fraction * self.spread

    def observe(self, step: int, loss_rel: float, key_std: float, infonce_weight: float = 0.0,
                relation_trained: bool = True) -> str | None:
        """Feed one logged row. Returns the warning the first time a plateau has lasted a stretch, else None.

        Rows of the InfoNCE warm-up (``infonce_weight > 0``) and runs that do not train the relation loss
        (``relation_trained`` False) never count towards a plateau; the end state is judged on every row.
        """
        self.last_key_std, self.last_step = key_std, step
        stuck = (relation_trained and infonce_weight == 0.0 and self.keys_collapsed(key_std)
                 and abs(loss_rel - self.log_k) <= LOSS_TOLERANCE * self.log_k)
        if not stuck:
            if self.plateau is not None and self.plateau.get("left_at") is None:
                self.plateau["left_at"] = step
            self.plateau_start = None
            return None
        if self.plateau_start is None:
            self.plateau_start = step
        if self.plateau is not None:
            if self.plateau.get("left_at") is None:
                self.plateau["to_step"] = step
            return None
        if step - self.plateau_start < self.stretch:
            return None
        self.plateau = {"from_step": self.plateau_start, "to_step": step, "left_at": None,
                        "loss_rel": loss_rel, "key_std": key_std}
        return self.plateau_message(step, loss_rel, key_std)

    def plateau_message(self, step: int, loss_rel: float, key_std: float) -> str:
        return (f"collapse: since step {self.plateau_start} (now {step} of {self.total_steps}) the relation loss "
                f"stays at log K = {self.log_k:.3f} (now {loss_rel:.3f}) and key_std at {key_std:.4f}, far below "
                f"its spread value 1/sqrt({self.proj_dim}) = {self.spread:.3f}. The teacher's keys are still "
                f"nearly identical, so its relation over the queue is uniform and gives the student no signal "
                f"(likely with a small queue, K={self.queue_size}, or a short schedule). Remedy: "
                f"{self.remedy()}")

    def remedy(self) -> str:
        if self.warmup_infonce_epochs:
            return (f"a longer TPAMI InfoNCE warm-up than warmup_infonce_epochs={self.warmup_infonce_epochs} "
                    f"(e.g. warmup_infonce_epochs={2 * self.warmup_infonce_epochs}), or a lower lr")
        return ("the TPAMI InfoNCE warm-up, e.g. warmup_infonce_epochs=4 infonce_blend_epochs=2 (as "
                "configs/demo.yaml), which spreads the keys before the relation loss takes over")

    def verdict(self) -> dict[str, Any]:
        """The record for summary.json: whether the run ended collapsed (its last key_std below
        ``COLLAPSED_FRACTION`` of the spread value), that key_std, and the plateau if one was reported."""
        collapsed = self.last_key_std is not None and self.keys_collapsed(self.last_key_std, COLLAPSED_FRACTION)
        out: dict[str, Any] = {
            "collapsed": collapsed, "key_std": self.last_key_std, "spread": self.spread,
            "threshold": COLLAPSED_FRACTION * self.spread, "plateau": self.plateau, "message": None,
        }
        if collapsed:
            if self.plateau is not None:
                cause = (f"the relation loss sat at log K from step {self.plateau['from_step']} (see the warning "
                         f"above). Remedy: {self.remedy()}")
            else:
                cause = ("likely an lr too high for this batch (key_std then falls within a few steps: see "
                         f"metrics.csv) or a relation loss with no signal yet. Remedy: a lower lr, or {self.remedy()}")
            out["message"] = (f"the run ended collapsed: key_std {self.last_key_std:.2e} at step {self.last_step}, "
                              f"below {COLLAPSED_FRACTION:g} x its spread value {self.spread:.3f}: the teacher's "
                              f"embeddings are nearly identical for every image; {cause}")
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint, so a resumed run keeps what it has seen."""
        return {k: v for k, v in asdict(self).items() if k in ("plateau_start", "plateau", "last_key_std",
                                                                "last_step")}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)
