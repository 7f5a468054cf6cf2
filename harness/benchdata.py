"""The benchmark's own datasets: deterministic images, generated once and cached.

Every benchmark run that names no ``--data`` reads the very same bytes, so figures from different
machines and commits compare loaders and not datasets. Two kinds, as users store them:

* ImageNet-size JPEGs (:func:`ensure_images`, sizes above 64 px): multi-octave smooth random fields
  plus per-pixel noise, JPEG-encoded by Pillow at quality 90: about 75 KB each at ~500x375, close
  enough to ImageNet photos (~110 KB) that decode cost is realistic, and not trivially compressible
  (a flat image would decode several times faster than a photo).
* small raw images (:func:`ensure_small`, 64 px and below): the same kind of fields at 32x32 (or the
  asked side up to 64), written by ``make dataset``'s converter exactly as it writes CIFAR: a PNG
  ImageFolder tree, a ``.rec`` of PNGs and a raw-pixel ``.beton`` (so FFCV takes its resident path).

Layout under ``root`` (``data/bench/n{N}-s{seed}`` by default)::

    train/c000/000000.jpg ...   ImageFolder tree (torchvision, DALI file reader)
    train.beton                 FFCV (written on demand, needs ffcv)
    train.rec, train.idx        RecordIO (written on demand, DALI's mxnet reader)
    manifest.json               parameters + SHA-256 of every JPEG, written last: its presence marks
                                the tree complete

and for small images under ``data/bench/raw{side}-n{N}-s{seed}``: ``train/`` (PNG), ``train.rec`` +
``.idx``, ``train.beton`` (raw) and the converter's ``manifest.json`` (the generator's parameters and the
pixels' SHA-256 under ``source``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.machine import cores
from pipelines.formats import FORMATS, RAW_MAX_SIDE
from pipelines.formats.synthetic import GENERATOR_VERSION, QUALITY, class_dir_name, make_jpeg  # the one generator
from ressl.io import atomic_write_json, remove_stale_temps, replace_dir

__all__ = [
    "DEFAULT_ROOT",
    "GENERATOR_VERSION",
    "FORMATS",
    "bench_root",
    "make_jpeg",
    "ensure_images",
    "ensure_format",
    "ensure_small",
    "small_images",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("data/bench")
NUM_CLASSES = 10
SMALL_SIDE = 32  # CIFAR's side: the stored side of small sets for any --size up to it
SMALL_GENERATOR_VERSION = 1  # bump when small_images changes


def bench_root(num_images: int, seed: int, base: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """Cache directory of one (count, seed) set; different sets never share a directory."""
    return Path(base) / f"n{num_images}-s{seed}"


def _write_one(args: tuple[Path, int, int]) -> tuple[int, str, int]:
    """Worker: write one JPEG into the staging tree (fsynced; the tree is renamed into place later)."""
    staging, index, seed = args
    data = make_jpeg(index, seed)
    with open(staging / f"c{index % NUM_CLASSES:03d}" / f"{index:06d}.jpg", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return index, hashlib.sha256(data).hexdigest(), len(data)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); the bench images will be regenerated", root / "manifest.json", e)
        return None


def _wanted(num_images: int, seed: int) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "num_images": num_images, "seed": seed, "quality": QUALITY,
            "num_classes": NUM_CLASSES}


def ensure_images(num_images: int = 2048, seed: int = 0, base: str | os.PathLike = DEFAULT_ROOT,
                  workers: int | None = None) -> Path:
    """Generate the ImageFolder tree once; later calls return the cached root at once.

    The tree is written into a staging directory and renamed into place, then ``manifest.json`` is
    written; a run killed half-way leaves no tree that looks complete.

    Args:
        num_images: how many JPEGs (split evenly over 10 classes).
        seed: generator seed; (num_images, seed) names the cache directory.
        base: parent of the cache directories.
        workers: processes for generation (default: all cores).

    Returns:
        The dataset root, usable as ``Config.data`` (``train/`` inside).
    """
    if num_images < NUM_CLASSES:
        raise ValueError(f"num_images must be >= {NUM_CLASSES} (one per class), got {num_images}")
    root = bench_root(num_images, seed, base)
    want = _wanted(num_images, seed)
    manifest = _read_manifest(root)
    if manifest is not None and all(manifest.get(k) == v for k, v in want.items()) and (root / "train").is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    (root / "manifest.json").unlink(missing_ok=True)
    for stale in ("train.beton", "train.rec", "train.idx"):
        (root / stale).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".train.", suffix=f".tmp-{os.getpid()}"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the tree is shared data like any dataset
        for c in range(NUM_CLASSES):
            (staging / f"c{c:03d}").mkdir()
        jobs = [(staging, i, seed) for i in range(num_images)]
        workers = max(1, min(workers or cores(), num_images))
        log.info("generating %d bench JPEGs into %s with %d process(es)", num_images, root, workers)
        if workers == 1:
            done = [_write_one(j) for j in jobs]
        else:
            with ProcessPoolExecutor(workers) as pool:
                done = list(pool.map(_write_one, jobs, chunksize=32))
        replace_dir(staging, root / "train")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    digest = hashlib.sha256("".join(h for _, h, _ in sorted(done)).encode()).hexdigest()
    atomic_write_json(root / "manifest.json", {**want, "sha256": digest, "bytes": sum(n for _, _, n in done)})
    return root


def _files(root: Path) -> list[tuple[Path, int]]:
    """(path, label) of every JPEG in ImageFolder order: classes sorted, files sorted within a class."""
    classes = sorted(d for d in (root / "train").iterdir() if d.is_dir())
    return [(f, label) for label, d in enumerate(classes) for f in sorted(d.glob("*.jpg"))]


class _DecodedFiles:
    """Samples for FFCV's writer: ``[i] -> (uint8 [H,W,3], label)``, decoded on demand in its workers."""

    def __init__(self, files: list[tuple[Path, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.files[i]
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")), label


def ensure_format(root: str | os.PathLike, fmt: str, workers: int = 1) -> Path:
    """Write the bench set's ``train.beton`` (FFCV) or ``train.rec`` + ``.idx`` (RecordIO) once.

    The .rec holds the very JPEG bytes of the tree; the .beton stores them re-encoded by FFCV's writer
    (``jpg`` mode, same quality), as ``make dataset`` writes ImageNet-size data.

    Args:
        root: a root returned by :func:`ensure_images`.
        fmt: ``"folder"`` (nothing to do), ``"beton"`` or ``"rec"``.
        workers: writer processes for the .beton.

    Returns:
        The written (or already present) file.
    """
    root = Path(root)
    if fmt not in FORMATS:
        raise ValueError(f"unknown bench format {fmt!r}; expected one of {FORMATS}")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{str(root)!r} has no train/ tree; call ensure_images first")
    if fmt == "folder":
        return root / "train"
    if fmt == "rec":
        out = root / "train.rec"
        if not (out.is_file() and (root / "train.idx").is_file()):
            from pipelines.formats.recordio import write_recordio

            files = _files(root)
            log.info("writing %s (%d records)", out, len(files))
            write_recordio(out, root / "train.idx", ((p.read_bytes(), label) for p, label in files))
        return out
    out = root / "train.beton"
    if not out.is_file():
        from pipelines.formats.beton import write_beton

        files = _files(root)
        log.info("writing %s (%d samples) with %d process(es)", out, len(files), workers)
        write_beton(out, _DecodedFiles(files), mode="jpg", quality=QUALITY, num_workers=max(1, workers))
    return out


def _upsample_matrix(side: int, cells: int) -> np.ndarray:
    """``[side, cells]`` weights of bilinear upsampling (pixel centres aligned, edges clamped)."""
    pos = np.clip((np.arange(side) + 0.5) * cells / side - 0.5, 0, cells - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, cells - 1)
    m = np.zeros((side, cells), np.float64)
    np.add.at(m, (np.arange(side), lo), 1.0 - (pos - lo))
    np.add.at(m, (np.arange(side), hi), pos - lo)
    return m


def small_images(num_images: int, side: int = SMALL_SIDE, seed: int = 0) -> np.ndarray:
    """``[N, side, side, 3]`` uint8: smooth random colour fields (2, 4 and 8 cells across) plus per-pixel
    noise (sigma 12), like :func:`make_jpeg`'s photos at CIFAR's scale; a pure function of its arguments."""
    rng = np.random.default_rng([seed, side, num_images, SMALL_GENERATOR_VERSION])
    field = np.zeros((num_images, side, side, 3), np.float64)
    for octave, cells in enumerate((2, 4, 8)):
        m = _upsample_matrix(side, cells)
        grid = rng.standard_normal((num_images, cells, cells, 3))
        field += np.einsum("hy,nyxc,wx->nhwc", m, grid, m) * (64.0 / (octave + 1.5))
    field += rng.standard_normal(field.shape) * 12.0
    return np.clip(np.round(field + 128.0), 0, 255).astype(np.uint8)


def ensure_small(num_images: int = 2048, seed: int = 0, side: int = SMALL_SIDE,
                 base: str | os.PathLike = DEFAULT_ROOT, workers: int = 1) -> Path:
    """Write the small raw set once, with ``make dataset``'s converter as it writes CIFAR; later calls find
    every output finished (sizes and SHA-256 checked by the converter) and write nothing.

    Args:
        num_images: how many images (label ``i % 10``).
        seed: generator seed.
        side: stored side in px, at most 64 (raw .beton, FFCV's resident path).
        base: parent of the cache directories.
        workers: converter processes.

    Returns:
        The dataset root (``train/``, ``train.rec`` + ``.idx``, ``train.beton`` when FFCV is installed).
    """
    import importlib.util

    from pipelines.formats.convert import ConvertOptions, convert
    from pipelines.formats.sources import ArraySplit, Source

    if num_images < NUM_CLASSES:
        raise ValueError(f"num_images must be >= {NUM_CLASSES} (one per class), got {num_images}")
    if not 0 < side <= RAW_MAX_SIDE:
        raise ValueError(f"side must be in 1..{RAW_MAX_SIDE} (raw .beton), got {side}")
    images = small_images(num_images, side, seed)
    labels = np.arange(num_images, dtype=np.int64) % NUM_CLASSES
    name = f"raw{side}-n{num_images}-s{seed}"
    # "generator" keeps the module's former path: it is part of the source fingerprint, and a new label
    # would rebuild every cached set.
    info = {"generator": "tools/_benchdata.py small_images", "generator_version": SMALL_GENERATOR_VERSION,
            "num_images": num_images, "seed": seed, "side": side, "num_classes": NUM_CLASSES,
            "sha256": hashlib.sha256(images.tobytes()).hexdigest(), "bytes": images.nbytes}
    source = Source(name=name, classes=[class_dir_name(c) for c in range(NUM_CLASSES)],
                    loaders={"train": lambda: ArraySplit(images, labels)}, info=info, max_side_hint=side,
                    stamp_paths=[])
    formats = ("folder", "rec", *(("beton",) if importlib.util.find_spec("ffcv") is not None else ()))
    convert(source, base, ConvertOptions(formats=formats, beton_mode="raw", workers=max(1, workers), progress=False))
    return Path(base) / name
