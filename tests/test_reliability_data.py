"""Loader reliability under bad data: nothing silent, nothing crashes (issue rows on the loader side).

Each test reproduces one probe: bad files in a tree and corrupt records in a .rec through DALI, a
corrupt JPEG in a .beton through FFCV, labels when val/ lacks a class or has an unknown one, the
eval loader on every layout, and the loader options declared as config keys.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines.batch import LoaderConfig
from pipelines.eval import EvalDataError, build_eval_loader, eval_problem, find_split
from pipelines.folder import ImageFolderFiles
from pipelines.formats.recordio import write_recordio
from pipelines.samples import RecordSamples, TreeSamples, bad_samples
from pipelines.spec import get_recipe
from pipelines.torchvision import build_torchvision_loader

CPU = torch.device("cpu")
SPEC = get_recipe("cifar32")
HAVE = pipelines.available_backends()
needs_dali = pytest.mark.skipif(not HAVE["dali"], reason="the DALI backend is not installed")
needs_ffcv = pytest.mark.skipif(not HAVE["ffcv"], reason="the FFCV backend is not installed")


def _cfg(data: Path, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{**dict(data=str(data), recipe="cifar32", batch_size=4, num_workers=0, seed=0,
                                     channels_last=False), **kw})


def _png(seed: int, side: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(30, 220, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int, side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(30, 220, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def bad_tree(tmp_path) -> Path:
    """train/ with 2 classes x 6 good PNGs, plus a zero-byte, a truncated and a random-bytes file, and a
    valid image whose name is not UTF-8."""
    for c in range(2):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(6):
            (d / f"{i}.png").write_bytes(_png(10 * c + i))
    (tmp_path / "train" / "c0" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "c0" / "truncated.jpg").write_bytes(_jpeg(99)[:200])
    (tmp_path / "train" / "c1" / "noise.png").write_bytes(np.random.default_rng(5).bytes(500))
    with open(os.path.join(os.fsencode(tmp_path / "train" / "c1"), b"caf\xe9.png"), "wb") as f:
        f.write(_png(77))
    return tmp_path


@needs_dali
def test_dali_tree_skips_counts_and_names_bad_files(bad_tree, caplog):
    from pipelines.dali import build_dali_loader

    with caplog.at_level(logging.WARNING):
        loader = build_dali_loader(_cfg(bad_tree), SPEC, split="train", device=CPU, rank=0, world_size=1)
    assert loader.bad_files == 3 and loader.num_samples == 13  # 12 good + the non-UTF-8 name
    for name in ("empty.jpg", "truncated.jpg", "noise.png"):
        assert name in caplog.text, name
    assert "3 of 16 samples do not decode" in caplog.text
    loader.set_epoch(0)
    labels = torch.cat([b.label for b in loader])
    assert len(labels) == 12 and set(labels.tolist()) == {0, 1}  # 13 // 4 = 3 whole batches


def test_sample_check_is_cached_and_redone_when_a_file_changes(bad_tree):
    samples = TreeSamples(bad_tree / "train")
    calls = []

    def counting(s, i):
        calls.append(i)
        from pipelines.samples import _check_one

        return _check_one(s, i)

    first = bad_samples(samples, check=counting)
    assert len(calls) == len(samples) == 16 and len(first) == 3
    cache = json.loads(samples.cache_path.read_text())
    assert cache["count"] == 16 and len(cache["bad"]) == 3
    calls.clear()
    assert bad_samples(TreeSamples(bad_tree / "train"), check=counting) == first and calls == []  # cache hit
    (bad_tree / "train" / "c0" / "empty.jpg").write_bytes(_png(3))  # the empty file is now an image
    again = bad_samples(TreeSamples(bad_tree / "train"), check=counting)
    assert len(calls) == 16 and len(again) == 2


@needs_dali
def test_dali_recordio_skips_and_names_corrupt_records(tmp_path, caplog):
    from pipelines.dali import build_dali_loader

    payloads = [(_png(i), i % 2) for i in range(12)]
    payloads[3] = (np.random.default_rng(1).bytes(300), 1)  # random bytes where an image should be
    payloads[7] = (_jpeg(7)[:150], 1)  # a truncated JPEG
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", payloads)
    with caplog.at_level(logging.WARNING):
        loader = build_dali_loader(_cfg(tmp_path), SPEC, split="train", device=CPU, rank=0, world_size=1)
    assert loader.bad_files == 2 and sorted(loader.bad) == [3, 7]
    assert f"record 3 of {tmp_path / 'train.rec'}" in caplog.text and "record 7 of" in caplog.text
    loader.set_epoch(1)
    assert sum(len(b.label) for b in loader) == 8  # 10 good records: 2 whole batches of 4


def test_recordio_with_a_broken_frame_is_reported_not_crashed(tmp_path):
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", [(_png(i), 0) for i in range(6)])
    samples = RecordSamples(tmp_path / "train.rec", tmp_path / "train.idx")
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    off = int(samples.offsets[2])
    raw[off : off + 4] = b"\0\0\0\0"  # record 2's magic word
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    bad = bad_samples(RecordSamples(tmp_path / "train.rec", tmp_path / "train.idx"))
    assert list(bad) == [2] and "bad magic" in bad[2] and "record 2 of" in bad[2]


@needs_ffcv
def test_beton_corrupt_jpeg_is_counted_reported_and_never_trained(tmp_path, caplog):
    from pipelines.ffcv import build_ffcv_loader
    from pipelines.formats.beton import write_beton
    from pipelines.samples import BetonSamples

    rng = np.random.default_rng(0)
    items = [(rng.integers(60, 200, (24, 24, 3), dtype=np.uint8), i % 2) for i in range(12)]
    write_beton(tmp_path / "train.beton", items, mode="jpg")
    samples = BetonSamples(tmp_path / "train.beton")
    assert all(samples.is_jpeg(i) for i in range(len(samples)))
    ptr = int(samples.meta["data_ptr"][5])
    raw = bytearray((tmp_path / "train.beton").read_bytes())
    raw[ptr : ptr + 64] = bytes(64)  # record 5's JPEG header: FFCV would decode it to a black image
    (tmp_path / "train.beton").write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        loader = build_ffcv_loader(_cfg(tmp_path, num_threads=1), SPEC, split="train", device=CPU, rank=0,
                                   world_size=1)
    assert loader.bad_files == 1 and f"record 5 of {tmp_path / 'train.beton'}" in caplog.text
    seen = 0
    for b in loader:
        pixels = b.weak * torch.tensor(SPEC.std).view(1, 3, 1, 1) + torch.tensor(SPEC.mean).view(1, 3, 1, 1)
        assert float(pixels.amax(dim=(1, 2, 3)).min()) > 0.1, "an all-black image was trained on"
        seen += len(b.label)
    assert seen == 8  # 11 good records: 2 whole batches of 4


def _tree(root: Path, classes: list[str], per_class: int = 3) -> None:
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(_png(100 * k + i))


def test_val_lacking_a_class_keeps_the_train_labels(tmp_path):
    _tree(tmp_path / "train", ["a", "b", "c"])
    _tree(tmp_path / "val", ["a", "c"])  # no "b": its own folder list would relabel c as 1
    ev = build_eval_loader(tmp_path, "val", 16, SPEC.mean, SPEC.std, batch_size=6, num_workers=0)
    labels = torch.cat([y for _, y in ev]).tolist()
    assert labels == [0, 0, 0, 2, 2, 2]
    loader = build_torchvision_loader(_cfg(tmp_path), SPEC, split="val", device=CPU, rank=0, world_size=1)
    got = set(torch.cat([b.label for b in loader]).tolist())
    assert 2 in got and got <= {0, 2}  # 4 of the 6 images (one batch): at least one of class c


def test_val_class_unknown_to_train_is_an_error_naming_it(tmp_path):
    _tree(tmp_path / "train", ["a", "b"])
    _tree(tmp_path / "val", ["a", "zebra"])
    with pytest.raises(ValueError, match="zebra"):
        build_eval_loader(tmp_path, "val", 16, SPEC.mean, SPEC.std, batch_size=2, num_workers=0)
    assert "zebra" in eval_problem(tmp_path, ["train", "val"])


def test_manifest_classes_win_over_folders(tmp_path):
    _tree(tmp_path / "train", ["b", "c"])  # the converter kept 3 classes; train/ lost "a"
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    files = ImageFolderFiles(tmp_path / "train", pipelines.folder.train_classes(tmp_path))
    assert sorted({label for _, label in files.samples}) == [1, 2]
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / ".hidden").mkdir()
    assert pipelines.folder.class_dirs(tmp_path / "train") == ["b", "c"]  # hidden folders are not classes


def test_eval_loader_reads_every_layout_and_says_why_not(tmp_path):
    images = [(_png(i), i % 3) for i in range(9)]
    write_recordio(tmp_path / "val.rec", tmp_path / "val.idx", images)
    rec = find_split(tmp_path, "val")
    assert isinstance(rec, RecordSamples) and rec.labels.tolist() == [i % 3 for i in range(9)]
    ev = build_eval_loader(tmp_path, "val", 16, SPEC.mean, SPEC.std, batch_size=4, num_workers=0)
    x, y = next(iter(ev))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 0]
    with pytest.raises(EvalDataError, match=r"train\.rec \+ \.idx"):
        find_split(tmp_path, "train")
    src = tmp_path / "source"
    _tree(src / "train", ["p", "q", "r"])
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["p", "q"], "source": {"src": str(src)}}))
    assert "'r'" in eval_problem(tmp_path, ["train", "val"])  # a class the manifest does not list
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": ["p", "q", "r"], "source": {"src": str(src)}}))
    assert isinstance(find_split(tmp_path, "train"), TreeSamples)  # the tree recorded in the manifest
    assert eval_problem(tmp_path, ["train", "val"]) is None
    shutil.rmtree(src)
    assert "no split 'train'" in eval_problem(tmp_path, ["train", "val"])


@needs_ffcv
def test_eval_loader_reads_a_beton(tmp_path):
    from pipelines.formats.beton import write_beton

    rng = np.random.default_rng(1)
    write_beton(tmp_path / "val.beton", [(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), i % 2)
                                         for i in range(6)], mode="raw")
    ev = build_eval_loader(tmp_path, "val", 8, SPEC.mean, SPEC.std, batch_size=6, num_workers=0)
    x, y = next(iter(ev))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 0, 1, 0, 1]


def test_probe_crops_change_with_set_epoch(tmp_path):
    _tree(tmp_path / "train", ["a", "b"], per_class=4)
    ev = build_eval_loader(tmp_path, "train", 16, SPEC.mean, SPEC.std, batch_size=8, num_workers=0, train_aug=True)

    def crops(epoch: int) -> dict[int, torch.Tensor]:
        ev.set_epoch(epoch)
        x, _ = next(iter(ev))
        order = next(iter(ev.sampler))
        return {i: img for (i, _), img in zip(order, x)}

    e0, e0_again, e1 = crops(0), crops(0), crops(1)
    assert all(torch.equal(e0[i], e0_again[i]) for i in e0)  # an epoch is reproducible
    assert any(not torch.equal(e0[i], e1[i]) for i in e0)  # and the next one draws new crops


def test_every_loader_option_is_a_declared_config_key():
    from ressl.config import Config, load_config

    declared = {f.name: f.default for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(LoaderConfig):
        assert f.name in declared, f"LoaderConfig.{f.name} is not a Config key"
        if f.default is not dataclasses.MISSING:
            assert declared[f.name] == f.default, (f.name, declared[f.name], f.default)
    cfg = load_config(None, ["num_workers=3", "ffcv_order=random", "ffcv_os_cache=false", "ffcv_batches_ahead=2"])
    lc = LoaderConfig.of(cfg)
    assert (lc.num_workers, lc.threads, lc.ffcv_order, lc.ffcv_os_cache, lc.ffcv_batches_ahead) == (
        3, 3, "random", False, 2)
    assert LoaderConfig.of(load_config(None, ["num_threads=5"])).threads == 5
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        lc.per_process_batch(3)


def test_knn_monitor_says_once_why_it_is_off(tmp_path, caplog):
    from ressl.config import load_config
    from tools import train

    _tree(tmp_path / "train", ["a", "b"])  # no val split in any layout
    cfg = load_config(None, [f"data={tmp_path}", "recipe=cifar32", "batch_size=4", "queue_size=8"])
    train._KNN_OFF.clear()
    with caplog.at_level(logging.WARNING):
        got = [train.knn_monitor(cfg, SPEC, torch.nn.Identity(), CPU) for _ in range(3)]
    assert got == [None, None, None]
    assert caplog.text.count("kNN monitor off") == 1 and "no split 'val'" in caplog.text


# ------------------------------------------------------------------------------------------------
# outputs checked against the manifest; loops; all-bad data (issue "Reliability, second round")


def _converted(root: Path, per_class: int, seed: int = 0, formats=("rec", "folder")) -> Path:
    """A folder source of 2 classes converted into root/out/folder (tree copy via --classes-free source)."""
    from pipelines.formats.convert import ConvertOptions, convert
    from pipelines.formats.sources import build_source

    for c in range(2):
        d = root / "src" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"{i}.png").write_bytes(_png(100 * c + i + seed))
    source = build_source("folder", root / "src")
    source.folder_splits.clear()  # a copied tree, whose file count the manifest records
    convert(source, root / "out", ConvertOptions(formats=formats, progress=False, workers=1))
    return root / "out" / "folder"


def test_loaders_refuse_outputs_that_do_not_match_the_manifest(tmp_path):
    """Before: a foreign .rec/.idx under a manifest listing 12 images trained on 40, an .idx cut short
    trained on what was left, and a tree with extra files trained on them, all silently."""
    from pipelines.formats.manifest import ManifestMismatchError

    small = _converted(tmp_path / "small", per_class=6)
    big = _converted(tmp_path / "big", per_class=20)
    assert len(RecordSamples(small / "train.rec", small / "train.idx")) == 12  # matching: opens
    assert len(TreeSamples(small / "train")) == 12
    for f in ("train.rec", "train.idx"):
        shutil.copy(big / f, small / f)
    with pytest.raises(ManifestMismatchError, match=r"train.idx \(the index\) holds 40 samples but .*manifest.json "
                                                    r"lists 12 for train.rec; .*--force"):
        RecordSamples(small / "train.rec", small / "train.idx")
    lines = (big / "train.idx").read_text().splitlines(keepends=True)
    (big / "train.idx").write_text("".join(lines[:30]))
    with pytest.raises(ManifestMismatchError, match="holds 30 samples but .* lists 40"):
        RecordSamples(big / "train.rec", big / "train.idx")
    shutil.rmtree(big / "train")  # the eval loader then reads the .rec, and checks it the same way
    with pytest.raises(ManifestMismatchError, match="holds 30 samples"):
        find_split(big, "train")
    (small / "train" / "c0" / "extra.png").write_bytes(_png(999))
    with pytest.raises(ManifestMismatchError, match=r"image folder .*small/out/folder/train holds 13 samples"):
        build_torchvision_loader(LoaderConfig.of(_cfg(small)), SPEC, split="train", device=CPU, rank=0,
                                 world_size=1)


@needs_ffcv
def test_a_foreign_beton_under_a_manifest_is_refused(tmp_path):
    from pipelines.formats.manifest import ManifestMismatchError
    from pipelines.samples import BetonSamples

    small = _converted(tmp_path / "small", per_class=6, formats=("beton",))
    big = _converted(tmp_path / "big", per_class=20, seed=1, formats=("beton",))
    assert len(BetonSamples(small / "train.beton")) == 12
    shutil.copy(big / "train.beton", small / "train.beton")
    with pytest.raises(ManifestMismatchError, match=r"train.beton holds 40 samples but .* lists 12"):
        BetonSamples(small / "train.beton")


def test_symlink_loop_is_listed_once_by_the_tree_loaders(bad_tree, caplog):
    """Before: `ln -s . train/c0/self` made the torchvision backend read 61 batches from 12 files."""
    before = len(TreeSamples(bad_tree / "train"))
    os.symlink(".", bad_tree / "train" / "c0" / "self")
    os.symlink("../c0", bad_tree / "train" / "c0" / "twin")  # a second way into the same folder
    with caplog.at_level(logging.WARNING):
        assert len(TreeSamples(bad_tree / "train")) == before == len(ImageFolderFiles(bad_tree / "train"))
    assert "c0/self: directory already listed" in caplog.text and "c0/twin: directory already listed" in caplog.text


def test_all_bad_files_stop_before_training_naming_the_directory(tmp_path):
    """Before: a split whose every file was bad reached the training loop."""
    from pipelines.samples import NoReadableSamplesError

    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        (tmp_path / "train" / f"c{c}" / "empty.jpg").write_bytes(b"")
        (tmp_path / "train" / f"c{c}" / "noise.png").write_bytes(np.random.default_rng(c).bytes(300))
    with pytest.raises(NoReadableSamplesError, match=rf"{tmp_path / 'train'}: none of its 4 samples decodes"):
        bad_samples(TreeSamples(tmp_path / "train"))
