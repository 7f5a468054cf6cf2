"""Dataset families held in memory as decoded arrays: the demo digits, CIFAR-10/100 and STL-10.

Each constructor validates its archive before conversion starts and raises :class:`SourceError`
naming the path and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .archive import Archive, find_archive
from .source import ArraySplit, Source, SourceError

__all__ = ["cifar_source", "colmajor_rows_to_images", "demo_source", "planar_rows_to_images", "stl10_source"]


# ------------------------------------------------------------------------------------------------
# demo: scikit-learn's handwritten digits, shipped inside the wheel (no network)


# ------------------------------------------------------------------------------------------------
# demo: scikit-learn's handwritten digits, shipped inside the wheel (no network)


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class split: ``val_fraction`` of every class to val, the rest to train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _upscale_digits(images: np.ndarray, size: int) -> np.ndarray:
    """8x8 digits with 17 grey levels (0..16) -> [N,size,size,3] uint8, bicubic, grey in all channels."""
    from PIL import Image

    grey = np.round(images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    out = np.empty((len(grey), size, size, 3), dtype=np.uint8)
    for i, g in enumerate(grey):
        big = np.asarray(Image.fromarray(g, mode="L").resize((size, size), Image.Resampling.BICUBIC))
        out[i] = big[:, :, None]
    return out


def demo_source(size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Source:
    """scikit-learn's 1,797 handwritten digits, upscaled to ``size`` px RGB, split per class.

    A real (if small) dataset that needs no network: the 8x8 images ship inside the scikit-learn
    wheel. Classes are "0".."9" (they sort in label order); 80/20 stratified split with a fixed seed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = _upscale_digits(digits.images, size)
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)

    def make(idx: np.ndarray) -> Callable[[], ArraySplit]:
        return lambda: ArraySplit(images[idx], labels[idx], [f"digit_{i:04d}" for i in idx])

    return Source(
        name="demo",
        classes=[str(c) for c in range(10)],
        loaders={"train": make(train_idx), "val": make(val_idx)},
        info={"origin": "sklearn.datasets.load_digits", "size": size, "val_fraction": val_fraction,
              "seed": seed},
        max_side_hint=size,
        stamp_paths=[],
    )


def _label_order_names(names: list[str]) -> list[str]:
    """Class names that sort in label order (ImageFolder's convention); prefixed with the index if not."""
    if sorted(names) == names and len(set(names)) == len(names):
        return names
    width = len(str(len(names) - 1))
    return [f"{i:0{width}d}_{n}" for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------------------
# archives of raw arrays: CIFAR-10/100 (pickled planar rows), STL-10 (column-major binary)


def _unpickle(f: Any, where: str) -> dict[bytes, Any]:
    """A CIFAR batch file (a Python pickle of a dict); anything else is a SourceError naming ``where``."""
    import pickle

    # The official CIFAR archives are Python pickles; only open archives you trust.
    try:
        d = pickle.loads(f.read(), encoding="bytes")
    except Exception as e:  # junk bytes raise UnpicklingError, EOFError, ValueError, KeyError, ...
        raise SourceError(f"{where}: not a CIFAR batch (a Python pickle of a dict): {type(e).__name__}: {e}; "
                          "the archive is damaged or not the official one") from None
    if not isinstance(d, dict):
        raise SourceError(f"{where}: not a CIFAR batch (holds a {type(d).__name__}, expected a dict)")
    return d


def _cifar_rows(arch: Archive, members: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    for m in members:
        with arch.open(m) as f:
            d = _unpickle(f, f"{arch.describe()}: {m}")
        if b"data" not in d or label_key not in d:
            raise SourceError(f"{arch.describe()}: {m} lacks keys b'data' / {label_key!r}")
        rows.append(np.asarray(d[b"data"], dtype=np.uint8))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(rows), np.concatenate(labels)


def _rows_to_images(rows: np.ndarray, height: int, width: int, kernel: Callable) -> np.ndarray:
    if rows.ndim != 2 or rows.shape[1] != 3 * height * width:
        raise SourceError(f"expected rows of {3 * height * width} bytes, got shape {rows.shape}")
    out = np.empty((rows.shape[0], height, width, 3), dtype=np.uint8)
    kernel(np.ascontiguousarray(rows), height, width, out)
    return out


def planar_rows_to_images(rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """CIFAR rows uint8 [N, 3*H*W] (planar, row-major) -> [N,H,W,3] via the Numba kernel."""
    from .kernels import planar_to_hwc

    return _rows_to_images(rows, height, width, planar_to_hwc)


def cifar_source(name: str = "cifar10", src: Path | None = None, out: Path | None = None) -> Source:
    """CIFAR-10 or CIFAR-100 from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (or extracted).

    Splits: train (50,000) and val (the 10,000 test images). CIFAR-100 uses the 100 fine labels.
    """
    if name == "cifar10":
        folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train_m, val_m, meta_m = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
        label_key, names_key = b"labels", b"label_names"
    elif name == "cifar100":
        folder, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        train_m, val_m, meta_m = ["train"], ["test"], "meta"
        label_key, names_key = b"fine_labels", b"fine_label_names"
    else:
        raise SourceError(f"unknown CIFAR variant {name!r}; use cifar10 or cifar100")

    def download(root: Path) -> None:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)

    arch = find_archive(src, folder, archive, [*train_m, *val_m, meta_m], download, out, name)
    with arch.open(meta_m) as f:
        meta = _unpickle(f, f"{arch.describe()}: {meta_m}")
    if names_key not in meta:
        raise SourceError(f"{arch.describe()}: {meta_m} lacks {names_key!r}")
    classes = _label_order_names([n.decode() for n in meta[names_key]])

    def load(members: list[str]) -> Callable[[], ArraySplit]:
        def run() -> ArraySplit:
            rows, labels = _cifar_rows(arch, members, label_key)
            if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
                raise SourceError(f"{arch.describe()}: labels outside 0..{len(classes) - 1}")
            return ArraySplit(planar_rows_to_images(rows, 32, 32), labels)

        return run

    return Source(name=name, classes=classes, loaders={"train": load(train_m), "val": load(val_m)},
                  info={"origin": name, "archive": str(arch.describe())}, max_side_hint=32,
                  stamp_paths=arch.stamp_paths([*train_m, *val_m, meta_m]))


STL_SIDE = 96


def colmajor_rows_to_images(rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """STL-10 rows uint8 [N, 3*H*W] (per channel, column-major) -> [N,H,W,3] via the Numba kernel."""
    from .kernels import colmajor_to_hwc

    return _rows_to_images(rows, height, width, colmajor_to_hwc)


def _read_stl_images(arch: Archive, member: str, chunk: int = 4096) -> np.ndarray:
    """Stream ``member`` in chunks of images through the kernel, so only the HWC copy stays in memory."""
    row = 3 * STL_SIDE * STL_SIDE
    parts = []
    with arch.open(member) as f:
        while True:
            data = f.read(row * chunk)
            if not data:
                break
            if len(data) % row:
                raise SourceError(f"{arch.describe()}: {member} is truncated ({len(data) % row} stray bytes)")
            parts.append(colmajor_rows_to_images(np.frombuffer(data, dtype=np.uint8).reshape(-1, row),
                                                 STL_SIDE, STL_SIDE))
    if not parts:
        raise SourceError(f"{arch.describe()}: {member} is empty")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def stl10_source(src: Path | None = None, out: Path | None = None) -> Source:
    """STL-10 from ``stl10_binary.tar.gz`` (or extracted): train (5,000), val (8,000 test), unlabeled (100,000).

    Unlabeled images get label -1 (and the class folder ``_unlabeled`` in the ImageFolder tree).
    """
    members = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt"]

    def download(root: Path) -> None:
        import torchvision

        torchvision.datasets.STL10(str(root), split="train", download=True)

    arch = find_archive(src, "stl10_binary", "stl10_binary.tar.gz", members, download, out, "stl10")
    with arch.open("class_names.txt") as f:
        classes = _label_order_names([ln.strip() for ln in f.read().decode().splitlines() if ln.strip()])

    def labeled(prefix: str) -> Callable[[], ArraySplit]:
        def run() -> ArraySplit:
            images = _read_stl_images(arch, f"{prefix}_X.bin")
            with arch.open(f"{prefix}_y.bin") as f:
                labels = np.frombuffer(f.read(), dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
            if labels.shape[0] != images.shape[0]:
                raise SourceError(f"{arch.describe()}: {prefix}_y.bin has {labels.shape[0]} labels for "
                                  f"{images.shape[0]} images")
            if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
                raise SourceError(f"{arch.describe()}: {prefix}_y.bin has labels outside 1..{len(classes)}")
            return ArraySplit(images, labels)

        return run

    def unlabeled() -> ArraySplit:
        images = _read_stl_images(arch, "unlabeled_X.bin")
        return ArraySplit(images, np.full(images.shape[0], -1, dtype=np.int64))

    return Source(name="stl10", classes=classes,
                  loaders={"train": labeled("train"), "val": labeled("test"), "unlabeled": unlabeled},
                  info={"origin": "stl10", "archive": arch.describe()}, max_side_hint=STL_SIDE,
                  stamp_paths=arch.stamp_paths(members))
