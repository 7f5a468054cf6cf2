"""Reference backend: torchvision.transforms.v2 over an ImageFolder tree, in DataLoader workers.

It runs anywhere and is the yardstick the DALI and FFCV backends are checked against (statistics,
not pixels). Workers decode and augment to uint8; the main process moves the uint8 batch to the
device (pinned, non-blocking) and normalises there, which moves 4x fewer bytes than float32.

Each sample's random choices come from the counter-based draw of (seed, epoch, index, view)
(:mod:`pipelines.draw`), shared with the DALI and FFCV backends: a run resumed mid-epoch sees the very
same crops as an uninterrupted one, whatever the number of workers or processes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from .batch import Batch, LoaderConfig
from .draw import view_crops, view_decisions, view_key
from .folder import BadImageError, train_classes
from .gpu_augment import normalize
from .order import epoch_order, shard_size
from .samples import NoReadableSamplesError, Samples, TreeSamples
from .spec import RecipeSpec, ViewSpec

__all__ = [
    "ViewsDataset",
    "DrawnView",
    "sample_seed",
    "ShardSampler",
    "ShardedLoader",
    "TorchvisionLoader",
    "build_torchvision_loader",
    "normalize_on_device",
]

log = logging.getLogger(__name__)


class DrawnView:
    """One ViewSpec on a PIL image, every random choice taken from the sample's counter-based draw.

    :mod:`pipelines.draw` gives the crop box (torchvision's RandomResizedCrop algorithm on this image's
    size), flip, jitter factors, grayscale, blur sigma and solarize of ``(seed, epoch, index, view_id)``:
    the values the DALI and FFCV backends use for the same sample. The ops are torchvision's
    ``transforms.v2.functional`` ones, in the spec's order; colour jitter applies brightness, contrast,
    saturation, hue in this fixed order (``ColorJitter`` draws a random order per call, which no other
    backend can follow).
    """

    def __init__(self, view: ViewSpec, view_id: int, seed: int):
        self.view, self.view_id, self.seed = view, view_id, seed

    def __call__(self, img: Image.Image, epoch: int, index: int) -> torch.Tensor:
        v = self.view
        idx = np.array([index], np.int64)
        top, left, h, w = (int(x) for x in view_crops(v, self.seed, epoch, idx, self.view_id,
                                                         np.array([img.height]), np.array([img.width]))[0])
        d = {k: x[0] for k, x in view_decisions(v, self.seed, epoch, idx, self.view_id).items()}
        out = F.resized_crop(img, top, left, h, w, [v.size, v.size], antialias=True)
        if d["flip"]:
            out = F.horizontal_flip(out)
        if d["jitter"]:
            out = F.adjust_brightness(out, float(d["brightness"]))
            out = F.adjust_contrast(out, float(d["contrast"]))
            out = F.adjust_saturation(out, float(d["saturation"]))
            if d["hue"] != 0:
                out = F.adjust_hue(out, float(d["hue"]))
        if d["gray"]:
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        if d["blur"]:
            sigma = float(d["sigma"])
            out = F.gaussian_blur(out, [v.blur_kernel, v.blur_kernel], [sigma, sigma])
        x = F.pil_to_tensor(out)
        if d["solarize"]:
            x = F.solarize(x, round(v.solarize_threshold * 255))
        return x


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A torch seed for one sample of one epoch (for plain, stream-drawing transforms such as the probe's)."""
    with np.errstate(over="ignore"):
        return int(view_key(seed, epoch, index, 0)) >> 1


class ViewsDataset(Dataset):
    """Decode once, then one uint8 tensor per transform. Keys are (index, epoch) pairs from the sampler.

    ``samples`` is any :class:`pipelines.samples.Samples` (tree, .rec, .beton). A :class:`DrawnView`
    draws from (seed, epoch, index, view); any other transform runs under torch's generator seeded
    from (seed, epoch, index). So a sample's views do not depend on the worker that loads it. A
    sample that cannot be decoded is logged with its name and reason, counted once per file in
    ``bad_files`` (shared across workers), and replaced by the next one, so batches stay full.
    """

    def __init__(self, samples: Samples, transforms: Sequence, seed: int = 0):
        self.samples = samples
        self.transforms = list(transforms)
        self.seed = seed
        self._bad = mp.Array("b", len(samples), lock=False)  # one flag per sample, shared with the workers

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def bad_files(self) -> int:
        """Distinct unreadable samples met so far (all workers)."""
        return int(np.frombuffer(self._bad, dtype=np.int8).sum()) if len(self.samples) else 0

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                img, label = self.samples.image(i), int(self.samples.labels[i])
                break
            except BadImageError as e:
                if not self._bad[i]:
                    self._bad[i] = 1
                    log.warning("skipping unreadable image: %s", e)
        else:
            raise NoReadableSamplesError(f"none of the {len(self.samples)} samples of "
                                         f"{getattr(self.samples, 'location', 'the split')} could be read")
        views = []
        for t in self.transforms:
            if isinstance(t, DrawnView):
                views.append(t(img, epoch, i))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, epoch, i))
                    views.append(t(img))
        return tuple(views), label


class ShardSampler(Sampler):
    """Batches of :func:`pipelines.order.epoch_order` (the order every backend uses), resumable at a batch.

    Yields lists of (index, epoch) keys: with the dataset's seed, each sample's augmentation is a pure
    function of (seed, epoch, index).
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
        for b in range(self.start_batch, len(self)):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, self.epoch) for i in idx]


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
        self.dataset = ViewsDataset(samples, transforms, seed=seed)
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
        """How many distinct unreadable files were skipped so far (all workers)."""
        return self.dataset.bad_files


class TorchvisionLoader(ShardedLoader):
    """DataLoader over an ImageFolder tree that yields :class:`pipelines.batch.Batch` on the device."""

    def __init__(self, files: TreeSamples, spec: RecipeSpec, *, batch_size: int, num_workers: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, channels_last: bool = False):
        super().__init__(files, [DrawnView(v, n, seed) for n, v in enumerate(spec.views)], batch_size=batch_size,
                         num_workers=num_workers, seed=seed, device=device, rank=rank, world_size=world_size,
                         persistent_workers=True)
        self.spec, self.channels_last = spec, channels_last

    def __iter__(self) -> Iterator[Batch]:
        for views, label in self.loader:
            out = {view.name: normalize_on_device(x, self.device, self.spec.mean, self.spec.std, self.channels_last)
                   for view, x in zip(self.spec.views, views, strict=True)}
            yield Batch(weak=out[self.spec.weak.name], strong=[out[v.name] for v in self.spec.strong],
                        label=label.to(self.device, non_blocking=True))


def _check_one_readable(files: Samples, root: Path) -> None:
    """Fail before training when no file decodes. Bad files are otherwise met (and replaced) lazily, so a
    tree of only unreadable files would fail inside the first batch; this costs one decode for good data."""
    for i in range(len(files)):
        try:
            files.image(i)
            return
        except BadImageError:
            continue
    example = f" (e.g. {files.name(0)})" if len(files) else ""
    raise ValueError(f"none of the {len(files)} files under {root} is a readable image{example}")


def build_torchvision_loader(cfg: LoaderConfig, spec: RecipeSpec, *, split: str, device: torch.device, rank: int,
                             world_size: int) -> TorchvisionLoader:
    """The reference training loader over ``<cfg.data>/<split>/`` (an ImageFolder tree), labelled by the
    train class list (the manifest's ``classes``, else train/'s folders); ``num_workers`` = processes."""
    cfg = LoaderConfig.of(cfg)
    batch = cfg.per_process_batch(world_size)
    files = TreeSamples(Path(cfg.data) / split, train_classes(cfg.data))
    _check_one_readable(files, Path(cfg.data) / split)
    return TorchvisionLoader(files, spec, batch_size=batch, num_workers=cfg.num_workers,
                             seed=cfg.seed, device=device, rank=rank, world_size=world_size,
                             channels_last=cfg.channels_last)
