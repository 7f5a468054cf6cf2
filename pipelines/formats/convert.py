"""Conversion engine behind ``tools/dataset.py``: a :class:`~.sources.Source` into OUT/NAME/.

For every split it writes, as asked: an ImageFolder tree ``SPLIT/<class>/<file>`` (always for
sources that are not one already), ``SPLIT.rec`` + ``SPLIT.idx`` (MXNet RecordIO) and ``SPLIT.beton``
(FFCV), then ``manifest.json``: source, classes, counts per split and class, every skipped or
converted file with its reason, the format parameters and a SHA-256 of each output.

Records are written in a **seeded random order** (RecordIO and .beton alike): split ``S`` visits its
source samples in ``numpy.random.default_rng([seed, crc32(S)]).permutation(n)``, skipped files
dropped, as ``im2rec --shuffle`` and FFCV's writers are normally used; readers that take contiguous
shards plus a small shuffle buffer (DALI's ``readers.mxnet``) then still see every class. Labels are
unchanged; a RecordIO record's ``id`` is the sample's index in its source split, and the manifest
records the seed. The tree is not ordered (its files are sorted by name, as ImageFolder lists them).

One pass per split (:mod:`.encode`) opens and decodes every image **once** (:mod:`.image`) in
``workers`` processes (default: every core this process may use) and writes every asked output.

A failure ends the conversion with a :class:`ConvertError` that names the file and the cause -- an
image that cannot be encoded, a worker that dies (:func:`.children.ordered_map`), a full disk -- and
removes every temporary it made. The output directory is locked for the whole conversion
(``OUT/NAME/.lock``, :class:`ressl.run.RunLock`, as training locks its run directory): a second
``make dataset`` into it stops at once, naming the first.

Every output is written under a temporary name and renamed when complete, and the manifest is
rewritten after each one, so a re-run skips what is finished (same parameters, same source
fingerprint -- names, sizes and modification times of the source files -- and files whose sizes,
sample counts and SHA-256 match the manifest, :mod:`.manifest`), rebuilds what the source changed
under, or what no longer matches, saying so, and ``force`` rebuilds everything. Worker processes die
with the converter (:mod:`.children`), and any ``workers`` count writes the same bytes.

``beton_mode="auto"`` is decided **once per dataset**: raw pixels when the median longer side of the
first split converted (train; up to 1,000 images in record order, read from their headers) is at most
:data:`~pipelines.formats.RAW_MAX_SIDE` px, JPEG otherwise; every split uses that mode (recorded as
``beton_auto`` in the manifest), so one odd image cannot flip a split, and train and val are stored
alike. In raw mode an image whose pixels would not fit one 8 MiB ``.beton`` page (about 1,670 px
square) is downscaled to the largest size that fits and listed in the manifest with the reason: it
is an outlier among small images, and a loader sizes its per-sample buffers by the largest image.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ressl.io import atomic_write_json, fsync_dir, remove_stale_temps, replace_dir, temp_name

from . import RAW_MAX_SIDE
from .encode import SplitResult, encode_pass
from .image import inspect_image
from .manifest import MANIFEST, MANIFEST_VERSION, check_output, load_manifest
from .options import UNLABELED_DIR, ConvertError, ConvertOptions, all_cores, record_order
from .source import ArraySplit, FileSplit, Source, SourceError

__all__ = ["ConvertError", "ConvertOptions", "all_cores", "convert", "inspect_image", "load_manifest",
           "record_order"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# manifest


def _is_done(out: Path, manifest: dict[str, Any], key: str, params: dict[str, Any]) -> bool:
    """Output ``key`` is finished: same parameters, and its files match the manifest (sizes, sample count,
    SHA-256); a mismatch is logged and the output rebuilt."""
    entry = manifest.get("outputs", {}).get(key)
    if not entry or entry.get("params") != params:
        return False
    problems = check_output(out, key, entry, hashes=True)
    if problems:
        log.warning("%s: does not match the manifest (%s): rebuilding it", out / key, "; ".join(problems))
        return False
    return True


def _file_entry(out: Path, name: str) -> dict[str, Any]:
    from .manifest import sha256_file

    p = out / name
    return {"kind": "file", "bytes": p.stat().st_size, "sha256": sha256_file(p)}


# ------------------------------------------------------------------------------------------------
# driver


def _longer_sides(split: ArraySplit | FileSplit, order: np.ndarray, limit: int = 1000) -> np.ndarray:
    """Longer sides of up to ``limit`` images in record order, from their headers (no decode)."""
    if isinstance(split, ArraySplit):
        return np.full(min(len(split), limit), max(split.images.shape[1:3]), dtype=np.int64)
    from PIL import Image

    sides = []
    for i in order[:limit].tolist():
        try:
            with Image.open(split.paths[i]) as img:
                sides.append(max(img.size))
        except Exception:  # unreadable files are the pass's to report
            continue
    return np.asarray(sides, dtype=np.int64)


def _beton_mode(opts: ConvertOptions, manifest: dict[str, Any], split_name: str, longer: np.ndarray) -> str:
    """The .beton mode of this split: ``opts.beton_mode``, or the dataset's ``auto`` decision (module doc).

    The first split converted decides (and records it in the manifest); later splits reuse it.
    """
    if opts.beton_mode != "auto":
        return opts.beton_mode
    decided = manifest.get("beton_auto")
    if decided and decided.get("split") != split_name:
        return str(decided["mode"])
    median = float(np.median(longer)) if longer.size else 0.0
    mode = "raw" if 0 < median <= RAW_MAX_SIDE else "jpg"
    manifest["beton_auto"] = {"mode": mode, "split": split_name, "median_longer_side": median,
                              "rule": f"raw when the median longer side of {split_name} (up to 1,000 images in record "
                                      f"order, from their headers) is <= {RAW_MAX_SIDE} px, else jpg; every split "
                                      "uses this mode"}
    odd = int((longer > RAW_MAX_SIDE).sum()) if mode == "raw" else 0
    log.info("beton mode auto -> %s for every split (median longer side of %s: %.0f px%s)", mode, split_name, median,
             f"; {odd} larger images stored raw too" if odd else "")
    return mode


def _count_per_class(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels[labels >= 0], minlength=len(classes)) if labels.size else np.zeros(0, int)
    per_class = {c: int(k) for c, k in zip(classes, counts) if k}
    if (labels < 0).any():
        per_class[UNLABELED_DIR] = int((labels < 0).sum())
    return per_class


def _lock(out: Path) -> Any:
    """Hold ``out`` for this conversion (:class:`ressl.run.RunLock`); another live one is a ConvertError."""
    import json

    from ressl.run import RunLock, RunLockedError

    lock = RunLock(out)
    try:
        lock.acquire()
    except RunLockedError as e:
        try:
            holder = json.loads(lock.path.read_text())
            who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: " + \
                " ".join(holder.get("argv") or [])
        except (OSError, ValueError, AttributeError):
            who = str(e)
        raise ConvertError(f"{out} is being written by another conversion ({who}); wait for it to finish or stop "
                           f"it, then run again (lock {lock.path})") from None
    return lock


def convert(source: Source, out_root: str | os.PathLike, opts: ConvertOptions | None = None) -> dict[str, Any]:
    """Write ``source`` into ``out_root/source.name`` in ``opts.formats``; return the manifest.

    Raises:
        ConvertError / SourceError: before any work when an option, split or source is unusable, when
            another conversion holds the directory, and when a file cannot be converted or written
            (named, with the cause; nothing of the failed output is left behind).
    """
    opts = opts or ConvertOptions()
    if "beton" in opts.formats and importlib.util.find_spec("ffcv") is None:
        log.warning("FFCV is not installed: skipping the .beton outputs (install the [ffcv] extra: "
                    "pip install -e '.[ffcv]', which needs libturbojpeg0-dev libopencv-dev pkg-config)")
        opts = replace(opts, formats=tuple(f for f in opts.formats if f != "beton") or ("folder",))
    out = Path(out_root) / source.name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    lock = _lock(out)
    try:
        for stale in remove_stale_temps(out):
            log.info("removed %s left by an interrupted run", stale)
        manifest = load_manifest(out)  # kept under --force too: outputs not rebuilt now stay listed
        manifest.update(version=MANIFEST_VERSION, dataset=source.name, source=source.info, classes=source.classes)
        manifest.setdefault("splits", {})
        manifest.setdefault("outputs", {})
        manifest.setdefault("bad_files", [])
        manifest["skipped_classes"] = source.skipped_classes
        manifest["order"] = {"seed": opts.seed, "rule": "records of split S in numpy.random.default_rng([seed, "
                             "crc32(S)]).permutation(n) of its source samples, skipped files dropped; labels "
                             "unchanged; a RecordIO record's id is its source index"}
        common = {"dataset": source.name, "source": source.info}
        try:
            for split_name in source.splits:
                _convert_split(source, split_name, out, opts, manifest, common)
            manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write_json(out / MANIFEST, manifest)
        except OSError as e:  # the manifest itself, a tree link: name what could not be written
            raise ConvertError(f"{source.name}: writing in {out}: {e.strerror or e}"
                               + (f" ({e.filename})" if e.filename else "")) from None
        except BaseException:
            remove_stale_temps(out)  # anything of ours not yet cleaned (a manifest temp on a full disk)
            raise
    finally:
        lock.release()
    return manifest


@dataclass
class _Todo:
    """Which outputs of a split this run writes, and the parameters each is recorded with."""

    tree: bool
    rec: bool
    beton: bool
    link: bool  # the split is an ImageFolder tree already: its "tree" is a link to it
    common: dict[str, Any]
    tree_params: dict[str, Any]
    rec_params: dict[str, Any]


def _outputs_to_do(source: Source, split_name: str, out: Path, opts: ConvertOptions, manifest: dict[str, Any],
                   common: dict[str, Any]) -> _Todo:
    """The asked outputs that are not finished (or all of them under ``force``)."""
    link = split_name in source.folder_splits
    want_tree = (not link) or "folder" in opts.formats
    tree_params = {**common, "tree": "link" if link else "copy"}
    rec_params = {**common, "max_side": opts.max_side, "quality": opts.quality, "seed": opts.seed}
    todo_tree = want_tree and (opts.force or not _is_done(out, manifest, f"{split_name}/", tree_params))
    todo_rec = "rec" in opts.formats and (opts.force or not _is_done(out, manifest, f"{split_name}.rec", rec_params))
    beton_wanted = "beton" in opts.formats
    done_beton = beton_wanted and not opts.force and any(
        _is_done(out, manifest, f"{split_name}.beton", {**common, **p})
        for p in _beton_param_options(opts, manifest, split_name))
    return _Todo(todo_tree, todo_rec, beton_wanted and not done_beton, link, common, tree_params, rec_params)


def _convert_split(
    source: Source, split_name: str, out: Path, opts: ConvertOptions, manifest: dict[str, Any],
    common: dict[str, Any],
) -> None:
    """Bring split ``split_name``'s outputs up to date: finished ones are kept, a source tree is linked, the
    rest written by one encode pass, and the manifest records the result."""
    fingerprint = source.fingerprint(split_name)
    previous = manifest["splits"].get(split_name, {}).get("source_fingerprint")
    if previous and previous != fingerprint:
        log.warning("%s/%s: the source changed since the last conversion (file names, sizes or modification "
                    "times differ): rebuilding its outputs", source.name, split_name)
    todo = _outputs_to_do(source, split_name, out, opts, manifest, {**common, "source_fingerprint": fingerprint})
    if not (todo.tree or todo.rec or todo.beton):
        log.info("%s/%s: all requested outputs are finished and match the manifest (sizes, counts, SHA-256); use "
                 "--force to rebuild", source.name, split_name)
        return
    split = source.split(split_name)
    if len(split) == 0:
        raise SourceError(f"{source.name}/{split_name}: the split has no images")

    if todo.tree and todo.link:
        _link_split(source, split_name, out)
        tree_key = f"{split_name}/"
        manifest["outputs"][tree_key] = {"params": todo.tree_params, "files": {tree_key: {"kind": "dir"}}}
        atomic_write_json(out / MANIFEST, manifest)
        todo.tree = False

    order = record_order(opts.seed, split_name, len(split))
    mode = _beton_mode(opts, manifest, split_name, _longer_sides(split, order)) if todo.beton else None
    result = encode_pass(source, split_name, split, out, opts, todo.tree, todo.rec, mode, order)
    _record_split(manifest, source, split_name, split, out, opts, todo, mode, result, fingerprint)
    atomic_write_json(out / MANIFEST, manifest)


def _record_split(manifest: dict[str, Any], source: Source, split_name: str, split: ArraySplit | FileSplit, out: Path,
                  opts: ConvertOptions, todo: _Todo, mode: str | None, result: SplitResult, fingerprint: str) -> None:
    """The manifest's entries for a split just written: counts, bad files and each output's files."""
    tree_key, rec_key, beton_key = f"{split_name}/", f"{split_name}.rec", f"{split_name}.beton"
    manifest["bad_files"] = [b for b in manifest["bad_files"] if b["split"] != split_name] + result.bad
    labels = split.labels[result.good]
    manifest["splits"][split_name] = {
        "count": int(result.good.shape[0]),
        "skipped": sum(b["action"] == "skipped" for b in result.bad),
        "converted": sum(b["action"] != "skipped" for b in result.bad),
        "per_class": _count_per_class(labels, source.classes),
        "source_fingerprint": fingerprint,
    }
    _warn_classes_without_images(manifest["splits"][split_name], source, split_name)
    if todo.tree:
        manifest["outputs"][tree_key] = {"params": todo.tree_params,
                                         "files": {tree_key: {"kind": "dir", "count": int(labels.shape[0])}}}
    if todo.rec:
        manifest["outputs"][rec_key] = {"params": todo.rec_params, "count": int(labels.shape[0]), "files": {
            rec_key: _file_entry(out, rec_key), f"{split_name}.idx": _file_entry(out, f"{split_name}.idx")}}
    if mode is not None:
        manifest["outputs"][beton_key] = {"params": {**todo.common, **_beton_params(opts, mode)},
                                          "count": int(labels.shape[0]),
                                          "files": {beton_key: _file_entry(out, beton_key)}}


def _warn_classes_without_images(info: dict[str, Any], source: Source, split_name: str) -> None:
    """Say so (log and manifest) when a labelled train split has a class left with no image."""
    if split_name != "train":
        return
    empty = [c for c in source.classes if not info["per_class"].get(c)]
    if empty:
        info["classes_without_images"] = empty
        log.warning("%s/%s: %d class(es) have no readable image (all skipped): %s", source.name, split_name,
                    len(empty), empty[:5])


def _beton_params(opts: ConvertOptions, mode: str) -> dict[str, Any]:
    p: dict[str, Any] = {"mode": mode, "max_side": opts.max_side, "seed": opts.seed}
    if mode != "raw":
        p.update(quality=opts.quality)
    if mode == "proportion":
        p.update(compress_p=opts.compress_p)
    return p


def _beton_param_options(opts: ConvertOptions, manifest: dict[str, Any], split_name: str) -> list[dict[str, Any]]:
    """Parameter sets a finished .beton may carry for these options (``auto``: the dataset's decision
    when another split made it, else raw or jpg)."""
    decided = manifest.get("beton_auto")
    if opts.beton_mode != "auto":
        modes = [opts.beton_mode]
    elif decided and decided.get("split") != split_name:
        modes = [str(decided["mode"])]
    else:
        modes = ["raw", "jpg"]
    return [_beton_params(opts, m) for m in modes]


def _link_split(source: Source, split_name: str, out: Path) -> None:
    """Point OUT/NAME/SPLIT at the source's own ImageFolder tree (a symlink, replaced atomically)."""
    target = Path(source.folder_splits[split_name]).resolve()
    link = out / split_name
    tmp = temp_name(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    if link.is_dir() and not link.is_symlink():  # a tree copied by an earlier run: swapped out, then deleted
        replace_dir(tmp, link)
        return
    os.replace(tmp, link)  # a link (or nothing) is replaced in one rename
    fsync_dir(out)
