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
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from . import Batch, LoaderConfig
from .gpu_augment import normalize
from .spec import RecipeSpec, ViewSpec

__all__ = [
    "ImageFolderFiles",
    "view_transform",
    "ShardSampler",
    "TorchvisionLoader",
    "build_torchvision_loader",
    "build_eval_loader",
    "normalize_on_device",
]

log = logging.getLogger(__name__)


class ImageFolderFiles:
    """The (path, label) list of an ImageFolder tree: classes are sub-directories sorted by name."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"image folder {str(root)!r} has no class sub-directories")
        self.samples: list[tuple[str, int]] = []
        for label, c in enumerate(self.classes):
            for dirpath, _, names in sorted(os.walk(root / c, followlinks=True)):
                self.samples += [(os.path.join(dirpath, n), label) for n in sorted(names)
                                 if n.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            raise FileNotFoundError(f"image folder {str(root)!r} has no images ({', '.join(IMG_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)


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


def _load_rgb(path: str) -> Image.Image:
    """Decode to RGB (CMYK, grayscale, palette and PNG-named-.jpg files convert; broken ones raise)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


class _ViewsDataset(Dataset):
    """Decode once, then one uint8 tensor per transform. Keys are (index, seed) pairs from the sampler.

    A file that cannot be decoded is logged with its path and reason, counted in ``bad_count``
    (shared across workers), and replaced by the next file, so batches stay full.
    """

    def __init__(self, files: ImageFolderFiles, transforms: Sequence):
        self.samples = files.samples
        self.transforms = list(transforms)
        self.bad_count = mp.Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = _load_rgb(path)
                break
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                with self.bad_count.get_lock():
                    self.bad_count.value += 1
                log.warning("skipping unreadable image %s: %s", path, e)
        else:
            raise RuntimeError("no readable image in the dataset")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = tuple(t(img) for t in self.transforms)
        return views, label


class ShardSampler(Sampler):
    """Per-epoch shuffle, sharded ``rank::world_size``, whole batches only, resumable at a batch.

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
        return self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        per = self._per_rank()
        return per // self.batch_size if self.drop_last else math.ceil(per / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if not self.drop_last:  # pad so every rank has the same count (as DistributedSampler)
            order += order[: self._per_rank() * self.world_size - self.n]
        mine = order[self.rank :: self.world_size][: self._per_rank()]
        base = (self.seed * 1_000_003 + self.epoch) * (1 << 24)
        for b in range(self.start_batch, len(self)):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, (base + i) % (1 << 63)) for i in idx]


def normalize_on_device(x: torch.Tensor, device: torch.device, mean: Sequence[float], std: Sequence[float],
                        channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalised float on ``device``; the copy is non-blocking from pinned memory."""
    return normalize(x.to(device, non_blocking=True), mean, std, scale=1 / 255, out_dtype=dtype,
                     channels_last=channels_last)


class TorchvisionLoader:
    """DataLoader over ImageFolder files that yields :class:`pipelines.Batch` on the device."""

    def __init__(self, files: ImageFolderFiles, spec: RecipeSpec, *, batch_size: int, num_workers: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, channels_last: bool = False):
        self.spec, self.device, self.channels_last = spec, device, channels_last
        self.batch_size = batch_size
        self.dataset = _ViewsDataset(files, [view_transform(v) for v in spec.views])
        self.sampler = ShardSampler(len(files), batch_size, rank, world_size, seed)
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def bad_files(self) -> int:
        """How many unreadable files were skipped so far (all workers)."""
        return self.dataset.bad_count.value

    def __iter__(self) -> Iterator[Batch]:
        for views, label in self.loader:
            out = [normalize_on_device(v, self.device, self.spec.mean, self.spec.std, self.channels_last)
                   for v in views]
            yield Batch(weak=out[0], strong=out[1:], label=label.to(self.device, non_blocking=True))


def build_torchvision_loader(cfg: LoaderConfig, spec: RecipeSpec, *, split: str, device: torch.device, rank: int,
                             world_size: int) -> TorchvisionLoader:
    """The reference training loader over ``<cfg.data>/<split>/`` (an ImageFolder tree)."""
    files = ImageFolderFiles(Path(cfg.data) / split)
    return TorchvisionLoader(files, spec, batch_size=cfg.batch_size // world_size, num_workers=cfg.num_workers,
                             seed=cfg.seed, device=device, rank=rank, world_size=world_size,
                             channels_last=cfg.channels_last)


class _EvalLoader:
    def __init__(self, loader: DataLoader, device: torch.device, mean, std, dataset: _ViewsDataset):
        self.loader, self.device, self.mean, self.std, self.dataset = loader, device, mean, std, dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (img,), label in self.loader:
            yield normalize_on_device(img, self.device, self.mean, self.std), label.to(self.device)


def build_eval_loader(data: str | os.PathLike, split: str, size: int, mean: Sequence[float], std: Sequence[float],
                      batch_size: int, num_workers: int = 2, device: torch.device | str = "cpu",
                      train_aug: bool = False, rank: int = 0, world_size: int = 1, seed: int = 0) -> _EvalLoader:
    """Images + labels for kNN and linear evaluation, in file order (every sample once per rank shard).

    ``train_aug`` gives the linear probe's training augmentation (random resized crop + flip);
    otherwise resize to size/0.875 and center-crop (plain resize for <= 64 px data, as in the papers).
    """
    files = ImageFolderFiles(Path(data) / split)
    if train_aug:
        t = v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                        v2.PILToTensor()])
    else:
        resize = size if size <= 64 else int(round(size / 0.875))
        t = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
    dataset = _ViewsDataset(files, [t])
    sampler = ShardSampler(len(files), batch_size, rank, world_size, seed, shuffle=train_aug, drop_last=False)
    device = torch.device(device)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda")
    return _EvalLoader(loader, device, mean, std, dataset)
