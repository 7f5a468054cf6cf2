"""The dataset source model: a named dataset as classes and lazily loaded, labelled splits.

A :class:`Source` lists its classes (sorted by name, so labels follow ImageFolder: class ``i`` is the
``i``-th name) and its splits. A split is either an :class:`ArraySplit` (decoded HWC uint8 images in
memory: demo, CIFAR, STL-10) or a :class:`FileSplit` (encoded image files on disk: ImageNet,
ImageFolder trees, Tiny-ImageNet). Splits load lazily so a re-run that finds every output finished
never reads a 2.7 GB archive.

Each split has a :meth:`Source.fingerprint`: a SHA-256 over the names, sizes and modification times of
the files it is read from (image files, archives, ground-truth and class-list files), so a re-run
notices a changed source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.fingerprint import file_fingerprint

__all__ = ["ArraySplit", "FileSplit", "Source", "SourceError", "Split"]


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
        stamp_paths: files that in-memory (array) splits are read from, for the fingerprint; None for
            sources whose splits list their image files (those files are stamped instead).
        label_files: ground-truth / class-list files the labels come from (stamped for every split).
        skipped_classes: empty class folders left out of ``classes``: ``{"class", "reason"}`` each.
    """

    name: str
    classes: list[str]
    loaders: dict[str, Callable[[], Split]]
    folder_splits: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    max_side_hint: int = 0
    stamp_paths: list[str] | None = None
    label_files: list[str] = field(default_factory=list)
    skipped_classes: list[dict[str, str]] = field(default_factory=list)
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

    def fingerprint(self, name: str) -> str:
        """SHA-256 of what split ``name`` is read from: (path, size, mtime) of each file, the classes and
        ``info``. Cheap: array splits stamp their archive instead of loading it."""
        paths = self.stamp_paths if self.stamp_paths is not None else list(getattr(self.split(name), "paths", []))
        salt = json.dumps([self.name, name, self.classes, self.info], sort_keys=True, default=str).encode()
        return file_fingerprint([*paths, *self.label_files], salt)
