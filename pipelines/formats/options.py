"""What a conversion is asked to write (:class:`ConvertOptions`), the order it writes records in, and the
error that names what stopped it."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import BETON_MODE_CHOICES, FORMATS

__all__ = ["UNLABELED_DIR", "ConvertError", "ConvertOptions", "all_cores", "record_order"]

UNLABELED_DIR = "_unlabeled"  # class folder of label -1 samples in ImageFolder trees


class ConvertError(RuntimeError):
    """Conversion cannot proceed; the message names the split, file or option."""


def all_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as a container or ``taskset`` sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ConvertOptions:
    """What to write and how. Defaults: JPEG quality 90, no resizing, raw .beton for <= 64 px data."""

    formats: tuple[str, ...] = ("beton", "rec")
    max_side: int = 0  # cap on the longer side of re-encoded / .beton JPEG images; 0 = keep
    quality: int = 90  # JPEG quality of re-encoded images
    beton_mode: str = "auto"  # one of BETON_MODE_CHOICES; auto = raw or jpg, decided once per dataset
    compress_p: float = 0.5  # JPEG fraction in beton "proportion" mode
    workers: int = field(default_factory=all_cores)  # processes of the encode pass (decode + encode)
    force: bool = False  # rebuild outputs even when the manifest says they are finished
    chunk_size: int = 256  # records framed per Numba call
    progress: bool | None = None  # tqdm bars; None = only on a terminal
    seed: int = 0  # of the records' random order (and of .beton "proportion" mode's coin)

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConvertError(f"formats must be a non-empty subset of {FORMATS}, got {list(self.formats)}")
        if self.max_side < 0:
            raise ConvertError(f"max_side must be >= 0 (0 keeps the size), got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ConvertError(f"quality must be in [1, 100], got {self.quality}")
        if self.beton_mode not in BETON_MODE_CHOICES:
            raise ConvertError(f"beton_mode must be one of {', '.join(BETON_MODE_CHOICES)}, got {self.beton_mode!r}")
        if not 0.0 <= self.compress_p <= 1.0:
            raise ConvertError(f"compress_p must be in [0, 1], got {self.compress_p}")
        if self.workers < 1:
            raise ConvertError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ConvertError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.seed < 0:
            raise ConvertError(f"seed must be >= 0, got {self.seed}")


def record_order(seed: int, split_name: str, n: int) -> np.ndarray:
    """The order split ``split_name``'s ``n`` source samples are written in (int64 [n], a permutation)."""
    return np.random.default_rng([seed, zlib.crc32(split_name.encode())]).permutation(n).astype(np.int64)
