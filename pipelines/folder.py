"""The two data concepts every backend, converter and tool shares, written once.

- **Class listing** of an ImageFolder tree (:func:`class_dirs`, :func:`list_files`,
  :class:`ImageFolderFiles`): classes are the visible sub-directories sorted by name; hidden entries
  (a leading ``.``, e.g. ``.ipynb_checkpoints``) are neither classes nor images. A tree's labels can
  be taken from another class list (the train split's, or the manifest's ``classes``), so a val split
  that lacks a class still gets the train labels, and a class train does not know is an error.
- **Loading an image as RGB** (:func:`load_rgb`, :func:`decode_rgb`, :func:`to_rgb`): every decode
  failure becomes a :class:`BadImageError` that names the file and the reason; 16-bit images are
  scaled to 8 bits, not clipped.

The per-epoch sharded order every backend visits samples in is :mod:`pipelines.order`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageFolderFiles",
    "DECODE_ERRORS",
    "class_dirs",
    "decode_failure",
    "decode_rgb",
    "display_name",
    "list_files",
    "load_rgb",
    "to_rgb",
    "train_classes",
    "verify_image",
]

log = logging.getLogger(__name__)

# The file suffixes ImageFolder readers treat as images (torchvision's list), compared lower-case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(OSError):
    """A file that cannot be decoded as an image; the message names the file and the reason."""


def class_dirs(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder tree: its visible sub-directories, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def list_files(directory: str | os.PathLike, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Every visible regular file under ``directory`` (recursive, links followed, sorted).

    Each real directory is listed once: a directory link that leads to one already listed (a loop such
    as ``a/self -> .``, or two links to one folder) is skipped with a warning naming it, where a plain
    ``os.walk(followlinks=True)`` would list the same files again at every level of the loop.

    Args:
        directory: a class folder.
        extensions: keep only names ending in one of these (lower-case compare); None keeps every
            file (the converter judges each one by its content and reports the bad ones).
    """
    found: list[str] = []
    try:
        st = os.stat(directory)
    except OSError:
        return found
    seen = {(st.st_dev, st.st_ino)}
    for root, dirs, files in os.walk(directory, followlinks=True):
        keep = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            try:
                st = os.stat(os.path.join(root, d))
            except OSError:  # a dangling link: nothing to list
                continue
            if (st.st_dev, st.st_ino) in seen:
                log.warning("%s: directory already listed (a symlink loop or a second link to it): skipped",
                            display_name(os.path.join(root, d)))
                continue
            seen.add((st.st_dev, st.st_ino))
            keep.append(d)
        dirs[:] = keep
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")
                  and (extensions is None or f.lower().endswith(extensions))]
    return found


def train_classes(data: str | os.PathLike, split: str = "train") -> list[str] | None:
    """The class list labels are taken from in ``data``: the manifest's ``classes``, else the class
    folders of ``<data>/<split>/``, else None (no class list: labels stored in a file are used as is)."""
    data = Path(data)
    manifest = data / "manifest.json"
    if manifest.is_file():
        try:
            classes = json.loads(manifest.read_text()).get("classes")
        except (OSError, ValueError) as e:
            raise ValueError(f"{manifest}: unreadable manifest ({e}); rebuild it with `make dataset`") from e
        if classes:
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ValueError(f"{manifest}: 'classes' must be a list of names, got {classes!r:.80}")
            return list(classes)
    if (data / split).is_dir():
        return class_dirs(data / split) or None
    return None


class ImageFolderFiles:
    """The (path, label) list of an ImageFolder tree.

    Args:
        root: the tree, ``root/<class>/**/<image>``.
        classes: the class list labels index into (the train split's); None = this tree's own
            classes. A class folder of ``root`` missing from ``classes`` is an error naming it; a
            class of ``classes`` with no folder here simply has no samples.
        extensions: image suffixes to keep (None = every visible file).
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None,
                 extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS):
        self.root = Path(root)
        present = class_dirs(self.root)
        if not present:
            raise FileNotFoundError(f"image folder {str(self.root)!r} has no class sub-directories")
        if classes is None:
            classes = present
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise ValueError(f"image folder {str(self.root)!r}: class folder(s) {unknown[:5]} are not in the train "
                             f"class list ({len(classes)} classes: {classes[:5]}...)")
        self.classes = list(classes)
        self.samples: list[tuple[str, int]] = []
        for label, c in enumerate(self.classes):
            if (self.root / c).is_dir():
                self.samples += [(p, label) for p in list_files(self.root / c, extensions)]
        if not self.samples:
            what = "files" if extensions is None else f"images ({', '.join(extensions)})"
            raise FileNotFoundError(f"image folder {str(self.root)!r} has no {what}")

    def __len__(self) -> int:
        return len(self.samples)


# What Pillow raises for a file that is not a readable image (the converter and every loader catch these).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_failure(e: BaseException) -> str:
    """Why an image did not decode, from Pillow's exception (one of :data:`DECODE_ERRORS`): the reason the
    converter records in its manifest and the loaders put in :class:`BadImageError`."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large: {e}"
    return f"truncated or corrupt: {e}"


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow modes of more than 8 bits per sample


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit and 32-bit grey images are scaled, not clipped.

    Pillow's own ``convert("RGB")`` turns a 16-bit value v into min(v, 255): almost every pixel of a
    16-bit photo becomes white. 16-bit data become ``round(v / 257)`` (65535 -> 255); 32-bit integer
    or float data are scaled from 0..65535 when they fit it, else from their own min..max.
    """
    if img.mode not in WIDE_MODES:
        return img.convert("RGB") if img.mode != "RGB" else img
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        grey = a / 257.0
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        grey = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.round(grey).clip(0, 255).astype(np.uint8), mode="L").convert("RGB")


def _to_rgb(f, name: str) -> Image.Image:
    try:
        img = Image.open(f)
        img.load()
        return to_rgb(img)
    except DECODE_ERRORS as e:
        raise BadImageError(f"{name}: {decode_failure(e)}") from e


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` to an RGB PIL image (CMYK, grey, palette, PNG named .jpg convert).

    Raises:
        BadImageError: empty, truncated, corrupt or not an image (the message names the file).
    """
    name = display_name(os.fsdecode(path))
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(f"{name}: unreadable: {e.strerror or e}") from e
    return decode_rgb(data, name)


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded image bytes to RGB; ``name`` (a file, or record N of a file) goes in the error."""
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    return _to_rgb(io.BytesIO(data), name)


def verify_image(data: bytes, name: str = "<bytes>") -> None:
    """Check that ``data`` decodes as an image, cheaply: a JPEG is entropy-decoded in full (truncation
    and corrupt data are caught) but its IDCT runs at 1/8 scale; other formats decode fully.

    Raises:
        BadImageError: as :func:`decode_rgb`.
    """
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
    except DECODE_ERRORS as e:
        raise BadImageError(f"{name}: {decode_failure(e)}") from e


def display_name(path: str) -> str:
    """``path`` printable in any log: bytes that are not UTF-8 (kept by Python as surrogate escapes) shown
    as U+FFFD instead of raising UnicodeEncodeError when the name is written."""
    return os.fsencode(path).decode("utf-8", "replace")
