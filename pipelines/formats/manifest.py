"""``manifest.json``, the record ``make dataset`` keeps of what it wrote, and the checks against it.

For every output the converter records its parameters, its sample count and, per file, the size
and SHA-256. Two levels of check use that record:

* **cheap** (:func:`check_loaded`, whenever a loader opens a split of a converted dataset): the
  sample count the loader found (``.idx`` lines, ``.beton`` rows, tree files) and the file sizes
  against the manifest. A ``.beton``/``.rec``/``.idx`` copied in from another dataset, or an ``.idx``
  cut short, is an error naming the file and both counts, before any batch is read.
* **full** (:func:`check_output` with ``hashes=True``: ``tools/dataset.py DATA --verify``, and the
  converter's "already finished" test): also the SHA-256 of every file, which catches outputs of the
  same size and count that another conversion wrote (another ``--seed``).

A directory without a manifest, or with a manifest that does not list the split (a hand-made tree,
the benchmark's generated set), is not checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ressl.config import ConfigError

__all__ = [
    "MANIFEST",
    "MANIFEST_VERSION",
    "ManifestMismatchError",
    "check_loaded",
    "check_output",
    "load_manifest",
    "sha256_file",
    "stored_count",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ManifestMismatchError(ConfigError):
    """A stored output does not match what ``manifest.json`` says was written; the message names both."""


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``out_dir`` (an empty one when absent, unreadable or of another version)."""
    path = Path(out_dir) / MANIFEST
    try:
        with open(path) as f:
            manifest = json.load(f)
        if isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION:
            return manifest
        log.warning("%s: unknown manifest version, starting a new one", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable manifest (%s), starting a new one", path, e)
    return {}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def stored_count(path: str | os.PathLike) -> int:
    """Samples held by ``path``: rows of a ``.beton`` (its header), lines of an ``.idx``, files of a tree."""
    path = Path(path)
    if path.suffix == ".beton":
        with open(path, "rb") as f:
            head = f.read(16)  # FFCV's header: u2 version, u2 fields, u4 page size, u8 samples
        return int.from_bytes(head[8:16], "little") if len(head) == 16 else 0
    if path.suffix == ".idx":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.is_dir():
        from pipelines.folder import list_files

        return len(list_files(path))
    raise ValueError(f"{path}: not a .beton, .idx or tree")


def _count_file(key: str, entry: dict[str, Any]) -> str | None:
    """The file (or tree) of output ``key`` whose sample count the manifest records."""
    if entry.get("count") is not None:
        return key.replace(".rec", ".idx") if key.endswith(".rec") else key
    files = entry.get("files", {})
    if key.endswith("/") and files.get(key, {}).get("count") is not None:
        return key
    return None


def _expected_count(key: str, entry: dict[str, Any]) -> int | None:
    if entry.get("count") is not None:
        return int(entry["count"])
    count = entry.get("files", {}).get(key, {}).get("count")
    return None if count is None else int(count)


def check_output(out: str | os.PathLike, key: str, entry: dict[str, Any], hashes: bool = False) -> list[str]:
    """What is wrong with output ``key`` (``train.rec``, ``train.beton``, ``train/``) of ``out`` against its
    manifest ``entry``: missing files, sizes, sample count, and with ``hashes`` the SHA-256 (empty list:
    it matches)."""
    out = Path(out)
    problems = []
    for name, info in entry.get("files", {}).items():
        p = out / name
        if info.get("kind") == "dir":
            if not p.is_dir():
                problems.append(f"{p} is missing")
            continue
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != info.get("bytes"):
            problems.append(f"{p} has {p.stat().st_size:,} bytes, the manifest lists {info.get('bytes'):,}")
        elif hashes and info.get("sha256") and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: SHA-256 differs from the manifest's (written by another conversion, or changed)")
    counted = _count_file(key, entry)
    if not problems and counted is not None:
        have, want = stored_count(out / counted), _expected_count(key, entry)
        if have != want:
            problems.append(f"{out / counted} holds {have:,} samples, the manifest lists {want:,}")
    return problems


def check_loaded(data_dir: str | os.PathLike, key: str, found: int, what: str) -> None:
    """Raise when a loader found ``found`` samples in output ``key`` of ``data_dir`` and the manifest there
    says otherwise, or when the output's files do not have the recorded sizes (see module doc).

    Args:
        data_dir: the dataset directory (where ``manifest.json`` is).
        key: ``<split>.rec``, ``<split>.beton`` or ``<split>/``.
        found: how many samples the loader found.
        what: the file or tree the loader opened, for the message.

    Raises:
        ManifestMismatchError: naming the file, both counts and what to do.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestMismatchError(f"{path}: unreadable manifest ({e}); rebuild it with `make dataset`") from e
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return  # not written by the converter (e.g. the benchmark's generated set)
    split = key.rstrip("/").rsplit(".", 1)[0]
    entry = manifest.get("outputs", {}).get(key)
    if entry is not None:
        want = _expected_count(key, entry)
        sizes = [p for p in check_output(data_dir, key, {"files": entry.get("files", {})})]
    else:  # a file the conversion did not write: at least the split's count must hold
        split_info = manifest.get("splits", {}).get(split)
        want = None if split_info is None or key.endswith("/") else int(split_info.get("count", -1))
        sizes = []
    fix = (f"it does not come from the conversion that wrote {path}: re-run `python tools/dataset.py "
           f"{manifest.get('dataset', 'DATA')} ... --force` (or remove the stray file)")
    if want is not None and found != want:
        raise ManifestMismatchError(f"{what} holds {found:,} samples but {path} lists {want:,} for {key}; {fix}")
    if sizes:
        raise ManifestMismatchError(f"{'; '.join(sizes)}; {fix}")
