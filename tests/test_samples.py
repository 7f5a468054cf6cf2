"""pipelines/samples.py: the samples of a split in every layout (tree, .rec, .beton), the bad-sample check and
its cache, outputs refused when they do not match the converter's manifest, symlink loops listed once, and a
split with no readable sample stopped before training."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import loader_cfg, png_bytes

import pipelines
from pipelines.batch import LoaderConfig
from pipelines.eval import find_split
from pipelines.folder import ImageFolderFiles
from pipelines.formats.recordio import write_recordio
from pipelines.samples import RecordSamples, TreeSamples, bad_samples
from pipelines.spec import get_recipe
from pipelines.torchvision import build_torchvision_loader

CPU = torch.device("cpu")
SPEC = get_recipe("cifar32")
needs_ffcv = pytest.mark.skipif(not pipelines.available_backends()["ffcv"], reason="the FFCV backend is not installed")


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
    (bad_tree / "train" / "c0" / "empty.jpg").write_bytes(png_bytes(3))  # the empty file is now an image
    again = bad_samples(TreeSamples(bad_tree / "train"), check=counting)
    assert len(calls) == 16 and len(again) == 2


def test_recordio_with_a_broken_frame_is_reported_not_crashed(tmp_path):
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", [(png_bytes(i), 0) for i in range(6)])
    samples = RecordSamples(tmp_path / "train.rec", tmp_path / "train.idx")
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    off = int(samples.offsets[2])
    raw[off : off + 4] = b"\0\0\0\0"  # record 2's magic word
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    bad = bad_samples(RecordSamples(tmp_path / "train.rec", tmp_path / "train.idx"))
    assert list(bad) == [2] and "bad magic" in bad[2] and "record 2 of" in bad[2]


# ------------------------------------------------------------------------------------------------
# outputs checked against the manifest


def _converted(root: Path, per_class: int, seed: int = 0, formats=("rec", "folder")) -> Path:
    """A folder source of 2 classes converted into root/out/folder (tree copy via --classes-free source)."""
    from pipelines.formats.convert import ConvertOptions, convert
    from pipelines.formats.sources import build_source

    for c in range(2):
        d = root / "src" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"{i}.png").write_bytes(png_bytes(100 * c + i + seed))
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
    (small / "train" / "c0" / "extra.png").write_bytes(png_bytes(999))
    with pytest.raises(ManifestMismatchError, match=r"image folder .*small/out/folder/train holds 13 samples"):
        build_torchvision_loader(LoaderConfig.of(loader_cfg(small)), SPEC, split="train", device=CPU, rank=0,
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


# ------------------------------------------------------------------------------------------------
# loops and all-bad data


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
