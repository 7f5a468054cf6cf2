"""Dataset families stored as image files: ImageFolder trees, ImageNet and Tiny-ImageNet.

Class folders are listed by :mod:`pipelines.folder`, the listing the loaders use. An **empty class
folder** in train (no visible file) is left out of the class list with a warning naming it, and recorded
in the manifest (``skipped_classes``): a class index without images would only mislead a classifier's
metrics. It is an error instead when val has images of that class (val labels must come from train's
list) or when ``--classes`` names it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pipelines.folder import class_dirs, list_files

from .source import FileSplit, Source, SourceError

__all__ = ["folder_source", "imagenet_source", "tiny_imagenet_source"]

log = logging.getLogger(__name__)


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

