"""FFCV ``.beton`` files, written with FFCV's own ``DatasetWriter`` (fields ``image`` and ``label``).

``image`` is an ``RGBImageField``: ``raw`` (pixels as they are; use it for data of 64 px or less),
``jpg`` (every image JPEG-encoded at ``quality`` after its longer side is brought to ``max_side``),
``proportion`` (a random ``compress_p`` fraction as JPEG, the rest raw) or ``smart``. ``label`` is an
``IntField``. FFCV writes in place, so we point it at a temporary name and rename when it is done.

FFCV's writer waits for a sample counter that a crashed worker never advances (it would hang), so
the dataset is wrapped: a sample that fails is logged, replaced by a black pixel and flagged, and the
flag turns into an exception once the writer returns; the temporary file is then removed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ressl.io import fsync_dir, temp_name

__all__ = ["BETON_MODES", "BetonError", "SampleSource", "beton_fields", "write_beton"]

log = logging.getLogger(__name__)

BETON_MODES = ("raw", "jpg", "proportion", "smart")


class BetonError(RuntimeError):
    """Writing a .beton failed; the message names the sample."""


class SampleSource(Protocol):
    """Indexable samples: ``samples[i] -> (image uint8 [H,W,3], int label)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


class _Guarded:
    """Wraps a sample source so that a failing sample cannot hang FFCV's writer (see module doc)."""

    def __init__(self, samples: SampleSource, failed: Any) -> None:
        self.samples = samples
        self.failed = failed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            image, label = self.samples[i]
            image = np.ascontiguousarray(image, dtype=np.uint8)
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an image of shape [H,W,3], got {image.shape}")
            return image, int(label)
        except Exception:
            log.exception("sample %d could not be prepared for the .beton", i)
            with self.failed.get_lock():
                if self.failed.value < 0:
                    self.failed.value = i
            return np.zeros((1, 1, 3), dtype=np.uint8), 0


def beton_fields(mode: str = "raw", max_side: int = 0, quality: int = 90, compress_p: float = 0.5) -> dict[str, Any]:
    """The FFCV fields we store: ``image`` (RGBImageField in ``mode``) and ``label`` (IntField)."""
    from ffcv.fields import IntField, RGBImageField

    if mode not in BETON_MODES:
        raise ValueError(f"beton mode must be one of {BETON_MODES}, got {mode!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    if not 0.0 <= compress_p <= 1.0:
        raise ValueError(f"compress_p is a probability in [0, 1], got {compress_p}")
    image = RGBImageField(write_mode=mode, max_resolution=max_side or None, jpeg_quality=quality,
                          compress_probability=compress_p)
    return {"image": image, "label": IntField()}


def write_beton(
    path: str | os.PathLike,
    samples: SampleSource | Sequence[tuple[np.ndarray, int]],
    *,
    mode: str = "raw",
    max_side: int = 0,
    quality: int = 90,
    compress_p: float = 0.5,
    num_workers: int = 1,
    chunk_size: int = 100,
) -> int:
    """Write ``samples`` (``(uint8 [H,W,3], int label)`` by index) to ``path`` with FFCV's writer.

    Args:
        path: the ``.beton`` file; replaced only when complete.
        samples: indexable samples; read in worker processes (forked, so closures over arrays are fine).
        mode: ``raw`` | ``jpg`` | ``proportion`` | ``smart`` (see module doc).
        max_side: longer image side cap applied by FFCV before encoding (0 = keep).
        quality: JPEG quality for jpg-encoded images.
        compress_p: fraction JPEG-encoded in ``proportion`` mode.
        num_workers: writer processes.
        chunk_size: samples handed to a worker at a time.

    Returns:
        The number of samples written.
    """
    from ffcv.writer import DatasetWriter

    path = Path(path)
    n = len(samples)
    if n == 0:
        raise BetonError(f"refusing to write an empty .beton to {str(path)!r}: no samples")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    fields = beton_fields(mode, max_side, quality, compress_p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    failed = mp.Value("q", -1)
    try:
        writer = DatasetWriter(str(tmp), fields, num_workers=min(num_workers, n))
        writer.from_indexed_dataset(_Guarded(samples, failed), chunksize=max(1, min(chunk_size, n)))
        if failed.value >= 0:
            raise BetonError(f"writing {str(path)!r}: sample {failed.value} failed (see the log above); "
                             "no file was written")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return n
