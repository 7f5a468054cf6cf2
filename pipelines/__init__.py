"""Everything that turns stored images into device batches.

Every backend yields the same thing, a :class:`Batch` already on the training device, normalised:
``Batch(weak=[B,3,H,W], strong=[[B,3,h,w], ...], label=[B])``. :func:`build_loader` picks the backend.
This package knows nothing about losses or models. Each shared concept lives in one module:

* :mod:`.batch` - ``Batch``, ``Loader``, ``LoaderConfig`` (every option a loader reads)
* :mod:`.folder` - ImageFolder class listing, RGB loading and why an image does not decode
* :mod:`.order` - the per-epoch sharded order every backend visits samples in
* :mod:`.fingerprint` - stored files identified by path, size and mtime (conversion, bad-file cache)
* :mod:`.samples` - trees / ``.rec`` / ``.beton`` read by index, and the one-time bad-file check
* :mod:`.spec` - the augmentation recipe; :mod:`.eval` - the eval loader for every layout
* backends :mod:`.torchvision`, :mod:`.dali`, :mod:`.ffcv`; :mod:`.formats` - the converters
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ressl.config import BACKENDS

from .batch import Batch, Loader, LoaderConfig
from .spec import RecipeSpec, get_recipe

__all__ = [
    "Batch",
    "Loader",
    "LoaderConfig",
    "BACKENDS",
    "available_backends",
    "build_loader",
    "resolve_backend",
]


def available_backends() -> dict[str, bool]:
    """Which backends can be imported here (without importing them)."""
    return {
        "torchvision": True,
        "dali": importlib.util.find_spec("nvidia") is not None
        and importlib.util.find_spec("nvidia.dali") is not None,
        "ffcv": importlib.util.find_spec("ffcv") is not None,
    }


def _has(data: Path, split: str, fmt: str) -> bool:
    if fmt == "folder":
        return (data / split).is_dir()
    if fmt == "beton":
        return (data / f"{split}.beton").is_file()
    if fmt == "rec":
        return (data / f"{split}.rec").is_file() and (data / f"{split}.idx").is_file()
    raise ValueError(fmt)


def resolve_backend(data: str | os.PathLike, backend: str = "auto", split: str = "train") -> str:
    """Pick the backend for ``data``: DALI (RecordIO or folder) or FFCV (.beton) when installed and
    the data is in their format, else torchvision. An explicit backend is checked, not overridden."""
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory {str(path)!r} does not exist (run `make dataset DATA=...`)")
    have = available_backends()
    if backend == "auto":
        if have["dali"] and (_has(path, split, "rec") or _has(path, split, "folder")) and torch.cuda.is_available():
            return "dali"
        if have["ffcv"] and _has(path, split, "beton"):
            return "ffcv"
        if have["dali"] and _has(path, split, "rec"):
            return "dali"
        if _has(path, split, "folder"):
            return "torchvision"
        raise FileNotFoundError(
            f"no usable data in {str(path)!r} for split {split!r}: expected {split}/ (ImageFolder), "
            f"{split}.beton (needs the [ffcv] extra) or {split}.rec + {split}.idx (needs the [dali] extra)"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto', *BACKENDS)}")
    if not have[backend]:
        extra = {"dali": "pip install -e '.[dali]'", "ffcv": "apt-get install libturbojpeg0-dev libopencv-dev "
                 "pkg-config && pip install -e '.[ffcv]'"}[backend]
        raise ImportError(f"backend {backend!r} is not installed; install it with: {extra}")
    return backend


def build_loader(
    cfg: LoaderConfig,
    backend: str = "auto",
    *,
    split: str = "train",
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    spec: RecipeSpec | None = None,
) -> Loader:
    """Build the training loader of ``cfg`` for this process (shard ``rank`` of ``world_size``).

    Args:
        cfg: a :class:`LoaderConfig`, or a config with its fields (``ressl.config.Config``).
        backend: "auto", "torchvision", "dali" or "ffcv".
        split: which split to read ("train" for SSL; "unlabeled" for STL-10).
        device: where batches are delivered.
        rank, world_size: Accelerate's ``process_index`` / ``num_processes``.
        spec: recipe to use instead of ``get_recipe(cfg.recipe)``.
    """
    cfg = LoaderConfig.of(cfg)
    cfg.per_process_batch(world_size)  # fails before any data is read
    spec = spec or get_recipe(cfg.recipe)
    name = resolve_backend(cfg.data, backend, split)
    kwargs = dict(split=split, device=torch.device(device), rank=rank, world_size=world_size)
    threads = torch.get_num_threads()
    try:
        if name == "torchvision":
            from .torchvision import build_torchvision_loader

            return build_torchvision_loader(cfg, spec, **kwargs)
        if name == "dali":
            from .dali import build_dali_loader

            return build_dali_loader(cfg, spec, **kwargs)
        from .ffcv import build_ffcv_loader

        return build_ffcv_loader(cfg, spec, **kwargs)
    finally:  # importing ffcv sets torch's intra-op threads to 1 and its Loader to num_workers: undo
        torch.set_num_threads(threads)
