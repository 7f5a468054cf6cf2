"""Small raw images held on the training device and cropped there: the loader's CPU side is an index.

For a ``.beton`` whose images are stored as raw pixels and are small (CIFAR, STL-10, Tiny-ImageNet,
the demo: at most :data:`MAX_SIDE` px a side), decoding is a memory copy, and FFCV's CPU threads would
spend the whole step cutting and resizing crops. Here the split is read once into one uint8
``[N, 3, H, W]`` tensor on the device (CIFAR-10: 150 MB), and each batch is::

    gather the batch's images (device)  ->  every view's random resized crop in one
    torchvision.ops.roi_align call per output size (device)  ->  gpu_augment.augment_view (device)

with the crop boxes and colour parameters of :mod:`pipelines.draw` — the very values the other
backends use for those samples. ``roi_align`` averages ``ceil(box / output)`` samples per output pixel
and axis (an area filter when shrinking, bilinear when enlarging), so a crop differs from PIL's or
OpenCV's resampling in the last grey level, not in its box.

On a machine without a GPU the device is the CPU and the same code runs there; the crops are rounded
to uint8 so that :func:`~pipelines.gpu_augment.augment_view` takes its fused CPU kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torchvision.ops import roi_align

from .batch import Batch
from .draw import view_crops
from .gpu_augment import augment_view, drawn_view_params
from .order import epoch_order, shard_size
from .spec import RecipeSpec

__all__ = ["MAX_SIDE", "MEMORY_BUDGET", "ResidentLoader", "fits_resident"]

log = logging.getLogger(__name__)

MAX_SIDE = 64  # raw images up to this side are cropped on the device
MEMORY_BUDGET = 4 << 30  # bytes of device memory the resident split may take


def fits_resident(heights: np.ndarray, widths: np.ndarray, raw: np.ndarray, budget: int = MEMORY_BUDGET) -> str | None:
    """Why a split cannot be held on the device (None when it can): JPEG records, a side over
    :data:`MAX_SIDE`, images of different sizes, or more than ``budget`` bytes."""
    if not raw.all():
        return f"{int((~raw).sum())} records are JPEG-encoded (device crops need raw pixels)"
    if heights.max() > MAX_SIDE or widths.max() > MAX_SIDE:
        return f"images up to {int(heights.max())}x{int(widths.max())} px exceed {MAX_SIDE} px"
    if (heights != heights[0]).any() or (widths != widths[0]).any():
        return "images of several sizes"
    need = len(heights) * int(heights[0]) * int(widths[0]) * 3
    if need > budget:
        return f"{need / 2**20:.0f} MiB of pixels exceed the {budget / 2**20:.0f} MiB budget"
    return None


class ResidentLoader:
    """:class:`pipelines.Loader` over images already on ``device``; order, sharding and resume as every backend.

    Args:
        images: uint8 ``[N, H, W, 3]`` (the stored pixels, any device; moved to ``device`` once).
        labels: int64 ``[N]``.
        indices: the samples to visit (the ones that decode); the epoch order permutes these.
        spec, batch_size, device, rank, world_size, seed, channels_last, out_dtype: as the other loaders.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, indices: np.ndarray, spec: RecipeSpec, *,
                 batch_size: int, device: torch.device, rank: int, world_size: int, seed: int,
                 channels_last: bool, out_dtype: torch.dtype, bad_files: int = 0):
        self.images = images.permute(0, 3, 1, 2).contiguous().to(device)  # [N,3,H,W] uint8
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64)  # a copy: the stored array is read-only
        self.indices = np.asarray(indices, np.int64)
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.channels_last, self.out_dtype, self.bad_files = channels_last, out_dtype, bad_files
        self.height, self.width = int(self.images.shape[2]), int(self.images.shape[3])
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"{len(self.indices)} samples are too few for {world_size} process(es) x batch "
                             f"{batch_size}")

    def __len__(self) -> int:
        return shard_size(len(self.indices), self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Order and crops of ``epoch``; the next pass starts at batch ``start_batch`` (resume)."""
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"set_epoch: epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def _crops(self, images: torch.Tensor, idx: np.ndarray, epoch: int, views: list) -> torch.Tensor:
        """``[V*B, 3, s, s]`` crops of equal-size ``views`` (view-major), cut on the images' device."""
        n = len(idx)
        h, w = np.full(n, self.height), np.full(n, self.width)
        boxes = []
        for view_id, v in views:
            top, left, ch, cw = view_crops(v, self.seed, epoch, idx, view_id, h, w).T
            boxes.append(np.stack([np.arange(n), left, top, left + cw, top + ch], axis=1))
        rois = torch.from_numpy(np.concatenate(boxes).astype(np.float32)).to(images.device, non_blocking=True)
        size = views[0][1].size
        out = roi_align(images.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if out.device.type == "cpu":  # the fused CPU colour kernel takes uint8
            out = out.round_().clamp_(0, 255).to(torch.uint8)
        else:
            out = out.div_(255.0)
        return out

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0  # without set_epoch, the next pass is the next epoch
        order = self.indices[epoch_order(len(self.indices), seed=self.seed, epoch=epoch, rank=self.rank,
                                         world_size=self.world_size)]
        groups: dict[int, list] = {}
        for view_id, v in enumerate(self.spec.views):
            groups.setdefault(v.size, []).append((view_id, v))
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.images[torch.from_numpy(idx).to(self.images.device)]
            out: dict[str, torch.Tensor] = {}
            for views in groups.values():
                crops = self._crops(images, idx, epoch, views).view(len(views), len(idx), 3, views[0][1].size, -1)
                for k, (view_id, v) in enumerate(views):
                    params = drawn_view_params(v, self.seed, epoch, idx, view_id)
                    out[v.name] = augment_view(crops[k], v, self.spec.mean, self.spec.std, params=params,
                                               out_dtype=self.out_dtype, channels_last=self.channels_last)
            yield Batch(weak=out[self.spec.weak.name], strong=[out[v.name] for v in self.spec.strong],
                        label=self.labels[torch.from_numpy(idx)].to(self.device, non_blocking=True))
