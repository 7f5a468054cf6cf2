"""Dataset sources: where images come from, before conversion, as labelled splits.

A :class:`Source` lists its classes (sorted by name, so labels follow ImageFolder: class ``i`` is the
``i``-th name) and its splits. A split is either an :class:`ArraySplit` (decoded HWC uint8 images in
memory: demo, CIFAR, STL-10) or a :class:`FileSplit` (encoded image files on disk: ImageNet,
ImageFolder trees, Tiny-ImageNet). Splits load lazily so a re-run that finds every output finished
never reads a 2.7 GB archive.

Every constructor validates its inputs (missing archive, missing split, empty class folder) and raises
:class:`SourceError` naming the path and what was expected, before any conversion starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ArraySplit",
    "FileSplit",
    "Source",
    "SourceError",
    "SOURCES",
    "build_source",
    "demo_source",
]


class SourceError(ValueError):
    """A source that cannot be read; the message names the path and what was expected."""


@dataclass
class ArraySplit:
    """Decoded images in memory: ``images`` uint8 [N,H,W,3], ``labels`` int64 [N] (-1 = unlabeled)."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str] | None = None  # file stems for the ImageFolder tree; default the index

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise SourceError(f"ArraySplit images must be uint8 [N,H,W,3], got {self.images.dtype} "
                              f"{self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise SourceError(f"ArraySplit labels must be [{self.images.shape[0]}], got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class FileSplit:
    """Encoded images on disk: one path and one label (int, -1 = unlabeled) per sample."""

    paths: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.paths) != self.labels.shape[0]:
            raise SourceError(f"FileSplit has {len(self.paths)} paths but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return len(self.paths)


Split = ArraySplit | FileSplit


@dataclass
class Source:
    """A named dataset: classes, lazily loaded splits and facts for the manifest.

    Attributes:
        name: dataset name (the output folder under OUT).
        classes: class names; label ``i`` is ``classes[i]`` and the names sort in label order.
        loaders: split name -> zero-argument function that loads it.
        folder_splits: split name -> directory, for splits that already are ImageFolder trees (they are
            linked, not copied, and only when the "folder" format is asked for).
        info: JSON-able description (source path, archive names) stored in the manifest.
        max_side_hint: the longest image side when known without decoding (32 for CIFAR), else 0.
    """

    name: str
    classes: list[str]
    loaders: dict[str, Callable[[], Split]]
    folder_splits: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    max_side_hint: int = 0
    _cache: dict[str, Split] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> list[str]:
        return list(self.loaders)

    def split(self, name: str) -> Split:
        """Load (once) and return split ``name``."""
        if name not in self.loaders:
            raise SourceError(f"dataset {self.name!r} has no split {name!r}; splits are {self.splits}")
        if name not in self._cache:
            self._cache[name] = self.loaders[name]()
        return self._cache[name]


# ------------------------------------------------------------------------------------------------
# demo: scikit-learn's handwritten digits, shipped inside the wheel (no network)


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class split: ``val_fraction`` of every class to val, the rest to train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _upscale_digits(images: np.ndarray, size: int) -> np.ndarray:
    """8x8 digits with 17 grey levels (0..16) -> [N,size,size,3] uint8, bicubic, grey in all channels."""
    from PIL import Image

    grey = np.round(images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out = np.empty((len(grey), size, size, 3), dtype=np.uint8)
    for i, g in enumerate(grey):
        big = np.asarray(Image.fromarray(g, mode="L").resize((size, size), Image.Resampling.BICUBIC))
        out[i] = big[:, :, None]
    return out


def demo_source(size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Source:
    """scikit-learn's 1,797 handwritten digits, upscaled to ``size`` px RGB, split per class.

    A real (if small) dataset that needs no network: the 8x8 images ship inside the scikit-learn
    wheel. Classes are "0".."9" (they sort in label order); 80/20 stratified split with a fixed seed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = _upscale_digits(digits.images, size)
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)

    def make(idx: np.ndarray) -> Callable[[], ArraySplit]:
        return lambda: ArraySplit(images[idx], labels[idx], [f"digit_{i:04d}" for i in idx])

    return Source(
        name="demo",
        classes=[str(c) for c in range(10)],
        loaders={"train": make(train_idx), "val": make(val_idx)},
        info={"origin": "sklearn.datasets.load_digits", "size": size, "val_fraction": val_fraction,
              "seed": seed},
        max_side_hint=size,
    )


SOURCES: dict[str, Callable[..., Source]] = {
    "demo": lambda src=None, **_: demo_source(),
}


def build_source(name: str, src: str | os.PathLike | None = None, **options: Any) -> Source:
    """The source called ``name`` (a key of :data:`SOURCES`), reading from ``src`` where it needs files."""
    if name not in SOURCES:
        raise SourceError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](src=Path(src) if src is not None else None, **options)
