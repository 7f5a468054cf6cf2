"""Dataset sources: where images come from, before conversion, as labelled splits.

A :class:`Source` lists its classes (sorted by name, so labels follow ImageFolder: class ``i`` is the
``i``-th name) and its splits. A split is either an :class:`ArraySplit` (decoded HWC uint8 images in
memory: demo, CIFAR, STL-10) or a :class:`FileSplit` (encoded image files on disk: ImageNet,
ImageFolder trees, Tiny-ImageNet). Splits load lazily so a re-run that finds every output finished
never reads a 2.7 GB archive.

Every constructor validates its inputs (missing archive, missing split, no images at all) and raises
:class:`SourceError` naming the path and what was expected, before any conversion starts. Class
folders are listed by :mod:`pipelines.folder`, the listing the loaders use.

An **empty class folder** in train (no visible file) is left out of the class list with a warning
naming it, and recorded in the manifest (``skipped_classes``): a class index without images would
only mislead a classifier's metrics. It is an error instead when val has images of that class (val
labels must come from train's list) or when ``--classes`` names it.

Each split has a :meth:`Source.fingerprint`: a SHA-256 over the names, sizes and modification times of
the files it is read from (image files, archives, ground-truth and class-list files), so a re-run
notices a changed source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.folder import class_dirs, list_files

__all__ = [
    "ArraySplit",
    "FileSplit",
    "Source",
    "SourceError",
    "SOURCES",
    "build_source",
    "cifar_source",
    "colmajor_rows_to_images",
    "demo_source",
    "folder_source",
    "imagenet_source",
    "planar_rows_to_images",
    "stl10_source",
    "tiny_imagenet_source",
]

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source that cannot be read; the message names the path and what was expected."""


@dataclass
class ArraySplit:
    """Decoded images in memory: ``images`` uint8 [N,H,W,3], ``labels`` int64 [N] (-1 = unlabeled)."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str] | None = None  # file stems for the ImageFolder tree; default the index

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[3] != 3 or self.images.dtype != np.uint8:
            raise SourceError(f"ArraySplit images must be uint8 [N,H,W,3], got {self.images.dtype} "
                              f"{self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise SourceError(f"ArraySplit labels must be [{self.images.shape[0]}], got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class FileSplit:
    """Encoded images on disk: one path and one label (int, -1 = unlabeled) per sample."""

    paths: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.paths) != self.labels.shape[0]:
            raise SourceError(f"FileSplit has {len(self.paths)} paths but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return len(self.paths)


Split = ArraySplit | FileSplit


@dataclass
class Source:
    """A named dataset: classes, lazily loaded splits and facts for the manifest.

    Attributes:
        name: dataset name (the output folder under OUT).
        classes: class names; label ``i`` is ``classes[i]`` and the names sort in label order.
        loaders: split name -> zero-argument function that loads it.
        folder_splits: split name -> directory, for splits that already are ImageFolder trees (they are
            linked, not copied, and only when the "folder" format is asked for).
        info: JSON-able description (source path, archive names) stored in the manifest.
        max_side_hint: the longest image side when known without decoding (32 for CIFAR), else 0.
        stamp_paths: files that in-memory (array) splits are read from, for the fingerprint; None for
            sources whose splits list their image files (those files are stamped instead).
        label_files: ground-truth / class-list files the labels come from (stamped for every split).
        skipped_classes: empty class folders left out of ``classes``: ``{"class", "reason"}`` each.
    """

    name: str
    classes: list[str]
    loaders: dict[str, Callable[[], Split]]
    folder_splits: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    max_side_hint: int = 0
    stamp_paths: list[str] | None = None
    label_files: list[str] = field(default_factory=list)
    skipped_classes: list[dict[str, str]] = field(default_factory=list)
    _cache: dict[str, Split] = field(default_factory=dict, repr=False)

    @property
    def splits(self) -> list[str]:
        return list(self.loaders)

    def split(self, name: str) -> Split:
        """Load (once) and return split ``name``."""
        if name not in self.loaders:
            raise SourceError(f"dataset {self.name!r} has no split {name!r}; splits are {self.splits}")
        if name not in self._cache:
            self._cache[name] = self.loaders[name]()
        return self._cache[name]

    def fingerprint(self, name: str) -> str:
        """SHA-256 of what split ``name`` is read from: (path, size, mtime) of each file, the classes and
        ``info``. Cheap: array splits stamp their archive instead of loading it."""
        paths = self.stamp_paths if self.stamp_paths is not None else list(getattr(self.split(name), "paths", []))
        h = hashlib.sha256(json.dumps([self.name, name, self.classes, self.info], sort_keys=True,
                                      default=str).encode())
        for path in [*paths, *self.label_files]:
            try:
                st = os.stat(path)
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{path}\0missing\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


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


class _Archive:
    """Members of a dataset archive, read from the .tar.gz itself or from its extracted folder."""

    def __init__(self, root: Path, tar: Path | None) -> None:
        self.root, self.tar = root, tar

    def describe(self) -> str:
        return str(self.tar or self.root)

    def stamp_paths(self, members: list[str]) -> list[str]:
        """The files a fingerprint stamps: the archive itself, or the extracted members."""
        return [str(self.tar)] if self.tar is not None else [str(self.root / m) for m in members]

    def open(self, member: str) -> Any:
        """A binary file object for ``member`` (a path inside the archive's top folder)."""
        if self.tar is None:
            return open(self.root / member, "rb")
        import tarfile

        try:
            tf = tarfile.open(self.tar, "r:*")
        except (OSError, EOFError, tarfile.TarError) as e:
            raise SourceError(f"{self.tar}: cannot read the archive ({e})") from None
        try:
            f = tf.extractfile(f"{self.root.name}/{member}")
        except KeyError:
            tf.close()
            raise SourceError(f"{self.tar}: archive has no member {self.root.name}/{member}") from None
        if f is None:
            tf.close()
            raise SourceError(f"{self.tar}: {self.root.name}/{member} is not a regular file")
        return _ClosingReader(f, tf)

    def has(self, member: str) -> bool:
        if self.tar is None:
            return (self.root / member).is_file()
        return f"{self.root.name}/{member}" in self._tar_names()

    def _tar_names(self) -> set[str]:
        import tarfile

        if not hasattr(self, "_names"):
            with tarfile.open(self.tar, "r:*") as tf:
                self._names = set(tf.getnames())
        return self._names


class _ClosingReader:
    """A tar member that closes its archive with it."""

    def __init__(self, f: Any, owner: Any) -> None:
        self.f, self.owner = f, owner

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def __enter__(self) -> _ClosingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        self.owner.close()


def _find_archive(src: Path | None, folder: str, archive: str, members: list[str], download: Callable[[Path], None],
                  out: Path | None, dataset: str) -> _Archive:
    """Locate ``archive`` (or its extracted ``folder``) at ``src``, or download it when ``src`` is None."""
    expected = (f"{dataset}: expected the official archive {archive} or its extracted folder {folder}/ "
                f"(with {', '.join(members)})")
    if src is None:
        root = (out or Path("data")) / ".downloads"
        try:
            download(root)
        except Exception as e:  # no network, mirror down, disk full: say what to do instead
            raise SourceError(f"{expected}; --src was not given and downloading with torchvision into {root} "
                              f"failed ({type(e).__name__}: {e}). Download it elsewhere and pass --src PATH.") from e
        src = root
    if not src.exists():
        raise SourceError(f"--src {src} does not exist; {expected}")
    candidates: list[tuple[Path, Path | None]] = []
    if src.is_file():
        candidates.append((src.parent / folder, src))
    else:
        candidates += [(src, None), (src / folder, None)] if src.name == folder else [(src / folder, None)]
        if (src / archive).is_file():
            candidates.append((src / folder, src / archive))
    import tarfile

    for root, tar in candidates:
        arch = _Archive(root, tar)
        try:
            if all(arch.has(m) for m in members):
                return arch
        except (OSError, EOFError, tarfile.TarError) as e:
            why = "not a tar archive, compressed or plain" if isinstance(e, tarfile.ReadError) else str(e)
            raise SourceError(f"{tar}: cannot read the archive ({why}); {expected}") from None
    raise SourceError(f"--src {src}: {expected}")


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


def _cifar_rows(arch: _Archive, members: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
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

    arch = _find_archive(src, folder, archive, [*train_m, *val_m, meta_m], download, out, name)
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


def _read_stl_images(arch: _Archive, member: str, chunk: int = 4096) -> np.ndarray:
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

    arch = _find_archive(src, "stl10_binary", "stl10_binary.tar.gz", members, download, out, "stl10")
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


# ------------------------------------------------------------------------------------------------
# image files: ImageFolder trees, ImageNet, Tiny-ImageNet


def _read_class_list(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"--classes {p}: file does not exist (expected one class name per line)")
    names = [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise SourceError(f"--classes {p}: no class names in the file")
    if len(set(names)) != len(names):
        raise SourceError(f"--classes {p}: duplicate class names")
    return sorted(names)


def _select_classes(classes_file: str | Path | None, available: list[str], where: Path) -> list[str]:
    """The classes named in ``classes_file`` (all must be folders of ``where``), or all ``available``."""
    if not classes_file:
        return available
    chosen = _read_class_list(classes_file)
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise SourceError(f"--classes {classes_file}: {unknown[:5]} are not folders of {where}")
    return chosen


def _folder_split(split_dir: Path, classes: list[str], what: str) -> FileSplit:
    paths: list[str] = []
    labels: list[int] = []
    present = set(class_dirs(split_dir))
    missing = [c for c in classes if c not in present]
    if missing and what.endswith("/train"):
        raise SourceError(f"{split_dir}: class folders {missing[:5]} (of {len(missing)}) are missing")
    for label, c in enumerate(classes):
        if c not in present:
            continue
        files = list_files(split_dir / c)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise SourceError(f"{split_dir}: no files in any class folder ({what})")
    return FileSplit(paths, np.asarray(labels, dtype=np.int64))


def _drop_empty_classes(train: Path, classes: list[str], classes_file: str | None, val: Path | None,
                        name: str) -> tuple[list[str], list[dict[str, str]]]:
    """``classes`` without the empty class folders of ``train`` (warned and returned; see module doc).

    Raises:
        SourceError: every class folder is empty, ``classes_file`` names an empty one, or val has
            images of one.
    """
    empty = [c for c in classes if (train / c).is_dir() and not list_files(train / c)]
    if not empty:
        return classes, []
    if len(empty) == len(classes):
        raise SourceError(f"{train}: no files in any class folder ({name}/train)")
    if classes_file:
        raise SourceError(f"--classes {classes_file}: class folder(s) {empty[:5]} of {train} are empty; "
                          "add images or leave them out of the list")
    if val is not None and val.is_dir():
        in_val = [c for c in empty if (val / c).is_dir() and list_files(val / c)]
        if in_val:
            raise SourceError(f"{train}: class folder(s) {in_val[:5]} are empty but {val} has images of them; "
                              "labels come from train's classes, so add train images or remove those val folders")
    for c in empty:
        log.warning("%s: class folder %r is empty: left out of the class list (labels of the other classes "
                    "follow the remaining sorted names; recorded in the manifest as skipped_classes)", train, c)
    skipped = [{"class": c, "reason": f"empty class folder {train / c}"} for c in empty]
    return [c for c in classes if c not in empty], skipped


def folder_source(src: Path | None = None, out: Path | None = None, classes_file: str | None = None,
                  name: str = "folder") -> Source:
    """Any ImageFolder tree: ``SRC/<class>/*`` (train only) or ``SRC/train/<class>/*`` [+ ``SRC/val/...``].

    Labels follow ImageFolder (sorted class folder names of train). ``classes_file`` selects classes.
    """
    if src is None:
        raise SourceError(f"{name}: --src is required (an ImageFolder tree: SRC/<class>/<image> or "
                          "SRC/train/<class>/<image> [SRC/val/<class>/<image>])")
    if not src.is_dir():
        raise SourceError(f"{name}: --src {src} is not a directory")
    splits = {s: src / s for s in ("train", "val") if (src / s).is_dir()} or {"train": src}
    all_classes = class_dirs(splits["train"])
    if not all_classes:
        raise SourceError(f"{splits['train']}: no class folders (expected {splits['train']}/<class>/<image>)")
    classes = _select_classes(classes_file, all_classes, splits["train"])
    classes, skipped = _drop_empty_classes(splits["train"], classes, classes_file, splits.get("val"), name)
    if "val" in splits:
        extra = [c for c in class_dirs(splits["val"]) if c not in all_classes]
        if extra:
            raise SourceError(f"{splits['val']}: class folders {extra[:5]} do not exist in {splits['train']}")
    listed = {s: _folder_split(d, classes, f"{name}/{s}") for s, d in splits.items()}
    linkable = {s: str(d) for s, d in splits.items()} if classes == all_classes else {}
    return Source(name=name, classes=classes, loaders={s: (lambda s=s: listed[s]) for s in listed},
                  folder_splits=linkable, info={"origin": "folder", "src": str(src.resolve()),
                                                "classes_file": classes_file},
                  label_files=[classes_file] if classes_file else [], skipped_classes=skipped)


def _imagenet_val_truth(src: Path, files: list[str], wnids: list[str]) -> np.ndarray:
    """Labels of a flat ImageNet val/ from LOC_val_solution.csv or the ILSVRC2012 devkit."""
    index = {w: i for i, w in enumerate(wnids)}
    stems = [Path(f).stem for f in files]
    for base in (src, src.parent):
        csv_path = base / "LOC_val_solution.csv"
        if csv_path.is_file():
            truth = {}
            for line in csv_path.read_text().splitlines()[1:]:
                if line.strip():
                    image_id, pred = line.split(",", 1)
                    truth[image_id.strip()] = pred.split()[0]
            missing = [s for s in stems if s not in truth]
            if missing:
                raise SourceError(f"{csv_path}: no ground truth for {len(missing)} val images, e.g. {missing[0]}")
            return np.asarray([index.get(truth[s], -2) for s in stems], dtype=np.int64)
        devkit = base / "ILSVRC2012_devkit_t12" / "data"
        if (devkit / "meta.mat").is_file() and (devkit / "ILSVRC2012_validation_ground_truth.txt").is_file():
            from scipy.io import loadmat

            synsets = loadmat(str(devkit / "meta.mat"), squeeze_me=True)["synsets"]
            id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
            gt = [int(v) for v in (devkit / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
            labels = []
            for s in stems:  # ILSVRC2012_val_00000001 -> line 1
                try:
                    labels.append(index.get(id_to_wnid[gt[int(s.rsplit("_", 1)[1]) - 1]], -2))
                except (IndexError, ValueError, KeyError):
                    raise SourceError(f"{devkit}: cannot find the ground truth of val image {s}") from None
            return np.asarray(labels, dtype=np.int64)
    raise SourceError(f"{src}/val is flat (no class folders) and no ground truth was found: expected "
                      "LOC_val_solution.csv or ILSVRC2012_devkit_t12/data/ with meta.mat and "
                      f"ILSVRC2012_validation_ground_truth.txt, in {src} or {src.parent}")


def imagenet_source(src: Path | None = None, out: Path | None = None, classes_file: str | None = None,
                    name: str = "imagenet") -> Source:
    """ImageNet-1k: ``SRC/train/<wnid>/*.JPEG`` and ``SRC/val/`` as class folders or flat + ground truth.

    ``imagenet100`` selects 100 classes with ``classes_file``; without one it takes every tenth class
    of the sorted wnids and says so.
    """
    if src is None or not (src / "train").is_dir():
        raise SourceError(f"{name}: --src must be the ImageNet root with train/<wnid>/*.JPEG and val/ "
                          f"(got {src})")
    all_wnids = class_dirs(src / "train")
    if not all_wnids:
        raise SourceError(f"{src}/train: no class folders")
    wnids = _select_classes(classes_file, all_wnids, src / "train")
    if not classes_file and name == "imagenet100":
        step = max(1, len(all_wnids) // 100)
        wnids = all_wnids[::step][:100]
        log.warning("imagenet100 without --classes: using every %d-th class of %s/train (%d classes); pass "
                    "--classes FILE for a standard list", step, src, len(wnids))
    val = src / "val"
    class_val = val if val.is_dir() and class_dirs(val) else None
    wnids, skipped = _drop_empty_classes(src / "train", wnids, classes_file, class_val, name)
    listed: dict[str, FileSplit] = {"train": _folder_split(src / "train", wnids, f"{name}/train")}
    folder_splits = {"train": str(src / "train")} if wnids == all_wnids else {}
    if val.is_dir():
        if class_val is not None:
            listed["val"] = _folder_split(val, wnids, f"{name}/val")
            if wnids == all_wnids:
                folder_splits["val"] = str(val)
        else:
            files = list_files(val)
            if not files:
                raise SourceError(f"{val}: empty")
            labels = _imagenet_val_truth(src, files, all_wnids)
            if (labels == -2).any():
                raise SourceError(f"{src}: val ground truth names classes that are not folders of {src}/train")
            empty_ids = {all_wnids.index(e["class"]) for e in skipped}
            if any(int(lab) in empty_ids for lab in labels):
                raise SourceError(f"{src}/train: class folder(s) {[e['class'] for e in skipped][:5]} are empty but "
                                  "the val ground truth has images of them; add train images")
            keep_ids = {all_wnids.index(w) for w in wnids}
            remap = {all_wnids.index(w): i for i, w in enumerate(wnids)}
            keep = [i for i, lab in enumerate(labels) if int(lab) in keep_ids]
            listed["val"] = FileSplit([files[i] for i in keep],
                                      np.asarray([remap[int(labels[i])] for i in keep], dtype=np.int64))
    else:
        log.warning("%s: no val/ folder; only train is converted", src)
    return Source(name=name, classes=wnids, loaders={s: (lambda s=s: listed[s]) for s in listed},
                  folder_splits=folder_splits,
                  info={"origin": name, "src": str(src.resolve()), "classes_file": classes_file},
                  label_files=[str(f) for f in _imagenet_label_files(src, classes_file)], skipped_classes=skipped)


def _imagenet_label_files(src: Path, classes_file: str | None) -> list[Path]:
    """The ground-truth and class-list files an ImageNet source's labels may come from (those present)."""
    found = [Path(classes_file)] if classes_file else []
    for base in (src, src.parent):
        devkit = base / "ILSVRC2012_devkit_t12" / "data"
        found += [f for f in (base / "LOC_val_solution.csv", devkit / "meta.mat",
                              devkit / "ILSVRC2012_validation_ground_truth.txt") if f.is_file()]
    return found


def _tiny_root(src: Path | None, out: Path | None) -> Path:
    if src is None:
        raise SourceError("tiny-imagenet: --src is required: tiny-imagenet-200.zip or its extracted folder "
                          "tiny-imagenet-200/ (wnids.txt, train/, val/val_annotations.txt)")
    if src.is_file() and src.suffix == ".zip":
        import shutil
        import zipfile

        cache = (out or Path("data")) / ".downloads"
        root = cache / "tiny-imagenet-200"
        if not (root / "wnids.txt").is_file():
            tmp = cache / f".tiny-imagenet-200.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with zipfile.ZipFile(src) as zf:
                    zf.extractall(tmp)
            except (OSError, zipfile.BadZipFile) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise SourceError(f"{src}: cannot extract ({e})") from e
            if not (tmp / "tiny-imagenet-200").is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                raise SourceError(f"{src}: the zip has no tiny-imagenet-200/ folder")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp / "tiny-imagenet-200", root)
            shutil.rmtree(tmp, ignore_errors=True)
        return root
    for root in (src, src / "tiny-imagenet-200"):
        if (root / "wnids.txt").is_file():
            return root
    raise SourceError(f"tiny-imagenet: --src {src} has no wnids.txt; expected tiny-imagenet-200.zip or the "
                      "extracted tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/, val/val_annotations.txt)")


def tiny_imagenet_source(src: Path | None = None, out: Path | None = None) -> Source:
    """Tiny-ImageNet-200: train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt (64 px)."""
    root = _tiny_root(src, out)
    wnids = sorted(ln.strip() for ln in (root / "wnids.txt").read_text().splitlines() if ln.strip())
    if not wnids:
        raise SourceError(f"{root}/wnids.txt lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[str] = []
    labels: list[int] = []
    for w in wnids:
        d = root / "train" / w / "images"
        if not d.is_dir():
            raise SourceError(f"{root}/train/{w}/images is missing")
        files = list_files(d)
        paths += files
        labels += [index[w]] * len(files)
    train = FileSplit(paths, np.asarray(labels, dtype=np.int64))
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise SourceError(f"{ann} is missing (tiny-imagenet val labels)")
    vpaths: list[str] = []
    vlabels: list[int] = []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise SourceError(f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt")
        vpaths.append(str(root / "val" / "images" / parts[0]))
        vlabels.append(index[parts[1]])
    val = FileSplit(vpaths, np.asarray(vlabels, dtype=np.int64))
    if not len(train) or not len(val):
        raise SourceError(f"{root}: no training or validation images")
    return Source(name="tiny-imagenet", classes=wnids, loaders={"train": lambda: train, "val": lambda: val},
                  info={"origin": "tiny-imagenet", "src": str(root.resolve())}, max_side_hint=64,
                  label_files=[str(root / "wnids.txt"), str(ann)])


SOURCES: dict[str, Callable[..., Source]] = {
    "demo": lambda src=None, out=None, **_: demo_source(),
    "cifar10": lambda src=None, out=None, **_: cifar_source("cifar10", src, out),
    "cifar100": lambda src=None, out=None, **_: cifar_source("cifar100", src, out),
    "stl10": lambda src=None, out=None, **_: stl10_source(src, out),
    "tiny-imagenet": lambda src=None, out=None, **_: tiny_imagenet_source(src, out),
    "imagenet": lambda src=None, out=None, classes_file=None: imagenet_source(src, out, classes_file, "imagenet"),
    "imagenet100": lambda src=None, out=None, classes_file=None: imagenet_source(src, out, classes_file,
                                                                                 "imagenet100"),
    "folder": lambda src=None, out=None, classes_file=None: folder_source(src, out, classes_file, "folder"),
}


def build_source(name: str, src: str | os.PathLike | None = None, **options: Any) -> Source:
    """The source called ``name`` (a key of :data:`SOURCES`), reading from ``src`` where it needs files.

    Options: ``out`` (output root, for downloads and extracted zips), ``classes_file`` (class list).
    """
    if name not in SOURCES:
        raise SourceError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SOURCES))}")
    if options.get("classes_file") and name not in ("imagenet", "imagenet100", "folder"):
        raise SourceError(f"--classes applies to imagenet, imagenet100 and folder, not {name!r}")
    return SOURCES[name](src=Path(src).expanduser() if src is not None else None, **options)
