"""The per-epoch sharded order every backend visits samples in, written once.

One seeded permutation per (seed, epoch), dealt to ranks as ``torch.utils.data.DistributedSampler``
deals it, so the torchvision, DALI and FFCV backends (and the resident path) visit the same samples in
the same order for the same seed, and a resumed run continues the very order it left.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["epoch_order", "shard_size"]


def shard_size(n: int, world_size: int, drop_last: bool = True) -> int:
    """Samples per rank per epoch: ``n // world_size`` (drop_last) or ``ceil(n / world_size)`` (padded)."""
    return n // world_size if drop_last else -(-n // world_size)


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                drop_last: bool = True) -> np.ndarray:
    """This rank's sample indices for ``epoch``, in visiting order (int64).

    One permutation of ``range(n)`` per (seed, epoch) (torch's ``randperm``, seeded
    ``seed * 1_000_003 + epoch``), shared by all ranks, then dealt as
    ``DistributedSampler`` deals it: truncated (``drop_last``) or padded by wrapping to a multiple of
    ``world_size``, rank ``r`` taking positions ``r, r + world_size, ...``. Every rank gets the same
    count; across ranks an epoch holds every sample once (padding repeats a few).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"epoch_order: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < world_size:
        raise ValueError(f"epoch_order: {n} samples are too few for {world_size} process(es)")
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).numpy()
    else:
        order = np.arange(n, dtype=np.int64)
    total = shard_size(n, world_size, drop_last) * world_size
    if total > n:
        order = np.concatenate([order, order[: total - n]])
    return order[:total][rank::world_size].astype(np.int64, copy=False)
