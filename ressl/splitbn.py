"""Split BatchNorm: per-group batch statistics in one forward pass.

Shuffle-BN on one device (MoCo, He et al. 2020; its CIFAR demo's ``SplitBatchNorm``) needs BatchNorm
statistics from several groups of the batch. Running the network once per group costs one small forward
per group; here the layer does it in one kernel instead. In training, rows ``i`` with the same
``i % num_splits`` form a group: the ``[N, C, ...]`` input is viewed as ``[N / G, G * C, ...]`` (free for
a contiguous tensor; row ``i`` lands in channel block ``i % G``), one ``batch_norm`` runs with the
affine parameters and running statistics repeated ``G`` times, and the ``G`` updated copies of the
running statistics are averaged back into the ordinary ``C`` ones. In eval, and whenever
``num_splits == 1``, it is the plain BatchNorm it subclasses.

The layers have exactly BatchNorm's parameters and buffers (same names and shapes), so state dicts,
EMA pairing by name and exported backbones are those of the plain model. ``num_splits`` is an ordinary
attribute, not state: :func:`bn_splits` sets it for the duration of one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SplitBatchNorm1d", "SplitBatchNorm2d", "bn_splits", "convert_split_batchnorm"]


class _SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The split forward shared by the 1-d and 2-d layers (a mixin over torch's BatchNorm base)."""

    num_splits: int = 1

    def forward(self, input: Tensor) -> Tensor:
        g = self.num_splits
        if g == 1 or not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        n, c = input.shape[:2]
        if n % g:
            raise ValueError(f"{type(self).__name__}: a batch of {n} rows cannot form {g} equal BN groups")
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.track_running_stats and self.running_mean is not None
        if track and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # one step per batch, as the plain layer counts it
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # A view for a contiguous input; channels_last inputs are copied to contiguous and back.
        channels_last = input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(
            memory_format=torch.channels_last)
        grouped = input.reshape(n // g, g * c, *input.shape[2:])
        mean = self.running_mean.repeat(g) if track else None
        var = self.running_var.repeat(g) if track else None
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        out = F.batch_norm(grouped, mean, var, weight, bias, True, factor, self.eps)
        # Back to [N, C, ...] as a new tensor, not an autograd view: an in-place op on a view (the
        # ResNets' ReLU(inplace=True)) makes autograd copy the gradient in backward (+50% CPU time per
        # BN + ReLU measured). Safe because batch_norm's backward does not use its output.
        out = torch.ops.aten._unsafe_view(out, input.shape)
        if track:
            with torch.no_grad():  # each copy took one momentum step from the same start: average them
                self.running_mean.copy_(mean.view(g, c).mean(0))
                self.running_var.copy_(var.view(g, c).mean(0))
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with per-group statistics in training (groups: row index mod ``num_splits``)."""


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with per-group statistics in training (groups: row index mod ``num_splits``)."""


_SPLIT = {nn.BatchNorm1d: SplitBatchNorm1d, nn.BatchNorm2d: SplitBatchNorm2d}


def convert_split_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d`` / ``BatchNorm2d`` in ``module`` (in place) by its split twin.

    The twin takes over the same parameter and buffer tensors (and eps, momentum, affine, tracking), so
    nothing is copied and the state dict is unchanged. Subclasses such as ``SyncBatchNorm`` are left
    alone. Returns ``module``, or the twin when ``module`` itself is a BatchNorm.
    """
    cls = _SPLIT.get(type(module))
    if cls is not None:
        twin = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                   device="meta")  # placeholders, replaced by the module's own tensors
        twin._parameters, twin._buffers = module._parameters, module._buffers
        twin.train(module.training)
        return twin
    for name, child in module.named_children():
        new = convert_split_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


@contextmanager
def bn_splits(module: nn.Module, num_splits: int) -> Iterator[None]:
    """Within the block, every split BatchNorm in ``module`` uses ``num_splits`` groups; 1 afterwards."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    layers = [m for m in module.modules() if isinstance(m, _SplitBatchNorm)]
    for m in layers:
        m.num_splits = num_splits
    try:
        yield
    finally:
        for m in layers:
            m.num_splits = 1
