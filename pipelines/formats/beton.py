"""FFCV ``.beton`` files, written with FFCV's own ``DatasetWriter`` (fields ``image`` and ``label``).

``image`` is an ``RGBImageField``: ``raw`` (pixels as they are; use it for data of 64 px or less),
``jpg`` (every image JPEG-encoded at ``quality`` after its longer side is brought to ``max_side``),
``proportion`` (a random ``compress_p`` fraction as JPEG, the rest raw) or ``smart``. ``label`` is an
``IntField``. FFCV writes in place, so we point it at a temporary name and rename when it is done.

FFCV's writer waits for a sample counter that a crashed worker never advances (it would hang), so
the dataset is wrapped: a sample that fails is logged, replaced by a black pixel and flagged, and the
flag turns into an exception once the writer returns; the temporary file is then removed.

Reproducible bytes. FFCV's workers take chunks from a shared queue and book file pages as they fill
them, so with several workers the page layout (and the allocation table's order) depends on timing.
After such a write the file is rewritten in its canonical layout: samples in index order, packed into
pages by FFCV's own rule (a sample that does not fit the rest of a page starts the next one), the
allocation table sorted by sample -- exactly what one worker writes, so any ``num_workers`` gives the
same bytes. The one random draw of FFCV's encoder (``proportion`` mode's coin) is seeded per sample.
Writer processes die with us (:mod:`.children`): a killed writer leaves no worker behind holding the
temporary file or the ``/dev/shm`` metadata segment.
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

from . import BETON_MODES
from .children import children_die_with_us

__all__ = ["BetonError", "SampleSource", "beton_fields", "canonicalize_beton", "write_beton"]

log = logging.getLogger(__name__)


class BetonError(RuntimeError):
    """Writing a .beton failed; the message names the sample."""


class SampleSource(Protocol):
    """Indexable samples: ``samples[i] -> (image uint8 [H,W,3], int label)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


class _Guarded:
    """Wraps a sample source so that a failing sample cannot hang FFCV's writer (see module doc)."""

    def __init__(self, samples: SampleSource, failed: Any, seed: int) -> None:
        self.samples = samples
        self.failed = failed
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        np.random.seed([self.seed, i])  # FFCV's encoder draws from numpy's global RNG right after this
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
    seed: int = 0,
) -> int:
    """Write ``samples`` (``(uint8 [H,W,3], int label)`` by index) to ``path`` with FFCV's writer.

    Args:
        path: the ``.beton`` file; replaced only when complete.
        samples: indexable samples; read in worker processes (forked, so closures over arrays are fine).
        mode: ``raw`` | ``jpg`` | ``proportion`` | ``smart`` (see module doc).
        max_side: longer image side cap applied by FFCV before encoding (0 = keep).
        quality: JPEG quality for jpg-encoded images.
        compress_p: fraction JPEG-encoded in ``proportion`` mode.
        num_workers: writer processes (the file's bytes do not depend on it).
        chunk_size: samples handed to a worker at a time.
        seed: seeds ``proportion`` mode's per-sample JPEG-or-raw coin.

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
    workers = min(num_workers, n)
    raw_tmp = temp_name(path.with_name(path.name + ".unordered")) if workers > 1 else tmp
    try:
        writer = DatasetWriter(str(raw_tmp), fields, num_workers=workers)
        with children_die_with_us():
            writer.from_indexed_dataset(_Guarded(samples, failed, seed), chunksize=max(1, min(chunk_size, n)))
        if failed.value >= 0:
            raise BetonError(f"writing {str(path)!r}: sample {failed.value} failed (see the log above); "
                             "no file was written")
        if raw_tmp != tmp:
            canonicalize_beton(raw_tmp, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        raw_tmp.unlink(missing_ok=True)
    return n


def canonicalize_beton(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rewrite the .beton ``src`` into ``dst`` in the layout one FFCV worker writes (see module doc).

    Samples' data are copied in index order into fresh pages (a sample starts a new page when its
    allocations do not fit the rest of the current one), the pointers in the metadata follow them,
    and the allocation table is sorted by sample. Headers, field descriptors and metadata other than
    pointers are copied as they are.
    """
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_handlers, get_metadata_type
    from ffcv.utils import align_to_page

    src, dst = Path(src), Path(dst)
    # Structured arrays are read through bytearrays: numpy's copy() of a padded dtype does not keep
    # the padding bytes, and the bytes must not change.
    header = np.frombuffer(bytearray(np.fromfile(src, np.uint8, HeaderType.itemsize)), HeaderType)[0]
    n, page_size = int(header["num_samples"]), int(header["page_size"])
    descs = np.fromfile(src, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    meta_start = HeaderType.itemsize + descs.nbytes
    meta_type = get_metadata_type(get_handlers(descs))
    meta = np.frombuffer(bytearray(np.fromfile(src, np.uint8, n * meta_type.itemsize, offset=meta_start)), meta_type)
    table = np.fromfile(src, dtype=ALLOC_TABLE_TYPE, offset=int(header["alloc_table_ptr"]))
    table = table[np.argsort(table["sample_id"], kind="stable")].copy()  # keeps each sample's own order
    ptr_fields = [name for name in meta_type.names if "data_ptr" in (meta_type[name].names or ())]
    data = np.memmap(src, dtype=np.uint8, mode="r")
    start = align_to_page(meta_start + meta.nbytes, page_size)
    new_ptr = np.empty(len(table), dtype=np.uint64)
    bounds = np.flatnonzero(np.r_[True, table["sample_id"][1:] != table["sample_id"][:-1], True])
    with open(dst, "wb") as f:
        f.write(b"\0" * start)  # header, descriptors and metadata are written over this at the end
        page, used, buf = -1, page_size, np.zeros(page_size, np.uint8)
        for a, b in zip(bounds[:-1], bounds[1:]):
            sizes = table["size"][a:b].astype(np.int64)
            if used + int(sizes.sum()) > page_size:
                if page >= 0:
                    f.write(buf.tobytes())
                page, used = page + 1, 0
                buf.fill(0)
            for k in range(a, b):
                old, size = int(table["ptr"][k]), int(sizes[k - a])
                buf[used:used + size] = data[old:old + size]
                new_ptr[k] = start + page * page_size + used
                used += size
        if page >= 0:
            f.write(buf.tobytes())
        remap = dict(zip(table["ptr"].tolist(), new_ptr.tolist()))
        rows = meta.view(np.uint8).reshape(n, meta_type.itemsize)
        for name in ptr_fields:
            at = meta_type.fields[name][1] + meta_type[name].fields["data_ptr"][1]
            ptrs = np.array([remap[int(p)] for p in meta[name]["data_ptr"]], dtype="<u8")
            rows[:, at:at + 8] = ptrs.view(np.uint8).reshape(n, 8)
        table["ptr"] = new_ptr
        header["alloc_table_ptr"] = f.tell()
        f.write(table.tobytes())
        f.seek(0)
        f.write(header.tobytes())
        f.write(descs.tobytes())
        f.write(meta.tobytes())
    del data
