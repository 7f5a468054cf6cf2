"""pipelines/formats/convert.py (with encode.py, options.py and the manifest): the seeded record order, bad
data (16-bit images, empty class folders, one odd-sized or oversized image, a sample over a .beton page),
changed sources, any worker count writing the same bytes, a failing write, the output directory's lock, the
finished-output check by hash, one decode per image, symlink loops, and the dataset tool's --seed."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_files import read_beton, save_image, sha256

from pipelines.formats.convert import ConvertOptions, convert, record_order
from pipelines.formats.recordio import RecordIOReader
from pipelines.formats.sources import SourceError, build_source
from tools import dataset as dataset_tool

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False)
needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="FFCV is not installed (the [ffcv] extra)")


def _class_sorted_tree(root: Path, classes: int = 4, per_class: int = 6, side: int = 12, seed: int = 0) -> None:
    """A tree whose files list class by class (as ImageFolder sorts them): the worst case for shards."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for k in range(per_class):
            save_image(root / f"c{c}" / f"{k:03d}.png", rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------
# record order


@needs_ffcv
def test_records_are_written_in_a_seeded_random_order(tmp_path):
    """Before: records in class order, so readers.mxnet's contiguous shards saw half the classes."""
    _class_sorted_tree(tmp_path / "src")
    source = build_source("folder", tmp_path / "src")
    labels = source.split("train").labels
    manifest = convert(source, tmp_path / "out", ConvertOptions(formats=("rec", "beton"), seed=3, **QUIET))
    out = tmp_path / "out" / "folder"
    order = record_order(3, "train", len(labels))
    assert not np.array_equal(order, np.arange(len(labels)))
    records = list(RecordIOReader(out / "train.rec", out / "train.idx"))
    assert [r.id for r in records] == order.tolist()
    assert [int(r.label) for r in records] == labels[order].tolist()  # labels travel with their images
    np.testing.assert_array_equal(read_beton(out / "train.beton")[1], labels[order])
    assert manifest["order"]["seed"] == 3
    assert manifest["outputs"]["train.rec"]["params"]["seed"] == 3
    # the first quarter of the records (one rank's contiguous shard of 4) holds most classes, not one
    assert len(set(labels[order][: len(order) // 4].tolist())) >= 3
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), seed=4, **QUIET))  # new seed: rebuilt
    assert [r.id for r in RecordIOReader(out / "train.rec", out / "train.idx")] == \
        record_order(4, "train", len(labels)).tolist()


# ------------------------------------------------------------------------------------------------
# bad data


def test_16_bit_png_is_scaled_to_8_bits_and_the_reason_says_so(tmp_path):
    """Before: Pillow's convert('RGB') clipped every value above 255: a near-white image, 'converted'."""
    from PIL import Image

    ramp = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)  # 0 .. 65195
    path = tmp_path / "src" / "a" / "deep.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    save_image(tmp_path / "src" / "a" / "plain.png", np.zeros((4, 4, 3), np.uint8))
    manifest = convert(build_source("folder", tmp_path / "src"), tmp_path / "out",
                       ConvertOptions(formats=("rec",), **QUIET))
    entry = next(b for b in manifest["bad_files"] if b["file"].endswith("deep.png"))
    assert "16-bit" in entry["reason"] and "scaled to 8 bits" in entry["reason"]
    out = tmp_path / "out" / "folder"
    rec = next(r for r in RecordIOReader(out / "train.rec", out / "train.idx") if r.id == 0)
    got = np.asarray(Image.open(io.BytesIO(rec.payload)).convert("RGB")).astype(np.float64)
    want = np.round(ramp / 257.0)
    assert np.abs(got[..., 0] - want).mean() < 3  # JPEG of a ramp; clipping would give ~250 everywhere
    assert got.mean() < 160 and abs(got.mean() - want.mean()) < 3


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path, caplog):
    """Before: an empty folder became a class index with no images and no message."""
    _class_sorted_tree(tmp_path / "src" / "train", classes=2, per_class=2)
    (tmp_path / "src" / "train" / "b_empty").mkdir()
    (tmp_path / "src" / "train" / "b_empty" / ".hidden").write_text("not an image")
    _class_sorted_tree(tmp_path / "src" / "val", classes=2, per_class=1)
    caplog.set_level(logging.WARNING)
    source = build_source("folder", tmp_path / "src")
    assert source.classes == ["c0", "c1"]
    assert "'b_empty' is empty" in caplog.text
    assert source.folder_splits == {}  # the tree is copied without it, so every reader sees the same classes
    manifest = convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    assert manifest["classes"] == ["c0", "c1"]
    assert manifest["skipped_classes"][0]["class"] == "b_empty"
    assert sorted(p.name for p in (tmp_path / "out" / "folder" / "train").iterdir()) == ["c0", "c1"]

    save_image(tmp_path / "src" / "val" / "b_empty" / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SourceError, match=r"\['b_empty'\] are empty but .*val has images"):
        build_source("folder", tmp_path / "src")
    (tmp_path / "classes.txt").write_text("b_empty\nc0\n")
    with pytest.raises(SourceError, match="--classes .*b_empty.* are empty"):
        build_source("folder", tmp_path / "src", classes_file=str(tmp_path / "classes.txt"))


@needs_ffcv
def test_beton_mode_is_decided_once_per_dataset(tmp_path):
    """Before: one 4000x10 image turned train.beton into JPEG while val stayed raw."""
    _class_sorted_tree(tmp_path / "src" / "train", classes=2, per_class=5, side=16)
    save_image(tmp_path / "src" / "train" / "c0" / "wide.png", np.full((10, 4000, 3), 128, np.uint8))
    _class_sorted_tree(tmp_path / "src" / "val", classes=2, per_class=2, side=16)
    manifest = convert(build_source("folder", tmp_path / "src"), tmp_path / "out",
                       ConvertOptions(formats=("beton",), **QUIET))
    assert manifest["outputs"]["train.beton"]["params"]["mode"] == "raw"
    assert manifest["outputs"]["val.beton"]["params"]["mode"] == "raw"
    assert manifest["beton_auto"]["split"] == "train" and manifest["beton_auto"]["median_longer_side"] == 16


def test_changed_source_is_noticed_and_rebuilt(tmp_path, caplog):
    """Before: `make dataset` kept stale outputs after the source folder changed."""
    _class_sorted_tree(tmp_path / "src", classes=2, per_class=3)
    opts = ConvertOptions(formats=("rec",), **QUIET)
    convert(build_source("folder", tmp_path / "src"), tmp_path / "out", opts)
    rec = tmp_path / "out" / "folder" / "train.rec"
    first = rec.stat().st_mtime_ns
    convert(build_source("folder", tmp_path / "src"), tmp_path / "out", opts)
    assert rec.stat().st_mtime_ns == first  # unchanged source: nothing rebuilt
    save_image(tmp_path / "src" / "c1" / "new.png", np.zeros((12, 12, 3), np.uint8))
    caplog.set_level(logging.WARNING)
    manifest = convert(build_source("folder", tmp_path / "src"), tmp_path / "out", opts)
    assert "the source changed since the last conversion" in caplog.text
    assert manifest["splits"]["train"]["count"] == 7
    assert len(RecordIOReader(rec, rec.with_suffix(".idx"))) == 7
    # a file rewritten in place (same name, new size / mtime) counts as a change too
    os.utime(tmp_path / "src" / "c0" / "000.png", ns=(1, 1))
    before = rec.stat().st_mtime_ns
    time.sleep(0.01)
    convert(build_source("folder", tmp_path / "src"), tmp_path / "out", opts)
    assert rec.stat().st_mtime_ns != before
    force_before = rec.stat().st_mtime_ns
    time.sleep(0.01)
    convert(build_source("folder", tmp_path / "src"), tmp_path / "out",
            ConvertOptions(formats=("rec",), force=True, **QUIET))
    assert rec.stat().st_mtime_ns != force_before


# ------------------------------------------------------------------------------------------------
# worker counts, the manifest, the command line


@needs_ffcv
def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    """Before: FFCV's workers booked pages as they raced, so WORKERS=2 gave another .beton."""
    _class_sorted_tree(tmp_path / "src", classes=3, per_class=80, side=10)  # 240 samples: several chunks
    source = build_source("folder", tmp_path / "src")
    digests = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        convert(source, out, ConvertOptions(formats=("rec", "beton"), workers=workers, **QUIET))
        digests[workers] = {f: sha256(out / "folder" / f) for f in ("train.beton", "train.rec", "train.idx")}
    assert digests[1] == digests[2]


def test_manifest_records_fingerprint_and_order(tmp_path):
    _class_sorted_tree(tmp_path / "src", classes=2, per_class=2)
    convert(build_source("folder", tmp_path / "src"), tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    manifest = json.loads((tmp_path / "out" / "folder" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["source_fingerprint"]) == 64
    assert "permutation" in manifest["order"]["rule"] and manifest["skipped_classes"] == []


def test_cli_seed_option_reaches_the_manifest(tmp_path):
    _class_sorted_tree(tmp_path / "src", classes=2, per_class=3)
    assert dataset_tool.main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--formats",
                              "rec", "--seed", "5", "--no-progress"]) == 0
    out = tmp_path / "out" / "folder"
    assert json.loads((out / "manifest.json").read_text())["order"]["seed"] == 5
    assert [r.id for r in RecordIOReader(out / "train.rec", out / "train.idx")] == record_order(5, "train", 6).tolist()
    with pytest.raises(SystemExit):
        dataset_tool.main(["folder", "--src", str(tmp_path / "src"), "--beton-mode", "png"])


# ------------------------------------------------------------------------------------------------
# oversized samples and failing writes end the conversion cleanly


def _small_jpegs_and(root: Path, big: np.ndarray, quality: int = 90) -> Path:
    """24 JPEGs of 40x32 plus one big JPEG in one class folder."""
    rng = np.random.default_rng(0)
    for k in range(24):
        save_image(root / "a" / f"{k:02d}.jpg", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), "JPEG", quality=90)
    return save_image(root / "a" / "big.jpg", big, "JPEG", quality=quality)


def _tool(args: list[str], timeout: int = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "dataset.py"), *args, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, **kw)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name == ".lock")


@needs_ffcv
def test_oversized_image_in_raw_mode_is_resized_to_fit_a_page(tmp_path):
    """Before: raw mode was chosen, FFCV's worker died ("Tried allocating 108000000 but page size is
    8388608") and the converter spun forever, leaving a temp file and a /dev/shm segment."""
    from pipelines.samples import BetonSamples

    big = _small_jpegs_and(tmp_path / "src", np.full((1800, 2400, 3), 90, np.uint8))
    manifest = convert(build_source("folder", tmp_path / "src"), tmp_path / "out", ConvertOptions(workers=2, **QUIET))
    out = tmp_path / "out" / "folder"
    assert manifest["beton_auto"]["mode"] == "raw"
    (entry,) = [b for b in manifest["bad_files"] if b["file"] == str(big)]
    assert entry["action"] == "resized for the .beton" and "resized from 2400x1800 to" in entry["reason"]
    beton = BetonSamples(out / "train.beton")
    sides = sorted(zip(beton.meta["width"].tolist(), beton.meta["height"].tolist()))
    assert len(beton) == 25 and sides[:24] == [(40, 32)] * 24
    w, h = sides[24]
    assert w * h * 3 <= 1 << 23 and abs(w / h - 4 / 3) < 0.01 and w > 1900
    assert _leftovers(tmp_path) == []


@needs_ffcv
def test_sample_too_large_for_a_page_ends_with_the_file_named(tmp_path, caplog):
    """A JPEG-encoded sample over FFCV's 8 MiB page: one error line naming the file and the cause, exit 2,
    nothing left behind (FFCV's writer hung here, its worker dead)."""
    noise = np.random.default_rng(1).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    big = _small_jpegs_and(tmp_path / "src", noise, quality=100)
    with caplog.at_level(logging.ERROR):
        assert dataset_tool.main(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                  "--formats", "beton", "--beton-mode", "jpg", "--quality", "100", "--workers", "2",
                                  "--no-progress"]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"{big}: its encoded image is" in error and "more than one 8 MiB .beton page" in error
    assert "--max-side" in error
    assert not list((tmp_path / "out" / "folder").glob("train*")) and _leftovers(tmp_path) == []


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@needs_ffcv
def test_full_disk_ends_with_the_file_named_and_nothing_left(tmp_path):
    """A write that fails (the file-size limit stands in for a full disk, as a 2 MB tmpfs would):
    before, FFCV's worker died and the converter spun; now one error line, exit 2, no temporaries."""
    _class_sorted_tree(tmp_path / "src", classes=2, per_class=2, side=8)
    # The .rec fits and is renamed into place; the .beton's first page (at 8 MiB) does not, and fails
    # only when it is closed, after the .rec: that published .rec must go too.
    rc = _tool(["folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "2"],
               preexec_fn=_file_size_limit(4 << 20))
    assert rc.returncode == 2 and "Traceback" not in rc.stderr, rc.stderr
    assert "folder/train: writing" in rc.stderr and "train.beton: File too large" in rc.stderr
    assert not list((tmp_path / "out" / "folder").glob("train*")) and _leftovers(tmp_path) == []


def test_conversion_locks_its_output_directory(tmp_path):
    """Before: two `make dataset` runs into one directory (different --seed) interleaved their files and
    left a manifest that described neither."""
    from pipelines.formats.convert import ConvertError
    from ressl.run import RunLock

    _class_sorted_tree(tmp_path / "src", classes=2, per_class=2)
    source = build_source("folder", tmp_path / "src")
    (tmp_path / "out" / "folder").mkdir(parents=True)
    with RunLock(tmp_path / "out" / "folder"):
        with pytest.raises(ConvertError, match=rf"being written by another conversion \(pid {os.getpid()} .*lock"):
            convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))
    assert not (tmp_path / "out" / "folder" / "train.rec").exists()
    convert(source, tmp_path / "out", ConvertOptions(formats=("rec",), **QUIET))  # released: it runs
    assert sorted(p.name for p in (tmp_path / "out" / "folder").iterdir()) == ["manifest.json", "train.idx",
                                                                              "train.rec"]


def test_finished_check_verifies_the_recorded_hashes(tmp_path, caplog):
    """Before: outputs another conversion wrote (another --seed: same size, same count) passed as
    "finished" because only sizes were compared."""
    _class_sorted_tree(tmp_path / "src", classes=2, per_class=5)
    source = build_source("folder", tmp_path / "src")
    convert(source, tmp_path / "a", ConvertOptions(formats=("rec",), seed=0, **QUIET))
    convert(source, tmp_path / "b", ConvertOptions(formats=("rec",), seed=1, **QUIET))
    a, b = tmp_path / "a" / "folder", tmp_path / "b" / "folder"
    mine = sha256(a / "train.rec")
    for f in ("train.rec", "train.idx"):
        assert (a / f).stat().st_size == (b / f).stat().st_size
        (a / f).write_bytes((b / f).read_bytes())
    with caplog.at_level(logging.WARNING):
        convert(source, tmp_path / "a", ConvertOptions(formats=("rec",), seed=0, **QUIET))
    assert "SHA-256 differs from the manifest's" in caplog.text and "rebuilding it" in caplog.text
    assert sha256(a / "train.rec") == mine


@needs_ffcv
def test_each_image_is_decoded_once_for_the_scan_the_rec_and_the_beton(tmp_path, monkeypatch):
    """Before: the validity scan decoded every image, then FFCV's writer decoded it again."""
    from PIL import ImageFile

    rng = np.random.default_rng(3)
    for k in range(12):
        save_image(tmp_path / "src" / f"c{k % 2}" / f"{k}.jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                   "JPEG", quality=90)
    loads = []
    real = ImageFile.ImageFile.load
    # count decodes, not the cheap calls on an image already loaded (tile empty)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (self.tile and loads.append(self.size)) or real(self))
    convert(build_source("folder", tmp_path / "src"), tmp_path / "out",
            ConvertOptions(formats=("rec", "beton"), beton_mode="jpg", workers=1, **QUIET))
    # one full-size decode per image (the auto-mode header read decodes nothing: no beton_mode=auto here)
    assert loads == [(64, 48)] * 12
    assert len(RecordIOReader(tmp_path / "out" / "folder" / "train.rec", tmp_path / "out" / "folder" /
                              "train.idx")) == 12


def test_symlink_loop_is_followed_once_in_conversion(tmp_path, caplog):
    """Before: `ln -s . SRC/train/a/self` turned 6 images into 486 records, reported as success."""
    _class_sorted_tree(tmp_path / "src" / "train", classes=2, per_class=3)
    os.symlink(".", tmp_path / "src" / "train" / "c0" / "self")
    with caplog.at_level(logging.WARNING):
        manifest = convert(build_source("folder", tmp_path / "src"), tmp_path / "out",
                           ConvertOptions(formats=("rec",), **QUIET))
    assert manifest["splits"]["train"]["count"] == 6 and manifest["splits"]["train"]["skipped"] == 0
    assert "c0/self: directory already listed (a symlink loop" in caplog.text
