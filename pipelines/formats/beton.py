"""FFCV ``.beton`` files (fields ``image`` and ``label``), encoded by FFCV's own fields, laid out here.

``image`` is an ``RGBImageField``: ``raw`` (pixels as they are; use it for data of 64 px or less),
``jpg`` (every image JPEG-encoded at ``quality`` after its longer side is brought to ``max_side``),
``proportion`` (a random ``compress_p`` fraction as JPEG, the rest raw) or ``smart``. ``label`` is an
``IntField``.

Why not FFCV's ``DatasetWriter``: its main process polls a sample counter that a dead worker never
advances, so a worker that fails (an image whose raw pixels exceed a page: "Tried allocating
108000000 but page size is 8388608"; a full disk) leaves it spinning forever, with a temporary file
and a ``/dev/shm`` segment behind; its workers book pages as they race, so the bytes depend on the
worker count; and it would decode every image a second time after the converter's validity scan. So
each sample is encoded by FFCV's own ``Field.encode`` (in our worker processes, see
:func:`encode_sample`) and :class:`BetonWriter` writes the file in the main process, streaming, in
FFCV's layout: header, field descriptors, one metadata row per sample, then the data in pages of
``page_size`` bytes (a sample that does not fit the rest of a page starts the next one, every page
written whole), then the allocation table sorted by sample. That is the file one FFCV worker writes
(byte for byte when the sample count is known up front: a test compares it with ``DatasetWriter``),
whatever the number of our workers, and FFCV's ``Reader`` and ``Loader`` read it as their own.

An image in a raw-capable mode whose pixels would not fit one page is downscaled to the largest size
that does (FFCV's ``INTER_AREA`` resize, aspect kept) and the resize is reported; a JPEG-encoded
sample larger than a page is an error naming it (pass a ``max_side``). The one random draw of FFCV's
encoder (``proportion`` mode's coin) is seeded per sample.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ressl.io import fsync_dir, temp_name

from . import BETON_MODES
from .children import ordered_map

__all__ = ["PAGE_SIZE", "BetonError", "BetonWriter", "SampleSource", "beton_fields", "encode_sample", "write_beton"]

log = logging.getLogger(__name__)

PAGE_SIZE = 1 << 23  # FFCV DatasetWriter's default page (8 MiB); a sample's data must fit one page


class BetonError(RuntimeError):
    """Writing a .beton failed; the message names the sample (or file) and the cause."""


class SampleSource(Protocol):
    """Indexable samples: ``samples[i] -> (image uint8 [H,W,3], int label)``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


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


def fit_to_page(image: np.ndarray, mode: str, max_side: int = 0, page_size: int = PAGE_SIZE,
                ) -> tuple[np.ndarray, str]:
    """``image`` as the ``image`` field will store it, downscaled when its raw pixels exceed a page.

    Only raw-capable modes (raw, proportion, smart) are fitted; ``max_side`` is applied first, as the
    field would. Returns the image and a reason ("" when unchanged in size beyond ``max_side``).
    """
    from ffcv.fields.rgb_image import resizer

    if mode == "jpg" or image.nbytes <= page_size:
        return image, ""
    image = resizer(image, max_side or None)
    h, w = image.shape[:2]
    if image.nbytes <= page_size:
        return image, ""
    scale = math.sqrt(page_size / image.nbytes)
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    while nw * nh * 3 > page_size:
        nw, nh = max(1, nw - 1), max(1, nh - 1)
    import cv2

    small = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_AREA)
    return small, (f"resized from {w}x{h} to {nw}x{nh} for the {mode} .beton: its raw pixels ({image.nbytes:,} "
                   f"bytes) exceed one {page_size // (1 << 20)} MiB page")


def encode_sample(fields: dict[str, Any], values: Sequence[Any], seed: int, index: int) -> tuple[bytes, list[bytes]]:
    """One sample through FFCV's ``Field.encode``: its metadata row and its data allocations.

    The row's data pointers hold 1-based allocation numbers; :meth:`BetonWriter.append` replaces them
    with file offsets. Numpy's global RNG is seeded with ``(seed, index)`` first (the coin of
    ``proportion`` mode).
    """
    from ffcv.types import get_metadata_type

    np.random.seed([seed, index])
    row = np.zeros(1, get_metadata_type(list(fields.values())))
    allocations: list[np.ndarray] = []

    def malloc(size: int) -> tuple[int, np.ndarray]:
        allocations.append(np.zeros(int(size), np.uint8))
        return len(allocations), allocations[-1]

    for name, field, value in zip(row.dtype.names, fields.values(), values):
        field.encode(row[name][0:1], value, malloc)
    return row.tobytes(), [a.tobytes() for a in allocations]


class BetonWriter:
    """Writes a .beton in FFCV's layout from encoded samples, in order (see module doc).

    ``capacity`` is the most samples that will be appended (the data region starts after their
    metadata); fewer may come (skipped files). Written under a temporary name; :meth:`close` publishes
    the file, :meth:`abort` (or an exception inside ``with``) removes it.
    """

    def __init__(self, path: str | os.PathLike, fields: dict[str, Any], capacity: int,
                 page_size: int = PAGE_SIZE) -> None:
        from ffcv.types import FieldDescType, HeaderType, get_metadata_type
        from ffcv.utils import align_to_page

        if capacity < 1:
            raise BetonError(f"refusing to write an empty .beton to {str(path)!r}: no samples")
        self.path = Path(path)
        self.fields = fields
        self.page_size = page_size
        self.meta_type = get_metadata_type(list(fields.values()))
        self.ptr_fields = [n for n in self.meta_type.names if "data_ptr" in (self.meta_type[n].names or ())]
        self.meta = np.zeros(capacity, self.meta_type)
        self.meta_start = HeaderType.itemsize + len(fields) * FieldDescType.itemsize
        self.data_start = align_to_page(self.meta_start + self.meta.nbytes, page_size)
        self.count = 0
        self.table: list[tuple[int, int, int]] = []  # (sample, file offset, size)
        self.page, self.used = -1, page_size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.path)
        self._f = open(self.tmp, "wb")
        self._f.seek(self.data_start)

    def __enter__(self) -> BetonWriter:
        return self

    def __exit__(self, exc_type: Any, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, row: bytes, payloads: list[bytes], name: str = "") -> None:
        """Add the next sample (from :func:`encode_sample`); ``name`` is how errors call it."""
        j = self.count
        if j >= self.meta.shape[0]:
            raise BetonError(f"{self.path}: more samples than the {self.meta.shape[0]} announced")
        total = sum(len(p) for p in payloads)
        if total > self.page_size:
            raise BetonError(f"{name or f'sample {j}'}: its encoded image is {total:,} bytes, more than one "
                             f"{self.page_size // (1 << 20)} MiB .beton page; pass a max side (--max-side) to "
                             "store it smaller")
        if payloads and self.used + total > self.page_size:
            if self.page >= 0:
                self._f.write(bytes(self.page_size - self.used))
            self.page, self.used = self.page + 1, 0
        ptrs = []
        for p in payloads:
            ptrs.append(self.data_start + self.page * self.page_size + self.used)
            self._f.write(p)
            self.table.append((j, ptrs[-1], len(p)))
            self.used += len(p)
        rec = np.frombuffer(bytearray(row), self.meta_type)
        for name_ in self.ptr_fields:
            token = int(rec[name_]["data_ptr"][0])
            if token:
                rec[name_]["data_ptr"] = ptrs[token - 1]
        self.meta[j] = rec[0]
        self.count += 1

    def close(self) -> None:
        """Write the last page, the allocation table and the head; fsync and rename into place."""
        from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType

        if self._f.closed:
            return
        try:
            if self.count == 0:
                raise BetonError(f"refusing to write an empty .beton to {str(self.path)!r}: no samples")
            if self.page >= 0:
                self._f.write(bytes(self.page_size - self.used))
            table_ptr = self._f.tell()
            self._f.write(np.array(self.table, dtype=ALLOC_TABLE_TYPE).tobytes())
            header = np.zeros(1, HeaderType)
            header["version"], header["num_fields"], header["page_size"] = CURRENT_VERSION, len(self.fields), \
                self.page_size
            header["num_samples"], header["alloc_table_ptr"] = self.count, table_ptr
            descs = np.zeros(len(self.fields), FieldDescType)
            type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
            for k, (name, field) in enumerate(self.fields.items()):
                descs["type_id"][k] = type_ids.get(type(field), 255)
                encoded = np.frombuffer(name.encode("ascii"), np.uint8)[: descs["name"].shape[1]]
                descs["name"][k, : encoded.size] = encoded
                descs["arguments"][k] = field.to_binary()[0]
            self._f.seek(0)
            self._f.write(header.tobytes() + descs.tobytes() + self.meta[: self.count].tobytes())
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file (a buffered write that fails again while closing is ignored)."""
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)


def _encode_index(job: dict[str, Any], i: int) -> tuple[bytes, list[bytes], str]:
    try:
        image, label = job["samples"][i]
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an image of shape [H,W,3], got {image.shape}")
        image, note = fit_to_page(image, job["mode"], job["max_side"])
        row, payloads = encode_sample(job["fields"], (image, int(label)), job["seed"], i)
    except Exception as e:
        raise BetonError(f"sample {i} failed: {type(e).__name__}: {e}") from None
    return row, payloads, note


def write_beton(
    path: str | os.PathLike,
    samples: SampleSource | Sequence[tuple[np.ndarray, int]],
    *,
    mode: str = "raw",
    max_side: int = 0,
    quality: int = 90,
    compress_p: float = 0.5,
    num_workers: int = 1,
    chunk_size: int = 16,
    seed: int = 0,
) -> int:
    """Write ``samples`` (``(uint8 [H,W,3], int label)`` by index) to ``path`` (see module doc).

    Args:
        path: the ``.beton`` file; replaced only when complete.
        samples: indexable samples; read in worker processes (forked, so closures over arrays are fine).
        mode: ``raw`` | ``jpg`` | ``proportion`` | ``smart``.
        max_side: longer image side cap applied by FFCV's field before encoding (0 = keep).
        quality: JPEG quality for jpg-encoded images.
        compress_p: fraction JPEG-encoded in ``proportion`` mode.
        num_workers: encoding processes (the file's bytes do not depend on it).
        chunk_size: samples handed to a worker at a time.
        seed: seeds ``proportion`` mode's per-sample JPEG-or-raw coin.

    Returns:
        The number of samples written.

    Raises:
        BetonError: no samples, or a sample that fails (named, with the cause); nothing is written.
    """
    n = len(samples)
    if n == 0:
        raise BetonError(f"refusing to write an empty .beton to {str(path)!r}: no samples")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    fields = beton_fields(mode, max_side, quality, compress_p)
    job = {"samples": samples, "fields": fields, "mode": mode, "max_side": max_side, "seed": seed}
    with BetonWriter(path, fields, n) as writer, contextlib.closing(ordered_map(
            _encode_index, range(n), num_workers, state=job, chunk_size=chunk_size, describe=lambda i: f"sample {i}",
    )) as results:
        for i, (row, payloads, note) in enumerate(results):
            if note:
                log.warning("sample %d: %s", i, note)
            writer.append(row, payloads, f"sample {i}")
    return n
