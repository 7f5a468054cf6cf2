"""Memory queue of teacher embeddings: a [K, D] buffer and a pointer, written FIFO after an all-gather.

Everything stays on the device: the pointer is a 0-dim tensor and the write is an ``index_copy_``,
so pushing never syncs with the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import gather
from torch import nn

__all__ = ["FeatureQueue", "gather_keys"]


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All processes' keys concatenated along dim 0 (Accelerate's gather); identity in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return gather(keys.contiguous())
    return keys


class FeatureQueue(nn.Module):
    """FIFO queue of L2-normalised embeddings shared by all processes.

    Buffers (saved in checkpoints): ``buffer`` [size, dim] float32, random unit vectors at start, and
    ``ptr`` (0-dim int64), the next row to overwrite. Every process holds the same queue because it
    pushes the same all-gathered keys.

    Args:
        size: K, number of stored embeddings; must be a multiple of the global batch.
        dim: D, embedding width.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"FeatureQueue needs size > 0 and dim > 0, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("buffer", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, global_batch: int) -> None:
        """Raise ValueError unless whole batches tile the queue (call it before training starts)."""
        if global_batch <= 0 or self.size % global_batch:
            raise ValueError(
                f"queue_size={self.size} must be a multiple of the global batch size (all processes "
                f"together), got {global_batch}; choose queue_size = n * batch_size"
            )

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Gather ``keys`` [B, D] from all processes and overwrite the oldest rows (wrapping around)."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got shape {tuple(keys.shape)}")
        keys = gather_keys(keys.detach())
        n = keys.shape[0]
        self.check_batch(n)
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.buffer.index_copy_(0, idx.to(self.buffer.device), keys.to(self.buffer.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
