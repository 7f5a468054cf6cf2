"""Reference backend: torchvision.transforms.v2 over an ImageFolder tree, in DataLoader workers.

It runs anywhere and is the yardstick the DALI and FFCV backends are checked against (statistics,
not pixels). Workers decode and augment to uint8; the main process moves the uint8 batch to the
device (pinned, non-blocking) and normalises there, which moves 4x fewer bytes than float32.

Each sample's randomness is seeded from (seed, epoch, index), so a run resumed mid-epoch sees the
very same crops as an uninterrupted one, whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from .batch import Batch, LoaderConfig
from .folder import BadImageError, epoch_order, shard_size, train_classes
from .gpu_augment import normalize
from .samples import Samples, TreeSamples
from .spec import RecipeSpec, ViewSpec

__all__ = [
    "ViewsDataset",
    "view_transform",
    "ShardSampler",
    "ShardedLoader",
    "TorchvisionLoader",
    "build_torchvision_loader",
    "normalize_on_device",
]

log = logging.getLogger(__name__)


def view_transform(view: ViewSpec) -> v2.Compose:
    """The torchvision reading of one ViewSpec, PIL in, uint8 CHW tensor out (see ViewSpec for order)."""
    ops: list = [
        v2.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio, antialias=True),
        v2.RandomHorizontalFlip(p=view.flip_p),
    ]
    if view.jitter is not None and view.jitter.p > 0:
        j = view.jitter
        ops.append(v2.RandomApply([v2.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p))
    if view.gray_p > 0:
        ops.append(v2.RandomGrayscale(p=view.gray_p))
    if view.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(view.blur_kernel, sigma=view.blur_sigma)], p=view.blur_p))
    ops.append(v2.PILToTensor())
    if view.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=round(view.solarize_threshold * 255), p=view.solarize_p))
    return v2.Compose(ops)


class ViewsDataset(Dataset):
    """Decode once, then one uint8 tensor per transform. Keys are (index, seed) pairs from the sampler.

    ``samples`` is any :class:`pipelines.samples.Samples` (tree, .rec, .beton). A sample that cannot
    be decoded is logged with its name and reason, counted in ``bad_count`` (shared across workers),
    and replaced by the next one, so batches stay full.
    """

    def __init__(self, samples: Samples, transforms: Sequence):
        self.samples = samples
        self.transforms = list(transforms)
        self.bad_count = mp.Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                img, label = self.samples.image(i), int(self.samples.labels[i])
                break
            except BadImageError as e:
                with self.bad_count.get_lock():
                    self.bad_count.value += 1
                log.warning("skipping unreadable image: %s", e)
        else:
            raise RuntimeError("no readable image in the dataset")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = tuple(t(img) for t in self.transforms)
        return views, label


class ShardSampler(Sampler):
    """Batches of :func:`pipelines.folder.epoch_order` (the order every backend uses), resumable at a batch.

    Yields lists of (index, seed) keys; the seed makes each sample's augmentation a pure function of
    (seed, epoch, index).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        if n < world_size * (batch_size if drop_last else 1):
            raise ValueError(f"{n} samples are too few for {world_size} process(es) x batch {batch_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _per_rank(self) -> int:
        return shard_size(self.n, self.world_size, self.drop_last)

    def __len__(self) -> int:
        per = self._per_rank()
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = epoch_order(self.n, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                           shuffle=self.shuffle, drop_last=self.drop_last).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * (1 << 24)
        for b in range(self.start_batch, len(self)):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, (base + i) % (1 << 63)) for i in idx]


def normalize_on_device(x: torch.Tensor, device: torch.device, mean: Sequence[float], std: Sequence[float],
                        channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalised float on ``device``; the copy is non-blocking from pinned memory."""
    return normalize(x.to(device, non_blocking=True), mean, std, scale=1 / 255, out_dtype=dtype,
                     channels_last=channels_last)


class ShardedLoader:
    """A DataLoader over :class:`ViewsDataset` batched by :class:`ShardSampler`: length, epoch (order and
    crops) and the bad-file count, shared by the training loader and the eval loader."""

    def __init__(self, samples: Samples, transforms: list, *, batch_size: int, num_workers: int, seed: int,
                 device: torch.device, rank: int, world_size: int, shuffle: bool = True, drop_last: bool = True,
                 persistent_workers: bool = False):
        self.device, self.batch_size = device, batch_size
        self.dataset = ViewsDataset(samples, transforms)
        self.sampler = ShardSampler(len(samples), batch_size, rank, world_size, seed, shuffle=shuffle,
                                    drop_last=drop_last)
        keep = persistent_workers and num_workers > 0
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=keep,
            prefetch_factor=4 if keep else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Order and crops of ``epoch`` (each sample's augmentation is seeded by seed, epoch and index)."""
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def bad_files(self) -> int:
        """How many unreadable files were skipped so far (all workers)."""
        return self.dataset.bad_count.value


class TorchvisionLoader(ShardedLoader):
    """DataLoader over an ImageFolder tree that yields :class:`pipelines.batch.Batch` on the device."""

    def __init__(self, files: TreeSamples, spec: RecipeSpec, *, batch_size: int, num_workers: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, channels_last: bool = False):
        super().__init__(files, [view_transform(v) for v in spec.views], batch_size=batch_size,
                         num_workers=num_workers, seed=seed, device=device, rank=rank, world_size=world_size,
                         persistent_workers=True)
        self.spec, self.channels_last = spec, channels_last

    def __iter__(self) -> Iterator[Batch]:
        for views, label in self.loader:
            out = {view.name: normalize_on_device(x, self.device, self.spec.mean, self.spec.std, self.channels_last)
                   for view, x in zip(self.spec.views, views, strict=True)}
            yield Batch(weak=out[self.spec.weak.name], strong=[out[v.name] for v in self.spec.strong],
                        label=label.to(self.device, non_blocking=True))


def build_torchvision_loader(cfg: LoaderConfig, spec: RecipeSpec, *, split: str, device: torch.device, rank: int,
                             world_size: int) -> TorchvisionLoader:
    """The reference training loader over ``<cfg.data>/<split>/`` (an ImageFolder tree), labelled by the
    train class list (the manifest's ``classes``, else train/'s folders); ``num_workers`` = processes."""
    cfg = LoaderConfig.of(cfg)
    batch = cfg.per_process_batch(world_size)
    files = TreeSamples(Path(cfg.data) / split, train_classes(cfg.data))
    return TorchvisionLoader(files, spec, batch_size=batch, num_workers=cfg.num_workers,
                             seed=cfg.seed, device=device, rank=rank, world_size=world_size,
                             channels_last=cfg.channels_last)
