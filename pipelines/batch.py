"""What every loader yields (:class:`Batch`), what it is (:class:`Loader`) and what it reads (:class:`LoaderConfig`).

Backends import these from here, not from the package ``__init__`` (which imports the backends).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from ressl.config import FFCV_ORDERS

__all__ = ["Batch", "Loader", "LoaderConfig", "FFCV_ORDERS"]



class Batch(NamedTuple):
    """One training batch on the device: weak view for the teacher, strong views for the student."""

    weak: torch.Tensor  # [B,3,H,W] float, normalised
    strong: list[torch.Tensor]  # one [B,3,h_i,w_i] per strong view, in spec order
    label: torch.Tensor  # [B] int64 (unused by SSL, kept for monitors and sanity checks)


@runtime_checkable
class Loader(Protocol):
    """What every backend returns. ``len()`` is batches per epoch for this process."""

    batch_size: int  # per process
    bad_files: int  # unreadable images / records skipped so far (each one is also logged with its name)

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle for ``epoch`` and skip the first ``start_batch`` batches (resume mid-epoch)."""
        ...


@dataclass(frozen=True)
class LoaderConfig:
    """Every option a loader reads. ``ressl.config.Config`` declares the same keys with the same defaults
    (a test checks it); :meth:`of` takes them from a Config or any object that has some of them.

    Workers vs threads: ``num_workers`` is always a count of *processes* (torchvision's DataLoader
    workers, 0 = load in the training process); ``num_threads`` is always a count of *threads*
    (DALI's CPU threads, FFCV's Numba threads), 0 = as many as ``num_workers`` (at least one), so a
    config that sets only ``num_workers`` gives every backend the same CPU budget.
    """

    data: str  # dataset directory: train/ val/ trees and/or <split>.beton, <split>.rec + .idx, manifest.json
    recipe: str = "imagenet224"  # name in pipelines.spec.PRESETS
    batch_size: int = 256  # global batch; each process loads batch_size // world_size
    num_workers: int = 8  # loader processes (torchvision DataLoader workers; 0 = in the training process)
    num_threads: int = 0  # loader threads (DALI CPU threads, FFCV Numba threads); 0 = max(1, num_workers)
    seed: int = 0  # base of every per-epoch order and augmentation stream
    channels_last: bool = True  # deliver NCHW tensors with channels-last strides
    ffcv_order: str = "auto"  # FFCV visiting order: auto | random | quasi_random (1 process) | sequential
    ffcv_os_cache: bool = True  # FFCV: let the OS page cache hold the .beton (False = FFCV's own cache)
    ffcv_batches_ahead: int = 3  # FFCV: batches prepared in advance
    dali_reader_workers: int = 0  # DALI: processes that read files and draw parameters ahead (0 = in the loop)

    def __post_init__(self) -> None:
        errs = []
        if self.batch_size < 1:
            errs.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.num_threads < 0 or self.dali_reader_workers < 0:
            errs.append(f"num_workers, num_threads and dali_reader_workers must be >= 0, got {self.num_workers}, "
                        f"{self.num_threads}, {self.dali_reader_workers}")
        if self.ffcv_order not in FFCV_ORDERS:
            errs.append(f"ffcv_order must be one of {FFCV_ORDERS}, got {self.ffcv_order!r}")
        if self.ffcv_batches_ahead < 1:
            errs.append(f"ffcv_batches_ahead must be >= 1, got {self.ffcv_batches_ahead}")
        if errs:
            raise ValueError("loader config: " + "; ".join(errs))

    @classmethod
    def of(cls, cfg: Any) -> LoaderConfig:
        """The loader options of ``cfg`` (a LoaderConfig, a ``ressl.config.Config``, or a namespace that
        has ``data`` and any of the other fields; absent ones take the defaults above)."""
        if isinstance(cfg, LoaderConfig):
            return cfg
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        if "data" not in values:
            raise ValueError(f"loader config: {type(cfg).__name__} has no 'data' (the dataset directory)")
        values["data"] = str(values["data"])
        return cls(**values)

    @property
    def threads(self) -> int:
        """DALI / FFCV thread count (``num_threads``, or ``num_workers`` when that is 0; at least 1)."""
        return self.num_threads or max(1, self.num_workers)

    def per_process_batch(self, world_size: int) -> int:
        """``batch_size // world_size``; the one place that checks the global batch splits evenly."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} (global) is not divisible by the {world_size} "
                             f"processes; choose a multiple of {world_size}")
        return self.batch_size // world_size
