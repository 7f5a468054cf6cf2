"""EMA teacher update (its momentum schedule is ``ressl.schedule.momentum_at``).

The update works in place on flat parameter lists with ``torch._foreach_*`` (one fused kernel per
list on GPU) instead of reassigning ``.data`` per tensor. Only parameters are averaged. Buffers
(BatchNorm running mean/var, ``num_batches_tracked``) are left alone: the teacher runs its BN in train
mode on the weak views, and those forward passes update its own running statistics, as in the official
ReSSL and MoCo code. An evaluated teacher then normalises with statistics of the weights it actually
has, not with the student's (whose weights differ and whose inputs are the strong views).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update_"]


def _paired(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher parameters and the student parameters of the same name; the student may have more (a predictor)."""
    src = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        s = src.get(name)
        if s is None:
            raise KeyError(f"teacher parameter {name!r} has no student parameter of the same name")
        if s.shape != t.shape:
            raise ValueError(f"teacher parameter {name!r} has shape {tuple(t.shape)}, student {tuple(s.shape)}")
        t_list.append(t)
        s_list.append(s)
    return t_list, s_list


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``t = m * t + (1 - m) * s`` for every teacher parameter; buffers are not touched.

    Tensors are matched by name, so ``student`` may hold modules the teacher lacks (the TPAMI
    predictor); those are ignored. ``momentum == 1`` leaves parameters bit-identical and
    ``momentum == 0`` copies them exactly.

    Args:
        teacher: EMA module, updated in place.
        student: trained module with (at least) the teacher's parameter names.
        momentum: m in [0, 1].
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params, s_params = _paired(teacher, student)
    if t_params and momentum < 1.0:
        s_params = [s.detach().to(t.dtype) for t, s in zip(t_params, s_params)]
        if momentum == 0.0:
            torch._foreach_copy_(t_params, s_params)
        else:
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

