"""The encode pass: every sample of a split visited once, in record order, by forked workers.

Each worker opens and decodes a file **once** (:func:`.image.inspect_image`): bad files are classified
(skipped, or converted to RGB JPEG with the reason), the record payload is produced (source JPEG bytes
passed through untouched when possible; PNG for in-memory arrays, lossless), the ImageFolder tree file
is written, and the decoded pixels are encoded for the ``.beton`` by FFCV's own field (:mod:`.beton`).
The main process writes the ``.rec``/``.idx`` and the ``.beton`` as the results arrive, in order, and
on any failure removes every temporary it made. The workers' inputs (:class:`EncodeJob`) reach them
through the fork (:func:`.children.ordered_map`'s ``state``), never pickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.folder import IMAGE_EXTENSIONS
from ressl.io import replace_dir, temp_name

from .beton import BetonError
from .children import WorkerDiedError, ordered_map
from .image import encode_png, inspect_image
from .options import UNLABELED_DIR, ConvertError, ConvertOptions
from .source import ArraySplit, FileSplit, Source

__all__ = ["EncodeJob", "SplitResult", "describe", "encode_pass", "where"]

log = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """What every worker of a pass works on: the split, where and what to write, the .beton encoders."""

    split: ArraySplit | FileSplit
    classes: list[str]
    tree: Path | None  # the temporary ImageFolder tree being written, None when no tree is written
    rec: bool  # produce record payloads
    max_side: int
    quality: int
    beton_mode: str | None  # None: no .beton
    beton_fields: Any  # FFCV's fields for beton_mode (built once, in the main process)
    seed: int


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


def _beton_encode(job: EncodeJob, pixels: np.ndarray, label: int, i: int) -> tuple[bytes, list[bytes], str]:
    from .beton import encode_sample, fit_to_page

    pixels, note = fit_to_page(pixels, job.beton_mode, job.max_side)
    row, payloads = encode_sample(job.beton_fields, (pixels, label), job.seed, i)
    return row, payloads, note


def _encode_one(job: EncodeJob, i: int) -> tuple[int, str, str, int, int, bytes | None, tuple | None]:
    """Sample ``i``: (i, status, reason, width, height, record payload, .beton encoding); raises ConvertError
    naming the file when anything but the image itself fails (the image's faults are its status)."""
    split = job.split
    try:
        return _encode_sample(i, split, job)
    except ConvertError:
        raise
    except Exception as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise ConvertError(f"{describe(split, i)}: {cause}") from None


def _encode_sample(i: int, split: ArraySplit | FileSplit, job: EncodeJob) -> tuple:
    classes, tree, want_beton = job.classes, job.tree, job.beton_mode is not None
    label = int(split.labels[i])
    if isinstance(split, ArraySplit):
        image = split.images[i]
        payload = encode_png(image) if (job.rec or tree is not None) else None
        if tree is not None:
            stem = split.names[i] if split.names is not None else f"{i:07d}"
            _write_tree_file(tree / _class_dir(label, classes) / f"{stem}.png", payload, None)
        beton = _beton_encode(job, image, label, i) if want_beton else None
        return i, "ok", "", image.shape[1], image.shape[0], payload if job.rec else None, beton
    path = split.paths[i]
    ins = inspect_image(path, job.max_side, job.quality, want_payload=job.rec or tree is not None,
                        want_pixels=want_beton)
    if ins.status == "skipped":
        return i, ins.status, ins.reason, 0, 0, None, None
    if tree is not None:
        _write_tree_file(tree / _class_dir(label, classes) / _tree_name(path, ins.tree_bytes is not None),
                         ins.tree_bytes, path)
    beton = _beton_encode(job, ins.pixels, label, i) if want_beton else None
    return i, ins.status, ins.reason, ins.width, ins.height, ins.payload if job.rec else None, beton


def _run_pool(job: EncodeJob, order: np.ndarray, workers: int, desc: str, progress: bool | None) -> Iterator[tuple]:
    """``_encode_one`` of every index in ``order``, results in that order (see :func:`.children.ordered_map`)."""
    from tqdm import tqdm

    n = len(order)
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress is None else not progress,
               file=sys.stderr, mininterval=1.0)
    chunk = max(1, min(64, n // (4 * max(1, workers))))
    try:
        with contextlib.closing(ordered_map(_encode_one, order.tolist(), workers, state=job, chunk_size=chunk,
                                            describe=lambda i: describe(job.split, i))) as results:
            for result in results:
                yield result
                bar.update()
    finally:
        bar.close()


@dataclass
class SplitResult:
    """The samples a pass kept (``good``, source indices in record order) and the files it skipped or converted."""


    good: np.ndarray
    bad: list[dict[str, str]] = field(default_factory=list)


def encode_pass(
    source: Source, split_name: str, split: ArraySplit | FileSplit, out: Path, opts: ConvertOptions,
    want_tree: bool, want_rec: bool, beton_mode: str | None, order: np.ndarray,
) -> SplitResult:
    """Visit ``order``'s samples once: classify, write tree files, records and .beton rows (module doc)."""
    from .recordio import RecordIOWriter

    n = len(split)
    tree = temp_name(out / split_name) if want_tree else None
    fields = None
    if beton_mode is not None:
        from .beton import beton_fields

        fields = beton_fields(beton_mode, opts.max_side, opts.quality, opts.compress_p)  # imports FFCV once
    job = EncodeJob(split=split, classes=source.classes, tree=tree, rec=want_rec, max_side=opts.max_side,
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
        for i, status, reason, _, _, payload, encoded in _run_pool(job, order, opts.workers,
                                                                   f"{source.name}/{split_name} {what}",
                                                                   opts.progress):
            if status == "skipped":
                bad.append({"split": split_name, "file": describe(split, i), "action": "skipped", "reason": reason})
                continue
            notes = [reason] if status == "converted" else []
            if encoded is not None and encoded[2]:
                notes.append(encoded[2])
                log.warning("%s: %s", describe(split, i), encoded[2])
            if notes:
                action = "converted to RGB JPEG" if status == "converted" else "resized for the .beton"
                bad.append({"split": split_name, "file": describe(split, i), "action": action,
                            "reason": "; ".join(notes)})
            good.append(i)
            if beton is not None:
                target = beton.path
                beton.append(encoded[0], encoded[1], describe(split, i))
            if writer is not None:
                payloads.append(payload or b"")
                labels.append(int(split.labels[i]))
                ids.append(i)
                if len(payloads) >= opts.chunk_size:
                    target = writer.rec_path
                    writer.write_many(payloads, labels, ids)
                    payloads, labels, ids = [], [], []
        if not good:
            raise ConvertError(f"{source.name}/{split_name}: none of the {n} files in {where(split)} could be "
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
    dt = time.perf_counter() - t0
    log.info("%s/%s %s: %d images in %.1f s (%.0f img/s, %d workers), %d converted, %d skipped", source.name,
             split_name, what, n, dt, n / max(dt, 1e-9), opts.workers, sum(b["action"] != "skipped" for b in bad),
             sum(b["action"] == "skipped" for b in bad))
    return SplitResult(np.asarray(good, dtype=np.int64), bad)


def describe(split: ArraySplit | FileSplit, i: int) -> str:
    if isinstance(split, FileSplit):
        return split.paths[i]
    return split.names[i] if split.names is not None else f"#{i}"


def where(split: ArraySplit | FileSplit) -> str:
    """The directory a split's files are in (their common parent), for messages."""
    if isinstance(split, FileSplit) and split.paths:
        try:
            return os.path.commonpath(split.paths) if len(split.paths) > 1 else os.path.dirname(split.paths[0])
        except ValueError:
            return os.path.dirname(split.paths[0])
    return "the source"
