"""MXNet RecordIO (``.rec`` + ``.idx``), the layout DALI's ``fn.readers.mxnet`` reads; no mxnet needed.

Layout of one record (all little-endian)::

    uint32 magic 0xced7230a
    uint32 lrecord = cflag << 29 | length          (cflag 0: the record is whole)
    IRHeader: uint32 flag, float32 label, uint64 id, uint64 id2      (flag 0: one float label)
    image bytes (JPEG or PNG)                     length = 24 + len(image bytes)
    zero padding to a multiple of 4 bytes

The ``.idx`` file has one ``"<index>\\t<byte offset>\\n"`` line per record. Records are framed in
chunks by Numba kernels (:mod:`.kernels`) into one preallocated buffer per chunk, then written with a
single ``write`` call. Both files are written under temporary names, fsynced and renamed, so a killed
run leaves either the previous files or complete new ones.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import kernels
from ressl.io import AtomicFile

__all__ = ["Record", "RecordIOError", "RecordIOReader", "RecordIOWriter", "read_recordio", "write_recordio"]

_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair that does not follow the MXNet layout; the message says where."""


class Record(NamedTuple):
    """One record: the image bytes, its label (first label when the header holds several), its id."""

    payload: bytes
    label: float
    id: int
    labels: tuple[float, ...]


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

    def write_many(self, payloads: list[bytes], labels: Iterable[float]) -> None:
        """Frame and append one chunk of records (images ``payloads``, float-convertible ``labels``)."""
        labels_f = np.asarray(list(labels), dtype=np.float32)
        n = len(payloads)
        if labels_f.shape != (n,):
            raise ValueError(f"got {n} payloads but {labels_f.shape[0]} labels")
        if n == 0:
            return
        lengths = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=n)
        if lengths.max() + kernels.IR_HEADER_SIZE >= 1 << 29:
            raise ValueError(f"a record payload of {int(lengths.max())} bytes exceeds RecordIO's 512 MiB limit")
        payload_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=payload_offsets[1:])
        payload = np.frombuffer(b"".join(payloads), dtype=np.uint8)
        offsets = kernels.record_offsets(lengths, self._offset)
        size = int(offsets[-1] - offsets[0])
        if self._buffer.shape[0] < size:  # grown, then reused: no fresh pages to fault in per chunk
            self._buffer = np.empty(max(size, 2 * self._buffer.shape[0]), dtype=np.uint8)
        out = self._buffer[:size]
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        kernels.pack_records(payload, payload_offsets, labels_f.view(np.uint32), ids, offsets, out)
        self._rec.write(out)
        self._idx.write("".join(f"{i}\t{o}\n" for i, o in zip(ids.tolist(), offsets[:-1].tolist())).encode())
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
        self.offsets = self._read_idx(Path(idx_path)) if idx_path is not None else self._scan()

    def _read_idx(self, idx_path: Path) -> np.ndarray:
        if not idx_path.is_file():
            raise FileNotFoundError(f"RecordIO index {str(idx_path)!r} does not exist")
        offsets = []
        with open(idx_path) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise RecordIOError(f"{idx_path}:{lineno}: expected '<index>\\t<offset>', got {line!r}")
                offsets.append(int(parts[1]))
        return np.asarray(offsets, dtype=np.int64)

    def _scan(self) -> np.ndarray:
        offsets, pos, size = [], 0, self._data.shape[0]
        while pos < size:
            offsets.append(pos)
            _, length = self._frame(pos)
            pos += 8 + (length + 3) // 4 * 4
        return np.asarray(offsets, dtype=np.int64)

    def _frame(self, pos: int) -> tuple[int, int]:
        if pos + 8 > self._data.shape[0]:
            raise RecordIOError(f"{self.rec_path}: record at byte {pos} runs past the end of the file")
        magic, lrecord = _FRAME.unpack(self._data[pos : pos + 8].tobytes())
        if magic != kernels.RECORD_MAGIC:
            raise RecordIOError(f"{self.rec_path}: bad magic {magic:#010x} at byte {pos} "
                                f"(expected {kernels.RECORD_MAGIC:#010x})")
        cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
        if cflag != 0:
            raise RecordIOError(f"{self.rec_path}: split record (cflag={cflag}) at byte {pos}; "
                                "only whole records are supported")
        return cflag, length

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __getitem__(self, i: int) -> Record:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        pos = int(self.offsets[i])
        _, length = self._frame(pos)
        if pos + 8 + length > self._data.shape[0] or length < _IR_HEADER.size:
            raise RecordIOError(f"{self.rec_path}: record {i} at byte {pos} is truncated")
        body = self._data[pos + 8 : pos + 8 + length].tobytes()
        flag, label, rid, _ = _IR_HEADER.unpack_from(body)
        start = _IR_HEADER.size
        labels: tuple[float, ...] = (label,)
        if flag > 0:  # MXNet multi-label: `flag` floats follow the header and replace `label`
            labels = struct.unpack_from(f"<{flag}f", body, start)
            start += 4 * flag
            label = labels[0]
        return Record(body[start:], float(label), int(rid), tuple(float(v) for v in labels))

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]


def read_recordio(
    rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
) -> Iterator[tuple[bytes, int]]:
    """Yield ``(image bytes, int label)`` for every record, in file order (for tests and checks)."""
    for record in RecordIOReader(rec_path, idx_path):
        yield record.payload, int(round(record.label))
