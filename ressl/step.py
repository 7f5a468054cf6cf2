"""One ReSSL optimiser step, and the setup rules around it, shared by ``tools/train.py`` and the bench.

The benchmark's "model-only images/s" is only a ceiling for training if it times the very step that
training takes, so both tools build the model with :func:`build_ressl`, the optimiser with
:func:`build_optimizer` and step with :class:`TrainStep`::

    precision = resolve_precision(cfg.precision, device)          # "auto": bf16 on CUDA, fp32 on CPU
    accelerator = Accelerator(mixed_precision=precision, ...)
    model = build_ressl(cfg, accelerator.device)
    optimizer = build_optimizer(model, cfg)                       # peak lr = cfg.lr * batch_size / 256
    model, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(model, optimizer, accelerator)
    loss, metrics = step(batch.weak, batch.strong, lr=schedule.lr(i), momentum=m, infonce_weight=w)
    if step.nonfinite.item(): ...                                 # host sync, when the caller chooses
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .schedule import scaled_lr

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import Config
    from .method import ReSSL

__all__ = ["TrainStep", "build_optimizer", "build_ressl", "resolve_precision"]


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """Accelerate's ``mixed_precision`` for a config value: "auto" is bf16 on CUDA and "no" elsewhere.

    CPU bf16 autocast measured about 14x slower than float32 on the 2-core development machines, so
    "auto" never picks it there. ``device`` None means "CUDA if torch sees one".

    Raises:
        ValueError: ``precision`` is not one of auto / no / bf16 / fp16.
    """
    if precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"precision must be one of auto/no/bf16/fp16, got {precision!r}")
    if precision != "auto":
        return precision
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "bf16" if cuda else "no"


def build_ressl(cfg: Config, device: torch.device | str) -> ReSSL:
    """ReSSL from ``cfg`` on ``device``: channels_last if asked, encoders compiled if ``cfg.compile``.

    The encoders are compiled in place, not the whole module: parameter names (EMA pairing,
    checkpoints) stay the same, and the Python branches of ``ReSSL.forward`` on the InfoNCE weight
    never reach the compiler (torch 2.14.1's inductor, given all of ``forward`` with the teacher
    under ``no_grad``, returned a loss without ``grad_fn``).
    """
    from .method import ReSSL

    model = ReSSL.from_config(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.student.compile()
        model.teacher.compile()
    return model


def build_optimizer(model: ReSSL, cfg: Config) -> torch.optim.SGD:
    """SGD with momentum over the student, lr scaled by the global batch, norms and biases decayed only
    with ``decay_norm_bias``."""
    return torch.optim.SGD(model.param_groups(cfg.weight_decay, cfg.decay_norm_bias),
                           lr=scaled_lr(cfg.lr, cfg.batch_size),
                           momentum=cfg.sgd_momentum)


class TrainStep:
    """One optimiser step: autocast forward, backward, SGD step at the given lr, ``zero_grad``, then
    the teacher EMA and the enqueue of the teacher keys; a non-finite loss raises a flag on the device.

    Args:
        model: the ReSSL module after ``accelerator.prepare`` (possibly DDP-wrapped).
        optimizer: its prepared optimiser (Accelerate's wrapper applies the fp16 GradScaler, if any).
        accelerator: provides autocast, backward (loss scaling) and the unwrapped module.

    The step never synchronises with the host: ``nonfinite`` ([] bool on the device) stays set once any
    loss was NaN/inf, and the caller reads it (``.item()``, a sync) when it logs or saves.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.core: ReSSL = accelerator.unwrap_model(model)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)

    def __call__(self, weak: Tensor, strong: list[Tensor], *, momentum: float, infonce_weight: float = 0.0,
                 lr: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Train on one batch; returns the loss and the detached metrics of ``ReSSL.forward``.

        Args:
            weak: [B,3,H,W] teacher view; strong: one [B,3,h,w] per student view.
            lr: learning rate of this step (``ressl.schedule.Schedule.lr``) for every parameter group;
                None keeps the optimiser's (the benchmark's constant lr).
            momentum: EMA momentum of the teacher for this step.
            infonce_weight: TPAMI warm-up weight of InfoNCE against the relation loss.
        """
        with self.accelerator.autocast():
            loss, metrics = self.model(weak, strong, infonce_weight=infonce_weight)
        self.accelerator.backward(loss)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.core.update(momentum)  # EMA teacher (backbone + head) then enqueue the all-gathered teacher keys
        self.nonfinite |= ~torch.isfinite(loss.detach())  # on device: no host sync here
        return loss, metrics
