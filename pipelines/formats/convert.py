"""Conversion engine behind ``tools/dataset.py``: a :class:`~.sources.Source` into OUT/NAME/.

For every split it writes, as asked: an ImageFolder tree ``SPLIT/<class>/<file>`` (always for
sources that are not one already), ``SPLIT.rec`` + ``SPLIT.idx`` (MXNet RecordIO) and ``SPLIT.beton``
(FFCV), then ``manifest.json``: source, classes, counts per split and class, every skipped or
converted file with its reason, the format parameters and a SHA-256 of each output.

Records are written in a **seeded random order** (RecordIO and .beton alike): split ``S`` visits its
source samples in ``numpy.random.default_rng([seed, crc32(S)]).permutation(n)``, skipped files
dropped, as ``im2rec --shuffle`` and FFCV's writers are normally used; readers that take contiguous
shards plus a small shuffle buffer (DALI's ``readers.mxnet``) then still see every class. Labels are
unchanged; a RecordIO record's ``id`` is the sample's index in its source split, and the manifest
records the seed. The tree is not ordered (its files are sorted by name, as ImageFolder lists them).

One pass per split, in ``workers`` processes (default: every core this process may use), opens and
decodes every image **once**: bad files are classified (skipped: empty, not an image,
truncated/corrupt; converted to RGB JPEG: CMYK, grayscale, palette, PNG or other formats, with the
reason), record payloads are produced (source JPEG bytes passed through untouched when possible; PNG
for in-memory arrays, lossless), tree files are written, and the decoded pixels are encoded for the
``.beton`` by FFCV's own field (:mod:`.beton`); 16-bit images are scaled to 8 bits (``v / 257``, not
clipped). The main process writes the ``.rec``/``.idx`` and the ``.beton`` as the results arrive, in
order. Without a ``.beton`` to write, JPEGs are only entropy-decoded (IDCT at 1/8 scale) to check them.

A failure ends the conversion with a :class:`ConvertError` that names the file and the cause -- an
image that cannot be encoded, a worker that dies (:func:`.children.ordered_map`), a full disk -- and
removes every temporary it made. The output directory is locked for the whole conversion
(``OUT/NAME/.lock``, :class:`ressl.run.RunLock`, as training locks its run directory): a second
``make dataset`` into it stops at once, naming the first.

Every output is written under a temporary name and renamed when complete, and the manifest is
rewritten after each one, so a re-run skips what is finished (same parameters, same source
fingerprint -- names, sizes and modification times of the source files -- and files whose sizes,
sample counts and SHA-256 match the manifest, :mod:`.manifest`), rebuilds what the source changed
under, or what no longer matches, saying so, and ``force`` rebuilds everything. Worker processes die
with the converter (:mod:`.children`), and any ``workers`` count writes the same bytes.

``beton_mode="auto"`` is decided **once per dataset**: raw pixels when the median longer side of the
first split converted (train; up to 1,000 images in record order, read from their headers) is at most
:data:`~pipelines.formats.RAW_MAX_SIDE` px, JPEG otherwise; every split uses that mode (recorded as
``beton_auto`` in the manifest), so one odd image cannot flip a split, and train and val are stored
alike. In raw mode an image whose pixels would not fit one 8 MiB ``.beton`` page (about 1,670 px
square) is downscaled to the largest size that fits and listed in the manifest with the reason: it
is an outlier among small images, and a loader sizes its per-sample buffers by the largest image.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.folder import IMAGE_EXTENSIONS, WIDE_MODES, to_rgb
from ressl.io import atomic_write_json, fsync_dir, remove_stale_temps, replace_dir, temp_name

from . import BETON_MODE_CHOICES, FORMATS, RAW_MAX_SIDE, kernels
from .beton import BetonError
from .children import WorkerDiedError, ordered_map
from .manifest import MANIFEST, MANIFEST_VERSION, check_output, load_manifest
from .sources import ArraySplit, FileSplit, Source, SourceError

__all__ = ["ConvertError", "ConvertOptions", "all_cores", "convert", "inspect_image", "load_manifest",
           "record_order"]

log = logging.getLogger(__name__)

UNLABELED_DIR = "_unlabeled"  # class folder of label -1 samples in ImageFolder trees
_JPEG_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif")


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


# ------------------------------------------------------------------------------------------------
# one image: classify, convert, encode


@dataclass
class Inspection:
    """What :func:`inspect_image` found: ``status`` is ok, converted or skipped; ``reason`` says why."""

    status: str
    reason: str = ""
    width: int = 0
    height: int = 0
    payload: bytes | None = None  # JPEG bytes for the record (original or re-encoded)
    tree_bytes: bytes | None = None  # bytes for the ImageFolder copy when they differ from the file
    pixels: np.ndarray | None = None  # uint8 [H,W,3] (at the draft scale when resizing), when asked


def _encode_jpeg(image: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _wide_reason(mode: str) -> str:
    what = "16-bit" if mode.startswith("I;16") else ("32-bit float" if mode == "F" else "32-bit integer")
    how = "v / 257" if mode.startswith("I;16") else "16-bit range or min..max"
    return f"{what} grey ({mode}) scaled to 8 bits ({how})"


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    plan = kernels.resize_plan(np.array([width], np.int64), np.array([height], np.int64), max_side)
    return int(plan[0, 0]), int(plan[0, 1])


def inspect_image(path: str, max_side: int = 0, quality: int = 90, want_payload: bool = True,
                  want_pixels: bool = False) -> Inspection:
    """Open ``path`` fully and decide: pass through, convert to RGB JPEG, or skip (never raises).

    Args:
        path: image file.
        max_side: longer side of the record payload; larger images are resized and re-encoded.
        quality: JPEG quality when re-encoding.
        want_payload: produce the record/tree bytes (False = classify only).
        want_pixels: keep the decoded RGB pixels (for the .beton): the one decode serves the check,
            the record and the .beton.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Inspection("skipped", f"unreadable: {e.strerror or e}")
    if not data:
        return Inspection("skipped", "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format or "unknown", img.mode
            width, height = img.size
            reasons = []
            if fmt != "JPEG":
                ext = Path(path).suffix.lower()
                reasons.append(f"{fmt} data in a '{ext}' file" if ext in _JPEG_EXTS else f"{fmt} image")
            if mode in WIDE_MODES:
                reasons.append(_wide_reason(mode))
            elif mode != "RGB":
                reasons.append(f"{mode} colour mode")
            status = "converted" if reasons else "ok"
            target = _target_size(width, height, max_side)
            if fmt == "JPEG":
                # Every byte is still entropy-decoded (truncation and corruption are caught), but the
                # IDCT runs only at the scale we need: 1/8 when the pixels are not used at all.
                passthrough = not reasons and target == (width, height)
                cheap = not want_pixels and (passthrough or not want_payload)
                img.draft(mode, (max(1, width // 8), max(1, height // 8)) if cheap else target)
            img.load()
            if not (want_payload or want_pixels):
                return Inspection(status, "; ".join(reasons), width, height)
            rgb = to_rgb(img)
            pixels = np.asarray(rgb) if want_pixels else None
            if not want_payload:
                return Inspection(status, "; ".join(reasons), width, height, pixels=pixels)
            tree_bytes = _encode_jpeg(rgb, quality) if reasons else None
            if target != (width, height):
                payload = _encode_jpeg(rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0), quality)
            else:
                payload = tree_bytes if reasons else data
            return Inspection(status, "; ".join(reasons), width, height, payload, tree_bytes, pixels)
    except UnidentifiedImageError:
        return Inspection("skipped", "not an image (unrecognised format)")
    except Image.DecompressionBombError as e:
        return Inspection("skipped", f"too large: {e}")
    except (OSError, SyntaxError, ValueError) as e:
        return Inspection("skipped", f"truncated or corrupt: {e}")


# ------------------------------------------------------------------------------------------------
# the pass (runs in forked workers; the split and options are inherited through _JOB)

_JOB: dict[str, Any] = {}


def _class_dir(label: int, classes: list[str]) -> str:
    return UNLABELED_DIR if label < 0 else classes[label]


def _write_tree_file(path: Path, data: bytes | None, src: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None and src is not None:
        try:
            os.link(src, path)  # same file system: no copy at all
            return
        except OSError:
            shutil.copyfile(src, path)
    else:
        with open(path, "wb") as f:  # made durable by one os.sync() before the tree is renamed
            f.write(data or b"")


def _tree_name(path: str, converted: bool) -> str:
    """The file's name in the tree: its own, with a suffix every tree reader lists (``IMAGE_EXTENSIONS``)."""
    p = Path(path)
    if converted:
        return p.stem + ".JPEG"
    return p.name if p.suffix.lower() in IMAGE_EXTENSIONS else p.name + ".jpg"  # pass-through: JPEG bytes


def _beton_encode(pixels: np.ndarray, label: int, i: int) -> tuple[bytes, list[bytes], str]:
    from .beton import encode_sample, fit_to_page

    job = _JOB
    pixels, note = fit_to_page(pixels, job["beton_mode"], job["max_side"])
    row, payloads = encode_sample(job["beton_fields"], (pixels, label), job["seed"], i)
    return row, payloads, note


def _encode_one(i: int) -> tuple[int, str, str, int, int, bytes | None, tuple | None]:
    """Sample ``i``: (i, status, reason, width, height, record payload, .beton encoding); raises ConvertError
    naming the file when anything but the image itself fails (the image's faults are its status)."""
    job = _JOB
    split = job["split"]
    try:
        return _encode_sample(i, split, job)
    except ConvertError:
        raise
    except Exception as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise ConvertError(f"{_describe(split, i)}: {cause}") from None


def _encode_sample(i: int, split: ArraySplit | FileSplit, job: dict[str, Any]) -> tuple:
    classes, tree, want_beton = job["classes"], job["tree"], job["beton_mode"] is not None
    label = int(split.labels[i])
    if isinstance(split, ArraySplit):
        image = split.images[i]
        payload = _encode_png(image) if (job["rec"] or tree is not None) else None
        if tree is not None:
            stem = split.names[i] if split.names is not None else f"{i:07d}"
            _write_tree_file(tree / _class_dir(label, classes) / f"{stem}.png", payload, None)
        beton = _beton_encode(image, label, i) if want_beton else None
        return i, "ok", "", image.shape[1], image.shape[0], payload if job["rec"] else None, beton
    path = split.paths[i]
    ins = inspect_image(path, job["max_side"], job["quality"], want_payload=job["rec"] or tree is not None,
                        want_pixels=want_beton)
    if ins.status == "skipped":
        return i, ins.status, ins.reason, 0, 0, None, None
    if tree is not None:
        _write_tree_file(tree / _class_dir(label, classes) / _tree_name(path, ins.tree_bytes is not None),
                         ins.tree_bytes, path)
    beton = _beton_encode(ins.pixels, label, i) if want_beton else None
    return i, ins.status, ins.reason, ins.width, ins.height, ins.payload if job["rec"] else None, beton


def _run_pool(split: ArraySplit | FileSplit, order: np.ndarray, workers: int, desc: str,
              progress: bool | None) -> Iterator[tuple]:
    """``_encode_one`` of every index in ``order``, results in that order (see :func:`.children.ordered_map`)."""
    from tqdm import tqdm

    n = len(order)
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress is None else not progress,
               file=sys.stderr, mininterval=1.0)
    chunk = max(1, min(64, n // (4 * max(1, workers))))
    try:
        with contextlib.closing(ordered_map(_encode_one, order.tolist(), workers, chunk_size=chunk,
                                            describe=lambda i: _describe(split, i))) as results:
            for result in results:
                yield result
                bar.update()
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------
# manifest


def _is_done(out: Path, manifest: dict[str, Any], key: str, params: dict[str, Any]) -> bool:
    """Output ``key`` is finished: same parameters, and its files match the manifest (sizes, sample count,
    SHA-256); a mismatch is logged and the output rebuilt."""
    entry = manifest.get("outputs", {}).get(key)
    if not entry or entry.get("params") != params:
        return False
    problems = check_output(out, key, entry, hashes=True)
    if problems:
        log.warning("%s: does not match the manifest (%s): rebuilding it", out / key, "; ".join(problems))
        return False
    return True


def _file_entry(out: Path, name: str) -> dict[str, Any]:
    from .manifest import sha256_file

    p = out / name
    return {"kind": "file", "bytes": p.stat().st_size, "sha256": sha256_file(p)}


# ------------------------------------------------------------------------------------------------
# driver


@dataclass
class _SplitResult:
    good: np.ndarray
    bad: list[dict[str, str]] = field(default_factory=list)


def _encode_pass(
    source: Source, split_name: str, split: ArraySplit | FileSplit, out: Path, opts: ConvertOptions,
    want_tree: bool, want_rec: bool, beton_mode: str | None, order: np.ndarray,
) -> _SplitResult:
    """Visit ``order``'s samples once: classify, write tree files, records and .beton rows (module doc)."""
    from .recordio import RecordIOWriter

    n = len(split)
    tree = temp_name(out / split_name) if want_tree else None
    fields = None
    if beton_mode is not None:
        from .beton import beton_fields

        fields = beton_fields(beton_mode, opts.max_side, opts.quality, opts.compress_p)  # imports FFCV once
    _JOB.update(split=split, classes=source.classes, tree=tree, rec=want_rec, max_side=opts.max_side,
                quality=opts.quality, beton_mode=beton_mode, beton_fields=fields, seed=opts.seed)
    good: list[int] = []
    bad: list[dict[str, str]] = []
    payloads: list[bytes] = []
    labels: list[int] = []
    ids: list[int] = []
    what = "+".join(w for w, on in (("tree", want_tree), ("rec", want_rec), (f"beton {beton_mode}", fields),
                                    ("scan", True)) if on)
    writer = beton = None
    published: list[Path] = []  # outputs of this pass already renamed into place, removed if a later one fails
    target = out
    t0 = time.perf_counter()
    try:
        if tree is not None:
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir(parents=True)
        if want_rec:
            target = out / f"{split_name}.rec"
            writer = RecordIOWriter(target, out / f"{split_name}.idx")
        if fields is not None:
            from .beton import BetonWriter

            target = out / f"{split_name}.beton"
            beton = BetonWriter(target, fields, capacity=n)
        for i, status, reason, _, _, payload, encoded in _run_pool(split, order, opts.workers,
                                                                   f"{source.name}/{split_name} {what}",
                                                                   opts.progress):
            if status == "skipped":
                bad.append({"split": split_name, "file": _describe(split, i), "action": "skipped", "reason": reason})
                continue
            notes = [reason] if status == "converted" else []
            if encoded is not None and encoded[2]:
                notes.append(encoded[2])
                log.warning("%s: %s", _describe(split, i), encoded[2])
            if notes:
                action = "converted to RGB JPEG" if status == "converted" else "resized for the .beton"
                bad.append({"split": split_name, "file": _describe(split, i), "action": action,
                            "reason": "; ".join(notes)})
            good.append(i)
            if beton is not None:
                target = beton.path
                beton.append(encoded[0], encoded[1], _describe(split, i))
            if writer is not None:
                payloads.append(payload or b"")
                labels.append(int(split.labels[i]))
                ids.append(i)
                if len(payloads) >= opts.chunk_size:
                    target = writer.rec_path
                    writer.write_many(payloads, labels, ids)
                    payloads, labels, ids = [], [], []
        if not good:
            raise ConvertError(f"{source.name}/{split_name}: none of the {n} files in {_where(split)} could be "
                               f"read as an image (first problem: {bad[0]['reason'] if bad else 'no images'})")
        if writer is not None:
            target = writer.rec_path
            writer.write_many(payloads, labels, ids)
            writer.close()
            published += [writer.rec_path, writer.idx_path]
        if beton is not None:
            target = beton.path
            beton.close()
        if tree is not None:
            target = out / split_name
            os.sync()  # one flush for all tree files: fsync per file costs ~5 ms each (9 s for the demo)
            replace_dir(tree, out / split_name)
    except BaseException as e:
        if writer is not None:
            with contextlib.suppress(OSError):  # closing flushes, and may fail again (a full disk)
                writer.abort()
        if beton is not None:
            beton.abort()
        if tree is not None:
            shutil.rmtree(tree, ignore_errors=True)
        for p in published:
            p.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ConvertError(f"{source.name}/{split_name}: writing {target}: {e.strerror or e}") from None
        if isinstance(e, (WorkerDiedError, BetonError)):
            raise ConvertError(f"{source.name}/{split_name}: {e}") from None
        raise
    finally:
        _JOB.clear()
    dt = time.perf_counter() - t0
    log.info("%s/%s %s: %d images in %.1f s (%.0f img/s, %d workers), %d converted, %d skipped", source.name,
             split_name, what, n, dt, n / max(dt, 1e-9), opts.workers, sum(b["action"] != "skipped" for b in bad),
             sum(b["action"] == "skipped" for b in bad))
    return _SplitResult(np.asarray(good, dtype=np.int64), bad)


def _describe(split: ArraySplit | FileSplit, i: int) -> str:
    if isinstance(split, FileSplit):
        return split.paths[i]
    return split.names[i] if split.names is not None else f"#{i}"


def _where(split: ArraySplit | FileSplit) -> str:
    """The directory a split's files are in (their common parent), for messages."""
    if isinstance(split, FileSplit) and split.paths:
        try:
            return os.path.commonpath(split.paths) if len(split.paths) > 1 else os.path.dirname(split.paths[0])
        except ValueError:
            return os.path.dirname(split.paths[0])
    return "the source"


def _longer_sides(split: ArraySplit | FileSplit, order: np.ndarray, limit: int = 1000) -> np.ndarray:
    """Longer sides of up to ``limit`` images in record order, from their headers (no decode)."""
    if isinstance(split, ArraySplit):
        return np.full(min(len(split), limit), max(split.images.shape[1:3]), dtype=np.int64)
    from PIL import Image

    sides = []
    for i in order[:limit].tolist():
        try:
            with Image.open(split.paths[i]) as img:
                sides.append(max(img.size))
        except Exception:  # unreadable files are the pass's to report
            continue
    return np.asarray(sides, dtype=np.int64)


def _beton_mode(opts: ConvertOptions, manifest: dict[str, Any], split_name: str, longer: np.ndarray) -> str:
    """The .beton mode of this split: ``opts.beton_mode``, or the dataset's ``auto`` decision (module doc).

    The first split converted decides (and records it in the manifest); later splits reuse it.
    """
    if opts.beton_mode != "auto":
        return opts.beton_mode
    decided = manifest.get("beton_auto")
    if decided and decided.get("split") != split_name:
        return str(decided["mode"])
    median = float(np.median(longer)) if longer.size else 0.0
    mode = "raw" if 0 < median <= RAW_MAX_SIDE else "jpg"
    manifest["beton_auto"] = {"mode": mode, "split": split_name, "median_longer_side": median,
                              "rule": f"raw when the median longer side of {split_name} (up to 1,000 images in record "
                                      f"order, from their headers) is <= {RAW_MAX_SIDE} px, else jpg; every split "
                                      "uses this mode"}
    odd = int((longer > RAW_MAX_SIDE).sum()) if mode == "raw" else 0
    log.info("beton mode auto -> %s for every split (median longer side of %s: %.0f px%s)", mode, split_name, median,
             f"; {odd} larger images stored raw too" if odd else "")
    return mode


def _count_per_class(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels[labels >= 0], minlength=len(classes)) if labels.size else np.zeros(0, int)
    per_class = {c: int(k) for c, k in zip(classes, counts) if k}
    if (labels < 0).any():
        per_class[UNLABELED_DIR] = int((labels < 0).sum())
    return per_class


def _lock(out: Path) -> Any:
    """Hold ``out`` for this conversion (:class:`ressl.run.RunLock`); another live one is a ConvertError."""
    import json

    from ressl.run import RunLock, RunLockedError

    lock = RunLock(out)
    try:
        lock.acquire()
    except RunLockedError as e:
        try:
            holder = json.loads(lock.path.read_text())
            who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: " + \
                " ".join(holder.get("argv") or [])
        except (OSError, ValueError, AttributeError):
            who = str(e)
        raise ConvertError(f"{out} is being written by another conversion ({who}); wait for it to finish or stop "
                           f"it, then run again (lock {lock.path})") from None
    return lock


def convert(source: Source, out_root: str | os.PathLike, opts: ConvertOptions | None = None) -> dict[str, Any]:
    """Write ``source`` into ``out_root/source.name`` in ``opts.formats``; return the manifest.

    Raises:
        ConvertError / SourceError: before any work when an option, split or source is unusable, when
            another conversion holds the directory, and when a file cannot be converted or written
            (named, with the cause; nothing of the failed output is left behind).
    """
    opts = opts or ConvertOptions()
    if "beton" in opts.formats and importlib.util.find_spec("ffcv") is None:
        log.warning("FFCV is not installed: skipping the .beton outputs (install the [ffcv] extra: "
                    "pip install -e '.[ffcv]', which needs libturbojpeg0-dev libopencv-dev pkg-config)")
        opts = replace(opts, formats=tuple(f for f in opts.formats if f != "beton") or ("folder",))
    out = Path(out_root) / source.name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    lock = _lock(out)
    try:
        for stale in remove_stale_temps(out):
            log.info("removed %s left by an interrupted run", stale)
        manifest = load_manifest(out)  # kept under --force too: outputs not rebuilt now stay listed
        manifest.update(version=MANIFEST_VERSION, dataset=source.name, source=source.info, classes=source.classes)
        manifest.setdefault("splits", {})
        manifest.setdefault("outputs", {})
        manifest.setdefault("bad_files", [])
        manifest["skipped_classes"] = source.skipped_classes
        manifest["order"] = {"seed": opts.seed, "rule": "records of split S in numpy.random.default_rng([seed, "
                             "crc32(S)]).permutation(n) of its source samples, skipped files dropped; labels "
                             "unchanged; a RecordIO record's id is its source index"}
        common = {"dataset": source.name, "source": source.info}
        try:
            for split_name in source.splits:
                _convert_split(source, split_name, out, opts, manifest, common)
            manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write_json(out / MANIFEST, manifest)
        except OSError as e:  # the manifest itself, a tree link: name what could not be written
            raise ConvertError(f"{source.name}: writing in {out}: {e.strerror or e}"
                               + (f" ({e.filename})" if e.filename else "")) from None
        except BaseException:
            remove_stale_temps(out)  # anything of ours not yet cleaned (a manifest temp on a full disk)
            raise
    finally:
        lock.release()
    return manifest


def _convert_split(
    source: Source, split_name: str, out: Path, opts: ConvertOptions, manifest: dict[str, Any],
    common: dict[str, Any],
) -> None:
    tree_key, rec_key, beton_key = f"{split_name}/", f"{split_name}.rec", f"{split_name}.beton"
    fingerprint = source.fingerprint(split_name)
    previous = manifest["splits"].get(split_name, {}).get("source_fingerprint")
    if previous and previous != fingerprint:
        log.warning("%s/%s: the source changed since the last conversion (file names, sizes or modification "
                    "times differ): rebuilding its outputs", source.name, split_name)
    common = {**common, "source_fingerprint": fingerprint}
    link_tree = split_name in source.folder_splits
    want_tree = (not link_tree) or "folder" in opts.formats
    tree_params = {**common, "tree": "link" if link_tree else "copy"}
    rec_params = {**common, "max_side": opts.max_side, "quality": opts.quality, "seed": opts.seed}
    todo_tree = want_tree and (opts.force or not _is_done(out, manifest, tree_key, tree_params))
    todo_rec = "rec" in opts.formats and (opts.force or not _is_done(out, manifest, rec_key, rec_params))
    beton_wanted = "beton" in opts.formats
    done_beton = beton_wanted and not opts.force and any(
        _is_done(out, manifest, beton_key, {**common, **p}) for p in _beton_param_options(opts, manifest, split_name))
    todo_beton = beton_wanted and not done_beton
    if not (todo_tree or todo_rec or todo_beton):
        log.info("%s/%s: all requested outputs are finished and match the manifest (sizes, counts, SHA-256); use "
                 "--force to rebuild", source.name, split_name)
        return
    split = source.split(split_name)
    if len(split) == 0:
        raise SourceError(f"{source.name}/{split_name}: the split has no images")

    if todo_tree and link_tree:
        _link_split(source, split_name, out)
        manifest["outputs"][tree_key] = {"params": tree_params, "files": {tree_key: {"kind": "dir"}}}
        atomic_write_json(out / MANIFEST, manifest)
        todo_tree = False

    order = record_order(opts.seed, split_name, len(split))
    mode = _beton_mode(opts, manifest, split_name, _longer_sides(split, order)) if todo_beton else None
    result = _encode_pass(source, split_name, split, out, opts, todo_tree, todo_rec, mode, order)
    manifest["bad_files"] = [b for b in manifest["bad_files"] if b["split"] != split_name] + result.bad
    labels = split.labels[result.good]
    manifest["splits"][split_name] = {
        "count": int(result.good.shape[0]),
        "skipped": sum(b["action"] == "skipped" for b in result.bad),
        "converted": sum(b["action"] != "skipped" for b in result.bad),
        "per_class": _count_per_class(labels, source.classes),
        "source_fingerprint": fingerprint,
    }
    _warn_classes_without_images(manifest["splits"][split_name], source, split_name)
    if todo_tree:
        manifest["outputs"][tree_key] = {"params": tree_params,
                                         "files": {tree_key: {"kind": "dir", "count": int(labels.shape[0])}}}
    if todo_rec:
        manifest["outputs"][rec_key] = {"params": rec_params, "count": int(labels.shape[0]), "files": {
            rec_key: _file_entry(out, rec_key), f"{split_name}.idx": _file_entry(out, f"{split_name}.idx")}}
    if mode is not None:
        manifest["outputs"][beton_key] = {"params": {**common, **_beton_params(opts, mode)},
                                          "count": int(labels.shape[0]),
                                          "files": {beton_key: _file_entry(out, beton_key)}}
    atomic_write_json(out / MANIFEST, manifest)


def _warn_classes_without_images(info: dict[str, Any], source: Source, split_name: str) -> None:
    """Say so (log and manifest) when a labelled train split has a class left with no image."""
    if split_name != "train":
        return
    empty = [c for c in source.classes if not info["per_class"].get(c)]
    if empty:
        info["classes_without_images"] = empty
        log.warning("%s/%s: %d class(es) have no readable image (all skipped): %s", source.name, split_name,
                    len(empty), empty[:5])


def _beton_params(opts: ConvertOptions, mode: str) -> dict[str, Any]:
    p: dict[str, Any] = {"mode": mode, "max_side": opts.max_side, "seed": opts.seed}
    if mode != "raw":
        p.update(quality=opts.quality)
    if mode == "proportion":
        p.update(compress_p=opts.compress_p)
    return p


def _beton_param_options(opts: ConvertOptions, manifest: dict[str, Any], split_name: str) -> list[dict[str, Any]]:
    """Parameter sets a finished .beton may carry for these options (``auto``: the dataset's decision
    when another split made it, else raw or jpg)."""
    decided = manifest.get("beton_auto")
    if opts.beton_mode != "auto":
        modes = [opts.beton_mode]
    elif decided and decided.get("split") != split_name:
        modes = [str(decided["mode"])]
    else:
        modes = ["raw", "jpg"]
    return [_beton_params(opts, m) for m in modes]


def _link_split(source: Source, split_name: str, out: Path) -> None:
    """Point OUT/NAME/SPLIT at the source's own ImageFolder tree (a symlink, replaced atomically)."""
    target = Path(source.folder_splits[split_name]).resolve()
    link = out / split_name
    tmp = temp_name(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    if link.is_dir() and not link.is_symlink():
        old = link.with_name(f".{link.name}.old-{os.getpid()}")
        os.replace(link, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, link)
    fsync_dir(out)

