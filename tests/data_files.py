"""Small files the data tests share: encoded noise images, class-folder trees, the loader config they are
read with, a file digest to compare outputs by, and a .beton read back in record order."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image


def png_bytes(seed: int, side: int = 12) -> bytes:
    """A ``side`` x ``side`` PNG of seeded RGB noise."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(30, 220, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, side: int = 24) -> bytes:
    """A ``side`` x ``side`` JPEG of seeded RGB noise (cut it short for a truncated file)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(30, 220, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def class_tree(root: Path, classes: list[str], per_class: int = 3) -> None:
    """An ImageFolder tree under ``root``: one folder per class of ``per_class`` distinct PNGs."""
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(png_bytes(100 * k + i))


def save_image(path: Path, image: np.ndarray, fmt: str = "PNG", **kw) -> Path:
    """``image`` (H x W x 3 uint8) written to ``path`` in ``fmt`` (``kw``: Pillow's options, e.g. ``quality``),
    its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format=fmt, **kw)
    return path


def loader_cfg(data: Path, **kw) -> SimpleNamespace:
    """The loader keys of a config: the cifar32 recipe, batches of 4, no worker processes, seed 0."""
    return SimpleNamespace(**{**dict(data=str(data), recipe="cifar32", batch_size=4, num_workers=0, seed=0,
                                     channels_last=False), **kw})


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_beton(path: Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a .beton of same-sized images, in file order, through FFCV's own loader:
    (images N x H x W x 3 uint8, labels N)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = [], []
    for im, lab in loader:
        images.append(np.array(im))
        labels.append(np.array(lab).ravel())
    return np.concatenate(images), np.concatenate(labels)
