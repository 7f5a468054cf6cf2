"""Indexed samples of every layout ``make dataset`` writes, and the one-time check of their bytes.

A :class:`Samples` object gives, for sample ``i``, its encoded image bytes (or raw pixels), its label
and a printable name (a file path, or ``record i of <file>``). The DALI backend feeds the bytes to its
decoder through ``fn.external_source`` in its own order, and the eval loader decodes them with PIL,
so both read trees (:class:`TreeSamples`), RecordIO (:class:`RecordSamples`) and ``.beton``
(:class:`BetonSamples`) the same way.

:func:`bad_samples` decodes every sample once (cheaply, see :func:`pipelines.folder.verify_image`)
and caches the verdict in a small JSON file next to the data, keyed by a fingerprint of the names,
sizes and mtimes: a decoder that would crash on a zero-byte, truncated or random-bytes file, or on a
corrupt record, never sees one, and each is reported with its name and reason. When no sample at all
decodes it stops, naming the directory or file and the count, before any training step.

Opening a split of a converted dataset checks it against ``manifest.json``
(:func:`pipelines.formats.manifest.check_loaded`): the sample count found (tree files, ``.idx``
lines, ``.beton`` rows) and the file sizes must be the recorded ones, so a file copied in from
another dataset, or an ``.idx`` cut short, stops the loader with a message naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ressl.config import ConfigError
from ressl.io import atomic_write_json

from .fingerprint import file_fingerprint
from .folder import BadImageError, ImageFolderFiles, decode_rgb, display_name, verify_image
from .formats.manifest import check_loaded

__all__ = ["BetonSamples", "NoReadableSamplesError", "RecordSamples", "Samples", "TreeSamples", "bad_samples"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
REPORT_FIRST = 20  # bad samples logged one by one; the rest are counted (all are in the cache file)


class NoReadableSamplesError(ConfigError):
    """Not one sample of a split decodes; the message names the directory or file and the count."""


class Samples(Protocol):
    """Random access to one split's stored samples."""

    labels: np.ndarray  # int64 [N]
    cache_path: Path  # where the check verdict is cached
    location: str  # the tree or file, for messages

    def __len__(self) -> int: ...

    def encoded(self, i: int) -> bytes:
        """The stored image bytes of sample ``i`` (raises BadImageError when they cannot be read)."""
        ...

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` decoded to RGB (raises BadImageError)."""
        ...

    def name(self, i: int) -> str:
        """Printable name of sample ``i`` (file path, or record index and file)."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the stored samples may have changed (names, sizes, mtimes)."""
        ...


class TreeSamples:
    """An ImageFolder tree, labelled by ``classes`` (the train split's list; None = the tree's own)."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None):
        self.files = ImageFolderFiles(root, classes)
        self.root = self.files.root
        self.classes = self.files.classes
        self.paths = [p for p, _ in self.files.samples]
        self.labels = np.asarray([c for _, c in self.files.samples], dtype=np.int64)
        self.cache_path = self.root.parent / f".{self.root.name}.checked.json"
        self.location = display_name(str(self.root))
        check_loaded(self.root.parent, f"{self.root.name}/", len(self.paths), f"image folder {self.location}")

    def __len__(self) -> int:
        return len(self.paths)

    def encoded(self, i: int) -> bytes:
        try:
            return Path(self.paths[i]).read_bytes()
        except OSError as e:
            raise BadImageError(f"{self.name(i)}: unreadable: {e.strerror or e}") from e

    def image(self, i: int) -> Image.Image:
        return decode_rgb(self.encoded(i), self.name(i))

    def name(self, i: int) -> str:
        return display_name(self.paths[i])

    def fingerprint(self) -> str:
        return file_fingerprint(self.paths)


class _Mapped:
    """The file memory-mapped on first use; pickled (to DataLoader workers) without the mapping."""

    _file: Path
    _map: np.memmap | None

    @property
    def _data(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self._file, dtype=np.uint8, mode="r")
        return self._map

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


class RecordSamples(_Mapped):
    """A ``.rec`` + ``.idx`` pair; labels are read from the record headers (vectorised, no payload read)."""

    def __init__(self, rec: str | os.PathLike, idx: str | os.PathLike, num_classes: int | None = None):
        from .formats.recordio import IR_HEADER_SIZE, check_index, read_index

        self.rec, self.idx = Path(rec), Path(idx)
        if not self.rec.is_file():
            raise FileNotFoundError(f"RecordIO file {str(self.rec)!r} does not exist")
        if not self.idx.is_file():
            raise FileNotFoundError(f"RecordIO index {str(self.idx)!r} does not exist; it is written next to "
                                    f"{self.rec.name} by `make dataset` (FORMATS=rec)")
        self._file = self.rec
        self.offsets = read_index(self.idx)
        self.location = str(self.rec)
        check_loaded(self.rec.parent, f"{self.rec.stem}.rec", int(self.offsets.shape[0]), f"{self.idx} (the index)")
        check_index(self.rec, self.offsets, max_bad=0.5)  # single corrupt records are skipped later
        self._map: np.memmap | None = None
        self.labels = self._read_labels(IR_HEADER_SIZE)
        if num_classes is not None:
            out = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
            if out.size:
                raise ValueError(f"{self.rec}: record {int(out[0])} has label {int(self.labels[out[0]])}, outside "
                                 f"the {num_classes} classes of the train split ({out.size} such records)")
        self.cache_path = self.rec.parent / f".{self.rec.name}.checked.json"

    def _read_labels(self, header: int) -> np.ndarray:
        """First label of each record: the IRHeader's float, or (flag > 0) the first float after it."""
        size = self._data.shape[0]
        ok = self.offsets + 8 + header <= size  # records that run past the end are caught by the check
        pos = np.where(ok, self.offsets, 0)

        def word(at: np.ndarray, dtype) -> np.ndarray:
            b = self._data[np.minimum(at, size - 4)[:, None] + np.arange(4)]
            return np.ascontiguousarray(b).view(dtype)[:, 0]

        flag = word(pos + 8, np.uint32)
        label = word(pos + 12, np.float32)
        multi = flag > 0
        label = np.where(multi, word(pos + 8 + header, np.float32), label)
        return np.where(ok, np.round(label), -1).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def encoded(self, i: int) -> bytes:
        from .formats.recordio import RecordIOError, read_record

        try:
            return read_record(self._data, int(self.offsets[i]), self.name(i)).payload
        except RecordIOError as e:
            raise BadImageError(str(e)) from e

    def image(self, i: int) -> Image.Image:
        return decode_rgb(self.encoded(i), self.name(i))

    def name(self, i: int) -> str:
        return f"record {i} of {self.rec}"

    def fingerprint(self) -> str:
        return file_fingerprint([str(self.rec), str(self.idx)])


class BetonSamples(_Mapped):
    """An FFCV ``.beton`` (fields ``image``, ``label``), read through FFCV's Reader (header and tables)."""

    def __init__(self, path: str | os.PathLike):
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.reader import Reader

        self.path = self._file = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f".beton file {str(self.path)!r} does not exist")
        try:
            reader = Reader(str(self.path))
        except Exception as e:  # FFCV raises assorted errors on a truncated or foreign file
            raise ValueError(f"cannot read {str(self.path)!r} as a .beton: {e}") from e
        if "image" not in reader.handlers or "label" not in reader.handlers:
            raise ValueError(f"{str(self.path)!r} needs fields 'image' and 'label', has {list(reader.handlers)}")
        fields = list(reader.handlers)  # metadata columns are unnamed (f0, f1, ...), in field order
        self.meta = reader.metadata[f"f{fields.index('image')}"]
        label = reader.metadata[f"f{fields.index('label')}"]
        self.labels = np.asarray(label if label.dtype.names is None else label[label.dtype.names[0]], dtype=np.int64)
        table = reader.alloc_table
        self._size = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self._jpg = IMAGE_MODES["jpg"]
        self._map: np.memmap | None = None
        self.cache_path = self.path.parent / f".{self.path.name}.checked.json"
        self.location = str(self.path)
        check_loaded(self.path.parent, f"{self.path.stem}.beton", int(self.meta.shape[0]), str(self.path))

    def __len__(self) -> int:
        return int(self.meta.shape[0])

    def is_jpeg(self, i: int) -> bool:
        return int(self.meta["mode"][i]) == self._jpg

    def _bytes(self, i: int) -> np.ndarray:
        ptr = int(self.meta["data_ptr"][i])
        return self._data[ptr : ptr + self._size[ptr]]

    def encoded(self, i: int) -> bytes:
        if not self.is_jpeg(i):
            raise ValueError(f"{self.name(i)} holds raw pixels, not encoded bytes")
        return self._bytes(i).tobytes()

    def image(self, i: int) -> Image.Image:
        if self.is_jpeg(i):
            return decode_rgb(self.encoded(i), self.name(i))
        h, w = int(self.meta["height"][i]), int(self.meta["width"][i])
        return Image.fromarray(np.asarray(self._bytes(i)[: h * w * 3]).reshape(h, w, 3))

    def name(self, i: int) -> str:
        return f"record {i} of {self.path}"

    def fingerprint(self) -> str:
        return file_fingerprint([str(self.path)])


def _check_one(samples: Samples, i: int) -> str | None:
    try:
        if isinstance(samples, BetonSamples) and not samples.is_jpeg(i):
            return None  # raw pixels cannot be corrupt in a way a decoder would notice
        verify_image(samples.encoded(i), samples.name(i))
    except BadImageError as e:
        return str(e)
    return None


def bad_samples(samples: Samples, threads: int = 1, check: Callable[[Samples, int], str | None] = _check_one,
                ) -> dict[int, str]:
    """Index -> reason of every sample of ``samples`` that does not decode, checked once and cached.

    Raises:
        NoReadableSamplesError: every sample is bad (the directory or file and the count named).

    The verdict is cached in ``samples.cache_path`` (written atomically; skipped with a message when
    the directory is read-only) under a fingerprint of the stored files; a changed file is checked
    again. Every call logs the bad samples (the first :data:`REPORT_FIRST` by name) and their count.
    """
    key = samples.fingerprint()
    bad: dict[int, str] | None = None
    cache = samples.cache_path
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("version") == CACHE_VERSION and saved.get("fingerprint") == key \
                    and saved.get("count") == len(samples):
                bad = {int(i): str(r) for i, r in saved["bad"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable check cache (%s); checking the samples again", cache, e)
    if bad is None:
        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL releases the GIL while decoding
            verdicts = list(pool.map(lambda i: check(samples, i), range(len(samples))))
        bad = {i: r for i, r in enumerate(verdicts) if r is not None}
        try:
            atomic_write_json(cache, {"version": CACHE_VERSION, "fingerprint": key, "count": len(samples),
                                      "bad": sorted(bad.items())})
        except OSError as e:
            log.info("could not cache the sample check in %s (%s); it will run again next time", cache, e)
    if bad and len(bad) == len(samples):
        raise NoReadableSamplesError(f"{samples.location}: none of its {len(samples)} samples decodes as an image "
                                     f"(first: {next(iter(bad.values()))}); nothing to train on: replace the files "
                                     "or re-run `make dataset`")
    for reason in list(bad.values())[:REPORT_FIRST]:
        log.warning("skipping unreadable sample: %s", reason)
    if bad:
        log.warning("%d of %d samples do not decode and are skipped (all listed in %s)", len(bad), len(samples),
                    cache)
    return bad
