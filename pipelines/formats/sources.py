"""The dataset sources by name: where images come from, before conversion, as labelled splits.

:func:`build_source` maps a dataset name (``tools/dataset.py``'s argument) to its family:
in-memory arrays (:mod:`.arrays`: demo, CIFAR, STL-10) or image files (:mod:`.trees`: ImageFolder
trees, ImageNet, Tiny-ImageNet), both built on the model of :mod:`.source`. Every constructor validates
its inputs (missing archive, missing split, no images at all) and raises :class:`SourceError` naming
the path and what was expected, before any conversion starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arrays import cifar_source, colmajor_rows_to_images, demo_source, planar_rows_to_images, stl10_source
from .source import ArraySplit, FileSplit, Source, SourceError, Split
from .trees import folder_source, imagenet_source, tiny_imagenet_source

__all__ = [
    "ArraySplit",
    "FileSplit",
    "Source",
    "SourceError",
    "SOURCES",
    "Split",
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
