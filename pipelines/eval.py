"""The evaluation loader (kNN monitor, linear probe, t-SNE) for every layout ``make dataset`` writes.

A split is found as, in this order: an ImageFolder tree ``<data>/<split>/``, a RecordIO pair
``<split>.rec`` + ``.idx``, an FFCV ``<split>.beton``, or the source tree recorded in
``manifest.json`` (``source.src``/``<split>``, for a converted folder whose trees were not written).
Images are decoded with PIL in DataLoader workers (:class:`pipelines.torchvision.ViewsDataset`), so
evaluation needs no DALI or GPU decoder and sees the same pixels whatever trained. Labels of a tree
come from the train class list (the manifest's ``classes``); stored labels of a ``.rec``/``.beton``
were written from that same list.

``train_aug=True`` gives the linear probe's training augmentation, seeded per (seed, epoch, index):
call :meth:`EvalLoader.set_epoch` each probe epoch for new crops, as the paper's protocol trains on.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torchvision.transforms import v2

from .folder import train_classes
from .samples import BetonSamples, RecordSamples, Samples, TreeSamples
from .torchvision import ShardedLoader, normalize_on_device

__all__ = ["EvalDataError", "EvalLoader", "build_eval_loader", "eval_problem", "find_split"]


class EvalDataError(FileNotFoundError):
    """No labelled samples for a split in any layout; the message says what was looked for."""


def _manifest_source(data: Path) -> Path | None:
    manifest = data / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        src = (json.loads(manifest.read_text()).get("source") or {}).get("src")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(src) if src else None


def find_split(data: str | os.PathLike, split: str) -> Samples:
    """The samples of ``split`` in ``data``, in the first layout found (see the module docstring).

    Raises:
        EvalDataError: none of the layouts exists (every path tried is named).
    """
    data = Path(data)
    if not data.is_dir():
        raise EvalDataError(f"dataset directory {str(data)!r} does not exist (run `make dataset DATA=...`)")
    classes = train_classes(data)
    tried = [f"{data / split}/ (ImageFolder)", f"{data / split}.rec + .idx", f"{data / split}.beton"]
    if (data / split).is_dir():
        return TreeSamples(data / split, classes)
    if (data / f"{split}.rec").is_file():
        return RecordSamples(data / f"{split}.rec", data / f"{split}.idx", len(classes) if classes else None)
    if (data / f"{split}.beton").is_file():
        if importlib.util.find_spec("ffcv") is None:
            raise EvalDataError(f"{data / split}.beton is the only copy of split {split!r} and reading it needs "
                                "the [ffcv] extra (pip install -e '.[ffcv]')")
        return BetonSamples(data / f"{split}.beton")
    src = _manifest_source(data)
    if src is not None:
        tried.append(f"{src / split}/ (the source recorded in manifest.json)")
        if (src / split).is_dir():
            return TreeSamples(src / split, classes)
    raise EvalDataError(f"no split {split!r} in {str(data)!r}: looked for {', '.join(tried)}")


def eval_problem(data: str | os.PathLike, splits: Sequence[str]) -> str | None:
    """Why kNN / probe evaluation cannot run on ``splits`` of ``data`` (None when it can): a missing
    split, or a split without labels (all -1, such as STL-10's unlabeled images)."""
    for split in splits:
        try:
            samples = find_split(data, split)
        except (EvalDataError, ValueError) as e:
            return str(e)
        if len(samples) and int(samples.labels.max()) < 0:
            return f"split {split!r} of {data} has no labels (all -1)"
    return None


def eval_transform(size: int, train_aug: bool) -> v2.Compose:
    """Probe training crops (random resized crop 0.08-1 + flip), or resize to size/0.875 and
    center-crop (a plain resize for <= 64 px data, as in the papers)."""
    if train_aug:
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                           v2.PILToTensor()])
    resize = size if size <= 64 else int(round(size / 0.875))
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


class EvalLoader(ShardedLoader):
    """Yields ``(images [B,3,size,size] normalised on device, labels [B])``; every sample once per epoch
    across ranks (the last batch may be short). ``set_epoch`` reshuffles and re-draws the crops."""

    def __init__(self, samples: Samples, transform: v2.Compose, *, batch_size: int, num_workers: int,
                 device: torch.device, mean: Sequence[float], std: Sequence[float], shuffle: bool, rank: int,
                 world_size: int, seed: int):
        super().__init__(samples, [transform], batch_size=batch_size, num_workers=num_workers, seed=seed,
                         device=device, rank=rank, world_size=world_size, shuffle=shuffle, drop_last=False)
        self.samples, self.mean, self.std = samples, mean, std

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (img,), label in self.loader:
            yield normalize_on_device(img, self.device, self.mean, self.std), label.to(self.device)


def build_eval_loader(data: str | os.PathLike, split: str, size: int, mean: Sequence[float], std: Sequence[float],
                      batch_size: int, num_workers: int = 2, device: torch.device | str = "cpu",
                      train_aug: bool = False, rank: int = 0, world_size: int = 1, seed: int = 0) -> EvalLoader:
    """Images + labels of ``split`` for kNN and linear evaluation, from any layout (see :func:`find_split`).

    Args:
        data, split: dataset directory and split name.
        size, mean, std: output side and normalisation (the recipe's).
        batch_size: images per batch per process; num_workers: DataLoader processes.
        train_aug: probe training crops, shuffled (else center crops in file order).
        rank, world_size, seed: this process's shard and the base seed of order and crops.
    """
    samples = find_split(data, split)
    return EvalLoader(samples, eval_transform(size, train_aug), batch_size=batch_size, num_workers=num_workers,
                      device=torch.device(device), mean=mean, std=std, shuffle=train_aug, rank=rank,
                      world_size=world_size, seed=seed)
