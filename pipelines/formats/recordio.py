"""MXNet RecordIO (``.rec`` + ``.idx``), the layout DALI's ``fn.readers.mxnet`` reads; no mxnet needed.

Layout of one record (all little-endian)::

    uint32 magic 0xced7230a                       (:data:`MAGIC`)
    uint32 lrecord = cflag << 29 | length          (cflag 0: the record is whole)
    IRHeader: uint32 flag, float32 label, uint64 id, uint64 id2      (flag 0: one float label)
    image bytes (JPEG or PNG)                     length = 24 + len(image bytes)
    zero padding to a multiple of 4 bytes

The ``.idx`` file has one ``"<index>\\t<byte offset>\\n"`` line per record. This module is the one
place that knows the layout: the magic word, the index format (:func:`read_index`,
:func:`check_index`) and the record parser (:func:`read_record`) are used by the DALI loader too, and
it imports no Numba at module level so that loaders can use it cheaply. Records are framed in chunks
by Numba kernels (:mod:`.kernels`) into one preallocated buffer per chunk, then written with a single
``write`` call. Both files are written under temporary names, fsynced and renamed, so a killed run
leaves either the previous files or complete new ones.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ressl.io import AtomicFile

__all__ = [
    "IR_HEADER_SIZE",
    "MAGIC",
    "MAGIC_CHECKS",
    "Record",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "check_index",
    "read_index",
    "read_record",
    "read_recordio",
    "write_recordio",
]

MAGIC = 0xCED7230A  # first word of every MXNet RecordIO record
IR_HEADER_SIZE = 24  # uint32 flag, float32 label, uint64 id, uint64 id2
MAGIC_CHECKS = 4096  # records whose magic word check_index reads (evenly spaced, plus the last)
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair that does not follow the MXNet layout; the message says where."""


class Record(NamedTuple):
    """One record: the image bytes, its label (first label when the header holds several), its id.

    Our writer stores in ``id`` the sample's index in its source split (before the shuffle), so a
    record can be traced back to the file it came from.
    """

    payload: bytes
    label: float
    id: int
    labels: tuple[float, ...]


def read_index(idx_path: str | os.PathLike) -> np.ndarray:
    """Byte offsets of the records listed in ``idx_path`` (int64 [N], in file order).

    Raises:
        FileNotFoundError: no such index.
        RecordIOError: a line that is not ``<integer key><whitespace><integer offset>`` (file:line named),
            or an index without records.
    """
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise FileNotFoundError(f"RecordIO index {str(idx_path)!r} does not exist")
    offsets = []
    with open(idx_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise RecordIOError(f"{idx_path}:{lineno}: expected '<index>\\t<offset>' (two integers), got {line!r}")
            offsets.append(int(parts[1]))
    if not offsets:
        raise RecordIOError(f"RecordIO index {str(idx_path)!r} is empty")
    return np.asarray(offsets, dtype=np.int64)


def check_index(rec_path: str | os.PathLike, offsets: np.ndarray, probes: int = MAGIC_CHECKS,
                max_bad: float = 0.0) -> None:
    """Check that ``offsets`` index ``rec_path``: inside the file, and records start where they point.

    Up to ``probes`` evenly spaced offsets plus the last are read (one random read each: seconds at
    most on ImageNet); an index written for another ``.rec`` fails on nearly every one of them.
    ``max_bad`` is the fraction of probes that may fail (a loader that skips corrupt records passes
    0.5: a few bad records are reported one by one, an index for another file fails here).

    Raises:
        RecordIOError: naming both files and the first offset that does not start a record.
    """
    rec_path = Path(rec_path)
    size = rec_path.stat().st_size
    if offsets.size == 0:
        raise RecordIOError(f"no records to check in {str(rec_path)!r}")
    last = int(offsets.max())
    if last + 8 > size:
        raise RecordIOError(f"the index of {str(rec_path)!r} points at byte {last} but the file has only {size} "
                            "bytes: the .idx belongs to another .rec")
    data = np.memmap(rec_path, dtype=np.uint8, mode="r")
    n = offsets.shape[0]
    probe = np.unique(np.r_[np.linspace(0, n - 1, min(probes, n)).astype(np.int64), n - 1])
    words = data[offsets[probe][:, None] + np.arange(4)].astype(np.uint32)
    magic = words[:, 0] | (words[:, 1] << 8) | (words[:, 2] << 16) | (words[:, 3] << 24)
    bad = probe[magic != MAGIC]
    if bad.size > max_bad * len(probe):
        raise RecordIOError(f"{len(bad)} of {len(probe)} checked offsets of {str(rec_path)!r} do not start a "
                            f"record (first: byte {int(offsets[bad[0]])}): the .idx belongs to another .rec")


def _frame(data: np.ndarray, pos: int, where: str) -> int:
    """Payload length of the record framed at ``pos`` (checked magic and whole-record flag)."""
    if pos + 8 > data.shape[0]:
        raise RecordIOError(f"{where}: record at byte {pos} runs past the end of the file")
    magic, lrecord = _FRAME.unpack(data[pos : pos + 8].tobytes())
    if magic != MAGIC:
        raise RecordIOError(f"{where}: bad magic {magic:#010x} at byte {pos} (expected {MAGIC:#010x})")
    cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
    if cflag != 0:
        raise RecordIOError(f"{where}: split record (cflag={cflag}) at byte {pos}; only whole records are supported")
    return length


def read_record(data: np.ndarray, offset: int, where: str = "RecordIO") -> Record:
    """Parse the record at byte ``offset`` of ``data`` (the ``.rec`` as uint8, e.g. a ``np.memmap``).

    Args:
        data: the whole file's bytes.
        offset: where the record starts (from the ``.idx``).
        where: how errors name the file (and record), e.g. ``"train.rec record 12"``.

    Raises:
        RecordIOError: bad magic, a split record, or a record that runs past the end of the file.
    """
    length = _frame(data, offset, where)
    if offset + 8 + length > data.shape[0] or length < IR_HEADER_SIZE:
        raise RecordIOError(f"{where}: record at byte {offset} is truncated")
    body = data[offset + 8 : offset + 8 + length].tobytes()
    flag, label, rid, _ = _IR_HEADER.unpack_from(body)
    start = IR_HEADER_SIZE
    labels: tuple[float, ...] = (label,)
    if flag > 0:  # MXNet multi-label: `flag` floats follow the header and replace `label`
        if start + 4 * flag > length:
            raise RecordIOError(f"{where}: record at byte {offset} declares {flag} labels but is too short")
        labels = struct.unpack_from(f"<{flag}f", body, start)
        start += 4 * flag
        label = labels[0]
    return Record(body[start:], float(label), int(rid), tuple(float(v) for v in labels))


class RecordIOWriter:
    """Append records in chunks; ``close()`` commits both files atomically, an exception discards them.

    Use as a context manager::

        with RecordIOWriter("train.rec", "train.idx") as w:
            w.write_many(payloads, labels)
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        if self.rec_path.resolve() == self.idx_path.resolve():
            raise ValueError(f"rec and idx paths must differ, both are {str(self.rec_path)!r}")
        self._rec = AtomicFile(self.rec_path)
        self._idx = AtomicFile(self.idx_path)
        self._offset = 0
        self._buffer = np.empty(0, dtype=np.uint8)
        self.count = 0

    def write_many(self, payloads: list[bytes], labels: Iterable[float], ids: Iterable[int] | None = None) -> None:
        """Frame and append one chunk of records.

        Args:
            payloads: image bytes, one per record.
            labels: float-convertible labels.
            ids: the IRHeader ``id`` of each record (default: the running record number).
        """
        labels_f = np.asarray(list(labels), dtype=np.float32)
        n = len(payloads)
        if labels_f.shape != (n,):
            raise ValueError(f"got {n} payloads but {labels_f.shape[0]} labels")
        ids_i = (np.arange(self.count, self.count + n, dtype=np.int64) if ids is None
                 else np.asarray(list(ids), dtype=np.int64))
        if ids_i.shape != (n,):
            raise ValueError(f"got {n} payloads but {ids_i.shape[0]} ids")
        if n == 0:
            return
        from . import kernels  # Numba: imported by writers only

        lengths = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=n)
        if lengths.max() + IR_HEADER_SIZE >= 1 << 29:
            raise ValueError(f"a record payload of {int(lengths.max())} bytes exceeds RecordIO's 512 MiB limit")
        payload_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=payload_offsets[1:])
        payload = np.frombuffer(b"".join(payloads), dtype=np.uint8)
        offsets = kernels.record_offsets(lengths, self._offset)
        size = int(offsets[-1] - offsets[0])
        if self._buffer.shape[0] < size:  # grown, then reused: no fresh pages to fault in per chunk
            self._buffer = np.empty(max(size, 2 * self._buffer.shape[0]), dtype=np.uint8)
        out = self._buffer[:size]
        kernels.pack_records(payload, payload_offsets, labels_f.view(np.uint32), ids_i, offsets, out)
        self._rec.write(out)
        keys = range(self.count, self.count + n)  # .idx keys: the record number, whatever the ids
        self._idx.write("".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets[:-1].tolist())).encode())
        self._offset = int(offsets[-1])
        self.count += n

    def close(self) -> None:
        """fsync and rename both files into place (the .rec first, then the .idx that indexes it)."""
        self._rec.commit()
        self._idx.commit()

    def abort(self) -> None:
        """Remove the temporary files; the final paths are left untouched."""
        self._rec.abort()
        self._idx.abort()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_recordio(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike,
    items: Iterable[tuple[bytes, float]],
    chunk_size: int = 256,
) -> int:
    """Write ``(image bytes, label)`` pairs as an MXNet ``.rec`` + ``.idx`` pair, atomically.

    Args:
        rec_path, idx_path: output files (replaced only once both are complete).
        items: image bytes (JPEG/PNG, as DALI decodes them) and an int or float label each.
        chunk_size: records framed per Numba call.

    Returns:
        The number of records written.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    with RecordIOWriter(rec_path, idx_path) as writer:
        payloads: list[bytes] = []
        labels: list[float] = []
        for payload, label in items:
            payloads.append(bytes(payload))
            labels.append(float(label))
            if len(payloads) == chunk_size:
                writer.write_many(payloads, labels)
                payloads, labels = [], []
        writer.write_many(payloads, labels)
    return writer.count


class RecordIOReader:
    """Random access to a ``.rec`` through its ``.idx`` (or by scanning the ``.rec`` when none is given)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file {str(self.rec_path)!r} does not exist")
        self._data = np.memmap(self.rec_path, dtype=np.uint8, mode="r") if self.rec_path.stat().st_size else (
            np.zeros(0, dtype=np.uint8))
        self.offsets = read_index(idx_path) if idx_path is not None else self._scan()

    def _scan(self) -> np.ndarray:
        offsets, pos, size = [], 0, self._data.shape[0]
        while pos < size:
            offsets.append(pos)
            pos += 8 + (_frame(self._data, pos, str(self.rec_path)) + 3) // 4 * 4
        return np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getitem__(self, i: int) -> Record:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        return read_record(self._data, int(self.offsets[i]), f"{self.rec_path} record {i % len(self)}")

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]


def read_recordio(
    rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
) -> Iterator[tuple[bytes, int]]:
    """Yield ``(image bytes, int label)`` for every record, in file order (for tests and checks)."""
    for record in RecordIOReader(rec_path, idx_path):
        yield record.payload, int(round(record.label))
